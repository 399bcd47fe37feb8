"""Tests for the sparse transformer: its Keras model against a numpy forward from the
layers' dense kernels, one SGD step against numpy's finite differences, the
sparse-vs-dense numerics tool, and the training script
`sparse_transformer_rigl_mnist.py` (short runs, checkpoints, bad flags)."""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import keras
import sparse_transformer_rigl_mnist as script
from ipu_sparse_ops.keras import SparseDense, sparse_layers
from ipu_sparse_ops.tools import transformer_numerics
from ipu_sparse_ops.transformer import (
    GroupNorm, Settings, classifier, projections, sinusoidal_position_encoding)
from mnist_rigl.mnist_data import load_mnist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sparse_transformer_rigl_mnist.py"


def script_env():
    env = dict(os.environ, PYTHONPATH=str(REPO))  # as `pip install .` would provide
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


# ---- numpy reference of the model --------------------------------------------------------

def kernels_of(model) -> dict:
    """{projection name: (dense kernel, bias or None)} in float64, as numpy sees the model."""
    weights = {}
    for layer in projections(model):
        kernel = layer.get_dense() if isinstance(layer, SparseDense) else layer.kernel.numpy()
        bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else None
        weights[layer.name] = (kernel.astype(np.float64), bias)
    return weights


def np_norm(model, name, x):
    norm = model.get_layer(name)
    if not isinstance(norm, GroupNorm):  # the position code's norm sits inside its layer
        norm = norm.norm
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + norm.epsilon) * norm.gamma.numpy().astype(np.float64)
            + norm.beta.numpy().astype(np.float64))


def np_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_classifier(model, images, heads, qkv_length, weights=None):
    """The model's logits in float64 numpy, from `weights` (default: the model's own)."""
    weights = weights or kernels_of(model)

    def linear(name, x):
        kernel, bias = weights[name]
        return x @ kernel + (0.0 if bias is None else bias)

    x = images.astype(np.float64) / 255.0
    b, t, width = x.shape
    code = sinusoidal_position_encoding(t, width).astype(np.float64)
    h = linear("embedding_projection", x + np_norm(model, "embedding_position", code))
    normed = np_norm(model, "encoder0_attention_norm", h)
    if "encoder0_attention_qkv" in weights:
        qkv = np.split(linear("encoder0_attention_qkv", normed), 3, axis=-1)
    else:
        qkv = [linear(f"encoder0_attention_{p}", normed) for p in "qkv"]
    q, k, v = (part.reshape(b, t, heads, qkv_length).transpose(0, 2, 1, 3) for part in qkv)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(qkv_length)
    attention = np.exp(scores - scores.max(-1, keepdims=True))
    attention /= attention.sum(-1, keepdims=True)
    context = (attention @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    h = h + linear("encoder0_attention_out", context)
    f = np_gelu(linear("encoder0_ffn_fc1", np_norm(model, "encoder0_ffn_norm", h)))
    h = h + linear("encoder0_ffn_fc2", f)
    return linear("head_projection", h).sum(axis=1)


def small_model(sparsity=0.7, block_size=1, data_type="fp32", seed=3, dropout_rate=0.0,
                **kwargs):
    settings = Settings(sparsity, block_size, data_type,
                        "NONE" if block_size == 1 else "SUM", seed=seed,
                        dropout_rate=dropout_rate)
    return classifier(tokens=28, in_features=28, classes=10, hidden=32, heads=4, qkv_length=8,
                      ff=16, settings=settings, **kwargs)


def images(n=3, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28)).astype(np.uint8)


# ---- the model ---------------------------------------------------------------------------

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
    norm = GroupNorm()
    x = np.random.default_rng(0).standard_normal((2, 3, 8)) * 5 + 3
    y = norm(x.astype(np.float32)).numpy()
    np.testing.assert_array_equal(norm.gamma.numpy(), np.full(8, 0.1, np.float32))
    np.testing.assert_array_equal(norm.beta.numpy(), np.zeros(8, np.float32))
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * 0.1
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block_size, data_type, concat_qkv, attention_bias, sparsity", [
    (1, "fp32", True, False, 0.7), (1, "fp32", False, True, 0.7), (8, "fp32", True, True, 0.5),
    (4, "fp16", False, False, 0.5), (1, "fp32", True, True, 0.0)])
def test_classifier_matches_numpy(block_size, data_type, concat_qkv, attention_bias, sparsity):
    # Block 8 pads 28 inputs to 32 and 10 outputs to 16; block 4 pads the output to 12.
    # Sparsity 0 makes every projection a plain Dense.
    model = small_model(sparsity, block_size, data_type, concat_qkv=concat_qkv,
                        attention_bias=attention_bias)
    rng = np.random.default_rng(2)
    for weight in model.weights:  # move norms and biases off their initial values
        if weight.path.endswith(("beta", "bias")):
            weight.assign(rng.uniform(-0.3, 0.3, weight.shape).astype(weight.dtype))
    x = images()
    logits = model(x).numpy()
    expected = np_classifier(model, x, 4, 8)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    tol = 1e-4 if data_type == "fp32" else 3e-2
    np.testing.assert_allclose(logits, expected, rtol=tol, atol=tol * np.abs(expected).max())
    if sparsity == 0.0:
        assert not sparse_layers(model)
        assert all(type(layer) is keras.layers.Dense for layer in projections(model))


