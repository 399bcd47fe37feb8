"""Speed of the dynamic sparse matmul op against the fastest dense matmul and tf.sparse.

Prints one table. The dense baseline is TensorFlow's tf.matmul with oneDNN off
and with it on, each in its own child process (TF_ENABLE_ONEDNN_OPTS is read at
import), and the faster of the two counts. Every case is timed two ways:
`call`, one eager call from Python (dispatch included; eager costs
less per call here than calling a tf.function holding the op), and `loop`, per op inside one traced function of many calls on
distinct copies of the inputs (so grappler cannot merge them), as a training
step runs it. The contenders of a row, in this process and in both children,
are timed in interleaved rounds, one run each per round, so a burst of load
from other jobs hits them alike; a time is the median over rounds. TensorFlow
runs on 2 intra-op threads everywhere. Ratios are best dense time / ours;
GFLOP/s counts useful FLOPs only (2 x batch x non-zero elements), and "% peak"
divides it by the machine's FMA peak measured by bench/fma_peak.cc.

After the op table come MNIST end to end (sparse_mnist.py's samples/s, sparse
against dense layers) and data-parallel scaling (the same script on 1 and 2
local workers of one thread each, MultiWorkerMirroredStrategy over gRPC on
127.0.0.1, at the same global batch).

    PYTHONPATH=. python bench/benchmark.py [--quick] [--fp16] [--repeats N]
                                           [--sections ops mnist scaling]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ipu_sparse_ops import cli, ops, sparse  # loading the library starts no TF runtime
from ipu_sparse_ops.machine import cpu_model
from ipu_sparse_ops.tf_startup import onednn_enabled, tf

INTRA_OP_THREADS = 2
SHAPES = ((256, 4096, 4096), (256, 1024, 1024), (64, 1024, 1024), (128, 784, 320), (16, 784, 320))
DENSITIES = (0.01, 0.05, 0.1, 0.3)
BLOCK_SIZES = (1, 8, 16)
# The --quick subset: the cases the issue sets targets for.
QUICK_CASES = (((256, 4096, 4096), 0.1, 1), ((256, 4096, 4096), 0.3, 1),
               ((256, 4096, 4096), 0.1, 16), ((256, 4096, 4096), 0.3, 16),
               ((64, 1024, 1024), 0.05, 1), ((128, 784, 320), 0.1, 1),
               ((16, 784, 320), 0.1, 1), ((16, 784, 320), 0.1, 16))
TARGET_SECONDS_PER_RUN = 0.05  # calls per timed run are chosen to last about this
MAX_CALLS_PER_RUN = 32
# Ops per traced loop, at most: enough that the function call's fixed cost
# (about 0.3 ms here) is a small share of each small op's time.
MAX_OPS_PER_LOOP = 256
MODES = ("call", "loop")
SECTIONS = ("ops", "mnist", "scaling")
REPO = Path(__file__).resolve().parents[1]
FMA_PEAK = REPO / "build" / "fma_peak"


class Case(NamedTuple):
    batch: int
    input_size: int
    output_size: int
    density: float
    block_size: int


def configure_threads() -> None:
    """Must run before TensorFlow executes any op."""
    tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP_THREADS)
    # One inter-op thread: the calls of a timed run execute one after another.
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.get_logger().setLevel("ERROR")  # the traced loops of many ops: no retrace warnings


class Timed:
    """op(*inputs) prepared for timing in `mode` ("call" or "loop"), over `calls` calls."""

    def __init__(self, op: Callable, make_inputs: Callable[[], tuple], mode: str):
        probe = make_inputs()
        op(*probe)  # warm up: kernel caches, thread pool, allocator
        start = time.perf_counter()
        op(*probe)
        one_call = time.perf_counter() - start
        max_calls = MAX_OPS_PER_LOOP if mode == "loop" else MAX_CALLS_PER_RUN
        self.calls = int(min(max_calls, max(1, TARGET_SECONDS_PER_RUN // max(one_call, 1e-6))))
        self.inputs = [make_inputs() for _ in range(self.calls)]
        if mode == "loop":
            # Captured, not passed: passing hundreds of tensors costs more
            # Python per call than a small op takes to run.
            traced = tf.function(lambda: [op(*args) for args in self.inputs])
            self.run_calls = traced
        else:  # eager: the cheapest way to run one op from Python
            self.run_calls = lambda: [op(*args) for args in self.inputs]
        self.run_calls()  # trace
        self.seconds: list[float] = []

    def run(self) -> float:
        start = time.perf_counter()
        self.run_calls()
        self.seconds.append((time.perf_counter() - start) / self.calls)
        return self.seconds[-1]

    def median(self) -> float:
        return statistics.median(self.seconds)


def copies(*arrays: np.ndarray) -> Callable[[], tuple]:
    """A factory of distinct constant tensors holding `arrays`."""
    return lambda: tuple(tf.constant(a) for a in arrays)


class Problem:
    """One case's random pattern and inputs, in the forms each contender takes."""

    def __init__(self, case: Case, dtype: str, seed: int):
        """The same seed gives the same pattern and inputs in every process."""
        rng = np.random.default_rng(seed)
        self.case = case
        bs = case.block_size
        input_blocks, output_blocks = case.input_size // bs, case.output_size // bs
        count, capacity = sparse.capacity_for_density(input_blocks, output_blocks, case.density)
        self.spec = sparse.MatmulSpec(case.input_size, case.output_size, capacity,
                                      block_size=bs, data_type=dtype)
        self.triplets = sparse.random_triplets(self.spec, count, rng)
        representation = sparse.representation_from_triplets(self.spec, self.triplets)
        self.metainfo = tf.constant(representation.metainfo)
        self.nz_values = tf.constant(representation.nz_values)
        self.nnz_elements = count * bs * bs
        np_dtype = self.spec.dtype
        self.x = rng.standard_normal((case.batch, case.input_size)).astype(np_dtype)
        self.dy = rng.standard_normal((case.batch, case.output_size)).astype(np_dtype)
        self.w = rng.standard_normal((case.input_size, case.output_size)).astype(np_dtype)

    def gflops(self, seconds: float) -> float:
        return 2.0 * self.case.batch * self.nnz_elements / seconds / 1e9


