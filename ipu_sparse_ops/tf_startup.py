"""TensorFlow, imported once for the whole project, with its start-up lines filtered.

Project code gets TensorFlow from here (`from ipu_sparse_ops.tf_startup import tf`),
never by `import tensorflow` first, so that every script keeps its promise of one
clear stderr line for bad input.

Why: on CPUs where TensorFlow turns oneDNN on (AVX-512 VNNI and newer), importing
it writes INFO lines such as "oneDNN custom operations are on" and absl's "All
log messages before absl::InitializeLog() ..." notice to file descriptor 2,
before absl reads TF_CPP_MIN_LOG_LEVEL, so that variable cannot stop them. Here
the import runs with descriptor 2 sent to a temporary file; afterwards the lines
TF_CPP_MIN_LOG_LEVEL would have hidden (it defaults to 2: warnings and info) are
dropped and everything else (errors, fatal lines, anything that is not a
TensorFlow log line) is written back to stderr. A failed import writes back
everything. Nothing about TensorFlow's behaviour changes: oneDNN stays as
TF_ENABLE_ONEDNN_OPTS and the CPU make it.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# absl's C++ log line: severity letter, MMDD, hh:mm:ss.micros (before absl is
# initialised, 0000 00:00:<seconds since the epoch>), thread id, file:line].
_LOG_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ")
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}


def min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def filter_startup_lines(text: str, level: int) -> str:
    """The lines of `text` that TF_CPP_MIN_LOG_LEVEL=`level` lets through.

    A log record may span several lines (cpu_feature_guard's does): the lines
    after its first belong to it until the next record or notice starts.
    """
    kept = []
    keep = True
    for line in text.splitlines(keepends=True):
        record = _LOG_RECORD.match(line)
        if record:
            keep = _SEVERITY[record.group(1)] >= level
        elif line.rstrip("\n") == _ABSL_NOTICE:
            keep = level <= _SEVERITY["I"]  # it only announces the lines that follow
        if keep:
            kept.append(line)
    return "".join(kept)


def _import_tensorflow():
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    try:
        saved_stderr = os.dup(2)
    except OSError:  # no descriptor 2 to redirect
        import tensorflow
        return tensorflow
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            import tensorflow
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            sys.stderr.write(text if failed else filter_startup_lines(text, min_log_level()))
            sys.stderr.flush()
    return tensorflow


def onednn_enabled() -> bool | None:
    """Whether this process runs TensorFlow's oneDNN kernels (None if TF won't say)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


tf = _import_tensorflow()
