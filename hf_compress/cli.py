"""``hf-compress``: run, dry-run, report, card, push and demo compression recipes from the command line.

    hf-compress run recipes/quickstart.yaml --output-dir outputs/qs --set stages.student.training.max_steps=50
    hf-compress check recipes/quickstart.yaml      # resolved config, pruned modules, expected sizes; writes nothing
    hf-compress report outputs/qs                  # table of every stage's report.json
    hf-compress card outputs/qs                    # (re)write the final model's README.md
    hf-compress push outputs/qs my-user/minilm-sst2-int8 --private
    hf-compress export outputs/qs                  # onnx/model.onnx + model_quantized.onnx (transformers.js layout)
    hf-compress demo [--quick]                     # the packaged quick-start recipe into ./outputs/quickstart

User errors (bad recipe, missing file, invalid value) print one ``error: ...`` line on stderr and exit with status 2,
without a traceback (``--debug`` shows it). Under ``accelerate launch -m hf_compress.cli run recipe.yaml`` every
process validates and trains; only the main process (accelerate's ``PartialState``) writes stage folders and
reports (see ``hf_compress.recipes.pipeline``) and prints tables; the process group is destroyed before exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState
from transformers import AutoTokenizer, pipeline

from hf_compress.distributed import shutdown_distributed
from hf_compress.export import export_onnx, float_source
from hf_compress.loading import from_pretrained
from hf_compress.quantization.quantize import is_quantized
from hf_compress.recipes.lock import check_output_dir
from hf_compress.recipes.outputs import (
    evaluation_results,
    exported_onnx,
    final_model_folder,
    report_rows,
    stage_reports,
)
from hf_compress.recipes.pipeline import run_recipe
from hf_compress.recipes.plan import plan_recipe
from hf_compress.recipes.schema import MODEL_STAGES, RecipeError, dump_resolved
from hf_compress.recipes.stages.card import card_metadata
from hf_compress.recipes.validate import load_recipe
from hf_compress.reporting.cards import write_card
from hf_compress.reporting.hub import ONNX_DIR, push_folder
from hf_compress.reporting.measure import format_table, human_bytes
from hf_compress.shipped import shipped_path

# `demo --quick`: the quick-start stages on a small slice of SST-2 (a couple of minutes on 2 CPU cores)
QUICK_OVERRIDES = (
    "data.max_train_samples=2000",
    "data.max_eval_samples=200",
    "stages.teacher.training.max_steps=40",
    "stages.student.training.max_steps=40",
    "stages.pruned.training.max_steps=40",
    "stages.pruned.pruning.end_step=20",
)


def is_main_process() -> bool:
    """Whether this process prints: accelerate's main process once its state exists, else ``RANK`` 0."""
    if PartialState._shared_state:
        return PartialState().is_main_process
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str = "") -> None:
    if is_main_process():
        print(text, flush=True)


@contextlib.contextmanager
def _stage_logging():
    """Show the pipeline's INFO messages (stage started / reused, evaluation table) on stderr, main process only."""
    logger = logging.getLogger("hf_compress")
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    handler.setFormatter(logging.Formatter("[hf-compress] %(message)s"))
    if is_main_process():
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def packaged_recipe(name: str) -> Path:
    """The shipped recipe ``recipes/<name>.yaml`` (in the wheel, or in the source checkout)."""
    return shipped_path("recipes", f"{name}.yaml")


