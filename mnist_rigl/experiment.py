"""Sweeps of MNIST runs: dense vs static sparsity vs random regrowth (SET) vs Rig-L.

Each run is `sparse_mnist.py` in a subprocess; its test loss, accuracy and
throughput go into one JSON file, rewritten atomically after every run. Rerun
the same command after an interruption and finished runs are skipped (a run
is finished when it succeeded with exactly the same arguments). Several sweeps
can share one file: a run two sweeps both need (the dense baseline, say) runs
once and is tagged with both. Then turn the JSON into a table and plots with
result_plotter.py.

Three sweeps, each over --variants and --seeds:
    seeds    at --densities FC1 FC2 (the table of results; like experiment.sh)
    density  fc1 over --fc1-densities, fc2 over --fc2-densities (default 1, so
             only fc1 is sparse). The original's sparsity_sweep.sh ran SET on the
             grid of fc1 x fc2 densities; pass several --fc2-densities for that.
    block    fc1 block size over --block-sizes at --densities (default 0.01 1, as
             the original's block_sweep.sh); the pooling type is the recipe's.

Two recipes:
    original  sparse_mnist.py's defaults, the original's (no flags)
    project   this project's recipe, the flags `make mnist` passes (PROJECT_FLAGS)

Examples:
    python -m mnist_rigl.experiment --output sweep/results.json
    python -m mnist_rigl.experiment --recipe original --densities 0.01 1
    python -m mnist_rigl.experiment --sweep density --seeds 1
    python -m mnist_rigl.experiment --sweep block --seeds 1 --epochs 5
    python -m mnist_rigl.experiment --output adam.json -- --optimizer Adam
    python -m mnist_rigl.result_plotter --results sweep/results.json
"""

import argparse
import hashlib
import json
import logging
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from ipu_sparse_ops.training_run import write_atomically

logger = logging.getLogger("experiment")

PROG = "experiment.py"
RESULTS_VERSION = 2
VARIANTS = ("dense", "static", "random", "rigl")
SWEEPS = ("seeds", "density", "block")
# Kept in step with MNIST_RECIPE in the Makefile.
PROJECT_FLAGS = ("--pooling-type", "SUM", "--optimizer-arg", "momentum=0.9",
                 "--optimizer-arg", "use_nesterov=false",
                 "--cosine-prune-schedule", '{"zero_steps": 1}')
RECIPES = {"original": (), "project": PROJECT_FLAGS}
FC1_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
BLOCK_SIZES = (1, 4, 8, 16)
DEFAULT_DENSITIES = {"seeds": (0.1, 0.3), "density": (0.1, 0.3), "block": (0.01, 1.0)}
TEST_LINE = re.compile(r"^Test loss: (\S+) Test accuracy: (\S+)$", re.MULTILINE)
THROUGHPUT_LINE = re.compile(r"^Throughput: (\d+(?:\.\d+)?) samples/s", re.MULTILINE)
CHIEF_PREFIX = "[worker 0] "  # local_cluster's prefix of the chief's lines


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


def _configurations(args: argparse.Namespace) -> list[tuple[float, float, int | None]]:
    """(fc1 density, fc2 density, block size or None) of each sparse point of the sweep."""
    fc1, fc2 = args.densities
    if args.sweep == "density":
        return [(d1, d2, None) for d2 in args.fc2_densities for d1 in args.fc1_densities]
    if args.sweep == "block":
        return [(fc1, fc2, block) for block in args.block_sizes]
    return [(fc1, fc2, None)]


