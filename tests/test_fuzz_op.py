"""Property-based fuzzing of the dynamic sparse matmul op (hypothesis).

Every call of a raw op either matches a float64 numpy reference or raises a
TensorFlow error; it never crashes, never returns garbage. Validity is decided
here, independently of the op: `tests/fuzz/oracle.py` re-states the metainfo
format in pure Python and each `expect_*` below re-states an op's interface
(ranks, block sizes, sizes, capacity). A case is
  valid:   the op must return the reference (within a float32/float16 error bound);
  invalid: the op must raise InvalidArgumentError (a trace-time ValueError in graph mode);
  either:  a degenerate case the interface leaves open (a zero-sized weight, a
           block size the other ops refuse): the reference or a TensorFlow error.

Profiles (HYPOTHESIS_PROFILE): `default` (bounded, well under a minute), `long`
(thousands of cases per property), `asan` (what `make test-fuzz-asan` runs in a
child process against the AddressSanitizer build, see tests/fuzz/run_asan.py).
FUZZ_CASE_LOG=path logs every call (BEGIN before, END after: a crash leaves a
BEGIN last); FUZZ_SURVEY=1 records a wrong result in that log and carries on
instead of failing, so a whole run can be counted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.fuzz import loader, oracle

ops, raw, sparse = loader.load()
import tensorflow as tf  # noqa: E402  (after the loader picked the op library)

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ settings
_PROFILES = {  # max_examples per property (the slower graph, dtype and API ones run a fifth)
    "default": 200,
    "asan": 500,
    "long": 5000,
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
if PROFILE not in _PROFILES:
    raise ValueError(f"HYPOTHESIS_PROFILE must be one of {sorted(_PROFILES)}, got {PROFILE!r}")
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", _PROFILES[PROFILE]))


def fuzz_settings(share=1.0):
    return settings(
        max_examples=max(1, int(MAX_EXAMPLES * share)),
        deadline=None,
        # Failing examples are replayed first next time; build/ is git-ignored.
        database=DirectoryBasedExampleDatabase(str(REPO / "build" / "hypothesis")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
        print_blob=True,
    )


# ------------------------------------------------------------- case logging
SURVEY = os.environ.get("FUZZ_SURVEY") == "1"
_LOG = open(os.environ["FUZZ_CASE_LOG"], "a", buffering=1) if os.environ.get("FUZZ_CASE_LOG") else None


class Bug(AssertionError):
    pass


class Empty(tuple):
    """The shape of a result without elements: numpy cannot hold [0, 2**63 - 1]."""


def run_case(test, op, expectation, call, reference, graph=False, description="", shape=None):
    """Calls the op and judges it against the expectation; see the module docstring.

    expectation: (kind, reason), kind in valid / invalid / either.
    call: () -> numpy array (or Empty). reference: () -> (value, bound).
    shape: () -> the result's shape, for an Empty result (else the reference's).
    """
    kind, reason = expectation
    if _LOG:
        _LOG.write(f"BEGIN {test} {op} {kind} {description}\n")
    started = time.perf_counter()
    outcome, problem = "HARNESS-ERROR", None  # unless judged below
    try:
        outcome, problem = _judge(kind, reason, call, reference, graph, op, shape)
    finally:
        if _LOG:
            _LOG.write(f"END {test} {op} {kind} {outcome} {time.perf_counter() - started:.4f}"
                       + (f" | {problem}" if problem else "") + "\n")
    if problem and not SURVEY:
        raise Bug(f"{op}: {problem}\n{description}")


def _judge(kind, reason, call, reference, graph, op, shape):
    outcome, problem = None, None
    try:
        result = call()
        error = None
    except tf.errors.OpError as e:
        error = e
    except (TypeError, ValueError) as e:  # Python-level conversion or graph-mode shape function
        error = e
    if error is not None:
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"
        if kind == "valid":
            problem = f"valid input ({reason or 'all checks pass'}) was rejected: {message}"
        elif kind == "invalid":
            allowed = (tf.errors.InvalidArgumentError, ValueError) if graph else (tf.errors.InvalidArgumentError,)
            if not isinstance(error, allowed):
                problem = f"invalid input ({reason}) raised the wrong error: {message}"
        outcome = "rejected"
    else:
        if kind == "invalid":
            problem = (f"invalid input ({reason}) was accepted, returned shape "
                       f"{tuple(result) if isinstance(result, Empty) else np.shape(result)}")
        elif isinstance(result, Empty):
            expected = tuple(shape()) if shape else reference()[0].shape
            if tuple(result) != expected:
                problem = f"{kind} input ({reason or 'all checks pass'}) gave shape {tuple(result)}, not {expected}"
        else:
            value, bound = reference()
            try:
                oracle.assert_close(op, result, value, bound)
            except AssertionError as e:
                problem = f"{kind} input ({reason or 'all checks pass'}) gave a wrong result: {e}"
        outcome = "matched"
    return ("BUG" if problem else outcome), problem


# ------------------------------------------------------------- strategies
BLOCK_SIZES = st.sampled_from(oracle.VALID_BLOCK_SIZES)
DTYPES = st.sampled_from([np.float32, np.float16])
POOLINGS = st.sampled_from(["NONE", "SUM", "AVG", "MAX"])
SEEDS = st.integers(0, 2**32 - 1)
INT32_EDGES = [-2**31, -2**31 + 1, -65536, -1, 0, 1, 2**15, 2**16, 2**30, 2**31 - 2, 2**31 - 1]
HUGE_SIZES = [2**31 - 1, 2**31, 2**32, 2**32 + 16, 2**48, 2**62, 2**63 - 16, 2**63 - 1]


def interesting_ints(limits):
    """int32 values near the sizes that matter, at int32's edges, and anywhere."""
    near = [st.integers(-3, max(limit, 0) + 3) for limit in limits]
    return st.one_of(*near, st.sampled_from(INT32_EDGES), st.integers(-2**31, 2**31 - 1))


