"""DistilBERT-style student initialisation: a copy of the teacher that keeps only some of its blocks."""

from __future__ import annotations

import copy

from torch import nn

from hf_compress.models.families import get_family, get_layers, num_encoder_layers, unwrap
from hf_compress.pruning.surgery import drop_layers


def evenly_spaced_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """``num_layers`` indices spread evenly over ``range(num_teacher_layers)``, first and last kept (if ``>= 2``)."""
    if num_layers == 1:
        return [0]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return [round(i * step) for i in range(num_layers)]


def make_student(teacher: nn.Module, num_layers: int | None = None, layers: list[int] | None = None) -> nn.Module:
    """Build a student by copying ``teacher`` and keeping only some of its transformer blocks.

    Embeddings, final norm and task head are copied unchanged; kept blocks are renumbered (``layer_idx``,
    ``num_hidden_layers``, ``layer_types``), so the student saves and reloads with plain ``from_pretrained`` and
    ``generate()`` works with a KV cache. The teacher is not modified. The kept teacher indices are recorded in
    ``student.config.hf_compress["teacher_layers"]``.

    Args:
        teacher (`PreTrainedModel`):
            A model of a supported family (`hf_compress.models.families.FAMILIES`; any head; PEFT / DDP / compiled
            wrappers are unwrapped).
        num_layers (`int`, *optional*):
            Number of blocks to keep, spread evenly with the first and last kept (as DistilBERT does). Defaults to
            half the teacher's blocks (at least one) when `layers` is not given either. For encoder-decoder models
            it counts decoder blocks and the whole encoder is kept, as distil-whisper does.
        layers (`list[int]`, *optional*):
            Exact teacher block indices to keep, instead of `num_layers` (encoder-decoder models: the flat numbering,
            encoder blocks first, see `hf_compress.models.families.get_layers`).

    Returns:
        A new model of the teacher's class.

    Example:

    >>> from hf_compress import make_student
    >>> student = make_student(teacher, num_layers=6)  # doctest: +SKIP
    >>> student.config.hf_compress["teacher_layers"]  # doctest: +SKIP
    [0, 2, 4, 7, 9, 11]
    """
    teacher = unwrap(teacher)
    get_family(teacher)  # one-sentence error listing the supported families
    total = len(get_layers(teacher))
    encoder = num_encoder_layers(teacher) or 0  # encoder-decoder: `num_layers` counts decoder blocks
    if num_layers is not None and layers is not None:
        raise ValueError("`num_layers` and `layers` are mutually exclusive; pass only one of them.")
    if layers is None:
        choices = total - encoder
        if num_layers is None:
            num_layers = max(1, choices // 2)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= choices:
            raise ValueError(f"`num_layers` must be an int in [1, {choices}], got {num_layers!r}.")
        layers = list(range(encoder)) + [encoder + i for i in evenly_spaced_layers(choices, num_layers)]
    else:
        layers = list(layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < total for i in layers):
            raise ValueError(f"`layers` must be a non-empty list of indices in [0, {total}), got {layers!r}.")
        if len(set(layers)) != len(layers):
            raise ValueError(f"`layers` must not repeat an index, got {layers!r}.")
        layers = sorted(layers)
    student = copy.deepcopy(teacher)
    if len(layers) < total:
        drop_layers(student, [i for i in range(total) if i not in layers])
    student.config.hf_compress = {**(getattr(student.config, "hf_compress", None) or {}), "teacher_layers": layers}
    return student
