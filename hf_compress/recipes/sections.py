"""Typed recipe sections: values checked against the dataclass fields / function signatures they feed.

``training`` sections feed ``DistillationConfig`` / ``TrainingArguments``, ``pruning`` feeds ``PruningConfig`` and the
other sections feed functions (``quantize_model``, ``prune_vocabulary``, ``make_student``). Keys are checked against
the fields, values are coerced to the annotated types, and the config classes are instantiated once so their own
``__post_init__`` errors surface, prefixed with the recipe key path. The cross-key rules of a whole recipe live in
[`hf_compress.recipes.validate`].
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import tempfile
import types
import typing
import uuid
from collections.abc import Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from transformers import TrainingArguments

from hf_compress.checks import check_training_arguments
from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.student import make_student
from hf_compress.pruning.config import PruningConfig
from hf_compress.recipes.schema import RESERVED_TRAINING_KEYS, RecipeError

# ------------------------------------------------------------------------------------------- typed values


def suggest(key: str, options: list[str]) -> str:
    """``"did you mean `x`?"`` for the closest option, else the valid options (or a pointer when there are many)."""
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if match:
        return f"did you mean `{match[0]}`?"
    if len(options) > 20:
        return "see the class documentation for the valid fields."
    return f"valid keys: {', '.join(options)}."


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in get_args(tp)))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(member.value) for member in tp)
    names = {
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
        list: "a list",
        tuple: "a list",
        Iterable: "a list",
        Sequence: "a list",
        dict: "a mapping",
    }
    return names.get(origin or tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or isinstance(tp, (str, typing.TypeVar)):
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg)
                except _Mismatch:
                    continue
        raise _Mismatch
    if origin is Literal:
        if any(value == arg and type(value) is type(arg) for arg in args):
            return value
        raise _Mismatch
    if origin in (list, tuple, Iterable, Sequence) or tp in (list, tuple):
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(item, args[0]) for item in value] if args and origin is not tuple else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        number = _number(value)
        if number is None or float(number) != int(number):
            raise _Mismatch
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise _Mismatch
        return float(number)
    if tp is str or tp is type(None):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, Enum):
        if value in [member.value for member in tp] or value in tp.__members__:
            return value
        raise _Mismatch
    return value  # classes we cannot judge (nested configs...): their own checks run on instantiation


def _number(value: Any) -> int | float | None:
    """A YAML number, or a numeric string such as ``"1e-4"`` (YAML 1.1 reads that as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` converted to type ``tp`` (numeric strings accepted for numbers), or a one-sentence error."""
    try:
        return _coerce(value, tp)
    except _Mismatch:
        raise RecipeError(f"`{path}` must be {_describe(tp)}, got {value!r}.") from None


def type_hints(obj: Any) -> dict[str, Any]:
    try:
        return get_type_hints(obj)
    except (NameError, TypeError):  # unresolvable forward references: leave those values unchecked
        return {}


def check_keys(values: Any, allowed: list[str], path: str, label: str) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"`{path}` must be a mapping of {label} fields, got {values!r}.")
    for key in values:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise RecipeError(f"`{where}` is not a {label} field; {suggest(str(key), allowed)}")
    return dict(values)


def _post_init_error(err: Exception, path: str) -> RecipeError:
    """Prefix a config class's own one-sentence error with the key path: "`sparsity` ..." -> "`a.b.sparsity` ..."."""
    message = str(err).strip()
    match = re.match(r"`([\w.]+)`", message)
    if match:
        return RecipeError(f"`{path}.{match.group(1)}`{message[match.end() :]}")
    return RecipeError(f"`{path}`: {message}")


# --------------------------------------------------------------------------------------- stage sections


def _config_class(kind: str, distills: bool) -> type:
    if kind == "pruning":
        return PruningConfig
    return DistillationConfig if distills else TrainingArguments


def placeholder_dir() -> str:
    """An ``output_dir`` for validating config classes: a fresh temp path that is never created."""
    return str(Path(tempfile.gettempdir()) / f"hf-compress-validate-{uuid.uuid4().hex}")


def config_kwargs(kind: str, values: Any, path: str, distills: bool = False) -> dict[str, Any]:
    """Type-check a ``training`` / ``pruning`` section against its config dataclass and instantiate it once."""
    cls = _config_class(kind, distills)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    values = check_keys(values, fields, path, cls.__name__)
    for key in RESERVED_TRAINING_KEYS:
        if kind == "training" and key in values:
            raise RecipeError(
                f"`{path}.{key}` is set by the pipeline (one folder per stage), got {values[key]!r}; "
                f"remove it and pass `--output-dir` to `hf-compress run` instead."
            )
    hints = type_hints(cls)
    values = {key: coerce(value, hints.get(key, Any), f"{path}.{key}") for key, value in values.items()}
    extra = {"output_dir": placeholder_dir(), "report_to": "none"} if kind == "training" else {}
    try:
        built = cls(**{**extra, **values})
        if kind == "training":  # e.g. max_steps -5, which TrainingArguments accepts and turns into 3 epochs
            check_training_arguments(built)
    except (ValueError, TypeError) as err:
        raise _post_init_error(err, path) from None
    return values


def function_kwargs(func, values: Any, path: str, skip: int = 1) -> dict[str, Any]:
    """Type-check keyword arguments against ``func``'s signature (its first ``skip`` parameters are not settable)."""
    params = list(inspect.signature(func).parameters.values())[skip:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    values = check_keys(values, names, path, f"{func.__name__}()")
    hints = type_hints(func)
    return {key: coerce(value, hints.get(key, Any), f"{path}.{key}") for key, value in values.items()}


def student_kwargs(values: Any, path: str) -> dict[str, Any]:
    """A ``student`` section: either ``{model: <folder>}`` or ``make_student`` arguments, never both."""
    if isinstance(values, dict) and "model" in values:
        if len(values) > 1:
            others = sorted(k for k in values if k != "model")
            raise RecipeError(
                f"`{path}` gives `model` and {others}; use either `model: <folder>` or make_student "
                f"arguments such as `num_layers`."
            )
        return {"model": coerce(values["model"], str, f"{path}.model")}
    values = function_kwargs(make_student, values, path)
    if values.get("num_layers") is not None and values.get("layers") is not None:
        raise RecipeError(f"`{path}` sets both `num_layers` and `layers`; keep only one of them.")
    return values
