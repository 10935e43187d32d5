"""transformers.js under Node loads an exported folder offline and classifies like PyTorch (fp32 and q8 graphs).

Needs Node >= 18 and the pinned package of tests/export/js: ``npm install --prefix tests/export/js`` (the Makefile
set-up); skipped with that reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from hf_compress.export import export_onnx, onnx_session, run_onnx
from hf_compress.loading import from_pretrained
from hf_compress.pruning.surgery import prune_heads
from tests.export.conftest import SENTENCES, save_folder, tiny_classifier, wordpiece_tokenizer

pytest.importorskip("onnxruntime", reason='needs the ONNX extra: pip install "hf-compress[onnx]"')

JS = Path(__file__).resolve().parent / "js"
NODE = shutil.which("node")
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="Node is not installed (transformers.js check needs Node >= 18)"),
    pytest.mark.skipif(
        not (JS / "node_modules" / "@huggingface" / "transformers").is_dir(),
        reason="transformers.js is not installed: run `npm install --prefix tests/export/js`",
    ),
]


def classify_with_node(folder: Path, dtype: str) -> list[dict]:
    result = subprocess.run(
        [NODE, str(JS / "classify.mjs"), str(folder), dtype, *SENTENCES], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A per-layer pruned tiny BERT taught the two README sentences' labels, exported to ONNX."""
    tokenizer = wordpiece_tokenizer()
    model = tiny_classifier()
    prune_heads(model, {0: [1], 2: [0, 3]})
    batch = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0])  # positive, negative
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(15):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    folder = save_folder(model.eval(), tokenizer, tmp_path_factory.mktemp("js") / "tiny-bert-sst2")
    export_onnx(folder)
    return folder


def test_transformersjs_classifies_like_pytorch(exported):
    classify = pipeline("text-classification", model=from_pretrained(exported), tokenizer=str(exported))
    expected = classify(list(SENTENCES))
    assert [p["label"] for p in expected] == ["positive", "negative"]

    fp32 = classify_with_node(exported, "fp32")
    assert [p["label"] for p in fp32] == [p["label"] for p in expected]
    assert [p["score"] for p in fp32] == pytest.approx([p["score"] for p in expected], abs=1e-4)

    q8 = classify_with_node(exported, "q8")  # onnx/model_quantized.onnx
    assert [p["label"] for p in q8] == [p["label"] for p in expected]


def test_transformersjs_runs_the_4_bit_embedding_graph(exported, tmp_path):
    """`embedding_bits=4` uses standard operators only: transformers.js' q8 path runs it like ONNX Runtime."""
    result = export_onnx(exported, tmp_path / "q4", embedding_bits=4, embedding_group_size=32)
    session = onnx_session(result.quantized)
    tokenizer = wordpiece_tokenizer()
    logits = run_onnx(session, dict(tokenizer(list(SENTENCES), padding=True, return_tensors="pt")))
    probabilities = torch.softmax(torch.from_numpy(logits), -1).max(-1).values.tolist()

    q8 = classify_with_node(tmp_path / "q4", "q8")

    assert [p["label"] for p in q8] == ["positive", "negative"]
    assert [p["score"] for p in q8] == pytest.approx(probabilities, abs=1e-4)


def test_remote_models_are_off(tmp_path):
    result = subprocess.run(
        [NODE, str(JS / "classify.mjs"), str(tmp_path / "not-there"), "fp32", "hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "not-there" in result.stderr  # a local-file error, never a download attempt
