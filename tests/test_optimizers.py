"""Tests for ipu_sparse_ops/optimizers.py: updates against numpy written out by hand,
option parsing, and slots that follow a changing sparsity pattern."""

import numpy as np
import pytest
import tensorflow as tf

from ipu_sparse_ops import layers, optimizers
from ipu_sparse_ops.sparse import MatmulSpec
from ipu_sparse_ops.sparse_training import prune_and_regrow

W0 = np.array([0.5, -1.0, 2.0, 0.0], dtype=np.float32)
G1 = np.array([0.1, -0.2, 0.3, 4.0], dtype=np.float32)
G2 = np.array([-0.3, 0.0, 0.5, -1.0], dtype=np.float32)
LR = 0.1


def run_steps(optimizer, grads, lrs=None):
    var = tf.Variable(W0)
    for i, g in enumerate(grads):
        lr = None if lrs is None else lrs[i]
        optimizer.apply_gradients([(tf.constant(g), var)], learning_rate=lr)
    return var


def test_gradient_descent_one_step():
    var = run_steps(optimizers.GradientDescent(LR), [G1])
    np.testing.assert_allclose(var.numpy(), W0 - LR * G1, rtol=1e-6)


@pytest.mark.parametrize("use_nesterov", [False, True])
def test_momentum_two_steps(use_nesterov):
    opt = optimizers.Momentum(LR, momentum=0.9, use_nesterov=use_nesterov)
    var = run_steps(opt, [G1, G2])
    w = W0.astype(np.float64)
    a = np.zeros(4)
    for g in (G1, G2):
        a = 0.9 * a + g
        w = w - LR * ((g + 0.9 * a) if use_nesterov else a)
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(var, "momentum").numpy(), a, rtol=1e-6)


