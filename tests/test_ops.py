"""The op against numpy (float64) for the forward pass and every gradient."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from ipu_sparse_ops import ops, sparse

REPO = __file__.rsplit("/tests/", 1)[0]


def make_problem(rng, batch, input_size, output_size, block_size, count, capacity,
                 data_type="fp32", pooling_type="NONE"):
    spec = sparse.MatmulSpec(input_size, output_size, capacity, block_size, data_type, pooling_type)
    triplets = sparse.random_triplets(spec, count, rng)
    lhs = rng.standard_normal((batch, input_size)).astype(spec.dtype)
    grad_out = rng.standard_normal((batch, output_size)).astype(spec.dtype)
    return spec, triplets, lhs, grad_out


def run_op(spec, triplets, lhs, grad_out):
    """Forward and all gradients of sum(op(lhs) * grad_out)."""
    rep = sparse.representation_from_triplets(spec, triplets)
    lhs_t, values_t = tf.constant(lhs), tf.constant(rep.nz_values)
    anchor = ops.dense_grad_anchor(spec)
    with tf.GradientTape() as tape:
        tape.watch([lhs_t, values_t, anchor])
        out = ops.sparse_matmul(lhs_t, sparse.Representation(rep.metainfo, values_t), spec,
                                compute_dense_grad=True, dense_grad_anchor=anchor)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * tf.constant(grad_out, tf.float32))
    grads = tape.gradient(loss, [lhs_t, values_t, anchor])
    return rep, out.numpy(), *(g.numpy() for g in grads)


def numpy_reference(spec, triplets, lhs, grad_out):
    """Forward, input gradient, dense dW and the pattern's blocks of dW, in float64."""
    bs = spec.block_size
    weight = np.zeros((spec.input_size, spec.output_size))
    for r, c, v in zip(triplets.row_indices, triplets.col_indices, triplets.values):
        weight[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = np.asarray(v, np.float64).reshape(bs, bs)
    x, dy = lhs.astype(np.float64), grad_out.astype(np.float64)
    dense = x.T @ dy
    return x @ weight, dy @ weight.T, dense


def pool(dense, bs, pooling_type):
    blocks = np.abs(dense).reshape(dense.shape[0] // bs, bs, dense.shape[1] // bs, bs)
    return {"SUM": np.sum, "AVG": np.mean, "MAX": np.max}[pooling_type](blocks, axis=(1, 3))


def check_against_numpy(spec, triplets, lhs, grad_out, rtol, atol):
    rep, out, grad_lhs, grad_values, dense_grad = run_op(spec, triplets, lhs, grad_out)
    ref_out, ref_grad_lhs, ref_dense = numpy_reference(spec, triplets, lhs, grad_out)
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad_lhs, ref_grad_lhs, rtol=rtol, atol=atol)
    # Non-zero gradient: each slot's block of dW, found through the slot's indices.
    bs = spec.block_size
    rows, cols = sparse.host_utils.pattern_indices(
        rep.metainfo, spec.max_non_zero_blocks, spec.input_blocks, spec.output_blocks)
    for slot, (r, c) in enumerate(zip(rows, cols)):
        np.testing.assert_allclose(
            grad_values[slot], ref_dense[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs],
            rtol=rtol, atol=atol)
    assert np.all(grad_values[len(rows):] == 0), "capacity headroom must get zero gradient"
    # The dense gradient is TensorFlow's matmul, whose summation order (oneDNN's
    # or Eigen's blocking) is not ours: it is held to the standard float32 dot
    # product bound, rtol times the sum of |terms|, as the self-check tool does.
    # A missing or misplaced term is off by a whole |term|, far outside it.
    magnitude = np.abs(lhs.astype(np.float64)).T @ np.abs(grad_out.astype(np.float64))
    if spec.pooling_type == "NONE":
        want, tolerance = ref_dense, atol + rtol * magnitude
    else:
        want = pool(ref_dense, bs, spec.pooling_type)
        tolerance = atol * bs * bs + rtol * pool(magnitude, bs, spec.pooling_type)
    assert np.all(np.abs(dense_grad - want) <= tolerance), np.max(np.abs(dense_grad - want) - tolerance)


SHAPES = [  # batch, input, output: awkward sizes, batch 1, non-square
    (1, 7, 5), (3, 33, 65), (17, 100, 3), (64, 48, 80), (257, 96, 32), (5, 1, 9)]


@pytest.mark.parametrize("batch,input_size,output_size", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_element_wise_matches_numpy(batch, input_size, output_size, density):
    rng = np.random.default_rng(batch * 1000 + input_size)
    total = input_size * output_size
    count = max(1, round(density * total))
    capacity = min(total, count + 3)  # headroom the kernels must skip
    spec, triplets, lhs, grad_out = make_problem(rng, batch, input_size, output_size, 1,
                                                 count, capacity)
    check_against_numpy(spec, triplets, lhs, grad_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [4, 8, 16])
@pytest.mark.parametrize("pooling_type", ["NONE", "SUM", "AVG", "MAX"])
@pytest.mark.parametrize("data_type", ["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 13, 70])
def test_blocks_match_numpy(block_size, pooling_type, data_type, batch):
    rng = np.random.default_rng(block_size * 7 + batch)
    input_size, output_size = 3 * 16, 5 * 16
    blocks = (input_size // block_size) * (output_size // block_size)
    count = blocks // 3
    spec, triplets, lhs, grad_out = make_problem(rng, batch, input_size, output_size, block_size,
                                                 count, count + 2, data_type, pooling_type)
    rtol, atol = (1e-5, 1e-5) if data_type == "fp32" else (1e-3, 1e-2)
    check_against_numpy(spec, triplets, lhs, grad_out, rtol, atol)


def test_fp16_element_wise_matches_numpy():
    rng = np.random.default_rng(3)
    spec, triplets, lhs, grad_out = make_problem(rng, 9, 40, 24, 1, 200, 210, "fp16")
    check_against_numpy(spec, triplets, lhs, grad_out, rtol=1e-3, atol=1e-2)


def test_dense_grad_is_zero_unless_requested_at_run_time():
    rng = np.random.default_rng(4)
    spec, triplets, lhs, grad_out = make_problem(rng, 4, 16, 8, 1, 20, 20)
    rep = sparse.representation_from_triplets(spec, triplets)
    anchor = ops.dense_grad_anchor(spec)
    flag = tf.Variable(False)

    @tf.function
    def dense_grad():
        with tf.GradientTape() as tape:
            tape.watch(anchor)
            out = ops.sparse_matmul(lhs, rep, spec, compute_dense_grad=flag, dense_grad_anchor=anchor)
            loss = tf.reduce_sum(out * grad_out)
        return tape.gradient(loss, anchor)

    assert np.all(dense_grad().numpy() == 0)
    flag.assign(True)
    np.testing.assert_allclose(dense_grad().numpy(), lhs.T.astype(np.float64) @ grad_out,
                               rtol=1e-5, atol=1e-5)
    assert dense_grad.experimental_get_tracing_count() == 1


def test_one_trace_across_100_pattern_updates():
    rng = np.random.default_rng(5)
    spec = sparse.MatmulSpec(24, 40, max_non_zero_blocks=120)
    lhs = rng.standard_normal((6, 24)).astype(np.float32)
    first = sparse.representation_from_triplets(spec, sparse.random_triplets(spec, 100, rng))
    metainfo = tf.Variable(first.metainfo)
    values = tf.Variable(first.nz_values)

    @tf.function
    def forward(x):
        return ops.sparse_matmul(x, sparse.Representation(metainfo, values), spec)

    for update in range(100):
        count = int(rng.integers(1, 121))  # changing non-zero counts within the capacity
        triplets = sparse.random_triplets(spec, count, rng)
        rep = sparse.representation_from_triplets(spec, triplets)
        metainfo.assign(rep.metainfo)
        values.assign(rep.nz_values)
        expected = lhs.astype(np.float64) @ sparse.dense_from_triplets(spec, triplets)
        np.testing.assert_allclose(forward(lhs).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert forward.experimental_get_tracing_count() == 1


def test_sizes_not_multiple_of_block_size_are_rejected_in_python():
    with pytest.raises(ValueError, match="input_size=18 is not a multiple of block_size=4"):
        sparse.MatmulSpec(18, 16, 4, block_size=4)
    with pytest.raises(ValueError, match="output_size=20 is not a multiple of block_size=8"):
        sparse.MatmulSpec(16, 20, 4, block_size=8)


CORRUPTIONS = {
    # name: (metainfo edit as Python source applied to `m`, expected message fragment)
    "row out of range": ("m[O + 1] = 99", "outside"),
    "negative row": ("m[O + 1] = -1", "outside"),
    "duplicate row": ("m[O + 2] = m[O + 1]", "duplicate"),
    "rows out of order": ("m[O + 1], m[O + 2] = m[O + 2], m[O + 1]", "out of order"),
    "offsets decreasing": ("m[2] = m[1] - 1", "below"),
    "over capacity": ("m[O] = C + 1", "exceeds the capacity"),
    "first offset not zero": ("m[0] = 1", "expected 0"),
    "huge offset": ("m[O] = 2**31 - 1", "exceeds the capacity"),
}


@pytest.mark.parametrize("block_size", [1, 4])
def test_corrupt_metainfo_is_a_clean_error_in_a_child_process(block_size):
    """Every op, every corruption: InvalidArgument, and the child process survives."""
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        from ipu_sparse_ops import ops, sparse
        bs = {block_size}
        spec = sparse.MatmulSpec(16, 16, max_non_zero_blocks=8, block_size=bs)
        # Two blocks in column 0 (rows 0, 1) and the rest spread out.
        trip = sparse.Triplets(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 2]),
                               np.ones((4,) if bs == 1 else (4, bs, bs), np.float32))
        rep = sparse.representation_from_triplets(spec, trip)
        O, C = spec.output_blocks, spec.max_non_zero_blocks
        x = tf.ones((3, 16))
        for name, edit in {sorted((k, v[0]) for k, v in CORRUPTIONS.items())!r}:
            m = rep.metainfo.copy()
            exec(edit)
            calls = [
                lambda: ops.sparse_matmul(x, sparse.Representation(m, rep.nz_values), spec),
                lambda: ops._ops.ipu_sparse_matmul_grad_input(x, m, rep.nz_values, input_size=16),
                lambda: ops._ops.ipu_sparse_matmul_grad_values(x, x, m, block_size=bs),
            ]
            for call in calls:
                try:
                    call()
                    print(name, "| NO ERROR")
                except tf.errors.InvalidArgumentError as error:
                    print(name, "| InvalidArgument:", error.message.splitlines()[0])
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line]
    assert len(lines) == 3 * len(CORRUPTIONS), result.stdout
    for line in lines:
        name, outcome = line.split(" | ")
        assert outcome.startswith("InvalidArgument:") and CORRUPTIONS[name][1] in outcome, line


def test_mismatched_values_shape_is_invalid_argument():
    spec = sparse.MatmulSpec(8, 8, 4)
    rep = sparse.representation_from_triplets(
        spec, sparse.Triplets(np.array([0]), np.array([0]), np.ones(1, np.float32)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="metainfo"):
        ops._ops.ipu_sparse_matmul(tf.ones((2, 8)), rep.metainfo, np.ones((5, 1, 1), np.float32),
                                   tf.zeros((0, 0)), False, output_size=8)


@pytest.mark.parametrize("input_size", [2 ** 31, 2 ** 32, 2 ** 40])
def test_negative_row_is_caught_however_large_the_input(input_size):
    """A row of -1 wraps to 2^32 - 1 unsigned; the range check must still reject it when
    input_size is 2^32 or more (an empty batch keeps the output zero-sized)."""
    metainfo = np.array([0, 0, 0, 1, -1], np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="row_indices.* is outside"):
        ops._ops.ipu_sparse_matmul_grad_input(tf.zeros((0, 3)), metainfo,
                                              np.ones((1, 1, 1), np.float32),
                                              input_size=input_size)


@pytest.mark.parametrize("block_size, density", [(1, 0.2), (16, 0.3)])
def test_work_split_among_threads_matches_numpy(block_size, density):
    """Large enough that each kernel's work is shared among the intra-op threads."""
    rng = np.random.default_rng(block_size)
    blocks = (256 // block_size) * (192 // block_size)
    count = round(density * blocks)
    spec, triplets, lhs, grad_out = make_problem(rng, 128, 256, 192, block_size, count, count)
    check_against_numpy(spec, triplets, lhs, grad_out, rtol=1e-5, atol=1e-5)


def test_ops_running_side_by_side_each_match_numpy():
    """Independent ops of one function run at once on the inter-op threads, each
    sharing its work with the same intra-op pool."""
    rng = np.random.default_rng(5)
    problems = [make_problem(rng, 128, 256, 192, 1, 9000 + 100 * i, 9000 + 100 * i)
                for i in range(6)]
    reps = [sparse.representation_from_triplets(spec, trip) for spec, trip, _, _ in problems]

    @tf.function
    def all_products():
        return [(ops.sparse_matmul(tf.constant(lhs), rep, spec),
                 ops._ops.ipu_sparse_matmul_grad_input(tf.constant(grad_out), rep.metainfo,
                                                       rep.nz_values, input_size=256))
                for (spec, _, lhs, grad_out), rep in zip(problems, reps)]

    for _ in range(3):
        for (spec, trip, lhs, grad_out), (out, grad_lhs) in zip(problems, all_products()):
            ref_out, ref_grad_lhs, _ = numpy_reference(spec, trip, lhs, grad_out)
            np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(grad_lhs.numpy(), ref_grad_lhs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_grad_values_every_batch_width_every_kernel_build(isa):
    """The element-wise grad-values kernel has one loop per batch width of up to 8 Vecs
    (4 on AVX2 and generic) and a general one past that: batches 1-150 reach each, in a
    child process per instruction set."""
    script = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        from ipu_sparse_ops import ops, sparse
        rng = np.random.default_rng(7)
        spec = sparse.MatmulSpec(90, 70, 1300)
        for batch in [1, 4, 13, 16, 17, 31, 45, 61, 64, 77, 93, 109, 125, 128, 141, 150]:
            trip = sparse.random_triplets(spec, int(rng.integers(1, 1301)), rng)
            rep = sparse.representation_from_triplets(spec, trip)
            x = rng.standard_normal((batch, 90)).astype(np.float32)
            dy = rng.standard_normal((batch, 70)).astype(np.float32)
            got = ops._ops.ipu_sparse_matmul_grad_values(x, dy, rep.metainfo, block_size=1).numpy()
            got = sparse.triplets_from_representation(
                spec, sparse.Representation(rep.metainfo, got)).values
            back = sparse.triplets_from_representation(spec, rep)
            terms = x[:, back.row_indices].astype(np.float64) * dy[:, back.col_indices]
            error = np.abs(got - terms.sum(axis=0)) - 1e-6 * np.abs(terms).sum(axis=0)
            print(batch, "ok" if np.all(error <= 0) else f"wrong by {error.max()}")
    """)
    env = {"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", "IPU_SPARSE_OPS_ISA": isa}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == 16 and all(line.endswith(" ok") for line in lines), result.stdout


@pytest.mark.parametrize("block_size, batch", [(1, 200), (4, 9)])
def test_grad_input_after_pattern_changes_of_the_same_size(block_size, batch):
    """The input gradient keeps W^T's pattern from call to call: patterns that differ
    in one index, alternating, and more of them than it keeps, must each give their own
    product."""
    rng = np.random.default_rng(block_size)
    spec = sparse.MatmulSpec(64, 48, 40, block_size)
    base = sparse.random_triplets(spec, 40, rng)
    patterns = []
    for i in range(12):  # the same count: row i of connection 0 moved one step
        rows = base.row_indices.copy()
        free = sorted(set(range(spec.input_blocks)) - {r for r, c in zip(rows, base.col_indices)
                                                       if c == base.col_indices[0]})
        rows[0] = free[i % len(free)]
        patterns.append(sparse.Triplets(rows, base.col_indices, base.values))
    grad_out = rng.standard_normal((batch, 48)).astype(np.float32)
    for i in [0, 1, 0, 1, *range(12), 0, 11]:
        rep = sparse.representation_from_triplets(spec, patterns[i])
        got = ops._ops.ipu_sparse_matmul_grad_input(grad_out, rep.metainfo, rep.nz_values,
                                                    input_size=64).numpy()
        want = grad_out.astype(np.float64) @ sparse.dense_from_triplets(spec, patterns[i]).T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"pattern {i}")
