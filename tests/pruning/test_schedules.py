"""Sparsity schedules: exact values of one-shot, linear and cubic (Zhu & Gupta), and pruning-step selection."""

import pytest

from hf_compress.pruning.schedules import is_pruning_step, kept_hidden_size, sparsity_at, units_to_remove


def test_one_shot_is_full_from_start_step():
    values = [sparsity_at(t, 0.6, "one_shot", start_step=3, end_step=10) for t in range(6)]
    assert values == [0.0, 0.0, 0.0, 0.6, 0.6, 0.6]


def test_linear_midpoint_and_end():
    assert sparsity_at(5, 0.8, "linear", start_step=0, end_step=10) == pytest.approx(0.4)
    assert sparsity_at(10, 0.8, "linear", start_step=0, end_step=10) == 0.8
    assert sparsity_at(50, 0.8, "linear", start_step=0, end_step=10) == 0.8


@pytest.mark.parametrize("step", [2, 4, 6, 8, 10, 12])
def test_cubic_matches_zhu_gupta(step):
    s_i, s_f, t0, n, dt = 0.1, 0.9, 2, 5, 2
    expected = s_f + (s_i - s_f) * (1 - (step - t0) / (n * dt)) ** 3
    got = sparsity_at(step, s_f, "cubic", start_step=t0, end_step=t0 + n * dt, frequency=dt, initial_sparsity=s_i)
    assert got == pytest.approx(expected)


def test_frequency_holds_value_between_pruning_steps():
    values = [sparsity_at(t, 0.9, "linear", start_step=0, end_step=9, frequency=3) for t in range(10)]
    assert values[0:3] == [0.0, 0.0, 0.0]
    assert values[3] == values[4] == values[5] == pytest.approx(0.3)
    assert values[9] == 0.9


@pytest.mark.parametrize("schedule", ["one_shot", "linear", "cubic"])
def test_schedules_are_monotone_and_reach_final(schedule):
    values = [sparsity_at(t, 0.7, schedule, start_step=2, end_step=20, frequency=3) for t in range(25)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[0] == 0.0 and values[-1] == 0.7


def test_cubic_prunes_faster_early_than_linear():
    assert sparsity_at(3, 0.8, "cubic", 0, 10) > sparsity_at(3, 0.8, "linear", 0, 10)


def test_pruning_steps():
    assert [s for s in range(12) if is_pruning_step(s, 2, 9, 3)] == [2, 5, 8, 9]
    assert [s for s in range(12) if is_pruning_step(s, 4, 9, 1, "one_shot")] == [4]


def test_units_to_remove_rounds_and_keeps_one():
    assert units_to_remove(0.5, 16) == 8
    assert units_to_remove(0.3, 16) == 5
    assert units_to_remove(0.99, 4) == 3
    assert units_to_remove(0.0, 4) == 0


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        sparsity_at(1, 0.5, "step")


def test_kept_hidden_size_rounds_to_the_multiple_and_only_shrinks():
    size, multiple, kept, sizes = 16, 4, None, []
    for sparsity in (0.0, 0.06, 0.12, 0.19, 0.25, 0.31, 0.9, 0.99):  # 16 .. 11 .. 2 .. 1 channels without the rule
        kept = kept_hidden_size(size, sparsity, multiple, kept)
        sizes.append(kept)
    assert sizes == [16, 16, 16, 12, 12, 12, 4, 4]
    assert kept_hidden_size(4096, 0.3, 32) == 2880 and kept_hidden_size(16, 0.3, 1) == 11
    assert kept_hidden_size(16, 0.0, 3, kept=14) == 12  # a size no longer allowed moves down, never up
    with pytest.raises(ValueError, match="`targets` left 2 hidden channels alive, fewer than the 4"):
        kept_hidden_size(16, 0.9, 4, kept=2)