def random_values(rng, shape, dtype, scale=1.0, zeros=False, nonfinite=False):
    a = rng.standard_normal(shape) * scale
    if zeros and a.size:
        a[rng.random(shape) < 0.3] = 0.0
    if nonfinite and a.size:
        flat = a.reshape(-1)
        for special in rng.choice([np.nan, np.inf, -np.inf], size=int(rng.integers(1, 3))):
            flat[rng.integers(flat.size)] = special
    return a.astype(dtype)


def valid_metainfo(rng, count, input_blocks, output_blocks, capacity):
    """A random valid pattern of `count` distinct blocks, by the oracle's own builder."""
    count = min(count, capacity, input_blocks * output_blocks)
    flat = rng.choice(input_blocks * output_blocks, size=count, replace=False) if count else np.zeros(0, np.int64)
    rows, cols = (flat // max(output_blocks, 1), flat % max(output_blocks, 1))
    metainfo, _ = oracle.build_metainfo(rows, cols, input_blocks, output_blocks, capacity)
    return metainfo


MUTATIONS = ["set", "swap", "inc", "dec", "truncate", "extend", "dup", "reverse_column"]


@st.composite
def metainfos(draw, input_blocks, output_blocks, capacity, rng):
    """Metainfo arrays from valid through subtly broken to arbitrary bytes."""
    mode = draw(st.sampled_from(["valid", "mutated", "mutated", "ints", "bytes", "reshaped"]))
    count = draw(st.integers(0, max(0, min(capacity, input_blocks * output_blocks))))
    m = valid_metainfo(rng, count, input_blocks, output_blocks, capacity)
    limits = [input_blocks, output_blocks, capacity]
    if mode == "mutated":
        m = m.astype(np.int64)
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(MUTATIONS))
            i = draw(st.integers(0, max(len(m) - 1, 0)))
            if kind == "truncate":
                m = m[:draw(st.integers(0, len(m)))]
            elif kind == "extend":
                m = np.concatenate([m, draw(st.lists(interesting_ints(limits), min_size=1, max_size=4))])
            elif len(m) == 0:
                continue
            elif kind == "set":
                m[i] = draw(interesting_ints(limits))
            elif kind == "swap":
                j = draw(st.integers(0, len(m) - 1))
                m[i], m[j] = m[j], m[i]
            elif kind == "inc":
                m[i] = min(m[i] + draw(st.integers(1, 3)), 2**31 - 1)
            elif kind == "dec":
                m[i] = max(m[i] - draw(st.integers(1, 3)), -2**31)
            elif kind == "dup" and i + 1 < len(m):
                m[i + 1] = m[i]
            elif kind == "reverse_column" and output_blocks + 1 < len(m):
                k = draw(st.integers(output_blocks + 1, len(m) - 1))  # rows out of order
                m[k:k + 3] = m[k:k + 3][::-1].copy()
        m = m.astype(np.int32)
    elif mode == "ints":
        expected = output_blocks + 1 + capacity
        length = draw(st.one_of(st.just(expected), st.integers(max(expected - 2, 0), expected + 2),
                                st.integers(0, 64)))
        m = np.array(draw(st.lists(interesting_ints(limits), min_size=length, max_size=length)),
                     np.int64).astype(np.int32)
    elif mode == "bytes":
        data = draw(st.binary(max_size=4 * (output_blocks + 1 + capacity) + 16))
        m = np.frombuffer(data[:len(data) // 4 * 4], dtype="<i4").astype(np.int32)
    elif mode == "reshaped":
        shape = draw(st.sampled_from(["column", "row", "scalar", "cube"]))
        if shape == "column":
            m = m.reshape(-1, 1)
        elif shape == "row":
            m = m.reshape(1, -1)
        elif shape == "scalar":
            m = np.array(m[0] if len(m) else 0, np.int32)
        else:
            m = m.reshape(1, 1, -1)
    return m


def reshape_maybe(draw, shape, keep_share=0.8):
    """Usually `shape`; otherwise a rank or a dimension gone wrong."""
    if draw(st.floats(0, 1)) < keep_share:
        return tuple(shape)
    kind = draw(st.sampled_from(["dim", "drop", "add", "scalar"]))
    shape = list(shape)
    if kind == "dim" and shape:
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(0, 20))
    elif kind == "drop" and shape:
        shape.pop(draw(st.integers(0, len(shape) - 1)))
    elif kind == "add":
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(0, 3)))
    else:
        shape = []
    return tuple(shape)


