"""Sparse weight patterns on the host: triplets, specs and the op's representation.

A weight matrix W has shape [input_size, output_size] and the op computes
y = x @ W. Its non-zeros are held as `Triplets`: row = input feature, column =
output feature. With block sparsity the indices are *block* coordinates and
each value is a [block_size, block_size] block.

The op takes a fixed-capacity `Representation`: the pattern as block-CSC
metainfo (int32) plus the values in the same order. Capacity stays fixed for a
whole run so a new pattern is an `assign` of same-shaped tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ipu_sparse_ops import host_utils

DATA_TYPES = {"fp32": np.float32, "fp16": np.float16}
POOLING_TYPES = ("NONE", "SUM", "AVG", "MAX")
BLOCK_SIZES = (1, 4, 8, 16)


class Triplets(NamedTuple):
    """Non-zeros of W: `values[k]` sits at (`row_indices[k]`, `col_indices[k]`).

    For block sparsity the indices are block coordinates and `values` has shape
    [n_blocks, block_size, block_size]; element-wise `values` is [n].
    """

    row_indices: np.ndarray
    col_indices: np.ndarray
    values: np.ndarray


class Representation(NamedTuple):
    """What the op consumes: `metainfo` (int32) and `nz_values` [capacity, bs, bs].

    metainfo = [col_offsets (output_blocks + 1), row_indices (capacity)]: the
    blocks of block-column j are rows row_indices[col_offsets[j]:col_offsets[j+1]],
    strictly increasing; slots past col_offsets[-1] are padding the op skips.
    """

    metainfo: np.ndarray
    nz_values: np.ndarray


@dataclass(frozen=True)
class MatmulSpec:
    """Static description of one sparse weight: sizes, capacity and options.

    Attributes:
        input_size: rows of W (features of x).
        output_size: columns of W.
        max_non_zero_blocks: capacity: the most blocks a pattern may hold.
        block_size: 1 for element-wise, else 4, 8 or 16.
        data_type: "fp32" or "fp16" (storage; accumulation is always float32).
        pooling_type: how the dense gradient is pooled over each block
            ("NONE" returns the full [input_size, output_size] gradient).
    """

    input_size: int
    output_size: int
    max_non_zero_blocks: int
    block_size: int = 1
    data_type: str = "fp32"
    pooling_type: str = "NONE"

    def __post_init__(self):
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.input_size <= 0 or self.output_size <= 0:
            raise ValueError(
                f"sizes must be positive, got input_size={self.input_size}, "
                f"output_size={self.output_size}")
        for name, size in (("input_size", self.input_size), ("output_size", self.output_size)):
            if size % self.block_size:
                raise ValueError(
                    f"{name}={size} is not a multiple of block_size={self.block_size}")
        if self.data_type not in DATA_TYPES:
            raise ValueError(f"data_type must be one of {tuple(DATA_TYPES)}, got {self.data_type!r}")
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
        total = self.input_blocks * self.output_blocks
        if not 0 < self.max_non_zero_blocks <= total:
            raise ValueError(
                f"max_non_zero_blocks must be in [1, {total}], got {self.max_non_zero_blocks}")

    @property
    def input_blocks(self) -> int:
        return self.input_size // self.block_size

    @property
    def output_blocks(self) -> int:
        return self.output_size // self.block_size

    @property
    def dtype(self) -> type:
        return DATA_TYPES[self.data_type]

    @property
    def data_type_tf(self) -> str:
        """The dtype name TensorFlow uses for data_type."""
        return {"fp32": "float32", "fp16": "float16"}[self.data_type]

    @property
    def metainfo_size(self) -> int:
        return self.output_blocks + 1 + self.max_non_zero_blocks

    @property
    def dense_grad_shape(self) -> tuple[int, int]:
        """Shape of the dense gradient the op returns: pooled unless NONE."""
        if self.pooling_type == "NONE":
            return (self.input_size, self.output_size)
        return (self.input_blocks, self.output_blocks)


def capacity_for_density(input_blocks: int, output_blocks: int, density: float,
                         meta_info_oversize: float = 0.0) -> tuple[int, int]:
    """(non-zero blocks, capacity) for a density, with relative headroom."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if meta_info_oversize < 0.0:
        raise ValueError(f"meta_info_oversize must be >= 0, got {meta_info_oversize}")
    total = input_blocks * output_blocks
    nnz = max(1, min(total, round(density * total)))
    capacity = min(total, math.ceil(nnz * (1.0 + meta_info_oversize)))
    return nnz, capacity


