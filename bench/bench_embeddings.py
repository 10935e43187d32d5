"""Sentence embeddings: all-MiniLM-L6-v2 compressed (vocabulary + layers + heads/FFN + int8) vs the original, on MRPC.

Rows, all measured in one run from the packaged ``builtin:all-MiniLM-L6-v2`` (a sentence-transformers model):

* ``original``;
* ``vocab``: the original with its vocabulary cut to the ids of the MRPC train sentences (no training; test words
  outside it are re-split into kept WordPiece pieces);
* ``compressed``: ``make_sentence_student`` (``--layers`` of 6 blocks, evenly spaced) + the same vocabulary, then
  ``SentenceTransformerTrainer`` with ``EmbeddingDistillationLoss`` (cosine, teacher embeddings precomputed since the
  tokenizers differ) on the MRPC train sentences while ``PruningCallback`` removes ``--heads`` of the heads and
  ``--ffn`` of the FFN neurons of every layer (cubic schedule over the first half of the steps, then recovery);
* ``compressed-int8``: ``quantize_sentence_transformer`` of ``compressed`` (embeddings included), saved and reloaded
  with ``load_sentence_transformer``: the row measures the reloaded model.

Columns: MRPC test (1,725 pairs) cosine-similarity accuracy and average precision from sentence-transformers'
``BinaryClassificationEvaluator``, retention of both vs the original, parameters, bytes of the saved folder
(weights; whole folder in the JSON), and ``encode`` throughput in sentences/s (MRPC test sentences, batch 32, median
of the repeats, all models timed interleaved).

Usage (from the repository root): ``python bench/bench_embeddings.py --size full --threads 1`` (a few minutes on one
core); ``--size tiny`` is the smoke test (a few pairs, 4 training steps). Results go to
``bench/results/embeddings.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, machine_info, setup_threads, time_ms, write_json
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import logging as hf_logging

from hf_compress import PruningCallback, PruningConfig
from hf_compress.integrations.sentence_distillation import EmbeddingDistillationLoss, add_teacher_embeddings
from hf_compress.integrations.sentence_transformers import (
    evaluate_pairs,
    load_sentence_transformer,
    make_sentence_student,
    prune_sentence_vocabulary,
    quantize_sentence_transformer,
    read_mrpc,
    save_sentence_transformer,
)
from hf_compress.models.builtin import resolve_model_path
from hf_compress.models.families import ffn_size, get_layers, head_counts
from hf_compress.reporting.measure import count_parameters, folder_size_bytes, format_table
from hf_compress.vocabulary.prune import vocabulary_coverage

MODEL = "builtin:all-MiniLM-L6-v2"
# Per size: MRPC test pairs evaluated (None = all 1,725), MRPC train pairs whose sentences are the vocabulary corpus
# and the distillation texts (None = all 4,076 -> 8,152 sentences), training steps and batch, learning rate,
# sentences encoded per throughput run and timed repeats.
SIZES = {
    "tiny": dict(eval_pairs=16, train_pairs=32, steps=4, batch=8, lr=1e-4, throughput_sentences=32, repeats=1),
    "small": dict(eval_pairs=400, train_pairs=1000, steps=60, batch=32, lr=1e-4, throughput_sentences=256, repeats=2),
    "full": dict(eval_pairs=None, train_pairs=None, steps=500, batch=32, lr=1e-4, throughput_sentences=512, repeats=3),
}


def unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def structure(model) -> dict:
    layers = len(get_layers(model))
    return {
        "layers": layers,
        "heads_per_layer": [head_counts(model, i)[0] for i in range(layers)],
        "ffn_per_layer": [ffn_size(model, i) for i in range(layers)],
        "vocab": model[0].auto_model.get_input_embeddings().num_embeddings,
    }


def distill(student, teacher, texts: list[str], size: dict, args, workdir: Path) -> dict:
    """Distil ``teacher`` into ``student`` on ``texts`` while pruning heads / FFN neurons; returns what it did."""
    dataset = add_teacher_embeddings(Dataset.from_dict({"text": texts}), teacher, "text")
    loss = EmbeddingDistillationLoss(student, teacher, kind="cosine")
    config = PruningConfig(
        targets={"heads": args.heads, "ffn_neurons": args.ffn},
        schedule="cubic",
        end_step=max(1, size["steps"] // 2),
        frequency=max(1, size["steps"] // 20),
        scope="local",  # the same count in every layer
    )
    callback = PruningCallback(config)
    training = SentenceTransformerTrainingArguments(
        output_dir=str(workdir / "run"),
        max_steps=size["steps"],
        per_device_train_batch_size=size["batch"],
        learning_rate=size["lr"],
        warmup_steps=size["steps"] // 10,
        seed=0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(
        model=student, args=training, train_dataset=dataset, loss=loss, callbacks=[callback]
    )
    start = time.perf_counter()
    trainer.train()
    student.eval()
    removed = {k: sum(len(v) for v in callback.removed[k].values()) for k in ("heads", "ffn_neurons")}
    return {"train_s": time.perf_counter() - start, "steps": size["steps"], "removed": removed, "texts": len(texts)}


def measure(models: dict, pairs: tuple, folders: dict[str, Path], size: dict) -> dict[str, dict]:
    """MRPC metrics, parameters, bytes on disk and interleaved encode throughput of every model."""
    sentences = unique(pairs[0] + pairs[1])[: size["throughput_sentences"]]
    encoders = {name: functools.partial(m.encode, sentences, batch_size=32) for name, m in models.items()}
    timing = time_ms(encoders, repeats=size["repeats"], warmup=1)
    rows = {}
    for name, model in models.items():
        metrics = evaluate_pairs(model, *pairs)
        rows[name] = {
            "cosine_accuracy": metrics["cosine_accuracy"],
            "cosine_ap": metrics["cosine_ap"],
            "params": count_parameters(model)["total"],
            "weights_bytes": folder_size_bytes(folders[name], weights_only=True),
            "folder_bytes": folder_size_bytes(folders[name]),
            "encode_ms": timing[name],
            "sentences_per_s": len(sentences) / (timing[name]["median"] / 1000),
            "structure": structure(model),
        }
    reference = rows["original"]
    for row in rows.values():
        row["retention_ap_pct"] = 100 * row["cosine_ap"] / reference["cosine_ap"]
        row["retention_accuracy_pct"] = 100 * row["cosine_accuracy"] / reference["cosine_accuracy"]
        row["size_x"] = reference["weights_bytes"] / row["weights_bytes"]
        row["speed_x"] = row["sentences_per_s"] / reference["sentences_per_s"]
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = [
        {
            "model": name,
            "acc": f"{r['cosine_accuracy']:.4f}",
            "AP": f"{r['cosine_ap']:.4f}",
            "AP kept": f"{r['retention_ap_pct']:.1f}%",
            "acc kept": f"{r['retention_accuracy_pct']:.1f}%",
            "params": f"{r['params'] / 1e6:.2f}M",
            "weights": f"{r['weights_bytes'] / 2**20:.1f} MiB",
            "size x": f"{r['size_x']:.1f}",
            "sent/s": f"{r['sentences_per_s']:.0f}",
            "speed x": f"{r['speed_x']:.2f}",
        }
        for name, r in rows.items()
    ]
    return format_table(lines, markdown=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--layers", type=int, default=3, help="blocks the student keeps (of 6)")
    parser.add_argument("--heads", type=float, default=0.5, help="fraction of heads removed in every layer")
    parser.add_argument("--ffn", type=float, default=0.5, help="fraction of FFN neurons removed in every layer")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    size = SIZES[args.size]
    machine = machine_info()
    torch.manual_seed(0)

    pairs = read_mrpc("test", limit=size["eval_pairs"])
    train = read_mrpc("train", limit=size["train_pairs"])
    texts = unique(train[0] + train[1])
    original = SentenceTransformer(resolve_model_path(MODEL), device="cpu").eval()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folders = {name: workdir / name for name in ("original", "vocab", "compressed", "compressed-int8")}
        original.save(str(folders["original"]))

        vocab, report = prune_sentence_vocabulary(load_sentence_transformer(folders["original"], device="cpu"), texts)
        coverage = vocabulary_coverage(original.tokenizer, report.kept_ids, pairs[0] + pairs[1])
        save_sentence_transformer(vocab, folders["vocab"])

        student, _ = prune_sentence_vocabulary(make_sentence_student(original, num_layers=args.layers), texts)
        training = distill(student, original, texts, size, args, workdir)
        save_sentence_transformer(student, folders["compressed"])

        int8 = quantize_sentence_transformer(load_sentence_transformer(folders["compressed"], device="cpu"))
        save_sentence_transformer(int8, folders["compressed-int8"])
        models = {
            "original": original,
            "vocab": vocab,
            "compressed": student,
            "compressed-int8": load_sentence_transformer(folders["compressed-int8"], device="cpu"),
        }
        rows = measure(models, pairs, folders, size)

    machine["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": "embeddings",
        "size": args.size,
        "machine": machine,
        "config": {
            "model": MODEL,
            "eval_pairs": len(pairs[0]),
            "train_sentences": len(texts),
            "layers": args.layers,
            "heads": args.heads,
            "ffn_neurons": args.ffn,
            "loss": "cosine",
            **{k: size[k] for k in ("steps", "batch", "lr", "throughput_sentences", "repeats")},
        },
        "vocabulary": {
            "kept": report.kept_vocab_size,
            "original": report.original_vocab_size,
            "eval_token_oov_rate": coverage["token_oov_rate"],
            "eval_sentence_oov_rate": coverage["sentence_oov_rate"],
        },
        "training": training,
        "rows": rows,
    }
    print(table(rows))
    output = args.output or RESULTS_DIR / "embeddings.json"
    write_json(payload, output)
    print(f"wrote {output}")
    return payload


if __name__ == "__main__":
    main()
