"""One stderr line for bad input, whether TensorFlow runs oneDNN or not.

With TF_ENABLE_ONEDNN_OPTS=1 TensorFlow writes its oneDNN notice to stderr on
import on any x86-64 CPU, so these tests fail without `tf_startup`'s filter
wherever they run, not only on CPUs where oneDNN is on by default.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ipu_sparse_ops import tf_startup
from test_sparse_mnist import bad_input_cases as sparse_mnist_bad_input_cases

REPO = Path(__file__).resolve().parents[1]
ONEDNN_NOTICE = "oneDNN custom operations are on"


def user_env(onednn: str, **extra) -> dict:
    """The environment of a user who set nothing but TF_ENABLE_ONEDNN_OPTS."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    return {**env, "PYTHONPATH": str(REPO), "TF_ENABLE_ONEDNN_OPTS": onednn, **extra}


def run(argv, env, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line(result, message, argv):
    assert result.returncode != 0, (argv, result.stdout[-500:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], (argv, result.stderr)


# ---- the filter on its own ----------------------------------------------------------------

CAPTURED = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796213827.489631    2766 port.cc:153] oneDNN custom operations are on.\n"
    "I0000 00:00:1796213827.553987    2766 cpu_feature_guard.cc:227] This TensorFlow binary\n"
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations.\n"
    "W0000 00:00:1796213827.600000    2766 some_file.cc:12] a warning\n"
    "E0000 00:00:1796213827.700000    2766 loader.cc:99] a real error\n"
    "continued on a second line\n"
    "a line that is not a TensorFlow log record\n"
)


def test_filter_drops_what_the_log_level_hides_and_keeps_the_rest():
    assert tf_startup.filter_startup_lines(CAPTURED, 2) == (
        "E0000 00:00:1796213827.700000    2766 loader.cc:99] a real error\n"
        "continued on a second line\n"
        "a line that is not a TensorFlow log record\n")
    at_warning = tf_startup.filter_startup_lines(CAPTURED, 1).splitlines()
    assert [line[:1] for line in at_warning[:2]] == ["W", "E"] and len(at_warning) == 4
    assert tf_startup.filter_startup_lines(CAPTURED, 0) == CAPTURED


def fake_tensorflow(tmp_path, body: str) -> Path:
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import os\n" + body)
    return package.parent


def test_a_failing_import_shows_everything_tensorflow_wrote(tmp_path):
    fake = fake_tensorflow(tmp_path, (
        "os.write(2, b'I0000 00:00:1.5 7 port.cc:1] an info line\\n')\n"
        "os.write(2, b'cannot load libtensorflow_framework.so.2\\n')\n"
        "raise ImportError('the real cause')\n"))
    result = run(["-c", "import ipu_sparse_ops.tf_startup"],
                 {**user_env("1"), "PYTHONPATH": f"{fake}:{REPO}"})
    assert result.returncode == 1
    assert "an info line" in result.stderr and "cannot load libtensorflow" in result.stderr
    assert "ImportError: the real cause" in result.stderr


def test_a_working_import_keeps_errors_and_drops_info(tmp_path):
    fake = fake_tensorflow(tmp_path, (
        "os.write(2, b'I0000 00:00:1.5 7 port.cc:1] an info line\\n')\n"
        "os.write(2, b'E0000 00:00:1.6 7 port.cc:2] an error line\\n')\n"))
    result = run(["-c", "import ipu_sparse_ops.tf_startup"],
                 {**user_env("1"), "PYTHONPATH": f"{fake}:{REPO}"})
    assert result.returncode == 0
    assert result.stderr == "E0000 00:00:1.6 7 port.cc:2] an error line\n"


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_real_tensorflow_imports_silently_and_keeps_onednn_as_asked(onednn):
    probe = ("from ipu_sparse_ops.tf_startup import onednn_enabled, tf\n"
             "print(onednn_enabled())\n")
    result = run(["-c", probe], user_env(onednn))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.strip() == {"0": "False", "1": "True"}[onednn]
    # Asked for TensorFlow's info lines, the user gets them: nothing is hidden beyond
    # what TF_CPP_MIN_LOG_LEVEL says (and so this test sees the notice it filters).
    verbose = run(["-c", probe], user_env(onednn, TF_CPP_MIN_LOG_LEVEL="0"))
    assert (ONEDNN_NOTICE in verbose.stderr) == (onednn == "1"), verbose.stderr


# ---- every script's bad input -------------------------------------------------------------

def script_cases(tmp_path):
    """(argv, message) of each script's bad input, TensorFlow loaded first where it can be."""
    empty = tmp_path / "empty"
    empty.mkdir()
    sweep = tmp_path / "sweep" / "results.json"
    return [
        (["sparse_transformer_rigl_mnist.py", "--data-dir", str(empty)],
         "no train-images-idx3-ubyte"),
        (["sparse_transformer_rigl_mnist.py", "--sparsity", "2"], "--sparsity must be in [0, 1)"),
        (["ipu_sparse_ops/tools/sparse_matmul.py", "--input-size", "18", "--block-size", "4"],
         "--input-size 18 must be a positive multiple"),
        (["ipu_sparse_ops/tools/transformer_numerics.py", "--sparsity", "1.5"], "--sparsity"),
        (["mnist_rigl/visualise_connectivity.py", "--records-path", str(empty)], str(empty)),
        (["mnist_rigl/experiment.py", "--output", str(sweep), "--seeds", "1", "--variants",
          "dense", "--epochs", "1", "--", "--data-dir", str(empty)], "1 run(s) failed"),
        (["mnist_rigl/result_plotter.py", "--results", str(tmp_path / "none.json")],
         "none.json"),
        (["mnist_rigl/mnist_data.py", "--prepare", "--data-dir", str(tmp_path / "nowhere")],
         "no train-images-idx3-ubyte"),
        (["bench/benchmark.py", "--repeats", "0"], "--repeats must be at least 1"),
    ]


def run_all(cases, env):
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda case: run(case[0], env), cases))


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_every_script_gives_one_line(tmp_path, onednn):
    # mnist_data must not find the real cache, so it runs with an empty home and data dir.
    env = user_env(onednn, HOME=str(tmp_path / "home"), IPU_SPARSE_OPS_DATA_DIR=str(tmp_path))
    cases = script_cases(tmp_path)
    for (argv, message), result in zip(cases, run_all(cases, env)):
        assert "Traceback" not in result.stderr, (argv, result.stderr)
        assert_one_line(result, message, argv)
    (sweep_log,) = (tmp_path / "sweep" / "logs").glob("project_dense_*_seed1_*.log")
    assert sweep_log.read_text().count("\n") == 1, sweep_log.read_text()


def test_every_sparse_mnist_bad_input_gives_one_line_with_onednn_on(tmp_path):
    cases = [(["mnist_rigl/sparse_mnist.py", *argv, "--epochs", "1"], message)
             for argv, message in sparse_mnist_bad_input_cases(tmp_path)]
    for (argv, message), result in zip(cases, run_all(cases, user_env("1"))):
        assert_one_line(result, message, argv)
        assert result.stderr.startswith("sparse_mnist.py: error:"), (argv, result.stderr)
