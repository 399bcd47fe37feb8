"""Our sparse matmul op against the peers a user would try: PyTorch, SparseProp, scipy.

Issue 13 asks whether a user would train faster with the sparse libraries they
already know. Every contender gets the same random pattern and inputs as our op
(block patterns expanded to their elements for the peers' CSR), is first
checked against float64 numpy, and only then timed. All contenders of a case
are timed in interleaved rounds, one timed run each per round, so a burst of
load from other jobs hits them alike; a time is the median over rounds. Where a
peer offers several ways to compute an op (CSR of W or of W^T, sparse.mm or
sparse.addmm), a short race picks the fastest correct one, and the table names
it. Everything runs on 2 threads. Ratios are peer time / our time: above 1 we
are faster.

    PYTHONPATH=. python bench/peers.py [--quick] [--rounds N] [--mode call|loop]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np

import benchmark  # bench/benchmark.py, next to this file
from benchmark import Case, Problem, Timed, copies
from ipu_sparse_ops import cli, ops, sparse
from ipu_sparse_ops.machine import cpu_model
from ipu_sparse_ops.tf_startup import tf

THREADS = benchmark.INTRA_OP_THREADS
CASES = (Case(256, 4096, 4096, 0.1, 1), Case(256, 4096, 4096, 0.3, 1),
         Case(128, 784, 320, 0.1, 1), Case(16, 784, 320, 0.1, 1),
         Case(64, 1024, 1024, 0.05, 1),
         Case(256, 4096, 4096, 0.1, 16), Case(256, 4096, 4096, 0.3, 16))
QUICK_CASES = (Case(256, 4096, 4096, 0.1, 1), Case(128, 784, 320, 0.1, 1),
               Case(16, 784, 320, 0.1, 1), Case(256, 4096, 4096, 0.1, 16))
OPS = ("fwd", "gin", "gval", "bwd", "f+b")
RACE_RUNS = 3  # timed runs per candidate way in the race that picks a peer's way
# Before each timed run: long enough for the previous contender's idle worker
# threads (OpenMP's or TensorFlow's, which spin for a while) to go to sleep, so
# they do not take the two cores from the next contender.
PAUSE_SECONDS = 0.002
# A float32 dot product of n non-zero terms, summed in any order (blocked, split
# accumulators, FMA), is within (n + 1) * u * sum|a_i b_i| of the exact value
# (Higham, Accuracy and Stability, 3.1; u = eps/2, the +1 the final rounding);
# adding the pattern's zeros is exact, so n counts non-zeros only. The factor 8
# (16x the worst case) leaves room for any order, yet a transposed or shifted
# pattern is off by far more, and so is one dropped non-zero unless its term is
# tiny (caught 43 of 50 times at 256x4096x4096 d0.3, 50 of 50 on MNIST shapes).
BOUND_FACTOR = 8
EPS32 = float(np.finfo(np.float32).eps)


class Entry(NamedTuple):
    """One way one contender computes one op, ready to check and time."""
    how: str
    timer: Timed
    outputs: Callable[[object], dict]  # a result -> {"y" | "dx" | "dW": numpy array}


class Way(NamedTuple):
    """A peer's way to compute an op: fn(x, dy) in the peer's own types."""
    how: str
    fn: Callable
    outputs: Callable[[object], dict]
    make_inputs: Callable[[], tuple] | None = None  # when the way needs other inputs


class PeerTimed(Timed):
    """A Python call timed as benchmark.Timed times its `call` mode."""

    def __init__(self, fn: Callable, make_inputs: Callable[[], tuple]):
        probe = make_inputs()
        fn(*probe)  # warm up
        start = time.perf_counter()
        fn(*probe)
        one_call = time.perf_counter() - start
        self.calls = int(min(benchmark.MAX_CALLS_PER_RUN, max(
            1, benchmark.TARGET_SECONDS_PER_RUN // max(one_call, 1e-6))))
        self.inputs = [make_inputs() for _ in range(self.calls)]
        self.run_calls = lambda: [fn(*args) for args in self.inputs]
        self.seconds = []


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Reference:
    """Exact (float64) results on one pattern, and how far float32 may stray from them."""

    def __init__(self, p: Problem):
        ones = p.triplets._replace(values=np.ones_like(p.triplets.values))
        self.mask = sparse.dense_from_triplets(p.spec, ones) != 0
        self.w = sparse.dense_from_triplets(p.spec, p.triplets)  # float32, zeros off the pattern
        x, dy, w = (a.astype(np.float64) for a in (p.x, p.dy, self.w))
        self.exact = {"y": x @ w, "dx": dy @ w.T, "dW": x.T @ dy}
        terms = {"y": self.mask.sum(axis=0), "dx": self.mask.sum(axis=1), "dW": p.case.batch}
        magnitude = {"y": abs(x) @ abs(w), "dx": abs(dy) @ abs(w).T, "dW": abs(x).T @ abs(dy)}
        self.bound = {key: BOUND_FACTOR * EPS32 * terms[key] * magnitude[key]
                      for key in self.exact}

    def error(self, outputs: dict) -> str | None:
        """None if every output is within its bound, else what is wrong."""
        for key, got in outputs.items():
            exact, bound = self.exact[key], self.bound[key]
            got = np.asarray(got, dtype=np.float64)
            if got.shape != exact.shape:
                return f"{key} has shape {got.shape}, expected {exact.shape}"
            err = abs(got - exact)
            if key == "dW":  # the gradient of the values: at the pattern only
                err, bound = np.where(self.mask, err, 0), np.where(self.mask, bound, 0)
            excess = np.where(err > bound, err - bound, 0)
            if excess.any() or not np.isfinite(got).all():
                at = tuple(int(i) for i in np.unravel_index(np.argmax(np.where(np.isfinite(err), excess, np.inf)),
                                      err.shape))
                return (f"{key}{list(at)} = {got[at]:.6g}, float64 gives {exact[at]:.6g}, "
                        f"float32 bound {bound[at]:.3g}")
        return None


# Our op, in the mode benchmark.py times it.

def our_entries(p: Problem, mode: str) -> dict[str, Entry]:
    def dense_dw(nz_grad) -> np.ndarray:
        """Our values gradient, in slot order, as [input_size, output_size]."""
        representation = sparse.Representation(p.metainfo, np.asarray(nz_grad))
        return sparse.dense_from_triplets(
            p.spec, sparse.triplets_from_representation(p.spec, representation))

    representation = sparse.Representation(p.metainfo, p.nz_values)

    def backward(x, dy):  # what the op's registered gradient runs
        return (ops._ops.ipu_sparse_matmul_grad_input(
                    dy, p.metainfo, p.nz_values, input_size=p.case.input_size),
                ops._ops.ipu_sparse_matmul_grad_values(
                    x, dy, p.metainfo, block_size=p.case.block_size))

    def forward_backward(x, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, p.nz_values])
            y = ops.sparse_matmul(x, representation, p.spec)
        return (y, *tape.gradient(y, [x, p.nz_values], output_gradients=dy))

    how = f"ipu_sparse_ops ({mode})"
    return {
        "fwd": Entry(how, benchmark.our_forward(p, mode), lambda y: {"y": y.numpy()}),
        "gin": Entry(how, benchmark.our_grad_input(p, mode), lambda dx: {"dx": dx.numpy()}),
        "gval": Entry(how, benchmark.our_grad_values(p, mode), lambda g: {"dW": dense_dw(g)}),
        "bwd": Entry(how, Timed(backward, copies(p.x, p.dy), mode),
                     lambda r: {"dx": r[0].numpy(), "dW": dense_dw(r[1])}),
        "f+b": Entry(how, Timed(forward_backward, copies(p.x, p.dy), mode),
                     lambda r: {"y": r[0].numpy(), "dx": r[1].numpy(), "dW": dense_dw(r[2])}),
    }


# The peers: each builder returns (make_inputs, {op: [candidate ways]}).

def torch_inputs(torch, p: Problem, requires_grad: bool = False) -> Callable[[], tuple]:
    return lambda: (torch.tensor(p.x, requires_grad=requires_grad), torch.tensor(p.dy))


def torch_dense(peers: dict, p: Problem, ref: Reference):
    """What a dense PyTorch layer runs; its dW is the full x^T dy (checked at the pattern)."""
    torch = peers["torch"]
    w = torch.tensor(ref.w)
    w_param = torch.tensor(ref.w, requires_grad=True)

    def forward_backward(x, dy):
        y = x @ w_param
        return (y, *torch.autograd.grad(y, (x, w_param), dy))

    ways = {
        "fwd": [Way("x @ W", lambda x, dy: x @ w, lambda y: {"y": y.numpy()})],
        "gin": [Way("dy @ W^T", lambda x, dy: dy @ w.t(), lambda dx: {"dx": dx.numpy()})],
        "gval": [Way("x^T @ dy", lambda x, dy: x.t() @ dy, lambda g: {"dW": g.numpy()})],
        "bwd": [Way("dy @ W^T, x^T @ dy", lambda x, dy: (dy @ w.t(), x.t() @ dy),
                    lambda r: {"dx": r[0].numpy(), "dW": r[1].numpy()})],
        "f+b": [Way("autograd", forward_backward,
                    lambda r: {"y": r[0].detach().numpy(), "dx": r[1].numpy(),
                               "dW": r[2].numpy()},
                    torch_inputs(torch, p, requires_grad=True))],
    }
    return torch_inputs(torch, p), ways


def torch_csr(peers: dict, p: Problem, ref: Reference):
    """torch.sparse on CSR of W [in, out] ("W") or of W^T [out, in] ("Wt").

    torch's autograd does not take a CSR weight, so its backward is the chosen
    grad-input and grad-values ways run one after the other, as a custom
    autograd.Function would.
    """
    torch = peers["torch"]
    # Said once per process, in the middle of the table: CSR is what we time.
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
    w = torch.tensor(ref.w).to_sparse_csr()
    wt = torch.tensor(np.ascontiguousarray(ref.w.T)).to_sparse_csr()
    y_t = torch.zeros(p.case.output_size, p.case.batch)  # addmm's added term, times beta = 0
    dx_t = torch.zeros(p.case.input_size, p.case.batch)
    y = lambda r: {"y": r.numpy()}
    dx = lambda r: {"dx": r.numpy()}
    ways = {
        "fwd": [Way("sparse.mm Wt", lambda x, dy: torch.sparse.mm(wt, x.t()).t(), y),
                Way("sparse.mm W", lambda x, dy: torch.sparse.mm(x, w), y),
                Way("sparse.addmm Wt",
                    lambda x, dy: torch.sparse.addmm(y_t, wt, x.t(), beta=0).t(), y)],
        "gin": [Way("sparse.mm W", lambda x, dy: torch.sparse.mm(w, dy.t()).t(), dx),
                Way("sparse.mm Wt", lambda x, dy: torch.sparse.mm(dy, wt), dx),
                Way("sparse.addmm W",
                    lambda x, dy: torch.sparse.addmm(dx_t, w, dy.t(), beta=0).t(), dx)],
        "gval": [Way("sampled_addmm W",
                     lambda x, dy: torch.sparse.sampled_addmm(w, x.t(), dy, beta=0),
                     lambda g: {"dW": g.to_dense().numpy()}),
                 Way("sampled_addmm Wt",
                     lambda x, dy: torch.sparse.sampled_addmm(wt, dy.t(), x, beta=0),
                     lambda g: {"dW": g.to_dense().numpy().T})],
    }
    return torch_inputs(torch, p), ways


def sparseprop(peers: dict, p: Problem, ref: Reference):
    """SparseProp's SparseLinear: weight [out, in] as CSR; one backward gives dx and dW."""
    torch, scipy_sparse = peers["torch"], peers["scipy.sparse"]
    layer = peers["sparseprop"](torch.tensor(np.ascontiguousarray(ref.w.T)))
    indptr, indices = (a.numpy() for a in layer.W_idx)
    shape_t = (p.case.output_size, p.case.input_size)

    def dense_dw(grad) -> np.ndarray:
        return scipy_sparse.csr_matrix((grad.numpy(), indices, indptr), shape=shape_t).toarray().T

    def forward(x, dy):
        with torch.no_grad():
            return layer(x)

    def graph_inputs():  # a forward of its own for each backward input
        x, dy = torch_inputs(torch, p, requires_grad=True)()
        return layer(x), x, dy

    def backward(y, x, dy):
        return torch.autograd.grad(y, (x, layer.W_val), dy, retain_graph=True)

    def forward_backward(x, dy):
        y = layer(x)
        return (y, *torch.autograd.grad(y, (x, layer.W_val), dy))

    ways = {
        "fwd": [Way("SparseLinear", forward, lambda y: {"y": y.numpy()})],
        "bwd": [Way("its backward", backward,
                    lambda r: {"dx": r[0].numpy(), "dW": dense_dw(r[1])}, graph_inputs)],
        "f+b": [Way("autograd", forward_backward,
                    lambda r: {"y": r[0].detach().numpy(), "dx": r[1].numpy(),
                               "dW": dense_dw(r[2])},
                    torch_inputs(torch, p, requires_grad=True))],
    }
    return torch_inputs(torch, p), ways