# One function per measurement: each returns the contender ready to time.

def our_forward(p: Problem, mode: str) -> Timed:
    representation = sparse.Representation(p.metainfo, p.nz_values)
    return Timed(lambda x: ops.sparse_matmul(x, representation, p.spec), copies(p.x), mode)


def our_grad_input(p: Problem, mode: str) -> Timed:
    return Timed(lambda dy: ops._ops.ipu_sparse_matmul_grad_input(
        dy, p.metainfo, p.nz_values, input_size=p.case.input_size), copies(p.dy), mode)


def our_grad_values(p: Problem, mode: str) -> Timed:
    return Timed(lambda x, dy: ops._ops.ipu_sparse_matmul_grad_values(
        x, dy, p.metainfo, block_size=p.case.block_size), copies(p.x, p.dy), mode)


def our_dense_grad(p: Problem, mode: str) -> Timed:
    """The gradient Rig-L ranks: dense dL/dW, pooled (SUM) over blocks for block sizes > 1."""
    pooling = "NONE" if p.case.block_size == 1 else "SUM"
    return Timed(lambda x, dy: ops.dense_gradient(x, dy, p.case.block_size, pooling),
                 copies(p.x, p.dy), mode)


def dense_forward(p: Problem, mode: str) -> Timed:
    w = tf.constant(p.w)
    return Timed(lambda x: tf.matmul(x, w), copies(p.x), mode)


def dense_grad_input(p: Problem, mode: str) -> Timed:
    w = tf.constant(p.w)
    return Timed(lambda dy: tf.matmul(dy, w, transpose_b=True), copies(p.dy), mode)


def dense_grad_weight(p: Problem, mode: str) -> Timed:
    return Timed(lambda x, dy: tf.matmul(x, dy, transpose_a=True), copies(p.x, p.dy), mode)


def tf_sparse_forward(p: Problem, mode: str) -> Timed:
    """tf.sparse.sparse_dense_matmul computing y^T = W^T x^T (its fastest form)."""
    dense_w_t = sparse.dense_from_triplets(p.spec, p.triplets).T
    rows, cols = np.nonzero(dense_w_t)
    w_t = tf.sparse.reorder(tf.sparse.SparseTensor(
        np.stack([rows, cols], axis=1).astype(np.int64), dense_w_t[rows, cols],
        dense_w_t.shape))
    return Timed(lambda x_t: tf.sparse.sparse_dense_matmul(w_t, x_t),
                 copies(np.ascontiguousarray(p.x.T)), mode)


