"""Every flag of Graphcore's original mnist_rigl/sparse_mnist.py (SDK 2.5 tree, commit
187775b), with its default and choices, as our parser must offer it.

The table is written out here from the original's argparse calls, so a changed
default in our script fails a test instead of silently changing what a user of
the original gets.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_rigl import sparse_mnist

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Flag checks make the default --checkpoint-path checkpoints; here, not in the repo."""
    monkeypatch.chdir(tmp_path)

# flag: (the original's default, its choices or None)
ORIGINAL_FLAGS = {
    "--test-mode": ("all", ["training", "tests", "all"]),
    "--densities": ([0.01, 1.0], None),
    "--droprate": (0.1, None),
    "--log": (None, None),
    "--seed": (None, None),
    "--checkpoint-path": ("checkpoints", None),
    "--checkpoint-freq": (1, None),
    "--batch-size": (16, None),
    "--gradient-accumulation-count": (1, None),
    "--pipelining": (False, None),
    "--steps-per-epoch": (5, None),
    "--epochs": (10, None),
    "--log-level": ("INFO", ["NOTSET", "INFO", "DEBUG", "WARNING", "ERROR", "CRITICAL"]),
    "--disable-pruning": (False, None),
    "--regrow": ("rigl", ["random", "rigl"]),
    "--prune-ratio": (0.3, None),
    "--records-path": (None, None),
    "--optimizer": ("Momentum", ["GradientDescent", "Momentum", "Adam"]),
    "--restore": (None, None),
    "--start-epoch": (None, None),
    "--data-type": ("fp32", ["fp32", "fp16"]),
    "--block-size": (1, [1, 4, 8, 16]),
    "--partials-type": ("fp32", ["fp32", "fp16"]),
    "--pooling-type": ("NONE", ["NONE", "AVG", "MAX", "SUM"]),
    "--disable-shared-buckets": (False, None),
    "--permute-input": ("none", ["none", "block", "random"]),
    "--hidden-size": (320, None),
    "--batches-per-step-override": (None, None),
    "--disable-dense-grad-override": (False, None),
    "--single-train-step-only": (False, None),
    "--pipeline-schedule": ("Grouped", ["Grouped", "Interleaved", "Sequential"]),
    "--cosine-prune-schedule": ({"zero_steps": 0, "phase_delay": 0, "period": 0.5}, None),
    "--on-demand": (False, None),
    "--use-wandb": (False, None),
    "--wandb-project-name": (None, None),
    "--wandb-tags": (None, None),
    "--wandb-name": (None, None),
    "--optimizer-arg": (None, None),  # append; no option given
}
# This project's own flags, each documented in the README.
OUR_FLAGS = {"--help", "--weight-decay", "--train-samples", "--data-dir", "--resume-latest",
             "--distribute", "--replicas", "--peer-timeout", "--backup-dir"}


def actions():
    return {option: action for action in sparse_mnist.build_parser()._actions
            for option in action.option_strings if option.startswith("--")}


def our_default(flag, action):
    default = action.default
    if flag == "--cosine-prune-schedule":
        return json.loads(default)
    if isinstance(default, Path):
        return str(default)
    if action.nargs == 0 and default is False:
        return False
    if flag == "--optimizer-arg" and default == []:
        return None  # append starts from [] here, None there: both mean "none given"
    return default


def test_every_flag_is_the_original_or_ours():
    assert set(actions()) == set(ORIGINAL_FLAGS) | OUR_FLAGS


@pytest.mark.parametrize("flag", sorted(ORIGINAL_FLAGS))
def test_original_default_and_choices(flag):
    default, choices = ORIGINAL_FLAGS[flag]
    action = actions()[flag]
    assert our_default(flag, action) == default
    if choices is not None:
        assert sorted(action.choices, key=str) == sorted(choices, key=str)


def test_help_lists_every_original_flag():
    result = subprocess.run([sys.executable, str(REPO / "mnist_rigl" / "sparse_mnist.py"),
                             "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ORIGINAL_FLAGS:
        assert flag in result.stdout, flag
    assert "IPU only; accepted and ignored on the CPU" in result.stdout


def test_original_optimizer_defaults_and_its_help_example():
    # build_optimizer's Momentum defaults, and `use_nesterov=false` from its help text.
    assert sparse_mnist.parse_args([]).optimizer_options == {"momentum": 0.0001,
                                                            "use_nesterov": True}
    args = sparse_mnist.parse_args(["--optimizer-arg", "use_nesterov=false"])
    assert args.optimizer_options == {"momentum": 0.0001, "use_nesterov": False}
    assert sparse_mnist.parse_args(["--optimizer", "Adam"]).optimizer_options == {}
    assert sparse_mnist.parse_args(["--optimizer", "GradientDescent"]).optimizer_options == {}