def scipy_csr(peers: dict, p: Problem, ref: Reference):
    """scipy.sparse CSR of W or W^T: forward and grad-input only (it has no sampled product)."""
    scipy_sparse = peers["scipy.sparse"]
    w = scipy_sparse.csr_matrix(ref.w)
    wt = scipy_sparse.csr_matrix(np.ascontiguousarray(ref.w.T))
    ways = {
        "fwd": [Way("Wt @ x^T", lambda x, dy: (wt @ x.T).T, lambda y: {"y": y}),
                Way("x @ W", lambda x, dy: x @ w, lambda y: {"y": y})],
        "gin": [Way("W @ dy^T", lambda x, dy: (w @ dy.T).T, lambda dx: {"dx": dx}),
                Way("dy @ Wt", lambda x, dy: dy @ wt, lambda dx: {"dx": dx})],
    }
    return (lambda: (p.x.copy(), p.dy.copy())), ways


PEERS = {  # table name: (builder, the packages it needs)
    "torch dense": (torch_dense, ("torch",)),
    "torch CSR": (torch_csr, ("torch",)),
    "SparseProp": (sparseprop, ("torch", "sparseprop", "scipy.sparse")),
    "scipy CSR": (scipy_csr, ("scipy.sparse",)),
}
INSTALL = {"torch": "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
           "sparseprop": "pip install sparseprop==0.1.14",
           "scipy.sparse": "pip install scipy==1.17.1"}


