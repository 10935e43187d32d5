"""Number and path rules shared by every entry point (Python API, recipes, CLI).

Each rule raises one sentence naming the parameter, the value received and the fix, before any work is done:

* :func:`check_finite`: a config number is a finite float (``inf`` / ``nan`` are refused everywhere);
* :func:`check_training_arguments`: ``TrainingArguments`` values that would train nothing or something other than
  asked (``max_steps`` other than ``-1`` or ``> 0``, no epochs, non-finite rates);
* :func:`check_model_path`: a model argument that looks like a local path names an existing folder (instead of
  transformers' "Repo id must be in the form ..." for a mistyped path);
* :func:`check_label_values`: class labels of a dataset lie in `[0, num_labels)` (or are -100);
* :func:`check_finite_weights`: a model about to be saved has no NaN / inf parameter;
* :func:`last_complete_checkpoint`: the newest `checkpoint-<step>` folder that holds every file a finished save
  writes (a run killed while saving leaves a half-written one, which `resume_from_checkpoint=True` would pick);
* :func:`readable_weights`: a truncated or corrupt safetensors file is reported as a [`CorruptFileError`] naming the
  file or folder and the fix, instead of a bare `SafetensorError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

# TrainingArguments float fields that must stay finite (the rest are either ints, or never numbers from a user).
TRAINING_FLOATS = (
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "num_train_epochs",
    "warmup_ratio",
    "warmup_steps",
    "label_smoothing_factor",
)


class NonFiniteError(ValueError):
    """A NaN or inf where a finite number is needed: a loss component, a weight about to be saved."""


def check_finite(name: str, value: Any) -> None:
    """Raise a `ValueError` when `value` is a non-finite number (`inf`, `-inf`, `nan`); other values pass.

    >>> check_finite("temperature", 2.0)
    >>> check_finite("temperature", float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: `temperature` must be a finite number, got inf.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}.")


def check_training_arguments(args: Any) -> None:
    """Refuse `TrainingArguments` values that would silently train nothing or train for another length than asked.

    `max_steps` follows the Trainer's meaning: a positive number of optimizer steps, or `-1` to train
    `num_train_epochs` epochs (which must then be > 0). Any other value (0, -5) is refused instead of silently
    falling back to 3 epochs.

    Args:
        args (`TrainingArguments` or `dict`): A built `TrainingArguments` (or subclass), or its keyword arguments.
    """
    if not isinstance(args, dict):
        args = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(args)}
    values = args
    for name in TRAINING_FLOATS:
        check_finite(name, values.get(name))
    max_steps = values.get("max_steps", -1)
    if max_steps is None:
        return
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or (max_steps < 1 and max_steps != -1):
        raise ValueError(
            f"`max_steps` must be a positive number of steps, or -1 to train `num_train_epochs` epochs, got "
            f"{max_steps!r}."
        )
    epochs = values.get("num_train_epochs", 3.0)
    if max_steps == -1 and epochs is not None and not epochs > 0:
        raise ValueError(f"`num_train_epochs` must be > 0 when `max_steps` is -1, got {epochs}; set either one.")


def looks_like_path(value: str) -> bool:
    """Whether `value` is meant as a local path rather than a Hub id (`./x`, `/x`, `~/x`, `x\\y`, `a/b/c`)."""
    return value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1 or os.path.isabs(value)


def check_model_path(name: str, value: Any) -> None:
    """Raise a `FileNotFoundError` when `value` is meant as a local folder (see :func:`looks_like_path`) but is none.

    A plain Hub id (`"bert-base-uncased"`, `"user/model"`) passes: transformers resolves it.
    """
    if not isinstance(value, (str, os.PathLike)):
        return
    text = os.fspath(value)
    if os.path.isdir(text):
        return
    if os.path.isfile(text):
        raise FileNotFoundError(f"`{name}` {text!r} is a file, not a model folder; pass the folder with config.json.")
    if looks_like_path(text):
        raise FileNotFoundError(
            f"`{name}` {text!r} does not exist; pass an existing model folder (one with config.json) or a Hub id."
        )


def check_label_values(labels: Any, num_labels: int, name: str = "num_labels") -> None:
    """Raise a `ValueError` when a class label of `labels` (ints, -100 ignored) is outside `[0, num_labels)`.

    Checked when the data and the label count meet (a recipe stage's start), instead of an `IndexError` deep in
    the loss kernel on some later batch.
    """
    flat = (v for row in labels for v in (row if isinstance(row, (list, tuple)) else [row]))  # token labels too
    values = {int(v) for v in flat if v is not None and int(v) != -100}
    bad = sorted(v for v in values if not 0 <= v < num_labels)
    if bad:
        raise ValueError(
            f"`{name}` is {num_labels} but the data has labels {bad[:5]} outside [0, {num_labels}); set `{name}` to "
            f"{max(values) + 1} or fix the label column."
        )


def check_finite_weights(model: nn.Module, where: str = "model") -> None:
    """Raise a [`NonFiniteError`] naming the first parameter of `model` holding NaN or inf (never save those).

    Args:
        model (`nn.Module`): The model about to be saved.
        where (`str`, *optional*, defaults to `"model"`): What the model is, for the message (e.g. a folder).
    """
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise NonFiniteError(
                f"`{where}` parameter `{name}` holds NaN or inf values, so it is not saved; lower the learning rate "
                "or check the data, then rerun from the last good checkpoint."
            )


class CorruptFileError(OSError):
    """A weights / masks file that cannot be read (truncated by a crash or a full disk, or not safetensors)."""


@contextlib.contextmanager
def readable_weights(name: str, path: str | os.PathLike) -> Iterator[None]:
    """Translate a `SafetensorError` raised in the block into a [`CorruptFileError`] naming `name` and `path`.

    >>> with readable_weights("path", "out/student"):  # doctest: +SKIP
    ...     model = AutoModel.from_pretrained("out/student")
    """
    try:
        yield
    except SafetensorError as err:
        raise CorruptFileError(
            f"`{name}` {os.fspath(path)!r} has a truncated or corrupt safetensors file ({err}); delete it and "
            "re-save the model (or rerun the stage / resume from an earlier checkpoint)."
        ) from err


def last_complete_checkpoint(output_dir: str | os.PathLike, required: tuple[str, ...] = ("trainer_state.json",)):
    """The newest `checkpoint-<step>` folder of `output_dir` holding every file of `required`, or `None`.

    `trainer_state.json` is written last by `Trainer._save_checkpoint`, and callbacks write theirs after it (e.g.
    `PruningCallback`: `pruning_state.json`), so a folder missing one of them was cut short by a crash.

    >>> trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))  # doctest: +SKIP
    """
    folder = os.fspath(output_dir)
    if not os.path.isdir(folder):
        return None
    steps = [
        (int(name.rpartition("-")[2]), os.path.join(folder, name))
        for name in os.listdir(folder)
        if name.startswith("checkpoint-") and name.rpartition("-")[2].isdigit()
    ]
    for _, path in sorted(steps, reverse=True):
        if all(os.path.isfile(os.path.join(path, name)) for name in required):
            return path
    return None
