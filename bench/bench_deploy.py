"""Where compressed models run: PyTorch vs ONNX Runtime (fp32 and dynamic int8), teacher vs our compressed stages.

From the folders of one finished recipe run (``--run outputs/quickstart``), side by side in one run, on the SST-2
GLUE dev set, at the same thread count:

* ``teacher``: the unchanged fine-tuned teacher in PyTorch fp32 (the reference of every ratio);
* ``teacher-onnx`` / ``teacher-onnx-int8``: that teacher exported with ``hf_compress.export.export_onnx`` and run by
  ONNX Runtime in fp32 and ``quantize_dynamic`` int8 (default scales): what a user would pick instead of
  compressing; with ``--per-channel`` also ``teacher-onnx-int8-per-channel``, the teacher with our graphs' scales;
* ``<float>`` and ``<final>``: our float stage the int8 stage came from (``pruned`` in the quick start) and the final
  int8 stage, in PyTorch (``hf_compress.from_pretrained``);
* ``<float>-onnx`` / ``<float>-onnx-int8``: our float stage exported and run by ONNX Runtime;
  ``<float>-onnx-int8-emb4``: the same int8 graph with our 4-bit word-embedding table (``embedding_bits=4``).

Columns: accuracy, retention, weight bytes (``*.safetensors`` of a PyTorch folder, the ``.onnx`` file of a graph),
median latency at batch 1 and 32 (the first 32 dev sentences padded to 64 tokens), and ratios vs the PyTorch teacher
and vs the ONNX Runtime int8 teacher. ``--timing workers`` (default) times every row in its own process, as a
deployment runs one model (ONNX Runtime with its default threading), the rows taking turns over several rounds
(``common.time_ms_in_workers``); ``--timing loop`` times all rows interleaved in this one process (ONNX Runtime's
idle threads sleeping so that they do not slow the PyTorch rows): there every call starts with caches that the
other rows filled and threads that sleep, which costs the small graphs most — a 5 MB graph run call after call
stays in cache, a 23 MB one does not. ``--node`` also classifies
the two README sentences with transformers.js (``tests/export/js``) from the exported folders and checks the labels
against PyTorch.

Usage (from the repository root): ``python bench/bench_deploy.py --run outputs/quickstart --threads 2`` (a few
minutes); ``--size tiny`` builds tiny random folders itself (teacher, vocabulary + per-layer pruned, int8) and runs in
seconds (CI smoke test). Results go to ``bench/results/deploy.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from common import RESULTS_DIR, machine_info, setup_threads, time_ms, time_ms_in_workers, write_json
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from transformers import logging as hf_logging

from hf_compress.export import evaluate_onnx, export_onnx, float_source, onnx_session, run_onnx
from hf_compress.export.runtime import pad_batch
from hf_compress.loading import from_pretrained, save_pretrained
from hf_compress.models.builtin import resolve_model_path
from hf_compress.pruning.surgery import prune_ffn_neurons, prune_heads
from hf_compress.quantization.quantize import quantize_int8
from hf_compress.recipes.data import load_raw_split
from hf_compress.reporting.measure import folder_size_bytes, format_table
from hf_compress.vocabulary.prune import prune_vocabulary

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2" / "test.tsv"
JS = REPO / "tests" / "export" / "js"
SEQ = 64
SENTENCES = ("This new framework is fantastic!", "The plot was dull and the acting was even worse.")
# eval sentences (None = all 872) and timed repeats at batch 1 / batch 32
# (per worker turn with `--timing workers`, over `rounds` turns; all of them interleaved with `--timing loop`)
SIZES = {
    "tiny": dict(eval_rows=64, repeats=(3, 2), rounds=1),
    "full": dict(eval_rows=None, repeats=(30, 8), rounds=5),
}
TIMINGS = ("workers", "loop")
MODEL_STAGES = ("finetune_teacher", "prune_vocabulary", "distill", "prune", "quantize")


def run_stages(run: Path) -> dict[str, Path]:
    """The ``teacher``, ``float`` and ``final`` stage folders of a finished run, read from its ``recipe.yaml``."""
    recipe = run / "recipe.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"`--run` must be a recipe run folder with a recipe.yaml, got {str(run)!r}.")
    stages = [s for s in yaml.safe_load(recipe.read_text())["stages"] if s.get("type") in MODEL_STAGES]
    teacher = next((s["name"] for s in stages if s["type"] == "finetune_teacher"), None)
    if teacher is None or not stages:
        raise ValueError(f"`--run` {str(run)!r} has no finetune_teacher stage to compare against.")
    final = run / stages[-1]["name"]
    source = float_source(final) if stages[-1]["type"] == "quantize" else str(final)
    missing = [str(p) for p in (run / teacher, final, Path(source)) if not (p / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"`--run` {str(run)!r} is not finished: no model in {missing}; run the recipe first.")
    return {"teacher": run / teacher, "float": Path(source), "final": final}


def build_tiny_run(run: Path) -> None:
    """A tiny random BERT 'run' with the packaged MiniLM tokenizer: teacher, vocabulary + per-layer pruned, int8."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:all-MiniLM-L6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, num_labels=2,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    save_pretrained(model, run / "teacher")
    tokenizer.save_pretrained(run / "teacher")
    texts = list(load_raw_split(SST2)["sentence"][:200])
    model, tokenizer, _ = prune_vocabulary(model, tokenizer, texts + list(SENTENCES))
    prune_heads(model, {0: [0, 1], 1: [3]})
    prune_ffn_neurons(model, {0: list(range(64)), 1: list(range(32))})
    save_pretrained(model, run / "pruned")
    tokenizer.save_pretrained(run / "pruned")
    quantize_int8(model).save_pretrained(run / "int8")
    tokenizer.save_pretrained(run / "int8")
    stages = [("teacher", "finetune_teacher"), ("pruned", "prune"), ("int8", "quantize"), ("card", "card")]
    (run / "recipe.yaml").write_text(yaml.safe_dump({"stages": [{"name": n, "type": t} for n, t in stages]}))


