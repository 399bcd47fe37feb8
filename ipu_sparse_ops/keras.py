"""Keras-native dynamic sparsity: a `SparseDense` layer and a `RigL` callback for `model.fit`.

    model = keras.Sequential([keras.Input((784,)),
                              SparseDense(320, density=0.1, activation="relu"),
                              SparseDense(10, density=0.3)])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=5, callbacks=[RigL(update_freq=500, seed=0)])

`SparseDense` keeps its weight in the op's fixed-capacity form (an int32
pattern variable and a values variable), so a new pattern is an assign and
never a re-trace. `RigL` reuses `sparse_training`'s numpy logic: every
`update_freq` steps it drops each layer's weakest connections and grows as
many where the dense gradient of that step's batch is largest (or at random),
carrying the optimizer's slots over: kept connections keep theirs, new ones
start at zero, value included. `to_dense` turns a model into plain `Dense`
layers for anything that cannot load the op.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
from ipu_sparse_ops.tf_startup import tf  # before keras: it imports TensorFlow
import keras

from ipu_sparse_ops import ops, rigl, sparse_training
from ipu_sparse_ops.distribute import PatternCheck, is_chief
from ipu_sparse_ops.training_run import write_atomically
from ipu_sparse_ops.sparse import (MatmulSpec, Representation, Triplets, capacity_for_density,
                                   dense_from_triplets, random_glorot_triplets,
                                   representation_and_order, representation_from_triplets,
                                   triplets_from_representation)

__all__ = ["SparseDense", "RigL", "SeededDropout", "sparse_layers", "to_dense"]

POOLINGS = ("NONE", "SUM", "AVG", "MAX")


def constant_initializer(array: np.ndarray):
    """A Keras initializer returning `array` (shape and dtype are checked by Keras)."""
    def initializer(shape, dtype=None):
        return tf.constant(array, dtype=dtype)
    return initializer


@keras.saving.register_keras_serializable(package="ipu_sparse_ops")
class SparseDense(keras.layers.Layer):
    """`Dense` with a genuinely sparse kernel whose pattern may change every step.

    Args:
        units: output features.
        density: fraction of the kernel's blocks that are connected, in (0, 1].
        block_size: 1 (element-wise) or 4, 8, 16 (square blocks). Sizes that
            are not multiples of it are padded up: the op works on the padded
            kernel, `call` pads the input with zero features and drops the
            surplus outputs, and the part of each block in the padding is zero
            from the start and after every `set_triplets`, so it never
            carries anything (`RigL` ranks such blocks per real element).
        activation, use_bias: as for `keras.layers.Dense`.
        pooling: how `RigL` scores a block from |dL/dW| over it: "NONE" or
            "SUM" sum it, "AVG" averages it, "MAX" takes its largest. The layer
            keeps the full dL/dW and `RigL` pools it on the host, so under
            `tf.distribute` it pools the replicas' summed gradient, exactly as
            one replica on the global batch would.
        seed: the initial pattern and values; None draws it from numpy's
            global generator (which `keras.utils.set_random_seed` seeds).
        meta_info_oversize: capacity headroom over the initial block count.
        kernel_regularizer: as for `Dense`, applied to the connected values
            (e.g. `keras.regularizers.L2(wd / 2)` adds wd * w to their gradient).

    The weights are `metainfo` (the pattern, int32), `nz_values`
    [capacity, block_size, block_size] (trainable, in the op's slot order),
    `bias`, and, for `RigL`, `dense_grad` (the last dL/dW taken, full size) and
    `dense_grad_countdown` (steps until the next one is taken; 0: none due).
    Inputs may have any rank >= 2; the last axis is the features. `spec`
    holds the padded sizes, `input_size` and `units` the real ones.
    """

    def __init__(self, units: int, density: float, *, block_size: int = 1, activation=None,
                 use_bias: bool = True, pooling: str = "NONE", seed: int | None = None,
                 meta_info_oversize: float = 0.0, kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.units = int(units)
        self.density = float(density)
        self.block_size = int(block_size)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.pooling = pooling
        self.seed = int(np.random.randint(2 ** 31)) if seed is None else int(seed)
        self.meta_info_oversize = float(meta_info_oversize)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.spec: MatmulSpec | None = None
        self.input_size: int | None = None
        self.traces = 0  # how often `call` was traced (the tests count re-traces)

    def build(self, input_shape):
        input_size = input_shape[-1]
        if input_size is None:
            raise ValueError(f"{self.name}: the last input dimension must be known")
        bs = self.block_size
        self.input_size = int(input_size)
        input_blocks, output_blocks = -(-self.input_size // bs), -(-self.units // bs)
        count, capacity = capacity_for_density(input_blocks, output_blocks, self.density,
                                               self.meta_info_oversize)
        data_type = "fp16" if self.compute_dtype == "float16" else "fp32"
        self.spec = MatmulSpec(input_blocks * bs, output_blocks * bs, capacity, block_size=bs,
                               data_type=data_type, pooling_type=self.pooling)
        triplets = self._zero_padding(random_glorot_triplets(self.spec, count=count,
                                                             seed=self.seed))
        rep = representation_from_triplets(self.spec, triplets)
        self.metainfo = self.add_weight(
            name="metainfo", shape=rep.metainfo.shape, dtype="int32", trainable=False,
            initializer=constant_initializer(rep.metainfo))
        self.nz_values = self.add_weight(
            name="nz_values", shape=rep.nz_values.shape,
            initializer=constant_initializer(rep.nz_values), regularizer=self.kernel_regularizer)
        self.bias = (self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
                     if self.use_bias else None)
        # Written inside the replicas' training step, so each replica keeps its own copy
        # (no all-reduce in the step); a host read sums the replicas' dense gradients
        # (each of a loss Keras scaled by 1 / replicas: the global batch's gradient), and
        # the countdown, the same on every replica, reads as the first one's.
        self.dense_grad = self._add_replica_local(
            "dense_grad", (self.spec.input_size, self.spec.output_size), "float32", "sum")
        self.dense_grad_countdown = self._add_replica_local(
            "dense_grad_countdown", (), "int32", "only_first_replica")

    def _add_replica_local(self, name, shape, dtype, aggregation):
        """A non-trainable weight each replica writes on its own (synchronised on read),
        as Keras keeps its metrics' totals; `add_weight` offers no synchronisation."""
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(initializer=keras.initializers.Zeros(), shape=shape,
                                      dtype=dtype, trainable=False, aggregation=aggregation,
                                      synchronization="on_read", name=name)
        self._track_variable(variable)
        return variable

    def call(self, inputs, training=None):
        self.traces += 1
        spec = self.spec
        x = tf.cast(inputs, self.compute_dtype)
        tokens = x.shape.rank != 2  # [..., features]: the op takes a matrix
        if tokens:
            leading = tf.shape(x)[:-1]
            x = tf.reshape(x, (-1, self.input_size))
        if spec.input_size > self.input_size:
            x = tf.pad(x, [[0, 0], [0, spec.input_size - self.input_size]])
        metainfo = tf.convert_to_tensor(self.metainfo)
        values = tf.cast(self.nz_values, self.compute_dtype)
        if training:
            y = self._matmul_taking_dense_grad(x, metainfo, values)
        else:
            y = ops.sparse_matmul(x, Representation(metainfo, values), spec)
        if spec.output_size > self.units:
            y = y[:, :self.units]
        if self.bias is not None:
            y = tf.nn.bias_add(y, tf.cast(self.bias, self.compute_dtype))
        y = self.activation(y)
        return tf.reshape(y, tf.concat([leading, [self.units]], axis=0)) if tokens else y

    def _matmul_taking_dense_grad(self, x, metainfo, values):
        """The op, whose backward also stores the dense gradient when `RigL` asked for it."""
        spec = self.spec

        @tf.custom_gradient
        def matmul(x, values):
            y = ops.sparse_matmul(x, Representation(metainfo, values), spec)

            def backward(dy):
                grad_x = ops._ops.ipu_sparse_matmul_grad_input(
                    dy, metainfo, values, input_size=spec.input_size)
                grad_values = ops._ops.ipu_sparse_matmul_grad_values(
                    x, dy, metainfo, block_size=spec.block_size)
                with tf.control_dependencies([self._take_dense_grad(x, dy)]):
                    return tf.identity(grad_x), grad_values
            return y, backward
        return matmul(x, values)

    def _take_dense_grad(self, x, dy):
        """Counts the countdown down; at 1 stores this batch's dense gradient (a stateful op)."""
        countdown = self.dense_grad_countdown.value
        store = self.dense_grad.value
        due = tf.equal(countdown.read_value(), 1)

        def take():  # in float32: a float16 gradient of a scaled loss could overflow
            grad = ops.dense_gradient(tf.cast(x, tf.float32), tf.cast(dy, tf.float32))
            with tf.control_dependencies([store.assign(grad)]):
                return tf.constant(True)
        taken = tf.cond(due, take, lambda: tf.constant(False))
        with tf.control_dependencies([taken]):
            return countdown.assign(tf.maximum(countdown - 1, 0), read_value=False)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, density=self.density, block_size=self.block_size,
                      activation=keras.activations.serialize(self.activation),
                      use_bias=self.use_bias, pooling=self.pooling, seed=self.seed,
                      meta_info_oversize=self.meta_info_oversize,
                      kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer))
        return config

    # ---- the pattern, on the host --------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.spec.max_non_zero_blocks

    @property
    def nnz(self) -> int:
        """Connected blocks now (the pattern's own count, not the configured density)."""
        return int(self.metainfo.numpy()[self.spec.output_blocks])

    def get_triplets(self) -> Triplets:
        """The connections in slot order: index i is slot i of `nz_values` and its optimizer slots."""
        rep = Representation(self.metainfo.numpy(), self.nz_values.numpy())
        return triplets_from_representation(self.spec, rep)

    def get_dense(self) -> np.ndarray:
        """The kernel as a dense [input_size, units] numpy array (the padding cut off)."""
        return dense_from_triplets(self.spec, self.get_triplets())[:self.input_size, :self.units]

    def real_elements(self) -> np.ndarray | None:
        """[input_blocks, output_blocks]: each block's elements outside the padding; None
        when the sizes needed no padding (every block is whole)."""
        spec, bs = self.spec, self.block_size
        if (spec.input_size, spec.output_size) == (self.input_size, self.units):
            return None
        rows = np.clip(self.input_size - bs * np.arange(spec.input_blocks), 0, bs)
        cols = np.clip(self.units - bs * np.arange(spec.output_blocks), 0, bs)
        return np.outer(rows, cols)

    def _zero_padding(self, triplets: Triplets) -> Triplets:
        """`triplets` with the part of each block that lies in the padding set to zero."""
        bs = self.block_size
        if self.real_elements() is None:
            return triplets
        rows = triplets.row_indices[:, None] * bs + np.arange(bs)
        cols = triplets.col_indices[:, None] * bs + np.arange(bs)
        inside = (rows < self.input_size)[:, :, None] & (cols < self.units)[:, None, :]
        values = np.where(inside, np.asarray(triplets.values), 0)
        return triplets._replace(values=values.astype(np.asarray(triplets.values).dtype))

    def set_triplets(self, triplets: Triplets, kept_from: np.ndarray | None = None) -> np.ndarray:
        """Make `triplets` the kernel (an assign: nothing re-traces).

        `kept_from[i]` is the slot (index in `get_triplets()`) connection i
        continues, or -1. Returns, for each slot of the new pattern, the old
        slot it continues or -1 (padding and new connections). Values in the
        padding of the sizes are stored as zero.
        """
        rep, order = representation_and_order(self.spec, self._zero_padding(triplets))
        self.metainfo.assign(rep.metainfo)
        self.nz_values.assign(rep.nz_values.astype(self.nz_values.dtype))
        slot_kept_from = np.full(self.capacity, -1, dtype=np.int64)
        if kept_from is not None:
            slot_kept_from[:len(order)] = np.asarray(kept_from)[order]
        return slot_kept_from


