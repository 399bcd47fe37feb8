"""ipu_sparse_ops.keras against numpy: the layer, Rig-L in model.fit, slots, save/load/export."""

from __future__ import annotations

import numpy as np
import pytest

import keras
from ipu_sparse_ops import sparse
from ipu_sparse_ops.keras import Momentum, RigL, SparseDense, sparse_layers, to_dense
from ipu_sparse_ops.tf_startup import tf

IN, OUT, N = 32, 24, 16


def data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, IN)).astype(np.float32),
            rng.standard_normal((N, OUT)).astype(np.float32))


def linear_loss(y_true, y_pred):
    """mean(y * c) per sample: its gradient dL/dW = x^T c / (N * OUT) does not depend on W."""
    return tf.reduce_mean(y_pred * y_true, axis=-1)


def one_layer_model(density=0.25, **kwargs):
    model = keras.Sequential([keras.Input((IN,)),
                              SparseDense(OUT, density, use_bias=False, seed=1, **kwargs)])
    return model, model.layers[0]


def mask_of(layer) -> np.ndarray:
    return sparse.mask_from_triplets(layer.spec, layer.get_triplets()).astype(bool)


def test_forward_matches_numpy_in_sequential_functional_and_subclassed_models():
    x, _ = data()
    layer = SparseDense(OUT, 0.3, activation="relu", seed=3)
    inputs = keras.Input((IN,))
    functional = keras.Model(inputs, layer(inputs))
    layer.bias.assign(np.linspace(-1, 1, OUT).astype(np.float32))
    expected = np.maximum(x.astype(np.float64) @ layer.get_dense() + layer.bias.numpy(), 0)
    np.testing.assert_allclose(functional.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)

    sequential = keras.Sequential([keras.Input((IN,)), layer])
    np.testing.assert_allclose(sequential(x), expected, rtol=1e-5, atol=1e-5)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = layer

        def call(self, x):
            return self.inner(x)
    np.testing.assert_allclose(Subclassed()(x), expected, rtol=1e-5, atol=1e-5)


def test_tokens_of_any_rank_share_the_kernel():
    layer = SparseDense(OUT, 0.3, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 5, IN)).astype(np.float32)
    y = layer(x)
    assert y.shape == (3, 5, OUT)
    expected = x.reshape(-1, IN) @ layer.get_dense() + layer.bias.numpy()
    np.testing.assert_allclose(np.reshape(y, (-1, OUT)), expected, rtol=1e-5, atol=1e-5)


def test_block_layer_holds_whole_blocks():
    layer = SparseDense(32, 0.25, block_size=8, seed=0)
    layer.build((None, 64))
    triplets = layer.get_triplets()
    assert triplets.values.shape[1:] == (8, 8)
    assert layer.nnz == len(triplets.values) == 8  # 0.25 of 8 x 4 blocks
    assert layer.real_elements() is None


def padded_layer(**kwargs):
    """28 -> 10 in 8 x 8 blocks: the op's kernel is 32 x 16, half of its blocks connected."""
    layer = SparseDense(10, 0.5, block_size=8, seed=3, **kwargs)
    layer.build((None, 28))
    layer.bias.assign(np.linspace(-1, 1, 10).astype(np.float32))
    return layer


def padding_of(layer) -> np.ndarray:
    """The values of the connected blocks that lie in the padding (rows >= 28 or cols >= 10)."""
    t = layer.get_triplets()
    rows = t.row_indices[:, None] * 8 + np.arange(8)
    cols = t.col_indices[:, None] * 8 + np.arange(8)
    return np.asarray(t.values)[(rows >= 28)[:, :, None] | (cols >= 10)[:, None, :]]


def test_sizes_off_the_block_grid_are_padded_and_match_numpy():
    layer = padded_layer()
    assert (layer.spec.input_size, layer.spec.output_size) == (32, 16)
    np.testing.assert_array_equal(layer.real_elements(), np.outer([8, 8, 8, 4], [8, 2]))
    kernel = layer.get_dense()
    assert kernel.shape == (28, 10) and np.count_nonzero(kernel)
    assert padding_of(layer).size and not padding_of(layer).any()
    x = np.random.default_rng(0).standard_normal((3, 5, 28)).astype(np.float32)
    expected = x.astype(np.float64) @ kernel + layer.bias.numpy()
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-5, atol=1e-5)
    clone = SparseDense.from_config(layer.get_config())
    clone.build((None, 28))
    assert clone.get_config() == layer.get_config()
    np.testing.assert_array_equal(clone.get_dense(), kernel)
    dense = to_dense(keras.Sequential([keras.Input((28,)), layer]))
    np.testing.assert_allclose(dense.predict(x[:, 0], verbose=0), expected[:, 0], rtol=1e-5,
                               atol=1e-5)


