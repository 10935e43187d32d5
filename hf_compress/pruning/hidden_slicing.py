"""Slicing hidden channels out of a model while keeping its function on channels that carry nothing.

Channels that carry nothing (zero in every writer: embeddings, o / down, head transforms, norm gains and biases) can be
removed without changing the function, provided the norms that see them are rescaled:

* RMSNorm: the mean square over ``d'`` kept channels is ``d / d'`` times the mean square over ``d``, so the kept
  gains are multiplied by ``sqrt(d / d')`` (for ``(1 + weight)`` norms such as Gemma's, the gain ``1 + weight`` is).
  The epsilon added to the mean square is scaled by ``d / d'`` too (modules and the config's ``*_eps`` field), which
  makes the rule exact.
* LayerNorm: the same gain and epsilon rescaling, bias unchanged. Mean and variance both move when channels go; the
  rule is exact when the norm's input has zero mean over the kept channels (then removed zeros change only the
  variance, by ``d / d'``), and otherwise errs by a term proportional to that mean.

Embedding scaling (Gemma multiplies token embeddings by ``sqrt(hidden_size)``): the scale is recomputed from the new
config (``sqrt(d')``) so the kept embedding rows are multiplied by ``sqrt(d / d')`` to keep the function; when the LM
head is tied to those embeddings, the final norm's gain is divided by the same factor so the logits stay put.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_compress.models.families import get_family
from hf_compress.pruning.hidden_channels import HiddenLayout, Norm, param_holders
from hf_compress.pruning.surgery import layer_structure

_EPS_ATTRIBUTES = ("eps", "variance_epsilon")  # norm modules' epsilon (nn.LayerNorm, Llama-style RMSNorm)
_EPS_CONFIG = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")  # the config fields they come from


def _final_norm(model: nn.Module, layout: HiddenLayout) -> Norm:
    norm = getattr(model.base_model, "norm", None)
    match = [n for n in layout.norms if n.module is norm]
    if not match:
        raise ValueError(
            "`model` scales its embeddings and ties them to the LM head but has no `norm` before the head to "
            "compensate; untie the embeddings (`tie_word_embeddings=False`) before hidden pruning."
        )
    return match[0]


def slice_hidden(model: nn.Module, layout: HiddenLayout, index: torch.Tensor, rescale: bool = True) -> None:
    """Slice ``index`` out of every hidden carrier; with ``rescale``, also keep the function (norm gains, epsilons,
    embedding scale). Without it only the shapes change (a skeleton whose weights are loaded next)."""
    size = layout.size
    keep_mask = torch.ones(size, dtype=torch.bool)
    keep_mask[index] = False
    keep = keep_mask.nonzero().flatten()
    new = int(keep.numel())
    ratio = math.sqrt(size / new)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(e) for e in layout.scaled_embeddings if output is not None and e.weight is output.weight}
    with torch.no_grad():
        for param, dims, holders in param_holders(layout).values():
            kept = param
            for dim in sorted(dims):  # a pooler / transform reads and writes hidden channels
                kept = kept.index_select(dim, keep.to(param.device))
            kept = nn.Parameter(kept, requires_grad=param.requires_grad)
            for module, name in holders:
                setattr(module, name, kept)
        for norm in layout.norms if rescale else []:
            weight = norm.module.weight
            weight.copy_((weight + norm.offset) * ratio - norm.offset)
        for embedding in layout.scaled_embeddings:
            old = float(embedding.embed_scale)
            if not math.isclose(old, math.sqrt(size), rel_tol=1e-3):
                continue  # a scale that does not follow hidden_size stays as it is
            if rescale:
                embedding.weight.mul_(old / math.sqrt(new))
            embedding.embed_scale.fill_(math.sqrt(new))
            if hasattr(embedding, "scalar_embed_scale"):
                embedding.scalar_embed_scale = math.sqrt(new)
            if rescale and id(embedding) in tied:
                final = _final_norm(model, layout)
                final.module.weight.copy_((final.module.weight + final.offset) * math.sqrt(new) / old - final.offset)
    for module in {id(m): m for m, _, _ in layout.readers + layout.writers}.values():
        if isinstance(module, nn.Embedding):
            module.embedding_dim = new
        elif isinstance(module, Conv1D):
            module.nx, module.nf = module.weight.shape
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif getattr(module, "hidden_dim", None) == size:  # fused experts and their router reshape with it
            module.hidden_dim = new
    for norm in layout.norms:
        if hasattr(norm.module, "normalized_shape"):
            norm.module.normalized_shape = (new,)
    if rescale:
        _scale_epsilons(model, layout, size / new)
    model.config.hidden_size = new


def _scale_epsilons(model: nn.Module, layout: HiddenLayout, factor: float) -> None:
    """Multiply the hidden norms' epsilon by ``factor``, and the config field they come from.

    Other modules built from the same config field (Qwen3's per-head q / k norms) get the same epsilon so the model
    in memory equals the reloaded one; their output moves by the epsilon change only (relative ``eps / mean square``).
    """
    config_values = {name: getattr(model.config, name, None) for name in _EPS_CONFIG}
    config_values = {name: value for name, value in config_values.items() if isinstance(value, float)}
    hidden_norms = {id(norm.module) for norm in layout.norms}
    for module in model.modules():
        for name in _EPS_ATTRIBUTES:
            value = getattr(module, name, None)
            if not isinstance(value, float) or isinstance(module, nn.Embedding):
                continue
            if id(module) in hidden_norms or any(math.isclose(value, v) for v in config_values.values()):
                setattr(module, name, value * factor)
    for name, value in config_values.items():
        setattr(model.config, name, value * factor)


def express_heads(model: nn.Module) -> None:
    """Where head width is ``hidden_size / num_heads``, write uniform head counts that match the new hidden size."""
    family = get_family(model)
    if family.config_head_dim:
        return
    shapes = {(entry["num_heads"], entry["num_kv_heads"], entry["head_dim"]) for entry in layer_structure(model)}
    if len(shapes) == 1:
        heads, kv_heads, dim = shapes.pop()
        if heads == kv_heads and heads * dim == model.config.hidden_size:
            model.config.num_attention_heads = heads
