"""What the LM benches share: their texts, the WikiText-2 perplexity method, and one forward-KL KD trainer setup.

``bench_llm.py``, ``bench_minitron.py``, ``bench_gemma3.py``, ``bench_torch_pruning_llm.py`` and ``bench_on_policy.py``
import from here, so every LM number in BENCHMARKS.md is measured the same way.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from common import StepTimer
from transformers import default_data_collator

from hf_compress.distillation import DistillationConfig, DistillationTrainer

DATA = Path(__file__).resolve().parents[1] / "data"
TEXTS = {
    "tinyshakespeare": DATA / "tinyshakespeare" / "train.txt",
    "wikitext2_valid": DATA / "wikitext2_valid_test" / "wiki.valid.tokens",
    "wikitext2_test": DATA / "wikitext2_valid_test" / "wiki.test.tokens",
}
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Texts kept in tab-separated tables: (files, the text columns, header lines skipped). They are extra KD text only;
# none of them overlaps WikiText-2 test. ``ag_news`` lives in the shared data folder beside the checkout.
TABLE_TEXTS = {
    "mrpc": ((DATA / "mrpc" / "msr_paraphrase_train.txt", DATA / "mrpc" / "msr_paraphrase_test.txt"), (3, 4), 1),
    "ag_news": ((SHARED_DATA / "ag_news" / "dev.tsv", SHARED_DATA / "ag_news" / "test.tsv"), (0,), 0),
}
PPL_METHOD = (
    "WikiText-2 test (data/wikitext2_valid_test/wiki.test.tokens, the <unk>-tokenised release, not wikitext-2-raw) "
    "tokenised as one stream; its first `tokens` tokens cut into non-overlapping blocks of `block_size` (stride = "
    "block size, no context carried across blocks, the last partial block dropped); ppl = exp(mean next-token NLL "
    "over the block_size - 1 predicted positions of every block)"
)


def text_lines(source: Path | str) -> list[str]:
    """Lines of a text file or of a named text (``TEXTS``; ``TABLE_TEXTS``: a line per table cell), newlines kept."""
    if isinstance(source, Path) or source in TEXTS:
        return Path(TEXTS.get(source, source)).read_text(encoding="utf-8").splitlines(keepends=True)
    if source not in TABLE_TEXTS:
        raise ValueError(f"unknown text `{source}`; choose one of {sorted([*TEXTS, *TABLE_TEXTS])}.")
    files, columns, header = TABLE_TEXTS[source]
    lines: list[str] = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"text `{source}` needs {path}, which is missing; pick another text.")
        for row in path.read_text(encoding="utf-8-sig").splitlines()[header:]:
            cells = row.split("\t")
            lines.extend(cells[c].strip() + "\n" for c in columns if c < len(cells) and cells[c].strip())
    return lines


def token_stream(tokenizer, source: Path | str, limit: int | None = None) -> torch.Tensor:
    """Token ids of a text (see ``text_lines``) as one stream (tokenised line by line); the first ``limit`` ids."""
    ids: list[int] = []
    for line in text_lines(source):
        ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            break
    if limit is not None and len(ids) < limit:
        name = source.name if isinstance(source, Path) else source
        raise ValueError(f"`{name}` has {len(ids)} tokens, fewer than the {limit} needed; lower the size.")
    return torch.tensor(ids[:limit], dtype=torch.long)


def blocks(ids: torch.Tensor, seq: int) -> torch.Tensor:
    """``ids`` cut into ``(n, seq)`` non-overlapping rows; the trailing partial row is dropped."""
    n = len(ids) // seq
    if n == 0:
        raise ValueError(f"`seq` {seq} is longer than the {len(ids)} tokens available.")
    return ids[: n * seq].view(n, seq)


@torch.inference_mode()
def perplexity(model, rows: torch.Tensor, batch: int = 8) -> dict:
    """Token-weighted perplexity of ``model`` on equal-length ``rows`` (see ``PPL_METHOD``), with its wall time."""
    model.eval()
    start, nll, count = time.perf_counter(), 0.0, 0
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch]
        loss = model(input_ids=ids, labels=ids).loss  # mean over the (seq - 1) shifted positions of every row
        tokens = ids.shape[0] * (ids.shape[1] - 1)
        nll, count = nll + float(loss) * tokens, count + tokens
    return {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "tokens_scored": count,
        "seconds": time.perf_counter() - start,
    }


@torch.inference_mode()
def mean_kl(teacher, student, rows: torch.Tensor, batch: int = 8) -> float:
    """Mean forward KL(teacher || student) in nats per token over every position of ``rows`` (softmax in float32).

    Measured on held-in (KD) and held-out (test) rows of the same length, the two values tell a student that memorised
    its KD text (held-in far below held-out) from one that fits every text equally badly (the two alike).
    """
    teacher.eval(), student.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch]
        log_t = torch.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
        log_s = torch.log_softmax(student(input_ids=ids).logits.float(), dim=-1)
        total += float((log_t.exp() * (log_t - log_s)).sum())
        count += ids.numel()
    return total / count


class TokenNoise:
    """Collate equal-length rows, then replace every token with probability ``p`` by one drawn from ``pool``.

    An input augmentation for distillation: the teacher and the student read the same changed rows, so the target
    is still the teacher's exact distribution, on contexts the KD text does not hold verbatim. Drawing from ``pool``
    (the KD tokens, repeats included) keeps the unigram frequencies of the text. ``labels`` follow ``input_ids``.
    Seeded, so a run is repeatable with ``dataloader_num_workers=0``.
    """

    def __init__(self, pool: torch.Tensor, p: float, seed: int = 0):
        if not 0 <= p < 1:
            raise ValueError(f"`p` must be in [0, 1), got {p}.")
        self.pool, self.p = pool.flatten(), p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, features: list[dict]) -> dict:
        batch = default_data_collator(features)
        ids = batch["input_ids"].clone()
        hit = torch.rand(ids.shape, generator=self.generator) < self.p
        draws = torch.randint(len(self.pool), (int(hit.sum()),), generator=self.generator)
        ids[hit] = self.pool[draws]
        batch["input_ids"] = ids
        if "labels" in batch:
            batch["labels"] = ids.clone()
        return batch


class CpuStepTimer(StepTimer):
    """``StepTimer`` that also records the process CPU time (all threads) of every step."""

    def __init__(self):
        super().__init__()
        self._cpu: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._cpu.append(time.process_time())
        super().on_step_begin(args, state, control, **kwargs)

    def cpu_times(self, skip: int = 0) -> list[float]:
        return [b - a for a, b in zip(self._cpu, self._cpu[1:])][skip:]


def common_args(size: dict, lr: float, out: str) -> dict:
    """TrainingArguments shared by both trainers, so they see the same batches, schedule and optimizer."""
    return dict(
        output_dir=out,
        max_steps=size["steps"],
        per_device_train_batch_size=size["batch"],
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, size["steps"] // 10),
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=0,
        data_seed=0,
        report_to="none",
        use_cpu=True,
        bf16=size.get("bf16", False),
        fp16=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def kd_trainer(
    teacher, student, tokenizer, train, size: dict, lr: float, out: str, callbacks=(), collator=None, **options
):
    """Our forward-KL `DistillationTrainer` for the LM benches (chunked loss), and its CPU step timer.

    ``collator`` replaces ``default_data_collator`` (e.g. ``TokenNoise``, which changes the rows both models read);
    ``options`` are more `DistillationConfig` fields (e.g. ``hidden_loss_weight``), or replace the defaults (pure
    forward KL: ``alpha=1``, ``T=1``).
    """
    defaults = dict(alpha=1.0, temperature=1.0, distillation_loss="kl", loss_chunk_size=size["chunk"])
    config = DistillationConfig(**common_args(size, lr, out), **{**defaults, **options})
    timer = CpuStepTimer()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=collator or default_data_collator,
        callbacks=[timer, *callbacks],
    )
    return trainer, timer
