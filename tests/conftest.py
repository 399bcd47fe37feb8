"""Test-session setup: the machine line at the start of every run, the PYTHONPATH the
scripts get, and logging put back after each test."""

import logging
import os
from pathlib import Path

import pytest

# The scripts the tests start import this checkout's packages, as `pip install .`
# or PYTHONPATH would give them to a user.
REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH"))))


def pytest_sessionstart(session):
    """Written even under -q, which hides pytest's own header."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_machine_line())


def _machine_line() -> str:
    from ipu_sparse_ops.machine import cpu_model
    from ipu_sparse_ops.tf_startup import onednn_enabled
    from tests.fuzz import loader

    ops, _, _ = loader.load()  # the build the fuzz suite's AddressSanitizer run asks for

    onednn = {True: "on", False: "off", None: "unknown"}[onednn_enabled()]
    forced = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    onednn += f" (TF_ENABLE_ONEDNN_OPTS={forced})" if forced is not None else " (TensorFlow's default)"
    return f"CPU {cpu_model()}; op kernels: {ops.kernel_isa()}; TensorFlow oneDNN: {onednn}"


@pytest.fixture(autouse=True)
def restore_root_logging():
    """A script's main() points the root logger at the sys.stdout of its test, a capture
    that is closed afterwards; later tests that log would write to the closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