def tokenized_rows(tokenizer, eval_rows: int | None) -> list[dict]:
    """The GLUE dev sentences tokenised to at most ``SEQ`` tokens, with their ``labels``."""
    split = load_raw_split(SST2)
    if eval_rows is not None:
        split = split.select(range(min(eval_rows, len(split))))
    encoded = tokenizer(list(split["sentence"]), truncation=True, max_length=SEQ)
    return [{**{k: encoded[k][i] for k in encoded}, "labels": int(y)} for i, y in enumerate(split["label"])]


def latency_inputs(tokenizer) -> dict[str, torch.Tensor]:
    """The first 32 dev sentences padded / truncated to exactly ``SEQ`` tokens (as ``bench_sst2.py`` times)."""
    sentences = list(load_raw_split(SST2)["sentence"][:32])
    return dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt"))


@torch.inference_mode()
def torch_accuracy(model, rows: list[dict], pad_token_id: int, batch_size: int = 32) -> float:
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: torch.from_numpy(v) for k, v in pad_batch(chunk, pad_token_id).items()}
        labels = torch.tensor([r["labels"] for r in chunk])
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


def weight_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else folder_size_bytes(path, weights_only=True)


def node_labels(folder: Path, dtype: str) -> list[str] | None:
    """transformers.js labels of ``SENTENCES`` from an exported folder; ``None`` when Node or the package is absent."""
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        return None
    command = [node, str(JS / "classify.mjs"), str(folder), dtype, *SENTENCES]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"transformers.js failed on {str(folder)!r}: {result.stderr.strip()[-500:]}")
    return [p["label"] for p in json.loads(result.stdout.strip().splitlines()[-1])]


@torch.inference_mode()
def torch_labels(model, tokenizer) -> list[str]:
    """PyTorch's labels of ``SENTENCES`` (what transformers.js must reproduce)."""
    logits = model(**tokenizer(list(SENTENCES), padding=True, return_tensors="pt")).logits
    return [model.config.id2label[int(i)] for i in logits.argmax(-1)]