def size_attr(draw, natural):
    """An int attribute: mostly the natural value, sometimes anything an int64 holds."""
    return draw(st.one_of(st.just(natural), st.just(natural), st.integers(-2, 200),
                          st.sampled_from(HUGE_SIZES + [0, -1, -2**63])))


# ------------------------------------------------------------ expectations
def _shape(a):
    return tuple(np.shape(a))


def _pattern_expectation(m, capacity, block_size, input_size, output_size):
    if np.ndim(m) != 1:
        return ("invalid", "metainfo not a vector")
    if block_size not in oracle.VALID_BLOCK_SIZES:
        return ("invalid", f"block size {block_size}")
    if input_size % block_size or output_size % block_size:
        return ("invalid", "sizes not multiples of the block size")
    if capacity > oracle.INT32_MAX:
        return ("invalid", "capacity over int32")
    why = oracle.check_metainfo(m, capacity, input_size // block_size, output_size // block_size)
    if why:
        return ("invalid", f"metainfo: {why}")
    return None


def expect_forward(lhs, m, values, anchor, compute, output_size, pooling):
    if output_size < 1:
        return ("invalid", "output_size < 1")
    if np.ndim(lhs) != 2:
        return ("invalid", "lhs not a matrix")
    if np.ndim(values) != 3 or _shape(values)[1] != _shape(values)[2]:
        return ("invalid", "values not [capacity, bs, bs]")
    if np.ndim(compute) != 0:
        return ("invalid", "compute_dense_grad not a scalar")
    capacity, bs, _ = _shape(values)
    input_size = _shape(lhs)[1]
    bad = _pattern_expectation(m, capacity, bs, input_size, output_size)
    if bad:
        return bad
    pool = 1 if pooling == "NONE" else bs
    if np.size(anchor) != 0 and _shape(anchor) != (input_size // pool, output_size // pool):
        return ("invalid", "anchor shape")
    if input_size == 0:
        return ("either", "zero input size: W is [0, out]")
    return ("valid", "")


def expect_grad_input(grad, m, values, input_size):
    if input_size < 1:
        return ("invalid", "input_size < 1")
    if np.ndim(grad) != 2:
        return ("invalid", "grad not a matrix")
    if np.ndim(values) != 3 or _shape(values)[1] != _shape(values)[2]:
        return ("invalid", "values not [capacity, bs, bs]")
    capacity, bs, _ = _shape(values)
    bad = _pattern_expectation(m, capacity, bs, input_size, _shape(grad)[1])
    if bad:
        return bad
    if _shape(grad)[1] == 0:
        return ("either", "zero output size: W is [in, 0]")
    return ("valid", "")


def expect_grad_values(lhs, grad, m, block_size):
    if block_size < 1:
        return ("invalid", "block_size < 1")
    if np.ndim(lhs) != 2 or np.ndim(grad) != 2:
        return ("invalid", "lhs or grad not a matrix")
    if _shape(lhs)[0] != _shape(grad)[0]:
        return ("invalid", "batch sizes differ")
    if _shape(grad)[1] % block_size:
        return ("invalid", "output size not a multiple of the block size")
    capacity = np.size(m) - _shape(grad)[1] // block_size - 1
    if capacity < 0:
        return ("invalid", "metainfo too short")
    bad = _pattern_expectation(m, capacity, block_size, _shape(lhs)[1], _shape(grad)[1])
    if bad:
        return bad
    if _shape(lhs)[1] == 0 or _shape(grad)[1] == 0:
        return ("either", "zero-sized W")
    return ("valid", "")


def expect_pool_abs(dense, block_size):
    if block_size < 1:
        return ("invalid", "block_size < 1")
    if np.ndim(dense) != 2:
        return ("invalid", "dense not a matrix")
    if _shape(dense)[0] % block_size or _shape(dense)[1] % block_size:
        return ("invalid", "sizes not multiples of the block size")
    return ("valid", "")


# ------------------------------------------------------------ op callers
def t(a, dtype=None):
    return tf.constant(a, dtype=dtype) if dtype is not None else tf.constant(a)


def call_forward(lhs, m, values, anchor, compute, output_size, pooling, graph=False):
    args = (t(lhs), t(m, tf.int32), t(values), t(anchor), t(compute, tf.bool))
    return _maybe_graph(lambda *a: raw.ipu_sparse_matmul(*a, output_size=output_size, pooling_type=pooling),
                        args, graph)


def call_grad_input(grad, m, values, input_size, graph=False):
    args = (t(grad), t(m, tf.int32), t(values))
    return _maybe_graph(lambda *a: raw.ipu_sparse_matmul_grad_input(*a, input_size=input_size), args, graph)


def call_grad_values(lhs, grad, m, block_size, graph=False):
    args = (t(lhs), t(grad), t(m, tf.int32))
    return _maybe_graph(lambda *a: raw.ipu_sparse_matmul_grad_values(*a, block_size=block_size), args, graph)


def call_pool_abs(dense, block_size, pooling, graph=False):
    return _maybe_graph(
        lambda a: raw.ipu_sparse_matmul_pool_abs(a, block_size=block_size, pooling_type=pooling),
        (t(dense, tf.float32),), graph)


def _numpy(out):
    return Empty(out.shape.as_list()) if out.shape.num_elements() == 0 else out.numpy()


def _maybe_graph(fn, args, graph):
    if not graph:
        return _numpy(fn(*args))
    static = []

    @tf.function(autograph=False)
    def traced(*a):
        out = fn(*a)
        static.append(out.shape)  # what the shape function promised
        return out

    out = _numpy(traced(*args))
    assert static[0].is_compatible_with(np.shape(out) if not isinstance(out, Empty) else tuple(out)), (
        f"shape function said {static[0]}, the kernel returned {out.shape}")
    return out


def describe(**arrays_and_attrs):
    parts = []
    for name, v in arrays_and_attrs.items():
        if isinstance(v, np.ndarray):
            parts.append(f"{name}={v.dtype}{list(v.shape)}" + (f":{v.reshape(-1)[:40].tolist()}" if v.dtype == np.int32 else ""))
        else:
            parts.append(f"{name}={v!r}")
    return " ".join(parts)


# ================================================ 0. the oracle, by hand
def test_oracle_knows_the_format():
    """The oracle itself, on patterns worked out by hand (README, "The representation")."""
    # W [3 x 2 blocks]: column 0 holds rows 0 and 2, column 1 holds row 1; capacity 4.
    good = np.array([0, 2, 3, 0, 2, 1, 7], np.int32)
    assert oracle.check_metainfo(good, 4, 3, 2) == ""
    np.testing.assert_array_equal(oracle.slots(good, 2)[0], [0, 2, 1])
    np.testing.assert_array_equal(oracle.slots(good, 2)[1], [0, 0, 1])
    metainfo, order = oracle.build_metainfo([1, 2, 0], [1, 0, 0], 3, 2, 4)
    np.testing.assert_array_equal(metainfo[:6], good[:6])
    np.testing.assert_array_equal(order, [2, 1, 0])
    for broken, why in [([1, 2, 3, 0, 2, 1, 7], "first offset"), ([0, 2, 1, 0, 2, 1, 7], "decreases"),
                        ([0, 2, 5, 0, 2, 1, 7], "over capacity"), ([0, 2, 3, 2, 0, 1, 7], "not increasing"),
                        ([0, 2, 3, 0, 0, 1, 7], "not increasing"), ([0, 2, 3, 0, 3, 1, 7], "out of range"),
                        ([0, 2, 3, -1, 2, 1, 7], "out of range"), ([0, 2, 3, 0, 2, 1], "length")]:
        assert why in oracle.check_metainfo(np.array(broken, np.int32), 4, 3, 2), broken
    # The references against a dense float64 W, block size 2.
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 2, 2))
    dense = np.zeros((6, 4))
    for k, (r, c) in enumerate(zip(*oracle.slots(good, 2))):
        dense[2 * r:2 * r + 2, 2 * c:2 * c + 2] = values[k]
    x, dy = rng.standard_normal((5, 6)), rng.standard_normal((5, 4))
    np.testing.assert_allclose(oracle.reference_forward(x, good, values, 4)[0], x @ dense)
    np.testing.assert_allclose(oracle.reference_grad_input(dy, good, values, 6)[0], dy @ dense.T)
    grad_values = oracle.reference_grad_values(x, dy, good, 2)[0]
    for k, (r, c) in enumerate(zip(*oracle.slots(good, 2))):
        np.testing.assert_allclose(grad_values[k], (x.T @ dy)[2 * r:2 * r + 2, 2 * c:2 * c + 2])
    assert np.all(grad_values[3] == 0)  # headroom
    pooled = oracle.reference_dense_grad(x, dy, True, 2, "MAX")[0]
    np.testing.assert_allclose(pooled[1, 0], np.abs(x.T @ dy)[2:4, 0:2].max())
    # A wrong value, a NaN where none belongs and a flipped infinity all fail.
    for actual in ([1.0, 2.5], [1.0, np.nan], [np.inf, 2.0]):
        with pytest.raises(AssertionError):
            oracle.assert_close("x", np.array(actual), np.array([-np.inf if actual[0] == np.inf else 1.0, 2.0]),
                                np.full(2, 0.1))


