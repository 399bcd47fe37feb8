"""The fuzz suite's independent oracle: pure Python/numpy, no op and no host_utils.

`check_metainfo` re-states the block-CSC format of README.md ("The
representation") from scratch, `build_metainfo` builds it from block triplets,
and the `reference_*` functions compute what each raw op must return in
float64, together with an error bound for the op's float32 (or float16)
arithmetic.
"""

from __future__ import annotations

import numpy as np

INT32_MAX = 2**31 - 1
VALID_BLOCK_SIZES = (1, 4, 8, 16)
U32 = 2.0**-24  # unit roundoff of float32
U16 = 2.0**-11  # unit roundoff of float16


def check_metainfo(metainfo, capacity: int, input_blocks: int, output_blocks: int) -> str:
    """'' if metainfo is a valid pattern for these sizes, else why not."""
    m = [int(v) for v in np.asarray(metainfo).reshape(-1)]
    if min(capacity, input_blocks, output_blocks) < 0:
        return "negative size"
    if len(m) != output_blocks + 1 + capacity:
        return f"length {len(m)} != {output_blocks} + 1 + {capacity}"
    offsets, rows = m[:output_blocks + 1], m[output_blocks + 1:]
    if offsets[0] != 0:
        return "first offset not 0"
    for j in range(output_blocks):
        begin, end = offsets[j], offsets[j + 1]
        if end < begin:
            return f"offset {j + 1} decreases"
        if end > capacity:
            return f"offset {j + 1} over capacity"
        for k in range(begin, end):
            if not 0 <= rows[k] < input_blocks:
                return f"row {k} out of range"
            if k > begin and rows[k] <= rows[k - 1]:
                return f"row {k} not increasing"
    return ""


