"""The KD text options of the LM benches: named texts read from files and tables, and the mixed KD pool of
``bench_minitron.py --train-text NAME[:REPEATS] ...`` (order, repeats, the budget cut, refused names)."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

from tests.bench.test_bench_llm import REPO, word_tokenizer
from tests.tiny_models import tiny_inputs, tiny_model

sys.path.insert(0, str(REPO / "bench"))
from kd_texts import kd_pool, teacher_samples, text_spec  # noqa: E402
from lm_common import TABLE_TEXTS, TokenNoise, blocks, mean_kl, text_lines, token_stream  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def test_table_text_keeps_the_text_columns_only():
    lines = text_lines("mrpc")
    files, columns, header = TABLE_TEXTS["mrpc"]
    rows = sum(len(path.read_text(encoding="utf-8-sig").splitlines()) - header for path in files)
    assert columns == (3, 4) and len(lines) <= 2 * rows and len(lines) > rows  # two sentences per pair
    assert all(line.endswith("\n") and "\t" not in line for line in lines)
    assert not any(line.startswith(("Quality", "#1 String")) for line in lines)  # header skipped
    first = files[0].read_text(encoding="utf-8-sig").splitlines()[1].split("\t")
    assert lines[:2] == [first[3].strip() + "\n", first[4].strip() + "\n"]


def test_unknown_text_is_refused():
    with pytest.raises(ValueError, match="unknown text `nope`"):
        text_lines("nope")


def test_text_spec_parses_and_refuses():
    assert text_spec("mrpc") == ("mrpc", 1) and text_spec("wikitext2_valid:3") == ("wikitext2_valid", 3)
    for bad, message in (("wikitext2_test", "never trained on"), ("nope", "unknown text"), ("mrpc:0", ">= 1")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            text_spec(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="whole number"):
        text_spec("mrpc:two")


def test_one_text_is_the_streams_first_tokens(tokenizer):
    pool, texts = kd_pool(tokenizer, [("wikitext2_valid", 1)], seq=16, needed=160)
    expected = blocks(token_stream(tokenizer, "wikitext2_valid")[:160], 16)
    assert torch.equal(pool, expected)
    assert texts == [{"text": "wikitext2_valid", "repeats": 1, "distinct_tokens": 160}]


def test_mixed_pool_repeats_then_appends_and_stops_at_the_budget(tokenizer):
    # a budget past the twice-repeated first text reaches the second text, and is cut at the budget
    first = blocks(token_stream(tokenizer, "tinyshakespeare"), 16)
    pool, texts = kd_pool(tokenizer, [("tinyshakespeare", 2), ("mrpc", 1)], seq=16, needed=len(first) * 32 + 48)
    assert len(pool) == 2 * len(first) + 3
    assert torch.equal(pool[: len(first)], first) and torch.equal(pool[len(first) : 2 * len(first)], first)
    assert torch.equal(pool[2 * len(first) :], blocks(token_stream(tokenizer, "mrpc"), 16)[:3])
    assert texts[0]["distinct_tokens"] == len(first) * 16 and texts[1]["distinct_tokens"] == 48


def test_mean_kl_is_zero_for_the_same_model_and_matches_the_definition():
    teacher, student = tiny_model("llama", head="causal_lm", seed=0), tiny_model("llama", head="causal_lm", seed=1)
    rows = tiny_inputs(batch=3, seq=8)["input_ids"]
    assert mean_kl(teacher, teacher, rows, batch=2) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=rows).logits, -1)
        q = torch.softmax(student(input_ids=rows).logits, -1)
    expected = float((p * (p.log() - q.log())).sum(-1).mean())
    assert mean_kl(teacher, student, rows, batch=2) == pytest.approx(expected, rel=1e-5) and expected > 0


def test_texts_past_a_full_budget_are_recorded_but_not_used(tokenizer):
    pool, texts = kd_pool(tokenizer, [("tinyshakespeare", 1), ("mrpc", 1)], seq=16, needed=64)
    assert torch.equal(pool, blocks(token_stream(tokenizer, "tinyshakespeare", 64), 16))
    assert texts[1] == {"text": "mrpc", "repeats": 1, "distinct_tokens": 0}


def test_shifted_repeats_cut_each_repeat_further_into_the_stream(tokenizer):
    stream = token_stream(tokenizer, "tinyshakespeare")
    pool, texts = kd_pool(tokenizer, [("tinyshakespeare", 4)], seq=16, needed=10**9, shift=True)
    parts = [blocks(stream[offset:], 16) for offset in (0, 4, 8, 12)]
    assert len(pool) == sum(len(part) for part in parts)
    start = 0
    for part in parts:
        assert torch.equal(pool[start : start + len(part)], part)
        start += len(part)
    assert not torch.equal(parts[0][0], parts[1][0])  # the repeats are not copies
    assert texts == [{"text": "tinyshakespeare", "repeats": 4, "distinct_tokens": len(stream)}]
    unshifted, _ = kd_pool(tokenizer, [("tinyshakespeare", 4)], seq=16, needed=10**9)
    assert torch.equal(unshifted[: len(parts[0])], unshifted[len(parts[0]) : 2 * len(parts[0])])


def test_teacher_samples_keep_the_prompts_and_are_seeded_per_row():
    teacher = tiny_model("llama", head="causal_lm", seed=0)
    source = tiny_inputs(batch=6, seq=8)["input_ids"]
    rows, dropped = teacher_samples(teacher, source, n=3, prompt=3, top_p=1.0, eos_token_id=None, pad_token_id=0)
    assert rows.shape == (3, 8) and dropped == 0
    picks = [0, 2, 5]  # evenly spaced over the six source rows (rounded)
    assert torch.equal(rows[:, :3], source[picks, :3])
    alone, _ = teacher_samples(teacher, source, n=3, prompt=3, top_p=1.0, eos_token_id=None, pad_token_id=0, batch=1)
    assert torch.equal(rows, alone)  # a row's sample does not depend on the other rows of its batch
    # the first token row 0 samples, declared EOS: that row stops early, so it is dropped
    common = int(rows[0, 3])
    kept, dropped = teacher_samples(teacher, source, n=1, prompt=3, top_p=1.0, eos_token_id=common, pad_token_id=0)
    assert len(kept) == 0 and dropped == 1
    with pytest.raises(ValueError, match="`prompt` must be in"):
        teacher_samples(teacher, source, n=1, prompt=8, top_p=1.0, eos_token_id=None, pad_token_id=0)


def test_token_noise_replaces_about_p_of_the_tokens_with_pool_tokens():
    """Every changed token comes from the pool, about ``p`` of them change, labels follow, and a seed repeats it."""
    rows = torch.arange(4000).view(100, 40)  # every id distinct, so a changed position is visible
    pool = torch.tensor([7000, 7001, 7002])
    features = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in rows]
    batch = TokenNoise(pool, 0.2, seed=3)(features)
    changed = batch["input_ids"] != rows
    assert torch.isin(batch["input_ids"][changed], pool).all()
    assert torch.equal(batch["input_ids"][~changed], rows[~changed])
    assert 0.17 < changed.float().mean() < 0.23  # 4,000 draws at p = 0.2
    assert torch.equal(batch["labels"], batch["input_ids"]) and torch.equal(
        batch["attention_mask"], torch.ones(100, 40)
    )
    assert torch.equal(TokenNoise(pool, 0.2, seed=3)(features)["input_ids"], batch["input_ids"])
    again = TokenNoise(pool, 0.2, seed=3)
    first, second = again(features)["input_ids"], again(features)["input_ids"]
    assert not torch.equal(first, second)  # a new draw every batch, not the same noise each epoch
    assert torch.equal(TokenNoise(pool, 0.0)(features)["input_ids"], rows)


def test_token_noise_refuses_a_bad_probability():
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"`p` must be in \[0, 1\)"):
            TokenNoise(torch.arange(3), p)