IN_PROCESS = {"fwd": our_forward, "gin": our_grad_input, "gval": our_grad_values,
              "dgrad": our_dense_grad, "tf.sp": tf_sparse_forward}
DENSE = {"mm": dense_forward, "gin": dense_grad_input, "dW": dense_grad_weight}
ONEDNN_SETTINGS = ("0", "1")  # TF_ENABLE_ONEDNN_OPTS of the two dense children

COLUMNS = (
    # (header, width, format)
    ("batch x in x out", 16, "{}"), ("dens", 5, "{:.2f}"), ("bs", 3, "{}"), ("mode", 4, "{}"),
    ("fwd ms", 8, "{:.3f}"), ("gin ms", 8, "{:.3f}"), ("gval ms", 8, "{:.3f}"),
    ("dgrad ms", 8, "{:.3f}"),
    ("mm ms", 8, "{:.3f}"), ("gin ms", 8, "{:.3f}"), ("dW ms", 8, "{:.3f}"), ("oneDNN", 11, "{}"),
    ("tf.sp ms", 8, "{:.3f}"),
    ("x fwd", 6, "{:.1f}"), ("x gin", 6, "{:.1f}"), ("x gval", 6, "{:.1f}"),
    ("dgrad/dW", 8, "{:.2f}"), ("x tf.sp", 7, "{:.1f}"),
    ("GF fwd", 6, "{:.0f}"), ("%pk fwd", 7, "{:.0f}"), ("%pk gin", 7, "{:.0f}"),
    ("%pk gval", 8, "{:.0f}"),
)


def print_row(cells: Sequence) -> None:
    text = []
    for (_, width, fmt), cell in zip(COLUMNS, cells):
        text.append((cell if isinstance(cell, str) else fmt.format(cell)).rjust(width))
    print(" ".join(text), flush=True)


class DenseChild:
    """This script in --dense-worker mode under one TF_ENABLE_ONEDNN_OPTS, over pipes."""

    def __init__(self, onednn: str, dtype: str):
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "PYTHONPATH": str(REPO)}
        self.label = "?"  # oneDNN as the child's TensorFlow reports it, once it has answered
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--dense-worker", "--dtype", dtype],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"a dense worker stopped "
                               f"(exit {self.process.wait()})")
        return json.loads(answer)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def dense_worker(dtype: str) -> int:
    """Serves the parent: `prepare` a case's dense contenders, `run` one round of them."""
    configure_threads()
    timed = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["do"] == "prepare":
            problem = Problem(Case(*request["case"]), dtype, request["seed"])
            timed = {name: make(problem, request["mode"]) for name, make in DENSE.items()}
            answer = {"onednn": onednn_enabled()}
        else:
            answer = {name: contender.run() for name, contender in timed.items()}
        print(json.dumps(answer), flush=True)
    return 0


def benchmark_case(case: Case, mode: str, seed: int, dtype: str, children: list[DenseChild],
                   repeats: int, peak_gflops: float | None) -> list:
    """One table row: our ops, the best dense of both children, ratios and shares of peak."""
    problem = Problem(case, dtype, seed)
    here = {name: make(problem, mode) for name, make in IN_PROCESS.items()}
    request = {"do": "prepare", "case": list(case), "seed": seed, "mode": mode}
    for child in children:
        child.label = {True: "on", False: "off", None: "?"}[child.ask(request)["onednn"]]
    dense = [{name: [] for name in DENSE} for _ in children]
    for _ in range(repeats):
        for contender in here.values():
            contender.run()
        for child, seconds in zip(children, dense):
            for name, value in child.ask({"do": "run"}).items():
                seconds[name].append(value)
    t = {name: contender.median() for name, contender in here.items()}
    best, winner = {}, {}
    for name in DENSE:
        medians = [statistics.median(seconds[name]) for seconds in dense]
        fastest = min(range(len(children)), key=medians.__getitem__)
        best[name], winner[name] = medians[fastest], children[fastest].label
    ms = 1e3
    share = ((lambda seconds: 100 * problem.gflops(seconds) / peak_gflops) if peak_gflops
             else (lambda seconds: float("nan")))
    return [f"{case.batch}x{case.input_size}x{case.output_size}", case.density,
            case.block_size, mode,
            t["fwd"] * ms, t["gin"] * ms, t["gval"] * ms, t["dgrad"] * ms,
            best["mm"] * ms, best["gin"] * ms, best["dW"] * ms, "/".join(winner.values()),
            t["tf.sp"] * ms,
            best["mm"] / t["fwd"], best["gin"] / t["gin"], best["dW"] / t["gval"],
            t["dgrad"] / best["dW"], t["tf.sp"] / t["fwd"],
            problem.gflops(t["fwd"]), share(t["fwd"]), share(t["gin"]), share(t["gval"])]


