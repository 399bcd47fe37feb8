"""Tests for the sparse transformer: its pieces against numpy, the sparse-vs-dense
numerics tool, the layer-level Rig-L step (`ipu_sparse_ops/rigl.py`), and the
training script `sparse_transformer_rigl_mnist.py` (short runs, bad flags)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import sparse_transformer_rigl_mnist as script
from ipu_sparse_ops import optimizers, rigl
from ipu_sparse_ops.layers import SparseFcLayer
from ipu_sparse_ops.sparse import MatmulSpec, Triplets
from ipu_sparse_ops.tools import transformer_numerics
from ipu_sparse_ops.transformer import (
    EncoderLayer, GroupNorm, SelfAttention, SequenceClassifier, SparsityConfig, TokenLinear,
    sinusoidal_position_encoding)
from mnist_rigl.mnist_data import load_mnist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sparse_transformer_rigl_mnist.py"


def script_env():
    env = dict(os.environ, PYTHONPATH=str(REPO))  # as `pip install .` would provide
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


# ---- numpy reference of the model --------------------------------------------------------

def np_linear(lin: TokenLinear, x):
    y = x @ lin.dense_weight().astype(np.float64)
    if lin.fc.bias is not None:
        y = y + lin.fc.bias.numpy()[:lin.out_features].astype(np.float64)
    return y


def np_norm(norm: GroupNorm, x):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * norm.gamma.numpy() + norm.beta.numpy()


def np_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_attention(att: SelfAttention, h):
    b, t, _ = h.shape
    if att.concat_qkv:
        qkv = np.split(np_linear(att.qkv, h), 3, axis=-1)
    else:
        qkv = [np_linear(lin, h) for lin in (att.q, att.k, att.v)]
    q, k, v = (part.reshape(b, t, att.heads, att.qkv_length).transpose(0, 2, 1, 3)
               for part in qkv)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(att.qkv_length)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    return np_linear(att.out, context)


def np_encoder(layer: EncoderLayer, x):
    x = x + np_attention(layer.attention, np_norm(layer.attention_norm, x))
    f = layer.ffn
    return x + np_linear(f.fc2, np_gelu(np_linear(f.fc1, np_norm(layer.ffn_norm, x))))


def np_classifier(model: SequenceClassifier, x):
    emb = model.embedding
    code = sinusoidal_position_encoding(x.shape[1], x.shape[2]).astype(np.float64)
    h = np_linear(emb.projection, x + np_norm(emb.position_norm, code))
    h = np_encoder(model.encoder0, h)
    return np_linear(model.head.projection, h).sum(axis=1)


def small_config(**kwargs):
    return SparsityConfig(**{"sparsity": 0.7, **kwargs})


# ---- pieces ------------------------------------------------------------------------------

def test_position_encoding_formula():
    pe = sinusoidal_position_encoding(5, 6)
    assert pe.shape == (5, 6) and pe.dtype == np.float32
    p = np.arange(5)
    np.testing.assert_allclose(pe[:, 0], np.sin(p), rtol=1e-6)
    np.testing.assert_allclose(pe[:, 1], np.cos(p), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pe[:, 2], np.sin(p / 10000 ** (2 / 6)), rtol=1e-6)
    np.testing.assert_allclose(pe[:, 5], np.cos(p / 10000 ** (4 / 6)), rtol=1e-6)
    assert sinusoidal_position_encoding(3, 5).shape == (3, 5)  # odd widths work


def test_group_norm_is_a_per_token_layer_norm_with_gamma_point_one():
    norm = GroupNorm(8, SparsityConfig())
    np.testing.assert_array_equal(norm.gamma.numpy(), np.full(8, 0.1, np.float32))
    np.testing.assert_array_equal(norm.beta.numpy(), np.zeros(8, np.float32))
    x = np.random.default_rng(0).standard_normal((2, 3, 8)) * 5 + 3
    np.testing.assert_allclose(norm(x.astype(np.float32)).numpy(), np_norm(norm, x),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block_size, data_type, concat_qkv, attention_bias", [
    (1, "fp32", True, False), (1, "fp32", False, True), (8, "fp32", True, True),
    (4, "fp16", False, False)])
def test_classifier_matches_numpy(block_size, data_type, concat_qkv, attention_bias):
    # Block 8 pads 28 inputs to 32 and 10 outputs to 16; block 4 pads the output to 12.
    config = small_config(block_size=block_size, data_type=data_type,
                          pooling_type="NONE" if block_size == 1 else "SUM")
    model = SequenceClassifier(in_features=28, max_tokens=28, classes=10, hidden=32, heads=4,
                               qkv_length=8, ff=16, config=config, seed=3,
                               concat_qkv=concat_qkv, attention_bias=attention_bias)
    # Move the trainable position norm off its initial value, so the test sees it used.
    beta = model.embedding.position_norm.beta
    beta.assign(np.linspace(-0.2, 0.3, 28).astype(beta.dtype.as_numpy_dtype))
    x = np.random.default_rng(1).random((3, 28, 28))
    logits = model(x.astype(config.tf_dtype.as_numpy_dtype)).numpy()
    expected = np_classifier(model, x)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    tol = 1e-4 if data_type == "fp32" else 3e-2
    np.testing.assert_allclose(logits, expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_model_layout_and_sparse_layers():
    config = SparsityConfig(sparsity=0.9)
    model = SequenceClassifier(in_features=28, max_tokens=28, classes=10, hidden=96, heads=16,
                               qkv_length=32, ff=48, config=config, seed=0)
    shapes = {name: (fc.spec.input_size, fc.spec.output_size)
              for name, fc in model.named_sparse_layers().items()}
    assert shapes == {
        "embedding/projection": (28, 96), "encoder0/attention/qkv": (96, 1536),
        "encoder0/attention/out": (512, 96), "encoder0/ffn/fc1": (96, 48),
        "encoder0/ffn/fc2": (48, 96), "head/projection": (96, 10)}
    for fc in model.named_sparse_layers().values():
        assert fc.nnz == round(0.1 * fc.spec.input_size * fc.spec.output_size)
    # As the original: biases on the embedding and feed-forward projections only.
    biases = {name: lin.fc.bias is not None for name, lin in model.named_linears().items()}
    assert biases == {"embedding/projection": True, "encoder0/attention/qkv": False,
                      "encoder0/attention/out": False, "encoder0/ffn/fc1": True,
                      "encoder0/ffn/fc2": True, "head/projection": False}
    assert not any("attention" in key and key.endswith("/bias") for key in model.state())
    assert model.padded_real_elements() == {}
    # Same seed, same weights; another seed, another pattern.
    again = SequenceClassifier(in_features=28, max_tokens=28, classes=10, hidden=96, heads=16,
                               qkv_length=32, ff=48, config=config, seed=0)
    for a, b in zip(model.state().values(), again.state().values()):
        np.testing.assert_array_equal(a, b)
    other = SequenceClassifier(in_features=28, max_tokens=28, classes=10, hidden=96, heads=16,
                               qkv_length=32, ff=48, config=config, seed=1)
    assert not np.array_equal(model.state()["encoder0/attention/qkv/metainfo"],
                              other.state()["encoder0/attention/qkv/metainfo"])


@pytest.mark.parametrize("block_size", [1, 8])
def test_concatenated_qkv_is_the_three_projections_side_by_side(block_size):
    config = SparsityConfig(sparsity=0.75, block_size=block_size,  # thirds hold exactly 1/3
                            pooling_type="NONE" if block_size == 1 else "SUM")
    split = SelfAttention(32, 4, 8, config, seed=1, concat_qkv=False, bias=True)
    joint = SelfAttention(32, 4, 8, config, seed=2, concat_qkv=True, bias=True)
    rng = np.random.default_rng(0)
    for lin in (split.q, split.k, split.v, split.out):  # biases that are not zero
        lin.fc.bias.assign(rng.standard_normal(lin.fc.bias.shape).astype(np.float32))
    # Give the joint layer the split layer's weights: q, k, v as its column thirds.
    parts = [lin.fc.get_triplets() for lin in (split.q, split.k, split.v)]
    width = 32 // block_size
    joint.qkv.fc.push_triplets(Triplets(
        np.concatenate([p.row_indices for p in parts]),
        np.concatenate([p.col_indices + i * width for i, p in enumerate(parts)]),
        np.concatenate([p.values for p in parts])))
    joint.qkv.fc.bias.assign(np.concatenate([lin.fc.bias.numpy()
                                             for lin in (split.q, split.k, split.v)]))
    joint.out.fc.push_triplets(split.out.fc.get_triplets())
    joint.out.fc.bias.assign(split.out.fc.bias.numpy())
    x = rng.standard_normal((2, 7, 32))
    expected = np_attention(split, x)
    np.testing.assert_allclose(np_attention(joint, x), expected, rtol=1e-12, atol=1e-12)
    for layer in (split, joint):
        np.testing.assert_allclose(layer(x.astype(np.float32)).numpy(), expected,
                                   rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_padding_is_zero_and_gets_no_gradient():
    lin = TokenLinear(28, 10, SparsityConfig(sparsity=0.5, block_size=8, pooling_type="SUM"),
                      use_bias=True, seed=2)
    spec = lin.spec
    assert (spec.input_size, spec.output_size) == (32, 16)
    np.testing.assert_array_equal(lin.real_elements(), np.outer([8, 8, 8, 4], [8, 2]))
    dense = lin.fc.get_dense()
    assert not dense[28:].any() and not dense[:, 10:].any()
    x = tf.constant(np.random.default_rng(0).standard_normal((2, 5, 28)), tf.float32)
    with tf.GradientTape() as tape:
        y = lin(x)
        loss = tf.reduce_sum(y * y)
    assert y.shape == (2, 5, 10)
    grad = tape.gradient(loss, lin.fc.nz_values).numpy()
    triplets = lin.fc.get_triplets()
    rows = triplets.row_indices[:, None] * 8 + np.arange(8)
    cols = triplets.col_indices[:, None] * 8 + np.arange(8)
    padding = (rows >= 28)[:, :, None] | (cols >= 10)[:, None, :]
    assert padding.any()
    assert not grad[:len(rows)][padding].any()


def test_dropout_is_seeded_and_off_without_a_seed():
    config = small_config()
    model = SequenceClassifier(in_features=28, max_tokens=28, classes=10, hidden=32, heads=4,
                               qkv_length=8, ff=16, config=config, seed=0, keep_prob=0.5)
    x = np.random.default_rng(0).random((2, 28, 28)).astype(np.float32)
    plain = model(x).numpy()
    np.testing.assert_array_equal(plain, model(x).numpy())
    a = model(x, dropout_seed=tf.constant([1, 2], tf.int64)).numpy()
    b = model(x, dropout_seed=tf.constant([1, 2], tf.int64)).numpy()
    c = model(x, dropout_seed=tf.constant([1, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain) and not np.allclose(a, c)


# ---- numerics tool -----------------------------------------------------------------------

@pytest.mark.parametrize("flags", [
    ["--data-type", "fp32"],
    ["--data-type", "fp16"],
    ["--data-type", "fp32", "--block-size", "8", "--sparsity", "0.5", "--pooling-type", "SUM"],
    ["--data-type", "fp16", "--block-size", "16", "--sparsity", "0.6", "--pooling-type", "MAX",
     "--hidden-length", "40", "--ff-length", "20", "--qkv-length", "6",
     "--attention-heads", "3", "--tokens", "5"],  # padded sizes
])
def test_numerics_tool_matches(flags, capsys):
    assert transformer_numerics.main(flags) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("All results match.")


def test_numerics_tool_catches_a_wrong_weight(monkeypatch, capsys):
    build = transformer_numerics.build_part

    def tampered(part, args, config):
        layer = build(part, args, config)
        if config.dense:  # move one weight of the dense twin
            kernel = layer.named_linears()["fc1"].fc.kernel
            kernel.assign(kernel + tf.one_hot(3, kernel.shape[1])[None, :] * 0.5)
        return layer

    monkeypatch.setattr(transformer_numerics, "build_part", tampered)
    assert transformer_numerics.main(["--part", "ffn", "--data-type", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH ffn fp32 activations" in out and "All results match." not in out


def test_numerics_tool_bad_flag_is_one_line():
    tool = REPO / "ipu_sparse_ops" / "tools" / "transformer_numerics.py"
    result = subprocess.run([sys.executable, str(tool), "--sparsity", "1.5"], cwd=REPO,
                            env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--sparsity" in result.stderr


# ---- Rig-L on a layer --------------------------------------------------------------------

def layer_with(spec, rows, cols, values):
    return SparseFcLayer(spec, Triplets(np.array(rows), np.array(cols),
                                        np.array(values, dtype=spec.dtype)))


def as_dict(triplets):
    bs = np.asarray(triplets.values).reshape(len(triplets.row_indices), -1)
    return {(int(r), int(c)): v.copy() for r, c, v in
            zip(triplets.row_indices, triplets.col_indices, bs)}


def test_rigl_update_keeps_values_and_slots_and_grows_at_the_largest_gradient():
    spec = MatmulSpec(4, 3, 4, 1)
    layer = layer_with(spec, [0, 1, 2, 3], [0, 1, 2, 0], [0.5, -0.1, 2.0, -0.05])
    opt = optimizers.make_optimizer("Adam", 0.1)
    opt.build([layer.nz_values])
    m, v = opt.get_slot(layer.nz_values, "m"), opt.get_slot(layer.nz_values, "v")
    m.assign(np.arange(1, 5, dtype=np.float32).reshape(4, 1, 1))
    v.assign(np.arange(11, 15, dtype=np.float32).reshape(4, 1, 1))
    slots_before = {key: (float(m.numpy()[i, 0, 0]), float(v.numpy()[i, 0, 0]))
                    for i, key in enumerate(as_dict(layer.get_triplets()))}
    grad = np.zeros((4, 3), np.float32)
    grad[3, 2], grad[2, 1] = -9.0, 5.0  # the two largest |g| among free positions
    grad[1, 1] = 100.0  # connected, so not a candidate
    moved = rigl.rigl_update(layer, opt, grad, 2, "rigl", None)
    assert moved == 2 and layer.nnz == 4
    after = as_dict(layer.get_triplets())
    assert set(after) == {(0, 0), (2, 2), (3, 2), (2, 1)}  # -0.1 and -0.05 pruned
    assert after[(0, 0)] == 0.5 and after[(2, 2)] == 2.0
    assert after[(3, 2)] == 0.0 and after[(2, 1)] == 0.0
    for i, key in enumerate(after):
        expected = slots_before.get(key, (0.0, 0.0))
        assert (float(m.numpy()[i, 0, 0]), float(v.numpy()[i, 0, 0])) == expected, key


@pytest.mark.parametrize("pooling", ["NONE", "MAX"])
def test_rigl_update_moves_blocks_with_their_slots(pooling):
    rng = np.random.default_rng(4)
    spec = MatmulSpec(16, 24, 9, 4, pooling_type=pooling)
    flat = rng.choice(24, size=9, replace=False)
    layer = layer_with(spec, flat // 6, flat % 6, rng.standard_normal((9, 4, 4)))
    opt = optimizers.make_optimizer("Momentum", 0.1)
    opt.build([layer.nz_values])
    slot = opt.get_slot(layer.nz_values, "momentum")
    slot.assign(rng.standard_normal(slot.shape).astype(np.float32))
    before = as_dict(layer.get_triplets())
    slot_before = dict(zip(before, slot.numpy()[:9].reshape(9, -1)))
    grad = rng.random(spec.dense_grad_shape).astype(np.float32)
    assert rigl.rigl_update(layer, opt, grad, 4, "rigl", None) == 4
    after = as_dict(layer.get_triplets())
    assert len(after) == 9 and len(set(after) - set(before)) == 4
    for i, (key, value) in enumerate(after.items()):
        if key in before:
            np.testing.assert_array_equal(value, before[key])
            np.testing.assert_array_equal(slot.numpy()[i].reshape(-1), slot_before[key])
        else:
            assert not value.any() and not slot.numpy()[i].any()
    # The 4 weakest blocks (sum |w|) went.
    mags = {key: np.abs(v).sum() for key, v in before.items()}
    assert set(before) - set(after) == set(sorted(mags, key=mags.get)[:4])


def test_rigl_update_refuses_a_nan_gradient_and_changes_nothing():
    spec = MatmulSpec(4, 3, 3, 1)
    layers = {"a": layer_with(spec, [0, 1, 2], [0, 1, 2], [1.0, 2.0, 3.0]),
              "b": layer_with(spec, [0, 1, 2], [2, 1, 0], [1.0, 2.0, 3.0])}
    states = {name: layer.state() for name, layer in layers.items()}
    good = np.ones((4, 3), np.float32)
    bad = good.copy()
    bad[1, 2] = np.nan
    with pytest.raises(rigl.NonFiniteGradientError, match="b: .*1 NaN/Inf"):
        rigl.rigl_update_layers(layers, None, {"a": good, "b": bad}, {"a": 1, "b": 1},
                                "rigl", None)
    for name, layer in layers.items():  # "a" was not updated either
        for key, value in layer.state().items():
            np.testing.assert_array_equal(value, states[name][key])
    bad[1, 2] = np.inf
    with pytest.raises(rigl.NonFiniteGradientError):
        rigl.rigl_update(layers["a"], None, bad, 1, "rigl", None)
    with pytest.raises(ValueError, match="rng"):
        rigl.rigl_update(layers["a"], None, None, 1, "random", None)
    moved = rigl.rigl_update(layers["a"], None, None, 1, "random", np.random.default_rng(0))
    assert moved == 1 and layers["a"].nnz == 3


@pytest.mark.parametrize("pooling", ["NONE", "SUM"])
def test_block_scores_for_both_gradient_forms(pooling):
    spec = MatmulSpec(8, 8, 2, 4, pooling_type=pooling)
    full = np.zeros((8, 8), np.float32)
    full[4:, 0:4] = -1.0  # block (1, 0): sum |g| = 16
    full[0:4, 4:] = 0.5  # block (0, 1): 8
    grad = full if pooling == "NONE" else np.array([[0, 8], [16, 0]], np.float32)
    np.testing.assert_array_equal(rigl.block_scores(spec, grad), [[0, 8], [16, 0]])
    with pytest.raises(ValueError, match="shape"):
        rigl.block_scores(spec, np.zeros((3, 3)))
    values = np.ones((2, 4, 4), np.float32)
    layer = layer_with(spec, [0, 1], [0, 1], values)
    rigl.rigl_update(layer, None, grad, 1, "rigl", None)
    assert set(as_dict(layer.get_triplets())) in ({(0, 0), (1, 0)}, {(1, 1), (1, 0)})


def test_real_elements_compare_padded_blocks_per_element():
    # 16 x 10 padded to 16 x 16 with 8 x 8 blocks: block column 1 holds 2 real columns.
    spec = MatmulSpec(16, 16, 2, 8, pooling_type="SUM")
    real = np.array([[64, 16], [64, 16]])
    values = np.zeros((2, 8, 8), np.float32)
    values[0] = 0.1  # sum 6.4, 0.1 per real element
    values[1][:, :2] = 0.3  # sum 4.8, 0.3 per real element
    grad = np.array([[0, 0], [10, 4]], np.float32)  # pooled: 10 / 64 vs 4 / 16 per element

    plain = layer_with(spec, [0, 0], [0, 1], values)
    rigl.rigl_update(plain, None, grad, 1, "rigl", None)
    assert set(as_dict(plain.get_triplets())) == {(0, 0), (1, 0)}

    fair = layer_with(spec, [0, 0], [0, 1], values)
    rigl.rigl_update(fair, None, grad, 1, "rigl", None, real_elements=real)
    got = as_dict(fair.get_triplets())
    assert set(got) == {(0, 1), (1, 1)}
    np.testing.assert_array_equal(got[(0, 1)], values[1].reshape(-1))  # kept as it was
    assert not got[(1, 1)].any()  # grown from zero

    # A block wholly in the padding is never grown, however large its score.
    wide = MatmulSpec(16, 24, 2, 8, pooling_type="SUM")
    layer = layer_with(wide, [0, 0], [0, 1], values)
    grad = np.array([[0, 0, 100], [1, 0, 100]], np.float32)
    rigl.rigl_update(layer, None, grad, 1, "rigl", None,
                     real_elements=np.array([[64, 16, 0], [64, 16, 0]]))
    assert (1, 0) in as_dict(layer.get_triplets())
    with pytest.raises(ValueError, match="real_elements"):
        rigl.rigl_update(layer, None, grad, 1, "rigl", None, real_elements=np.ones((2, 2)))


# ---- the training script -----------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


SHORT = ["--train-samples", "960", "--test-samples", "300", "--nepochs", "1",
         "--steps-per-epoch", "3", "--random-seed", "5", "--hidden-length", "32",
         "--qkv-length", "8", "--attention-heads", "4", "--ff-length", "16",
         "--log-level", "WARNING"]


@pytest.mark.parametrize("extra", [
    ["--block-size", "8", "--sparsity", "0.5", "--pooling-type", "SUM",
     "--dropout-keep-prob", "0.9"],
    # fp16 with Adam: a zero gradient (the padding) must not step by 0/0.
    ["--block-size", "4", "--sparsity", "0.5", "--pooling-type", "AVG", "--data-type", "fp16"],
])
def test_training_moves_every_pattern_with_one_trace(mnist, extra):
    args = script.parse_args(SHORT + extra)
    x_train, y_train = mnist[0][:960], mnist[1][:960]
    initial = script.build_model(args, 5).state()
    model, results = script.train(args, x_train, y_train, 5)
    assert results["traces"] == 1 and results["samples"] == 960
    final = model.state()
    for name, fc in model.named_sparse_layers().items():
        assert fc.nnz == len(initial[f"{name}/nz_values"]), name  # capacity == count
        assert not np.array_equal(final[f"{name}/metainfo"], initial[f"{name}/metainfo"]), name
    # The padded sizes keep their padding empty through training.
    head = model.named_linears()["head/projection"].fc.get_dense()
    assert not head[:, 10:].any()


def test_disable_updating_keeps_the_patterns(mnist):
    args = script.parse_args(SHORT + ["--disable-updating", "--regrow-type", "random"])
    initial = script.build_model(args, 5).state()
    model, _ = script.train(args, mnist[0][:960], mnist[1][:960], 5)
    for name in model.named_sparse_layers():
        np.testing.assert_array_equal(model.state()[f"{name}/metainfo"],
                                      initial[f"{name}/metainfo"])


# 200 steps of a smaller, denser model: enough to learn well above chance.
E2E = ["--train-samples", "3200", "--test-samples", "300", "--batch-size", "16",
       "--nepochs", "1", "--steps-per-epoch", "3", "--random-seed", "5", "--hidden-length", "64",
       "--qkv-length", "8", "--attention-heads", "4", "--ff-length", "32", "--sparsity", "0.5",
       "--learning-rate", "0.01", "--log-level", "WARNING"]


def test_end_to_end_run_then_test_from_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    run = subprocess.run([sys.executable, str(SCRIPT), *E2E, "--checkpoint-path", str(ckpt),
                          "--accuracy-threshold", "0.5"], cwd=REPO, env=script_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert re.search(r"Training throughput: \d+ samples/s, \d+ tokens/s", run.stdout)
    accuracy = re.search(r"Test accuracy: ([0-9.]+)", run.stdout).group(1)
    assert float(accuracy) >= 0.5
    assert run.stdout.strip().endswith("All asserts pass.")
    assert run.stderr == ""
    # --mode test rebuilds the model from the checkpoint alone and scores the same.
    assert script.main(E2E + ["--mode", "test", "--checkpoint-path", str(ckpt),
                              "--accuracy-threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"Test accuracy: {accuracy}" in out and "All asserts pass." in out
    # A threshold it misses fails with one line on stderr.
    assert script.main(E2E + ["--mode", "test", "--checkpoint-path", str(ckpt),
                                "--accuracy-threshold", "1.0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "below the threshold 1" in err
    # A checkpoint of another model shape is refused in one line.
    assert script.main(E2E + ["--mode", "test", "--checkpoint-path", str(ckpt),
                                "--ff-length", "24"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ff-length 32 (given 24)" in err


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--dropout-keep-prob", "0"], "--dropout-keep-prob must be in (0, 1]"),
    (["--prune-ratio", "1.5"], "--prune-ratio must be in [0, 1]"),
    (["--cosine-prune-schedule", "{bad"], "not valid JSON"),
    (["--cosine-prune-schedule", '{"zero_step": 1}'], "unknown key 'zero_step'"),
    (["--cosine-prune-schedule", '{"zero_steps": 1.5}'], "zero_steps must be a whole number"),
    (["--cosine-prune-schedule", "[1, 2]"], "must be a JSON object"),
    (["--optimizer", "Adagrad"], "--optimizer: unknown optimizer"),
    (["--optimizer-arg", "momentum=0.9"], "--optimizer-arg: Adam has no option 'momentum'"),
    (["--optimizer-arg", "beta1"], "--optimizer-arg"),
    (["--optimizer-arg", "learning_rate=0.1"], "--learning-rate"),
    (["--learning-rate", "-1"], "--learning-rate must be > 0"),
    (["--mode", "test"], "--mode test needs --train-checkpoint-path"),
    (["--block-size", "3"], "invalid choice"),
    (["--attention-heads", "0"], "--attention-heads must be >= 1"),
    (["--nepochs", "x"], "invalid int value"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_runs_are_one_line_without_traceback(tmp_path):
    # As users run it: a flag error (before TensorFlow loads) and a data error (after).
    for argv, code, message in [
        (["--sparsity", "2"], 2, "--sparsity must be in [0, 1)"),
        (["--data-dir", str(tmp_path)], 1, "no train-images-idx3-ubyte"),
    ]:
        result = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO,
                                env=script_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == code, (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--mode", "test"], "no trained model in"),
    (["--train-samples", "10", "--batch-size", "8"], "fewer than --steps-per-epoch 5"),
    (["--train-samples", "640", "--nepochs", "1", "--steps-per-epoch", "2",
      "--cosine-prune-schedule", '{"zero_steps": 3}'],
     "zero_steps 3 must be below the 2 Rig-L steps"),
])
def test_bad_runs_in_process(argv, message, tmp_path, capsys):
    assert script.main(argv + ["--checkpoint-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


# ---- the benchmark runs (slow) -----------------------------------------------------------

def run_script(*argv):
    """The script as users run it: (exit status, test accuracy, stdout, stderr)."""
    result = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=1800)
    found = re.search(r"Test accuracy: ([0-9.]+)", result.stdout)
    return result.returncode, float(found.group(1)) if found else None, result.stdout, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--block-size", "8", "--sparsity", "0.5",
                                        "--pooling-type", "SUM"]])
def test_fast_recipe_reaches_97_percent(extra, tmp_path):
    status, accuracy, out, err = run_script("--recipe", "fast", "--random-seed", "1", *extra,
                                            "--train-checkpoint-path", str(tmp_path))
    assert status == 0, err
    assert accuracy >= 0.97 and "All asserts pass." in out


@pytest.mark.slow
def test_the_original_default_run_passes_its_own_assert(tmp_path):
    # Batch 2, one epoch, seed 42: about 80 s on 2 cores.
    status, accuracy, out, err = run_script("--train-checkpoint-path", str(tmp_path))
    assert status == 0, err
    assert accuracy >= 0.85 and "All asserts pass." in out