def slots(metainfo, output_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(block rows, block cols) of the used slots of a metainfo check_metainfo accepted."""
    m = np.asarray(metainfo, np.int64).reshape(-1)
    offsets = m[:output_blocks + 1]
    nnz = int(offsets[-1])
    cols = np.repeat(np.arange(output_blocks), np.diff(offsets))
    return m[output_blocks + 1:output_blocks + 1 + nnz], cols


def build_metainfo(rows, cols, input_blocks: int, output_blocks: int, capacity: int):
    """(metainfo int32, order) of distinct in-range block triplets; slot s holds triplet order[s]."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    assert len(rows) <= capacity and len(set(zip(rows.tolist(), cols.tolist()))) == len(rows)
    order = np.lexsort((rows, cols))  # by column, then row
    counts = np.bincount(cols, minlength=output_blocks)
    metainfo = np.zeros(output_blocks + 1 + capacity, np.int32)
    metainfo[1:output_blocks + 1] = np.cumsum(counts)
    metainfo[output_blocks + 1:output_blocks + 1 + len(rows)] = rows[order]
    return metainfo, order


# ---------------------------------------------------------------- references
# Each returns (value, bound): |op - value| <= bound elementwise is the pass
# criterion. value is float64; bound = atol + rtol(n) * magnitude, magnitude the
# same sum over absolute values (the classic bound of a float32 dot product of
# n terms is n * u * magnitude; 2n leaves room for the tiled partial sums).

def _bound(magnitude, n_terms, dtype, value):
    if np.dtype(dtype) == np.float16:
        # float32 accumulation, then one rounding to half (relative 2^-11) and
        # half's subnormal spacing (6e-8) as the absolute floor.
        return 1e-6 + (2 * n_terms + 4) * U32 * magnitude + 1.01 * U16 * np.abs(np.nan_to_num(value))
    return 1e-30 + (2 * n_terms + 4) * U32 * magnitude


def _f64(a):
    return np.asarray(a).astype(np.float64)


def reference_forward(lhs, metainfo, values, output_size):
    """lhs [B, in] @ W for the pattern in metainfo; values [cap, bs, bs]."""
    x, v = _f64(lhs), _f64(values)
    bs = v.shape[1]
    batch, input_size = x.shape
    ob = output_size // bs
    rows, cols = slots(metainfo, ob)
    xb = x.reshape(batch, input_size // bs, bs)[:, rows]  # [B, nnz, bs]
    y = np.zeros((batch, ob, bs))
    mag = np.zeros((batch, ob, bs))
    # einsum, not BLAS: no product is skipped, so 0 * inf is NaN as in the op.
    np.add.at(y, (slice(None), cols), np.einsum("bki,kij->bkj", xb, v[:len(rows)]))
    np.add.at(mag, (slice(None), cols), np.einsum("bki,kij->bkj", np.abs(xb), np.abs(v[:len(rows)])))
    y, mag = y.reshape(batch, output_size), mag.reshape(batch, output_size)
    per_column = np.bincount(cols).max(initial=0) * bs  # most terms summed into one output
    return y, _bound(mag, per_column, lhs.dtype, y)


def reference_grad_input(grad, metainfo, values, input_size):
    """grad [B, out] @ W^T."""
    dy, v = _f64(grad), _f64(values)
    bs = v.shape[1]
    batch, output_size = dy.shape
    ib, ob = input_size // bs, output_size // bs
    rows, cols = slots(metainfo, ob)
    dyb = dy.reshape(batch, ob, bs)[:, cols]
    dx = np.zeros((batch, ib, bs))
    mag = np.zeros((batch, ib, bs))
    np.add.at(dx, (slice(None), rows), np.einsum("bkj,kij->bki", dyb, v[:len(rows)]))
    np.add.at(mag, (slice(None), rows), np.einsum("bkj,kij->bki", np.abs(dyb), np.abs(v[:len(rows)])))
    dx, mag = dx.reshape(batch, input_size), mag.reshape(batch, input_size)
    per_row = np.bincount(rows).max(initial=0) * bs  # (no minlength: ib may be huge)
    return dx, _bound(mag, per_row, grad.dtype, dx)


def reference_grad_values(lhs, grad, metainfo, block_size):
    """[capacity, bs, bs]: block k of lhs^T grad for used slots, zeros for headroom."""
    x, dy = _f64(lhs), _f64(grad)
    bs = block_size
    batch, output_size = dy.shape
    ob = output_size // bs
    capacity = np.asarray(metainfo).size - ob - 1
    rows, cols = slots(metainfo, ob)
    xb = x.reshape(batch, x.shape[1] // bs, bs)[:, rows]
    dyb = dy.reshape(batch, ob, bs)[:, cols]
    g = np.zeros((capacity, bs, bs))
    mag = np.zeros((capacity, bs, bs))
    g[:len(rows)] = np.einsum("bki,bkj->kij", xb, dyb)
    mag[:len(rows)] = np.einsum("bki,bkj->kij", np.abs(xb), np.abs(dyb))
    return g, _bound(mag, batch, lhs.dtype, g)


def pool_blocks(a, bs, pooling_type):
    if a.size == 0:  # (no reshape: bs may be huge)
        return np.zeros((a.shape[0] // bs, a.shape[1] // bs))
    blocks = a.reshape(a.shape[0] // bs, bs, a.shape[1] // bs, bs)
    return {"SUM": np.sum, "AVG": np.mean, "MAX": np.max}[pooling_type](blocks, axis=(1, 3))


def reference_dense_grad(lhs, grad, compute, block_size, pooling_type):
    """lhs^T grad [in, out], or the pool of its |.| over each block; zeros unless compute."""
    x, dy = _f64(lhs), _f64(grad)
    pooled = pooling_type != "NONE"
    pool = block_size if pooled else 1
    shape = (x.shape[1] // pool, dy.shape[1] // pool)
    if not compute:
        return np.zeros(shape), np.zeros(shape)
    dense = np.einsum("bi,bj->ij", x, dy)
    mag = np.einsum("bi,bj->ij", np.abs(x), np.abs(dy))
    bound = _bound(mag, x.shape[0], np.float32, dense)
    if not pooled:
        return dense, _bound(mag, x.shape[0], lhs.dtype, dense)
    value = pool_blocks(np.abs(dense), block_size, pooling_type)
    # |pool(a) - pool(b)| <= pool-like combination of |a - b|, plus the pooling's own rounding.
    bound = {"SUM": pool_blocks(bound, block_size, "SUM"), "AVG": pool_blocks(bound, block_size, "AVG"),
             "MAX": pool_blocks(bound, block_size, "MAX")}[pooling_type]
    pooled_mag = pool_blocks(mag, block_size, pooling_type)
    bound = bound + (2 * block_size * block_size + 4) * U32 * pooled_mag
    if np.dtype(lhs.dtype) == np.float16:
        bound = bound + 1e-6 + 1.01 * U16 * np.abs(np.nan_to_num(value))
    return value, bound


def reference_pool_abs(dense, block_size, pooling_type):
    """The pool of |dense| over each block; the sum's float32 rounding bounds it."""
    a = np.abs(_f64(dense))
    if a.size == 0 or block_size > max(a.shape):
        shape = (a.shape[0] // block_size, a.shape[1] // block_size)
        return np.zeros(shape), np.zeros(shape)
    value = pool_blocks(a, block_size, pooling_type)
    return value, 1e-30 + (2 * block_size * block_size + 4) * U32 * pool_blocks(a, block_size, "SUM")


def assert_close(name, actual, expected, bound):
    """|actual - expected| <= bound; NaN must match NaN and an infinity the same infinity."""
    actual = np.asarray(actual).astype(np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), (
        f"{name}: NaN at {np.argwhere(nan_a != nan_e)[:5].tolist()} differs "
        f"(op {actual[nan_a != nan_e][:5]}, reference {expected[nan_a != nan_e][:5]})")
    inf_e = np.isinf(expected)
    assert np.array_equal(actual[inf_e], expected[inf_e]), f"{name}: infinities differ"
    finite = ~nan_e & ~inf_e
    err = np.abs(actual[finite] - expected[finite])
    ok = err <= bound[finite]
    if not ok.all():
        worst = np.argmax(err - bound[finite])
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {ok.size} elements off; worst op "
            f"{actual[finite][worst]!r} vs reference {expected[finite][worst]!r} "
            f"(bound {bound[finite][worst]:.3g})")
