"""sparse_transformer_rigl_mnist.py under tf.distribute: 2 replicas (and, slow, 2 workers)
at global batch B against the one-process run at batch B, and its --distribute flag errors.

The distributed runs are subprocesses: MirroredStrategy splits the CPU into
logical devices before TensorFlow initialises, which this process's TensorFlow
already has. Without dropout the runs see the same masks (none) whatever the
replica count, so they must end with the same patterns, values within float
tolerance and the same test accuracy as the one-process run.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras
import sparse_transformer_rigl_mnist as script
from ipu_sparse_ops.keras import sparse_layers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sparse_transformer_rigl_mnist.py"
TEST_SAMPLES = 300
# 60 steps of a small model in 4 Rig-L segments (3 pattern updates), at a learning
# rate that moves the weights; no dropout: its masks depend on the replica count.
TINY = ["--train-samples", "960", "--test-samples", str(TEST_SAMPLES), "--nepochs", "1",
        "--steps-per-epoch", "4", "--random-seed", "5", "--hidden-length", "32",
        "--qkv-length", "8", "--attention-heads", "4", "--ff-length", "16",
        "--batch-size", "16", "--learning-rate", "0.01", "--dropout-keep-prob", "1",
        "--accuracy-threshold", "0", "--log-level", "WARNING"]


def script_env():
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")


def printed_figures(out: str) -> tuple[float, float]:
    """(test loss, test accuracy) as the script printed them."""
    found = re.search(r"Test loss: ([0-9.]+) Test accuracy: ([0-9.]+)", out)
    assert found, out[-2000:]
    return float(found.group(1)), float(found.group(2))


def saved_layers(folder: Path) -> dict:
    """{layer: (pattern, values)} of the model the run saved in `folder`."""
    import ipu_sparse_ops.transformer  # noqa: F401 - registers its layers for load_model

    model = keras.models.load_model(folder / script.CHECKPOINT_NAME, compile=False)
    return {layer.name: (layer.metainfo.numpy(), layer.nz_values.numpy())
            for layer in sparse_layers(model)}


def assert_same_end(run: tuple, single: tuple) -> None:
    """The same patterns, the values within float tolerance, the same test figures
    (one of the test images may flip on a last-bit difference)."""
    (layers, (loss, accuracy)), (single_layers, (single_loss, single_accuracy)) = run, single
    assert sorted(layers) == sorted(single_layers) and len(layers) == 6
    for name, (pattern, values) in layers.items():
        np.testing.assert_array_equal(pattern, single_layers[name][0], err_msg=name)
        np.testing.assert_allclose(values, single_layers[name][1], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    assert accuracy == pytest.approx(single_accuracy, abs=1.01 / TEST_SAMPLES)
    assert loss == pytest.approx(single_loss, abs=2e-3)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The run at the same global batch without a strategy (in this process)."""
    folder = tmp_path_factory.mktemp("one_process")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert script.main([*TINY, "--train-checkpoint-path", str(folder)]) == 0
    # The test patterns really moved from the initial ones: the comparison means something.
    initial = script.build_model(script.parse_args(TINY), 5)
    layers = saved_layers(folder)
    for layer in sparse_layers(initial):
        assert not np.array_equal(layer.metainfo.numpy(), layers[layer.name][0]), layer.name
    return layers, printed_figures(out.getvalue())


def test_two_mirrored_replicas_end_as_one_process_at_the_same_global_batch(one_process,
                                                                            tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--distribute", "mirrored", "--replicas", "2",
         "--train-checkpoint-path", str(tmp_path)],
        cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All asserts pass." in result.stdout
    assert_same_end((saved_layers(tmp_path), printed_figures(result.stdout)), one_process)


def test_distribute_defaults_to_one_process():
    args = script.parse_args([])
    assert (args.distribute, args.replica_count) == ("none", 1)


TWO_WORKERS = ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
               '"task": {"type": "worker", "index": 1}}')


@pytest.mark.parametrize("tf_config, argv, message", [
    (None, ["--distribute", "mirrored", "--batch-size", "15"],
     "--batch-size 15 does not split evenly over 2 replicas"),
    (None, ["--distribute", "mirrored", "--replicas", "3", "--batch-size", "16"],
     "--batch-size 16 does not split evenly over 3 replicas"),
    (None, ["--recipe", "fast", "--distribute", "mirrored", "--replicas", "3"],
     "--batch-size 32 does not split evenly over 3 replicas"),
    (None, ["--distribute", "mirrored", "--replicas", "0"], "--replicas must be >= 1, got 0"),
    (None, ["--distribute", "multi-worker"], "--distribute multi-worker needs TF_CONFIG"),
    (None, ["--distribute", "gpu"], "invalid choice"),
    (None, ["--replicas", "two"], "invalid int value"),
    ("{", ["--distribute", "multi-worker"], "TF_CONFIG is not"),
    (TWO_WORKERS, ["--distribute", "multi-worker", "--batch-size", "9"],
     "--batch-size 9 does not split evenly over 2 replicas"),
    (TWO_WORKERS, ["--distribute", "multi-worker", "--peer-timeout", "0"],
     "--peer-timeout must be > 0, got 0"),
])
def test_bad_distribute_flags_are_one_line(tf_config, argv, message, capsys, monkeypatch):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{script.PROG}: error:"), err
    assert message in err, err


def test_bad_distribute_flag_from_the_config_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = tmp_path / "flags.json"
    config.write_text('{"distribute": "mirrored", "batch_size": 7}')
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--config-file", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 7 does not split evenly over 2" in err, err


@pytest.mark.slow
def test_two_workers_end_as_one_process_and_only_the_chief_saves(one_process, tmp_path):
    from ipu_sparse_ops.tools import local_cluster

    folder = tmp_path / "ckpt"
    command = [sys.executable, str(SCRIPT), *TINY, "--distribute", "multi-worker",
               "--peer-timeout", "60", "--train-checkpoint-path", str(folder)]
    workers = local_cluster.start_workers(command, 2, env=script_env(), threads=1, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
    try:
        outputs = [worker.communicate(timeout=600) for worker in workers]
    finally:
        local_cluster.stop_workers(workers)
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    layers = saved_layers(folder)  # the chief's; worker 1 saved into a temporary folder
    saved = Path(script.CHECKPOINT_NAME)
    assert sorted(p.name for p in folder.iterdir()) == [saved.with_suffix(".json").name,
                                                        saved.name]
    for out, _ in outputs:
        assert_same_end((layers, printed_figures(out)), one_process)
