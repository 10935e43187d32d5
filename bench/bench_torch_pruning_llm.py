"""Torch-Pruning's documented LLM example applied to SmolLM2-135M, cut to about half its parameters, one-shot.

What runs is the recipe of Torch-Pruning's ``examples/LLMs/prune_llm.py``: ``tp.pruner.MetaPruner`` with
``GroupMagnitudeImportance(p=2, group_reduction="mean")`` (the example's ``GroupNormImportance``, renamed in
Torch-Pruning 1.5), one ``pruning_ratio`` for the hidden size, the heads
(``num_heads`` of q_proj = ``num_attention_heads``, of k_proj / v_proj = ``num_key_value_heads``,
``prune_num_heads=True``, ``prune_head_dims=False`` so RoPE is untouched, ``head_pruning_ratio`` = the ratio) and the
FFN, ``round_to=4``, ``lm_head`` ignored, a one-sentence example input; then the example's attribute fixes
(``config.hidden_size = lm_head.in_features``, the attention modules' head counts, ``config.intermediate_size``;
transformers 5's attention has no ``num_key_value_heads``, so the KV head count is read from ``k_proj``).
The default ratio (1/3) is the one whose uniform shape lands near half of SmolLM2-135M's parameters.

Every stage is timed and a failure is recorded with its stage and exact error; when the documented recipe fails, a
second attempt keeps every head (``heads_kept``: no ``num_heads``, q / k / v ignored, so only the hidden size and the
FFN are pruned). The whole run is capped by ``--cap`` seconds (``SIGALRM``). Measured when the pruning finishes:
parameters and shapes, WikiText-2 test perplexity on the first ``eval_tokens`` tokens (``lm_common.perplexity``:
blocks of 128, no recovery training), and whether ``save_pretrained`` + plain ``AutoModelForCausalLM.from_pretrained``
gives the same logits. Next to it, the one-shot (before recovery) perplexity of hf_compress's width-only Minitron
student from ``bench/results/minitron.json`` (same teacher, evaluation text, tokens and block size) when that file
exists.

Usage (from the repository root): ``OMP_NUM_THREADS=1 python bench/bench_torch_pruning_llm.py --threads 1``
(``python bench/bench_torch_pruning.py --llm`` forwards here); ``--size tiny`` is a smoke test (the tests pass
``--model`` a tiny saved Llama). Results go to ``bench/results/torch_pruning_llm.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import signal
import tempfile
import time
import traceback
from pathlib import Path

import torch
from common import RESULTS_DIR, machine_info, setup_threads, write_json
from lm_common import PPL_METHOD, TEXTS, blocks, perplexity, token_stream
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import logging as hf_logging

from hf_compress.models.builtin import resolve_model_path
from hf_compress.pruning.surgery import layer_structure
from hf_compress.reporting.measure import format_table

try:
    import torch_pruning as tp
except ImportError:  # the benchmark's only extra dependency
    tp = None

SIZES = {"tiny": dict(seq=32, eval_tokens=512), "full": dict(seq=128, eval_tokens=8192)}
EXAMPLE_TEXT = "Hello world."  # the example input of Torch-Pruning's prune_llm.py


class Cap(Exception):
    """The wall-clock cap ran out."""


def _on_alarm(signum, frame):
    raise Cap("wall-clock cap reached")


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape(model) -> dict:
    config, layers = model.config, layer_structure(model)
    return {
        "hidden_size": config.hidden_size,
        "config_heads": config.num_attention_heads,
        "config_kv_heads": config.num_key_value_heads,
        "config_ffn": config.intermediate_size,
        "heads_per_layer": sorted({x["num_heads"] for x in layers}),
        "kv_heads_per_layer": sorted({x["num_kv_heads"] for x in layers}),
        "ffn_per_layer": sorted({x["ffn"] for x in layers}),
        "embedding_width": model.get_input_embeddings().weight.shape[1],
        "lm_head_in_features": model.lm_head.in_features,
        "lm_head_weight": list(model.lm_head.weight.shape),
        "tied": model.lm_head.weight is model.get_input_embeddings().weight,
    }


def prune_like_the_example(model, tokenizer, ratio: float, keep_heads: bool = False) -> dict:
    """Torch-Pruning's ``examples/LLMs/prune_llm.py`` on ``model`` in place; returns what it found.

    With ``keep_heads`` (not in the example): no ``num_heads`` and q / k / v ignored as well, so only the hidden size
    and the FFN are pruned and every head stays.
    """
    inputs = torch.tensor(tokenizer.encode(EXAMPLE_TEXT)).unsqueeze(0)
    num_heads, out_channel_groups, separate_qkv = {}, {}, False
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            if hasattr(m, "q_proj"):
                separate_qkv = True
                num_heads[m.q_proj] = model.config.num_attention_heads
                num_heads[m.k_proj] = model.config.num_key_value_heads
                num_heads[m.v_proj] = model.config.num_key_value_heads
            elif hasattr(m, "qkv_proj"):
                num_heads[m.qkv_proj] = model.config.num_attention_heads
        if name.endswith("mlp") and hasattr(m, "gate_up_proj"):
            out_channel_groups[m.gate_up_proj] = 2
    is_gqa = model.config.num_attention_heads != model.config.num_key_value_heads
    qkv = list(num_heads)  # q / k / v (or fused qkv) projections
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        pruning_ratio=ratio,
        ignored_layers=[model.lm_head, *(qkv if keep_heads else [])],
        num_heads={} if keep_heads else num_heads,
        prune_num_heads=not keep_heads,
        prune_head_dims=False,
        head_pruning_ratio=0.0 if keep_heads else ratio,
        out_channel_groups=out_channel_groups,
        round_to=4,
    )
    groups = 0
    for group in pruner.step(interactive=True):
        group.prune()
        groups += 1
    # The example's attribute fixes, as written there.
    model.config.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            m.hidden_size = m.q_proj.out_features if separate_qkv else m.qkv_proj.out_features // 3
            m.num_heads = m.hidden_size // m.head_dim
            model.config.num_attention_heads = m.num_heads
            if not is_gqa:
                m.num_key_value_heads = m.num_heads
            # transformers 5's attention keeps no `num_key_value_heads` (the example reads it): k_proj's rows tell
            kv_heads = getattr(m, "num_key_value_heads", None) or m.k_proj.out_features // m.head_dim
            m.num_key_value_groups = m.num_heads // kv_heads
        elif name.endswith("mlp"):
            if hasattr(m, "gate_proj"):
                m.hidden_size = m.gate_proj.in_features
                model.config.intermediate_size = m.gate_proj.out_features
            elif hasattr(m, "gate_up_proj"):
                m.hidden_size = m.gate_up_proj.in_features
                model.config.intermediate_size = m.gate_up_proj.out_features // 2
    if not is_gqa:
        model.config.num_key_value_heads = model.config.num_attention_heads
    return {"groups_pruned": groups, "gqa": is_gqa}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(input_ids=ids, use_cache=False).logits


def reload_plainly(model, ids: torch.Tensor, folder: Path) -> dict:
    """``save_pretrained`` then plain ``AutoModelForCausalLM.from_pretrained``: the error verbatim, or the logits."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")
    out = {"saved_config": {k: config.get(k) for k in keys}}
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - what transformers raises is the result being reported
        out.update(ok=False, error=f"{type(error).__name__}: {str(error).strip()[:600]}")
        return out
    diff = (_logits(model, ids) - _logits(reloaded, ids)).abs().max()
    out.update(ok=True, identical=bool(diff == 0), max_abs_diff=float(diff))
    return out


