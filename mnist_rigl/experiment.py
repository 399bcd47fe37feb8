"""Sweep: dense vs static sparsity vs random regrowth (SET) vs Rig-L on MNIST, over seeds.

Each run is `sparse_mnist.py` in a subprocess; its test loss, accuracy and
throughput go into one JSON file, rewritten atomically after every run. Rerun
the same command after an interruption and finished runs are skipped (a run
is finished when it succeeded with exactly the same arguments). Then turn the
JSON into a table and a plot with result_plotter.py.

Examples:
    python mnist_rigl/experiment.py --output sweep/results.json
    python mnist_rigl/experiment.py --output quick.json --epochs 1 --seeds 1
    python mnist_rigl/experiment.py --output adam.json -- --optimizer Adam
    python mnist_rigl/result_plotter.py --results sweep/results.json
"""

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root; no PYTHONPATH needed

from ipu_sparse_ops.training_run import write_atomically  # noqa: E402

logger = logging.getLogger("experiment")

PROG = "experiment.py"
SCRIPT = Path(__file__).resolve().with_name("sparse_mnist.py")
RESULTS_VERSION = 1
VARIANTS = ("dense", "static", "random", "rigl")
TEST_LINE = re.compile(r"^Test loss: (\S+) Test accuracy: (\S+)$", re.MULTILINE)
THROUGHPUT_LINE = re.compile(r"^Throughput: (\d+(?:\.\d+)?) samples/s", re.MULTILINE)


class SweepError(Exception):
    """A bad flag or results file; one line for the user."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}\n")


def variant_args(variant: str, densities: list[str]) -> list[str]:
    """The sparse_mnist.py flags that make each variant."""
    if variant == "dense":
        return ["--densities", "1", "1"]
    sparse = ["--densities", *densities]
    return {"static": [*sparse, "--disable-pruning"],
            "random": [*sparse, "--regrow", "random"],
            "rigl": [*sparse, "--regrow", "rigl"]}[variant]


def planned_runs(args: argparse.Namespace) -> list[dict]:
    densities = [f"{d:g}" for d in args.densities]
    return [{"key": f"{variant}/seed{seed}", "variant": variant, "seed": seed,
             "args": [*variant_args(variant, densities), "--seed", str(seed),
                      "--epochs", str(args.epochs), *args.extra]}
            for variant in args.variants for seed in args.seeds]


def load_results(path: Path) -> dict:
    if not path.exists():
        return {"version": RESULTS_VERSION, "runs": {}}
    try:
        results = json.loads(path.read_text())
        if results.get("version") != RESULTS_VERSION or not isinstance(results.get("runs"), dict):
            raise ValueError(f"not a version {RESULTS_VERSION} sweep results file")
    except (OSError, ValueError, AttributeError) as e:
        raise SweepError(f"cannot resume from {path}: {e}; move it away to start afresh") from None
    return results


def save_results(path: Path, results: dict) -> None:
    """Atomically, so a kill leaves the last good file."""
    write_atomically(path, lambda f: f.write(json.dumps(results, indent=1).encode()))


def run_one(run: dict, log_dir: Path) -> dict:
    """Run sparse_mnist.py once; the record to store (status "done" or "failed")."""
    command = [sys.executable, str(SCRIPT), *run["args"]]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = log_dir / f"{run['variant']}_seed{run['seed']}.log"
    log.write_text(proc.stdout + proc.stderr)
    record = {"variant": run["variant"], "seed": run["seed"], "args": run["args"],
              "wall_seconds": round(wall, 1), "log": str(log)}
    test = TEST_LINE.search(proc.stdout)
    if proc.returncode != 0 or test is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**record, "status": "failed", "error": f"exit {proc.returncode}: {last}"}
    throughput = THROUGHPUT_LINE.search(proc.stdout)
    return {**record, "status": "done", "test_loss": float(test[1]),
            "test_accuracy": float(test[2]),
            "samples_per_second": float(throughput[1]) if throughput else None}


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG, description="Sweep dense, static, random-regrowth and Rig-L MNIST runs "
        "over seeds; resumable. Arguments after -- go to every sparse_mnist.py run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("sweep/results.json"),
                        help="results JSON (its folder also gets one log per run)")
    parser.add_argument("--densities", type=float, nargs=2, default=[0.1, 0.3],
                        metavar=("FC1", "FC2"), help="densities of the sparse variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs still to do and stop")
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        for density in args.densities:
            if not 0.0 < density <= 1.0:
                raise SweepError(f"--densities must be in (0, 1], got {density:g}")
        if args.epochs < 1:
            raise SweepError(f"--epochs must be >= 1, got {args.epochs}")
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            log_dir = args.output.parent / "logs"
            log_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise SweepError(f"cannot create {args.output.parent}: {e.strerror or e}") from None
        results = load_results(args.output)
        runs = planned_runs(args)
        todo = [run for run in runs
                if not (results["runs"].get(run["key"], {}).get("status") == "done"
                        and results["runs"][run["key"]]["args"] == run["args"])]
        logger.info("%d runs planned, %d already done, %d to do", len(runs),
                    len(runs) - len(todo), len(todo))
        if args.dry_run:
            for run in todo:
                print(" ".join(["python", "mnist_rigl/sparse_mnist.py", *run["args"]]))
            return 0
        failed = 0
        for i, run in enumerate(todo, start=1):
            logger.info("[%d/%d] %s: sparse_mnist.py %s", i, len(todo), run["key"],
                        " ".join(run["args"]))
            record = run_one(run, log_dir)
            results["runs"][run["key"]] = record
            save_results(args.output, results)
            if record["status"] == "done":
                logger.info("[%d/%d] %s: test accuracy %.4f, loss %.3f, %.0f s", i, len(todo),
                            run["key"], record["test_accuracy"], record["test_loss"],
                            record["wall_seconds"])
            else:
                failed += 1
                logger.warning("[%d/%d] %s failed (%s); see %s", i, len(todo), run["key"],
                               record["error"], record["log"])
    except (SweepError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"{PROG}: error: {failed} run(s) failed; rerun to retry them", file=sys.stderr)
        return 1
    logger.info("results in %s; plot them with: python mnist_rigl/result_plotter.py "
                "--results %s", args.output, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