def import_peers() -> tuple[dict, dict]:
    """({package: module}, {package: version}) of the peers that import; one line per missing one."""
    # SparseProp's OpenMP reads this when it loads; torch.set_num_threads covers torch's.
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    modules, versions = {}, {}
    try:
        import torch
        torch.set_num_threads(THREADS)
        modules["torch"], versions["torch"] = torch, torch.__version__
    except ImportError:
        print(f"skipped: torch not installed ({INSTALL['torch']})")
    try:
        import scipy
        import scipy.sparse
        modules["scipy.sparse"], versions["scipy"] = scipy.sparse, scipy.__version__
    except ImportError:
        print(f"skipped: scipy not installed ({INSTALL['scipy.sparse']})")
    if "torch" in modules:
        try:
            from importlib.metadata import version
            from sparseprop.modules.linear import SparseLinear
            modules["sparseprop"], versions["sparseprop"] = SparseLinear, version("sparseprop")
        except ImportError as error:
            if getattr(error, "name", None) == "sparseprop":
                print(f"skipped: sparseprop not installed ({INSTALL['sparseprop']})")
            else:
                print(f"skipped: sparseprop does not import ({error})")
    else:
        print("skipped: sparseprop, which needs torch")
    return modules, versions


def check(contender: str, op: str, entry: Entry, ref: Reference, failures: list) -> bool:
    """True if the entry's first timed call gives the float64 result within the bound."""
    try:
        problem = ref.error(entry.outputs(entry.timer.run_calls()[0]))
    except Exception as error:  # a peer's API refusing the call is a failure like a wrong result
        problem = f"{type(error).__name__}: {error}"
    if problem:
        failures.append(f"{contender} {op} ({entry.how}): {problem}")
        progress(f"FAILED {failures[-1]}")
    return problem is None


