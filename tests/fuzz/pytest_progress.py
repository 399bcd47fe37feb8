"""pytest plugin (`-p tests.fuzz.pytest_progress`) for run_asan.py: writes to
FUZZ_CASE_LOG which op builds the process loaded and which tests finished, so a
child that dies mid-run can be resumed with the tests it had not finished."""

import os

from tests.fuzz import loader


def _write(line):
    path = os.environ.get("FUZZ_CASE_LOG")
    if path:
        with open(path, "a") as log:
            log.write(line + "\n")


def pytest_collection_finish(session):
    # The test module is imported by now, so the op library is loaded.
    _write("LIBS " + " ".join(loader.loaded_libraries()))


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        if report.failed:  # now: a crash later in the process would lose pytest's summary
            _write("\n".join("| " + line for line in str(report.longrepr).splitlines()[-60:]))
        _write(f"TEST {report.nodeid.split('::')[-1]} {report.outcome} {report.duration:.1f}")