def _width_reference(path: Path) -> dict | None:
    """hf_compress's width-only Minitron student before recovery, from ``bench_minitron.py``'s results."""
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    width = payload.get("variants", {}).get("width")
    if width is None:
        return None
    return {
        "source": str(path.name),
        "shape": width["shape"],
        "params": width["params"],
        "ppl_pruned": width["pruned"]["ppl"],
        "tokens_scored": width["pruned"]["tokens_scored"],
        "teacher_ppl": payload["teacher"]["ppl"],
    }


ATTEMPTS = {  # name -> keep_heads; the second runs only when the documented recipe fails
    "documented": False,
    "heads_kept": True,
}


class Stages:
    """Timed stages of one attempt; the name of the running one is kept for the failure record."""

    def __init__(self, start: float, prefix: str):
        self.start, self.prefix, self.times, self.current = start, prefix, {}, None

    def __call__(self, name: str) -> None:
        if self.current is not None:
            self.times[self.current]["seconds"] = max(
                0.0, round(self._now() - self.times[self.current]["started_s"], 1)
            )
        self.current = name
        if name is not None:
            self.times[name] = {"started_s": round(self._now(), 1)}
            print(f"[{self._now():7.1f}s] {self.prefix}{name} ...", flush=True)

    def _now(self) -> float:
        return time.perf_counter() - self.start


def attempt(teacher, tokenizer, rows: torch.Tensor, ratio: float, keep_heads: bool, stage: Stages, out: dict) -> None:
    """Prune a copy of ``teacher``, then forward, perplexity and plain save / reload, filling ``out`` as it goes."""
    stage("torch_pruning")
    model = copy.deepcopy(teacher)
    model.config.use_cache = False
    out["torch_pruning"] = prune_like_the_example(model, tokenizer, ratio, keep_heads)
    params = _params(model)
    out["result"] = {"params": params, "fraction_of_teacher": params / _params(teacher), "shape": _shape(model)}
    print(f"pruned: {params:,} params ({params / _params(teacher):.1%}) {out['result']['shape']}", flush=True)
    stage("forward")
    ids = rows[:2]
    out["result"]["forward_ok"] = bool(torch.isfinite(_logits(model, ids)).all())
    stage("perplexity")
    out["result"]["ppl"] = perplexity(model, rows)
    stage("save_reload")
    with tempfile.TemporaryDirectory() as tmp:
        out["result"]["reload"] = reload_plainly(model, ids, Path(tmp) / "tp")
    stage(None)


