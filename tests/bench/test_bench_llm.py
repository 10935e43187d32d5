"""``bench/bench_llm.py --size tiny`` runs end to end on a tiny saved Llama + word-level tokenizer (no SmolLM2).

Checks the JSON layout and values that follow from the setup (layer counts, token counts, step counts, finite
perplexities, identical first-step losses of the two trainers), never timings.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]
STEPS, SKIP, SEQ, BATCH, EVAL_TOKENS = 8, 2, 32, 2, 512  # bench_llm's tiny size
LAYERS = 6


def word_tokenizer(size: int = 400) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the most common words of the bench's texts ([UNK] for the rest)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    counts: collections.Counter = collections.Counter()
    for path in ("data/tinyshakespeare/train.txt", "data/wikitext2_valid_test/wiki.valid.tokens"):
        counts.update(re.findall(r"\w+|[^\w\s]", (REPO / path).read_text(encoding="utf-8")[:200_000]))
    words = ["[PAD]", "[UNK]"] + [w for w, _ in counts.most_common(size - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench_llm")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
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
    output = root / "llm.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(REPO / "bench" / "bench_llm.py"),
        "--size",
        "tiny",
        "--threads",
        "1",
        "--model",
        str(root / "tiny"),
        "--output",
        str(output),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WikiText-2 test perplexity" in result.stdout and f"wrote {output}" in result.stdout
    return json.loads(output.read_text())


@pytest.mark.slow
def test_llm_machine_and_settings(llm):
    assert llm["benchmark"] == "llm" and llm["size"] == "tiny"
    assert "--size tiny" in llm["machine"]["command"] and llm["machine"]["threads"] == 1
    assert "load_average_1m_end" in llm["machine"]
    assert llm["model"]["layers"] == LAYERS and llm["model"]["tie_word_embeddings"] is True
    settings = llm["settings"]
    assert settings["steps"] == STEPS and settings["batch"] == f"{BATCH}x{SEQ}"
    assert settings["train_tokens"] == STEPS * BATCH * SEQ


@pytest.mark.slow
def test_llm_pruning_block(llm):
    pruning = llm["pruning"]
    assert pruning["layers_before"] == LAYERS and pruning["layers_after"] == LAYERS - LAYERS // 3
    assert len(pruning["dropped_layers"]) == LAYERS // 3 == len(set(pruning["dropped_layers"]))
    scores = pruning["scores"]
    assert len(scores) == LAYERS and all(s >= 0 for s in scores)
    kept = [s for i, s in enumerate(scores) if i not in pruning["dropped_layers"]]
    assert max(scores[i] for i in pruning["dropped_layers"]) <= min(kept)  # the least influential blocks go
    assert pruning["params_after"] < pruning["params_before"] == llm["model"]["params"]


@pytest.mark.slow
def test_llm_perplexity_block(llm):
    ppl = llm["perplexity"]
    assert ppl["tokens"] == EVAL_TOKENS and ppl["block_size"] == SEQ
    expected_scored = EVAL_TOKENS // SEQ * (SEQ - 1)
    for result in (ppl["teacher"], ppl["pruned"], *ppl["recovered"].values()):
        assert math.isfinite(result["ppl"]) and result["ppl"] > 1
        assert math.isclose(result["ppl"], math.exp(result["nll"]))
        assert result["tokens_scored"] == expected_scored
    assert "hf_compress" in ppl["recovered"]


@pytest.mark.slow
def test_llm_recovery_block(llm):
    ours = llm["recovery"]["hf_compress"]
    assert ours["ran"] and ours["step_s"]["n"] == ours["step_cpu_s"]["n"] == STEPS - 1 - SKIP
    assert len(ours["losses"]) == STEPS and all(math.isfinite(x) and x >= 0 for x in ours["losses"])
    assert llm["recovery"]["trl_distillation"]["ran"] is False and llm["recovery"]["trl_distillation"]["skipped"]
    comparison = llm["comparison"]
    trl = llm["recovery"]["trl_gkd"]
    if importlib.util.find_spec("trl") is None:  # trl is optional: the bench must say why it did not run
        assert trl["ran"] is False and "trl" in trl["error"] and comparison["trl"].startswith("not run")
        return
    assert trl["ran"], trl.get("error")
    assert trl["step_s"]["n"] == trl["step_cpu_s"]["n"] == STEPS - 1 - SKIP and len(trl["losses"]) == STEPS
    # Same student weights, batch and per-token forward KL: the first step's loss agrees across the trainers.
    assert comparison["first_loss_rel_diff"] < 1e-3
    assert math.isclose(
        comparison["step_time_ratio_hf_compress_over_trl"], ours["step_s"]["median"] / trl["step_s"]["median"]
    )
    # ... and so do the whole loss trajectory and the recovered perplexity (same optimizer, schedule and data order).
    assert trl["losses"] == pytest.approx(ours["losses"], rel=1e-3)
    assert math.isclose(comparison["trl_ppl"], comparison["hf_compress_ppl"], rel_tol=1e-3)
