"""Tests for mnist_rigl/sparse_mnist.py: accuracy, determinism, kill and resume,
records, and one clear line for every bad input."""

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from mnist_rigl import sparse_mnist, visualise_connectivity
from mnist_rigl.mnist_data import load_mnist

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "mnist_rigl" / "sparse_mnist.py"
# A short run that still has several Rig-L updates in both layers.
SMALL = ["--densities", "0.1", "0.3", "--epochs", "1", "--steps-per-epoch", "4",
         "--train-samples", "4000", "--seed", "3", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Runs in a temp dir, so the default --checkpoint-path checkpoints lands there."""
    monkeypatch.chdir(tmp_path)


def train(argv, data):
    """Run the training in this process; returns the results dict."""
    return sparse_mnist.train(sparse_mnist.parse_args(argv), data)


def read_npz(path):
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def run_folder(checkpoint_path):
    """The one run folder a test's --checkpoint-path holds."""
    (folder,) = [p.parent for p in Path(checkpoint_path).glob("*/checkpoint.json")]
    return folder


def final_checkpoint(folder):
    """(metadata, every weight and optimizer variable by path) of a run's checkpoint."""
    import keras

    meta = json.loads((Path(folder) / "checkpoint.json").read_text())
    model = keras.models.load_model(Path(folder) / meta["model"])
    arrays = {v.path: v.numpy() for v in model.weights}
    # Optimizer variables by path within the optimizer (its own name is numbered per process).
    arrays.update({"optimizer/" + v.path.split("/", 1)[-1]: v.numpy()
                   for v in model.optimizer.variables})
    return meta, arrays


def assert_same_arrays(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a[key].dtype == b[key].dtype, key


def records(folder):
    return {p.name: read_npz(p) for p in sorted(Path(folder).glob("weights_fc1_*.npz"))}


def images_and_labels(rng, n):
    return (rng.integers(0, 256, (n, 784), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


def standardised(images):
    return (images.astype(np.float64) / 255.0 - sparse_mnist.PIXEL_MEAN) / sparse_mnist.PIXEL_STD


def script_env():
    env = dict(os.environ, PYTHONPATH=str(REPO))  # as `pip install .` would provide
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


# ---- schedule ---------------------------------------------------------------------------

def test_learning_rate_schedule_by_epoch_as_the_original():
    # 0.02 / 0.01 / 0.005 / 0.001 / 0.0001 as epoch / epochs passes 0.2, 0.4, 0.6, 0.8.
    rates = [sparse_mnist.learning_rate("Momentum", 16, e, 10) for e in range(10)]
    assert rates == [0.02, 0.02, 0.01, 0.01, 0.005, 0.005, 0.001, 0.001, 0.0001, 0.0001]
    assert [sparse_mnist.learning_rate("GradientDescent", 16, e, 3) for e in range(3)] == [
        0.02, 0.01, 0.001]  # progress 0, 1/3, 2/3
    assert sparse_mnist.learning_rate("Momentum", 32, 0, 10) == 0.01  # scaled by 16 / 32
    assert sparse_mnist.learning_rate("Adam", 8, 9, 10) == 0.004  # 0.002 * 16 / 8, constant



def test_run_plan_cuts_epochs_as_the_original():
    """An epoch's batches shared by the Rig-L steps, the remainder left out; or
    --batches-per-step-override N per step, from back-to-back passes of all batches."""
    def plan(*flags):
        args = sparse_mnist.parse_args(["--steps-per-epoch", "3", "--epochs", "2", *flags])
        return sparse_mnist.run_plan(args, n_train=160)  # 10 batches of 16

    shared = plan()
    assert (shared.segment_batches, shared.batches_per_pass, shared.total_segments) == (3, 9, 6)
    assert (shared.fit_steps_per_segment, shared.micro_batch) == (3, 16)
    override = plan("--batches-per-step-override", "7")
    assert (override.segment_batches, override.batches_per_pass) == (7, 10)
    accumulated = plan("--gradient-accumulation-count", "4")
    assert (accumulated.fit_steps_per_segment, accumulated.micro_batch) == (12, 4)
    with pytest.raises(sparse_mnist.UsageError, match="fewer than --steps-per-epoch"):
        sparse_mnist.run_plan(sparse_mnist.parse_args(["--steps-per-epoch", "11"]), 160)


def test_pixel_standardisation_matches_the_training_set(mnist):
    pixels = mnist[0].astype(np.float64) / 255.0
    assert pixels.mean() == pytest.approx(sparse_mnist.PIXEL_MEAN, abs=1e-4)
    assert pixels.std() == pytest.approx(sparse_mnist.PIXEL_STD, abs=1e-4)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_weight_decay_shrinks_connections_that_get_no_gradient(weight_decay):
    """Plain gradient descent: the weights into a unit that never fires get no gradient
    and follow w * (1 - lr * wd)^n; its bias is not decayed and stays put."""
    args = sparse_mnist.parse_args(["--densities", "0.5", "0.5", "--hidden-size", "16",
                                    "--droprate", "0", "--optimizer", "GradientDescent",
                                    "--weight-decay", str(weight_decay)])
    images, labels = images_and_labels(np.random.default_rng(0), 64)
    model = sparse_mnist.build_model(args, seed=5)
    fc1 = model.get_layer("fc1")
    fc1.bias.assign(np.r_[-1e3, np.zeros(15)].astype(np.float32))  # unit 0 never fires
    lr, steps = 0.04, 8
    model.optimizer.learning_rate.assign(lr)
    before = fc1.get_triplets()
    model.fit(images, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == steps
    after = fc1.get_triplets()
    idle = before.col_indices == 0
    assert 0 < idle.sum() < len(idle)
    expected = before.values[idle].astype(np.float64) * (1 - lr * weight_decay) ** steps
    np.testing.assert_allclose(after.values[idle], expected, rtol=1e-6)
    assert not np.allclose(after.values[~idle], before.values[~idle])  # the rest trained
    assert fc1.bias.numpy()[0] == -1e3


def test_each_trace_of_the_training_loop_computes_the_same_thing(mnist):
    """Same start, same batches: bit-identical weights and slots from three separate traces
    (weight decay and momentum on; Grappler once regrouped their adds per trace)."""
    x_train = mnist[0][:800].reshape(800, 784)
    y_train = mnist[1][:800].astype(np.int32)
    finals = []
    for _ in range(3):
        args = sparse_mnist.parse_args(["--densities", "0.1", "0.3", "--seed", "1",
                                        "--optimizer-arg", "momentum=0.9"])
        model = sparse_mnist.build_model(args, 1, steps_per_execution=25)
        model.fit(x_train, y_train, batch_size=16, epochs=1, shuffle=False, verbose=0)
        finals.append([v.numpy() for v in [*model.weights, *model.optimizer.variables]])
    for other in finals[1:]:
        for a, b in zip(finals[0], other):
            np.testing.assert_array_equal(a, b)


def numpy_sgd_step(x, labels, w1, b1, w2, b2, lr):
    """One plain SGD step of relu(x w1 + b1) w2 + b2 on the mean cross-entropy, float64."""
    z1 = x @ w1 + b1
    h = np.maximum(z1, 0)
    logits = h @ w2 + b2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dlogits = (p - np.eye(10)[labels]) / len(x)
    dh = dlogits @ w2.T * (z1 > 0)
    return (w1 - lr * x.T @ dh, b1 - lr * dh.sum(0), w2 - lr * h.T @ dlogits,
            b2 - lr * dlogits.sum(0))


def kernels(model):
    """[fc1 kernel, fc1 bias, fc2 kernel, fc2 bias] as float64, sparse layers densified."""
    arrays = []
    for name in ("fc1", "fc2"):
        layer = model.get_layer(name)
        kernel = layer.get_dense() if hasattr(layer, "get_dense") else layer.kernel.numpy()
        arrays += [kernel.astype(np.float64), layer.bias.numpy().astype(np.float64)]
    return arrays


@pytest.mark.parametrize("densities", [("1", "1"), ("0.5", "0.5")])
@pytest.mark.parametrize("accumulation", [1, 4])
def test_gradient_accumulation_is_one_step_on_the_whole_batch(accumulation, densities):
    """N micro-batches of 16 / N, averaged: the SGD step a numpy reference takes on all 16
    (kept to the pattern for sparse layers)."""
    args = sparse_mnist.parse_args(["--densities", *densities, "--hidden-size", "8",
                                    "--droprate", "0", "--optimizer", "GradientDescent",
                                    "--weight-decay", "0",
                                    "--gradient-accumulation-count", str(accumulation)])
    images, labels = images_and_labels(np.random.default_rng(2), 16)
    model = sparse_mnist.build_model(args, seed=3, steps_per_execution=accumulation)
    model.optimizer.learning_rate.assign(0.5)
    before = kernels(model)
    model.fit(images, labels, batch_size=16 // accumulation, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1
    expected = numpy_sgd_step(standardised(images), labels, *before, lr=0.5)
    for got, want, old in zip(kernels(model), expected, before):
        connected = (old != 0) if densities[0] != "1" and old.ndim == 2 else True
        np.testing.assert_allclose(got, np.where(connected, want, 0), rtol=1e-4, atol=1e-6)


def test_block_pixel_permutation_puts_each_block_on_one_tile():
    # Closed form: block size 16 covers 4x4 tiles, 8 covers 4x2, 4 covers 2x2, row-major.
    for block_size, (height, width) in ((16, (4, 4)), (8, (4, 2)), (4, (2, 2)), (1, (1, 1))):
        perm = sparse_mnist.pixel_permutation("block", block_size, seed=0)
        assert sorted(perm) == list(range(784))
        tiles_per_row = 28 // width
        for block in (0, 1, tiles_per_row, 37):
            tile_row, tile_col = divmod(block, tiles_per_row)
            want = [(tile_row * height + r) * 28 + tile_col * width + c
                    for r in range(height) for c in range(width)]
            assert list(perm[block * block_size:(block + 1) * block_size]) == want
    assert list(sparse_mnist.pixel_permutation("none", 16, 0)) == list(range(784))
    random = sparse_mnist.pixel_permutation("random", 1, 5)
    assert sorted(random) == list(range(784)) and list(random) != list(range(784))
    np.testing.assert_array_equal(random, sparse_mnist.pixel_permutation("random", 1, 5))


def test_permute_input_is_saved_and_undone_by_the_pictures(mnist, tmp_path):
    """The network sees x[:, perm]; the saved pixel_permutation.npy maps its rows back."""
    records_path = tmp_path / "records"
    argv = [*TINY, "--permute-input", "random", "--records-path", str(records_path)]
    train(argv, mnist)
    perm = np.load(records_path / "pixel_permutation.npy")
    np.testing.assert_array_equal(perm, sparse_mnist.pixel_permutation("random", 1, 5))
    assert visualise_connectivity.load_permutation(records_path) is not None
    dense = np.load(records_path / "weights_fc1_000002.npy")
    in_image_order = np.zeros(784)
    in_image_order[perm] = np.count_nonzero(dense, axis=1)  # row j is pixel perm[j]
    record = visualise_connectivity.record_from_dense(dense)
    counts = visualise_connectivity.connections_per_pixel(record, perm)
    np.testing.assert_array_equal(counts.reshape(-1), in_image_order)
    # The permutation is real: the inputs trained differ from an unpermuted run.
    plain = train([*TINY, "--records-path", str(tmp_path / "plain")], mnist)
    assert plain["test_loss"] != train(argv, mnist)["test_loss"]


def test_wandb_logs_when_installed_and_says_so_when_not(mnist, monkeypatch, caplog):
    calls = []

    class FakeRun:
        summary = {}

        def log(self, values, commit=True):
            calls.append((dict(values), commit))

        def finish(self):
            calls.append("finish")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    argv = [*TINY, "--use-wandb", "--wandb-project-name", "p", "--wandb-name", "n",
            "--wandb-tags", "a", "b"]
    results = train(argv, mnist)
    init, *logs, end = calls
    assert (init["project"], init["name"], init["tags"]) == ("p", "n", ["a", "b"])
    assert end == "finish" and FakeRun.summary["Test Accuracy"] == results["test_accuracy"]
    # Per Rig-L step: the prune share (not committed), then loss, accuracy and throughput.
    assert [sorted(v) for v, _ in logs] == [["Prune Schedule"], ["Accuracy", "Loss",
                                                                  "Throughput"]] * 2
    assert logs[0][0]["Prune Schedule"] == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert logs[2][0]["Prune Schedule"] == pytest.approx(0.0, abs=1e-12)  # the T-th update
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
    with caplog.at_level("WARNING"):
        train(argv, mnist)
    assert [r.message for r in caplog.records if "wandb" in r.message] == [
        "--use-wandb: the wandb package is not installed; nothing is logged to Weights & Biases"]


# ---- training ---------------------------------------------------------------------------

def test_end_to_end_accuracy_and_one_trace(mnist, capsys):
    results = train(["--densities", "0.1", "0.3", "--epochs", "1", "--seed", "1",
                     "--log-level", "WARNING"], mnist)
    assert results["test_accuracy"] > 0.9
    assert results["traces"] == 1  # 5 segments and 4 pattern updates, one trace
    assert results["samples"] == 60000


def test_same_seed_same_result_and_records(mnist, tmp_path):
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        folder = tmp_path / name
        argv = [*SMALL, "--seed", seed, "--records-path", str(folder / "records"),
                "--checkpoint-path", str(folder / "ckpt"), "--block-size", "4"]
        runs[name] = train(argv, mnist)
        runs[name]["records"] = records(folder / "records")
        runs[name]["final"] = final_checkpoint(runs[name]["run_folder"])[1]
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])
    assert_same_arrays(a["final"], b["final"])
    assert sorted(a["records"]) == sorted(b["records"])
    for name in a["records"]:
        assert_same_arrays(a["records"][name], b["records"][name])
    assert a["test_loss"] != c["test_loss"]
    assert not np.array_equal(a["final"]["fc1/metainfo"], c["final"]["fc1/metainfo"])
    assert a["traces"] == 1

    # Records: before training and after each of the T = 4 updates, named by update count,
    # the pattern (.npz) and, as the original, the dense weight (.npy).
    assert sorted(a["records"]) == [f"weights_fc1_{s:06d}.npz" for s in range(5)]
    dense = sorted(p.name for p in (tmp_path / "a" / "records").glob("weights_fc1_*.npy"))
    assert dense == [f"weights_fc1_{s:06d}.npy" for s in range(5)]
    loaded = visualise_connectivity.load_records(tmp_path / "a" / "records")
    assert [step for step, _ in loaded] == [0, 1, 2, 3, 4]
    counts = {len(record.row_indices) for _, record in loaded}
    assert counts == {round(0.1 * 196 * 80)}  # 4x4 blocks: nnz constant
    assert all(record.block_size == 4 for _, record in loaded)
    first, second = loaded[0][1], loaded[1][1]
    old = set(zip(first.row_indices, first.col_indices))
    grown = [i for i, pos in enumerate(zip(second.row_indices, second.col_indices))
             if pos not in old]
    assert grown, "the first update must move connections"
    assert not second.values[grown].any()  # grown blocks are recorded at value 0


def test_static_sparsity_never_changes_the_pattern(mnist, tmp_path):
    argv = [*SMALL, "--disable-pruning", "--checkpoint-path", str(tmp_path)]
    initial = sparse_mnist.build_model(sparse_mnist.parse_args(argv), 3).get_layer(
        "fc1").get_triplets()
    after = train(argv, mnist)["model"].get_layer("fc1").get_triplets()
    np.testing.assert_array_equal(after.row_indices, initial.row_indices)
    np.testing.assert_array_equal(after.col_indices, initial.col_indices)
    assert not np.array_equal(after.values, initial.values)  # it did train


@pytest.mark.parametrize("extra", [
    ["--regrow", "random"],
    ["--data-type", "fp16", "--block-size", "8", "--pooling-type", "MAX"],
    ["--block-size", "16", "--pooling-type", "NONE", "--optimizer", "adam"],
])
def test_variants_move_the_pattern_and_keep_its_size(mnist, tmp_path, extra):
    results = train([*SMALL, *extra, "--records-path", str(tmp_path)], mnist)
    assert np.isfinite(results["test_loss"]) and results["traces"] == 1
    loaded = visualise_connectivity.load_records(tmp_path)
    assert len(loaded) == 5
    assert len({len(record.row_indices) for _, record in loaded}) == 1
    patterns = [set(zip(r.row_indices, r.col_indices)) for _, r in loaded]
    assert all(a != b for a, b in zip(patterns[:-1], patterns[1:-1]))
    assert patterns[-1] == patterns[-2]  # the T-th update moves nothing
    if "fp16" in extra:
        assert loaded[-1][1].values.dtype == np.float16 and loaded[-1][1].block_size == 8


def run_script(args, **kwargs):
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def kill_at_random(args, delay_range, rng, after=None):
    """Start the script and SIGKILL it at a random moment; True if it was killed.

    The delay is drawn from delay_range and counted from the process start,
    or, if `after` is a glob pattern of paths, from the moment one appears.
    """
    proc = run_script(args)
    if after is not None:
        while not glob.glob(str(after)) and proc.poll() is None:
            time.sleep(0.005)
    delay = rng.uniform(*delay_range)
    try:
        proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    return proc.returncode == -signal.SIGKILL, delay


KILL_RUN = ["--densities", "0.1", "0.3", "--epochs", "2", "--steps-per-epoch", "8",
            "--train-samples", "8000", "--seed", "11", "--checkpoint-freq", "1",
            "--log-level", "WARNING"]


def test_kill_and_resume_latest_matches_uninterrupted_run(mnist, tmp_path):
    reference = tmp_path / "reference"
    expected = train([*KILL_RUN, "--checkpoint-path", str(reference / "ckpt"),
                      "--records-path", str(reference / "records")], mnist)

    rng = np.random.default_rng()
    # Between the first checkpoint (after epoch 1, 8 of 16 Rig-L steps) and the end of training,
    # updates, records and checkpoint writes included. On a busy machine the run may
    # finish first: then try again, aiming earlier.
    window = 0.8 * expected["train_seconds"]
    for attempt in range(4):
        resumed = tmp_path / f"resumed{attempt}"
        args = [*KILL_RUN, "--checkpoint-path", str(resumed / "ckpt"),
                "--records-path", str(resumed / "records")]
        killed, delay = kill_at_random(args, (0.0, window), rng,
                                       after=resumed / "ckpt" / "*" / "checkpoint.json")
        if killed:
            break
        window /= 3
    assert killed, "every run ended before it could be killed"
    restored = run_script([*args, "--resume-latest", "--log-level", "INFO"])
    out, err = restored.communicate(timeout=300)
    assert restored.returncode == 0, err
    assert f"restored {run_folder(resumed / 'ckpt')}; resuming at Rig-L step" in out
    assert (f"Test loss: {expected['test_loss']:.3f} Test accuracy: "
            f"{expected['test_accuracy']:.4f}") in out
    meta, arrays = final_checkpoint(run_folder(resumed / "ckpt"))
    ref_meta, ref_arrays = final_checkpoint(expected["run_folder"])
    assert_same_arrays(arrays, ref_arrays)
    assert meta["epochs_done"] == ref_meta["epochs_done"] == 2
    got, want = records(resumed / "records"), records(reference / "records")
    assert sorted(got) == sorted(want), f"killed {delay:.2f} s after the first checkpoint"
    for name in want:
        assert_same_arrays(got[name], want[name])
    assert not list((resumed / "ckpt").glob("**/.partial-*"))
    assert len(list(run_folder(resumed / "ckpt").glob("checkpoint-*.keras"))) == 1


@pytest.mark.slow
def test_repeated_kills_at_any_moment_then_restore(mnist, tmp_path):
    """Several kills in a row, at moments spread over start-up, training and writes."""
    reference = train([*KILL_RUN, "--checkpoint-path", str(tmp_path / "reference")], mnist)
    args = [*KILL_RUN, "--checkpoint-path", str(tmp_path / "ckpt"), "--resume-latest"]
    # Kill moments as a share of how long one whole run takes on this machine
    # (start-up included): fixed seconds miss the run entirely on a fast CPU.
    started = time.monotonic()
    timing = run_script([*KILL_RUN, "--checkpoint-path", str(tmp_path / "timing")])
    timing.communicate(timeout=300)
    assert timing.returncode == 0
    whole_run = time.monotonic() - started
    rng = np.random.default_rng()
    kills = 0
    for _ in range(6):
        killed, _ = kill_at_random(args, (0.2 * whole_run, 0.9 * whole_run), rng)
        kills += killed
    proc = run_script(args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert kills >= 1
    assert f"Test accuracy: {reference['test_accuracy']:.4f}" in out
    latest = sparse_mnist.latest_run_folder(tmp_path / "ckpt")
    assert_same_arrays(final_checkpoint(latest)[1], final_checkpoint(reference["run_folder"])[1])


# ---- failures ---------------------------------------------------------------------------

def run_main(argv, capsys):
    try:
        code = sparse_mnist.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


def bad_input_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (garbage / name).write_bytes(b"\0\0\x08\x01\0\0\0\x64truncated")  # 100 bytes said, 9 held
    return [
        (["--densities", "0", "1"], "fc1 density must be in (0, 1]"),
        (["--densities", "0.1", "1.5"], "fc2 density must be in (0, 1]"),
        (["--densities", "0.1"], "--densities"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--block-size", "16", "--hidden-size", "100"], "--block-size 16 does not divide"),
        (["--block-size", "3"], "invalid choice"),
        (["--optimizer-arg", "momentum=0.9.1"], "not valid JSON"),
        (["--optimizer-arg", "momentum"], "name=<json>"),
        (["--optimizer-arg", "learning_rate=1"], "schedule"),
        (["--optimizer-arg", "use_nesterov=1"], "use_nesterov must be true or false"),
        (["--optimizer-arg", "momentum=1.5"], "momentum must be finite and in [0, 1]"),
        (["--optimizer", "adam", "--optimizer-arg", "momentum=0.9"],
         "Adam has no option 'momentum'"),
        (["--records-path", str(a_file / "records")], "--records-path"),
        (["--checkpoint-path", str(a_file / "ckpt")], "--checkpoint-path"),
        (["--restore"], "expected one argument"),
        (["--restore", "run1"], "--restore needs --start-epoch"),
        (["--restore", "nosuch", "--start-epoch", "1", "--checkpoint-path", str(empty)],
         "no checkpoint named 'nosuch' in"),
        (["--start-epoch", "1"], "--start-epoch needs --restore"),
        (["--restore", "run1", "--start-epoch", "-1"], "--start-epoch must be in [0, --epochs 1]"),
        (["--restore", "run1", "--start-epoch", "1", "--resume-latest"], "exclude each other"),
        (["--cosine-prune-schedule", "{bad"], "not valid JSON"),
        (["--cosine-prune-schedule", "[1]"], "must be a JSON object"),
        (["--cosine-prune-schedule", '{"zero_step": 1}'], "unknown key 'zero_step'"),
        (["--cosine-prune-schedule", '{"zero_steps": 1.5}'], "zero_steps must be a whole number"),
        (["--cosine-prune-schedule", '{"period": "half"}'], "period must be a number"),
        (["--cosine-prune-schedule", '{"zero_steps": 5}', "--steps-per-epoch", "5"],
         "leaves none of the 5 Rig-L updates"),
        (["--permute-input", "diagonal"], "invalid choice"),
        (["--gradient-accumulation-count", "0"], "--gradient-accumulation-count must be >= 1"),
        (["--gradient-accumulation-count", "3"], "does not divide --batch-size 16"),
        (["--gradient-accumulation-count", "two"], "invalid int value"),
        (["--disable-dense-grad-override"], "leaves Rig-L regrowth no gradient"),
        (["--use-wandb"], "--use-wandb needs --wandb-project-name"),
        (["--wandb-tags"], "expected at least one argument"),
        (["--checkpoint-freq", "0"], "--checkpoint-freq must be >= 1"),
        (["--data-dir", str(empty)], "no train-images-idx3-ubyte"),
        (["--data-dir", str(garbage)], "truncated or padded"),
        (["--droprate", "1"], "--droprate"),
        (["--weight-decay", "-0.1"], "--weight-decay must be in [0, 1)"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--train-samples", "10", "--batch-size", "4", "--steps-per-epoch", "5"],
         "fewer than --steps-per-epoch"),
        (["--log-level", "LOUD"], "invalid choice"),
        (["--log", str(a_file / "run.log")], "--log"),
        (["--test-mode", "eval"], "invalid choice"),
        (["--single-train-step-only", "--test-mode", "tests"], "needs training"),
        (["--partials-type", "fp8"], "invalid choice"),
        (["--pipeline-schedule", "Fast"], "invalid choice"),
        (["--batches-per-step-override", "many"], "invalid int value"),
        (["--batches-per-step-override", "0"], "--batches-per-step-override must be >= 1"),
        (["--pipelining=yes"], "ignored explicit argument"),
        (["--distribute", "mirrored", "--replicas", "0"], "--replicas must be >= 1"),
        (["--distribute", "mirrored", "--batch-size", "15"], "does not split evenly over 2"),
        (["--distribute", "multi-worker", "--seed", "1"], "needs TF_CONFIG"),
        (["--distribute", "gpu"], "invalid choice"),
    ]


def test_bad_input_gives_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for argv, message in bad_input_cases(tmp_path):
        code, err = run_main([*argv, "--epochs", "1", "--log-level", "WARNING"], capsys)
        assert code not in (0, None), argv
        assert err.count("\n") == 1 and err.startswith("sparse_mnist.py: error:"), (argv, err)
        assert message in err, (argv, err)


def test_multi_worker_flags_need_a_cluster_and_one_seed(tmp_path, capsys, monkeypatch):
    two = '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", '
    for config, argv, message in [
            ("{", ["--seed", "1"], "TF_CONFIG is not"),
            (two + '"index": 2}}', ["--seed", "1"], "task worker:2 is not in its cluster"),
            (two + '"index": 1}}', [], "needs --seed"),
            (two + '"index": 1}}', ["--seed", "1", "--batch-size", "9"], "over 2 replicas"),
            (two + '"index": 1}}', ["--seed", "1", "--peer-timeout", "0"], "--peer-timeout")]:
        monkeypatch.setenv("TF_CONFIG", config)
        code, err = run_main(["--distribute", "multi-worker", *argv, "--epochs", "1"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (config, argv, err)


# ---- data-parallel runs: 2 replicas or 2 workers against one process at the same batch -------

DISTRIBUTED = [*SMALL, "--droprate", "0", "--batch-size", "32"]


def fc1_records(folder):
    return {name: (r["row_indices"], r["col_indices"], r["values"])
            for name, r in records(folder).items()}


def assert_same_records(a, b):
    assert sorted(a) == sorted(b) and len(a) == 5  # before training and after 4 updates
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
        np.testing.assert_allclose(a[name][2], b[name][2], rtol=1e-4, atol=1e-6, err_msg=name)


def test_distribute_defaults_to_one_process_without_a_strategy():
    args = sparse_mnist.parse_args(["--seed", "1"])
    assert args.distribute == "none" and args.replica_count == 1


@pytest.mark.slow
def test_mirrored_and_two_worker_runs_match_one_process(mnist, tmp_path):
    from ipu_sparse_ops.tools import local_cluster

    single = train([*DISTRIBUTED, "--records-path", str(tmp_path / "rec1"),
                    "--checkpoint-path", str(tmp_path / "ck1")], mnist)
    mirrored = subprocess.run(
        [sys.executable, str(SCRIPT), *DISTRIBUTED, "--distribute", "mirrored",
         "--records-path", str(tmp_path / "rec_m"), "--checkpoint-path", str(tmp_path / "ck_m")],
        cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    assert_same_records(fc1_records(tmp_path / "rec_m"), fc1_records(tmp_path / "rec1"))

    command = [sys.executable, str(SCRIPT), *DISTRIBUTED, "--distribute", "multi-worker",
               "--records-path", str(tmp_path / "rec_w"), "--checkpoint-path",
               str(tmp_path / "ck_w"), "--peer-timeout", "60"]
    workers = local_cluster.start_workers(command, 2, env=script_env(), threads=1, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
    try:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        local_cluster.stop_workers(workers)
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
        accuracy = float(out.split("Test accuracy: ")[1].split()[0])
        assert accuracy == pytest.approx(single["test_accuracy"], abs=2e-4)  # 2 of 10,000
    assert_same_records(fc1_records(tmp_path / "rec_w"), fc1_records(tmp_path / "rec1"))
    (folder,) = Path(tmp_path / "ck_w").iterdir()  # the chief's run; the other's went to a temp
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-0001.keras",
                                                        "checkpoint.json"]


@pytest.mark.slow
def test_a_worker_killed_mid_run_then_the_job_restarted_ends_as_one_process(mnist, tmp_path):
    from ipu_sparse_ops.tools import local_cluster

    flags = [*DISTRIBUTED, "--epochs", "6", "--steps-per-epoch", "2", "--train-samples", "2000"]
    single = train([*flags, "--records-path", str(tmp_path / "rec1"),
                    "--checkpoint-path", str(tmp_path / "ck1")], mnist)
    backup = tmp_path / "backup"
    command = [sys.executable, str(SCRIPT), *flags, "--distribute", "multi-worker",
               "--backup-dir", str(backup), "--records-path", str(tmp_path / "rec_w"),
               "--checkpoint-path", str(tmp_path / "ck_w"), "--peer-timeout", "60"]

    def start():
        return local_cluster.start_workers(command, 2, env=script_env(), threads=1, cwd=REPO,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
    workers = start()
    metadata = backup / "worker-1" / "training_metadata.json"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and workers[1].poll() is None:
            if metadata.exists() and '"epoch": 2' in metadata.read_text(errors="replace"):
                break  # two epochs backed up
            time.sleep(0.05)
        assert workers[1].poll() is None, "the job ended before a worker could be killed"
        os.kill(workers[1].pid, signal.SIGKILL)
    finally:
        local_cluster.stop_workers(workers)  # its peer cannot go on: the job is restarted
    workers = start()
    try:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        local_cluster.stop_workers(workers)
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
        trained = int(out.split("Throughput: ")[1].split("(")[1].split()[0])
        assert 0 < trained <= 4 * 62 * 32  # resumed after at least 2 of the 6 epochs
        accuracy = float(out.split("Test accuracy: ")[1].split()[0])
        assert accuracy == pytest.approx(single["test_accuracy"], abs=2e-4)
    last = max(fc1_records(tmp_path / "rec1"))
    a, b = fc1_records(tmp_path / "rec_w")[last], fc1_records(tmp_path / "rec1")[last]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[2], b[2], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_worker_whose_peer_dies_mid_run_stops_with_one_line_in_bounded_time(tmp_path):
    from ipu_sparse_ops.tools import local_cluster

    command = [sys.executable, str(SCRIPT), *DISTRIBUTED, "--epochs", "30", "--distribute",
               "multi-worker", "--peer-timeout", "20", "--log-level", "INFO",
               "--checkpoint-path", str(tmp_path / "ck")]
    workers = local_cluster.start_workers(command, 2, env=script_env(), threads=1, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
    try:
        for line in workers[0].stdout:
            if "Rig-L step 2/" in line:
                break
        assert workers[1].poll() is None, workers[1].stderr.read()[-3000:]
        os.kill(workers[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = workers[0].communicate(timeout=180)
        assert time.monotonic() - killed < 120  # the heartbeat timeout is 20 s
    finally:
        local_cluster.stop_workers(workers)
    assert workers[0].returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("sparse_mnist.py: training stopped: the cluster failed ("), err[-3000:]


# ---- flags of the original --------------------------------------------------------------

TINY = ["--densities", "0.1", "0.3", "--epochs", "1", "--steps-per-epoch", "2",
        "--train-samples", "800", "--seed", "5", "--log-level", "WARNING"]
IPU_ONLY_FLAGS = ["--partials-type", "fp16", "--disable-shared-buckets",
                  "--pipelining", "--pipeline-schedule", "Interleaved", "--on-demand"]


def test_ipu_only_flags_change_nothing(mnist, tmp_path):
    plain = train([*TINY, "--checkpoint-path", str(tmp_path / "plain")], mnist)
    ipu = train([*TINY, *IPU_ONLY_FLAGS, "--checkpoint-path", str(tmp_path / "ipu")], mnist)
    # --disable-dense-grad-override changes nothing where no dense gradient is needed.
    static = ["--disable-pruning", "--checkpoint-path"]
    runs = [train([*TINY, *static, str(tmp_path / "static")], mnist),
            train([*TINY, *static, str(tmp_path / "nograd"), "--disable-dense-grad-override"],
                  mnist)]
    for a, b in ((plain, ipu), runs):
        assert (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"])
        assert_same_arrays(final_checkpoint(a["run_folder"])[1],
                           final_checkpoint(b["run_folder"])[1])
    args = sparse_mnist.parse_args(IPU_ONLY_FLAGS + ["--pipelining"])
    assert args.ipu_only_given == ("--partials-type", "--disable-shared-buckets",
                                   "--pipelining", "--pipeline-schedule", "--on-demand")
    assert sparse_mnist.parse_args([]).ipu_only_given == ()


def test_log_table_and_the_ignored_flags_line(tmp_path):
    """--log FILE is the original's table: a header, then per Rig-L step the batches
    trained so far and that step's training accuracy."""
    log = tmp_path / "run.log"
    proc = run_script([*TINY, "--log-level", "INFO", "--log", str(log), "--on-demand",
                       "--partials-type", "fp32", "--checkpoint-path", str(tmp_path / "ckpt")])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    ignored = [line for line in out.splitlines() if "ignored on the CPU" in line]
    assert len(ignored) == 1 and ignored[0].endswith("INFO ignored on the CPU (IPU only): "
                                                      "--on-demand, --partials-type"), out
    lines = log.read_text().splitlines()
    assert lines[0] == "Iteration Density_0.1_0.3"
    # 800 images make 50 batches of 16, 25 per Rig-L step; accuracy as logged per step.
    logged = [float(line.split("acc ")[1].split()[0]) for line in out.splitlines()
              if "Rig-L step" in line]
    assert [int(line.split()[0]) for line in lines[1:]] == [25, 50]
    for line, accuracy in zip(lines[1:], logged):
        correct = float(line.split()[1]) * 25 * 16
        assert correct == round(correct) and round(float(line.split()[1]), 3) == accuracy


def test_batches_per_step_override_sets_the_loop_length(mnist, tmp_path):
    # 7 batches per Rig-L step, 2 steps per epoch, 2 epochs: 28 batches, crossing the end
    # of a 25-batch pass over 400 images.
    results = train([*TINY, "--train-samples", "400", "--epochs", "2",
                     "--batches-per-step-override", "7", "--log", str(tmp_path / "log")], mnist)
    assert results["samples"] == 28 * 16 and results["traces"] == 1
    lines = (tmp_path / "log").read_text().splitlines()
    assert [int(line.split()[0]) for line in lines[1:]] == [7, 14, 21, 28]


def test_test_mode_restore_and_single_step(mnist, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert sparse_mnist.main([*TINY, "--test-mode", "training",
                              "--checkpoint-path", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "Test loss" not in out and "Throughput" in out
    both = train(TINY, mnist)
    # tests only, from the named checkpoint: the result of training and testing in one run.
    name = run_folder(ckpt).name
    assert sparse_mnist.main([*TINY, "--test-mode", "tests", "--checkpoint-path", str(ckpt),
                              "--restore", name, "--start-epoch", "1"]) == 0
    out = capsys.readouterr().out
    assert (f"Test loss: {both['test_loss']:.3f} Test accuracy: "
            f"{both['test_accuracy']:.4f}") in out and "Throughput" not in out
    initial = train([*TINY, "--test-mode", "tests"], mnist)  # the untrained model
    assert initial["samples"] == 0 and initial["traces"] == 0
    assert initial["test_accuracy"] < 0.5 < both["test_accuracy"]

    single = tmp_path / "single"
    one = train([*TINY, "--single-train-step-only", "--checkpoint-path", str(single / "ckpt"),
                 "--records-path", str(single / "records"), "--log", str(single / "log")], mnist)
    # One device loop (the first Rig-L step, 25 batches), then stop: no update, no test.
    assert one["samples"] == 25 * 16 and one["traces"] == 1 and one["test_loss"] is None
    assert not (single / "ckpt").exists()
    assert sorted(records(single / "records")) == ["weights_fc1_000000.npz"]
    assert (single / "log").read_text() == "Iteration Density_0.1_0.3\n"


def test_restore_resumes_the_schedules_at_start_epoch(mnist, tmp_path, monkeypatch):
    """--restore NAME --start-epoch 1 from the checkpoint written after epoch 1 trains
    epoch 2 only and ends where the uninterrupted two-epoch run ends."""
    argv = [*TINY, "--epochs", "2"]
    full = train([*argv, "--checkpoint-path", str(tmp_path / "full")], mnist)
    save = sparse_mnist.save_checkpoint

    def save_and_keep_epoch_1(folder, *args):
        save(folder, *args)
        if args[2] == 1:  # epochs_done
            shutil.copytree(folder, tmp_path / "kept" / "epoch1")

    monkeypatch.setattr(sparse_mnist, "save_checkpoint", save_and_keep_epoch_1)
    train([*argv, "--checkpoint-path", str(tmp_path / "first")], mnist)
    monkeypatch.undo()
    half_written = tmp_path / "kept" / "epoch1" / ".partial-checkpoint-0002kill.keras"
    half_written.write_bytes(b"what a kill during a save leaves")
    resumed = train([*argv, "--checkpoint-path", str(tmp_path / "kept"), "--restore", "epoch1",
                     "--start-epoch", "1"], mnist)
    assert resumed["samples"] == 50 * 16 and resumed["run_folder"] == tmp_path / "kept" / "epoch1"
    assert resumed["test_loss"] == full["test_loss"]
    assert not half_written.exists()
    assert_same_arrays(final_checkpoint(resumed["run_folder"])[1],
                       final_checkpoint(full["run_folder"])[1])


def test_nan_loss_stops_training(mnist, capsys, monkeypatch):
    monkeypatch.setattr(sparse_mnist, "learning_rate", lambda *args: 1e30)
    code, err = run_main([*SMALL, "--disable-pruning"], capsys)  # Rig-L stops at a NaN too
    assert code == 1
    assert err.count("\n") == 1 and "the loss became NaN/Inf in Rig-L step" in err, err


def test_nan_dense_gradient_stops_before_touching_any_pattern():
    from ipu_sparse_ops import rigl
    from ipu_sparse_ops.keras import RigL

    args = sparse_mnist.parse_args([*SMALL, "--hidden-size", "32"])
    model = sparse_mnist.build_model(args, 3)
    layers = [model.get_layer("fc1"), model.get_layer("fc2")]
    callback = RigL(1, total_steps=3, seed=0)
    callback.set_model(model)
    callback.on_train_begin()
    before = [layer.get_triplets() for layer in layers]
    for layer in layers:
        layer.dense_grad.assign(np.ones(layer.dense_grad.shape, np.float32))
    good = layers[1].dense_grad.numpy()
    for bad in (np.nan, np.inf):
        grad = good.copy()
        grad[3, 4] = bad  # fc2's gradient is bad: fc1 must not change either
        layers[1].dense_grad.assign(grad)
        with pytest.raises(rigl.NonFiniteGradientError, match="fc2: .* NaN/Inf"):
            callback._update(1)
        for layer, old in zip(layers, before):
            after = layer.get_triplets()
            np.testing.assert_array_equal(after.row_indices, old.row_indices)
            np.testing.assert_array_equal(after.col_indices, old.col_indices)
    layers[1].dense_grad.assign(good)
    callback._update(1)
    # Update 1 of 3 moves ceil(ceil(0.3 * nnz) * 0.5 * (1 + cos(pi / 3))), 0.75 of the most:
    # fc1 784x32 at 0.1 (nnz 2509, at most 753), fc2 32x10 at 0.3 (nnz 96, at most 29).
    moved = {name: layer["moved"] for name, layer in callback.history[-1]["layers"].items()}
    assert moved == {"fc1": 565, "fc2": 22}
    assert [layer.nnz for layer in layers] == [2509, 96]


def test_corrupt_or_foreign_checkpoint_gives_one_line(mnist, tmp_path, capsys):
    folder = train([*SMALL, "--checkpoint-path", str(tmp_path)], mnist)["run_folder"]
    ckpt = folder
    restore = ["--checkpoint-path", str(tmp_path), "--restore", folder.name, "--start-epoch", "1"]
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    code, err = run_main([*SMALL, "--seed", "4", *restore], capsys)
    assert code == 2 and err.count("\n") == 1 and "belongs to another run: seed=3" in err, err
    npz = ckpt / meta["model"]
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    npz.write_bytes(bytes(blob))
    code, err = run_main([*SMALL, *restore], capsys)
    assert code == 2 and err.count("\n") == 1 and "corrupt checkpoint" in err, err
    (ckpt / "checkpoint.json").write_text("{not json")
    code, err = run_main([*SMALL, *restore], capsys)
    assert code == 2 and err.count("\n") == 1 and "corrupt checkpoint" in err, err


def test_script_runs_from_the_repo_root_without_pythonpath():
    for argv, message in ((["--densities", "0", "1"], "density must be in (0, 1]"),
                          (["--help"], None)):
        proc = run_script(argv)
        out, err = proc.communicate(timeout=120)
        if message is None:
            assert proc.returncode == 0 and "--steps-per-epoch" in out and not err
        else:
            assert proc.returncode == 2 and err.count("\n") == 1 and message in err, err
