"""Export any float folder hf_compress produced to ONNX (+ an ONNX Runtime dynamic int8 copy), transformers.js layout.

``export_onnx(folder)`` loads the folder with :func:`hf_compress.loading.from_pretrained` (so per-layer pruned shapes
recorded in ``config.hf_compress`` are rebuilt exactly), traces it with the TorchScript exporter of
``torch.onnx.export(..., dynamo=False)`` (the dynamo exporter needs ``onnxscript`` and is not needed for these
graphs) and writes the layout that transformers.js and optimum read::

    FOLDER/config.json, tokenizer.json, tokenizer_config.json, ...
    FOLDER/onnx/model.onnx             # float32; inputs input_ids, attention_mask (+ token_type_ids), output logits
    FOLDER/onnx/model_quantized.onnx   # onnxruntime.quantization.quantize_dynamic, QInt8 weights
                                       # (embedding_bits=4: with our 4-bit word-embedding table, see embeddings.py)

Batch and sequence axes are dynamic. After export the float graph is run by ONNX Runtime on real tokenised sentences
of another shape than the traced one and compared with the PyTorch logits; the int8 graph's agreement is measured
and returned. Our own int8 folders (``hf_compress_quantization`` in config.json) hold custom modules that ONNX cannot
express, so they are refused: export the float stage they came from, whose ``model_quantized.onnx`` is the ONNX
Runtime counterpart. ``onnx`` and ``onnxruntime`` are optional dependencies (``pip install "hf-compress[onnx]"``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from transformers import AutoTokenizer

from hf_compress.export.embeddings import EMBEDDING_BITS, quantize_word_embeddings
from hf_compress.export.runtime import onnx_session, require, run_onnx
from hf_compress.loading import from_pretrained
from hf_compress.models.heads import detect_head
from hf_compress.quantization.layers import check_group_size
from hf_compress.quantization.quantize import QUANTIZATION_KEY, is_quantized

__all__ = ["CHECK_TEXTS", "OUTPUTS", "OnnxExport", "export_onnx", "float_source"]

logger = logging.getLogger(__name__)

# head (hf_compress.models.heads) -> the output the transformers.js pipelines read; `None`: a model without a head
OUTPUTS: dict[str | None, str] = {
    "seq_cls": "logits",
    "token_cls": "logits",
    "masked_lm": "logits",
    "causal_lm": "logits",
    None: "last_hidden_state",
}
TOKEN_LEVEL = ("token_cls", "masked_lm", "causal_lm", None)  # outputs with a sequence axis
CHECK_TEXTS = (
    "This new framework is fantastic!",
    "The plot was dull and the acting was even worse.",
    "A long, meandering, sometimes funny and often touching film that never quite decides what it wants to be.",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
MODEL_STAGE_TYPES = ("finetune_teacher", "prune_vocabulary", "distill", "prune")


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote and measured.

    Args:
        output (`str`): The model repository folder (config, tokenizer, `onnx/`).
        model (`str`): The float32 graph, `onnx/model.onnx`.
        quantized (`str`, *optional*): The dynamic int8 graph, `onnx/model_quantized.onnx`.
        inputs (`list[str]`): Graph inputs, e.g. `["input_ids", "attention_mask", "token_type_ids"]`.
        output_name (`str`): Graph output, `"logits"` (or `"last_hidden_state"` for a model without a head).
        opset (`int`): ONNX opset of the graphs.
        model_bytes (`int`): Size of `model.onnx`.
        quantized_bytes (`int`, *optional*): Size of `model_quantized.onnx`.
        max_abs_diff (`float`, *optional*): Largest |ONNX Runtime - PyTorch| of the float graph on the check texts.
        quantized_max_abs_diff (`float`, *optional*): The same for the int8 graph.
        quantized_argmax_agreement (`float`, *optional*): Fraction of check rows (tokens for token-level outputs)
            where the int8 graph's argmax equals PyTorch's.
    """

    output: str
    model: str
    quantized: str | None
    inputs: list[str]
    output_name: str
    opset: int
    model_bytes: int
    quantized_bytes: int | None = None
    max_abs_diff: float | None = None
    quantized_max_abs_diff: float | None = None
    quantized_argmax_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Logits(nn.Module):
    """Positional inputs in ``names`` order -> the one output tensor, so the traced graph has exactly those I/O."""

    def __init__(self, model: nn.Module, names: list[str], output_name: str):
        super().__init__()
        self.model, self.names, self.output_name = model, names, output_name
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs)), **self.extra, return_dict=True)
        return out[self.output_name]


