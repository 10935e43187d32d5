"""On-policy distillation at the floor: does an on-policy DistillationTrainer step cost generate + student step +
teacher forward? And what does on-policy buy over off-policy at the same token budget?

Timing (medians of optimizer steps, warm-up excluded; fp32; the same prompts, seed and generation length):

* ``on_policy``: a ``DistillationTrainer`` step with ``on_policy_ratio=1`` (the student samples ``max_new_tokens``,
  the teacher scores prompt + completion in one forward, reverse KL on completion tokens);
* the floor, measured by hand on the trainer's own batches (recorded by its collator, in the order of its shuffled
  sampler): ``generate`` (``model.generate`` of the student, sampling),
  ``student_step`` (forward + backward + AdamW step on the generated batch) and ``teacher_forward``
  (``torch.inference_mode``); ``on_policy / floor`` (goal <= 1.05). Process CPU seconds are recorded next to the
  wall times (``step_cpu_s``, ``on_policy_over_floor_cpu``): on a shared machine they are the load-robust
  comparison (with one intra-op thread, another job's load stretches wall time but hardly the CPU time used);
* ``trl`` (``--trl``, when ``trl`` is importable): TRL's on-policy ``DistillationTrainer`` on the same pair and
  prompts (chat prompts, same completion length, fp32, its own teacher copy); ``on_policy / trl`` (goal <= 0.6).

Quality (``--size small`` / ``full``): the same student trained off-policy (``on_policy_ratio=0``, the dataset's
completions) and on-policy (``1``) for the same number of completion tokens, then scored by the reverse KL to the
teacher on its own samples of held-out prompts (lower is better).

Pairs: ``tiny`` = random 3-layer / 2-layer Llamas (a smoke test); ``small`` / ``full`` = SmolLM2-135M teacher
(``builtin:SmolLM2-135M``) and a ``make_student`` student with fewer layers, prompts and completions cut from
``data/tinyshakespeare/train.txt`` (held-out prompts from ``valid.txt``).

Usage (from the repository root): ``python bench/bench_on_policy.py --size small``; writes
``bench/results/on_policy.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, StepTimer, machine_info, setup_threads, summarize, write_json
from datasets import Dataset
from lm_common import CpuStepTimer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers import logging as hf_logging

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.losses import soft_loss
from hf_compress.distillation.on_policy import PromptCompletionCollator, rollout, special_token_ids
from hf_compress.distillation.student import make_student
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.models.builtin import resolve_model_path
from hf_compress.reporting.measure import format_table

DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare"
# batch, prompt words, max_new_tokens, timed steps, warm-up steps, student layers, quality steps
SIZES = {
    "tiny": dict(batch=4, prompt_words=6, new_tokens=8, steps=4, skip=1, student_layers=2, quality_steps=0),
    "small": dict(batch=4, prompt_words=16, new_tokens=16, steps=4, skip=1, student_layers=6, quality_steps=6),
    "full": dict(batch=8, prompt_words=32, new_tokens=32, steps=6, skip=2, student_layers=10, quality_steps=20),
}


def build_pair(size: str, student_layers: int):
    """(teacher, student, tokenizer): random tiny Llamas with a word-level tokenizer, or the SmolLM2-135M pair."""
    torch.manual_seed(0)
    if size == "tiny":
        words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(509)]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
        )
        config = LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=512, pad_token_id=0, eos_token_id=2)  # fmt: skip
        teacher = LlamaForCausalLM(config)
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    else:
        path = resolve_model_path("builtin:SmolLM2-135M")
        tokenizer = AutoTokenizer.from_pretrained(path)
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = make_student(teacher, num_layers=student_layers)
    return teacher.eval(), student, tokenizer


def make_examples(size: str, n: int, words: int, split: str = "train", offset: int = 0) -> list[dict[str, str]]:
    """`n` prompt/completion pairs: consecutive words of the shipped text (random words for the tiny pair)."""
    if size == "tiny":
        g = torch.Generator().manual_seed(offset)
        ids = torch.randint(3, 512, (n, 2 * words), generator=g).tolist()
        text = [" ".join(f"w{i}" for i in row) for row in ids]
        return [{"prompt": " ".join(t.split()[:words]), "completion": " " + " ".join(t.split()[words:])} for t in text]
    tokens = (DATA / f"{split}.txt").read_text().split()
    out = []
    for i in range(n):
        start = (offset + i) * 2 * words
        out.append({"prompt": " ".join(tokens[start : start + words]),
                    "completion": " " + " ".join(tokens[start + words : start + 2 * words])})  # fmt: skip
    return out


def config(out: Path, size: dict, steps: int, ratio: float) -> DistillationConfig:
    return DistillationConfig(
        output_dir=str(out), per_device_train_batch_size=size["batch"], max_steps=steps, learning_rate=1e-4,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        temperature=1.0, distillation_loss="reverse_kl", on_policy_ratio=ratio, max_new_tokens=size["new_tokens"],
        dataloader_num_workers=0,
    )  # fmt: skip


class RecordingCollator(PromptCompletionCollator):
    """A `PromptCompletionCollator` that keeps a copy of every batch it makes, in the order the trainer asks."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, examples):
        batch = super().__call__(examples)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def on_policy_times(teacher, student, tokenizer, examples, size: dict, out: Path):
    """Wall and CPU seconds of the on-policy trainer's steps, and the batches it trained on (for the floor)."""
    timer = CpuStepTimer()
    collator = RecordingCollator(tokenizer)
    trainer = DistillationTrainer(model=copy.deepcopy(student).train(), teacher_model=teacher,
                                  args=config(out, size, size["steps"], 1.0), train_dataset=examples,
                                  data_collator=collator, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.train()
    return timer.step_times(size["skip"]), timer.cpu_times(size["skip"]), collator.batches[: size["steps"]]


class PhaseTimer:
    """Wall and process-CPU seconds of named phases: `with timer("generate"): ...`."""

    def __init__(self):
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self._name = None

    def __call__(self, name: str):
        self._name = name
        return self

    def __enter__(self):
        self._start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        self.wall.setdefault(self._name, []).append(time.perf_counter() - self._start[0])
        self.cpu.setdefault(self._name, []).append(time.process_time() - self._start[1])


def floor_times(teacher, student, tokenizer, batches, size: dict) -> tuple[dict, dict]:
    """Generate, student step and teacher forward by hand, on `batches` (the trainer's, see `on_policy_times`);
    returns the wall and the CPU seconds of each phase."""
    model = copy.deepcopy(student).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    eos, pad = special_token_ids(model, tokenizer)
    timer = PhaseTimer()
    for step, batch in enumerate(batches):
        with timer("generate"):
            gen = rollout(model, batch, size["new_tokens"], eos, pad, seed=0, step=step)
        gen.pop("generated_by")
        labels = gen.pop("labels")
        with timer("teacher_forward"), torch.inference_mode():
            teacher_logits = teacher(**gen, use_cache=False).logits
        with timer("student_step"):
            logits = model(**gen, use_cache=False).logits
            mask = (labels[:, 1:] != -100).unsqueeze(-1)
            loss = soft_loss(logits[:, :-1], teacher_logits[:, :-1], mask.squeeze(-1), "reverse_kl", 1.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    skip = size["skip"]
    return {k: v[skip:] for k, v in timer.wall.items()}, {k: v[skip:] for k, v in timer.cpu.items()}


def trl_times(teacher, student, tokenizer, examples, size: dict, out: Path) -> list[float]:
    """TRL's on-policy DistillationTrainer on the same chat prompts."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # trl is optional (only `--trl`) and slow to import
    from trl import DistillationConfig as TRLConfig
    from trl import DistillationTrainer as TRLTrainer

    data = Dataset.from_list(examples)
    args = TRLConfig(output_dir=str(out), per_device_train_batch_size=size["batch"], max_steps=size["steps"],
                     learning_rate=1e-4, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                     disable_tqdm=True, seed=0, bf16=False, fp16=False, max_completion_length=size["new_tokens"],
                     temperature=1.0)  # fmt: skip
    timer = StepTimer()
    trainer = TRLTrainer(model=copy.deepcopy(student).train(), teacher_model=copy.deepcopy(teacher), args=args,
                         train_dataset=data, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
    trainer.train()
    return timer.step_times(size["skip"])


@torch.no_grad()
def reverse_kl_on_teacher_samples(student, teacher, tokenizer, prompts, size: dict) -> float:
    """Mean reverse KL(student || teacher) on completion tokens of teacher samples of held-out prompts."""
    collator = PromptCompletionCollator(tokenizer)
    eos, pad = special_token_ids(teacher, tokenizer)
    total, count = 0.0, 0
    for i in range(0, len(prompts), size["batch"]):
        batch = rollout(teacher, collator(prompts[i : i + size["batch"]]), size["new_tokens"], eos, pad, seed=1)
        labels = batch.pop("labels")
        batch.pop("generated_by")
        mask = labels[:, 1:] != -100
        s, t = student(**batch).logits[:, :-1], teacher(**batch).logits[:, :-1]
        total += float(soft_loss(s, t, mask, "reverse_kl", 1.0, normalizer=1))
        count += int(mask.sum())
    return total / max(count, 1)


def quality(teacher, student, tokenizer, size: dict, tmp: Path) -> dict:
    steps = size["quality_steps"]
    train = make_examples("full", steps * size["batch"], size["prompt_words"], "train", offset=1000)
    held_out = make_examples("full", 2 * size["batch"], size["prompt_words"], "valid")
    result = {"steps": steps, "before": reverse_kl_on_teacher_samples(student, teacher, tokenizer, held_out, size)}
    for name, ratio in (("off_policy", 0.0), ("on_policy", 1.0)):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student).train(),
            teacher_model=teacher,
            args=config(tmp / name, size, steps, ratio),
            train_dataset=train,
            data_collator=PromptCompletionCollator(tokenizer),
            processing_class=tokenizer,
        )
        trainer.train()
        model = trainer.model.eval()
        result[name] = reverse_kl_on_teacher_samples(model, teacher, tokenizer, held_out, size)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--trl", action="store_true", help="Also time TRL's on-policy DistillationTrainer.")
    parser.add_argument("--quality-steps", type=int, default=None, help="Training steps of the quality comparison.")
    parser.add_argument("--output", default=str(RESULTS_DIR / "on_policy.json"))
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    hf_logging.set_verbosity_error()
    size = dict(SIZES[args.size])
    if args.quality_steps is not None:
        if args.quality_steps < 0:
            parser.error(f"--quality-steps must be >= 0, got {args.quality_steps}.")
        size["quality_steps"] = args.quality_steps
    teacher, student, tokenizer = build_pair(args.size, size["student_layers"])
    # Timing: prompt-only chat prompts, the one format TRL's DistillationTrainer accepts, for every variant.
    examples = make_examples(args.size, size["batch"] * size["steps"], size["prompt_words"])
    examples = [{"prompt": [{"role": "user", "content": e["prompt"]}]} for e in examples]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times, cpu_times, batches = on_policy_times(teacher, student, tokenizer, examples, size, tmp / "ours")
        floor_wall, floor_cpu = floor_times(teacher, student, tokenizer, batches, size)
        stats = {"on_policy": summarize(times), **{k: summarize(v) for k, v in floor_wall.items()}}
        cpu = {"on_policy": summarize(cpu_times), **{k: summarize(v) for k, v in floor_cpu.items()}}
        if args.trl and importlib.util.find_spec("trl") is not None:
            stats["trl"] = summarize(trl_times(teacher, student, tokenizer, examples, size, tmp / "trl"))
        phases = ("generate", "student_step", "teacher_forward")
        floor, floor_cpu_s = sum(stats[k]["median"] for k in phases), sum(cpu[k]["median"] for k in phases)
        result = {"step_s": stats, "floor_s": floor, "on_policy_over_floor": stats["on_policy"]["median"] / floor,
                  "step_cpu_s": cpu, "floor_cpu_s": floor_cpu_s,
                  "on_policy_over_floor_cpu": cpu["on_policy"]["median"] / floor_cpu_s}  # fmt: skip
        if "trl" in stats:
            result["on_policy_over_trl"] = stats["on_policy"]["median"] / stats["trl"]["median"]
        if size["quality_steps"]:
            result["quality_reverse_kl"] = quality(teacher, student, tokenizer, size, tmp)
    payload = {"benchmark": "on_policy", "size": args.size, "config": size, "machine": machine_info(), **result}
    row = {"ours s": round(stats["on_policy"]["median"], 4), "floor s": round(floor, 4),
           "ours/floor (goal <= 1.05)": f"{result['on_policy_over_floor']:.3f}",
           "ours/floor CPU s": f"{result['on_policy_over_floor_cpu']:.3f}"}  # fmt: skip
    if "trl" in stats:
        row["trl s"] = round(stats["trl"]["median"], 4)
        row["ours/trl (goal <= 0.6)"] = f"{result['on_policy_over_trl']:.3f}"
    print("On-policy step time")
    print(format_table([row]))
    if "quality_reverse_kl" in result:
        print("Reverse KL to the teacher on held-out teacher samples:", result["quality_reverse_kl"])
    path = write_json(payload, args.output)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