# ======================================================== 1. valid problems
@st.composite
def problems(draw):
    """A valid problem: a pattern from distinct in-range triplets, any capacity headroom."""
    bs = draw(BLOCK_SIZES)
    if bs == 1:  # element-wise: sizes not multiples of anything
        input_size, output_size = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    else:
        input_size, output_size = bs * draw(st.integers(1, 6)), bs * draw(st.integers(1, 6))
    ib, ob = input_size // bs, output_size // bs
    total = ib * ob
    count = draw(st.one_of(st.just(0), st.integers(0, total), st.just(total)))
    capacity = count + draw(st.one_of(st.just(0), st.integers(0, 8)))
    dtype = draw(DTYPES)
    return dict(
        bs=bs, input_size=input_size, output_size=output_size, count=count, capacity=capacity,
        batch=draw(st.integers(0, 70)), dtype=dtype, pooling=draw(POOLINGS), seed=draw(SEEDS),
        scale=draw(st.sampled_from([1.0, 1e-3, 1e3])) if dtype == np.float32 else 1.0,
        zeros=draw(st.booleans()), nonfinite=draw(st.integers(0, 7)) == 0,
        anchor=draw(st.booleans()), compute=draw(st.booleans()),
        host_builder=draw(st.booleans()))


def build_problem(p):
    rng = np.random.default_rng(p["seed"])
    bs, ib, ob = p["bs"], p["input_size"] // p["bs"], p["output_size"] // p["bs"]
    flat = rng.choice(ib * ob, size=p["count"], replace=False)
    rows, cols = flat // ob, flat % ob
    values = random_values(rng, (p["count"], bs, bs), p["dtype"], p["scale"], p["zeros"])
    metainfo, order = oracle.build_metainfo(rows, cols, ib, ob, p["capacity"])
    nz = np.zeros((p["capacity"], bs, bs), p["dtype"])
    nz[:p["count"]] = values[order]
    if p["host_builder"] and 1 <= p["capacity"] <= ib * ob:
        # The same pattern through the library's own builder must agree exactly.
        spec = sparse.MatmulSpec(p["input_size"], p["output_size"], p["capacity"], bs,
                                 "fp32" if p["dtype"] == np.float32 else "fp16", p["pooling"])
        rep = sparse.representation_from_triplets(
            spec, sparse.Triplets(rows, cols, values.reshape(-1) if bs == 1 else values))
        np.testing.assert_array_equal(rep.metainfo, metainfo)
        np.testing.assert_array_equal(rep.nz_values, nz)
    lhs = random_values(rng, (p["batch"], p["input_size"]), p["dtype"], 1.0, p["zeros"], p["nonfinite"])
    grad = random_values(rng, (p["batch"], p["output_size"]), p["dtype"], 1.0, p["zeros"], p["nonfinite"])
    return metainfo, nz, lhs, grad