def float_source(folder: str | os.PathLike) -> str | None:
    """The float stage an int8 stage folder of a recipe run was quantised from (``None`` outside a run folder).

    Reads the run's ``recipe.yaml`` next to ``folder`` and returns the last model stage before it.
    """
    folder = Path(folder)
    recipe_file = folder.parent / "recipe.yaml"
    if not recipe_file.is_file():
        return None
    stages = (yaml.safe_load(recipe_file.read_text()) or {}).get("stages") or []
    names = [stage.get("name") for stage in stages]
    if folder.name not in names:
        return None
    earlier = [s for s in stages[: names.index(folder.name)] if s.get("type") in MODEL_STAGE_TYPES]
    return str(folder.parent / earlier[-1]["name"]) if earlier else None


def _check_folder(folder: Path) -> dict[str, Any]:
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"`folder` must be a model folder with a config.json, got {str(folder)!r}; pass a stage folder of a "
            "recipe run or a `save_pretrained` folder."
        )
    config = json.loads((folder / "config.json").read_text())
    if is_quantized(config):
        source = float_source(folder)
        where = f"export {source!r} instead" if source else "export the float folder it was quantised from instead"
        raise ValueError(
            f"`folder` {str(folder)!r} is an hf_compress int8 folder (`{QUANTIZATION_KEY}` in config.json), whose "
            f"custom int8 modules ONNX cannot express; {where} (its onnx/model_quantized.onnx is the ONNX Runtime "
            "int8 model)."
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ValueError(
            f"`folder` {str(folder)!r} holds a {method!r}-quantised model, which the exporter cannot trace; export "
            "the float model it was quantised from instead."
        )
    return config


def _load_tokenizer(folder: Path):
    # transformers 5 builds an empty tokenizer for a folder without vocabulary files: look for the files first
    files = [f for f in TOKENIZER_FILES if (folder / f).is_file()]
    error = None
    if files:
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as err:
            error = err
    raise ValueError(
        f"`folder` {str(folder)!r} has no loadable tokenizer (found {files}), which transformers.js needs; save it "
        "there with `tokenizer.save_pretrained(folder)`."
    ) from error


def _check_embedding_table(model: nn.Module, group_size: int) -> None:
    """Refuse `embedding_bits=4` before tracing: a table tied to the LM head, or a group size the width can't take."""
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is table.weight:
        raise ValueError(
            f"`embedding_bits=4`: the word embeddings of this {type(model).__name__} are tied to its LM head, which "
            "must stay a full matmul; export with `embedding_bits=8`."
        )
    check_group_size(group_size, table.weight.shape[1], name="embedding_group_size")


def _input_names(model: nn.Module, tokenizer) -> list[str]:
    names = ["input_ids", "attention_mask"]
    takes = inspect.signature(model.forward).parameters
    segments = (getattr(model.config, "type_vocab_size", 0) or 0) > 1 or "token_type_ids" in tokenizer("a")
    if "token_type_ids" in takes and segments:  # BERT yes; RoBERTa (one segment), DistilBERT, decoders no
        names.append("token_type_ids")
    return names


def _encode(tokenizer, texts: list[str], names: list[str], extra_padding: int = 0) -> dict[str, torch.Tensor]:
    """Real token ids of ``texts``; ``extra_padding`` pads every row past the longest so the trace sees a mask."""
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    if min(lengths) == 0:
        raise ValueError(
            f"The tokenizer of the folder gives no tokens for `check_texts` {texts!r}; pass texts it can tokenise, "
            "or re-save the tokenizer that matches the model."
        )
    encoded = tokenizer(texts, padding="max_length", max_length=max(lengths) + extra_padding, return_tensors="pt")
    return {name: encoded[name] if name in encoded else torch.zeros_like(encoded["input_ids"]) for name in names}


def _compare(reference: np.ndarray, got: np.ndarray, mask: np.ndarray, token_level: bool) -> tuple[float, float]:
    """Max |difference| and argmax agreement over the rows (or the unmasked tokens) of two outputs."""
    keep = mask.astype(bool) if token_level else np.ones(reference.shape[0], dtype=bool)
    diff = float(np.abs(reference - got)[keep].max())
    agreement = float((reference.argmax(-1) == got.argmax(-1))[keep].mean())
    return diff, agreement


def _write_repo_files(folder: Path, root: Path, tokenizer) -> None:
    """config.json (+ generation_config.json) and the tokenizer files transformers.js loads, next to ``onnx/``."""
    if root.resolve() != folder.resolve():
        for name in ("config.json", "generation_config.json"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, root / name)
        tokenizer.save_pretrained(root)
    elif not (root / "tokenizer.json").is_file():
        tokenizer.save_pretrained(root)  # a folder with only slow-tokenizer files gets its tokenizer.json


def export_onnx(
    folder: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    quantize: bool = True,
    opset: int = 17,
    check: bool = True,
    check_texts: tuple[str, ...] | list[str] = CHECK_TEXTS,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    per_channel: bool = False,
    embedding_bits: int = 8,
    embedding_group_size: int = 64,
) -> OnnxExport:
    """Export a float model folder to `onnx/model.onnx` and `onnx/model_quantized.onnx` (transformers.js layout).

    Args:
        folder (`str` or `os.PathLike`):
            A folder with config.json, weights and a tokenizer: any float stage of a recipe run (teacher, vocabulary-
            pruned, distilled, per-layer pruned: loaded with `hf_compress.loading.from_pretrained`) or a plain
            transformers folder. hf_compress int8 folders are refused (export the float stage they came from).
        output (`str` or `os.PathLike`, *optional*):
            The model repository to write (config.json and tokenizer files are copied there, graphs go to
            `output/onnx/`); defaults to `folder` itself.
        quantize (`bool`, *optional*, defaults to `True`):
            Also write `onnx/model_quantized.onnx` with `onnxruntime.quantization.quantize_dynamic` (int8 weights,
            activations quantised per call).
        opset (`int`, *optional*, defaults to 17):
            ONNX opset (17 has `LayerNormalization`; ONNX Runtime and transformers.js run it).
        check (`bool`, *optional*, defaults to `True`):
            Run the float graph with ONNX Runtime on `check_texts` and raise if its output is not within
            `atol` / `rtol` of PyTorch's; also measure the int8 graph's agreement.
        check_texts (`Sequence[str]`, *optional*):
            At least two sentences; the graph is traced on the first two (padded) and checked on all of them.
        atol (`float`, *optional*, defaults to 1e-4):
            Absolute tolerance of the float check.
        rtol (`float`, *optional*, defaults to 1e-3):
            Relative tolerance of the float check.
        per_channel (`bool`, *optional*, defaults to `False`):
            Per-channel weight scales in `quantize_dynamic`.
        embedding_bits (`int`, *optional*, defaults to 8):
            Word-embedding table of `model_quantized.onnx`: 8 is ONNX Runtime's int8 Gather; 4 stores it as the
            4-bit table of our PyTorch int4 stage (fp16 scale and offset per `embedding_group_size` columns, decoded
            with standard ONNX operators: see `hf_compress.export.embeddings`), about half the bytes of the int8
            table. Needs `quantize=True` and an embedding not tied to an LM head.
        embedding_group_size (`int`, *optional*, defaults to 64):
            Columns per scale / offset pair of the 4-bit table; an even divisor of the hidden size.

    Returns:
        [`OnnxExport`]: paths, sizes and measured differences.

    Example:

    >>> from hf_compress.export import export_onnx
    >>> result = export_onnx("outputs/quickstart/pruned")  # doctest: +SKIP
    >>> result.quantized, result.max_abs_diff  # doctest: +SKIP
    ('outputs/quickstart/pruned/onnx/model_quantized.onnx', 2.4e-06)
    """
    folder = Path(folder)
    _check_folder(folder)
    if embedding_bits not in EMBEDDING_BITS:
        raise ValueError(f"`embedding_bits` must be one of {EMBEDDING_BITS}, got {embedding_bits!r}.")
    if embedding_bits == 4 and not quantize:
        raise ValueError("`embedding_bits=4` sets the table of `model_quantized.onnx`: it needs `quantize=True`.")
    if len(check_texts) < 2 or not all(isinstance(t, str) and t for t in check_texts):
        raise ValueError(f"`check_texts` must hold at least two non-empty strings, got {list(check_texts)!r}.")
    require("onnx")
    ort_quantization = require("onnxruntime.quantization")  # heavy optional dependency: only when exporting

    model = from_pretrained(folder).float().eval()
    tokenizer = _load_tokenizer(folder)
    head = detect_head(type(model).__name__)
    if head not in OUTPUTS:
        raise ValueError(
            f"`folder` holds a {type(model).__name__}, whose head {head!r} has no single output to export; supported "
            f"heads: {[h for h in OUTPUTS if h]} and models without a head."
        )
    output_name = OUTPUTS[head]
    if embedding_bits == 4:
        _check_embedding_table(model, embedding_group_size)
    names = _input_names(model, tokenizer)
    root = Path(output) if output is not None else folder
    (root / "onnx").mkdir(parents=True, exist_ok=True)
    _write_repo_files(folder, root, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # for the padded check batches only; the saved files are unchanged

    wrapper = _Logits(model, names, output_name).eval()
    example = _encode(tokenizer, list(check_texts[:2]), names, extra_padding=2)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in names}
    axes[output_name] = {0: "batch_size", 1: "sequence_length"} if head in TOKEN_LEVEL else {0: "batch_size"}
    path = root / "onnx" / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches, export deprecation
        torch.onnx.export(
            wrapper,
            tuple(example[name] for name in names),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=[output_name],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    result = OnnxExport(str(root), str(path), None, names, output_name, opset, path.stat().st_size)

    if quantize:
        quantized = root / "onnx" / "model_quantized.onnx"
        source, excluded = str(path), []
        if embedding_bits == 4:  # our 4-bit table first; the quantiser then leaves its decode nodes alone
            source = require("onnx").load(str(path))
            excluded = quantize_word_embeddings(source, embedding_group_size, input_name=names[0])
        ort_quantization.quantize_dynamic(
            source,
            str(quantized),
            weight_type=ort_quantization.QuantType.QInt8,
            per_channel=per_channel,
            nodes_to_exclude=excluded,
        )
        result.quantized, result.quantized_bytes = str(quantized), quantized.stat().st_size

    if check:
        inputs = _encode(tokenizer, list(check_texts), names)
        with torch.no_grad():
            reference = wrapper(*(inputs[name] for name in names)).numpy()
        mask = inputs["attention_mask"].numpy()
        token_level = head in TOKEN_LEVEL
        got = run_onnx(onnx_session(path), inputs)
        result.max_abs_diff, _ = _compare(reference, got, mask, token_level)
        keep = mask.astype(bool) if token_level else slice(None)
        if not np.allclose(got[keep], reference[keep], atol=atol, rtol=rtol):
            raise ValueError(
                f"ONNX Runtime output of {str(path)!r} differs from PyTorch by up to {result.max_abs_diff:.3g} "
                f"(`atol`={atol}, `rtol`={rtol}) on `check_texts`; raise the tolerances or try another `opset`."
            )
        if result.quantized is not None:
            got = run_onnx(onnx_session(result.quantized), inputs)
            result.quantized_max_abs_diff, result.quantized_argmax_agreement = _compare(
                reference, got, mask, token_level
            )
    logger.info("Exported %s to %s (%d bytes, int8: %s)", folder, path, result.model_bytes, result.quantized_bytes)
    return result