def _check_triplets(spec: MatmulSpec, triplets: Triplets) -> None:
    n = len(triplets.row_indices)
    if len(triplets.col_indices) != n or len(triplets.values) != n:
        raise ValueError(
            f"triplets have {n} rows, {len(triplets.col_indices)} columns and "
            f"{len(triplets.values)} values; they must match")
    expected = (n,) if spec.block_size == 1 else (n, spec.block_size, spec.block_size)
    if np.shape(triplets.values) != expected:
        raise ValueError(f"triplet values have shape {np.shape(triplets.values)}, expected {expected}")


def representation_from_triplets(spec: MatmulSpec, triplets: Triplets) -> Representation:
    """The op's fixed-capacity form of a pattern; raises ValueError if it does not fit."""
    return representation_and_order(spec, triplets)[0]


def representation_and_order(spec: MatmulSpec,
                             triplets: Triplets) -> tuple[Representation, np.ndarray]:
    """`representation_from_triplets`, and for each slot the index of its triplet
    (the slot order is column, then row), which the one sort finds for both."""
    _check_triplets(spec, triplets)
    metainfo, order = host_utils.build_metainfo(
        np.asarray(triplets.row_indices, dtype=np.int64),
        np.asarray(triplets.col_indices, dtype=np.int64),
        spec.input_blocks, spec.output_blocks, spec.max_non_zero_blocks)
    bs = spec.block_size
    nz_values = np.zeros((spec.max_non_zero_blocks, bs, bs), dtype=spec.dtype)
    nz_values[:len(order)] = np.asarray(triplets.values).reshape(-1, bs, bs)[order]
    return Representation(metainfo, nz_values), order


def triplets_from_representation(spec: MatmulSpec, representation: Representation) -> Triplets:
    """The real non-zeros of a representation, in its slot order (by column, then row)."""
    metainfo = np.asarray(representation.metainfo)
    nz_values = np.asarray(representation.nz_values)
    rows, cols = host_utils.pattern_indices(
        metainfo, spec.max_non_zero_blocks, spec.input_blocks, spec.output_blocks)
    values = nz_values[:len(rows)]
    if spec.block_size == 1:
        values = values.reshape(-1)
    return Triplets(rows, cols, values.copy())


