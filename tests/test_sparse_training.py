"""Tests for the Rig-L host logic: expected values are worked out by hand or by a
brute-force reference written independently below, never taken from the code."""

import math

import numpy as np
import pytest

from ipu_sparse_ops.sparse import Triplets
from ipu_sparse_ops.sparse_training import (
    UpdateSchedule, constant_prune_count, cosine_options, cosine_prune_count, follow_pattern,
    prune, prune_and_regrow, prune_schedule, smallest)


def element_triplets():
    # 3x4 weight; connected: (0,1) (0,3) (1,0) (2,2) (2,3).
    return Triplets(np.array([0, 0, 1, 2, 2]), np.array([1, 3, 0, 2, 3]),
                    np.array([0.5, -0.1, 0.3, -0.1, 2.0], dtype=np.float32))


def assert_triplets_equal(actual, rows, cols, values):
    np.testing.assert_array_equal(actual.row_indices, rows)
    np.testing.assert_array_equal(actual.col_indices, cols)
    np.testing.assert_array_equal(actual.values, np.asarray(values, dtype=actual.values.dtype))


@pytest.mark.parametrize("k, expected_kept", [
    (0, [0, 1, 2, 3, 4]),
    (1, [0, 2, 3, 4]),  # |-0.1| ties at 1 and 3: the earlier one goes first
    (2, [0, 2, 4]),
    (3, [0, 4]),
    (5, []),
])
def test_prune_drops_smallest_magnitudes(k, expected_kept):
    np.testing.assert_array_equal(prune(element_triplets(), k), expected_kept)


def test_prune_ranks_blocks_by_sum_of_magnitudes():
    # Signed sums 0, 1, -3; max |w| 0.4, 1, 3; sums of |w| 1.6, 1, 3.
    # Only the sum of |w| prunes block 1 first and then block 0.
    blocks = np.array([[[0.4, -0.4], [0.4, -0.4]],
                       [[1.0, 0.0], [0.0, 0.0]],
                       [[-3.0, 0.0], [0.0, 0.0]]], dtype=np.float32)
    triplets = Triplets(np.array([0, 1, 1]), np.array([0, 0, 1]), blocks)
    np.testing.assert_array_equal(prune(triplets, 1), [0, 2])
    np.testing.assert_array_equal(prune(triplets, 2), [2])


def test_rigl_regrow_elementwise_skips_previously_connected():
    # The largest |grad| sit on connected positions, including (0,3) and (2,2),
    # which this update prunes: none of them may be grown.
    grad = np.array([[0.0, 9.0, -0.2, 8.0],
                     [7.0, -0.7, 0.0, 0.3],
                     [0.6, 0.05, 9.5, 1.0]], dtype=np.float32)
    new, kept_from = prune_and_regrow(element_triplets(), 2, "rigl", shape=(3, 4), grad=grad)
    assert_triplets_equal(new, [0, 1, 2, 1, 2], [1, 0, 3, 1, 0], [0.5, 0.3, 2.0, 0.0, 0.0])
    assert new.values.dtype == np.float32
    np.testing.assert_array_equal(kept_from, [0, 2, 4, -1, -1])


def test_rigl_regrow_ties_go_by_row_major_position():
    new, _ = prune_and_regrow(element_triplets(), 2, "rigl", shape=(3, 4), grad=np.ones((3, 4)))
    # The first unconnected positions in row-major order are (0,0) and (0,2).
    np.testing.assert_array_equal(new.row_indices[-2:], [0, 0])
    np.testing.assert_array_equal(new.col_indices[-2:], [0, 2])