@keras.saving.register_keras_serializable(package="ipu_sparse_ops")
class SeededDropout(keras.layers.Layer):
    """`Dropout` whose random state is a saved weight: a resumed run draws the same masks.

    Keras's `Dropout` keeps its generator's state out of `.keras` files and
    checkpoints, so a run restored from one draws other masks than the run it
    continues. Here the k-th training call draws its mask from a stateless
    generator keyed by (seed, k), and k is a weight like any other.
    """

    def __init__(self, rate: float, seed: int, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        self.rate, self.seed = float(rate), int(seed)

    def build(self, input_shape):
        # Every replica counts its own calls (the same count: read as the first one's).
        with keras.name_scope(self.name, caller=self):
            self.calls = keras.Variable(initializer=keras.initializers.Zeros(), shape=(),
                                        dtype="int64", trainable=False, name="calls",
                                        aggregation="only_first_replica",
                                        synchronization="on_read")
        self._track_variable(self.calls)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        # Under tf.distribute each replica draws its own part of the global batch's masks:
        # call k of replica r is keyed by k * replicas + r (one replica: k, as before).
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        replica = context.replica_id_in_sync_group if context is not None else 0
        draw = self.calls.value * replicas + tf.cast(replica, tf.int64)
        key = tf.stack([tf.constant(self.seed % 2 ** 63, tf.int64), draw])
        self.calls.assign_add(1)
        keep = tf.random.stateless_uniform(tf.shape(inputs), seed=key) >= self.rate
        kept = inputs / tf.constant(1.0 - self.rate, inputs.dtype)
        return tf.where(keep, kept, tf.zeros_like(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def sparse_layers(model: keras.Model) -> list[SparseDense]:
    """Every `SparseDense` inside `model`, nested ones included, in a stable order."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, SparseDense)]


def optimizer_slots(optimizer, variable) -> list:
    """The optimizer variables that hold per-element state of `variable` (momenta, moments).

    Keras names them `<variable path with _ for />_<slot name>` with the
    variable's shape (`Optimizer.add_variable_from_reference`); a
    `LossScaleOptimizer` lists its inner optimizer's too.
    """
    prefix = variable.path.replace("/", "_") + "_"
    return [v for v in optimizer.variables
            if v.name.startswith(prefix) and tuple(v.shape) == tuple(variable.shape)]


def follow_slots(optimizer, variable, slot_kept_from: np.ndarray) -> None:
    """Re-align `variable`'s optimizer slots with a new pattern: kept slots move, new ones are 0."""
    for slot in optimizer_slots(optimizer, variable):
        slot.assign(sparse_training.follow_pattern(slot.numpy(), slot_kept_from))


@keras.saving.register_keras_serializable(package="ipu_sparse_ops")
class RigL(keras.callbacks.Callback):
    """Prune and regrow every `SparseDense` of the model every `update_freq` training steps.

    Args:
        update_freq: training steps between two pattern updates; at least the
            model's `steps_per_execution` (patterns change between executions).
        prune_ratio: the share of each layer's connections the first update moves.
        regrow: "rigl" (grow where |dL/dW| of the update step's batch is
            largest, block-pooled for blocks), "random" (SET) or "none" (static).
        schedule: "cosine" (the original's decay of the moved share over the
            updates) or "constant".
        stop_fraction: updates happen in the first `stop_fraction` of training.
        seed: random regrowth; draws are keyed by (seed, update), so a resumed
            run draws what an uninterrupted one would.
        records_path: if set, each layer's pattern after every update is
            written there (`<layer>_<update>.npz`: row_indices, col_indices,
            values), atomically.
        log_dir: if set, each update logs per layer its density, connections
            moved and the moved share, and an image of the first layer's
            connectivity, into `log_dir`/train: give it the log_dir of the
            fit's `keras.callbacks.TensorBoard` to see them beside its curves.
        total_steps: training steps of the whole fit; by default epochs x
            steps per epoch, as `fit` reports them.
        cosine_options: `zero_steps`, `phase_delay`, `period` of the cosine.
        update_at_end: False skips an update due at the last training step
            (nothing would train on it) while keeping the schedule's length,
            as the original transformer script numbers its updates.

    Without `log_dir` the same summaries go to the default summary writer, which
    a TensorBoard callback with a batch-level `update_freq` sets during fit.

    Under `tf.distribute` every worker runs the same update from the same
    inputs (the replicas' dense gradients summed, draws keyed by seed), checks
    with a fingerprint of each pattern gathered from every replica that all
    hold the same one (`distribute.PatternMismatchError` names the layer if
    not), and only the chief writes records and summaries.
    """

    def __init__(self, update_freq: int, *, prune_ratio: float = 0.3, regrow: str = "rigl",
                 schedule: str = "cosine", stop_fraction: float = 1.0, seed: int | None = None,
                 records_path=None, log_dir=None, total_steps: int | None = None,
                 cosine_options=None, update_at_end: bool = True):
        super().__init__()
        if update_freq < 1:
            raise ValueError(f"update_freq must be >= 1, got {update_freq}")
        if not 0.0 <= prune_ratio <= 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio}")
        if regrow not in (*sparse_training.REGROW_METHODS, "none"):
            raise ValueError(f"regrow must be one of {(*sparse_training.REGROW_METHODS, 'none')}, "
                             f"got {regrow!r}")
        if not 0.0 < stop_fraction <= 1.0:
            raise ValueError(f"stop_fraction must be in (0, 1], got {stop_fraction}")
        options = dict(cosine_options or {}) if schedule == "cosine" else {}
        self.prune_count = sparse_training.prune_schedule(schedule, **options)
        self.update_freq = int(update_freq)
        self.prune_ratio = float(prune_ratio)
        self.regrow = regrow
        self.stop_fraction = float(stop_fraction)
        self.seed = int(np.random.randint(2 ** 31)) if seed is None else int(seed)
        self.records_path = records_path
        self.log_dir = log_dir
        self._writer = None
        self.cosine_options = options
        self.schedule_name = schedule
        self.total_steps = total_steps
        self.update_at_end = bool(update_at_end)
        self.history: list[dict] = []  # per update: step, t, per-layer moves, seconds
        self._steps_done = None
        self._due = None

    def on_train_begin(self, logs=None):
        self._layers = sparse_layers(self.model)
        if not self._layers:
            raise ValueError("RigL: the model has no SparseDense layer")
        per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if self.update_freq < per_execution:
            raise ValueError(f"RigL: update_freq {self.update_freq} is below the model's "
                             f"steps_per_execution {per_execution}")
        total = self.total_steps
        if total is None:
            steps, epochs = self.params.get("steps"), self.params.get("epochs")
            if not steps or not epochs:
                raise ValueError("RigL: fit does not know its steps per epoch; pass total_steps")
            total = steps * epochs
        self.update_schedule = sparse_training.UpdateSchedule(
            self.update_freq, int(total * self.stop_fraction) // self.update_freq)
        self._last_step = total
        self._steps_done = None  # read at the first batch, after BackupAndRestore restored
        self._chief = is_chief(self.model.distribute_strategy)
        self.pattern_check = PatternCheck(self.model.distribute_strategy, self._layers)
        self.pattern_check.check("before training")

    def on_train_batch_begin(self, batch, logs=None):
        if self._steps_done is None:  # iterations counts applied updates, not micro-batches
            accumulation = getattr(self.model.optimizer, "gradient_accumulation_steps", None)
            self._steps_done = int(self.model.optimizer.iterations.numpy()) * (accumulation or 1)
        self._batch_begin = batch
        self._due = None
        if self.regrow == "none" or self.update_schedule.num_updates == 0:
            return
        per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        done = self._steps_done
        for step in range(done + 1, done + per_execution + 1):
            if self.update_schedule.is_update_step(step) and (
                    self.update_at_end or step != self._last_step):
                self._due = step
                if self.regrow == "rigl":
                    for layer in self._layers:
                        layer.dense_grad_countdown.assign(step - done)
                break

    def on_train_batch_end(self, batch, logs=None):
        self._steps_done += batch - self._batch_begin + 1
        if self._due is None or self._due > self._steps_done:
            return
        self._update(self._due)

    def _update(self, step: int) -> None:
        started = time.perf_counter()
        t = self.update_schedule.update_index(step)
        T = self.update_schedule.num_updates
        grads = {}
        if self.regrow == "rigl":
            grads = {layer.name: layer.dense_grad.numpy() for layer in self._layers}
            for name, grad in grads.items():
                rigl.check_finite(name, grad)  # before any layer changes
        rng = np.random.default_rng([self.seed, t])
        entry = {"step": step, "t": t, "layers": {}}
        for layer in self._layers:
            spec = layer.spec
            triplets = layer.get_triplets()
            n_prune = self.prune_count(t, T, self.prune_ratio, len(triplets.values))
            grad = rigl.block_scores(spec, grads[layer.name]) if grads else None
            ranked, grad = self._per_real_element(layer, triplets, grad)
            new, kept_from = sparse_training.prune_and_regrow(
                ranked, n_prune, self.regrow, shape=(spec.input_blocks, spec.output_blocks),
                grad=grad, rng=rng)
            if ranked is not triplets:  # ranked on scaled values; keep the real ones
                new = new._replace(values=sparse_training.follow_pattern(triplets.values,
                                                                         kept_from))
            slot_kept_from = layer.set_triplets(new, kept_from)
            follow_slots(self.model.optimizer, layer.nz_values, slot_kept_from)
            entry["layers"][layer.name] = {"moved": int(np.count_nonzero(kept_from < 0)),
                                           "nnz": len(new.values)}
            if self.records_path is not None and self._chief:
                self._write_record(layer, t, new)
        self.pattern_check.check(f"after Rig-L update {t}")
        entry["seconds"] = time.perf_counter() - started
        self.history.append(entry)
        if self._chief:
            self._log_summaries(step, t, T, entry)

    @staticmethod
    def _per_real_element(layer: SparseDense, triplets: Triplets, grad):
        """(triplets, grad) to rank, per real element where the layer's sizes are padded.

        A block half in the padding would otherwise look half as strong (its |w|
        and summed |g| cover half the elements), and e.g. the last classes of a
        10-wide output in 8 x 8 blocks would lose their connections first; a
        block wholly in the padding scores 0, so it is never grown. A MAX-pooled
        gradient is already per element.
        """
        real = layer.real_elements()
        if real is None:
            return triplets, grad
        factor = rigl.per_element(layer.spec, real)
        values = np.asarray(triplets.values, np.float64)
        scale = factor[triplets.row_indices, triplets.col_indices]
        ranked = triplets._replace(values=values * scale.reshape((-1,) + (1,) * (values.ndim - 1)))
        if grad is not None and layer.spec.pooling_type != "MAX":
            grad = (np.abs(grad) * factor).astype(np.float32)
        return ranked, grad

    def _write_record(self, layer: SparseDense, t: int, triplets: Triplets) -> None:
        folder = Path(self.records_path)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = dict(row_indices=triplets.row_indices, col_indices=triplets.col_indices,
                      values=triplets.values, block_size=np.array(layer.spec.block_size))
        write_atomically(folder / f"{layer.name}_{t:05d}.npz",
                         lambda f: np.savez(f, **arrays))

    def _log_summaries(self, step: int, t: int, T: int, entry: dict) -> None:
        """Into `log_dir`/train, else into the default writer a batch-level TensorBoard sets."""
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        with (self._writer.as_default() if self._writer is not None
              else contextlib.nullcontext()):
            if not tf.summary.should_record_summaries():
                return
            share = self.prune_ratio * (sparse_training.cosine_schedule(t, T, **self.cosine_options)
                                        if self.schedule_name == "cosine" else 1.0)
            for layer in self._layers:
                moved = entry["layers"][layer.name]
                total = layer.spec.input_blocks * layer.spec.output_blocks
                tf.summary.scalar(f"rigl/{layer.name}/density", moved["nnz"] / total, step=step)
                tf.summary.scalar(f"rigl/{layer.name}/moved", moved["moved"], step=step)
                tf.summary.scalar(f"rigl/{layer.name}/prune_fraction", share, step=step)
            first = self._layers[0]
            triplets = first.get_triplets()
            mask = np.zeros((first.spec.input_blocks, first.spec.output_blocks), np.float32)
            mask[triplets.row_indices, triplets.col_indices] = 1.0
            tf.summary.image(f"rigl/{first.name}/connectivity", mask[None, :, :, None], step=step)

    def get_config(self):
        return {"update_freq": self.update_freq, "prune_ratio": self.prune_ratio,
                "regrow": self.regrow, "stop_fraction": self.stop_fraction, "seed": self.seed,
                "schedule": self.schedule_name, "records_path": self.records_path,
                "log_dir": self.log_dir, "total_steps": self.total_steps,
                "cosine_options": self.cosine_options, "update_at_end": self.update_at_end}


def to_dense(model: keras.Model) -> keras.Model:
    """A copy of `model` with every `SparseDense` replaced by a `keras.layers.Dense`.

    Same outputs; the result needs nothing of this project to load or serve.
    Works for Sequential and functional models (`keras.models.clone_model`).
    """
    def clone(layer):
        if not isinstance(layer, SparseDense):
            return layer.__class__.from_config(layer.get_config())
        return keras.layers.Dense(layer.units, activation=layer.activation,
                                  use_bias=layer.use_bias, name=layer.name,
                                  dtype=layer.dtype_policy)
    dense = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model._flatten_layers(include_self=False, recursive=True),
                        dense._flatten_layers(include_self=False, recursive=True)):
        if isinstance(old, SparseDense):
            weights = [old.get_dense()] + ([old.bias.numpy()] if old.use_bias else [])
            new.set_weights(weights)
        elif old.weights:
            new.set_weights(old.get_weights())
    return dense


@keras.saving.register_keras_serializable(package="ipu_sparse_ops")
class WeightDecay(keras.regularizers.Regularizer):
    """Adds `rate * w` to each weight's gradient (a loss of rate / 2 * sum w^2).

    Unlike `keras.regularizers.L2` it sums in float32, so float16 weights can
    join the float32 loss Keras adds them to.
    """

    def __init__(self, rate: float):
        self.rate = float(rate)

    def __call__(self, x):
        return 0.5 * self.rate * tf.reduce_sum(tf.square(tf.cast(x, tf.float32)))

    def get_config(self):
        return {"rate": self.rate}


@keras.saving.register_keras_serializable(package="ipu_sparse_ops")
class Momentum(keras.optimizers.SGD):
    """SGD with momentum as TensorFlow 1's `MomentumOptimizer` (the original's) steps.

    Its accumulator sums raw gradients, a = m a + g, and the step is lr a
    (Nesterov: lr (g + m a)). Keras's SGD keeps lr g in the velocity instead:
    the same at a constant rate, but after the rate steps down Keras keeps
    moving at the old rate for as long as the momentum remembers.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0:
            return super().update_step(gradient, variable, learning_rate)
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        momentum = tf.cast(self.momentum, variable.dtype)
        accumulator = self.momentums[self._get_variable_index(variable)]
        self.assign(accumulator, accumulator * momentum + gradient)
        step = gradient + momentum * accumulator if self.nesterov else accumulator
        self.assign_sub(variable, learning_rate * step)
