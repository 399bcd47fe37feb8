"""Tests for ipu_sparse_ops/layers.py: every output is checked against a numpy dense
reference built from the triplets, independently of the op's representation."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ipu_sparse_ops import layers
from ipu_sparse_ops.sparse import MatmulSpec, Triplets
from ipu_sparse_ops.sparse_training import prune_and_regrow


def dense_reference(spec, triplets):
    """W [in, out] in float64, built block by block from the triplets."""
    bs = spec.block_size
    w = np.zeros((spec.input_size, spec.output_size))
    values = np.asarray(triplets.values, dtype=np.float64).reshape(-1, bs, bs)
    for r, c, block in zip(triplets.row_indices, triplets.col_indices, values):
        w[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = block
    return w


def random_pattern(spec, count, rng):
    flat = rng.choice(spec.input_blocks * spec.output_blocks, size=count, replace=False)
    rows, cols = np.divmod(flat, spec.output_blocks)
    bs = spec.block_size
    shape = (count,) if bs == 1 else (count, bs, bs)
    return Triplets(rows, cols, rng.standard_normal(shape).astype(spec.dtype))


def as_set(triplets):
    bs = np.asarray(triplets.values).reshape(len(triplets.row_indices), -1)
    return {(int(r), int(c)): tuple(v) for r, c, v in
            zip(triplets.row_indices, triplets.col_indices, bs)}


@pytest.mark.parametrize("block_size, data_type, use_bias, relu", [
    (1, "fp32", False, False),
    (1, "fp32", True, True),
    (4, "fp32", True, False),
    (8, "fp16", True, True),
])
def test_forward_matches_numpy(block_size, data_type, use_bias, relu):
    rng = np.random.default_rng(1)
    spec = MatmulSpec(48, 40, 30, block_size, data_type)
    triplets = random_pattern(spec, 23 if block_size == 1 else 11, rng)
    layer = layers.SparseFcLayer(spec, triplets, use_bias=use_bias, relu=relu)
    if use_bias:
        layer.bias.assign(rng.standard_normal(40).astype(spec.dtype))
    x = rng.standard_normal((7, 48)).astype(spec.dtype)
    expected = x.astype(np.float64) @ dense_reference(spec, triplets)
    if use_bias:
        expected += layer.bias.numpy().astype(np.float64)
    if relu:
        expected = np.maximum(expected, 0.0)
    actual = layer(x).numpy()
    assert actual.dtype == spec.dtype
    tol = 1e-5 if data_type == "fp32" else 2e-2
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * 4)
    np.testing.assert_allclose(layer.get_dense(), dense_reference(spec, triplets), rtol=0,
                               atol=0)


def test_get_triplets_returns_the_pattern_in_slot_order():
    rng = np.random.default_rng(2)
    spec = MatmulSpec(20, 12, 40, 1)
    triplets = random_pattern(spec, 31, rng)
    layer = layers.SparseFcLayer(spec, triplets)
    got = layer.get_triplets()
    assert as_set(got) == as_set(triplets)
    assert layer.nnz == 31
    # Slot order: by column, then row.
    np.testing.assert_array_equal(np.lexsort((got.row_indices, got.col_indices)), np.arange(31))
    np.testing.assert_array_equal(layer.nz_values.numpy()[:31, 0, 0], got.values)
    np.testing.assert_array_equal(layer.nz_values.numpy()[31:], 0)


def test_variables_and_keras_tracking():
    spec = MatmulSpec(16, 8, 20, 1)
    layer = layers.SparseFcLayer.from_random(spec, 0.1, seed=3, use_bias=True)
    assert isinstance(layer.nz_values, tf.Variable) and isinstance(layer.metainfo, tf.Variable)
    assert layer.metainfo.dtype == tf.int32 and not layer.metainfo.trainable
    assert layer.nz_values.trainable and not layer.dense_grad_anchor.trainable
    assert tuple(layer.dense_grad_anchor.shape) == spec.dense_grad_shape
    assert tuple(layer.nz_values.shape) == (20, 1, 1)
    assert {w.path.split("/")[-1] for w in layer.trainable_weights} == {"nz_values", "bias"}
    assert {w.path.split("/")[-1] for w in layer.non_trainable_weights} == {
        "metainfo", "dense_grad_anchor"}
    model = keras.Sequential([keras.Input((16,)), layer])
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(), layer(x).numpy())


@pytest.mark.parametrize("block_size", [1, 4])
def test_from_random_is_seeded_glorot(block_size):
    spec = MatmulSpec(64, 32, 60, block_size)
    density = 0.4 if block_size == 4 else 0.02
    a = layers.SparseFcLayer.from_random(spec, density, seed=7)
    b = layers.SparseFcLayer.from_random(spec, density, seed=7)
    c = layers.SparseFcLayer.from_random(spec, density, seed=8)
    total = spec.input_blocks * spec.output_blocks
    assert a.nnz == round(density * total)
    ta, tb, tc = a.get_triplets(), b.get_triplets(), c.get_triplets()
    assert as_set(ta) == as_set(tb)
    assert as_set(ta) != as_set(tc)
    limit = math.sqrt(6.0 / ((64 + 32) * a.nnz / total))
    values = np.abs(ta.values)
    assert values.max() <= limit
    assert values.max() > 0.8 * limit  # spread over the whole range, not a narrower one
    counted = layers.SparseFcLayer.from_random(spec, count=9, seed=7)
    assert counted.nnz == 9


def test_from_random_rejects_bad_sizes():
    spec = MatmulSpec(16, 8, 10, 1)
    with pytest.raises(ValueError, match="capacity"):
        layers.SparseFcLayer.from_random(spec, count=11)
    with pytest.raises(ValueError, match="exactly one"):
        layers.SparseFcLayer.from_random(spec, 0.1, count=3)
    with pytest.raises(ValueError, match="density"):
        layers.SparseFcLayer.from_random(spec, 0.0)


def test_one_trace_across_100_pattern_pushes():
    rng = np.random.default_rng(4)
    spec = MatmulSpec(24, 16, 50, 1)
    layer = layers.SparseFcLayer(spec, random_pattern(spec, 50, rng), use_bias=True)
    x = tf.constant(rng.standard_normal((5, 24)).astype(np.float32))

    @tf.function
    def forward(x):
        return layer(x)

    for _ in range(100):
        triplets = random_pattern(spec, int(rng.integers(1, 51)), rng)  # counts vary
        layer.push_triplets(triplets)
        expected = x.numpy().astype(np.float64) @ dense_reference(spec, triplets)
        np.testing.assert_allclose(forward(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert forward.experimental_get_tracing_count() == 1


def test_push_triplets_maps_slots_to_their_previous_slot():
    rng = np.random.default_rng(5)
    spec = MatmulSpec(30, 20, 80, 1)
    layer = layers.SparseFcLayer(spec, random_pattern(spec, 70, rng))
    old = layer.get_triplets()
    new, kept_from = prune_and_regrow(old, 25, "random", shape=(30, 20), rng=rng)
    slot_kept_from = layer.push_triplets(new, kept_from)
    current = layer.get_triplets()
    assert slot_kept_from.shape == (80,)
    assert np.all(slot_kept_from[70:] == -1)  # padding
    assert np.count_nonzero(slot_kept_from >= 0) == 45
    for slot, previous in enumerate(slot_kept_from[:70]):
        position = (current.row_indices[slot], current.col_indices[slot])
        if previous >= 0:
            assert position == (old.row_indices[previous], old.col_indices[previous])
            assert current.values[slot] == old.values[previous]
        else:
            assert current.values[slot] == 0
            assert not np.any((old.row_indices == position[0]) & (old.col_indices == position[1]))


def test_push_triplets_rejects_bad_input():
    spec = MatmulSpec(8, 8, 4, 1)
    layer = layers.SparseFcLayer.from_random(spec, count=4, seed=0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        layer.push_triplets(random_pattern(spec, 5, rng))  # over capacity
    with pytest.raises(ValueError, match="kept_from"):
        layer.push_triplets(random_pattern(spec, 3, rng), kept_from=np.array([0, 1]))


@pytest.mark.parametrize("pooling, block_size", [("NONE", 1), ("SUM", 4), ("MAX", 4),
                                                 ("AVG", 2 * 2)])
def test_dense_gradient_through_the_anchor(pooling, block_size):
    rng = np.random.default_rng(6)
    spec = MatmulSpec(16, 8, 6, block_size, pooling_type=pooling)
    layer = layers.SparseFcLayer(spec, random_pattern(spec, 5 if block_size > 1 else 6, rng))
    x = tf.constant(rng.standard_normal((3, 16)).astype(np.float32))
    target = rng.standard_normal((3, 8)).astype(np.float32)

    @tf.function
    def grads(flag):
        with tf.GradientTape() as tape:
            tape.watch(layer.dense_grad_anchor)
            loss = 0.5 * tf.reduce_sum(tf.square(layer(x, compute_dense_grad=flag) - target))
        return tape.gradient(loss, [layer.nz_values, layer.dense_grad_anchor])

    w = dense_reference(spec, layer.get_triplets())
    dy = x.numpy().astype(np.float64) @ w - target
    full = x.numpy().astype(np.float64).T @ dy
    bs = block_size
    pooled = np.abs(full).reshape(16 // bs, bs, 8 // bs, bs)
    expected = {"NONE": full, "SUM": pooled.sum((1, 3)), "MAX": pooled.max((1, 3)),
                "AVG": pooled.mean((1, 3))}[pooling]
    _, dense = grads(tf.constant(True))
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-4, atol=1e-4)
    _, dense = grads(tf.constant(False))
    np.testing.assert_array_equal(dense.numpy(), 0)
    assert grads.experimental_get_tracing_count() == 1


def test_dense_layer_matches_numpy_and_has_the_same_interface():
    spec = MatmulSpec(12, 6, 72, 1)
    layer = layers.DenseFcLayer.from_random(spec, seed=1, use_bias=True, relu=True)
    layer.bias.assign(np.linspace(-1, 1, 6, dtype=np.float32))
    x = np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32)
    kernel = layer.kernel.numpy().astype(np.float64)
    expected = np.maximum(x @ kernel + layer.bias.numpy(), 0.0)
    np.testing.assert_allclose(layer(x, compute_dense_grad=True).numpy(), expected, rtol=1e-5,
                               atol=1e-6)
    limit = math.sqrt(6.0 / (12 + 6))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.8 * limit
    triplets = layer.get_triplets()
    assert len(triplets.values) == 72 and layer.nnz == 72 and layer.density == 1.0
    np.testing.assert_array_equal(dense_reference(spec, triplets), kernel)
    assert layer.dense_grad_anchor is layer.kernel
    with pytest.raises(ValueError, match="density 1"):
        layers.DenseFcLayer.from_random(spec, 0.5)


def test_make_fc_layer_picks_the_layer_by_density():
    spec = MatmulSpec(8, 8, 64, 1)
    assert isinstance(layers.make_fc_layer(spec, 1.0, seed=0), layers.DenseFcLayer)
    assert isinstance(layers.make_fc_layer(spec, 0.5, seed=0), layers.SparseFcLayer)


def test_state_round_trip():
    spec = MatmulSpec(16, 8, 20, 1)
    a = layers.SparseFcLayer.from_random(spec, count=17, seed=1, use_bias=True)
    a.bias.assign(np.arange(8, dtype=np.float32))
    b = layers.SparseFcLayer.from_random(spec, count=12, seed=2, use_bias=True)
    b.load_state(a.state())
    assert b.nnz == 17
    assert as_set(b.get_triplets()) == as_set(a.get_triplets())
    np.testing.assert_array_equal(b.bias.numpy(), a.bias.numpy())
    with pytest.raises(ValueError, match="shape"):
        b.load_state({**a.state(), "nz_values": np.zeros((3, 1, 1), np.float32)})