def parse_case(text: str) -> Case:
    """BATCHxINxOUT:DENSITY:BLOCK, e.g. 16x784x320:0.1:1."""
    try:
        shape, density, block_size = text.split(":")
        batch, input_size, output_size = (int(n) for n in shape.split("x"))
        return Case(batch, input_size, output_size, float(density), int(block_size))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not BATCHxINxOUT:DENSITY:BLOCK (e.g. 16x784x320:0.1:1)") from None


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(*shape, density, bs) for shape, density, bs in QUICK_CASES]
    return [Case(*shape, density, bs)
            for shape, density, bs in itertools.product(SHAPES, DENSITIES, BLOCK_SIZES)]


def fma_peak(threads: int) -> tuple[float | None, str]:
    """(GFLOP/s, its line) from build/fma_peak, built by `make bench`."""
    if not FMA_PEAK.exists():
        return None, f"FMA peak not measured: {FMA_PEAK} is missing (make bench builds it)"
    line = subprocess.run([str(FMA_PEAK), str(threads)], capture_output=True, text=True,
                          check=True).stdout.strip()
    return float(line.split()[-2]), f"FMA peak ({FMA_PEAK.name}): {line}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few-minute subset: the cases the issue sets targets for")
    parser.add_argument("--fp16", action="store_true",
                        help="float16 storage for every contender (ours accumulates in float32)")
    parser.add_argument("--case", type=parse_case, action="append", default=[],
                        metavar="BxIxO:D:BS",
                        help="time only this case (repeatable), e.g. 16x784x320:0.1:1; "
                             "skips the end-to-end runs")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None,
                        help="what to run (default: all; with --quick: ops mnist)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per row (default 7, 3 with --quick)")
    parser.add_argument("--dense-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.sections is None:
        args.sections = ["ops", "mnist"] if args.quick or args.case else list(SECTIONS)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.dense_worker:
        return dense_worker(args.dtype)
    configure_threads()
    dtype = "fp16" if args.fp16 else "fp32"
    peak, peak_line = fma_peak(INTRA_OP_THREADS)
    print(f"CPU: {cpu_model()}; op kernels: {ops.kernel_isa()}; {peak_line}\n"
          f"TensorFlow {tf.__version__}, {INTRA_OP_THREADS} intra-op threads, {dtype}, "
          f"median of {args.repeats} interleaved rounds, times per call.\n"
          f"Dense (mm = x W, gin = dy W^T, dW = x^T dy) is the faster of TensorFlow with "
          f"oneDNN off and on, each in its own process; the oneDNN column says which won "
          f"(mm/gin/dW).\n"
          f"x = best dense time / ours (fwd vs mm, gin vs gin, gval vs dW); dgrad/dW = our "
          f"dense gradient's time (pooled SUM for bs > 1) over the best dW; x tf.sp = "
          f"tf.sparse.sparse_dense_matmul time / our fwd; GF = useful GFLOP/s; %pk = share "
          f"of the FMA peak.")
    if "ops" in args.sections:
        op_table(args.case or cases(args.quick), dtype, args.repeats, peak)
    if "mnist" in args.sections and not args.case:
        print()
        mnist_end_to_end(epochs=1 if args.quick else 2)
    if "scaling" in args.sections and not args.case:
        print()
        data_parallel_scaling(epochs=1)
    return 0


def op_table(table_cases: Sequence[Case], dtype: str, repeats: int, peak: float | None) -> None:
    children = [DenseChild(onednn, dtype) for onednn in ONEDNN_SETTINGS]
    try:
        print_row([header for header, _, _ in COLUMNS])
        for seed, case in enumerate(table_cases):
            for mode in MODES:
                print_row(benchmark_case(case, mode, seed, dtype, children, repeats, peak))
    finally:
        for child in children:
            child.close()


MNIST_CONFIGS = {  # name: sparse_mnist.py flags
    "dense layers (1 / 1)": ["--densities", "1", "1"],
    "sparse 0.1/0.3": ["--densities", "0.1", "0.3"],
    "sparse 0.1/0.3, fc1 block 16": ["--densities", "0.1", "0.3", "--block-size", "16",
                                     "--pooling-type", "SUM"],
}


MNIST_BATCH_SIZES = (16, 128)  # the original's default, and a wider one


def mnist_end_to_end(epochs: int) -> None:
    """samples/s of sparse_mnist.py and the host Rig-L share of its time, after the first
    Rig-L step (whose time holds the trace of the training loop, a one-off cost that
    would otherwise decide a short run's figure); the whole run's samples/s beside it.
    The dense model runs with oneDNN off and on, and the faster counts."""
    print(f"End to end: mnist_rigl/sparse_mnist.py, {epochs} epoch(s), seed 0; samples/s and "
          "Rig-L % after the first Rig-L step, `with trace` over the whole run")
    row = "{:<30} {:>5} {:>10} {:>8} {:>8} {:>11} {:>7}".format
    print(row("model", "batch", "samples/s", "x dense", "Rig-L %", "with trace", "oneDNN"))
    for batch_size in MNIST_BATCH_SIZES:
        dense_rate = None
        for name, flags in MNIST_CONFIGS.items():
            settings = ("0", "1") if dense_rate is None else (None,)
            runs = [_mnist_run(flags, epochs, batch_size, onednn) for onednn in settings]
            rate, share, whole, onednn = max(runs)
            dense_rate = dense_rate or rate
            print(row(name, batch_size, f"{rate:.0f}", f"{rate / dense_rate:.2f}", share,
                      f"{whole:.0f}", {None: "default", "0": "off", "1": "on"}[onednn]),
                  flush=True)


def _mnist_run(flags: list[str], epochs: int, batch_size: int, onednn: str | None):
    """(steady samples/s, host Rig-L %, whole-run samples/s, onednn) of one sparse_mnist.py run."""
    env = dict(os.environ)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    with tempfile.TemporaryDirectory() as checkpoints:
        out = subprocess.run([sys.executable, str(REPO / "mnist_rigl" / "sparse_mnist.py"), *flags,
                              "--epochs", str(epochs), "--batch-size", str(batch_size),
                              "--seed", "0", "--log-level", "WARNING",
                              "--checkpoint-path", checkpoints],
                             capture_output=True, text=True, check=True, env=env).stdout
    whole = float(re.search(r"^Throughput: (\d+) samples/s", out, re.MULTILINE).group(1))
    steady = re.search(r"^Steady throughput: (\d+) samples/s.*updates ([\d.]+)%", out,
                       re.MULTILINE)
    return float(steady.group(1)), steady.group(2), whole, onednn


SCALING_WORKERS = (1, 2)


def data_parallel_scaling(epochs: int) -> None:
    """samples/s of sparse_mnist.py --distribute multi-worker on 1 and 2 local workers.

    Each worker runs one TensorFlow thread, so 2 workers use the 2 cores one
    process of 2 threads would; efficiency = rate / (workers x the 1-worker rate).
    """
    script = REPO / "mnist_rigl" / "sparse_mnist.py"
    print(f"Data-parallel: mnist_rigl/sparse_mnist.py --densities 0.1 0.3 --distribute "
          f"multi-worker, {epochs} epoch(s), seed 0, one thread per worker, same global batch")
    row = "{:<8} {:>8} {:>10} {:>8} {:>10}".format
    print(row("batch", "workers", "samples/s", "speed-up", "efficiency"))
    for batch_size in MNIST_BATCH_SIZES:
        single = None
        for workers in SCALING_WORKERS:
            with tempfile.TemporaryDirectory() as checkpoints:
                out = subprocess.run(
                    [sys.executable, "-m", "ipu_sparse_ops.tools.local_cluster", "--workers",
                     str(workers), "--threads", "1", "--", sys.executable, str(script),
                     "--densities", "0.1", "0.3", "--distribute", "multi-worker", "--seed", "0",
                     "--epochs", str(epochs), "--batch-size", str(batch_size),
                     "--log-level", "WARNING", "--checkpoint-path", checkpoints],
                    capture_output=True, text=True, check=True).stdout
            rate = float(re.search(r"^\[worker 0\] Throughput: (\d+) samples/s", out,
                                   re.MULTILINE).group(1))
            single = single or rate
            print(row(batch_size, workers, f"{rate:.0f}", f"{rate / single:.2f}",
                      f"{rate / (workers * single):.0%}"), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
