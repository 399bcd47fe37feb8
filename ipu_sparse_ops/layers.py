"""Fully connected layers whose weight is genuinely sparse, and their dense counterpart.

`SparseFcLayer` holds its weight in the op's fixed-capacity form: an int32
metainfo variable (the pattern) and a values variable [capacity, bs, bs]. A
new pattern is pushed with `push_triplets`, which assigns both variables with
same-shaped tensors, so a `tf.function` that calls the layer is traced once
for a whole Rig-L run.

Slot order. The values variable holds the connections in the op's slot order
(block-column by block-column, rows ascending within a column), then padding.
`get_triplets` returns the real connections in exactly that order, so index i
of those triplets is slot i of the values variable and of every optimizer
slot. `push_triplets` returns, for each slot of the new pattern, the slot of
the previous pattern it continues (or -1), which is what
`optimizers.Optimizer.follow_pattern` takes.

Both layers are Keras layers (their variables are tracked Keras weights) and
expose the underlying `tf.Variable`s as attributes for custom training loops:
`nz_values` / `kernel`, `metainfo`, `bias` and `dense_grad_anchor`.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from ipu_sparse_ops.tf_startup import tf

from ipu_sparse_ops import ops
from ipu_sparse_ops.sparse import (
    MatmulSpec, Representation, Triplets, capacity_for_density, dense_from_triplets,
    disjoint_random_indices, representation_from_triplets, triplets_from_representation)


def glorot_limit(fan_in: int, fan_out: int, density: float) -> float:
    """Glorot-uniform bound for a layer with only `density` of its connections.

    Each unit sees density * fan_in inputs on average, so the dense bound
    sqrt(6 / (fan_in + fan_out)) is widened by 1 / sqrt(density) to keep the
    activations' variance that of the dense layer.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return math.sqrt(6.0 / ((fan_in + fan_out) * density))


def constant_initializer(array: np.ndarray):
    """A Keras initializer returning `array` (shape and dtype are checked by Keras)."""
    def initializer(shape, dtype=None):
        return tf.constant(array, dtype=dtype)
    return initializer


class _FcLayer(keras.layers.Layer):
    """What both layers share: spec, bias, ReLU and the dense-gradient anchor."""

    def __init__(self, spec: MatmulSpec, *, use_bias: bool, relu: bool, name: str | None):
        super().__init__(name=name, dtype=spec.data_type_tf)
        self.spec = spec
        self.use_bias = use_bias
        self.relu = relu
        self.bias = None
        if use_bias:
            self._bias_weight = self.add_weight(
                name="bias", shape=(spec.output_size,), initializer="zeros",
                dtype=spec.data_type_tf)
            self.bias = self._bias_weight.value

    def _finish(self, y):
        if self.bias is not None:
            y = tf.nn.bias_add(y, self.bias)
        return tf.nn.relu(y) if self.relu else y

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.spec.output_size)


