"""The Matthews correlation of bench/glue_metrics.py (the CoLA metric) against hand-computed confusion matrices."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from glue_metrics import matthews  # noqa: E402


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ([1, 0, 1, 0], [1, 0, 1, 0], 1.0),
        ([0, 1, 0, 1], [1, 0, 1, 0], -1.0),
        ([1, 1, 1, 1], [1, 0, 1, 0], 0.0),  # constant prediction: empty column, defined as 0
        ([1, 1, 0, 0], [1, 0, 0, 0], 2 / math.sqrt(12)),  # tp 1, fp 1, tn 2, fn 0
        ([1, 0, 0, 1, 1], [1, 1, 0, 0, 1], (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2)),  # tp 2, fp 1, tn 1, fn 1
    ],
)
def test_matthews_matches_the_confusion_matrix(pred, gold, expected):
    assert matthews(torch.tensor(pred), torch.tensor(gold)) == pytest.approx(expected, abs=1e-12)
