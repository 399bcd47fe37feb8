#!/usr/bin/env python3
"""Runs tests/test_fuzz_op.py in a child process, by default against the
AddressSanitizer build with the ASan runtime preloaded, and counts the cases.

    python tests/fuzz/run_asan.py --library build/asan/libsparse_matmul_ops.so \
        --host-utils build/asan/host_utils*.so          # what `make test-fuzz-asan` runs
    python tests/fuzz/run_asan.py --no-asan --survey    # count every bug of the normal build

Exit status 0 only if every case passed, no child crashed and ASan reported
nothing. --survey records wrong results instead of stopping at the first
(FUZZ_SURVEY=1) and restarts a child that crashed with the tests it had not
finished, so one run counts every failing case.
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "tests" / "test_fuzz_op.py"


def suite_tests() -> list[str]:
    tree = ast.parse(SUITE.read_text())
    return [node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


def compiler_file(name: str) -> str:
    cxx = os.environ.get("CXX", "g++")
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        raise SystemExit(f"{cxx} does not know where {name} is (got {path!r})")
    return path


def child_env(args, log: Path, asan_dir: Path, isa: str | None) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), HYPOTHESIS_PROFILE=args.profile, FUZZ_CASE_LOG=str(log),
               TF_CPP_MIN_LOG_LEVEL="3")
    if args.max_examples:
        env["FUZZ_MAX_EXAMPLES"] = str(args.max_examples)
    if args.survey:
        env["FUZZ_SURVEY"] = "1"
    if isa:
        env["IPU_SPARSE_OPS_ISA"] = isa
    if args.library:
        env["IPU_SPARSE_OPS_LIBRARY"] = str(Path(args.library).resolve())
    if args.host_utils:
        env["IPU_SPARSE_OPS_HOST_UTILS"] = str(Path(args.host_utils).resolve())
    if not args.no_asan:
        # libstdc++ right after the runtime: python is not linked against it, and
        # ASan's __cxa_throw interceptor needs the real one at start-up.
        env["LD_PRELOAD"] = " ".join([compiler_file("libasan.so"), compiler_file("libstdc++.so")]
                                     + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
        # Python and TensorFlow keep memory until exit by design: no leak check.
        env["ASAN_OPTIONS"] = ":".join([
            "detect_leaks=0", "halt_on_error=1", "exitcode=86", "allocator_may_return_null=1",
            "detect_odr_violation=0", "handle_segv=1", "handle_sigfpe=1", "symbolize=1",
            f"log_path={asan_dir / 'asan'}"])
    return env


def run_children(args, isa: str | None, workdir: Path) -> dict:
    """Runs the suite until every test finished (or crashed too often); returns the tallies."""
    log = workdir / f"cases-{isa or 'default'}.log"
    asan_dir = workdir / f"asan-{isa or 'default'}"
    asan_dir.mkdir()
    remaining = [t for t in suite_tests() if not args.k or args.k in t]
    crashes_per_test = collections.Counter()
    crashes, children, libs = [], 0, set()
    while remaining:
        children += 1
        start = len(log.read_text().splitlines()) if log.exists() else 0
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "-p", "tests.fuzz.pytest_progress", "-W", "ignore::DeprecationWarning",
                   *(f"{SUITE}::{t}" for t in remaining)]
        if not args.survey:
            command.insert(4, "-x")
        if not args.no_asan:  # ASan reports deadly signals with the C++ stack; faulthandler would get there first
            command[4:4] = ["-p", "no:faulthandler"]
        stderr_path = workdir / f"child-{children}.stderr"
        with open(stderr_path, "w") as stderr:
            proc = subprocess.run(command, cwd=REPO, env=child_env(args, log, asan_dir, isa),
                                  stdout=stderr, stderr=subprocess.STDOUT)
        lines = log.read_text().splitlines() if log.exists() else []
        new = lines[start:]
        finished = {line.split()[1] for line in new if line.startswith("TEST ")}
        libs.update(p for line in new if line.startswith("LIBS ") for p in line.split()[1:])
        failed = [line for line in new if line.startswith("TEST ") and line.split()[2] == "failed"]
        died = proc.returncode not in (0, 1)  # pytest: 0 passed, 1 tests failed
        if failed or died:
            print(stderr_path.read_text()[-6000:], file=sys.stderr)
        if died:  # pytest never printed the failures it had seen: the plugin logged them
            print("\n".join(line[2:] for line in new if line.startswith("| ")), file=sys.stderr)
        if died:
            begin = [line for line in new if line.startswith(("BEGIN ", "END "))]
            last_case = begin[-1] if begin and begin[-1].startswith("BEGIN ") else "(outside a case)"
            test = last_case.split()[1] if last_case.startswith("BEGIN ") else "?"
            reports = sorted(asan_dir.glob("asan.*"))
            summary = [l for r in reports for l in r.read_text().splitlines() if l.startswith("SUMMARY:")]
            crashes.append(dict(returncode=proc.returncode, case=last_case, asan=summary))
            print(f"\n*** child died (return code {proc.returncode}) in case: {last_case[:2000]}",
                  file=sys.stderr)
            for report in reports:
                print(report.read_text()[:8000], file=sys.stderr)
                report.rename(report.with_name(f"reported-{children}-{report.name}"))
            # The test the case belonged to: the node that was running.
            running = [t for t in remaining if t not in finished]
            if running:
                crashes_per_test[running[0]] += 1
                if not args.survey or crashes_per_test[running[0]] > args.max_restarts:
                    finished.add(running[0])
            if not args.survey:
                remaining = []
        remaining = [t for t in remaining if t not in finished]
        if not args.survey and failed:
            remaining = []
    return dict(log=log, crashes=crashes, children=children, libs=libs)


def tally(log: Path):
    ends = [line for line in log.read_text().splitlines() if line.startswith("END ")] if log.exists() else []
    per_kind = collections.Counter()
    bugs = []
    for line in ends:
        head, _, problem = line.partition(" | ")
        _, test, op, kind, outcome, _secs = head.split()[:6]
        per_kind[(test, op, kind, outcome)] += 1
        if outcome == "BUG":
            bugs.append(f"{test} {op}: {problem[:400]}")
    tests = [line.split()[1:3] for line in log.read_text().splitlines() if line.startswith("TEST ")] \
        if log.exists() else []
    return ends, per_kind, bugs, tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", help="libsparse_matmul_ops.so to load instead of ipu_sparse_ops/'s")
    parser.add_argument("--host-utils", help="host_utils*.so to load instead of ipu_sparse_ops/'s")
    parser.add_argument("--no-asan", action="store_true", help="do not preload the ASan runtime")
    parser.add_argument("--profile", default="asan", help="HYPOTHESIS_PROFILE: default, asan or long")
    parser.add_argument("--max-examples", type=int, help="examples per property (overrides the profile)")
    parser.add_argument("--isa", default="best", help="comma-separated kernels, one fuzz run each: best (what "
                                                      "the CPU dispatch picks), generic, avx2, avx512")
    parser.add_argument("--survey", action="store_true", help="count every failing case instead of stopping")
    parser.add_argument("--max-restarts", type=int, default=3, help="survey: crashes tolerated per test")
    parser.add_argument("-k", default="", help="only the tests whose name contains this")
    parser.add_argument("--keep", help="directory for the case logs and ASan reports (default: temporary)")
    args = parser.parse_args()
    if not args.no_asan and not args.library:
        parser.error("--library (the ASan build) is required unless --no-asan")

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="fuzz-asan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    status = 0
    for isa in (args.isa.split(",") if args.isa else ["best"]):
        isa = None if isa == "best" else isa
        started = time.monotonic()
        result = run_children(args, isa, workdir)
        ends, per_kind, bugs, tests = tally(result["log"])
        elapsed = time.monotonic() - started
        label = f"kernels={isa or 'best'}" + ("" if args.no_asan else " under ASan")
        print(f"\n== fuzz {label}: {len(ends)} op calls in {elapsed:.0f} s, {result['children']} child process(es)")
        print("   loaded: " + ", ".join(sorted(result["libs"])))
        if args.library and str(Path(args.library).resolve()) not in result["libs"]:
            print(f"   ERROR: {args.library} was not the library the child loaded")
            status = 1
        for (test, op, kind, outcome), n in sorted(per_kind.items()):
            print(f"   {n:6d}  {test:20s} {op:16s} {kind:8s} {outcome}")
        print(f"   tests: " + ", ".join(f"{name} {outcome}" for name, outcome in tests))
        print(f"   wrong results: {len(bugs)}, crashed cases: {len(result['crashes'])}, "
              f"ASan reports: {sum(bool(c['asan']) for c in result['crashes'])}")
        for bug in bugs[:50]:
            print("   BUG   " + bug)
        for crash in result["crashes"]:
            print(f"   CRASH rc={crash['returncode']} {' '.join(crash['asan'])} :: {crash['case'][:600]}")
        if bugs or result["crashes"] or any(outcome == "failed" for _, outcome in tests):
            status = 1
    print(f"\n(case logs and ASan reports: {workdir})")
    return status


if __name__ == "__main__":
    sys.exit(main())
