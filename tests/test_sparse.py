"""Host-side patterns: representation round trips, conversions, random patterns."""

import numpy as np
import pytest

from ipu_sparse_ops import sparse


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("data_type", ["fp32", "fp16"])
def test_representation_round_trip_is_exact(block_size, data_type):
    rng = np.random.default_rng(block_size)
    total = (64 // block_size) * (128 // block_size)
    capacity = min(40, total)
    spec = sparse.MatmulSpec(64, 128, max_non_zero_blocks=capacity, block_size=block_size,
                             data_type=data_type)
    count = min(30, total - 2)
    triplets = sparse.random_triplets(spec, count, rng)
    rep = sparse.representation_from_triplets(spec, triplets)
    assert rep.metainfo.dtype == np.int32 and rep.metainfo.shape == (spec.metainfo_size,)
    assert rep.nz_values.shape == (capacity, block_size, block_size) and rep.nz_values.dtype == spec.dtype
    back = sparse.triplets_from_representation(spec, rep)
    # Same set of (row, col) -> value, compared position by position after sorting.
    order_in = np.lexsort((triplets.row_indices, triplets.col_indices))
    np.testing.assert_array_equal(back.row_indices, triplets.row_indices[order_in])
    np.testing.assert_array_equal(back.col_indices, triplets.col_indices[order_in])
    np.testing.assert_array_equal(back.values, triplets.values[order_in])
    again = sparse.representation_from_triplets(spec, back)
    np.testing.assert_array_equal(again.metainfo, rep.metainfo)
    np.testing.assert_array_equal(again.nz_values, rep.nz_values)


def test_metainfo_layout_is_block_csc():
    spec = sparse.MatmulSpec(4, 3, max_non_zero_blocks=6)
    triplets = sparse.Triplets(np.array([3, 0, 1, 2]), np.array([2, 0, 2, 0]),
                               np.array([1.0, 2.0, 3.0, 4.0], np.float32))
    rep = sparse.representation_from_triplets(spec, triplets)
    # col_offsets [0, 2, 2, 4], rows by column (0, 2 | - | 1, 3), then 2 padding slots.
    np.testing.assert_array_equal(rep.metainfo, [0, 2, 2, 4, 0, 2, 1, 3, 0, 0])
    np.testing.assert_array_equal(rep.nz_values.reshape(-1), [2, 4, 3, 1, 0, 0])


@pytest.mark.parametrize("rows,cols,message", [
    ([0, 0], [1, 1], "duplicate"),
    ([4], [0], "outside"),
    ([0], [-1], "outside"),
    ([0, 1, 2, 3, 0, 1, 2], [0, 0, 0, 0, 1, 1, 1], "exceed the capacity"),
])
def test_bad_triplets_are_rejected(rows, cols, message):
    spec = sparse.MatmulSpec(4, 3, max_non_zero_blocks=6)
    triplets = sparse.Triplets(np.array(rows), np.array(cols), np.ones(len(rows), np.float32))
    with pytest.raises(ValueError, match=message):
        sparse.representation_from_triplets(spec, triplets)


def test_malformed_metainfo_is_rejected_on_the_host():
    spec = sparse.MatmulSpec(4, 3, max_non_zero_blocks=6)
    metainfo = np.array([0, 2, 2, 4, 0, 9, 1, 3, 0, 0], np.int32)
    with pytest.raises(ValueError, match="outside"):
        sparse.triplets_from_representation(
            spec, sparse.Representation(metainfo, np.zeros((6, 1, 1), np.float32)))


@pytest.mark.parametrize("block_size", [1, 8])
def test_dense_triplets_mask_conversions(block_size):
    rng = np.random.default_rng(0)
    spec = sparse.MatmulSpec(32, 16, max_non_zero_blocks=8, block_size=block_size)
    triplets = sparse.random_triplets(spec, 5 if block_size == 8 else 40, rng)
    dense = sparse.dense_from_triplets(spec, triplets)
    bs = block_size
    expected = np.zeros((32, 16), np.float32)
    for r, c, v in zip(triplets.row_indices, triplets.col_indices, triplets.values):
        expected[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = np.reshape(v, (bs, bs))
    np.testing.assert_array_equal(dense, expected)
    back = sparse.triplets_from_dense(spec, dense)
    np.testing.assert_array_equal(sparse.dense_from_triplets(spec, back), dense)
    mask = sparse.mask_from_triplets(spec, triplets)
    assert mask.sum() == len(triplets.row_indices)
    assert mask[triplets.row_indices, triplets.col_indices].all()
    from_mask = sparse.triplets_from_mask(spec, mask, dense)
    np.testing.assert_array_equal(sparse.dense_from_triplets(spec, from_mask), dense)


def test_random_indices_are_disjoint_and_avoid_exclusions():
    rng = np.random.default_rng(1)
    excluded = np.zeros((10, 10), bool)
    excluded[:5] = True
    rows, cols = sparse.disjoint_random_indices(10, 10, 50, rng, excluded)
    assert len(set(zip(rows, cols))) == 50
    assert np.all(rows >= 5)
    with pytest.raises(ValueError, match="cannot draw 51"):
        sparse.disjoint_random_indices(10, 10, 51, rng, excluded)


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_size=18, output_size=16, max_non_zero_blocks=4, block_size=4), "input_size=18"),
    (dict(input_size=16, output_size=16, max_non_zero_blocks=4, block_size=3), "block_size"),
    (dict(input_size=4, output_size=4, max_non_zero_blocks=17), "max_non_zero_blocks"),
    (dict(input_size=4, output_size=4, max_non_zero_blocks=2, data_type="fp64"), "data_type"),
    (dict(input_size=4, output_size=4, max_non_zero_blocks=2, pooling_type="MIN"), "pooling_type"),
])
def test_bad_specs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparse.MatmulSpec(**kwargs)


