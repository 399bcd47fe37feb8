"""Speed of the dynamic sparse matmul op against dense tf.matmul and tf.sparse.

Prints one table. Each contender runs as a tf.function that calls it several
times on distinct copies of its inputs (so grappler cannot merge the calls and
Python dispatch is amortised, as in a traced training step). The contenders of
a row are timed in interleaved rounds, one run each per round, so a burst of
load from other jobs hits them alike; a time is the median over rounds. All
timings are taken in this process with TensorFlow on 2 intra-op threads.
Ratios are dense time / ours; GFLOP/s counts useful FLOPs only
(2 x batch x non-zero elements).

    PYTHONPATH=. python bench/benchmark.py [--quick] [--fp16] [--repeats N]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ipu_sparse_ops import cli, ops, sparse  # loading the library starts no TF runtime
from ipu_sparse_ops.tf_startup import tf

INTRA_OP_THREADS = 2
SHAPES = ((256, 4096, 4096), (256, 1024, 1024), (128, 784, 320), (16, 784, 320))
DENSITIES = (0.01, 0.1, 0.3)
BLOCK_SIZES = (1, 8, 16)
# The --quick subset: the cases the issue sets targets for.
QUICK_CASES = (((256, 4096, 4096), 0.1, 1), ((256, 4096, 4096), 0.1, 16),
               ((256, 4096, 4096), 0.3, 16), ((128, 784, 320), 0.1, 1),
               ((16, 784, 320), 0.1, 1), ((16, 784, 320), 0.1, 16))
TARGET_SECONDS_PER_RUN = 0.05  # calls per timed run are chosen to last about this
MAX_CALLS_PER_RUN = 32


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
    tf.get_logger().setLevel("ERROR")  # each timed op is its own tf.function: no retrace warnings


class Timed:
    """op(*inputs) prepared for timing: a tf.function making `calls` calls."""

    def __init__(self, op: Callable, make_inputs: Callable[[], tuple]):
        probe = make_inputs()
        op(*probe)  # warm up: kernel caches, thread pool, allocator
        start = time.perf_counter()
        op(*probe)
        one_call = time.perf_counter() - start
        self.calls = int(min(MAX_CALLS_PER_RUN,
                             max(1, TARGET_SECONDS_PER_RUN // max(one_call, 1e-6))))
        self.inputs = [make_inputs() for _ in range(self.calls)]
        self.function = tf.function(lambda all_inputs: [op(*args) for args in all_inputs])
        self.function(self.inputs)  # trace
        self.seconds: list[float] = []

    def run(self) -> None:
        start = time.perf_counter()
        self.function(self.inputs)
        self.seconds.append((time.perf_counter() - start) / self.calls)

    def median(self) -> float:
        return statistics.median(self.seconds)


def time_interleaved(contenders: dict[str, Timed], repeats: int) -> dict[str, float]:
    """Median seconds per call of each contender, timed in interleaved rounds."""
    for _ in range(repeats):
        for timed in contenders.values():
            timed.run()
    return {name: timed.median() for name, timed in contenders.items()}


def copies(*arrays: np.ndarray) -> Callable[[], tuple]:
    """A factory of distinct constant tensors holding `arrays`."""
    return lambda: tuple(tf.constant(a) for a in arrays)


class Problem:
    """One case's random pattern and inputs, in the forms each contender takes."""

    def __init__(self, case: Case, dtype: str, rng: np.random.Generator):
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

def our_forward(p: Problem) -> Timed:
    representation = sparse.Representation(p.metainfo, p.nz_values)
    return Timed(lambda x: ops.sparse_matmul(x, representation, p.spec), copies(p.x))


def our_grad_input(p: Problem) -> Timed:
    return Timed(lambda dy: ops._ops.ipu_sparse_matmul_grad_input(
        dy, p.metainfo, p.nz_values, input_size=p.case.input_size), copies(p.dy))


def our_grad_values(p: Problem) -> Timed:
    return Timed(lambda x, dy: ops._ops.ipu_sparse_matmul_grad_values(
        x, dy, p.metainfo, block_size=p.case.block_size), copies(p.x, p.dy))


def our_dense_grad(p: Problem) -> Timed:
    return Timed(lambda x, dy: ops._ops.ipu_sparse_matmul_dense_grad(
        x, dy, True, block_size=p.case.block_size, pooling_type="NONE"), copies(p.x, p.dy))


def dense_forward(p: Problem) -> Timed:
    w = tf.constant(p.w)
    return Timed(lambda x: tf.matmul(x, w), copies(p.x))


def dense_grad_input(p: Problem) -> Timed:
    w = tf.constant(p.w)
    return Timed(lambda dy: tf.matmul(dy, w, transpose_b=True), copies(p.dy))


def dense_grad_weight(p: Problem) -> Timed:
    return Timed(lambda x, dy: tf.matmul(x, dy, transpose_a=True), copies(p.x, p.dy))


def tf_sparse_forward(p: Problem) -> Timed:
    """tf.sparse.sparse_dense_matmul computing y^T = W^T x^T (its fastest form)."""
    dense_w_t = sparse.dense_from_triplets(p.spec, p.triplets).T
    rows, cols = np.nonzero(dense_w_t)
    w_t = tf.sparse.reorder(tf.sparse.SparseTensor(
        np.stack([rows, cols], axis=1).astype(np.int64), dense_w_t[rows, cols],
        dense_w_t.shape))
    return Timed(lambda x_t: tf.sparse.sparse_dense_matmul(w_t, x_t),
                 copies(np.ascontiguousarray(p.x.T)))


