"""``describe(model)``: what hf_compress sees in a model, in words (blocks, heads, KV groups, FFN widths, config)."""

from __future__ import annotations

from torch import nn

from hf_compress.models.families import (
    block_family,
    ffn_size,
    get_family,
    get_layers,
    head_counts,
    head_dim,
    num_encoder_layers,
    stacks,
    unwrap,
)
from hf_compress.models.table import PER_LAYER_CONFIG, Family


def _roles(family: Family, names: tuple[str, ...]) -> str:
    paths = [getattr(family, name) for name in names if getattr(family, name)]
    return ", ".join(paths + [p for p in family.head_rows if "q" in names])


def _config_fields(config, family: Family) -> list[str]:
    """The config fields surgery rewrites for one stack, and when."""
    fields = [f"`{family.layers_config}` (drop_layers)", f"`{family.ffn_config}` (uniform FFN width)"]
    if family.config_head_dim is not None:
        heads = [family.heads_config, family.config_head_dim]
        if hasattr(config, "num_key_value_heads"):
            heads.insert(1, "num_key_value_heads")
        fields.append(f"{' / '.join(f'`{name}`' for name in heads)} (uniform heads)")
    return fields


def describe(model: nn.Module) -> str:
    """Describe how hf_compress sees ``model``; the text is printed and returned.

    Lists the blocks (with the flat numbering of encoder-decoder models), each block's query heads, KV heads and
    group size, head width and FFN width, what each pruning target acts on, what is refused, and which config fields
    surgery rewrites (everything else is recorded per layer in ``config.hf_compress`` for
    :func:`hf_compress.from_pretrained`).

    Args:
        model (`PreTrainedModel`):
            A model of a supported family (PEFT / DDP / compiled wrappers are unwrapped).

    Returns:
        `str`: The description.

    Example:

    >>> from hf_compress.models import describe
    >>> text = describe(model)  # doctest: +SKIP
    """
    inner = unwrap(model)
    family, config = get_family(inner), inner.config
    lines = [f"{type(inner).__name__} (model_type {config.model_type!r})"]
    names = {id(module): name for name, module in inner.named_modules()}
    split = num_encoder_layers(inner)
    start = 0
    for stack_family, blocks in stacks(inner):
        side = "" if split is None else ("encoder " if start == 0 else "decoder ")
        last = start + len(blocks) - 1
        lines.append(
            f"{side}blocks {start}-{last}: {names.get(id(blocks), stack_family.layers)}.{{0-{len(blocks) - 1}}}"
        )
        lines.append(f"  heads: {_roles(stack_family, ('q', 'k', 'v', 'qkv', 'o'))}")
        if stack_family.cross_attention is not None:
            cross = _roles(stack_family, ("cross_q", "cross_k", "cross_v", "cross_o"))
            lines.append(f"  cross-attention heads (prune_heads(..., cross_heads=...)): {cross}")
        lines.append(f"  ffn_neurons: {_roles(stack_family, ('gate', 'up', 'down'))}")
        lines.append(f"  config fields rewritten: {', '.join(_config_fields(config, stack_family))}")
        start += len(blocks)
    per_layer = [name for name in PER_LAYER_CONFIG if isinstance(getattr(config, name, None), list)]
    if per_layer:
        lines.append(f"per-block config lists kept in step by drop_layers: {', '.join(per_layer)}")
    if split is not None:
        lines.append(f"flat numbering: decoder block j is {split} + j")
    if family.heads_refused is not None:
        lines.append(f"heads: refused, {family.heads_refused}")
    lines.append("block  heads  kv_heads  group  head_dim  ffn" + ("  cross_heads" if split is not None else ""))
    for layer in range(len(get_layers(inner))):
        heads, kv = head_counts(inner, layer)
        row = (
            f"{layer:<5}  {heads:<5}  {kv:<8}  {heads // kv:<5}  {head_dim(inner, layer):<8}  {ffn_size(inner, layer)}"
        )
        if block_family(inner, layer).cross_attention is not None:
            row += f"  {head_counts(inner, layer, cross=True)[0]}"
        lines.append(row)
    if any(head_counts(inner, layer)[1] not in (1, head_counts(inner, layer)[0]) for layer in range(start)):
        lines.append("GQA: remove whole KV groups, or the same number of query heads from within every group")
    elif any(head_counts(inner, layer)[1] == 1 < head_counts(inner, layer)[0] for layer in range(start)):
        lines.append("single KV head: query heads are removed from within its group (the KV head stays)")
    text = "\n".join(lines)
    print(text)
    return text
