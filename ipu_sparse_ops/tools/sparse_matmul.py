"""Self-check: the dynamic sparse matmul op against TensorFlow's dense matmul.

Builds a pattern, runs the op forward and backward (input gradient, non-zero
gradient, dense or pooled gradient) and the same computation with tf.matmul
on the equivalent dense weight, and compares. Prints `Results match.` and
exits 0, or prints the worst mismatch and exits 1.

    python -m ipu_sparse_ops.tools.sparse_matmul --input-size 64 --block-size 8
"""

from __future__ import annotations

import sys

import numpy as np

from ipu_sparse_ops import sparse
from ipu_sparse_ops.cli import ArgumentParser, fail

PATTERNS = ("fixed", "random", "random_sign_ones", "random_orthogonal")
TOLERANCES = {"fp32": (1e-5, 1e-6), "fp16": (1e-3, 1e-2)}  # (rtol, atol)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2, help="rows of the input (default 2)")
    parser.add_argument("--input-size", type=int, default=16, help="rows of W (default 16)")
    parser.add_argument("--output-size", type=int, default=8, help="columns of W (default 8)")
    parser.add_argument("--pattern", choices=PATTERNS, default="fixed",
                        help="fixed: identity plus (1,3) and (0,7) where they fit; random: "
                             "normal values at --density; random_sign_ones: +-1 values and "
                             "inputs, compared exactly; random_orthogonal: for block size 1 a "
                             "square orthogonal W made of random Givens rotations up to "
                             "--density (as the original), for blocks one random orthogonal "
                             "block per block-row/column (default fixed)")
    parser.add_argument("--density", type=float, default=0.1,
                        help="fraction of non-zero blocks for the random patterns and the "
                             "element-wise random_orthogonal one (default 0.1)")
    parser.add_argument("--meta-info-oversize", type=float, default=0.1,
                        help="capacity headroom over the non-zero count (default 0.1)")
    parser.add_argument("--data-type", choices=tuple(sparse.DATA_TYPES), default="fp32")
    parser.add_argument("--block-size", type=int, choices=sparse.BLOCK_SIZES, default=1)
    parser.add_argument("--pooling-type", choices=sparse.POOLING_TYPES, default="NONE",
                        help="how the dense gradient is pooled over blocks (default NONE)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 < args.density <= 1.0:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    if args.meta_info_oversize < 0.0:
        parser.error(f"--meta-info-oversize must be >= 0, got {args.meta_info_oversize}")
    return args


def fixed_indices(input_blocks: int, output_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The identity plus (1, 3) and (0, 7), keeping only entries inside W."""
    diagonal = [(i, i) for i in range(min(input_blocks, output_blocks))]
    extra = [(r, c) for r, c in ((1, 3), (0, 7)) if r < input_blocks and c < output_blocks]
    rows, cols = zip(*(diagonal + extra))
    return np.array(rows), np.array(cols)


def with_headroom(args, count: int, total: int) -> sparse.MatmulSpec:
    capacity = min(total, int(np.ceil(count * (1 + args.meta_info_oversize))))
    return sparse.MatmulSpec(args.input_size, args.output_size, capacity, args.block_size,
                             args.data_type, args.pooling_type)


def givens_pattern(args, rng: np.random.Generator) -> tuple[sparse.MatmulSpec, sparse.Triplets]:
    """The original's random_orthogonal: Givens rotations up to --density (square, block 1)."""
    orthogonal = sparse.givens_orthogonal(args.input_size, args.density, rng)
    spec = with_headroom(args, np.count_nonzero(orthogonal), orthogonal.size)
    return spec, sparse.triplets_from_dense(spec, orthogonal)


def make_pattern(args, rng: np.random.Generator) -> tuple[sparse.MatmulSpec, sparse.Triplets]:
    bs = args.block_size
    input_blocks, output_blocks = args.input_size // bs, args.output_size // bs
    if args.pattern == "random_orthogonal" and bs == 1:
        return givens_pattern(args, rng)
    if args.pattern == "fixed":
        rows, cols = fixed_indices(input_blocks, output_blocks)
    elif args.pattern == "random_orthogonal":
        count = min(input_blocks, output_blocks)
        rows = rng.permutation(input_blocks)[:count]
        cols = rng.permutation(output_blocks)[:count]
    else:
        count, _ = sparse.capacity_for_density(input_blocks, output_blocks, args.density)
        rows, cols = sparse.disjoint_random_indices(input_blocks, output_blocks, count, rng)
    count = len(rows)
    spec = with_headroom(args, count, input_blocks * output_blocks)
    shape = (count, bs, bs)
    if args.pattern == "random_orthogonal":
        values = np.linalg.qr(rng.standard_normal(shape))[0]
    elif args.pattern == "random_sign_ones":
        values = rng.choice([-1.0, 1.0], size=shape)
    else:
        values = rng.standard_normal(shape)
    values = values.astype(spec.dtype)
    return spec, sparse.Triplets(rows, cols, values.reshape(-1) if bs == 1 else values)


def pool_abs(dense: np.ndarray, block_size: int, pooling_type: str) -> np.ndarray:
    """numpy reference of the op's block pooling of |dL/dW|."""
    rows, cols = dense.shape
    blocks = np.abs(dense).reshape(rows // block_size, block_size, cols // block_size, block_size)
    return {"SUM": np.sum, "AVG": np.mean, "MAX": np.max}[pooling_type](blocks, axis=(1, 3))


def run_check(args) -> list[tuple[str, float, float]]:
    """Compares op and dense reference; returns (what, |error|, tolerance) of each failure."""
    from ipu_sparse_ops import ops
    from ipu_sparse_ops.tf_startup import tf

    rng = np.random.default_rng(args.seed)
    spec, triplets = make_pattern(args, rng)
    representation = sparse.representation_from_triplets(spec, triplets)
    exact = args.pattern == "random_sign_ones"
    draw = (lambda shape: rng.choice([-1.0, 1.0], size=shape)) if exact else rng.standard_normal
    lhs = draw((args.batch_size, spec.input_size)).astype(spec.dtype)
    grad_out = draw((args.batch_size, spec.output_size)).astype(spec.dtype)

    lhs_t, values_t = tf.constant(lhs), tf.constant(representation.nz_values)
    anchor = ops.dense_grad_anchor(spec)
    with tf.GradientTape() as tape:
        tape.watch([lhs_t, values_t, anchor])
        out = ops.sparse_matmul(lhs_t, sparse.Representation(representation.metainfo, values_t),
                                spec, compute_dense_grad=True, dense_grad_anchor=anchor)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * grad_out.astype(np.float32))
    grad_lhs, grad_values, dense_grad = tape.gradient(loss, [lhs_t, values_t, anchor])

    # The reference: TensorFlow's dense matmul on the same numbers, in float64.
    # Each result is compared within atol + rtol * magnitude, the magnitude
    # being the same sum over |terms|: the standard error bound of a float32
    # dot product, which grows with the number of terms summed.
    weight = sparse.dense_from_triplets(spec, triplets).astype(np.float64)
    lhs64, grad_out64 = lhs.astype(np.float64), grad_out.astype(np.float64)
    matmul = lambda a, b: tf.matmul(a, b).numpy()
    ref_dense = matmul(lhs64.T, grad_out64)
    magnitude_dense = matmul(np.abs(lhs64).T, np.abs(grad_out64))

    bs = spec.block_size
    found = sparse.triplets_from_representation(
        spec, sparse.Representation(representation.metainfo, grad_values.numpy()))

    def on_pattern(dense):
        blocks = dense.reshape(spec.input_blocks, bs, spec.output_blocks, bs).transpose(0, 2, 1, 3)
        return blocks[found.row_indices, found.col_indices].reshape(np.shape(found.values))

    def pooled(dense):
        return dense if spec.pooling_type == "NONE" else pool_abs(dense, bs, spec.pooling_type)

    padding = grad_values.numpy()[len(found.row_indices):]
    checks = [
        ("forward", out, matmul(lhs64, weight), matmul(np.abs(lhs64), np.abs(weight))),
        ("input gradient", grad_lhs, matmul(grad_out64, weight.T),
         matmul(np.abs(grad_out64), np.abs(weight).T)),
        ("non-zero gradient", found.values, on_pattern(ref_dense), on_pattern(magnitude_dense)),
        ("padding gradient", padding, np.zeros_like(padding), np.zeros_like(padding)),
        (f"dense gradient ({spec.pooling_type})", dense_grad, pooled(ref_dense),
         pooled(magnitude_dense)),
    ]
    rtol, atol = (0.0, 0.0) if exact else TOLERANCES[spec.data_type]
    failures = []
    for name, got, want, magnitude in checks:
        got = np.asarray(got, dtype=np.float64)
        if got.shape != want.shape:
            failures.append((f"{name}: shape {got.shape}, expected {want.shape}", np.inf, 0.0))
            continue
        tolerance = atol + rtol * magnitude
        excess = np.abs(got - want) - tolerance
        if excess.size and not excess.max() <= 0:  # NaN counts as a failure
            worst = np.unravel_index(np.nanargmax(np.where(np.isnan(excess), np.inf, excess)),
                                     excess.shape)
            failures.append((f"{name} at {tuple(int(i) for i in worst)}: got {got[worst]:.7g}, "
                             f"expected {want[worst]:.7g}", abs(got[worst] - want[worst]),
                             tolerance[worst]))
    return failures


def main(argv=None) -> int:
    args = parse_args(argv)
    prog = "sparse_matmul.py"
    for name, size in (("input", args.input_size), ("output", args.output_size)):
        if size < 1 or size % args.block_size:
            fail(prog, f"--{name}-size {size} must be a positive multiple of --block-size "
                       f"{args.block_size}")
    if (args.pattern == "random_orthogonal" and args.block_size == 1
            and args.input_size != args.output_size):
        fail(prog, f"--pattern random_orthogonal with --block-size 1 needs --input-size == "
                   f"--output-size, got {args.input_size} and {args.output_size}")
    try:
        failures = run_check(args)
    except ImportError as error:
        fail(prog, str(error))
    print(f"Checked batch {args.batch_size}, {args.input_size} x {args.output_size}, "
          f"pattern {args.pattern}, block size {args.block_size}, {args.data_type}, "
          f"pooling {args.pooling_type}.")
    if failures:
        for what, error, tolerance in failures:
            print(f"Mismatch in {what} (|error| {error:.3g} > tolerance {tolerance:.3g})")
        return 1
    print("Results match.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
