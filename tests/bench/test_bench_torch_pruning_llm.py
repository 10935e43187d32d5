"""``bench/bench_torch_pruning_llm.py --size tiny`` runs end to end on a tiny saved Llama + word-level tokenizer.

Checks the JSON layout and what follows from the setup (every attempt ends with a result or a failure naming its
stage; a model that was pruned is smaller and scored), never Torch-Pruning's perplexity.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.bench.test_bench_llm import REPO, word_tokenizer

STAGES = {"torch_pruning", "forward", "perplexity", "save_reload"}


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    if importlib.util.find_spec("torch_pruning") is None:
        pytest.skip("torch_pruning is not installed (the benchmark's only extra dependency)")
    root = tmp_path_factory.mktemp("bench_tp_llm")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    output = root / "tp_llm.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, str(REPO / "bench" / "bench_torch_pruning_llm.py"), "--size", "tiny", "--threads", "1"]
    command += ["--model", str(root / "tiny"), "--output", str(output), "--cap", "300"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "One-shot width pruning" in run.stdout and f"wrote {output}" in run.stdout
    return json.loads(output.read_text())


def test_every_attempt_ends_with_a_result_or_a_named_failure(result):
    assert result["benchmark"] == "torch_pruning_llm" and result["torch_pruning_version"]
    assert math.isclose(result["ratio"], 1 / 3) and result["hf_compress_width_only"] is None  # tiny: no reference
    attempts = result["attempts"]
    assert list(attempts) in (["documented"], ["documented", "heads_kept"])  # the second only after a failure
    assert ("failure" in attempts["documented"]) == ("heads_kept" in attempts)
    for record in attempts.values():
        assert set(record["stages"]) <= STAGES and "torch_pruning" in record["stages"]
        if "failure" in record:
            assert record["failure"]["stage"] in STAGES and record["failure"]["error"]
        else:
            assert record["result"]["reload"]["ok"] in (True, False)


def test_a_pruned_model_is_smaller_and_scored(result):
    teacher = result["teacher"]["params"]
    pruned = [r["result"] for r in result["attempts"].values() if "result" in r]
    assert pruned, "no attempt got past Torch-Pruning's step"
    for entry in pruned:
        assert entry["params"] < teacher and entry["shape"]["hidden_size"] < 48
        if "ppl" in entry:
            assert math.isfinite(entry["ppl"]["ppl"]) and entry["ppl"]["tokens_scored"] > 0