def test_rigl_regrow_blocks_with_pooled_gradient():
    bs = 2
    blocks = np.stack([np.ones((bs, bs)), np.diag([0.1, 0.0])]).astype(np.float32)
    triplets = Triplets(np.array([0, 1]), np.array([0, 2]), blocks)
    # Pooled over 2x3 blocks: (1,2) has the largest score but was connected.
    pooled = np.array([[5.0, 1.0, 2.0],
                       [3.0, 0.5, 9.0]], dtype=np.float32)
    new, kept_from = prune_and_regrow(triplets, 1, "rigl", shape=(2, 3), grad=pooled)
    assert_triplets_equal(new, [0, 1], [0, 0], np.stack([np.ones((bs, bs)), np.zeros((bs, bs))]))
    np.testing.assert_array_equal(kept_from, [0, -1])


def reference_update(rows, cols, values, k, grad):
    """Brute force, pure Python: sort (magnitude, position) and (-|grad|, row, col)."""
    magnitude = [float(np.abs(v).sum()) for v in values]
    pruned = set(sorted(range(len(values)), key=lambda i: (magnitude[i], i))[:k])
    kept = [i for i in range(len(values)) if i not in pruned]
    connected = set(zip(rows.tolist(), cols.tolist()))
    free = [(r, c) for r in range(grad.shape[0]) for c in range(grad.shape[1])
            if (r, c) not in connected]
    grown = sorted(free, key=lambda rc: (-abs(grad[rc]), rc))[:k]
    return kept, grown


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [0, 1, 7, 299, 300])
def test_smallest_ranks_as_a_stable_sort(seed, k):
    rng = np.random.default_rng(seed)
    keys = rng.integers(-4, 5, 300).astype(np.float64)  # many ties
    if seed == 3:
        keys[rng.choice(300, 5, replace=False)] = np.nan
    expected = sorted(range(300), key=lambda i: (math.isnan(keys[i]), keys[i], i))[:k]
    np.testing.assert_array_equal(smallest(keys, k), expected)


@pytest.mark.parametrize("keys", ["random", "ties", "ascending", "descending", "equal",
                                  "sample_misleads"])
@pytest.mark.parametrize("k", [1, 500, 20_000, 49_999])
def test_smallest_of_many_keys_ranks_as_a_stable_sort(keys, k):
    """Beyond a few thousand keys the k-th is bounded from a sample first."""
    rng = np.random.default_rng(k)
    n = 50_000
    keys = {"random": rng.standard_normal(n),
            "ties": rng.integers(0, 50, n).astype(np.float32),
            "ascending": np.arange(n, dtype=np.float64),
            "descending": np.arange(n, 0, -1, dtype=np.float64),
            "equal": np.zeros(n),
            # The sampled keys (every 24th) below all others: fewer than k keys are at
            # or below the sample's bound, and the whole is partitioned.
            "sample_misleads": np.where(np.arange(n) % 24 == 0, -rng.random(n),
                                        rng.random(n))}[keys]
    np.testing.assert_array_equal(smallest(keys, k), np.argsort(keys, kind="stable")[:k])


@pytest.mark.parametrize("block_size, shape, nnz, k", [
    (1, (7, 9), 20, 8), (4, (7, 9), 20, 8), (1, (30, 40), 300, 120)])
@pytest.mark.parametrize("seed", range(5))
def test_rigl_matches_brute_force_reference(block_size, shape, nnz, k, seed):
    rng = np.random.default_rng(seed)
    flat = rng.choice(shape[0] * shape[1], nnz, replace=False)
    rows, cols = np.divmod(flat, shape[1])
    value_shape = (nnz,) if block_size == 1 else (nnz, block_size, block_size)
    # Small integers so that magnitudes and gradients tie often.
    values = rng.integers(-2, 3, value_shape).astype(np.float32)
    grad = rng.integers(-3, 4, shape).astype(np.float32)

    new, kept_from = prune_and_regrow(Triplets(rows, cols, values), k, "rigl",
                                      shape=shape, grad=grad)

    kept, grown = reference_update(rows, cols, values, k, grad)
    np.testing.assert_array_equal(kept_from, kept + [-1] * k)
    np.testing.assert_array_equal(new.row_indices, [rows[i] for i in kept] + [r for r, _ in grown])
    np.testing.assert_array_equal(new.col_indices, [cols[i] for i in kept] + [c for _, c in grown])
    np.testing.assert_array_equal(new.values[:nnz - k], values[kept])
    assert not new.values[nnz - k:].any()