def disjoint_random_indices(input_blocks: int, output_blocks: int, count: int,
                            rng: np.random.Generator,
                            excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct (row, col) positions drawn uniformly, avoiding a [rows, cols] bool mask."""
    total = input_blocks * output_blocks
    free = np.arange(total) if excluded is None else np.flatnonzero(~np.asarray(excluded).reshape(-1))
    if count > len(free):
        raise ValueError(f"cannot draw {count} distinct positions from {len(free)} free ones")
    flat = rng.choice(free, size=count, replace=False)
    return flat // output_blocks, flat % output_blocks


def random_triplets(spec: MatmulSpec, count: int, rng: np.random.Generator,
                    value_generator=None) -> Triplets:
    """A random pattern of `count` blocks; values from value_generator(size=shape)."""
    rows, cols = disjoint_random_indices(spec.input_blocks, spec.output_blocks, count, rng)
    shape = (count,) if spec.block_size == 1 else (count, spec.block_size, spec.block_size)
    generate = value_generator if value_generator is not None else rng.standard_normal
    return Triplets(rows, cols, np.asarray(generate(size=shape)).astype(spec.dtype))


def glorot_limit(fan_in: int, fan_out: int, density: float) -> float:
    """Glorot-uniform bound for a layer with only `density` of its connections.

    Each unit sees density * fan_in inputs on average, so the dense bound
    sqrt(6 / (fan_in + fan_out)) is widened by 1 / sqrt(density) to keep the
    activations' variance that of the dense layer.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return math.sqrt(6.0 / ((fan_in + fan_out) * density))


def random_glorot_triplets(spec: MatmulSpec, density: float | None = None, *,
                           count: int | None = None,
                           seed: int | np.random.SeedSequence = 0) -> Triplets:
    """A uniformly random pattern of `count` (or `density` of all) blocks, its values
    Glorot-uniform widened for the density (`glorot_limit`), drawn from `seed`."""
    total = spec.input_blocks * spec.output_blocks
    if (density is None) == (count is None):
        raise ValueError("give exactly one of density and count")
    if count is None:
        count, _ = capacity_for_density(spec.input_blocks, spec.output_blocks, density)
    if not 0 < count <= spec.max_non_zero_blocks:
        raise ValueError(f"count must be in [1, {spec.max_non_zero_blocks}] (the capacity), "
                         f"got {count}")
    rng = np.random.default_rng(seed)
    rows, cols = disjoint_random_indices(spec.input_blocks, spec.output_blocks, count, rng)
    limit = glorot_limit(spec.input_size, spec.output_size, count / total)
    bs = spec.block_size
    shape = (count,) if bs == 1 else (count, bs, bs)
    values = rng.uniform(-limit, limit, size=shape).astype(spec.dtype)
    return Triplets(rows, cols, values)


def in_slot_order(triplets: Triplets) -> tuple[Triplets, np.ndarray]:
    """Triplets sorted as the op stores them (by column, then row) and the permutation used."""
    rows = np.asarray(triplets.row_indices)
    cols = np.asarray(triplets.col_indices)
    perm = np.lexsort((rows, cols))
    return Triplets(rows[perm], cols[perm], np.asarray(triplets.values)[perm]), perm


def givens_orthogonal(size: int, density: float, rng: np.random.Generator) -> np.ndarray:
    """A sparse random orthogonal [size, size] matrix with >= ceil(density * size^2) non-zeros.

    The original example's construction: starting from the identity, apply
    rotations by a uniform angle in the plane of two distinct random rows until
    the matrix is dense enough; entries within 1e-8 of zero are snapped to zero.
    A rotation changes only its two rows, so each one costs O(size).
    """
    target = math.ceil(density * size * size)
    q = np.identity(size)
    non_zeros = size
    while non_zeros < target:
        theta = rng.uniform(0.0, 2.0 * math.pi)
        i, j = np.sort(rng.choice(size, size=2, replace=False))
        before = np.count_nonzero(q[[i, j]])
        c, s = math.cos(theta), math.sin(theta)
        q[[i, j]] = np.array([[c, -s], [s, c]]) @ q[[i, j]]
        rows = q[[i, j]]
        rows[np.abs(rows) <= 1e-8] = 0.0
        q[[i, j]] = rows
        non_zeros += np.count_nonzero(rows) - before
    return q


def dense_from_triplets(spec: MatmulSpec, triplets: Triplets) -> np.ndarray:
    """W as a dense [input_size, output_size] array (zeros off the pattern)."""
    _check_triplets(spec, triplets)
    bs = spec.block_size
    blocks = np.zeros((spec.input_blocks, spec.output_blocks, bs, bs), dtype=spec.dtype)
    blocks[triplets.row_indices, triplets.col_indices] = np.asarray(triplets.values).reshape(-1, bs, bs)
    return blocks.transpose(0, 2, 1, 3).reshape(spec.input_size, spec.output_size)


def triplets_from_dense(spec: MatmulSpec, dense: np.ndarray) -> Triplets:
    """The blocks of a dense W holding any non-zero, in row-major block order."""
    bs = spec.block_size
    blocks = np.asarray(dense, dtype=spec.dtype).reshape(
        spec.input_blocks, bs, spec.output_blocks, bs).transpose(0, 2, 1, 3)
    rows, cols = np.nonzero(np.any(blocks != 0, axis=(2, 3)))
    values = blocks[rows, cols]
    return Triplets(rows, cols, values.reshape(-1) if bs == 1 else values)


def mask_from_triplets(spec: MatmulSpec, triplets: Triplets) -> np.ndarray:
    """[input_blocks, output_blocks] bool: True where the pattern holds a block."""
    mask = np.zeros((spec.input_blocks, spec.output_blocks), dtype=bool)
    mask[triplets.row_indices, triplets.col_indices] = True
    return mask


def triplets_from_mask(spec: MatmulSpec, mask: np.ndarray, dense: np.ndarray) -> Triplets:
    """The blocks of `dense` selected by a block mask (zeros included)."""
    bs = spec.block_size
    rows, cols = np.nonzero(mask)
    blocks = np.asarray(dense, dtype=spec.dtype).reshape(
        spec.input_blocks, bs, spec.output_blocks, bs).transpose(0, 2, 1, 3)
    values = blocks[rows, cols]
    return Triplets(rows, cols, values.reshape(-1) if bs == 1 else values)
