"""The README's Keras example is examples/keras_rigl_mnist.py, and it reaches 97.5% on MNIST."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "keras_rigl_mnist.py"


def test_readme_shows_the_example_verbatim():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert EXAMPLE.read_text() in blocks


@pytest.mark.slow
def test_example_trains_mnist_past_97_5_percent():
    mnist_npz = REPO / "data" / "mnist.npz"
    assert mnist_npz.exists(), "run `make data` first"
    done = subprocess.run([sys.executable, str(EXAMPLE), str(mnist_npz)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy = float(re.search(r"Test accuracy: ([0-9.]+)", done.stdout).group(1))
    assert accuracy >= 0.975, done.stdout