def test_random_regrow_grows_zeros_on_unconnected_positions():
    rng = np.random.default_rng(0)
    shape, nnz, k = (6, 5), 10, 4
    flat = rng.choice(30, nnz, replace=False)
    rows, cols = np.divmod(flat, 5)
    values = rng.normal(size=nnz).astype(np.float32)
    triplets = Triplets(rows, cols, values)

    new, kept_from = prune_and_regrow(triplets, k, "random", shape=shape,
                                      rng=np.random.default_rng(42))

    assert len(new.values) == nnz
    old = set(zip(rows.tolist(), cols.tolist()))
    grown = list(zip(new.row_indices[-k:].tolist(), new.col_indices[-k:].tolist()))
    assert len(set(grown)) == k
    assert not old & set(grown)
    np.testing.assert_array_equal(new.values[-k:], np.zeros(k))
    kept = sorted(np.argsort(np.abs(values))[k:])  # no ties among normal samples
    np.testing.assert_array_equal(kept_from, kept + [-1] * k)
    np.testing.assert_array_equal(new.values[:-k], values[kept])

    again, _ = prune_and_regrow(triplets, k, "random", shape=shape, rng=np.random.default_rng(42))
    assert_triplets_equal(again, new.row_indices, new.col_indices, new.values)


def test_random_regrow_is_uniform_over_unconnected_positions():
    # 2x3 with (0,0) and (1,2) connected; pruning (1,2) leaves 4 candidates.
    triplets = Triplets(np.array([0, 1]), np.array([0, 2]), np.array([1.0, 0.1]))
    rng = np.random.default_rng(7)
    counts = {}
    trials = 4000
    for _ in range(trials):
        new, _ = prune_and_regrow(triplets, 1, "random", shape=(2, 3), rng=rng)
        position = (int(new.row_indices[-1]), int(new.col_indices[-1]))
        counts[position] = counts.get(position, 0) + 1
    assert set(counts) == {(0, 1), (0, 2), (1, 0), (1, 1)}
    # Each is Binomial(4000, 1/4): mean 1000, sd about 27.
    assert all(abs(n - trials / 4) < 150 for n in counts.values())