def test_model_layout_seeds_and_padding():
    model = classifier(tokens=28, in_features=28, classes=10, hidden=96, heads=16,
                       qkv_length=32, ff=48, settings=Settings(0.9, seed=0))
    shapes = {layer.name: (layer.input_size, layer.units) for layer in sparse_layers(model)}
    assert shapes == {
        "embedding_projection": (28, 96), "encoder0_attention_qkv": (96, 1536),
        "encoder0_attention_out": (512, 96), "encoder0_ffn_fc1": (96, 48),
        "encoder0_ffn_fc2": (48, 96), "head_projection": (96, 10)}
    for layer in sparse_layers(model):
        assert layer.nnz == round(0.1 * layer.input_size * layer.units), layer.name
        assert layer.real_elements() is None
    # As the original: biases on the embedding and feed-forward projections only.
    assert {layer.name: layer.use_bias for layer in projections(model)} == {
        "embedding_projection": True, "encoder0_attention_qkv": False,
        "encoder0_attention_out": False, "encoder0_ffn_fc1": True, "encoder0_ffn_fc2": True,
        "head_projection": False}
    # Same seed, same weights; another seed, other patterns.
    again = small_model(seed=0)
    for a, b in zip(small_model(seed=0).get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    other = small_model(seed=1)
    assert not np.array_equal(other.get_layer("encoder0_attention_qkv").metainfo.numpy(),
                              again.get_layer("encoder0_attention_qkv").metainfo.numpy())
    # Block 8: the embedding's 28 inputs and the head's 10 outputs are padded.
    padded = small_model(0.5, 8)
    assert padded.get_layer("embedding_projection").spec.input_size == 32
    head = padded.get_layer("head_projection")
    assert head.spec.output_size == 16 and head.get_dense().shape == (32, 10)


def test_seeded_dropout_only_in_training_and_the_same_for_a_seed():
    x = images(2)
    a, b = small_model(dropout_rate=0.5, seed=4), small_model(dropout_rate=0.5, seed=4)
    plain = a(x).numpy()
    np.testing.assert_allclose(plain, np_classifier(a, x, 4, 8), rtol=1e-4, atol=1e-4)
    first = a(x, training=True).numpy()
    np.testing.assert_array_equal(first, b(x, training=True).numpy())
    assert not np.allclose(first, plain)
    assert not np.allclose(first, a(x, training=True).numpy())  # the next call, the next masks


def test_one_sgd_step_follows_numpy_finite_differences():
    model = small_model(0.5, 8, seed=6)  # padded sizes too
    x, y = images(4, seed=3), np.array([1, 7, 3, 3], np.int32)
    before = kernels_of(model)

    def loss(weights):
        logits = np_classifier(model, x, 4, 8, weights)
        logits = logits - logits.max(-1, keepdims=True)
        return np.mean(np.log(np.exp(logits).sum(-1)) - logits[np.arange(4), y])

    rng = np.random.default_rng(0)
    eps = 1e-5
    expected = {}  # (layer, row, col) -> dL/dw by central differences, before the step
    for name, (kernel, bias) in before.items():
        rows, cols = np.nonzero(kernel)
        for i in rng.choice(len(rows), 3, replace=False):
            r, c = rows[i], cols[i]
            plus, minus = dict(before), dict(before)
            for sign, weights in ((1, plus), (-1, minus)):
                changed = kernel.copy()
                changed[r, c] += sign * eps
                weights[name] = (changed, bias)
            expected[name, r, c] = (loss(plus) - loss(minus)) / (2 * eps)
    lr = 0.5
    script.compile_model(model, keras.optimizers.SGD(lr))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    after = kernels_of(model)
    for (name, r, c), grad in expected.items():
        step = (before[name][0][r, c] - after[name][0][r, c]) / lr
        assert step == pytest.approx(grad, rel=2e-3, abs=1e-5), (name, r, c)
    for name, (kernel, _) in before.items():
        # Only connections move: what was zero (unconnected or padding) stays zero.
        assert not after[name][0][kernel == 0].any(), name


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
    twin = transformer_numerics.dense_twin

    def tampered(model):
        dense = twin(model)
        kernel = dense.get_layer("ffn_fc1").kernel  # move one weight of the dense twin
        kernel.assign(kernel + tf.one_hot(3, kernel.shape[1])[None, :] * 0.5)
        return dense

    monkeypatch.setattr(transformer_numerics, "dense_twin", tampered)
    assert transformer_numerics.main(["--part", "ffn", "--data-type", "fp32"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH ffn fp32 activations" in out and "All results match." not in out


def test_numerics_tool_bad_flag_is_one_line():
    tool = REPO / "ipu_sparse_ops" / "tools" / "transformer_numerics.py"
    result = subprocess.run([sys.executable, str(tool), "--sparsity", "1.5"], cwd=REPO,
                            env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--sparsity" in result.stderr


# ---- the training script -----------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


SHORT = ["--train-samples", "960", "--test-samples", "300", "--nepochs", "1",
         "--steps-per-epoch", "4", "--random-seed", "5", "--hidden-length", "32",
         "--qkv-length", "8", "--attention-heads", "4", "--ff-length", "16",
         "--log-level", "WARNING"]


@pytest.mark.parametrize("extra", [
    ["--block-size", "8", "--sparsity", "0.5", "--pooling-type", "SUM",
     "--dropout-keep-prob", "0.9"],
    # fp16 with Adam: a zero gradient (the padding) must not step by 0/0.
    ["--block-size", "4", "--sparsity", "0.5", "--pooling-type", "AVG", "--data-type", "fp16"],
])
def test_training_moves_every_pattern_without_retracing(mnist, extra):
    args = script.parse_args(SHORT + extra)
    initial = {layer.name: layer.metainfo.numpy()
               for layer in sparse_layers(script.build_model(args, 5))}
    model, results = script.train(args, mnist[0][:960], mnist[1][:960], 5)
    assert results["samples"] == 960 and len(results["updates"]) == 3
    assert results["retraces"] == 0  # three pattern updates, no new trace
    for layer in sparse_layers(model):
        assert layer.nnz == layer.capacity, layer.name
        assert not np.array_equal(layer.metainfo.numpy(), initial[layer.name]), layer.name
        assert np.isfinite(layer.nz_values.numpy()).all(), layer.name
    # The padded sizes keep their padding empty through training.
    head = model.get_layer("head_projection")
    full = head.spec.output_size
    t = head.get_triplets()
    cols = t.col_indices[:, None] * head.block_size + np.arange(head.block_size)
    assert full > 10 and not np.asarray(t.values)[np.broadcast_to(
        (cols >= 10)[:, None, :], np.shape(t.values))].any()


def test_same_seed_same_run_and_disable_updating_keeps_the_patterns(mnist):
    data = mnist[0][:960], mnist[1][:960]
    args = script.parse_args(SHORT + ["--dropout-keep-prob", "0.9"])
    first, _ = script.train(args, *data, 5)
    second, _ = script.train(args, *data, 5)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    static = script.parse_args(SHORT + ["--disable-updating", "--regrow-type", "random"])
    initial = [layer.metainfo.numpy() for layer in sparse_layers(script.build_model(static, 5))]
    model, results = script.train(static, *data, 5)
    assert results["updates"] == []
    for layer, pattern in zip(sparse_layers(model), initial):
        np.testing.assert_array_equal(layer.metainfo.numpy(), pattern)


# 200 steps of a smaller, denser model: enough to learn well above chance.
E2E = ["--train-samples", "3200", "--test-samples", "300", "--batch-size", "16",
       "--nepochs", "1", "--steps-per-epoch", "3", "--random-seed", "5", "--hidden-length", "64",
       "--qkv-length", "8", "--attention-heads", "4", "--ff-length", "32", "--sparsity", "0.5",
       "--learning-rate", "0.01", "--log-level", "WARNING"]


def test_end_to_end_run_then_test_from_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    half_written = ckpt / f".partial-{script.CHECKPOINT_NAME}1234"  # an earlier run killed
    half_written.write_bytes(b"half")
    run = subprocess.run([sys.executable, str(SCRIPT), *E2E, "--checkpoint-path", str(ckpt),
                          "--accuracy-threshold", "0.5"], cwd=REPO, env=script_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert re.search(r"Training throughput: \d+ samples/s, \d+ tokens/s", run.stdout)
    accuracy = re.search(r"Test accuracy: ([0-9.]+)", run.stdout).group(1)
    assert float(accuracy) >= 0.5
    assert run.stdout.strip().endswith("All asserts pass.")
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr, run.stderr
    saved = ckpt / script.CHECKPOINT_NAME
    assert json.loads(saved.with_suffix(".json").read_text())["flags"]["ff_length"] == 32
    assert not half_written.exists()
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
    # So is a model file that was changed, or is not a model at all.
    blob = saved.read_bytes()
    for damaged in (blob[:-10] + b"0123456789", b"not a zip"):
        saved.write_bytes(damaged)
        assert script.main(E2E + ["--mode", "test", "--checkpoint-path", str(ckpt)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "corrupt checkpoint" in err and "SHA-256" in err, err
    meta = json.loads(saved.with_suffix(".json").read_text())
    meta["sha256"] = hashlib.sha256(b"not a zip").hexdigest()
    saved.with_suffix(".json").write_text(json.dumps(meta))
    assert script.main(E2E + ["--mode", "test", "--checkpoint-path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt checkpoint" in err, err


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