CONTENDERS = {
    "fwd": our_forward, "gin": our_grad_input, "gval": our_grad_values,
    "dgrad": our_dense_grad, "tf.mm": dense_forward, "tf.gin": dense_grad_input,
    "tf.dW": dense_grad_weight, "tf.sp": tf_sparse_forward,
}

COLUMNS = (
    # (header, width, format)
    ("batch x in x out", 16, "{}"), ("dens", 5, "{:.2f}"), ("bs", 3, "{}"),
    ("fwd ms", 8, "{:.3f}"), ("gin ms", 8, "{:.3f}"), ("gval ms", 8, "{:.3f}"),
    ("dgrad ms", 8, "{:.3f}"),
    ("tf.mm ms", 8, "{:.3f}"), ("tf.gin ms", 9, "{:.3f}"), ("tf.dW ms", 8, "{:.3f}"),
    ("tf.sp ms", 8, "{:.3f}"),
    ("x fwd", 6, "{:.1f}"), ("x gin", 6, "{:.1f}"), ("x gval", 6, "{:.1f}"),
    ("x tf.sp", 7, "{:.1f}"),
    ("GF fwd", 6, "{:.0f}"), ("GF gin", 6, "{:.0f}"), ("GF gval", 7, "{:.0f}"),
)


def print_row(cells: Sequence) -> None:
    text = []
    for (_, width, fmt), cell in zip(COLUMNS, cells):
        text.append((cell if isinstance(cell, str) else fmt.format(cell)).rjust(width))
    print(" ".join(text), flush=True)


def benchmark_case(problem: Problem, repeats: int) -> list:
    """One table row: our four ops, the baselines, ratios and GFLOP/s."""
    t = time_interleaved({name: make(problem) for name, make in CONTENDERS.items()}, repeats)
    c = problem.case
    ms = 1e3
    return [f"{c.batch}x{c.input_size}x{c.output_size}", c.density, c.block_size,
            t["fwd"] * ms, t["gin"] * ms, t["gval"] * ms, t["dgrad"] * ms,
            t["tf.mm"] * ms, t["tf.gin"] * ms, t["tf.dW"] * ms, t["tf.sp"] * ms,
            t["tf.mm"] / t["fwd"], t["tf.gin"] / t["gin"], t["tf.dW"] / t["gval"],
            t["tf.sp"] / t["fwd"],
            problem.gflops(t["fwd"]), problem.gflops(t["gin"]), problem.gflops(t["gval"])]


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(*shape, density, bs) for shape, density, bs in QUICK_CASES]
    return [Case(*shape, density, bs)
            for shape, density, bs in itertools.product(SHAPES, DENSITIES, BLOCK_SIZES)]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a one-minute subset: the cases the issue sets targets for")
    parser.add_argument("--fp16", action="store_true",
                        help="float16 storage for every contender (ours accumulates in float32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per row (default 7, 3 with --quick)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    configure_threads()
    dtype = "fp16" if args.fp16 else "fp32"
    rng = np.random.default_rng(0)
    print(f"TensorFlow {tf.__version__}, {INTRA_OP_THREADS} intra-op threads, {dtype}, "
          f"median of {args.repeats} interleaved rounds, times per call.\n"
          f"x = dense time / ours (fwd vs tf.mm, gin vs tf.gin, gval vs tf.dW, "
          f"tf.sp vs fwd); GF = useful GFLOP/s; dgrad = our dense gradient; "
          f"tf.sp = tf.sparse.sparse_dense_matmul")
    print_row([header for header, _, _ in COLUMNS])
    for case in cases(args.quick):
        print_row(benchmark_case(Problem(case, dtype, rng), args.repeats))
    print()
    mnist_end_to_end(epochs=1 if args.quick else 2)
    return 0


MNIST_CONFIGS = {  # name: sparse_mnist.py flags
    "dense layers (1 / 1)": ["--densities", "1", "1"],
    "sparse 0.1/0.3": ["--densities", "0.1", "0.3"],
    "sparse 0.1/0.3, fc1 block 16": ["--densities", "0.1", "0.3", "--block-size", "16",
                                     "--pooling-type", "SUM"],
}


def mnist_end_to_end(epochs: int) -> None:
    """samples/s of sparse_mnist.py (default batch 16) and the host Rig-L share of its time."""
    import re
    import subprocess

    script = Path(__file__).resolve().parents[1] / "mnist_rigl" / "sparse_mnist.py"
    print(f"End to end: mnist_rigl/sparse_mnist.py, {epochs} epoch(s), batch 16, seed 0")
    row = "{:<30} {:>10} {:>8} {:>8}".format
    print(row("model", "samples/s", "x dense", "Rig-L %"))
    dense_rate = None
    for name, flags in MNIST_CONFIGS.items():
        out = subprocess.run([sys.executable, str(script), *flags, "--epochs", str(epochs),
                              "--seed", "0", "--log-level", "WARNING"],
                             capture_output=True, text=True, check=True).stdout
        rate = float(re.search(r"Throughput: (\d+) samples/s", out).group(1))
        share = re.search(r"\(([\d.]+)% of training time\)", out)
        dense_rate = dense_rate or rate
        print(row(name, f"{rate:.0f}", f"{rate / dense_rate:.2f}",
                  share.group(1) if share else "-"), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
