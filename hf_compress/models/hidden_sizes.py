"""Which hidden sizes a config can save: the multiple a kept ``hidden_size`` must respect after width pruning.

transformers 5 configs of some families validate ``hidden_size % num_attention_heads == 0`` even though they store
``head_dim`` (Llama, Gemma 2, Gemma 3: ``save_pretrained`` raises a ``StrictDataclassClassValidationError``). Others
(Mistral, Qwen2 / 3, Gemma, Granite, SmolLM3, Phi-3, GPT-2 ...) accept any size. The BERT-like modeling code refuses a
hidden size that heads do not divide when the model is *built*; :func:`hf_compress.from_pretrained` builds those
skeletons from the recorded head width (``loading._wide_config``), so their configs keep any size too.

The rule is read from the config class itself (:func:`hidden_multiple`), so a family found by discovery, or a new
transformers release, needs no table entry; ``tests/models/test_hidden_sizes.py`` pins the result for every family.
"""

from __future__ import annotations

import copy

from huggingface_hub.errors import StrictDataclassError

from hf_compress.models.families import unwrap


def _saves(config, hidden: int, heads: int) -> bool:
    """Whether ``config`` with ``hidden_size`` = ``hidden`` and ``heads`` query heads passes its own validation."""
    probe = copy.deepcopy(config)
    probe.hidden_size = hidden
    probe.num_attention_heads = heads
    try:
        probe.validate()
    except (ValueError, StrictDataclassError):
        return False
    return True


def hidden_multiple(config, num_heads: int | None = None) -> int:
    """The number a kept hidden size must be a multiple of for ``config`` to save: 1 when any size is fine.

    It is ``num_attention_heads`` (or ``num_heads``, the count uniform head pruning will write to the config) when the
    config class accepts ``heads * q`` but refuses ``heads * q + 1`` hidden channels; 1 otherwise.

    Args:
        config (`PretrainedConfig` or `PreTrainedModel`):
            The config (a model's is read) as it will be saved.
        num_heads (`int`, *optional*):
            Query heads the config will have; defaults to its `num_attention_heads`.

    Example:

    >>> from transformers import LlamaConfig, MistralConfig
    >>> hidden_multiple(LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8))
    8
    >>> hidden_multiple(MistralConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8))
    1
    """
    config = getattr(unwrap(config), "config", config)
    heads = num_heads if num_heads is not None else getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 1 or not hasattr(config, "validate"):
        return 1
    q = max(1, int(config.hidden_size) // heads)
    return heads if _saves(config, heads * q, heads) and not _saves(config, heads * q + 1, heads) else 1


def nearest_hidden_sizes(kept: int, multiple: int, size: int) -> list[int]:
    """The valid pruned sizes (positive multiples of ``multiple`` below ``size``) nearest to ``kept``, smallest first.

    >>> nearest_hidden_sizes(10, 4, 16)
    [8, 12]
    >>> nearest_hidden_sizes(13, 4, 16)
    [12]
    >>> nearest_hidden_sizes(2, 4, 16)
    [4]
    """
    below, above = kept // multiple * multiple, -(-kept // multiple) * multiple
    return sorted({s for s in (below, above) if 0 < s < size})


def check_hidden_size(config, kept: int, size: int, parameter: str = "channels") -> None:
    """Raise a one-sentence error when ``config`` cannot save ``kept`` hidden channels (of ``size``)."""
    multiple = hidden_multiple(config)
    if kept % multiple == 0:
        return
    valid = nearest_hidden_sizes(kept, multiple, size)
    fix = (
        f"remove {' or '.join(str(size - s) for s in valid)} channels instead (keeping {' or '.join(map(str, valid))})"
        if valid
        else f"keep all {size} channels (no smaller multiple of {multiple} exists)"
    )
    raise ValueError(
        f"`{parameter}` removes {size - kept} of {size} hidden channels, keeping {kept}, which "
        f"{type(config).__name__} refuses to save (hidden_size must be a multiple of num_attention_heads = "
        f"{multiple}); {fix}."
    )
