"""The KD data of ``bench_minitron.py``: named texts and their repeats (``--train-text``), the KD row pool
(``--shift-repeats``), and rows the teacher writes itself (``--teacher-samples``)."""

from __future__ import annotations

import argparse

import torch
from lm_common import TABLE_TEXTS, TEXTS, blocks, token_stream

from hf_compress.distillation.on_policy import generate_completions


def text_spec(value: str) -> tuple[str, int]:
    """``NAME`` or ``NAME:REPEATS`` of ``--train-text``: a named text and how many times its rows enter the KD pool."""
    name, _, repeats = value.partition(":")
    if name not in (*TEXTS, *TABLE_TEXTS) or name == "wikitext2_test":
        choices = sorted(n for n in (*TEXTS, *TABLE_TEXTS) if n != "wikitext2_test")
        raise argparse.ArgumentTypeError(f"unknown text {name!r} (the test text is never trained on); use {choices}")
    if repeats and (not repeats.isdigit() or int(repeats) < 1):
        raise argparse.ArgumentTypeError(f"repeats in {value!r} must be a whole number >= 1, e.g. {name}:2")
    return name, int(repeats or 1)


def kd_pool(
    tokenizer, specs: list[tuple[str, int]], seq: int, needed: int, shift: bool = False
) -> tuple[torch.Tensor, list[dict]]:
    """The KD rows: every text's ``seq``-token rows, in order, each repeated its times; the first ``needed`` tokens.

    The trainer samples the rows in random order and repeats the pool, epoch after epoch, when it is shorter than the
    budget. One text with one repeat is the stream's first ``needed`` tokens, as before this option existed. With
    ``shift``, repeat ``r`` of a text ``N`` times cuts its rows ``r * seq // N`` tokens into the stream, so each repeat
    sees the same tokens at other positions and after other contexts (the trailing partial row is dropped).
    """
    parts, used, texts = [], 0, []
    for name, repeats in specs:
        if used >= needed // seq:  # the budget is full: the texts after it are not read
            texts.append({"text": name, "repeats": repeats, "distinct_tokens": 0})
            continue
        stream = token_stream(tokenizer, name)
        offsets = [r * seq // repeats for r in range(repeats)] if shift else [0] * repeats
        rows = torch.cat([blocks(stream[offset:], seq) for offset in offsets])
        take = min(len(rows), max(0, needed // seq - used))
        parts.append(rows[:take])
        used += take
        distinct = min(take * seq, len(stream) if shift else len(stream) // seq * seq)  # unshifted: whole rows only
        texts.append({"text": name, "repeats": repeats, "distinct_tokens": int(distinct)})
    pool = torch.cat(parts)
    if len(pool) == 0:
        raise ValueError(f"the KD texts {specs} give no row of {seq} tokens.")
    return pool, texts


def teacher_samples(
    teacher, source: torch.Tensor, n: int, prompt: int, top_p: float, eos_token_id, pad_token_id: int, batch: int = 64
) -> tuple[torch.Tensor, int]:
    """Up to ``n`` KD rows written by the teacher (sequence-level KD data) and how many were dropped.

    Row ``i`` starts with the first ``prompt`` tokens of one of ``source``'s rows (``n`` of them, evenly spaced) and is
    completed to ``source``'s row length by sampling from the teacher (temperature 1, nucleus ``top_p``, seed ``i``:
    the rows do not depend on the batch). A row whose completion ends at an EOS token is dropped, so every kept row
    is full length and unpadded.
    """
    seq = source.shape[1]
    if not 0 < prompt < seq:
        raise ValueError(f"`prompt` must be in [1, {seq - 1}] (the rows have {seq} tokens), got {prompt}.")
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}.")
    picks = torch.linspace(0, len(source) - 1, n).round().long()
    stops = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long).view(-1)
    kept = []
    for start in range(0, n, batch):
        prompts = source[picks[start : start + batch], :prompt]
        seeds = list(range(start, start + len(prompts)))
        completion, _ = generate_completions(
            teacher, prompts, torch.ones_like(prompts), seq - prompt, eos_token_id, pad_token_id, 1.0, top_p, seeds
        )
        full = ~torch.isin(completion, stops).any(1)
        kept.append(torch.cat([prompts, completion], 1)[full])
    rows = torch.cat(kept)
    return rows, n - len(rows)