def test_capacity_for_density():
    assert sparse.capacity_for_density(10, 10, 0.1) == (10, 10)
    assert sparse.capacity_for_density(10, 10, 0.1, 0.25) == (10, 13)
    assert sparse.capacity_for_density(10, 10, 1.0, 0.5) == (100, 100)
    with pytest.raises(ValueError):
        sparse.capacity_for_density(10, 10, 0.0)


@pytest.mark.parametrize("size, density", [(64, 0.05), (64, 0.3), (200, 0.1), (8, 1.0)])
def test_givens_orthogonal_is_orthogonal_and_dense_enough(size, density):
    q = sparse.givens_orthogonal(size, density, np.random.default_rng(size))
    np.testing.assert_allclose(q.T @ q, np.eye(size), atol=1e-7)
    np.testing.assert_allclose(q @ q.T, np.eye(size), atol=1e-7)
    non_zeros = np.count_nonzero(q)
    assert non_zeros >= np.ceil(density * size * size)
    # Rotations stop once dense enough: each one adds at most 2 x size non-zeros.
    assert non_zeros < max(size, np.ceil(density * size * size)) + 2 * size
    assert not np.any((q != 0) & (np.abs(q) <= 1e-8))


@pytest.mark.parametrize("block_size", [1, 4])
def test_random_glorot_triplets_are_seeded_and_span_the_widened_glorot_range(block_size):
    spec = sparse.MatmulSpec(64, 32, 60, block_size)
    density = 0.4 if block_size == 4 else 0.02
    a, b, c = (sparse.random_glorot_triplets(spec, density, seed=seed) for seed in (7, 7, 8))
    total = spec.input_blocks * spec.output_blocks
    assert len(a.values) == round(density * total)
    positions = [set(zip(t.row_indices, t.col_indices)) for t in (a, b, c)]
    assert positions[0] == positions[1] != positions[2]
    np.testing.assert_array_equal(a.values, b.values)
    limit = np.sqrt(6.0 / ((64 + 32) * len(a.values) / total))
    assert np.abs(a.values).max() <= limit
    assert np.abs(a.values).max() > 0.8 * limit  # the whole range, not a narrower one
    assert len(sparse.random_glorot_triplets(spec, count=9, seed=7).values) == 9
    with pytest.raises(ValueError, match="capacity"):
        sparse.random_glorot_triplets(spec, count=61)
    with pytest.raises(ValueError, match="exactly one"):
        sparse.random_glorot_triplets(spec, 0.1, count=3)


def test_in_slot_order_sorts_by_column_then_row():
    triplets = sparse.Triplets(np.array([2, 0, 1, 0]), np.array([1, 1, 0, 0]),
                               np.array([1.0, 2.0, 3.0, 4.0]))
    ordered, perm = sparse.in_slot_order(triplets)
    assert list(zip(ordered.row_indices, ordered.col_indices)) == [(0, 0), (1, 0), (0, 1), (2, 1)]
    np.testing.assert_array_equal(ordered.values, [4.0, 3.0, 2.0, 1.0])
    np.testing.assert_array_equal(np.asarray(triplets.values)[perm], ordered.values)

