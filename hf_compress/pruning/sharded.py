"""Pruning and distillation pieces for models sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`).

The recipe for a sharded student (each step is a collective: call it on every rank):

1. [`sharded_unit_scores`]: importance scores computed on the full tensors (the parameters are all-gathered with
   `FSDPModule.unshard()` for the duration), so every rank gets the unsharded model's scores;
2. select masks from them as for an unsharded model (`ranking.select_units`: deterministic, identical on every rank);
3. [`mask_sharded`]: apply the masks to each rank's local shard (`DTensor.to_local()`), never to a full copy;
4. after training, [`full_state_dict`] gathers the weights on rank 0, which loads them into an unsharded model and
   runs [`remove_masked`] (the surgery of `PruningCallback`) before saving.

[`shard_teacher`] (from `hf_compress.distributed`, shared with `DistillationTrainer`) shards a frozen teacher over the
same mesh, so no rank holds a full teacher copy.

This is the raw FSDP2 path, tested with gloo on CPU processes. The Trainer-level paths (accelerate's FSDP plugin,
DeepSpeed ZeRO-3) are not verified yet: `PruningCallback` refuses them (see `bench/verify_sharded_gpu.py`).
Importance `"taylor"` and `"block_influence"` are not supported here (magnitude only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from hf_compress.distributed import shard_teacher
from hf_compress.models.families import unwrap
from hf_compress.pruning.hidden import prune_hidden
from hf_compress.pruning.importance import unit_layout, unit_scores
from hf_compress.pruning.masks import PruningMasks, parameter_masks
from hf_compress.pruning.surgery import drop_layers, prune_ffn_neurons, prune_heads

__all__ = [
    "full_state_dict",
    "gathered",
    "is_sharded",
    "mask_sharded",
    "remove_masked",
    "shard_teacher",
    "sharded_unit_scores",
]


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a `DTensor` (FSDP2 / tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """All-gather every FSDP2 unit of `model` for the duration: parameters are full plain tensors inside.

    Writes to the full parameters are not kept (the shards are the source of truth): use [`mask_sharded`].
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def sharded_unit_scores(model: nn.Module, target: str) -> dict[int, torch.Tensor]:
    """Magnitude scores of `target` (`"heads"` or `"ffn_neurons"`) per layer from the full tensors, on every rank.

    Heads are scored per head group (see `importance.unit_layout`), as `PruningCallback` does.
    """
    with gathered(model), torch.no_grad():
        return {layer: s.cpu() for layer, s in unit_scores(model, target, "magnitude").items()}


@torch.no_grad()
def mask_sharded(model: nn.Module, masks: PruningMasks) -> int:
    """Zero what `masks` removes in the local shard of every parameter; returns the number of parameters masked.

    The full keep-multipliers are built once on the gathered model and cut to each rank's shard with
    `distribute_tensor(..., src_data_rank=None)` (a local slice, no communication).
    """
    targets = [t for t in ("heads", "ffn_neurons") if getattr(masks, t)]
    with gathered(model):
        names = {id(p): name for name, p in unwrap(model).named_parameters()}
        layouts = {t: unit_layout(model, t) for t in targets}
        entries = parameter_masks(model, masks, layouts)
        keeps = {names[id(m.param)]: m.keep.expand(m.param.shape).clone() for m in entries}
    params = dict(unwrap(model).named_parameters())
    for name, keep in keeps.items():
        param = params[name]
        if isinstance(param, DTensor):
            local = distribute_tensor(keep, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().mul_(local.to(param.device))
        else:
            param.mul_(keep.to(param.device))
    return len(keeps)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of `model` on rank 0, on the CPU; an empty dict on the other ranks."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def remove_masked(model: nn.Module, masks: PruningMasks, targets: list[str]) -> dict:
    """Physically remove the heads, FFN neurons, layers and hidden channels that `masks` removes from an unsharded
    `model`.

    Returns what was removed, `{"heads": {layer: [...]}, "ffn_neurons": {...}, "hidden": [...], "layers": [...]}` (the
    `PruningCallback.removed` attribute). Unstructured masks stay as zeros in the dense weights.
    """
    dropped = masks.removed("layers") if "layers" in targets else []
    heads = {k: v for k, v in masks.removed("heads").items() if k not in dropped} if "heads" in targets else {}
    neurons = {}
    if "ffn_neurons" in targets:
        neurons = {k: v for k, v in masks.removed("ffn_neurons").items() if k not in dropped}
    if heads:
        prune_heads(model, heads)
    if neurons:
        prune_ffn_neurons(model, neurons)
    if dropped:
        drop_layers(model, dropped)
    hidden = masks.removed("hidden") if "hidden" in targets else []
    if hidden:  # after heads and blocks: the config then holds the head count the kept hidden size must respect
        prune_hidden(model, hidden, verify=False)  # no copy at the end of training; tests cover the families
    return {"heads": heads, "ffn_neurons": neurons, "hidden": hidden, "layers": dropped}
