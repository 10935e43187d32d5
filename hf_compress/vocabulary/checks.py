"""Checks that a pruned vocabulary still covers the text the model will see."""

from __future__ import annotations

from collections import Counter

from hf_compress.checks import check_finite


def coverage(counts: Counter, kept: set[int], special: set[int]) -> float:
    """Fraction of the non-special token occurrences in `counts` whose id is in `kept` (1.0 when there are none)."""
    total = sum(c for i, c in counts.items() if i not in special)
    return 1.0 if total == 0 else sum(c for i, c in counts.items() if i in kept and i not in special) / total


def check_corpus_keeps_tokens(counts: Counter, special: set[int], min_count: int) -> None:
    """Raise a `ValueError` when no corpus token beyond the special ones reaches `min_count` (a useless model)."""
    if not any(c >= min_count for i, c in counts.items() if i not in special):
        raise ValueError(
            f"`corpus_or_ids` keeps no token beyond the special ones at `min_count`={min_count} ({len(counts)} "
            "distinct ids seen); pass the training texts (or their input_ids) as the corpus, or lower `min_count`."
        )


def check_coverage(value: float, min_coverage: float) -> None:
    """Raise a `ValueError` when the kept vocabulary covers less than `min_coverage` of the evaluation tokens."""
    check_finite("min_coverage", min_coverage)
    if not 0 <= min_coverage <= 1:
        raise ValueError(f"`min_coverage` must be in [0, 1], got {min_coverage}.")
    if value < min_coverage:
        raise ValueError(
            f"`min_coverage` is {min_coverage} but the kept vocabulary covers only {value:.1%} of the `eval_corpus` "
            "tokens; pass a corpus that covers the task (e.g. the train split), or lower `min_coverage`."
        )