def planned_runs(args: argparse.Namespace) -> list[dict]:
    """Every run the sweep needs, once each, dense first (it is every plot's baseline).

    A run's key is its whole sparse_mnist.py command line, so runs that differ in
    any flag (epochs, recipe, extra flags) never overwrite each other.
    """
    runs = {}
    for variant in args.variants:
        points = [(1.0, 1.0, None)] if variant == "dense" else _configurations(args)
        for fc1, fc2, block in points:
            for seed in args.seeds:
                flags = variant_args(variant, [f"{fc1:g}", f"{fc2:g}"])
                if block not in (None, 1):  # block 1 is the default: same run as elsewhere
                    flags += ["--block-size", str(block)]
                flags += ["--seed", str(seed), "--epochs", str(args.epochs),
                          *RECIPES[args.recipe], *args.extra]
                if args.workers:
                    flags += ["--distribute", "multi-worker"]
                key = shlex.join(local_cluster(args.workers) + flags)
                runs[key] = {"key": key, "variant": variant, "seed": seed,
                             "recipe": args.recipe, "densities": [fc1, fc2],
                             "block_size": block or 1, "epochs": args.epochs,
                             "workers": args.workers, "extra": list(args.extra), "args": flags}
    return list(runs.values())


def local_cluster(workers: int | None) -> list[str]:
    """The launcher of a run on `workers` local workers of one thread each ([] for none)."""
    if not workers:
        return []
    return [sys.executable, "-m", "ipu_sparse_ops.tools.local_cluster", "--workers",
            str(workers), "--threads", "1", "--"]


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


def _log_name(run: dict) -> str:
    # The hash keeps runs apart that differ only in extra flags.
    digest = hashlib.sha1(run["key"].encode()).hexdigest()[:8]
    fc1, fc2 = run["densities"]
    workers = f"_w{run['workers']}" if run.get("workers") else ""
    return (f"{run['recipe']}_{run['variant']}_{fc1:g}_{fc2:g}_b{run['block_size']}"
            f"{workers}_seed{run['seed']}_{digest}.log")


