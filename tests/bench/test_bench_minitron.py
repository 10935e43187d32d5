"""``bench/bench_minitron.py --size tiny`` runs end to end on a tiny saved Llama + word-level tokenizer (no SmolLM2).

Checks the JSON layout and what follows from the setup (every variant within the budget, depth-only keeps the width,
width-only keeps the depth, finite perplexities), never timings or perplexity values.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.bench.test_bench_llm import REPO, word_tokenizer

LAYERS, HIDDEN = 6, 32


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_minitron")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    return root


def run_bench(root, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO)  # this checkout's hf_compress, not the installed one
    command = [sys.executable, str(REPO / "bench" / "bench_minitron.py"), "--size", "tiny", "--threads", "1"]
    command += ["--fraction", "0.7", "--model", str(root / "tiny"), "--output", str(root / f"{name}.json"), *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def minitron(tiny_root) -> dict:
    result = run_bench(tiny_root, "minitron")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ppl/teacher recovered" in result.stdout and f"wrote {tiny_root / 'minitron.json'}" in result.stdout
    return json.loads((tiny_root / "minitron.json").read_text())


@pytest.mark.slow
def test_every_variant_fits_the_budget(minitron):
    assert minitron["benchmark"] == "minitron" and minitron["size"] == "tiny"
    assert set(minitron["variants"]) == {"depth", "width", "search"}
    assert minitron["budget"] == int(0.7 * minitron["model"]["params"])
    for variant in minitron["variants"].values():
        assert variant["params"] <= minitron["budget"]
        for stage in ("pruned", "recovered"):
            assert math.isfinite(variant[stage]["ppl"]) and variant[stage]["tokens_per_s"] > 0
        assert math.isclose(variant["ppl_ratio_recovered"], variant["recovered"]["ppl"] / minitron["teacher"]["ppl"])
        kl = variant["kl_to_teacher"]  # a pruned, briefly distilled student differs from its teacher everywhere
        assert kl["held_in"] > 0 and kl["held_out"] > 0 and math.isfinite(kl["held_in"] + kl["held_out"])


@pytest.mark.slow
def test_depth_keeps_width_and_width_keeps_depth(minitron):
    depth, width = minitron["variants"]["depth"], minitron["variants"]["width"]
    assert depth["shape"]["hidden"] == HIDDEN and depth["shape"]["layers"] < LAYERS
    assert len(depth["dropped_layers"]) == LAYERS - depth["shape"]["layers"]
    assert width["shape"]["layers"] == LAYERS and width["shape"]["hidden"] <= HIDDEN
    assert sum(row["chosen"] for row in minitron["variants"]["search"]["table"]) == 1


@pytest.mark.slow
def test_one_variant_in_bf16_with_a_perplexity_curve(tiny_root):
    """``--variants search --bf16 --eval-at --train-text --shift-repeats --teacher-samples --token-noise``: only that
    student, recovered in bf16 autocast on MRPC text and rows the teacher wrote (10% of tokens replaced, a hidden-state
    loss on the kept blocks, the text's own cross-entropy at weight 0.5) from a teacher first fine-tuned on that text,
    measured on the way."""
    extra = ("--variants", "search", "--bf16", "--steps", "5", "--eval-at", "2", "4", "--train-text", "mrpc:2")
    extra += ("--shift-repeats", "--teacher-samples", "2", "--prompt", "8", "--token-noise", "0.1")
    extra += ("--hidden-loss-weight", "0.5", "--alpha", "0.5", "--calibration-text", "wikitext2_valid")
    extra += ("--teacher-correction", "2")
    result = run_bench(tiny_root, "curve", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tiny_root / "curve.json").read_text())
    assert set(payload["variants"]) == {"search"}
    settings = payload["settings"]
    assert settings["precision"].startswith("bf16") and settings["steps"] == 5 and settings["shifted_repeats"]
    assert settings["token_noise"] == 0.1 and settings["hidden_loss"]["weight"] == 0.5 and settings["alpha"] == 0.5
    assert settings["calibration"].endswith("of wikitext2_valid") and settings["teacher_correction"]["steps"] == 2
    corrected = payload["corrected_teacher"]["ppl"]  # two steps at lr 1e-4 move the teacher's test perplexity
    assert math.isfinite(corrected) and corrected != payload["teacher"]["ppl"]
    student = payload["variants"]["search"]
    assert math.isclose(student["ppl_ratio_to_distilled_teacher"], student["recovered"]["ppl"] / corrected)
    kept = payload["variants"]["search"]["kept_layers"]  # what the hidden loss matches each student block to
    assert len(kept) == payload["variants"]["search"]["shape"]["layers"] and kept == sorted(set(kept))
    sampled = settings["teacher_samples"]  # rows the teacher wrote take the place of text rows in the budget
    assert sampled["rows"] + sampled["dropped_at_eos"] == 2 and sampled["prompt_tokens"] == 8
    text_rows = 5 * 2 - sampled["rows"]
    assert settings["train_text"] == [{"text": "mrpc", "repeats": 2, "distinct_tokens": text_rows * 32}]
    assert settings["distinct_train_tokens"] == 5 * 2 * 32
    curve = payload["variants"]["search"]["recovery"]["curve"]
    assert [point["step"] for point in curve] == [2, 4]
    teacher = payload["teacher"]["ppl"]
    for point in curve:
        assert math.isfinite(point["ppl"]) and math.isclose(point["ppl_ratio"], point["ppl"] / teacher)
        assert point["train_tokens"] == point["step"] * 2 * 32  # tiny size: batch 2 x 32 tokens
    assert payload["variants"]["search"]["recovered"]["ppl"] != curve[-1]["ppl"]  # step 5 trained further


@pytest.mark.slow
def test_eval_steps_outside_the_run_are_refused(tiny_root):
    result = run_bench(tiny_root, "bad", "--steps", "5", "--eval-at", "5")
    assert result.returncode == 2 and "--eval-at" in result.stderr and "[1, 4]" in result.stderr
    assert not (tiny_root / "bad.json").exists()


@pytest.mark.slow
def test_bad_sampling_options_are_refused(tiny_root):
    for extra, message in (
        (("--teacher-samples", "-1"), "--teacher-samples: must be >= 0"),
        (("--teacher-samples", "2", "--prompt", "32"), "--prompt: must be in [1, 31]"),
        (("--top-p", "0"), "--top-p: must be in (0, 1]"),
        (("--token-noise", "1"), "--token-noise: must be in [0, 1)"),
        (("--hidden-loss-weight", "-1"), "--hidden-loss-weight: must be >= 0"),
        (("--alpha", "1.5"), "--alpha: must be in [0, 1]"),
    ):
        result = run_bench(tiny_root, "bad_sampling", *extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tiny_root / "bad_sampling.json").exists()
