"""Width pruning of the hidden size (Minitron): remove residual-stream channels from every tensor that carries them.

Where hidden-size tensors live is *discovered*, then *verified*:

* the block projections come from the family table (:mod:`hf_compress.models.families`): q / k / v / fused qkv / up
  / gate read the residual stream (input columns), o / down write to it (output rows and bias entries);
* everything else is found by shape: ``nn.Embedding`` of width ``hidden_size`` (word, position, token type) writes,
  a norm (``*LayerNorm`` / ``*RMSNorm`` with a ``(hidden_size,)`` weight) is sliced and rescaled, any other
  ``nn.Linear`` / ``Conv1D`` reads hidden channels when ``in_features == hidden_size`` (LM head, classifier, score)
  and writes them when ``out_features == hidden_size`` (pooler, MLM transform, RoBERTa classification dense);
* a parameter with a ``hidden_size`` dimension that none of these rules covers is an error, and
  :func:`prune_hidden` checks the result against the zero-channel oracle (below) on a copy before touching the model.

Correctness definition (the oracle). Channels that carry nothing (zero in every writer: embeddings, o / down, head
transforms, norm gains and biases) can be removed without changing the function, provided the norms that see them
are rescaled:

* RMSNorm: the mean square over ``d'`` kept channels is ``d / d'`` times the mean square over ``d``, so the kept
  gains are multiplied by ``sqrt(d / d')`` (for ``(1 + weight)`` norms such as Gemma's, the gain ``1 + weight`` is).
  The epsilon added to the mean square is scaled by ``d / d'`` too (modules and the config's ``*_eps`` field), which
  makes the rule exact.
* LayerNorm: the same gain and epsilon rescaling, bias unchanged. Mean and variance both move when channels go; the
  rule is exact when the norm's input has zero mean over the kept channels (then removed zeros change only the
  variance, by ``d / d'``), and otherwise errs by a term proportional to that mean. :func:`prune_hidden`'s
  verification centres every LayerNorm input to check the slicing exactly.

Embedding scaling (Gemma multiplies token embeddings by ``sqrt(hidden_size)``): the scale is recomputed from the new
config (``sqrt(d')``) so the kept embedding rows are multiplied by ``sqrt(d / d')`` to keep the function; when the LM
head is tied to those embeddings, the final norm's gain is divided by the same factor so the logits stay put.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from hf_compress.models.families import block_module, expert_module, get_family, get_layers, locate, unwrap
from hf_compress.models.hidden_sizes import check_hidden_size
from hf_compress.pruning.checks import check_hidden_supported
from hf_compress.pruning.surgery import layer_structure, record_structure

_READERS = ("q", "k", "v", "qkv", "up", "gate")
_WRITERS = ("o", "down")
_FFN_ROLES = ("up", "gate", "down")  # a sparse (mixture-of-experts) block's are its fused experts instead
_EPS_ATTRIBUTES = ("eps", "variance_epsilon")  # norm modules' epsilon (nn.LayerNorm, Llama-style RMSNorm)
_EPS_CONFIG = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")  # the config fields they come from


@dataclass
class Norm:
    """A normalisation over the hidden channels: its module, whether it centres (LayerNorm), its gain offset."""

    module: nn.Module
    centred: bool
    offset: float  # the gain is ``offset + weight`` (1.0 for Gemma-style norms, 0.0 otherwise)


@dataclass
class HiddenLayout:
    """Every tensor of a model that carries hidden channels, as ``(module, parameter name, dim)`` entries."""

    size: int
    readers: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    writers: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    scaled_embeddings: list[nn.Embedding] = field(default_factory=list)


def hidden_size(model: nn.Module) -> int:
    """``config.hidden_size`` of ``model`` (``dim`` / ``n_embd`` through the config's attribute map)."""
    return int(unwrap(model).config.hidden_size)


def _linear_dims(module: nn.Module) -> tuple[int, int, int, int]:
    """``(in_features, out_features, input dim, output dim)`` of an ``nn.Linear`` or ``Conv1D`` weight."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], 0, 1
    return module.in_features, module.out_features, 1, 0


def _add_projection(layout: HiddenLayout, module: nn.Module, read: bool, write: bool) -> None:
    _, _, in_dim, out_dim = _linear_dims(module)
    if read:
        layout.readers.append((module, "weight", in_dim))
    if write:
        layout.writers.append((module, "weight", out_dim))
        if getattr(module, "bias", None) is not None:
            layout.writers.append((module, "bias", 0))


def _gain_offset(module: nn.Module) -> float:
    """0 for ``weight * x_hat`` norms, 1 for ``(1 + weight) * x_hat`` norms: probed with the weight set to zero."""
    if module.weight.is_meta:  # shapes only (dry-run plans): the offset changes no count
        return 0.0
    probe = torch.ones(1, module.weight.shape[0], dtype=module.weight.dtype, device=module.weight.device)
    params = {"weight": torch.zeros_like(module.weight)}
    with torch.no_grad():
        out = torch.func.functional_call(module, params, (probe,))
    return float(round(out.float().mean().item()))


def _as_norm(module: nn.Module, size: int) -> Norm | None:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (size,):
        return None
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return Norm(module, centred=True, offset=0.0)
    if name.endswith("RMSNorm"):
        return Norm(module, centred=False, offset=_gain_offset(module))
    return None


def hidden_layout(model: nn.Module) -> HiddenLayout:
    """Discover every reader, writer and norm of the hidden channels of ``model`` (see the module docstring).

    Raises a one-sentence error naming the first parameter with a ``hidden_size`` dimension that no rule covers.
    """
    inner = unwrap(model)
    check_hidden_supported(getattr(inner.config, "model_type", None), "model")
    family = get_family(inner)
    size = hidden_size(inner)
    layout = HiddenLayout(size=size)
    known: set[int] = set()
    for layer in range(len(get_layers(inner))):
        experts = expert_module(inner, layer)
        for roles, read in ((_READERS, True), (_WRITERS, False)):
            for role in roles:
                if getattr(family, role) is None or (experts is not None and role in _FFN_ROLES):
                    continue
                _add_projection(layout, block_module(inner, layer, role), read=read, write=not read)
                known.add(id(block_module(inner, layer, role)))
        if experts is not None:  # fused experts: gate_up_proj [e, 2 * ffn, hidden], down_proj [e, hidden, ffn]
            router = locate(inner, layer)[1].get_submodule(family.router)
            layout.readers += [(experts, "gate_up_proj", 2), (router, "weight", 1)]
            layout.writers.append((experts, "down_proj", 1))
            known.update((id(experts), id(router)))
    for module in inner.modules():
        if id(module) in known:
            continue
        if isinstance(module, nn.Embedding) and module.embedding_dim == size:
            layout.writers.append((module, "weight", 1))
            if hasattr(module, "embed_scale"):
                layout.scaled_embeddings.append(module)
        elif isinstance(module, (nn.Linear, Conv1D)):
            fan_in, fan_out, _, _ = _linear_dims(module)
            if fan_in == size or fan_out == size:
                _add_projection(layout, module, read=fan_in == size, write=fan_out == size)
        elif (norm := _as_norm(module, size)) is not None:
            layout.norms.append(norm)
        else:
            continue
        known.add(id(module))
    for name, param in inner.named_parameters():
        owner = inner.get_submodule(name.rpartition(".")[0]) if "." in name else inner
        if id(owner) not in known and size in param.shape:
            raise ValueError(
                f"`model` has parameter {name!r} of shape {tuple(param.shape)} with a hidden_size ({size}) dimension "
                "that hf_compress cannot place (not an embedding, norm, nn.Linear or Conv1D); hidden pruning does not "
                "support this architecture yet."
            )
    return layout


def _channel_index(channels: Sequence[int] | torch.Tensor, size: int) -> torch.Tensor:
    index = torch.as_tensor(list(channels) if not isinstance(channels, torch.Tensor) else channels, dtype=torch.long)
    index = index.flatten().unique()
    if index.numel() and (index.min() < 0 or index.max() >= size):
        raise ValueError(f"`channels` must be hidden-channel indices in [0, {size}), got {index.tolist()[:8]}.")
    if index.numel() >= size:
        raise ValueError(f"`channels` removes all {size} hidden channels; keep at least one.")
    return index


def _param_holders(layout: HiddenLayout) -> dict[int, tuple[nn.Parameter, set[int], list[tuple[nn.Module, str]]]]:
    """Unique parameters with the dims carrying hidden channels and every module holding them (tied weights once)."""
    holders: dict[int, tuple[nn.Parameter, set[int], list[tuple[nn.Module, str]]]] = {}
    entries = layout.readers + layout.writers
    entries += [(n.module, name, 0) for n in layout.norms for name in ("weight", "bias")]
    for module, name, dim in entries:
        param = getattr(module, name, None)
        if param is None:
            continue
        entry = holders.setdefault(id(param), (param, set(), []))
        entry[1].add(dim)
        if (module, name) not in entry[2]:
            entry[2].append((module, name))
    return holders


def zero_hidden_channels(model: nn.Module, channels: Sequence[int] | torch.Tensor) -> nn.Module:
    """Make ``channels`` carry nothing: zero them in every writer, and zero the norms' gains and biases there.

    This is the training-time mask of the hidden target and the premise of the zero-channel oracle. In place.
    """
    layout = hidden_layout(model)
    index = _channel_index(channels, layout.size)
    with torch.no_grad():
        for module, name, dim in layout.writers:
            param = getattr(module, name)
            param.index_fill_(dim, index.to(param.device), 0.0)
        for norm in layout.norms:
            norm.module.weight.index_fill_(0, index.to(norm.module.weight.device), -norm.offset)
            if getattr(norm.module, "bias", None) is not None:
                norm.module.bias.index_fill_(0, index.to(norm.module.bias.device), 0.0)
    return model


def hidden_carriers(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """``(parameter, dim)`` of every writer and norm parameter along which :func:`zero_hidden_channels` zeroes."""
    layout = hidden_layout(model)
    out = [(getattr(module, name), dim) for module, name, dim in layout.writers]
    for norm in layout.norms:
        out += [
            (getattr(norm.module, name), 0)
            for name in ("weight", "bias")
            if getattr(norm.module, name, None) is not None
        ]
    return out


def _final_norm(model: nn.Module, layout: HiddenLayout) -> Norm:
    norm = getattr(model.base_model, "norm", None)
    match = [n for n in layout.norms if n.module is norm]
    if not match:
        raise ValueError(
            "`model` scales its embeddings and ties them to the LM head but has no `norm` before the head to "
            "compensate; untie the embeddings (`tie_word_embeddings=False`) before hidden pruning."
        )
    return match[0]


def _apply(model: nn.Module, layout: HiddenLayout, index: torch.Tensor, rescale: bool = True) -> None:
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
        for param, dims, holders in _param_holders(layout).values():
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
    index = _channel_index(channels, size)
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
    index = _channel_index(channels, layout.size)
    if index.numel() == 0:
        return model
    check_hidden_size(inner.config, layout.size - index.numel(), layout.size)
    if verify:
        check_zero_channel_oracle(inner, index)
    _apply(inner, layout, index)
    _express_heads(inner)
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
        _apply(inner, layout, torch.arange(size, layout.size), rescale=False)
    return model


def _express_heads(model: nn.Module) -> None:
    """Where head width is ``hidden_size / num_heads``, write uniform head counts that match the new hidden size."""
    family = get_family(model)
    if family.config_head_dim:
        return
    shapes = {(entry["num_heads"], entry["num_kv_heads"], entry["head_dim"]) for entry in layer_structure(model)}
    if len(shapes) == 1:
        heads, kv_heads, dim = shapes.pop()
        if heads == kv_heads and heads * dim == model.config.hidden_size:
            model.config.num_attention_heads = heads