def choose(name: str, make_inputs, ways: dict, ref: Reference, failures: list) -> dict:
    """{op: Entry}: per op the fastest of the ways that pass the check."""
    chosen_ways, entries = {}, {}
    for op, candidates in ways.items():
        passed = []
        for way in candidates:
            try:
                timer = PeerTimed(way.fn, way.make_inputs or make_inputs)
            except Exception as error:
                failures.append(f"{name} {op} ({way.how}): {type(error).__name__}: {error}")
                progress(f"FAILED {failures[-1]}")
                continue
            entry = Entry(way.how, timer, way.outputs)
            if check(name, op, entry, ref, failures):
                passed.append((way, entry))
        if not passed:
            continue
        for _ in range(RACE_RUNS if len(passed) > 1 else 0):
            for _, entry in passed:
                time.sleep(PAUSE_SECONDS)
                entry.timer.run()
        chosen_ways[op], entries[op] = min(
            passed, key=lambda pair: statistics.median(pair[1].timer.seconds or [0]))
        entries[op].timer.seconds.clear()  # the race does not count in the table
    if "bwd" not in ways and {"gin", "gval"} <= chosen_ways.keys():
        composed = compose(chosen_ways, ("gin", "gval"), ("dx", "dW"))
        entries["bwd"] = Entry("gin + gval", PeerTimed(composed.fn, make_inputs), composed.outputs)
        check(name, "bwd", entries["bwd"], ref, failures)
    if "f+b" not in ways and {"fwd", "gin", "gval"} <= chosen_ways.keys():
        composed = compose(chosen_ways, ("fwd", "gin", "gval"), ("y", "dx", "dW"))
        entries["f+b"] = Entry("fwd + gin + gval", PeerTimed(composed.fn, make_inputs),
                               composed.outputs)
        check(name, "f+b", entries["f+b"], ref, failures)
    return entries