def test_padding_stays_zero_through_rigl_updates_and_blocks_rank_per_real_element():
    layer = padded_layer(pooling="SUM")
    model = keras.Sequential([keras.Input((28,)), layer])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    x, y = data()
    rigl_callback = RigL(1, prune_ratio=0.5, schedule="constant", total_steps=6, seed=0)
    model.fit(x[:, :28], y[:, :10], batch_size=4, epochs=1, verbose=0, callbacks=[rigl_callback])
    assert len(rigl_callback.history) == 4
    assert all(e["layers"][layer.name]["moved"] for e in rigl_callback.history)
    assert not padding_of(layer).any()
    # Per real element: a block of 16 real elements with 0.3 each outranks a whole
    # block of 0.1 each (sums 4.8 vs 6.4), and a gradient of 4 over 16 real elements
    # outranks 10 over 64.
    values = np.zeros((2, 8, 8), np.float32)
    values[0], values[1][:, :2] = 0.1, 0.3
    layer.set_triplets(sparse.Triplets(np.array([0, 0]), np.array([0, 1]), values))
    grad = np.zeros(layer.spec.dense_grad_shape, np.float32)
    grad[1, 0], grad[1, 1] = 10.0, 4.0
    ranked, scores = RigL._per_real_element(layer, layer.get_triplets(), grad)
    np.testing.assert_allclose(np.abs(ranked.values).reshape(2, -1).sum(1), [6.4, 19.2],
                               rtol=1e-6)
    np.testing.assert_allclose(scores[1], [10.0, 16.0])


def test_config_round_trips():
    layer = SparseDense(OUT, 0.2, block_size=4, activation="relu", pooling="SUM", seed=7,
                        meta_info_oversize=0.1, name="fc")
    clone = SparseDense.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone.build((None, IN))
    layer.build((None, IN))
    np.testing.assert_array_equal(clone.get_dense(), layer.get_dense())  # same seed, same layer


# ---- Rig-L and the optimizer slots, against numpy models of each optimizer -------------

LR = 0.05


def sgd(momentum, nesterov):
    def step(w, state, g, t):
        m = state.setdefault("m", np.zeros_like(w))
        m[:] = momentum * m - LR * g
        return w + (momentum * m - LR * g if nesterov else m)
    return step


def adam(weight_decay=None, b1=0.9, b2=0.999, eps=1e-7):
    def step(w, state, g, t):
        if weight_decay:
            w = w - w * weight_decay * LR
        m = state.setdefault("m", np.zeros_like(w))
        v = state.setdefault("v", np.zeros_like(w))
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        alpha = LR * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        return w - m * alpha / (np.sqrt(v) + eps)
    return step


def rmsprop(rho=0.9, eps=1e-7):
    def step(w, state, g, t):
        v = state.setdefault("v", np.zeros_like(w))
        v[:] = rho * v + (1 - rho) * g * g
        return w - LR * g / np.sqrt(v + eps)
    return step


def tf1_momentum(momentum, nesterov):
    def step(w, state, g, t):
        a = state.setdefault("m", np.zeros_like(w))
        a[:] = momentum * a + g
        return w - LR * (g + momentum * a if nesterov else a)
    return step