def test_adam_two_steps():
    opt = optimizers.Adam(LR, beta1=0.8, beta2=0.99, epsilon=1e-3)
    var = run_steps(opt, [G1, G2])
    w = W0.astype(np.float64)
    m = np.zeros(4)
    v = np.zeros(4)
    for t, g in enumerate((G1, G2), start=1):
        m = 0.8 * m + 0.2 * g
        v = 0.99 * v + 0.01 * g.astype(np.float64) ** 2
        w = w - LR * np.sqrt(1 - 0.99 ** t) / (1 - 0.8 ** t) * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(var.numpy(), w, rtol=1e-5)
    np.testing.assert_allclose(opt.get_slot(var, "m").numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(opt.get_slot(var, "v").numpy(), v, rtol=1e-5)
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize("dtype, options, epsilon", [
    (np.float32, {}, 1e-8),
    # TF1's 1e-8 is 0 in float16: the zero gradient would step by 0/0 = NaN.
    (np.float16, {}, 1e-4),
    (np.float16, {"epsilon": 1e-2}, 1e-2),  # an explicit epsilon wins
])
def test_adam_epsilon_follows_the_dtype_unless_given(dtype, options, epsilon):
    opt = optimizers.make_optimizer("adam", LR, **options)
    assert opt.epsilon_for(dtype) == epsilon
    w0 = np.array([0.5, -1.0], dtype)
    # A gradient of 1e-6 in float32 tells 1e-8 from 1e-4; 0.25 in float16 tells 1e-4 from 1e-2.
    g = np.array([0.0, 1e-6 if dtype == np.float32 else 0.25], dtype)
    var = tf.Variable(w0)
    opt.apply_gradients([(tf.constant(g), var)])
    # t = 1: m = 0.1 g, v = 0.001 g^2, step size lr * sqrt(0.001) / 0.1.
    g64 = g.astype(np.float64)
    step = LR * np.sqrt(0.001) / 0.1 * 0.1 * g64 / (np.sqrt(0.001 * g64 ** 2) + epsilon)
    np.testing.assert_allclose(var.numpy(), w0 - step, rtol=2e-3)


def test_learning_rate_per_call_in_one_trace():
    opt = optimizers.Momentum(1.0, momentum=0.0)
    var = tf.Variable(W0)
    opt.build([var])

    @tf.function
    def step(lr):
        opt.apply_gradients([(tf.constant(G1), var)], learning_rate=lr)

    for lr in (0.5, 0.25, 0.125):
        step(tf.constant(lr))
    np.testing.assert_allclose(var.numpy(), W0 - 0.875 * G1, rtol=1e-6)
    assert step.experimental_get_tracing_count() == 1


def test_parse_optimizer_args():
    assert optimizers.parse_optimizer_args(["momentum=0.9", "use_nesterov=true"]) == {
        "momentum": 0.9, "use_nesterov": True}
    assert optimizers.parse_optimizer_args([" epsilon = 1e-2"]) == {"epsilon": 0.01}
    assert optimizers.parse_optimizer_args(None) == {}
    for bad, match in [("momentum", "name=<json>"), ("=1", "name=<json>"),
                       ("use_nesterov=yes", "not valid JSON"), ("momentum=", "not valid JSON")]:
        with pytest.raises(ValueError, match=match):
            optimizers.parse_optimizer_args([bad])
    with pytest.raises(ValueError, match="twice"):
        optimizers.parse_optimizer_args(["momentum=0.9", "momentum=0.8"])


def test_make_optimizer_by_name():
    opt = optimizers.make_optimizer("momentum", 0.1, momentum=0.5, use_nesterov=True)
    assert isinstance(opt, optimizers.Momentum) and opt.use_nesterov and opt.momentum == 0.5
    assert isinstance(optimizers.make_optimizer("Adam", 0.1), optimizers.Adam)
    assert isinstance(optimizers.make_optimizer("GRADIENTDESCENT", 0.1),
                      optimizers.GradientDescent)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        optimizers.make_optimizer("rmsprop", 0.1)
    with pytest.raises(ValueError, match="Adam has no option 'momentum'"):
        optimizers.make_optimizer("adam", 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum must be a number"):
        optimizers.make_optimizer("momentum", 0.1, momentum="0.9")
    with pytest.raises(ValueError, match="use_nesterov must be true or false"):
        optimizers.make_optimizer("momentum", 0.1, use_nesterov=1)
    with pytest.raises(ValueError, match="beta2"):
        optimizers.make_optimizer("adam", 0.1, beta2=1.0)
    assert optimizers.optimizer_options("adam") == ("beta1", "beta2", "epsilon")


@pytest.mark.parametrize("name", ["GradientDescent", "Momentum", "Adam"])
def test_slots_follow_the_pattern(name):
    rng = np.random.default_rng(3)
    spec = MatmulSpec(24, 16, 60, 1)
    layer = layers.SparseFcLayer.from_random(spec, count=50, seed=3)
    opt = optimizers.make_optimizer(name, 0.01)
    opt.build([layer.nz_values])  # slots made before tracing: one trace
    x = tf.constant(rng.standard_normal((8, 24)).astype(np.float32))

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x) - 1.0))
        opt.apply_gradients([(tape.gradient(loss, layer.nz_values), layer.nz_values)])

    for _ in range(3):
        train_step()
    old = layer.get_triplets()
    old_slots = {s: opt.get_slot(layer.nz_values, s).numpy() for s in opt.slot_names}
    for s in opt.slot_names:  # trained connections have history; padding has none
        assert np.count_nonzero(old_slots[s][:50]) > 40 and not old_slots[s][50:].any()

    new, kept_from = prune_and_regrow(old, 20, "random", shape=(24, 16), rng=rng)
    opt.follow_pattern(layer.nz_values, layer.push_triplets(new, kept_from))

    current = layer.get_triplets()
    old_index = {(r, c): i for i, (r, c) in enumerate(zip(old.row_indices, old.col_indices))}
    kept = set(kept_from[kept_from >= 0].tolist())
    n_kept = n_grown = 0
    for s in opt.slot_names:
        slot = opt.get_slot(layer.nz_values, s).numpy()
        assert not slot[50:].any()
        for i, position in enumerate(zip(current.row_indices, current.col_indices)):
            was = old_index.get(position)
            if was is not None and was in kept:
                assert slot[i].item() == old_slots[s][was].item(), (s, position)
                n_kept += 1
            else:
                assert slot[i].item() == 0.0, (s, position)
                n_grown += 1
    assert (n_kept, n_grown) == (30 * len(opt.slot_names), 20 * len(opt.slot_names))
    assert opt.slot_names == optimizers.OPTIMIZERS[name].slot_names
    train_step()  # still one trace after the pattern and the slots changed
    assert train_step.experimental_get_tracing_count() == 1


def test_state_round_trip():
    a = optimizers.Adam(0.1)
    var_a = tf.Variable(W0)
    a.apply_gradients([(tf.constant(G1), var_a)])
    b = optimizers.Adam(0.1)
    var_b = tf.Variable(W0)
    b.build([var_b])
    b.load_state(a.state())
    for s in ("m", "v"):
        np.testing.assert_array_equal(b.get_slot(var_b, s).numpy(), a.get_slot(var_a, s).numpy())
    assert int(b.iterations.numpy()) == 1
    with pytest.raises(ValueError, match="lacks"):
        b.load_state({"iterations": np.array(1)})
