"""Unit selection (`ranking.select_units` / `removes_more`): lowest scores go, per layer or globally, never revived."""

import torch

from hf_compress.pruning.importance import normalize_per_layer
from hf_compress.pruning.ranking import removes_more, select_units
from hf_compress.pruning.schedules import units_to_remove


def test_select_units_local_and_min_keep():
    scores = {0: torch.tensor([3.0, 1.0, 2.0, 4.0]), 1: torch.tensor([1.0, 2.0, 3.0, 4.0])}
    keep = {0: torch.ones(4, dtype=torch.bool), 1: torch.ones(4, dtype=torch.bool)}
    new = select_units(scores, keep, 0.5, "local")
    assert new[0].tolist() == [True, False, False, True] and new[1].tolist() == [False, False, True, True]
    new = select_units(scores, keep, 0.9, "local", min_keep=2)
    assert [int(m.sum()) for m in new.values()] == [2, 2]


def test_select_units_global_uses_normalised_scores():
    scores = {0: torch.tensor([10.0, 10.0, 10.0, 1.0]), 1: torch.tensor([0.1, 0.2, 0.3, 0.4])}
    keep = {0: torch.ones(4, dtype=torch.bool), 1: torch.ones(4, dtype=torch.bool)}
    new = select_units(scores, keep, 0.25, "global")
    assert new[0].tolist() == [True, True, True, False] and new[1].tolist() == [False, True, True, True]


def test_select_units_never_revives():
    scores = {0: torch.tensor([0.1, 5.0, 1.0, 2.0])}
    keep = {0: torch.tensor([True, False, True, True])}  # unit 1 was removed although it now scores high
    new = select_units(scores, keep, 0.5, "global")
    assert new[0].tolist() == [False, False, True, True]
    assert select_units(scores, keep, 0.0, "global")[0].tolist() == keep[0].tolist()


def _walk_select(scores, keep, sparsity, scope="global", min_keep=1):
    """The reference definition of `select_units`: walk the units from the lowest score up, one at a time."""
    layers = sorted(scores)
    if scope == "global":
        scores = normalize_per_layer(scores)
    groups = [layers] if scope == "global" else [[layer] for layer in layers]
    new = {layer: keep[layer].clone() for layer in layers}
    for group in groups:
        flat = torch.cat([torch.where(keep[lay], scores[lay].float(), -torch.inf) for lay in group])
        owner = [(lay, unit) for lay in group for unit in range(len(scores[lay]))]
        removed = int((flat == -torch.inf).sum())
        target = max(units_to_remove(sparsity, flat.numel()), removed)
        kept = {lay: int(keep[lay].sum()) for lay in group}
        for i in torch.sort(flat, stable=True).indices.tolist():
            layer, unit = owner[i]
            if removed >= target:
                break
            if not new[layer][unit] or kept[layer] <= min_keep:
                continue
            new[layer][unit] = False
            kept[layer] -= 1
            removed += 1
    return new


def test_select_units_equals_the_unit_by_unit_walk():
    g = torch.Generator().manual_seed(0)
    for case in range(200):
        sizes = torch.randint(1, 9, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        scores = {i: torch.randint(0, 4, (n,), generator=g).float() for i, n in enumerate(sizes)}  # many ties
        keep = {i: torch.rand(n, generator=g) > 0.3 for i, n in enumerate(sizes)}
        sparsity = float(torch.rand(1, generator=g)) * 0.95
        scope = "global" if case % 2 else "local"
        min_keep = int(torch.randint(0, 3, (1,), generator=g))
        got = select_units(scores, keep, sparsity, scope, min_keep)
        expected = _walk_select(scores, keep, sparsity, scope, min_keep)
        assert all(torch.equal(got[k], expected[k]) for k in expected), (case, scores, keep, sparsity, scope)


def test_removes_more():
    keep = {0: torch.tensor([True, False, True, True]), 1: torch.ones(4, dtype=torch.bool)}
    assert not removes_more(keep, 0.125, "global") and removes_more(keep, 0.25, "global")
    assert removes_more(keep, 0.125, "local")  # layer 1 has nothing removed yet
