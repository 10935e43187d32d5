"""``bench/bench_gemma3.py --size tiny`` runs end to end on a tiny saved ``gemma3_text`` (one KV head; no wheels).

Checks the JSON layout and the values that follow from the setup (pruned shapes, heads removed from within the single
KV group, token counts, a plain reload with identical logits, finite perplexities), never timings.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]
LAYERS, HEADS, FFN, SEQ, EVAL_TOKENS = 6, 4, 64, 32, 512  # the bench's tiny size drops 2 blocks, keeps 2 heads, 50%


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over frequent WikiText-2 words, with Gemma's special tokens (pad 0, eos 1, bos 2)."""
    words: dict[str, int] = {}
    for word in (REPO / "data/wikitext2_valid_test/wiki.valid.tokens").read_text(encoding="utf-8")[:50_000].split():
        words[word] = words.get(word, 0) + 1
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>"] + sorted(words, key=words.get, reverse=True)[:196]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench_gemma3")
    tokenizer = bos_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        sliding_window_pattern=3,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    Gemma3ForCausalLM(config).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    output = root / "gemma3.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO)  # this checkout's hf_compress, whichever one is installed
    command = [sys.executable, str(REPO / "bench" / "bench_gemma3.py"), "--size", "tiny", "--threads", "1"]
    command += ["--model", str(root / "tiny"), "--output", str(output)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WikiText-2 test perplexity" in result.stdout and f"wrote {output}" in result.stdout
    return json.loads(output.read_text())


@pytest.mark.slow
def test_gemma3_model_and_pruning(gemma):
    assert gemma["benchmark"] == "gemma3" and gemma["size"] == "tiny" and gemma["machine"]["threads"] == 1
    assert gemma["model"]["model_type"] == "gemma3_text" and gemma["model"]["kv_heads"] == 1
    pruning = gemma["pruning"]
    assert pruning["layers"] == [LAYERS, LAYERS - 2] and pruning["query_heads"] == [HEADS, 2]
    assert pruning["kv_heads"] == [1, 1] and pruning["ffn"] == [FFN, FFN // 2]  # the KV head stays
    assert all(len(v) == 2 and len(set(v)) == 2 for v in pruning["removed_heads"].values())
    scores = pruning["block_influence"]
    kept = [s for i, s in enumerate(scores) if i not in pruning["dropped_layers"]]
    assert max(scores[i] for i in pruning["dropped_layers"]) <= min(kept)  # the least influential blocks go
    assert len(pruning["layer_types_after"]) == LAYERS - 2


@pytest.mark.slow
def test_gemma3_rows_and_reload(gemma):
    rows = gemma["rows"]
    assert list(rows) == ["teacher", "pruned (no recovery)", "recovered (KD)"]
    assert rows["pruned (no recovery)"]["params"] == rows["recovered (KD)"]["params"] < rows["teacher"]["params"]
    assert rows["recovered (KD)"]["weights_bytes"] < rows["teacher"]["weights_bytes"]
    assert gemma["perplexity"]["tokens"] == EVAL_TOKENS
    for row in rows.values():
        ppl = row["perplexity"]
        assert math.isfinite(ppl["ppl"]) and ppl["ppl"] > 1 and math.isclose(ppl["ppl"], math.exp(ppl["nll"]))
        assert ppl["tokens_scored"] == EVAL_TOKENS // SEQ * (SEQ - 1)
        generated = row["generate"]
        assert len(generated["outputs"]) == 2 and 0 < generated["new_tokens"] <= 60 and generated["tokens_per_s"] > 0
    assert gemma["reload"]["max_abs_logit_diff"] <= 1e-5


@pytest.mark.slow
def test_gemma3_recovery(gemma):
    recovery = gemma["recovery"]
    assert recovery["steps_run"] == recovery["steps_planned"] == 2 and not recovery["stopped_by_time_budget"]
    assert len(recovery["losses"]) == 2 and all(math.isfinite(x) and x >= 0 for x in recovery["losses"])
    embedding = gemma["model"]["vocab_size"] * gemma["model"]["hidden_size"]
    assert recovery["trainable_params"] == gemma["rows"]["recovered (KD)"]["params"] - embedding  # embedding frozen
    assert gemma["settings"]["train_tokens"] == 2 * 2 * SEQ