@fuzz_settings()
@given(problems())
def test_valid_problems_match_numpy(p):
    metainfo, nz, lhs, grad = build_problem(p)
    bs, pool = p["bs"], (1 if p["pooling"] == "NONE" else p["bs"])
    anchor = np.zeros((p["input_size"] // pool, p["output_size"] // pool) if p["anchor"] else (0, 0), p["dtype"])
    info = describe(**{k: v for k, v in p.items()}, metainfo=metainfo)
    test = "valid_problems"
    run_case(test, "forward", ("valid", ""),
             lambda: call_forward(lhs, metainfo, nz, anchor, p["compute"], p["output_size"], p["pooling"]),
             lambda: oracle.reference_forward(lhs, metainfo, nz, p["output_size"]), description=info)
    run_case(test, "grad_input", ("valid", ""),
             lambda: call_grad_input(grad, metainfo, nz, p["input_size"]),
             lambda: oracle.reference_grad_input(grad, metainfo, nz, p["input_size"]), description=info)
    run_case(test, "grad_values", ("valid", ""),
             lambda: call_grad_values(lhs, grad, metainfo, bs),
             lambda: oracle.reference_grad_values(lhs, grad, metainfo, bs), description=info)
    if p["pooling"] != "NONE":
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs are drawn on purpose
            dense = lhs.astype(np.float32).T @ grad.astype(np.float32)
        run_case(test, "pool_abs", ("valid", ""),
                 lambda: call_pool_abs(dense, bs, p["pooling"]),
                 lambda: oracle.reference_pool_abs(dense, bs, p["pooling"]), description=info)


# ============================================ 2. arbitrary metainfo bytes
@st.composite
def metainfo_cases(draw):
    bs = draw(BLOCK_SIZES)
    ib, ob = draw(st.integers(1, 12 if bs == 1 else 4)), draw(st.integers(1, 12 if bs == 1 else 4))
    capacity = draw(st.integers(0, ib * ob + 4))
    rng = np.random.default_rng(draw(SEEDS))
    m = draw(metainfos(ib, ob, capacity, rng))
    return dict(bs=bs, ib=ib, ob=ob, capacity=capacity, batch=draw(st.integers(0, 20)),
                dtype=draw(DTYPES), pooling=draw(POOLINGS), metainfo=m,
                op=draw(st.sampled_from(["forward", "grad_input", "grad_values"])), rng=rng)


def _run_metainfo_case(c, test, graph=False):
    bs, rng, m = c["bs"], c["rng"], c["metainfo"]
    input_size, output_size = c["ib"] * bs, c["ob"] * bs
    nz = random_values(rng, (c["capacity"], bs, bs), c["dtype"])
    lhs = random_values(rng, (c["batch"], input_size), c["dtype"])
    grad = random_values(rng, (c["batch"], output_size), c["dtype"])
    anchor = np.zeros((0, 0), c["dtype"])
    info = describe(op=c["op"], bs=bs, ib=c["ib"], ob=c["ob"], capacity=c["capacity"],
                    batch=c["batch"], dtype=np.dtype(c["dtype"]).name, metainfo=m)
    if c["op"] == "forward":
        run_case(test, "forward", expect_forward(lhs, m, nz, anchor, False, output_size, c["pooling"]),
                 lambda: call_forward(lhs, m, nz, anchor, False, output_size, c["pooling"], graph),
                 lambda: oracle.reference_forward(lhs, m, nz, output_size), graph, info)
    elif c["op"] == "grad_input":
        run_case(test, "grad_input", expect_grad_input(grad, m, nz, input_size),
                 lambda: call_grad_input(grad, m, nz, input_size, graph),
                 lambda: oracle.reference_grad_input(grad, m, nz, input_size), graph, info)
    else:
        run_case(test, "grad_values", expect_grad_values(lhs, grad, m, bs),
                 lambda: call_grad_values(lhs, grad, m, bs, graph),
                 lambda: oracle.reference_grad_values(lhs, grad, m, bs), graph, info)


@fuzz_settings()
@given(metainfo_cases())
def test_arbitrary_metainfo_is_checked(c):
    _run_metainfo_case(c, "arbitrary_metainfo")


# =================================== 3. mismatched shapes, ranks and attributes
@st.composite
def shape_cases(draw):
    """Any op; each tensor's shape possibly wrong; attributes anywhere in int64."""
    op = draw(st.sampled_from(["forward", "grad_input", "grad_values", "pool_abs"]))
    bs = draw(st.sampled_from(list(oracle.VALID_BLOCK_SIZES) + [2, 3, 5, 32]))
    vbs = bs if bs in oracle.VALID_BLOCK_SIZES else 1
    ib, ob = draw(st.integers(0, 8 if vbs == 1 else 3)), draw(st.integers(0, 8 if vbs == 1 else 3))
    capacity = draw(st.integers(0, ib * ob + 3))
    batch = draw(st.integers(0, 70))
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(SEEDS))
    pooling = draw(POOLINGS)
    in_size, out_size = ib * vbs, ob * vbs
    m = valid_metainfo(rng, draw(st.integers(0, capacity)), ib, ob, capacity)
    if draw(st.booleans()):
        m = draw(metainfos(ib, ob, capacity, rng))
    c = dict(op=op, dtype=dtype, pooling=pooling, metainfo=m, bs=bs)
    shape = lambda s: reshape_maybe(draw, s)  # noqa: E731
    if op == "forward":
        pool = 1 if pooling == "NONE" else vbs
        c.update(lhs=shape((batch, in_size)), values=shape((capacity, vbs, vbs)),
                 anchor=shape(draw(st.sampled_from([(0, 0), (in_size // pool, out_size // pool)]))),
                 compute=shape(()), output_size=size_attr(draw, out_size))
    elif op == "grad_input":
        input_size = size_attr(draw, in_size)
        grad_shape = shape((batch, out_size))
        if input_size > 10**6 and len(grad_shape) == 2:
            grad_shape = (0, grad_shape[1])  # a huge grad_lhs must not be allocated for real
        c.update(grad=grad_shape, values=shape((capacity, vbs, vbs)), input_size=input_size)
    elif op == "grad_values":
        c.update(lhs=shape((batch, in_size)), grad=shape((batch, out_size)),
                 block_size=draw(st.one_of(st.just(bs), st.just(vbs), st.integers(-1, 40),
                                           st.sampled_from(HUGE_SIZES))))
    else:
        c.update(dense=shape((in_size, out_size)), pooling=draw(st.sampled_from(["SUM", "AVG", "MAX"])),
                 block_size=draw(st.one_of(st.just(bs), st.integers(-1, 40), st.sampled_from(HUGE_SIZES))))
    c["rng"] = rng
    return c


def _run_shape_case(c, test, graph=False):
    rng, dtype, m = c["rng"], c["dtype"], c["metainfo"]
    arr = lambda key: random_values(rng, c[key], dtype)  # noqa: E731
    info = describe(**{k: (np.dtype(v).name if k == "dtype" else v) for k, v in c.items() if k != "rng"})
    if c["op"] == "forward":
        lhs, values, anchor = arr("lhs"), arr("values"), np.zeros(c["anchor"], dtype)
        compute = np.zeros(c["compute"], bool)
        run_case(test, "forward", expect_forward(lhs, m, values, anchor, compute, c["output_size"], c["pooling"]),
                 lambda: call_forward(lhs, m, values, anchor, compute, c["output_size"], c["pooling"], graph),
                 lambda: oracle.reference_forward(lhs, m, values, c["output_size"]), graph, info)
    elif c["op"] == "grad_input":
        grad, values = arr("grad"), arr("values")
        run_case(test, "grad_input", expect_grad_input(grad, m, values, c["input_size"]),
                 lambda: call_grad_input(grad, m, values, c["input_size"], graph),
                 lambda: oracle.reference_grad_input(grad, m, values, c["input_size"]), graph, info,
                 shape=lambda: (grad.shape[0], c["input_size"]))
    elif c["op"] == "grad_values":
        lhs, grad = arr("lhs"), arr("grad")
        run_case(test, "grad_values", expect_grad_values(lhs, grad, m, c["block_size"]),
                 lambda: call_grad_values(lhs, grad, m, c["block_size"], graph),
                 lambda: oracle.reference_grad_values(lhs, grad, m, c["block_size"]), graph, info)
    else:
        dense = random_values(rng, c["dense"], np.float32)
        run_case(test, "pool_abs", expect_pool_abs(dense, c["block_size"]),
                 lambda: call_pool_abs(dense, c["block_size"], c["pooling"], graph),
                 lambda: oracle.reference_pool_abs(dense, c["block_size"], c["pooling"]), graph, info)


@fuzz_settings()
@given(shape_cases())
def test_mismatched_shapes_and_attributes(c):
    _run_shape_case(c, "mismatched_shapes")


@fuzz_settings(share=0.2)
@given(st.one_of(shape_cases(), metainfo_cases()))
def test_graph_mode_shape_functions(c):
    """Traced with static shapes: the shape functions run too, and must agree with the kernels."""
    if "lhs" in c or "grad" in c or "dense" in c:
        _run_shape_case(c, "graph_mode", graph=True)
    else:
        _run_metainfo_case(c, "graph_mode", graph=True)


@fuzz_settings(share=0.2)
@given(st.sampled_from(["forward", "grad_input", "grad_values", "pool_abs"]), DTYPES, SEEDS)
def test_mixed_dtypes_are_rejected(op, dtype, seed):
    """T must be one type for every float input; a mix is an error, not a reinterpretation."""
    rng = np.random.default_rng(seed)
    other = np.float16 if dtype == np.float32 else np.float32
    m = valid_metainfo(rng, 2, 2, 2, 3)
    x, v = tf.constant(random_values(rng, (3, 2), dtype)), tf.constant(random_values(rng, (3, 1, 1), other))
    calls = {
        "forward": lambda: raw.ipu_sparse_matmul(x, m, v, tf.zeros((0, 0), dtype), False, output_size=2),
        "grad_input": lambda: raw.ipu_sparse_matmul_grad_input(x, m, v, input_size=2),
        "grad_values": lambda: raw.ipu_sparse_matmul_grad_values(x, tf.cast(x, other), m, block_size=1),
        "pool_abs": lambda: raw.ipu_sparse_matmul_pool_abs(tf.cast(x, tf.float16), block_size=1,
                                                           pooling_type="SUM"),
    }
    if _LOG:
        _LOG.write(f"BEGIN mixed_dtypes {op} invalid\n")
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError)):
        calls[op]()
    if _LOG:
        _LOG.write(f"END mixed_dtypes {op} invalid rejected 0\n")


# ============================== 4. the public API and its registered gradients
@fuzz_settings(share=0.2)
@given(problems())
def test_public_api_and_gradients_match_numpy(p):
    total = (p["input_size"] // p["bs"]) * (p["output_size"] // p["bs"])
    p = dict(p, capacity=min(max(p["capacity"], 1), total))  # what MatmulSpec accepts
    metainfo, nz, lhs, grad = build_problem(p)
    spec = sparse.MatmulSpec(p["input_size"], p["output_size"], p["capacity"], p["bs"],
                             "fp32" if p["dtype"] == np.float32 else "fp16", p["pooling"])
    lhs_t, values_t = tf.constant(lhs), tf.constant(nz)
    anchor = ops.dense_grad_anchor(spec)
    info = describe(**p, metainfo=metainfo)
    results = {}

    def run():
        with tf.GradientTape() as tape:
            tape.watch([lhs_t, values_t, anchor])
            out = ops.sparse_matmul(lhs_t, sparse.Representation(metainfo, values_t), spec,
                                    compute_dense_grad=p["compute"], dense_grad_anchor=anchor)
            loss = tf.reduce_sum(tf.cast(out, tf.float64) * tf.constant(grad, tf.float64))
        g = tape.gradient(loss, [lhs_t, values_t, anchor])
        results.update(out=out.numpy(), lhs=g[0].numpy(), values=g[1].numpy(), dense=g[2].numpy())
        return results["out"]

    run_case("public_api", "api_forward", ("valid", ""), run,
             lambda: oracle.reference_forward(lhs, metainfo, nz, p["output_size"]), description=info)
    if "lhs" not in results:
        return
    # The loss is sum(out * grad): the gradients are the op's grads for that grad.
    for name, ref in (("api_grad_input", oracle.reference_grad_input(grad, metainfo, nz, p["input_size"])),
                      ("api_grad_values", oracle.reference_grad_values(lhs, grad, metainfo, p["bs"])),
                      ("api_dense_grad", oracle.reference_dense_grad(lhs, grad, p["compute"], p["bs"],
                                                                     p["pooling"]))):
        key = {"api_grad_input": "lhs", "api_grad_values": "values", "api_dense_grad": "dense"}[name]
        run_case("public_api", name, ("valid", ""), lambda key=key: results[key], lambda ref=ref: ref,
                 description=info)


# ======================== 5. the host utilities share the op's pattern checks
@fuzz_settings()
@given(st.data())
def test_host_utils_pattern_indices_checks_like_the_op(data):
    ib = data.draw(st.one_of(st.integers(0, 8), st.sampled_from([-1, -2, -2**62, 2**40])), "input_blocks")
    ob = data.draw(st.one_of(st.integers(0, 8), st.sampled_from([-1, -2, -3, -2**62, 2**40, 2**63 - 1])),
                   "output_blocks")
    capacity = data.draw(st.one_of(st.integers(0, 12), st.sampled_from([-1, -2, 2**31, 2**63 - 1])), "capacity")
    rng = np.random.default_rng(data.draw(SEEDS, "seed"))
    sane = min(ib, ob, capacity) >= 0 and max(ib, ob, capacity) <= 64
    m = (data.draw(metainfos(ib, ob, capacity, rng), "metainfo") if sane else
         np.array(data.draw(st.lists(interesting_ints([4]), max_size=12), "metainfo"), np.int64).astype(np.int32))
    why = (oracle.check_metainfo(m, capacity, ib, ob) if np.ndim(m) == 1 else "not a vector")
    expected = ("invalid", why) if why else ("valid", "")
    info = describe(input_blocks=ib, output_blocks=ob, capacity=capacity, metainfo=np.asarray(m))

    def call():
        try:
            rows, cols = sparse.host_utils.pattern_indices(m, capacity, ib, ob)
        except ValueError as e:  # how the host utilities refuse
            raise tf.errors.InvalidArgumentError(None, None, str(e)) from e
        return np.stack([rows, cols]).astype(np.float64)

    def reference():
        rows, cols = oracle.slots(m, ob)
        value = np.stack([rows, cols]).astype(np.float64)
        return value, np.zeros_like(value)

    run_case("host_utils", "pattern_indices", expected, call, reference, description=info)


@fuzz_settings()
@given(st.data())
def test_host_utils_build_metainfo_checks_like_the_oracle(data):
    ib = data.draw(st.one_of(st.integers(0, 8), st.sampled_from([-1, -3])), "input_blocks")
    ob = data.draw(st.one_of(st.integers(0, 8), st.sampled_from([-1, -3])), "output_blocks")
    capacity = data.draw(st.one_of(st.integers(0, 20), st.sampled_from([-1, -3, 2**31, 2**40])), "capacity")
    n = data.draw(st.integers(0, 12), "count")
    rows = np.array(data.draw(st.lists(st.integers(-2, max(ib, 0) + 1), min_size=n, max_size=n), "rows"), np.int64)
    cols = np.array(data.draw(st.lists(st.integers(-2, max(ob, 0) + 1), min_size=n, max_size=n), "cols"), np.int64)
    in_range = bool(np.all((rows >= 0) & (rows < ib) & (cols >= 0) & (cols < ob)))
    distinct = len(set(zip(rows.tolist(), cols.tolist()))) == n
    if min(ib, ob, capacity) < 0:
        expected = ("invalid", "negative size")
    elif capacity > oracle.INT32_MAX:
        expected = ("invalid", "capacity over int32")
    elif not (in_range and distinct and n <= capacity):
        expected = ("invalid", "out of range, duplicate or over capacity")
    else:
        expected = ("valid", "")
    info = describe(rows=rows, cols=cols, input_blocks=ib, output_blocks=ob, capacity=capacity)

    def call():
        try:
            metainfo, order = sparse.host_utils.build_metainfo(rows, cols, ib, ob, capacity)
        except ValueError as e:
            raise tf.errors.InvalidArgumentError(None, None, str(e)) from e
        return np.concatenate([metainfo, order]).astype(np.float64)

    def reference():
        metainfo, order = oracle.build_metainfo(rows, cols, ib, ob, capacity)
        value = np.concatenate([metainfo, order]).astype(np.float64)
        return value, np.zeros_like(value)

    run_case("host_utils", "build_metainfo", expected, call, reference, description=info)