def measure(
    stages: dict[str, Path],
    workdir: Path,
    size: dict,
    threads: int,
    node: bool,
    per_channel: bool = False,
    timing: str = "workers",
) -> dict:
    """Export, evaluate and time every row; returns ``{"rows": ..., "exports": ..., "node": ...}``."""
    names = {"teacher": "teacher", "float": stages["float"].name, "final": stages["final"].name}
    keys = ["teacher", "float"] + (["final"] if stages["final"] != stages["float"] else [])
    rows, calls, specs, labels, exports = {}, {}, {}, {}, {}
    workdir.mkdir(parents=True, exist_ok=True)
    for key in keys:
        path, tokenizer = stages[key], AutoTokenizer.from_pretrained(stages[key])
        data, timed = tokenized_rows(tokenizer, size["eval_rows"]), latency_inputs(tokenizer)
        inputs_file = workdir / f"latency-inputs-{key}.npz"
        np.savez(inputs_file, **{k: v.numpy() for k, v in timed.items()})
        model = from_pretrained(path).eval()
        rows[names[key]] = {
            "runtime": "pytorch",
            "path": str(path),
            "accuracy": torch_accuracy(model, data, tokenizer.pad_token_id),
            "weight_bytes": weight_bytes(path),
        }
        calls[names[key]] = lambda batch, m=model, x=timed: m(**{k: v[:batch] for k, v in x.items()})
        specs[names[key]] = {"runtime": "pytorch", "path": str(path), "inputs": str(inputs_file)}
        if key == "final":
            continue  # our int8 modules have no ONNX form: the float stage's int8 graph is their ONNX counterpart
        print(f"exporting {path} ...", flush=True)
        # the teacher's reference int8 graph has ONNX Runtime's default scales (what a user would try first)
        exports[names[key]] = export = export_onnx(path, workdir / key, per_channel=per_channel and key != "teacher")
        graphs = [("onnx", export.model), ("onnx-int8", export.quantized)]
        if key == "teacher" and per_channel:  # ... and, beside it, the per-channel int8 graph of our rows
            teacher_pc = export_onnx(path, workdir / "teacher-per-channel", per_channel=True)
            graphs.append(("onnx-int8-per-channel", teacher_pc.quantized))
        if key == "float":  # the same graph with our 4-bit word-embedding table (recipes' `embedding_bits: 4`)
            exports[f"{names[key]}-emb4"] = emb4 = export_onnx(
                path, workdir / "float-emb4", embedding_bits=4, per_channel=per_channel
            )
            graphs.append(("onnx-int8-emb4", emb4.quantized))
        for suffix, graph in graphs:
            session = onnx_session(graph, num_threads=threads)
            rows[f"{names[key]}-{suffix}"] = {
                "runtime": "onnxruntime",
                "path": graph,
                "accuracy": evaluate_onnx(session, data, pad_token_id=tokenizer.pad_token_id)["accuracy"],
                "weight_bytes": weight_bytes(Path(graph)),
            }
            calls[f"{names[key]}-{suffix}"] = lambda batch, s=session, x=timed: run_onnx(
                s, {k: v[:batch] for k, v in x.items()}
            )
            specs[f"{names[key]}-{suffix}"] = {"runtime": "onnxruntime", "path": graph, "inputs": str(inputs_file)}
        if node:
            expected = torch_labels(model, tokenizer)
            js = {dtype: node_labels(workdir / key, dtype) for dtype in ("fp32", "q8")}
            if key == "float":
                js["q8_emb4"] = node_labels(workdir / "float-emb4", "q8")
            same = {f"{dtype}_same_labels": js[dtype] == expected for dtype in js if js[dtype] is not None}
            labels[names[key]] = {"sentences": list(SENTENCES), "pytorch": expected, **js, **same}
    print(f"timing ({timing}) ...", flush=True)
    if timing == "workers":
        batches = {f"b{batch}": (batch, repeats) for batch, repeats in zip((1, 32), size["repeats"])}
        for name, stats in time_ms_in_workers(specs, batches, threads, rounds=size["rounds"], workdir=workdir).items():
            rows[name]["latency_ms"] = stats
    else:
        for batch, repeats in zip((1, 32), size["repeats"]):
            fns = {name: functools.partial(call, batch) for name, call in calls.items()}
            for name, stats in time_ms(fns, repeats=repeats, warmup=1).items():
                rows[name].setdefault("latency_ms", {})[f"b{batch}"] = stats
    return {"rows": rows, "exports": {name: e.to_dict() for name, e in exports.items()}, "node": labels}


