"""The recovery loops of ``bench_minitron.py``: Minitron's teacher correction (``--teacher-correction``), the KD run
of every student (``distil``) and the test-perplexity curve taken on the way (``--eval-at``)."""

from __future__ import annotations

import time

import torch
from common import summarize
from lm_common import common_args, kd_trainer, perplexity
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments


def correct_teacher(teacher, train, size: dict, steps: int, lr: float, out: str) -> dict:
    """Minitron's teacher correction: fine-tune the teacher in place on the KD text (plain `Trainer`, its own
    next-token cross-entropy) before it is pruned and distilled from, so the students start from and learn a teacher
    that has seen the KD text's distribution."""
    trainer = Trainer(
        model=teacher.train(),
        args=TrainingArguments(**common_args(dict(size, steps=steps), lr, out)),
        train_dataset=train,
    )
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    teacher.eval()  # its parameters keep requires_grad: the students pruned from it are copies that must train
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"steps": steps, "lr": lr, "train_seconds": time.perf_counter() - start, "last_loss": losses[-1]}


class PerplexityCurve(TrainerCallback):
    """WikiText-2 test perplexity of the student after each of ``steps`` (the learning rate not yet decayed there)."""

    def __init__(self, rows: torch.Tensor, steps, teacher_ppl: float, tokens_per_step: int):
        self.rows, self.steps, self.teacher_ppl, self.tokens_per_step = rows, set(steps), teacher_ppl, tokens_per_step
        self.points: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and state.global_step < state.max_steps:
            result = perplexity(model, self.rows)
            model.train()
            self.points.append(
                {
                    "step": state.global_step,
                    "train_tokens": state.global_step * self.tokens_per_step,
                    "ppl": result["ppl"],
                    "ppl_ratio": result["ppl"] / self.teacher_ppl,
                }
            )
            ratio = self.points[-1]["ppl_ratio"]
            print(f"  step {state.global_step}: ppl {result['ppl']:.2f} ({ratio:.3f}x the teacher)", flush=True)


def distil(
    teacher, student, tokenizer, train, size: dict, lr: float, out: str, curve=None, collator=None, **options
) -> dict:
    callbacks = () if curve is None else (curve,)
    trainer, timer = kd_trainer(teacher, student, tokenizer, train, size, lr, out, callbacks, collator, **options)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "train_seconds": time.perf_counter() - start,
        "step_s": summarize(timer.step_times(skip=size["skip"])),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "curve": [] if curve is None else curve.points,
    }