def run(args, payload: dict, start: float) -> None:
    """Load, then the attempts in order; every failure is recorded with its stage and exact error."""
    size = SIZES[args.size]
    stage = Stages(start, "")
    stage("load")
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = blocks(token_stream(tokenizer, TEXTS["wikitext2_test"], size["eval_tokens"]), size["seq"])
    payload["teacher"] = {"params": _params(teacher), "shape": _shape(teacher)}
    if args.teacher_ppl:
        stage("teacher_ppl")
        payload["teacher"]["ppl"] = perplexity(teacher, rows)
    stage(None)
    payload["stages"] = stage.times
    for name, keep_heads in ATTEMPTS.items():
        stage = Stages(start, f"{name}: ")
        record = payload["attempts"][name] = {"keep_heads": keep_heads, "stages": stage.times}
        try:
            attempt(teacher, tokenizer, rows, args.ratio, keep_heads, stage, record)
            return
        except Cap:
            record["failure"] = {"stage": stage.current, "error": f"capped after {args.cap} s"}
            return
        except Exception as error:  # noqa: BLE001 - the failure and its stage are the result being reported
            record["failure"] = {
                "stage": stage.current,
                "error": f"{type(error).__name__}: {str(error).strip()[:1000]}",
                "traceback_tail": traceback.format_exc().strip().splitlines()[-6:],
            }
            print(f"{name} FAILED at {stage.current!r}: {record['failure']['error'][:300]}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full", help="Evaluation tokens (tiny = smoke).")
    parser.add_argument("--model", default="builtin:SmolLM2-135M", help="Builtin name or local folder.")
    parser.add_argument("--ratio", type=float, default=1 / 3, help="Torch-Pruning's pruning_ratio (width and heads).")
    parser.add_argument("--cap", type=int, default=600, help="Wall-clock cap of the whole run, in seconds.")
    parser.add_argument("--teacher-ppl", action="store_true", help="Also measure the teacher's perplexity.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "torch_pruning_llm.json", help="JSON path.")
    parser.add_argument(
        "--minitron", type=Path, default=RESULTS_DIR / "minitron.json", help="bench_minitron.py results to compare."
    )
    args = parser.parse_args(argv)
    if not 0 < args.ratio < 1:
        parser.error(f"`--ratio` must be in (0, 1), got {args.ratio}.")
    if args.cap < 1:
        parser.error(f"`--cap` must be a positive number of seconds, got {args.cap}.")
    if tp is None:
        parser.error("`torch_pruning` is not installed; run `pip install --no-deps torch-pruning`.")
    setup_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    payload = {
        "benchmark": "torch_pruning_llm",
        "size": args.size,
        "machine": machine_info(),
        "model": args.model,
        "ratio": args.ratio,
        "cap_seconds": args.cap,
        "torch_pruning_version": importlib.metadata.version("torch-pruning"),
        "recipe": "Torch-Pruning examples/LLMs/prune_llm.py: MetaPruner, GroupMagnitudeImportance, round_to 4",
        "ppl_method": PPL_METHOD + f"; block_size {SIZES[args.size]['seq']}, tokens {SIZES[args.size]['eval_tokens']}",
        "attempts": {},
    }
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.cap)
    try:
        run(args, payload, start)
    except Cap:  # while loading
        payload["failure"] = {"stage": "load", "error": f"capped after {args.cap} s"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    payload["total_seconds"] = time.perf_counter() - start
    payload["hf_compress_width_only"] = _width_reference(args.minitron) if args.size == "full" else None
    print_summary(payload)
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


def print_summary(payload: dict) -> None:
    rows = []
    for name, record in payload["attempts"].items():
        result = record.get("result", {})
        reload = result.get("reload", {})
        failure = record.get("failure")
        rows.append(
            {
                "model": f"torch_pruning {name} (ratio {payload['ratio']:.3f})",
                "params": result.get("params", "-"),
                "hidden": result["shape"]["hidden_size"] if result else "-",
                "heads": result["shape"]["heads_per_layer"] if result else "-",
                "ffn": result["shape"]["ffn_per_layer"] if result else "-",
                "ppl one-shot": round(result["ppl"]["ppl"], 2) if "ppl" in result else "-",
                "plain reload": (
                    f"FAILED at {failure['stage']}: {failure['error']}"
                    if failure
                    else "identical"
                    if reload.get("identical")
                    else reload.get("error", "differs")
                )[:80],
            }
        )
    width = payload.get("hf_compress_width_only")
    if width is not None:
        rows.append(
            {
                "model": f"hf_compress width-only ({width['source']})",
                "params": width["params"],
                "hidden": width["shape"]["hidden"],
                "heads": width["shape"]["heads"],
                "ffn": width["shape"]["ffn"],
                "ppl one-shot": round(width["ppl_pruned"], 2),
                "plain reload": "identical (tests/pruning/test_hidden.py)",
            }
        )
    if rows:
        print(f"\nOne-shot width pruning of {payload['model']} (no recovery)\n" + format_table(rows))


if __name__ == "__main__":
    main()