def add_ratios(rows: dict[str, dict]) -> None:
    """Size, speed and retention of every row vs the PyTorch teacher and vs the ONNX Runtime int8 teacher."""
    for reference, tag in (("teacher", "teacher"), ("teacher-onnx-int8", "onnx_int8_teacher")):
        ref = rows[reference]
        for row in rows.values():
            row[f"vs_{tag}"] = {
                "retention_pct": 100 * row["accuracy"] / ref["accuracy"] if ref["accuracy"] else None,
                "size_x": ref["weight_bytes"] / row["weight_bytes"],
                **{
                    f"speed_x_{b}": ref["latency_ms"][b]["median"] / row["latency_ms"][b]["median"]
                    for b in ("b1", "b32")
                },
            }


def print_table(rows: dict[str, dict]) -> None:
    table = []
    for name, row in rows.items():
        ratios, onnx = row["vs_teacher"], row["vs_onnx_int8_teacher"]
        table.append(
            {
                "model": name,
                "runtime": row["runtime"],
                "accuracy": f"{row['accuracy']:.4f}",
                "MB": f"{row['weight_bytes'] / 1e6:.2f}",
                "b1 ms": f"{row['latency_ms']['b1']['median']:.2f}",
                "b32 ms": f"{row['latency_ms']['b32']['median']:.1f}",
                "retained": f"{ratios['retention_pct']:.1f}%",
                "size x": f"{ratios['size_x']:.2f}",
                "speed x b1": f"{ratios['speed_x_b1']:.2f}",
                "speed x b32": f"{ratios['speed_x_b32']:.2f}",
                "vs ort-int8 teacher (size / b1 / b32)": (
                    f"{onnx['size_x']:.2f} / {onnx['speed_x_b1']:.2f} / {onnx['speed_x_b32']:.2f}"
                ),
            }
        )
    print(format_table(table, markdown=True))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="Output folder of a finished recipe run (e.g. outputs/quickstart).")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="tiny: build tiny folders, few repeats.")
    parser.add_argument("--threads", type=int, default=2, help="Intra-op threads of PyTorch and ONNX Runtime.")
    parser.add_argument("--node", action="store_true", help="Also classify the README sentences with transformers.js.")
    parser.add_argument(
        "--per-channel",
        action="store_true",
        help="Per-channel int8 weight scales in our int8 graphs; adds a per-channel teacher row beside the default.",
    )
    parser.add_argument(
        "--timing",
        choices=TIMINGS,
        default="workers",
        help="workers: every row in its own process, as deployed (default); loop: all rows interleaved in this one.",
    )
    parser.add_argument("--export-dir", type=Path, help="Keep the exported folders here (default: a temporary one).")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "deploy.json", help="JSON results file.")
    args = parser.parse_args(argv)
    if args.size != "tiny" and args.run is None:
        parser.error("`--run` is required unless `--size tiny` (which builds its own folders).")
    threads = setup_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    payload = {"benchmark": "deploy", "size": args.size, "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = Path(tmp) / "run"
            build_tiny_run(run)
        try:
            stages = run_stages(run)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
        workdir = args.export_dir or Path(tmp) / "exports"
        payload["stages"] = {key: str(path) for key, path in stages.items()}
        payload["per_channel"], payload["timing"] = args.per_channel, args.timing
        payload.update(measure(stages, workdir, SIZES[args.size], threads, args.node, args.per_channel, args.timing))
    add_ratios(payload["rows"])
    payload["machine"]["load_average_1m_end"] = machine_info()["load_average_1m"]
    print_table(payload["rows"])
    for name, labels in payload["node"].items():
        print(f"transformers.js {name}: {labels}")
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
