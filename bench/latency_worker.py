"""One timed model in its own process, as a deployment runs it: the worker of ``common.time_ms_in_workers``.

``python bench/latency_worker.py SPEC.json`` loads one model and its inputs:

* ``SPEC["runtime"]``: ``"pytorch"`` (``hf_compress.from_pretrained``) or ``"onnxruntime"`` (a session with ONNX
  Runtime's default threading: idle threads spin);
* ``SPEC["inputs"]``: an ``.npz`` of int64 arrays, one row per sentence;
* ``SPEC["batches"]``: ``{key: [batch, repeats]}``; ``SPEC["threads"]``: intra-op threads.

It runs every batch size once untimed and prints ``ready``. Then, for every line ``time`` read from stdin, it runs
each batch size ``repeats`` times and prints one JSON line ``{key: [milliseconds, ...]}``; it exits when stdin
closes. Nothing else runs in the process, so no other model's threads share its cores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load(spec: dict):
    """A ``run(batch)`` callable for the model of ``spec`` on the first ``batch`` rows of its inputs."""
    arrays = dict(np.load(spec["inputs"]))
    threads = spec["threads"]
    if spec["runtime"] == "onnxruntime":
        from hf_compress.export.runtime import onnx_session, run_onnx

        session = onnx_session(spec["path"], num_threads=threads, spinning=True)
        return lambda batch: run_onnx(session, {k: v[:batch] for k, v in arrays.items()})
    if spec["runtime"] == "pytorch":
        from hf_compress.loading import from_pretrained

        torch.set_num_threads(threads)
        model = from_pretrained(spec["path"]).eval()
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        return lambda batch: model(**{k: v[:batch] for k, v in tensors.items()})
    raise ValueError(f"`runtime` must be 'pytorch' or 'onnxruntime', got {spec['runtime']!r}.")


def main(spec_file: str) -> None:
    from transformers import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    spec = json.loads(Path(spec_file).read_text())
    with torch.inference_mode():
        run = load(spec)
        for batch, _ in spec["batches"].values():
            run(batch)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "time":
                raise ValueError(f"expected the command 'time', got {line.strip()!r}")
            times = {}
            for key, (batch, repeats) in spec["batches"].items():
                run(batch)  # one untimed call after the pause between turns
                values = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run(batch)
                    values.append((time.perf_counter() - start) * 1000)
                times[key] = values
            print(json.dumps(times), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