def test_zero_prune_count_keeps_the_pattern():
    triplets = element_triplets()
    new, kept_from = prune_and_regrow(triplets, 0, "rigl", shape=(3, 4), grad=np.ones((3, 4)))
    assert_triplets_equal(new, triplets.row_indices, triplets.col_indices, triplets.values)
    np.testing.assert_array_equal(kept_from, range(5))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradient_raises(bad):
    grad = np.ones((3, 4))
    grad[1, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        prune_and_regrow(element_triplets(), 1, "rigl", shape=(3, 4), grad=grad)


@pytest.mark.parametrize("kwargs", [
    dict(regrow="rigl", grad=np.ones((4, 3))),  # transposed gradient
    dict(regrow="rigl"),  # no gradient
    dict(regrow="random"),  # no generator
    dict(regrow="magnitude", grad=np.ones((3, 4))),
])
def test_bad_regrow_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        prune_and_regrow(element_triplets(), 1, shape=(3, 4), **kwargs)


@pytest.mark.parametrize("k", [-1, 6])
def test_prune_count_out_of_range_raises(k):
    with pytest.raises(ValueError, match="prune count"):
        prune_and_regrow(element_triplets(), k, "rigl", shape=(3, 4), grad=np.ones((3, 4)))


def test_prune_count_must_be_an_integer():
    with pytest.raises(TypeError):
        prune_and_regrow(element_triplets(), 1.5, "rigl", shape=(3, 4), grad=np.ones((3, 4)))


def test_too_few_unconnected_positions_raises():
    # 2x2 with 3 connected: only one free position, so 2 cannot be grown.
    triplets = Triplets(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="only 1 of the 4"):
        prune_and_regrow(triplets, 2, "rigl", shape=(2, 2), grad=np.ones((2, 2)))


def test_malformed_triplets_raise():
    duplicated = Triplets(np.array([0, 0]), np.array([1, 1]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="more than once"):
        prune_and_regrow(duplicated, 1, "rigl", shape=(3, 4), grad=np.ones((3, 4)))
    out_of_range = Triplets(np.array([3]), np.array([0]), np.array([1.0]))
    with pytest.raises(ValueError):
        prune_and_regrow(out_of_range, 1, "rigl", shape=(3, 4), grad=np.ones((3, 4)))


@pytest.mark.parametrize("value_shape", [(), (2, 2)])
def test_follow_pattern_keeps_kept_slots_and_zeros_new(value_shape):
    slot = np.stack([np.full(value_shape, v, dtype=np.float32) for v in (1, 2, 3, 4)])
    aligned = follow_pattern(slot, np.array([2, -1, 0, -1]))
    expected = np.stack([np.full(value_shape, 3.0), np.zeros(value_shape),
                         np.full(value_shape, 1.0), np.zeros(value_shape)])
    np.testing.assert_array_equal(aligned, expected)
    assert aligned.dtype == slot.dtype


def original_cosine(t, T, zero_steps, phase_delay, period):
    """The original's schedule value, written from its description: 0 before zero_steps,
    then half a raised cosine per 0.5 of period over the remaining updates."""
    if t < zero_steps:
        return 0.0
    progress = (t - zero_steps) / (T - zero_steps)
    return 0.5 * (1 + math.cos(phase_delay + 2 * math.pi * period * progress))


@pytest.mark.parametrize("t, expected", [(1, 5), (2, 3), (3, 1), (4, 0)])
def test_cosine_schedule_hand_values(t, expected):
    # Updates t = 1..4; max_prune = ceil(0.5 * 10) = 5; 5 * 0.5 * (1 + cos(t pi / 4)) is
    # 4.268, 2.5, 0.732, 0: the first update moves less than max_prune, the last nothing.
    assert cosine_prune_count(t, 4, 0.5, 10) == expected
    assert cosine_prune_count(t, 4, 0.5, 10, zero_steps=0, phase_delay=0.0, period=0.5) == expected


def test_schedules_are_not_fooled_by_rounding():
    # Integers in real arithmetic that floating point puts a hair above:
    # 0.07 * 100 = 7.000000000000001 and 4 * 0.5 * (1 + cos(2 pi / 3)) = 1.0000000000000004.
    assert constant_prune_count(0, 10, 0.07, 100) == 7
    assert cosine_prune_count(0, 10, 0.07, 100) == 7
    assert cosine_prune_count(2, 3, 1.0, 4) == 1


@pytest.mark.parametrize("t, expected", [
    (1, 0), (2, 0),  # t < zero_steps: the FIRST updates move nothing
    (3, 4),  # angle 0: the full max_prune
    (4, 4),  # 2 pi * 0.5 * 1/7 = pi/7: 4 * 0.9505 = 3.80
    (7, 2),  # 4 pi/7: 4 * 0.3887 = 1.55
    (9, 1),  # 6 pi/7: 4 * 0.0495 = 0.198
    (10, 0),  # pi: the last update moves nothing
])
def test_zero_steps_zero_the_first_updates(t, expected):
    # T=10, zero_steps=3, max_prune = ceil(0.5 * 8) = 4.
    assert cosine_prune_count(t, 10, 0.5, 8, zero_steps=3) == expected


@pytest.mark.parametrize("t, expected", [
    (1, 2),  # angle pi/4 + 2 pi / 4 = 3pi/4: 10 * 0.5 * (1 - 0.7071) = 1.46
    (2, 2),  # 5pi/4: 1.46
    (3, 9),  # 7pi/4: 10 * 0.5 * (1 + 0.7071) = 8.54
    (4, 9),  # 9pi/4, one whole cycle after pi/4: 8.54
])
def test_phase_delay_in_radians_period_in_whole_cycles(t, expected):
    # T=4, phase_delay=pi/4 (radians), period=1 (one whole cycle over the run); max_prune 10.
    assert cosine_prune_count(t, 4, 0.5, 20, phase_delay=math.pi / 4, period=1.0) == expected


def test_cosine_schedule_matches_the_closed_form_on_a_grid():
    # Away from exact integers, ceil(max_prune * schedule) as the original computes it.
    for T in (3, 7, 50):
        for zero_steps, phase_delay, period in ((0, 0.0, 0.5), (2, 0.3, 0.5), (1, 1.0, 2.0)):
            for t in range(1, T + 1):
                for ratio, nnz in ((0.3, 97), (0.5, 1000), (1.0, 13)):
                    value = math.ceil(ratio * nnz) * original_cosine(t, T, zero_steps,
                                                                     phase_delay, period)
                    if abs(value - round(value)) > 1e-6:
                        assert cosine_prune_count(t, T, ratio, nnz, zero_steps=zero_steps,
                                                  phase_delay=phase_delay,
                                                  period=period) == math.ceil(value)


def test_constant_schedule():
    assert [constant_prune_count(t, 4, 0.25, 10) for t in range(5)] == [3] * 5


@pytest.mark.parametrize("args, kwargs", [
    ((5, 4, 0.5, 10), {}),  # t > T
    ((0, 0, 0.5, 10), {}),  # T < 1
    ((0, 4, 1.5, 10), {}),
    ((0, 4, 0.5, -1), {}),
    ((1, 4, 0.5, 10), {"zero_steps": 5}),
    ((1, 4, 0.5, 10), {"zero_steps": 4}),  # zero_steps must leave an update to decay over
])
def test_schedule_arguments_are_checked(args, kwargs):
    with pytest.raises(ValueError):
        cosine_prune_count(*args, **kwargs)


def test_prune_schedule_factory():
    cosine = prune_schedule("cosine", zero_steps=3)
    assert [cosine(t, 10, 0.5, 8) for t in (1, 3, 7, 10)] == [0, 4, 2, 0]
    assert prune_schedule("constant")(1, 4, 0.25, 10) == 3
    with pytest.raises(ValueError, match="unknown prune schedule"):
        prune_schedule("linear")
    with pytest.raises(TypeError):
        prune_schedule("constant", zero_steps=2)


def test_update_schedule_steps():
    schedule = UpdateSchedule(interval=3, num_updates=2, begin_step=1)
    assert [step for step in range(12) if schedule.is_update_step(step)] == [4, 7]
    assert [schedule.update_index(4), schedule.update_index(7)] == [1, 2]
    with pytest.raises(ValueError):
        schedule.update_index(5)
    with pytest.raises(ValueError):
        UpdateSchedule(interval=0, num_updates=2)


def test_cosine_options_fill_in_the_original_defaults():
    assert cosine_options("{}") == {"zero_steps": 0, "phase_delay": 0, "period": 0.5}
    assert cosine_options('{"zero_steps": 2.0, "period": 1}') == {
        "zero_steps": 2, "phase_delay": 0, "period": 1}
    for text, message in (("{x", "not valid JSON"), ("[]", "JSON object"),
                          ('{"delay": 1}', "unknown key 'delay'"),
                          ('{"zero_steps": -1}', "whole number >= 0"),
                          ('{"period": true}', "period must be a number")):
        with pytest.raises(ValueError, match=message):
            cosine_options(text)