def compose(ways: dict, ops_: tuple, keys: tuple) -> Way:
    """The chosen ways of `ops_` run one after the other, as one call."""
    parts = [ways[op] for op in ops_]
    fn = lambda x, dy: tuple(part.fn(x, dy) for part in parts)
    outputs = lambda results: {key: part.outputs(r)[key]
                               for key, part, r in zip(keys, parts, results)}
    return Way(" + ".join(ops_), fn, outputs)


COLUMNS = (("batch x in x out", 16), ("dens", 5), ("bs", 3), ("contender", 11),
           *((f"{op} ms", 9) for op in OPS), *((f"x {op}", 6) for op in OPS), ("how", 0))


def format_row(cells: Sequence[str]) -> str:
    return " ".join(cell.rjust(width) if width else cell
                    for (_, width), cell in zip(COLUMNS, cells))


def run_case(case: Case, seed: int, rounds: int, mode: str, peers: dict,
             failures: list) -> list[str]:
    """The case's table rows: ours, then every peer, with its ways and ratios."""
    label = f"{case.batch}x{case.input_size}x{case.output_size} d{case.density} bs{case.block_size}"
    progress(f"{label}: float64 reference")
    p = Problem(case, "fp32", seed)
    ref = Reference(p)
    progress(f"{label}: checking our op")
    contenders = {"ours": {}}
    for op, entry in our_entries(p, mode).items():
        if check("ours", op, entry, ref, failures):
            contenders["ours"][op] = entry
    for name, (build, needs) in PEERS.items():
        if all(package in peers for package in needs):
            progress(f"{label}: checking {name} and picking its fastest ways")
            make_inputs, ways = build(peers, p, ref)
            contenders[name] = choose(name, make_inputs, ways, ref, failures)
    del ref  # the float64 arrays are large; the timed rounds do not need them
    timers = [entry.timer for entries in contenders.values() for entry in entries.values()]
    for round_ in range(rounds):
        progress(f"{label}: round {round_ + 1}/{rounds}")
        for timer in timers:
            time.sleep(PAUSE_SECONDS)
            timer.run()
    ours = {op: entry.timer.median() for op, entry in contenders["ours"].items()}
    rows = []
    for name, entries in contenders.items():
        ms = {op: entry.timer.median() * 1e3 for op, entry in entries.items()}
        ratios = [f"{ms[op] / (ours[op] * 1e3):.1f}" if name != "ours" and op in ms and op in ours
                  else "" for op in OPS]
        hows = list(dict.fromkeys(entry.how for entry in entries.values()))
        how = hows[0] if len(hows) == 1 else ", ".join(
            f"{op} {entry.how}" for op, entry in entries.items())
        rows.append(format_row([
            f"{case.batch}x{case.input_size}x{case.output_size}", f"{case.density:.2f}",
            str(case.block_size), name, *(f"{ms[op]:.3f}" if op in ms else "-" for op in OPS),
            *ratios, how]))
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="peers.py", description=__doc__.split("\n\n")[0],
                                epilog="Peers that are not installed are skipped with one "
                                       "line; pip install -r bench/requirements-peers.txt "
                                       "installs them all.")
    parser.add_argument("--quick", action="store_true",
                        help=f"{len(QUICK_CASES)} of the {len(CASES)} cases, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per case (default 7, 3 with --quick)")
    parser.add_argument("--mode", choices=benchmark.MODES, default="call",
                        help="how our op runs: one eager call from Python (call, "
                             "as the peers are called) or inside a traced loop of many calls "
                             "(loop, as a training segment runs it); default call")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 7
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    benchmark.configure_threads()
    peers, versions = import_peers()
    library_versions = ", ".join(f"{name} {v}" for name, v in
                                 {"TensorFlow": tf.__version__, "numpy": np.__version__,
                                  **versions}.items())
    print(f"CPU: {cpu_model()}; op kernels: {ops.kernel_isa()}\n"
          f"{library_versions}\n"
          f"{THREADS} threads each (TensorFlow intra-op {THREADS}, inter-op 1; "
          f"torch.set_num_threads({THREADS}); OMP_NUM_THREADS={THREADS} for SparseProp); "
          f"scipy's sparse products run on 1 thread.\n"
          f"fp32, ms per call, median of {args.rounds} interleaved rounds; our op in "
          f"`{args.mode}` mode, the peers called from Python.\n"
          f"fwd y = x W, gin dx = dy W^T, gval dW at the pattern (torch dense: all of x^T dy), "
          f"bwd gin and gval, f+b all three; x op = peer time / our time (above 1: ours is "
          f"faster).\n"
          f"Peers get the pattern as element-wise CSR (blocks expanded); W = CSR of W "
          f"[in, out], Wt = CSR of W^T [out, in]; each result within "
          f"{BOUND_FACTOR} n eps32 |.|-magnitude of float64 numpy before it is timed.",
          flush=True)
    failures = []
    print(format_row([header for header, _ in COLUMNS]), flush=True)
    for seed, case in enumerate(QUICK_CASES if args.quick else CASES):
        for row in run_case(case, seed, args.rounds, args.mode, peers, failures):
            print(row, flush=True)
    if failures:
        print(f"\n{len(failures)} check(s) failed (not timed):")
        for failure in failures:
            print(f"  {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
