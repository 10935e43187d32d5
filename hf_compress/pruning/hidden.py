"""Width pruning of the hidden size (Minitron): remove residual-stream channels from every tensor that carries them.

Where hidden-size tensors live is *discovered* (:mod:`hf_compress.pruning.hidden_channels`), sliced with the norm,
epsilon and embedding-scale rescaling of :mod:`hf_compress.pruning.hidden_slicing`, then *verified*:
:func:`prune_hidden` checks the result against the zero-channel oracle (below) on a copy before touching the model.

Correctness definition (the oracle). Channels that carry nothing (zero in every writer: embeddings, o / down, head
transforms, norm gains and biases) can be removed without changing the function, provided the norms that see them
are rescaled (RMSNorm exactly; LayerNorm exactly when its input has zero mean over the kept channels, otherwise up to
a term proportional to that mean). :func:`check_zero_channel_oracle` centres every LayerNorm input
(:func:`centre_layer_norms`) to check the slicing exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hf_compress.models.families import unwrap
from hf_compress.models.hidden_sizes import check_hidden_size
from hf_compress.pruning.hidden_channels import (
    HiddenLayout,
    Norm,
    channel_index,
    hidden_carriers,
    hidden_layout,
    hidden_size,
    zero_hidden_channels,
)
from hf_compress.pruning.hidden_slicing import express_heads, slice_hidden
from hf_compress.pruning.surgery import record_structure

__all__ = [
    "HiddenLayout",
    "Norm",
    "centre_layer_norms",
    "check_zero_channel_oracle",
    "first_output",
    "hidden_carriers",
    "hidden_layout",
    "hidden_size",
    "probe_inputs",
    "prune_hidden",
    "resize_hidden",
    "zero_hidden_channels",
]


def centre_layer_norms(model: nn.Module, keep: torch.Tensor | None = None) -> list[RemovableHandle]:
    """Forward pre-hooks making every LayerNorm input zero-mean over the ``keep`` channels (all when ``None``).

    Under these hooks the LayerNorm rescaling rule is exact; :func:`prune_hidden` and the tests use them to check the
    slicing of LayerNorm families. Returns the handles (``handle.remove()`` restores the model).
    """

    def centre(module, args):
        x = args[0]
        if keep is None:
            return (x - x.mean(-1, keepdim=True), *args[1:])
        mask = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
        mask[keep.to(x.device)] = 1.0
        mean = (x * mask).sum(-1, keepdim=True) / mask.sum()
        return ((x - mean) * mask, *args[1:])

    layout = hidden_layout(model)
    return [n.module.register_forward_pre_hook(centre) for n in layout.norms if n.centred]


def probe_inputs(model: nn.Module, batch: int = 2, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Small deterministic ``input_ids`` / ``attention_mask`` for ``model`` (ids avoid the first special tokens)."""
    inner = unwrap(model)
    vocab = int(inner.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=generator)
    device = next(inner.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def first_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output tensor of ``model(**inputs)`` (logits, or the last hidden state of a base model), in fp32."""
    kwargs = {"use_cache": False} if getattr(unwrap(model).config, "use_cache", None) is not None else {}
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    return out[0].float()


def check_zero_channel_oracle(
    model: nn.Module,
    channels: Sequence[int] | torch.Tensor,
    prune: Callable[[nn.Module], nn.Module] | None = None,
    atol: float = 1e-4,
) -> float:
    """Max abs difference (over ``1 + max |output|``) between a copy of ``model`` with ``channels`` zeroed and that
    copy after hidden pruning.

    LayerNorm inputs are centred in both runs (see :func:`centre_layer_norms`). A base model's output keeps only the
    surviving channels for the comparison. Raises a one-sentence error when the difference exceeds ``atol`` (the
    slack covers fp32 rounding and the epsilon of norms that share the config's epsilon field with the hidden norms,
    such as Qwen3's per-head q / k norms).
    """
    inner = unwrap(model)
    size = hidden_size(inner)
    index = channel_index(channels, size)
    keep = torch.ones(size, dtype=torch.bool)
    keep[index] = False
    keep = keep.nonzero().flatten()
    probe = zero_hidden_channels(copy.deepcopy(inner), index).eval()
    inputs = probe_inputs(probe)
    handles = centre_layer_norms(probe, keep)
    reference = first_output(probe, inputs)
    for handle in handles:
        handle.remove()
    (prune or (lambda m: prune_hidden(m, index, verify=False)))(probe)
    handles = centre_layer_norms(probe)
    pruned = first_output(probe, inputs)
    for handle in handles:
        handle.remove()
    if reference.shape[-1] == size and pruned.shape[-1] == keep.numel():
        reference = reference[..., keep.to(reference.device)]
    if reference.shape != pruned.shape:
        raise ValueError(
            f"`model` output changed shape from {tuple(reference.shape)} to {tuple(pruned.shape)} under hidden "
            "pruning; a hidden-size tensor was sliced wrongly."
        )
    diff = float((reference - pruned).abs().max()) / (1.0 + float(reference.abs().max()))
    if diff > atol:
        raise ValueError(
            f"`model` fails the zero-channel check of hidden pruning (max difference {diff:.3g} > {atol}, relative to "
            "1 + the largest output); a hidden-size tensor of this architecture is not sliced or rescaled correctly."
        )
    return diff


def prune_hidden(model: nn.Module, channels: Sequence[int] | torch.Tensor, verify: bool = True) -> nn.Module:
    """Physically remove hidden (residual-stream) channels from every tensor that carries them; updates `hidden_size`.

    Embeddings (word, position, token type), every norm (sliced, gains rescaled by `sqrt(d / d')`), the readers and
    writers of every block, the pooler, classifier and tied or untied LM head are sliced consistently. For families
    whose config stores `head_dim` (Llama, Mistral, Qwen2/3, Gemma ...) the result reloads with plain
    `from_pretrained`. For BERT / RoBERTa / DistilBERT / GPT-2, whose head width is `hidden_size / num_heads`, plain
    reloading needs the kept heads times the head width to equal the new hidden size (e.g. remove `k * head_dim`
    channels and `k` heads per layer with :func:`~hf_compress.pruning.prune_heads`, heads first: `prune_hidden` then
    writes the head count to the config); otherwise the per-layer shapes are recorded as for other non-uniform pruning.
    Configs that validate `hidden_size % num_attention_heads` (Llama, Gemma 2 / 3) need a kept size that the head
    count divides (:func:`~hf_compress.models.hidden_sizes.hidden_multiple`): other counts are refused before the
    model is touched.

    On live channels the function changes (that is the pruning); pick `channels` with low activation importance
    (:func:`hf_compress.pruning.activations.hidden_channel_scores`). On channels that carry nothing it does not
    (see the module docstring), which `verify` checks on a copy first.

    Args:
        model (`PreTrainedModel`):
            A supported model, optionally wrapped by PEFT / DDP / `torch.compile` (merge adapters first).
        channels (`list[int]` or `torch.Tensor`):
            Hidden-channel indices to remove.
        verify (`bool`, *optional*, defaults to `True`):
            Check the zero-channel oracle on a deep copy first (costs one copy and four forwards).

    Returns:
        The same `model`, modified in place.

    Example:

    >>> from hf_compress.pruning import prune_hidden
    >>> model = prune_hidden(model, list(range(64)))  # doctest: +SKIP
    """
    inner = unwrap(model)
    layout = hidden_layout(inner)
    index = channel_index(channels, layout.size)
    if index.numel() == 0:
        return model
    check_hidden_size(inner.config, layout.size - index.numel(), layout.size)
    if verify:
        check_zero_channel_oracle(inner, index)
    slice_hidden(inner, layout, index)
    express_heads(inner)
    record_structure(inner)
    return model


def resize_hidden(model: nn.Module, size: int) -> nn.Module:
    """Cut every hidden-size tensor of ``model`` to its first ``size`` channels, changing shapes only.

    No gain, epsilon or weight is rescaled: this builds the skeleton of a hidden-pruned model whose saved weights
    are loaded next (:func:`hf_compress.from_pretrained` for families whose head width is ``hidden_size / heads``,
    built wider so that the recorded head width comes out, then cut to the saved hidden size). In place.

    Args:
        model (`PreTrainedModel`): A supported model with at least ``size`` hidden channels.
        size (`int`): The hidden size to keep.

    Returns:
        The same `model`, with `config.hidden_size` = `size`.
    """
    inner = unwrap(model)
    layout = hidden_layout(inner)
    if not 0 < size <= layout.size:
        raise ValueError(f"`size` must be in [1, {layout.size}] (the model's hidden size), got {size}.")
    if size < layout.size:
        slice_hidden(inner, layout, torch.arange(size, layout.size), rescale=False)
    return model