OPTIMIZERS = {
    "tf1-momentum": (lambda: Momentum(LR, momentum=0.9), tf1_momentum(0.9, False)),
    "tf1-nesterov": (lambda: Momentum(LR, momentum=0.9, nesterov=True), tf1_momentum(0.9, True)),
    "sgd-momentum": (lambda: keras.optimizers.SGD(LR, momentum=0.9), sgd(0.9, False)),
    "sgd-nesterov": (lambda: keras.optimizers.SGD(LR, momentum=0.9, nesterov=True), sgd(0.9, True)),
    "adam": (lambda: keras.optimizers.Adam(LR), adam()),
    "adamw": (lambda: keras.optimizers.AdamW(LR, weight_decay=0.004), adam(weight_decay=0.004)),
    "rmsprop": (lambda: keras.optimizers.RMSprop(LR), rmsprop()),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rigl_in_fit_follows_a_numpy_model_of_the_optimizer(name):
    make_optimizer, numpy_step = OPTIMIZERS[name]
    x, c = data()
    model, layer = one_layer_model()
    model.compile(make_optimizer(), linear_loss)
    w = layer.get_dense().astype(np.float64)
    mask = mask_of(layer)
    grad = x.astype(np.float64).T @ c / (N * OUT)  # dL/dW, the same at every step
    steps, update_freq, prune_ratio = 7, 3, 0.25
    state: dict = {}
    for t in range(1, steps + 1):  # the numpy model, one full-batch step at a time
        w = np.where(mask, numpy_step(w, state, np.where(mask, grad, 0), t), 0)
        for s in state.values():
            s[~mask] = 0
        if t % update_freq == 0:
            nnz = mask.sum()
            k = int(np.ceil(prune_ratio * nnz))
            connected = np.flatnonzero(mask)
            kept = connected[np.argsort(-np.abs(w.ravel()[connected]), kind="stable")[:nnz - k]]
            unconnected = np.flatnonzero(~mask)
            grown = unconnected[np.argsort(-np.abs(grad.ravel()[unconnected]), kind="stable")[:k]]
            mask = np.zeros_like(mask)
            mask.ravel()[np.concatenate([kept, grown])] = True
            w = np.where(mask, w, 0)
            w.ravel()[grown] = 0
            for s in state.values():
                s.ravel()[grown] = 0
                s[~mask] = 0
    rigl_callback = RigL(update_freq, prune_ratio=prune_ratio, schedule="constant", seed=0)
    model.fit(x, c, batch_size=N, epochs=steps, shuffle=False, verbose=0,
              callbacks=[rigl_callback])
    assert [u["step"] for u in rigl_callback.history] == [3, 6]
    np.testing.assert_array_equal(mask_of(layer), mask)
    np.testing.assert_allclose(layer.get_dense(), w, rtol=2e-4, atol=1e-6)
    slots = {v.name.rsplit("_", 1)[-1]: v for v in model.optimizer.variables
             if tuple(v.shape) == tuple(layer.nz_values.shape)}
    triplets = layer.get_triplets()
    for key, reference in state.items():
        keras_name = {"m": "momentum", "v": "velocity"}[key]
        slot = next(v for n, v in slots.items() if n == keras_name)
        as_dense = sparse.dense_from_triplets(
            layer.spec, triplets._replace(
                values=slot.numpy()[:len(triplets.values)].reshape(triplets.values.shape)))
        np.testing.assert_allclose(as_dense, reference, rtol=2e-4, atol=1e-7)


def test_steps_per_execution_takes_the_same_steps_and_never_retraces():
    x, c = data()
    runs = {}
    for per_execution in (1, 2):
        model, layer = one_layer_model()
        model.compile(keras.optimizers.Adam(LR), linear_loss, steps_per_execution=per_execution)
        data_x, data_c = np.tile(x, (4, 1)), np.tile(c, (4, 1))  # 4 steps an epoch
        callback = RigL(2, prune_ratio=0.3, seed=0)
        traces_after_first_epoch = []
        count_traces = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: epoch == 0 and traces_after_first_epoch.append(
                layer.traces))
        model.fit(data_x, data_c, batch_size=N, epochs=10, shuffle=False, verbose=0,
                  callbacks=[callback, count_traces])
        traces = traces_after_first_epoch[0]
        assert len(callback.history) == 20  # every 2 steps of 40
        assert layer.traces == traces, "a pattern update re-traced the training step"
        runs[per_execution] = (layer.get_triplets(), layer.nz_values.numpy())
    np.testing.assert_array_equal(runs[1][0].row_indices, runs[2][0].row_indices)
    np.testing.assert_array_equal(runs[1][0].col_indices, runs[2][0].col_indices)
    np.testing.assert_allclose(runs[1][1], runs[2][1], rtol=1e-5, atol=1e-7)


def test_update_freq_below_steps_per_execution_is_refused():
    x, c = data()
    model, _ = one_layer_model()
    model.compile("sgd", linear_loss, steps_per_execution=4)
    with pytest.raises(ValueError, match="below the model's steps_per_execution"):
        model.fit(x, c, epochs=1, verbose=0, callbacks=[RigL(2)])