# --------------------------------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    out = check_output_dir(args.output_dir or Path("outputs") / recipe.name)  # a file: one sentence, not Errno 17
    _say(f"Running recipe {recipe.name!r} ({len(recipe.stages)} stages) into {out}")
    with _stage_logging():
        reports = run_recipe(recipe, out, force=args.force)
    if is_main_process():
        done = [
            {
                "stage": r.get("name"),
                "type": r.get("type"),
                "status": "reused" if r.get("skipped") else r.get("status", "?"),
                "elapsed": f"{r.get('elapsed_s', 0):.0f} s",
            }
            for r in reports
        ]
        print("\n" + format_table(done))
        if any(r.get("type") in MODEL_STAGES for r in reports):
            print("\n" + format_table(report_rows(out)))
        print(f"\nOutputs: {out.resolve()}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    rows, matches = plan_recipe(recipe)

    print(dump_resolved(recipe))
    for line in matches:
        print(line)
    print("\nExpected shapes and sizes (meta-device models from the configs; nothing loaded or written):")
    print(format_table(rows))
    print(f"\nrecipe {recipe.name!r} is valid.")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(format_table(report_rows(args.dir), markdown=args.markdown))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    folder = final_model_folder(out)
    recipe_file = out / "recipe.yaml"
    spec = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    stages = stage_reports(out) if folder != out else []
    report = dict(stages).get(folder.name, {})
    evaluated, reference_name = evaluation_results(out, stages)
    measured = evaluated.get(folder.name) or {**report.get("model", {}), "metrics": report.get("metrics") or {}}
    reference = evaluated.get(reference_name) if reference_name != folder.name else None
    write_card(
        folder,
        model_name=f"{spec['name']}-{folder.name}" if spec.get("name") else folder.name,
        report=measured if "params" in measured else None,
        reference_report=reference,
        recipe=recipe_file.read_text() if recipe_file.is_file() else None,
        **card_metadata(spec),
    )
    print(f"Wrote {folder / 'README.md'}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    folder = final_model_folder(args.dir)
    token = args.token or None
    onnx = None if args.no_onnx else exported_onnx(args.dir, folder)
    own = onnx == folder / ONNX_DIR  # uploaded with the folder itself
    push_folder(folder, args.repo_id, private=args.private, token=token, onnx=True if own else onnx or False)
    with_onnx = f" with its ONNX export ({onnx})" if onnx is not None else ""
    print(
        f"Pushed {folder}{with_onnx} to https://huggingface.co/{args.repo_id}" + (" (private)" if args.private else "")
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    folder = final_model_folder(args.dir)
    if is_quantized(json.loads((folder / "config.json").read_text())):  # our int8 layers: export their float stage
        folder = Path(float_source(folder) or folder)
    result = export_onnx(
        folder, args.output, quantize=not args.no_quantize, opset=args.opset, embedding_bits=args.embedding_bits
    )
    print(
        format_table(
            [{"file": Path(result.model).name, "bytes": human_bytes(result.model_bytes)}]
            + (
                [{"file": Path(result.quantized).name, "bytes": human_bytes(result.quantized_bytes)}]
                if result.quantized
                else []
            )
        )
    )
    print(
        f"\nExported {folder} to {Path(result.output) / 'onnx'} (max |ONNX Runtime - PyTorch| "
        f"{result.max_abs_diff:.2e}); load it with optimum's ORTModel*, onnxruntime or transformers.js."
    )
    return 0


DEMO_SENTENCES = ("This new framework is fantastic!", "The plot was dull and the acting was even worse.")


def demo_predictions(out: Path, sentences: Sequence[str] = DEMO_SENTENCES) -> list[dict[str, Any]]:
    """Run ``pipeline("text-classification")`` with the final model of a finished run on ``sentences``."""
    folder = Path(json.loads((out / "card" / "report.json").read_text())["model_dir"])
    classify = pipeline(
        "text-classification", model=from_pretrained(folder), tokenizer=AutoTokenizer.from_pretrained(folder)
    )
    predictions = classify(list(sentences))
    print(f"\npipeline('text-classification', model=hf_compress.from_pretrained({str(folder)!r})):")
    for sentence, prediction in zip(sentences, predictions):
        print(f"  {prediction['label']:<10} {prediction['score']:.3f}  {sentence}")
    return predictions


def cmd_demo(args: argparse.Namespace) -> int:
    overrides = [*(QUICK_OVERRIDES if args.quick else ()), *args.set]
    run = argparse.Namespace(
        recipe=str(packaged_recipe("quickstart")),
        set=overrides,
        force=args.force,
        output_dir=args.output_dir or str(Path("outputs") / "quickstart"),
    )
    code = cmd_run(run)
    if code == 0 and is_main_process() and (Path(run.output_dir) / "card" / "report.json").is_file():
        demo_predictions(Path(run.output_dir))
    return code


# ----------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-compress",
        description="Pruning and knowledge distillation recipes for Hugging Face models (see recipes/*.yaml).",
    )
    parser.add_argument("--debug", action="store_true", help="Show the traceback of errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY.PATH=VALUE",
            help="Override a recipe value (YAML), e.g. stages.student.training.max_steps=50; repeatable.",
        )

    p = sub.add_parser("run", help="Validate a recipe, run its stages and print the report table.")
    p.add_argument("recipe", help="Recipe YAML file.")
    p.add_argument("--output-dir", help="Output folder (default: outputs/<recipe name>).")
    p.add_argument("--force", action="store_true", help="Rerun stages already done with the same config.")
    overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="Dry run: resolved recipe, pruned modules, expected sizes; writes nothing.")
    p.add_argument("recipe", help="Recipe YAML file.")
    overrides(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("report", help="Table of every stage's report.json in an output folder.")
    p.add_argument("dir", help="Output folder of `hf-compress run`.")
    p.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("card", help="(Re)write the model card of the final model stage.")
    p.add_argument("dir", help="Output folder of `hf-compress run`.")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("push", help="Push the final model folder (or a model folder) to the Hugging Face Hub.")
    p.add_argument("dir", help="Output folder of `hf-compress run`, or one model folder.")
    p.add_argument("repo_id", help="Hub repository id, e.g. my-user/minilm-sst2-int8.")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login); never printed.")
    p.add_argument(
        "--no-onnx", action="store_true", help="Leave out the ONNX export (onnx/, or the run's export_onnx stage)."
    )
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("export", help="Export a model folder (or a run's final model) to ONNX + ONNX Runtime int8.")
    p.add_argument("dir", help="Output folder of `hf-compress run`, or one model folder.")
    p.add_argument("--output", default=None, help="Folder to write (default: the model folder itself).")
    p.add_argument("--no-quantize", action="store_true", help="Skip onnx/model_quantized.onnx.")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17).")
    p.add_argument("--embedding-bits", type=int, choices=(4, 8), default=8, help="Word table of model_quantized.onnx.")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="Run the packaged quick-start recipe into ./outputs/quickstart.")
    p.add_argument("--quick", action="store_true", help="Small slice and few steps: " + ", ".join(QUICK_OVERRIDES))
    p.add_argument("--output-dir", help="Output folder (default: outputs/quickstart).")
    p.add_argument("--force", action="store_true", help="Rerun stages already done with the same config.")
    overrides(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-compress`` console script; returns the exit status.

    Example:

    ```python
    >>> from hf_compress.cli import main
    >>> main(["check", "recipes/quickstart.yaml", "--set", "stages.student.student.num_layers=2"])  # doctest: +SKIP
    0

    ```
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except (RecipeError, ValueError, FileNotFoundError, ModuleNotFoundError, OSError) as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        for secret in (getattr(args, "token", None), os.environ.get("HF_TOKEN")):  # never print a token
            message = message.replace(secret, "***") if secret else message
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(err, (ValueError, FileNotFoundError, ModuleNotFoundError)) else 1
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept and a rerun resumes after them.", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()  # under accelerate launch: free the stages' DDP wrappers, end the process group


if __name__ == "__main__":
    sys.exit(main())
