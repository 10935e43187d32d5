"""Raw FSDP2 on CPU processes (gloo): sharded scores, masks, a training step, final surgery and a sharded teacher,
each compared with the same computation on an unsharded copy. Launched by tests/pruning/test_sharded.py:

    torchrun --nproc_per_node 2 tests/scripts/sharded_script.py --output_dir out

Writes `<output_dir>/rank<r>.json` with the checks of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_compress.models.families import get_layers  # noqa: E402
from hf_compress.pruning.importance import unit_layout, unit_scores  # noqa: E402
from hf_compress.pruning.masks import PruningMasks, mask_weights  # noqa: E402
from hf_compress.pruning.ranking import select_units  # noqa: E402
from hf_compress.pruning.sharded import (  # noqa: E402
    full_state_dict,
    gathered,
    is_sharded,
    mask_sharded,
    remove_masked,
    shard_teacher,
    sharded_unit_scores,
)
from tests.tiny_models import tiny_inputs, tiny_model  # noqa: E402

TARGETS = ["heads", "ffn_neurons"]


def choose(model, scores: dict[str, dict[int, torch.Tensor]]) -> PruningMasks:
    """Half the FFN neurons and half the head groups (GQA: a group is the query heads of one KV head)."""
    masks = PruningMasks.full(model, TARGETS)
    masks.ffn_neurons = select_units(scores["ffn_neurons"], masks.ffn_neurons, 0.5, "global")
    layout = unit_layout(model, "heads")
    groups = {i: keep.view(layout[i][0], -1).all(1) for i, keep in masks.heads.items()}
    size = masks.heads[0].numel() // layout[0][0]
    new = select_units(scores["heads"], groups, 0.5, "local")
    masks.heads = {i: keep.repeat_interleave(size) for i, keep in new.items()}
    return masks


def sgd_step(model, batch) -> float:
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
            p.grad = None
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    cli = parser.parse_args()
    device = cli.device
    mesh = init_device_mesh(device, (int(os.environ["WORLD_SIZE"]),))
    rank = dist.get_rank()
    # The same batch on every rank: FSDP's averaged gradient is the plain one.
    batch = {k: v.to(device) for k, v in tiny_inputs(4, 8, seed=3).items()}
    checks: dict[str, float | bool | int] = {}

    # Unsharded reference.
    reference = tiny_model("llama", "causal_lm", seed=0).to(device).train()
    ref_scores = {t: unit_scores(reference, t, "magnitude") for t in TARGETS}
    ref_masks = choose(reference, ref_scores)
    mask_weights(reference, ref_masks)
    ref_loss = sgd_step(reference, batch)
    mask_weights(reference, ref_masks)

    # Sharded student: one FSDP2 unit per layer plus the root.
    student = tiny_model("llama", "causal_lm", seed=0).to(device).train()
    for layer in get_layers(student):
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    checks["sharded"] = is_sharded(student)
    scores = {t: sharded_unit_scores(student, t) for t in TARGETS}
    checks["scores_max_diff"] = max(
        float((scores[t][i] - ref_scores[t][i]).abs().max()) for t in TARGETS for i in scores[t]
    )
    masks = choose(student, scores)
    checks["masks_equal"] = masks.equals(ref_masks)
    checks["masked_params"] = mask_sharded(student, masks)
    loss = sgd_step(student, batch)
    mask_sharded(student, masks)
    checks["loss_diff"] = abs(loss - ref_loss)
    q = get_layers(student)[0].self_attn.q_proj.weight
    checks["local_rows"], checks["full_rows"] = q.to_local().shape[0], q.shape[0]
    ref_params = dict(reference.named_parameters())
    checks["weights_max_diff"] = max(
        float((p.detach().full_tensor() - ref_params[n].detach()).abs().max()) for n, p in student.named_parameters()
    )
    with gathered(student):
        checks["gathered_plain"] = not any(isinstance(p, DTensor) for p in student.parameters())

    # Final surgery on the gathered state dict, on the main process.
    state = full_state_dict(student)
    if rank == 0:
        pruned = tiny_model("llama", "causal_lm", seed=5)
        pruned.load_state_dict(state)
        pruned = pruned.to(device)
        removed = remove_masked(pruned, masks, TARGETS)
        remove_masked(reference, ref_masks, TARGETS)
        ref_state = reference.state_dict()
        checks["surgery_keys_equal"] = set(ref_state) == set(pruned.state_dict())
        checks["surgery_max_diff"] = max(float((v - ref_state[k]).abs().max()) for k, v in pruned.state_dict().items())
        full_size = sum(p.numel() for p in tiny_model("llama", "causal_lm").parameters())
        checks["pruned_fraction"] = sum(p.numel() for p in pruned.parameters()) / full_size
        checks["removed_heads_layer0"] = len(removed["heads"].get(0, []))
        with torch.no_grad():
            diff = pruned(**batch).logits - reference(**batch).logits
        checks["pruned_logits_diff"] = float(diff.abs().max())

    # Sharded teacher: same logits, half the parameters on each rank.
    teacher_ref = tiny_model("llama", "causal_lm", seed=1, hidden_size=32).to(device)
    teacher = shard_teacher(tiny_model("llama", "causal_lm", seed=1, hidden_size=32).to(device), mesh)
    with torch.no_grad():
        checks["teacher_logits_diff"] = float((teacher(**batch).logits - teacher_ref(**batch).logits).abs().max())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in teacher.parameters())
    checks["teacher_local_fraction"] = local / sum(p.numel() for p in teacher_ref.parameters())
    checks["teacher_frozen"] = not any(p.requires_grad for p in teacher.parameters()) and not teacher.training

    with open(os.path.join(cli.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(checks, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