class SparseFcLayer(_FcLayer):
    """y = x @ W (+ bias) (ReLU), W sparse with a pattern that may change every step.

    Build it from a pattern (`SparseFcLayer(spec, triplets)`) or at random
    (`SparseFcLayer.from_random(spec, density=..., seed=...)`). Call it as
    `layer(x)` or `layer(x, compute_dense_grad=flag)` where `flag` may be a
    bool tensor; the dense gradient is then the gradient of the loss with
    respect to `layer.dense_grad_anchor` (full dL/dW for pooling NONE, else
    the pooled |dL/dW| per block; zeros when the flag is false).

    Attributes:
        metainfo: int32 tf.Variable [spec.metainfo_size] (non-trainable).
        nz_values: tf.Variable [capacity, bs, bs] in slot order (trainable).
        bias: tf.Variable [output_size] or None.
        dense_grad_anchor: non-trainable tf.Variable of spec.dense_grad_shape;
            its value is never read, only its gradient matters.
    """

    def __init__(self, spec: MatmulSpec, triplets: Triplets, *, use_bias: bool = False,
                 relu: bool = False, name: str | None = None):
        super().__init__(spec, use_bias=use_bias, relu=relu, name=name)
        rep = representation_from_triplets(spec, in_slot_order(triplets)[0])
        self._metainfo_weight = self.add_weight(
            name="metainfo", shape=rep.metainfo.shape, dtype="int32", trainable=False,
            initializer=constant_initializer(rep.metainfo))
        self._nz_values_weight = self.add_weight(
            name="nz_values", shape=rep.nz_values.shape, dtype=spec.data_type_tf,
            initializer=constant_initializer(rep.nz_values))
        self._anchor_weight = self.add_weight(
            name="dense_grad_anchor", shape=spec.dense_grad_shape, dtype=spec.data_type_tf,
            trainable=False, initializer="zeros")
        self.metainfo = self._metainfo_weight.value
        self.nz_values = self._nz_values_weight.value
        self.dense_grad_anchor = self._anchor_weight.value
        self.nnz = len(triplets.row_indices)
        self.built = True

    @classmethod
    def from_random(cls, spec: MatmulSpec, density: float | None = None, *,
                    count: int | None = None, seed: int | np.random.SeedSequence = 0,
                    **kwargs) -> "SparseFcLayer":
        """A uniformly random pattern with Glorot-uniform values.

        Give either `density` (fraction of blocks; the count is rounded as
        `capacity_for_density` does) or `count` (number of blocks). The values
        are uniform in +-sqrt(6 / ((fan_in + fan_out) * density)) where density
        is the fraction of weights actually held. Same seed, same layer.
        """
        triplets = random_glorot_triplets(spec, density, count=count, seed=seed)
        return cls(spec, triplets, **kwargs)

    def call(self, inputs, compute_dense_grad=False):
        rep = Representation(self.metainfo, self.nz_values)
        y = ops.sparse_matmul(inputs, rep, self.spec, compute_dense_grad=compute_dense_grad,
                              dense_grad_anchor=self.dense_grad_anchor)
        return self._finish(y)

    @property
    def capacity(self) -> int:
        return self.spec.max_non_zero_blocks

    @property
    def density(self) -> float:
        return self.nnz / (self.spec.input_blocks * self.spec.output_blocks)

    def get_triplets(self) -> Triplets:
        """The current connections (host numpy) in slot order, just-grown zeros included."""
        rep = Representation(self.metainfo.numpy(), self.nz_values.numpy())
        return triplets_from_representation(self.spec, rep)

    def get_dense(self) -> np.ndarray:
        """W as a dense [input_size, output_size] numpy array."""
        return dense_from_triplets(self.spec, self.get_triplets())

    def push_triplets(self, triplets: Triplets, kept_from: np.ndarray | None = None) -> np.ndarray:
        """Make `triplets` the layer's weight; an assign, never a re-trace.

        Args:
            triplets: the new connections, any order, at most capacity of them.
            kept_from: optional, for each new connection the index in the
                triplets last returned by `get_triplets` (i.e. the old slot) it
                continues, or -1 (as `sparse_training.prune_and_regrow` gives).

        Returns:
            slot_kept_from [capacity]: for each slot of the new values variable
            the old slot it continues, -1 for new connections and padding
            (all -1 if kept_from is None). Feed it to
            `Optimizer.follow_pattern`.
        """
        ordered, perm = in_slot_order(triplets)
        rep = representation_from_triplets(self.spec, ordered)
        self.metainfo.assign(rep.metainfo)
        self.nz_values.assign(rep.nz_values)
        self.nnz = len(perm)
        slot_kept_from = np.full(self.capacity, -1, dtype=np.int64)
        if kept_from is not None:
            kept_from = np.asarray(kept_from)
            if kept_from.shape != (len(perm),):
                raise ValueError(
                    f"kept_from has shape {kept_from.shape}, expected ({len(perm)},)")
            slot_kept_from[:len(perm)] = kept_from[perm]
        return slot_kept_from

    def state(self) -> dict[str, np.ndarray]:
        """Everything that defines the layer's weight, for checkpoints."""
        state = {"metainfo": self.metainfo.numpy(), "nz_values": self.nz_values.numpy()}
        if self.bias is not None:
            state["bias"] = self.bias.numpy()
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state` returned (the pattern is validated on the host first)."""
        rep = Representation(np.asarray(state["metainfo"]), np.asarray(state["nz_values"]))
        self.nnz = len(triplets_from_representation(self.spec, rep).row_indices)
        _assign_checked(self.metainfo, rep.metainfo, "metainfo")
        _assign_checked(self.nz_values, rep.nz_values, "nz_values")
        if self.bias is not None:
            _assign_checked(self.bias, state["bias"], "bias")


class DenseFcLayer(_FcLayer):
    """The dense counterpart (density 1): y = x @ kernel (+ bias) (ReLU).

    It takes the same spec and call signature as `SparseFcLayer`;
    `compute_dense_grad` is accepted and ignored, since the gradient of the
    kernel already is the dense gradient. `get_triplets` returns every weight
    (row-major). There is no pattern to push.
    """

    def __init__(self, spec: MatmulSpec, kernel: np.ndarray, *, use_bias: bool = False,
                 relu: bool = False, name: str | None = None):
        if spec.pooling_type != "NONE":
            spec = MatmulSpec(spec.input_size, spec.output_size, spec.max_non_zero_blocks,
                              spec.block_size, spec.data_type, "NONE")
        super().__init__(spec, use_bias=use_bias, relu=relu, name=name)
        kernel = np.asarray(kernel, dtype=spec.dtype)
        if kernel.shape != (spec.input_size, spec.output_size):
            raise ValueError(f"kernel has shape {kernel.shape}, expected "
                             f"{(spec.input_size, spec.output_size)}")
        self._kernel_weight = self.add_weight(
            name="kernel", shape=kernel.shape, dtype=spec.data_type_tf,
            initializer=constant_initializer(kernel))
        self.kernel = self._kernel_weight.value
        self.dense_grad_anchor = self.kernel
        self.nnz = spec.input_blocks * spec.output_blocks
        self.built = True

    @classmethod
    def from_random(cls, spec: MatmulSpec, density: float | None = 1.0, *,
                    count: int | None = None, seed: int | np.random.SeedSequence = 0,
                    **kwargs) -> "DenseFcLayer":
        """Glorot-uniform kernel, sqrt(6 / (fan_in + fan_out)); density must be 1."""
        total = spec.input_blocks * spec.output_blocks
        if (density is not None and density != 1.0) or (count is not None and count != total):
            raise ValueError("a DenseFcLayer has density 1; use SparseFcLayer for less")
        rng = np.random.default_rng(seed)
        limit = glorot_limit(spec.input_size, spec.output_size, 1.0)
        kernel = rng.uniform(-limit, limit, size=(spec.input_size, spec.output_size))
        return cls(spec, kernel.astype(spec.dtype), **kwargs)

    def call(self, inputs, compute_dense_grad=False):
        return self._finish(tf.matmul(tf.cast(inputs, self.compute_dtype),
                                      self.kernel))

    @property
    def density(self) -> float:
        return 1.0

    def get_triplets(self) -> Triplets:
        spec = self.spec
        kernel = self.kernel.numpy()
        bs = spec.block_size
        rows, cols = np.divmod(np.arange(spec.input_blocks * spec.output_blocks),
                               spec.output_blocks)
        blocks = kernel.reshape(spec.input_blocks, bs, spec.output_blocks, bs).transpose(0, 2, 1, 3)
        values = blocks[rows, cols]
        return Triplets(rows, cols, values.reshape(-1) if bs == 1 else values)

    def get_dense(self) -> np.ndarray:
        return self.kernel.numpy()

    def state(self) -> dict[str, np.ndarray]:
        state = {"kernel": self.kernel.numpy()}
        if self.bias is not None:
            state["bias"] = self.bias.numpy()
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        _assign_checked(self.kernel, state["kernel"], "kernel")
        if self.bias is not None:
            _assign_checked(self.bias, state["bias"], "bias")


def make_fc_layer(spec: MatmulSpec, density: float, *, seed, **kwargs) -> _FcLayer:
    """A `DenseFcLayer` for density 1, else a random `SparseFcLayer`."""
    if density == 1.0:
        return DenseFcLayer.from_random(spec, seed=seed, **kwargs)
    return SparseFcLayer.from_random(spec, density, seed=seed, **kwargs)


def random_glorot_triplets(spec: MatmulSpec, density: float | None = None, *,
                           count: int | None = None,
                           seed: int | np.random.SeedSequence = 0) -> Triplets:
    """A uniformly random pattern of blocks with Glorot-uniform values (see from_random)."""
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


def _assign_checked(variable: tf.Variable, value: np.ndarray, name: str) -> None:
    value = np.asarray(value)
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(f"{name} has shape {value.shape}, the layer expects "
                         f"{tuple(variable.shape)}")
    variable.assign(value.astype(variable.dtype.as_numpy_dtype, copy=False))