def test_random_regrowth_is_keyed_by_seed_and_update():
    x, c = data()
    patterns = []
    for _ in range(2):
        model, layer = one_layer_model()
        model.compile("sgd", linear_loss)
        model.fit(x, c, batch_size=N, epochs=4, verbose=0, shuffle=False,
                  callbacks=[RigL(1, regrow="random", seed=5)])
        patterns.append(mask_of(layer))
    np.testing.assert_array_equal(*patterns)


def test_block_rigl_grows_the_blocks_of_largest_pooled_gradient():
    x, c = data()
    model = keras.Sequential([keras.Input((IN,)), SparseDense(OUT, 0.25, block_size=4,
                                                              use_bias=False, pooling="SUM",
                                                              seed=2)])
    layer = model.layers[0]
    model.compile(keras.optimizers.SGD(0.0), linear_loss)  # lr 0: values stay, only the pattern moves
    before = mask_of(layer)
    model.fit(x, c, batch_size=N, epochs=1, verbose=0,
              callbacks=[RigL(1, prune_ratio=0.5, schedule="constant", total_steps=1)])
    pooled = np.abs(x.T.astype(np.float64) @ c).reshape(IN // 4, 4, OUT // 4, 4).sum(axis=(1, 3))
    block_before, block_after = before, mask_of(layer)  # [input_blocks, output_blocks]
    grown = block_after & ~block_before
    k = grown.sum()
    assert k == np.ceil(0.5 * block_before.sum())
    candidates = np.where(block_before, -np.inf, pooled)
    assert set(np.flatnonzero(grown)) == set(np.argsort(-candidates.ravel())[:k])


# ---- saving, export, to_dense ----------------------------------------------------------

def trained_model():
    x, c = data()
    model = keras.Sequential([keras.Input((IN,)), SparseDense(OUT, 0.3, activation="relu",
                                                              seed=4),
                              SparseDense(8, 0.5, seed=5)])
    model.compile(keras.optimizers.Adam(LR), "mse")
    model.fit(x, c[:, :8], batch_size=N, epochs=4, verbose=0, callbacks=[RigL(2, seed=0)])
    return model, x


def test_save_and_load_restore_pattern_values_and_optimizer_state(tmp_path):
    model, x = trained_model()
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    for old, new in zip(sparse_layers(model), sparse_layers(loaded)):
        np.testing.assert_array_equal(new.metainfo.numpy(), old.metainfo.numpy())
        np.testing.assert_array_equal(new.nz_values.numpy(), old.nz_values.numpy())
    for old, new in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_export_serves_after_importing_the_op(tmp_path):
    model, x = trained_model()
    model.export(str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    np.testing.assert_allclose(served.serve(x), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


def test_to_dense_gives_plain_dense_layers_with_the_same_outputs():
    model, x = trained_model()
    dense = to_dense(model)
    assert [type(layer) for layer in dense.layers] == [keras.layers.Dense] * 2
    np.testing.assert_allclose(dense.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


# ---- float16 ---------------------------------------------------------------------------

def test_float16_layer_and_mixed_precision_train():
    x, c = data()
    layer16 = SparseDense(OUT, 0.3, seed=0, dtype="float16")
    y = layer16(x.astype(np.float16))
    assert y.dtype == tf.float16
    expected = x.astype(np.float64) @ layer16.get_dense().astype(np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-2, atol=1e-2)

    model = keras.Sequential([keras.Input((IN,)),
                              SparseDense(OUT, 0.3, seed=0, dtype="mixed_float16")])
    layer = model.layers[0]
    assert layer.nz_values.dtype == "float32" and layer.compute_dtype == "float16"
    model.compile(keras.optimizers.Adam(LR), linear_loss)
    before = layer.get_dense()
    history = model.fit(x, c, batch_size=N, epochs=4, verbose=0, callbacks=[RigL(2, seed=0)])
    assert np.isfinite(history.history["loss"]).all()
    assert not np.array_equal(mask_of(layer), before != 0)


# ---- fault tolerance and TensorBoard ---------------------------------------------------

def test_backup_and_restore_resumes_a_killed_rigl_run_exactly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    job = [sys.executable, str(Path(__file__).with_name("keras_backup_job.py"))]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    subprocess.run(job + [str(tmp_path / "backup_a"), str(tmp_path / "a.npz")], env=env,
                   check=True, timeout=600, capture_output=True)

    backup, result = tmp_path / "backup_b", tmp_path / "b.npz"
    killed = subprocess.Popen(job + [str(backup), str(result)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = backup / "training_metadata.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and killed.poll() is None:
            if metadata.exists() and '"epoch": 2' in metadata.read_text(errors="replace"):
                break  # three epochs done (the metadata names the last finished one)
            time.sleep(0.05)
        assert killed.poll() is None, "the job ended before it could be killed"
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        killed.kill()
        killed.wait(timeout=60)
    assert not result.exists()
    subprocess.run(job + [str(backup), str(result)], env=env, check=True, timeout=600,
                   capture_output=True)

    a, b = np.load(tmp_path / "a.npz"), np.load(result)
    for key in ("metainfo1", "metainfo2"):
        np.testing.assert_array_equal(b[key], a[key])
    for key in ("values1", "values2"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7)
    assert float(b["accuracy"]) == float(a["accuracy"])


def test_tensorboard_gets_density_moves_share_and_connectivity(tmp_path):
    x, c = data()
    model, layer = one_layer_model()
    model.compile(keras.optimizers.Adam(LR), linear_loss)
    log_dir = str(tmp_path / "logs")
    model.fit(x, c, batch_size=N, epochs=4, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(log_dir), RigL(2, seed=0, log_dir=log_dir)])
    tags = {}
    for event_file in (tmp_path / "logs" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    name = layer.name
    for tag in ("density", "moved", "prune_fraction", "connectivity"):
        assert tags.get(f"rigl/{name}/{tag}") == [2, 4], tags.keys()
    assert "epoch_loss" in tags  # TensorBoard's own curves, in the same folder


def test_kernel_regularizer_adds_weight_decay_to_the_values_gradient():
    decay, lr = 0.1, 0.5
    model, layer = one_layer_model(kernel_regularizer=keras.regularizers.L2(decay / 2))
    x, c = data()
    before = layer.get_dense()
    model.compile(keras.optimizers.SGD(lr), linear_loss)
    model.fit(x, c, batch_size=N, epochs=1, verbose=0)
    mask = mask_of(layer)
    step = x.T.astype(np.float64) @ c / (N * OUT) + decay * before
    np.testing.assert_allclose(layer.get_dense(), np.where(mask, before - lr * step, 0.0),
                               rtol=1e-5, atol=1e-6)


def test_seeded_dropout_masks_scale_and_resume_from_a_saved_model(tmp_path):
    from ipu_sparse_ops.keras import SeededDropout

    def model():
        return keras.Sequential([keras.Input((1000,)), SeededDropout(0.3, seed=7)])
    x = np.ones((4, 1000), np.float32)
    first = model()
    np.testing.assert_array_equal(first(x, training=False), x)
    masks = [first(x, training=True).numpy() for _ in range(3)]
    for mask in masks:  # each element dropped or scaled by 1 / (1 - rate)
        assert set(np.unique(mask)) <= {0.0, np.float32(1 / 0.7)}
        assert abs(np.mean(mask == 0) - 0.3) < 0.02
    assert not np.array_equal(masks[0], masks[1])
    again = model()
    again(x, training=True)
    again.save(tmp_path / "d.keras")
    resumed = keras.models.load_model(tmp_path / "d.keras")
    np.testing.assert_array_equal(resumed(x, training=True), masks[1])
    np.testing.assert_array_equal(resumed(x, training=True), masks[2])


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_steps_as_tensorflow_1_when_the_rate_changes(nesterov):
    """a = m a + g, w -= lr a (Nesterov: lr (g + m a)) with the rate of each step."""
    rng = np.random.default_rng(3)
    grads = rng.standard_normal((6, 5))
    rates = [0.1, 0.1, 0.01, 0.01, 0.001, 0.5]
    w = tf.Variable(np.ones(5, np.float32))
    optimizer = Momentum(0.1, momentum=0.9, nesterov=nesterov)
    want, a = np.ones(5), np.zeros(5)
    for g, lr in zip(grads, rates):
        optimizer.learning_rate.assign(lr)
        optimizer.apply_gradients([(tf.constant(g, tf.float32), w)])
        a = 0.9 * a + g
        want -= lr * (g + 0.9 * a if nesterov else a)
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-5)
    config = keras.optimizers.serialize(optimizer)
    assert type(keras.optimizers.deserialize(config)) is Momentum