def run_one(run: dict, log_dir: Path) -> dict:
    """Run sparse_mnist.py once; the record to store (status "done" or "failed").

    Checkpoints go to a temporary folder: sparse_mnist.py's default, checkpoints/,
    would make every run after the first resume the first one's checkpoint.
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="experiment_ckpt_") as ckpt:
        # Our --checkpoint-path first, so one in the extra flags still wins.
        command = [*local_cluster(run.get("workers")), sys.executable, "-m",
                   "mnist_rigl.sparse_mnist", "--checkpoint-path", ckpt, *run["args"]]
        proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = log_dir / _log_name(run)
    log.write_text(proc.stdout + proc.stderr)
    record = {k: v for k, v in run.items() if k != "key"}
    record.update(wall_seconds=round(wall, 1), log=str(log))
    stdout = proc.stdout
    if run.get("workers"):  # the chief's lines only
        stdout = "\n".join(line.removeprefix(CHIEF_PREFIX) for line in stdout.splitlines()
                           if line.startswith(CHIEF_PREFIX))
    test = TEST_LINE.search(stdout)
    if proc.returncode != 0 or test is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**record, "status": "failed", "error": f"exit {proc.returncode}: {last}"}
    throughput = THROUGHPUT_LINE.search(stdout)
    return {**record, "status": "done", "test_loss": float(test[1]),
            "test_accuracy": float(test[2]),
            "samples_per_second": float(throughput[1]) if throughput else None}


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG, description="Sweep dense, static, random-regrowth (SET) and Rig-L MNIST "
        "runs over seeds, fc1 density or fc1 block size; resumable. Arguments after -- go to "
        "every sparse_mnist.py run.", epilog="recipes: original = sparse_mnist.py's defaults "
        "(the original's); project = " + shlex.join(PROJECT_FLAGS) + " (as make mnist). "
        "Every sweep also runs the dense model (densities 1 1) as its baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("sweep/results.json"),
                        help="results JSON, shared by sweeps (its folder gets logs/)")
    parser.add_argument("--sweep", choices=SWEEPS, default="seeds",
                        help="seeds: one configuration; density: over --fc1-densities x "
                        "--fc2-densities; block: over --block-sizes")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="project",
                        help="original: no flags; project: this project's recipe (epilog)")
    parser.add_argument("--densities", type=float, nargs=2, default=argparse.SUPPRESS,
                        metavar=("FC1", "FC2"), help="densities of the sparse variants in "
                        "the seeds and block sweeps (default: 0.1 0.3; block: 0.01 1, "
                        "as the original's block_sweep.sh)")
    parser.add_argument("--fc1-densities", type=float, nargs="+", default=list(FC1_DENSITIES),
                        metavar="D", help="fc1 densities of the density sweep")
    parser.add_argument("--fc2-densities", type=float, nargs="+", default=[1.0],
                        metavar="D", help="fc2 densities of the density sweep (1: dense fc2, "
                        "the original's default; several make the original's grid)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES),
                        choices=BLOCK_SIZES, metavar="B",
                        help="fc1 block sizes of the block sweep (1, 4, 8 or 16)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="run each as N local workers of one thread each "
                        "(--distribute multi-worker, as make mnist-distributed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs still to do and stop")
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and checked flags; SweepError names the first bad one."""
    args = build_parser().parse_args(argv)
    if not hasattr(args, "densities"):
        args.densities = list(DEFAULT_DENSITIES[args.sweep])
    for flag, values in (("--densities", args.densities),
                         ("--fc1-densities", args.fc1_densities),
                         ("--fc2-densities", args.fc2_densities)):
        for density in values:
            if not 0.0 < density <= 1.0:
                raise SweepError(f"{flag} must be in (0, 1], got {density:g}")
    if args.epochs < 1:
        raise SweepError(f"--epochs must be >= 1, got {args.epochs}")
    if args.workers is not None and args.workers < 1:
        raise SweepError(f"--workers must be >= 1, got {args.workers}")
    return args


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    try:
        args = parse_args(argv)
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            log_dir = args.output.parent / "logs"
            log_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise SweepError(f"cannot create {args.output.parent}: {e.strerror or e}") from None
        results = load_results(args.output)
        runs = planned_runs(args)
        todo = []
        for run in runs:
            stored = results["runs"].get(run["key"], {})
            if stored.get("status") == "done":
                # Already run, maybe by another sweep: tag it as this sweep's too.
                if args.sweep not in stored.setdefault("sweeps", []):
                    stored["sweeps"].append(args.sweep)
            else:
                todo.append({**run, "sweeps": [args.sweep]})
        logger.info("%s sweep, %s recipe: %d runs planned, %d already done, %d to do",
                    args.sweep, args.recipe, len(runs), len(runs) - len(todo), len(todo))
        if args.dry_run:
            for run in todo:
                print(shlex.join([*local_cluster(run["workers"]), "python", "-m",
                                  "mnist_rigl.sparse_mnist", *run["args"]]))
            return 0
        save_results(args.output, results)  # the new tags, before the first run
        failed = 0
        started = time.perf_counter()
        for i, run in enumerate(todo, start=1):
            logger.info("[%d/%d] sparse_mnist.py %s", i, len(todo), run["key"])
            record = run_one(run, log_dir)
            results["runs"][run["key"]] = record
            save_results(args.output, results)
            left = (time.perf_counter() - started) / i * (len(todo) - i)
            if record["status"] == "done":
                logger.info("[%d/%d] %s seed %d: test accuracy %.4f, loss %.3f, %.0f s "
                            "(about %s left)", i, len(todo), record["variant"], record["seed"],
                            record["test_accuracy"], record["test_loss"],
                            record["wall_seconds"], _minutes(left))
            else:
                failed += 1
                logger.warning("[%d/%d] %s seed %d failed (%s); see %s", i, len(todo),
                               record["variant"], record["seed"], record["error"],
                               record["log"])
    except (SweepError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"{PROG}: error: {failed} run(s) failed; rerun to retry them", file=sys.stderr)
        return 1
    logger.info("results in %s; plot them with: python -m mnist_rigl.result_plotter "
                "--results %s", args.output, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
