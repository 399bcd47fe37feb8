"""Train a two-layer MNIST network whose layers are genuinely sparse, rewired by Rig-L.

The model is 784 -> hidden (ReLU, bias) -> dropout -> 10 (bias). A layer of
density below 1 is a `SparseFcLayer` (the dynamic sparse matmul op), density 1
a dense layer. Between two pattern updates ("Rig-L steps", `--steps-per-epoch`
of them per epoch) all training steps run inside one traced TensorFlow loop,
the CPU stand-in for the IPU's device iterations; only the last step of a
segment computes the dense (or block-pooled) gradient. The host then prunes
the weakest connections of every sparse layer, regrows as many where the
gradient is largest (Rig-L, Evci et al. 2020) or at random (SET), with the
cosine-decayed count, and pushes the new pattern; optimizer slots follow it.

Examples:
    python mnist_rigl/sparse_mnist.py --densities 0.1 0.3 --records-path rigl_records
    python mnist_rigl/sparse_mnist.py --densities 0.1 0.3 --checkpoint-path ckpt
    python mnist_rigl/sparse_mnist.py --densities 0.1 0.3 --checkpoint-path ckpt --restore

Runs are deterministic for a seed: shuffling and random regrowth come from a
seeded numpy generator, dropout from stateless random ops seeded by the step,
and `--restore` after a kill ends bit for bit where the uninterrupted run ends.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root; no PYTHONPATH needed

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import time

import numpy as np

from ipu_sparse_ops.cli import ArgumentParser
from ipu_sparse_ops.ipu_only_flags import IPU_ONLY, IpuOnlyFlag
from ipu_sparse_ops.training_run import (
    SegmentPlan, TrainingError, UsageError, check_writable_dir, make_segment_loop, parse_flags,
    remove_stale_temps, report_failure, write_atomically)
from mnist_rigl.mnist_data import MnistError, load_mnist

logger = logging.getLogger("sparse_mnist")

PROG = "sparse_mnist.py"
INPUT_SIZE = 28 * 28
NUM_CLASSES = 10
# Mean and standard deviation of the training images' pixels scaled to [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081
REFERENCE_BATCH_SIZE = 16  # the learning rates below are for this batch size
LR_BOUNDARIES = (0.2, 0.4, 0.6, 0.8)  # fractions of the whole run
LR_VALUES = (0.02, 0.01, 0.005, 0.001, 0.0001)
ADAM_LR = 0.002  # Adam uses one constant rate (also scaled by 16 / batch size)
CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_VERSION = 1
RECORD_NAME = "weights_fc1_{step:06d}.npz"
# Flags that define the training trajectory: a checkpoint only resumes a run that agrees.
RUN_DEFINING_FLAGS = (
    "densities", "droprate", "weight_decay", "seed", "batch_size", "steps_per_epoch", "epochs",
    "disable_pruning", "regrow", "prune_ratio", "optimizer", "optimizer_arg", "data_type",
    "block_size", "pooling_type", "hidden_size", "train_samples")


# ---- command line ----------------------------------------------------------------------

def add_ipu_only_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("IPU-only flags of the original", IPU_ONLY + ".")
    group.add_argument("--partials-type", action=IpuOnlyFlag, choices=("fp32", "fp16"),
                       default="fp32", help="type of the matmuls' intermediate sums")
    group.add_argument("--disable-shared-buckets", action=IpuOnlyFlag, nargs=0, default=False,
                       help="no bucket sharing between the forward and backward passes")
    group.add_argument("--batches-per-step-override", action=IpuOnlyFlag, type=int,
                       default=None, metavar="N", help="device iterations per host return")
    group.add_argument("--disable-dense-grad-override", action=IpuOnlyFlag, nargs=0,
                       default=False, help="drop the dense-gradient outfeed")
    group.add_argument("--pipelining", action=IpuOnlyFlag, nargs=0, default=False,
                       help="pipeline the model over IPUs")
    group.add_argument("--pipeline-schedule", action=IpuOnlyFlag,
                       choices=("Grouped", "Interleaved", "Sequential"), default="Grouped",
                       help="order of the pipeline's forward and backward passes")
    group.add_argument("--on-demand", action=IpuOnlyFlag, nargs=0, default=False,
                       help="attach to the IPU only when it runs")
    parser.set_defaults(ipu_only_given=())


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Train 784 -> hidden -> 10 on MNIST with sparse layers whose "
                    "connectivity evolves by Rig-L (or SET, or not at all).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--densities", type=float, nargs=2, default=[0.01, 1.0],
                        metavar=("FC1", "FC2"),
                        help="fraction of weights (blocks for fc1) each layer holds; "
                             "1 makes a dense layer")
    parser.add_argument("--hidden-size", type=int, default=320, help="units in the hidden layer")
    parser.add_argument("--droprate", type=float, default=0.1,
                        help="dropout rate after the hidden layer")
    parser.add_argument("--weight-decay", type=float, default=1e-3,
                        help="L2 decay of the weights (not the biases), added to their "
                             "gradients; it shrinks connections that do not earn their keep, "
                             "such as those from always-blank pixels, until Rig-L prunes them")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of everything random (default: drawn and logged; "
                             "--restore takes the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--steps-per-epoch", type=int, default=5,
                        help="Rig-L steps (pattern updates) per epoch; the training steps "
                             "between two of them run in one traced loop")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="train on only the first N training images (quick runs)")
    parser.add_argument("--disable-pruning", action="store_true",
                        help="keep the initial random patterns (static sparsity)")
    parser.add_argument("--regrow", choices=("rigl", "random"), default="rigl",
                        help="where new connections grow: largest |dense gradient| (Rig-L) "
                             "or uniformly at random (SET)")
    parser.add_argument("--prune-ratio", type=float, default=0.3,
                        help="fraction of a layer's connections moved at the first update; "
                             "later updates move fewer (cosine decay)")
    parser.add_argument("--block-size", type=int, choices=(1, 4, 8, 16), default=1,
                        help="block size of fc1 (fc2 stays element-wise)")
    parser.add_argument("--pooling-type", choices=("NONE", "AVG", "MAX", "SUM"), default="SUM",
                        help="how fc1's dense gradient is pooled over a block for Rig-L "
                             "(NONE: the full gradient reaches the host, which sums |g|)")
    parser.add_argument("--data-type", choices=("fp32", "fp16"), default="fp32",
                        help="storage and compute type of the weights and activations")
    parser.add_argument("--optimizer", default="Momentum",
                        help="GradientDescent, Momentum or Adam")
    parser.add_argument("--optimizer-arg", action="append", default=[], metavar="NAME=JSON",
                        help="optimizer option, repeatable, e.g. momentum=0.95 "
                             "nesterov=true (Adam: beta1, beta2, epsilon)")
    parser.add_argument("--records-path", type=Path, default=None,
                        help="folder for fc1's pattern before training and after every "
                             "Rig-L update, weights_fc1_NNNNNN.npz with NNNNNN the number of "
                             "updates so far (for visualise_connectivity.py)")
    parser.add_argument("--checkpoint-path", type=Path, default=None,
                        help="folder for checkpoints (written atomically)")
    parser.add_argument("--checkpoint-freq", type=int, default=5,
                        help="checkpoint every N Rig-L steps (and at the end)")
    parser.add_argument("--restore", action="store_true",
                        help="continue from the checkpoint in --checkpoint-path "
                             "(starts afresh, with a warning, if there is none yet)")
    parser.add_argument("--data-dir", default=None,
                        help="read MNIST from the four IDX files here instead of the caches")
    parser.add_argument("--log-level", default="INFO",
                        choices=("NOTSET", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                        help="logging level")
    parser.add_argument("--log", type=Path, default=None, metavar="FILE",
                        help="also write the log to FILE (overwritten)")
    parser.add_argument("--test-mode", choices=("training", "tests", "all"), default="all",
                        help="train only (no test evaluation), test only (the checkpoint "
                             "--restore finds, else the initial model), or both")
    parser.add_argument("--single-train-step-only", action="store_true",
                        help="stop training after one training step (no Rig-L update, no "
                             "checkpoint); then test if --test-mode says so")
    add_ipu_only_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the flags; a bad one exits with one line on stderr (status 2)."""
    return parse_flags(build_parser(), argv, check_args)


def check_args(args: argparse.Namespace) -> None:
    """Check the flags before any data is loaded; only the optimizer checks need TensorFlow."""
    for name, density in zip(("fc1", "fc2"), args.densities):
        if not 0.0 < density <= 1.0:
            raise UsageError(f"--densities: {name} density must be in (0, 1], got {density:g}")
    positive = ("hidden_size", "batch_size", "steps_per_epoch", "epochs", "checkpoint_freq")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_samples is not None and args.train_samples < 1:
        raise UsageError(f"--train-samples must be >= 1, got {args.train_samples}")
    if not 0.0 <= args.droprate < 1.0:
        raise UsageError(f"--droprate must be in [0, 1), got {args.droprate:g}")
    if not 0.0 <= args.weight_decay < 1.0:
        raise UsageError(f"--weight-decay must be in [0, 1), got {args.weight_decay:g}")
    if not 0.0 <= args.prune_ratio <= 1.0:
        raise UsageError(f"--prune-ratio must be in [0, 1], got {args.prune_ratio:g}")
    bs = args.block_size
    for name, size in (("784 inputs", INPUT_SIZE), (f"--hidden-size {args.hidden_size}",
                                                    args.hidden_size)):
        if size % bs:
            raise UsageError(f"--block-size {bs} does not divide {name}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.batches_per_step_override is not None and args.batches_per_step_override < 1:
        raise UsageError(f"--batches-per-step-override must be >= 1, got "
                         f"{args.batches_per_step_override}")
    if args.single_train_step_only and args.test_mode == "tests":
        raise UsageError("--single-train-step-only needs training; --test-mode tests has none")
    if args.restore and args.checkpoint_path is None:
        raise UsageError("--restore needs --checkpoint-path")
    if args.records_path is not None:
        check_writable_dir(args.records_path, "--records-path")
    if args.checkpoint_path is not None:
        check_writable_dir(args.checkpoint_path, "--checkpoint-path")
    # Last, as it imports TensorFlow: the optimizer (its options are checked when it is
    # built, which needs the variables' module anyway).
    try:
        from ipu_sparse_ops.optimizers import optimizer_class, parse_optimizer_args
    except ImportError as e:  # pragma: no cover - missing build
        raise UsageError(f"cannot import ipu_sparse_ops ({e}); run `make -j` first") from None
    try:
        args.optimizer_options = parse_optimizer_args(args.optimizer_arg)
    except ValueError as e:
        raise UsageError(f"--optimizer-arg: {e}") from None
    if "learning_rate" in args.optimizer_options:
        raise UsageError("--optimizer-arg: the learning rate follows the built-in schedule "
                         "and cannot be set")
    try:
        optimizer_class(args.optimizer)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ---- schedule --------------------------------------------------------------------------

def learning_rates(optimizer: str, batch_size: int) -> tuple[float, ...]:
    """The rate of each stage, scaled linearly with the batch size."""
    scale = batch_size / REFERENCE_BATCH_SIZE
    if optimizer.lower() == "adam":
        return (ADAM_LR * scale,) * len(LR_VALUES)
    return tuple(lr * scale for lr in LR_VALUES)


def learning_rate_at(step: int, plan: SegmentPlan, rates: tuple[float, ...]) -> float:
    return rates[sum(step >= b for b in plan.boundary_steps(LR_BOUNDARIES))]


# ---- files -----------------------------------------------------------------------------

def write_record(folder: Path, updates: int, layer) -> None:
    """fc1's current connections (just-grown zeros included) after `updates` Rig-L updates."""
    triplets = layer.get_triplets()
    arrays = {"row_indices": triplets.row_indices, "col_indices": triplets.col_indices,
              "values": triplets.values}
    if layer.spec.block_size > 1:
        arrays["block_size"] = np.array(layer.spec.block_size)
    write_atomically(folder / RECORD_NAME.format(step=updates), lambda f: np.savez(f, **arrays))


# ---- model -----------------------------------------------------------------------------

SEED_STREAMS = ("fc1", "fc2", "host")  # independent numpy streams derived from --seed


def seed_sequence(seed: int, stream: str) -> np.random.SeedSequence:
    """The numpy seed of one use of randomness: fc1/fc2 initialisation, or the host
    generator that shuffles and regrows at random (whose state is checkpointed)."""
    return np.random.SeedSequence(seed, spawn_key=(SEED_STREAMS.index(stream),))


class Model:
    """fc1 (ReLU, bias) -> stateless dropout -> fc2 (bias), plus what Rig-L needs."""

    def __init__(self, args: argparse.Namespace, seed: int):
        from ipu_sparse_ops import layers
        from ipu_sparse_ops.sparse import MatmulSpec, capacity_for_density

        seeds = [seed_sequence(seed, "fc1"), seed_sequence(seed, "fc2")]
        self.droprate = args.droprate
        self.seed = seed
        self.layers = {}
        shapes = {"fc1": (INPUT_SIZE, args.hidden_size, args.block_size, args.pooling_type),
                  "fc2": (args.hidden_size, NUM_CLASSES, 1, "NONE")}
        for (name, (n_in, n_out, bs, pooling)), density, layer_seed in zip(
                shapes.items(), args.densities, seeds):
            _, capacity = capacity_for_density(n_in // bs, n_out // bs, density)
            spec = MatmulSpec(n_in, n_out, capacity, bs, args.data_type, pooling)
            self.layers[name] = layers.make_fc_layer(
                spec, density, seed=layer_seed, use_bias=True, relu=name == "fc1", name=name)
        self.sparse_layers = {name: layer for name, layer in self.layers.items()
                              if isinstance(layer, layers.SparseFcLayer)}
        self.dtype = args.data_type

    @property
    def fc1(self):
        return self.layers["fc1"]

    @property
    def fc2(self):
        return self.layers["fc2"]

    def weights(self) -> list:
        """Each layer's weight variable: its non-zero values if sparse, its kernel if dense."""
        return [layer.nz_values if name in self.sparse_layers else layer.kernel
                for name, layer in self.layers.items()]

    def trainable_variables(self) -> list:
        """Weight then bias, layer by layer."""
        return [variable for weight, layer in zip(self.weights(), self.layers.values())
                for variable in (weight, layer.bias)]

    def __call__(self, x, step=None, training=False, compute_dense_grad=False):
        from ipu_sparse_ops.tf_startup import tf

        h = self.fc1(x, compute_dense_grad=compute_dense_grad)
        if training and self.droprate > 0.0:
            seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
            keep = tf.random.stateless_uniform(tf.shape(h), seed=seed) >= self.droprate
            h = tf.where(keep, h / tf.constant(1.0 - self.droprate, h.dtype), tf.zeros_like(h))
        return self.fc2(h, compute_dense_grad=compute_dense_grad)


def normalised_batch(images_uint8, dtype):
    """uint8 pixels -> [n, 784] standardised with the training set's pixel mean and std.

    Unit-scale inputs are what the Glorot initialisation assumes: at [0, 1]
    (std 0.31) fc1's gradients are three times smaller and the sparse model
    underfits. A pixel blank in every image becomes a constant that the bias
    (not decayed) already provides, so weight decay shrinks its connections
    until Rig-L prunes them.
    """
    from ipu_sparse_ops.tf_startup import tf

    x = tf.cast(tf.reshape(images_uint8, [-1, INPUT_SIZE]), tf.float32)
    x = (x - 255.0 * PIXEL_MEAN) / (255.0 * PIXEL_STD)
    return tf.cast(x, dtype)


def make_train_segment(model: Model, optimizer, plan: SegmentPlan, batch_size: int, x_train,
                       y_train, rates, dense_grads: bool, weight_decay: float):
    """The segment loop (`training_run.make_segment_loop`) over this model's training step.

    With `dense_grads` False (no Rig-L updates) the dense gradients are not in
    the graph at all. `weight_decay` * w is added to the gradient of every
    weight (not the biases).
    """
    from ipu_sparse_ops.tf_startup import tf

    dtype = model.fc1.compute_dtype
    trainables = model.trainable_variables()
    decayed = [any(v is weight for weight in model.weights()) for v in trainables]
    anchors = [layer.dense_grad_anchor for layer in model.sparse_layers.values()
               if dense_grads]
    boundaries = tf.constant(plan.boundary_steps(LR_BOUNDARIES), tf.int64)
    rate_table = tf.constant(rates, tf.float32)
    x_train = tf.convert_to_tensor(x_train)
    y_train = tf.convert_to_tensor(y_train.astype(np.int32))

    def step_fn(perm, batch, step, compute_dense_grad):
        indices = perm[batch * batch_size:(batch + 1) * batch_size]
        x = normalised_batch(tf.gather(x_train, indices), dtype)
        labels = tf.gather(y_train, indices)
        with tf.GradientTape() as tape:
            tape.watch(anchors)
            logits = tf.cast(model(x, step, training=True,
                                   compute_dense_grad=compute_dense_grad), tf.float32)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, trainables + anchors)
        grads, anchor_grads = grads[:len(trainables)], grads[len(trainables):]
        if weight_decay:
            grads = [g + tf.constant(weight_decay, v.dtype) * v if decay else g
                     for g, v, decay in zip(grads, trainables, decayed)]
        lr = tf.gather(rate_table, tf.reduce_sum(tf.cast(step >= boundaries, tf.int32)))
        optimizer.apply_gradients(zip(grads, trainables), learning_rate=lr)
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.int32))
        return loss, correct, anchor_grads

    return make_segment_loop(step_fn, anchors)


def make_evaluate(model: Model, x_test, y_test):
    """tf.function() -> (mean loss, accuracy) over the whole test set, without dropout."""
    from ipu_sparse_ops.tf_startup import tf

    dtype = model.fc1.compute_dtype
    x_test = tf.convert_to_tensor(x_test)
    y_test = tf.convert_to_tensor(y_test.astype(np.int32))

    @tf.function
    def evaluate():
        logits = tf.cast(model(normalised_batch(x_test, dtype)), tf.float32)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y_test, logits))
        correct = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y_test)
        return loss, tf.reduce_mean(tf.cast(correct, tf.float32))

    return evaluate


# ---- Rig-L on the host -----------------------------------------------------------------

def update_patterns(model: Model, optimizer, dense_grads, update: int, num_updates: int,
                    args: argparse.Namespace, rng: np.random.Generator) -> dict[str, int]:
    """Rig-L update `update` of `num_updates` on every sparse layer; connections moved per layer.

    Each layer drops its cosine-scheduled share of weakest connections and
    grows as many (`ipu_sparse_ops.rigl`); kept connections keep their values
    and optimizer slots, new ones start at zero. Every gradient is checked
    before any layer changes: NaN/Inf raises TrainingError with the model intact.
    """
    from ipu_sparse_ops import rigl, sparse_training

    prune_count = sparse_training.prune_schedule("cosine")
    counts = {name: prune_count(update, num_updates, args.prune_ratio, layer.nnz)
              for name, layer in model.sparse_layers.items()}
    grads = dict(zip(model.sparse_layers, dense_grads or ()))
    try:
        return rigl.rigl_update_layers(model.sparse_layers, optimizer, grads, counts,
                                       args.regrow, rng)
    except rigl.NonFiniteGradientError as e:
        raise TrainingError(str(e)) from None


# ---- checkpoints -----------------------------------------------------------------------

def run_config(args: argparse.Namespace) -> dict:
    config = {name: getattr(args, name) for name in RUN_DEFINING_FLAGS}
    config["optimizer"] = args.optimizer.lower()
    config["optimizer_arg"] = args.optimizer_options
    return json.loads(json.dumps(config))  # tuples -> lists, as they come back from JSON


def save_checkpoint(folder: Path, model: Model, optimizer, config: dict, segments_done: int,
                    step: int, perm: np.ndarray, rng: np.random.Generator) -> None:
    """npz of arrays + JSON sidecar naming it (with its SHA-256); both written atomically.

    The npz goes first under a new name, then the JSON that points to it, so a
    kill at any moment leaves a JSON naming a complete npz.
    """
    arrays = {"perm": perm}
    for name, layer in model.layers.items():
        arrays.update({f"{name}/{key}": value for key, value in layer.state().items()})
    arrays.update({f"optimizer/{key}": value for key, value in optimizer.state().items()})
    npz_name = f"checkpoint-{segments_done:06d}.npz"
    write_atomically(folder / npz_name, lambda f: np.savez(f, **arrays))
    digest = hashlib.sha256((folder / npz_name).read_bytes()).hexdigest()
    meta = {"version": CHECKPOINT_VERSION, "config": config, "segments_done": segments_done,
            "step": step, "rng_state": rng.bit_generator.state, "arrays": npz_name,
            "sha256": digest}
    write_atomically(folder / CHECKPOINT_JSON,
                     lambda f: f.write(json.dumps(meta, indent=1).encode()))
    for old in folder.glob("checkpoint-*.npz"):
        if old.name != npz_name:
            with contextlib.suppress(OSError):
                old.unlink()


def read_checkpoint(folder: Path) -> tuple[dict, dict] | None:
    """(metadata, arrays) of the checkpoint in `folder`, None if there is none.

    Raises UsageError (one line) for a checkpoint that is unreadable or whose
    arrays do not match their recorded SHA-256.
    """
    meta_path = folder / CHECKPOINT_JSON
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        npz_path = folder / meta["arrays"]
        if Path(meta["arrays"]).name != meta["arrays"]:
            raise ValueError("arrays must name a file in the checkpoint folder")
        blob = npz_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ValueError(f"{npz_path.name} does not match its recorded SHA-256")
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {meta.get('version')}, expected {CHECKPOINT_VERSION}")
        with np.load(io.BytesIO(blob), allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        raise UsageError(f"corrupt checkpoint in {folder}: {e}") from None
    return meta, arrays


def restore(meta: dict, arrays: dict, model: Model, optimizer, config: dict,
            folder: Path) -> None:
    if meta["config"] != config:
        diffs = [f"{key}={meta['config'].get(key)!r} (now {value!r})"
                 for key, value in config.items() if meta["config"].get(key) != value]
        raise UsageError(f"checkpoint in {folder} belongs to another run: {', '.join(diffs)}")
    try:
        for name, layer in model.layers.items():
            prefix = f"{name}/"
            layer.load_state({k[len(prefix):]: v for k, v in arrays.items()
                              if k.startswith(prefix)})
        prefix = "optimizer/"
        optimizer.load_state({k[len(prefix):]: v for k, v in arrays.items()
                              if k.startswith(prefix)})
    except Exception as e:  # noqa: BLE001 - any defect in the arrays is a corrupt checkpoint
        raise UsageError(f"corrupt checkpoint in {folder}: {e}") from None


# ---- training --------------------------------------------------------------------------

def train(args: argparse.Namespace, data) -> dict:
    """The whole run; returns the final metrics. Raises UsageError / TrainingError."""
    from ipu_sparse_ops import optimizers

    x_train, y_train, x_test, y_test = data
    if args.train_samples is not None:
        x_train, y_train = x_train[:args.train_samples], y_train[:args.train_samples]
    n_train = len(x_train)
    batches_per_epoch = n_train // args.batch_size
    if batches_per_epoch < args.steps_per_epoch:
        raise UsageError(f"{n_train} training images make {batches_per_epoch} batches of "
                         f"{args.batch_size}, fewer than --steps-per-epoch "
                         f"{args.steps_per_epoch}")
    plan = SegmentPlan(batches_per_epoch, args.steps_per_epoch, args.epochs)

    checkpoint = None
    if args.restore:
        checkpoint = read_checkpoint(args.checkpoint_path)
        if checkpoint is None:
            logger.warning("no checkpoint in %s yet: starting from scratch",
                           args.checkpoint_path)
        elif args.seed is None:
            args.seed = checkpoint[0]["config"]["seed"]
    if args.seed is None:
        args.seed = int(np.random.SeedSequence().entropy % 2**31)
        logger.info("seed %d (pass --seed %d to repeat this run)", args.seed, args.seed)
    config = run_config(args)

    rates = learning_rates(args.optimizer, args.batch_size)
    try:
        optimizer = optimizers.make_optimizer(args.optimizer, rates[0], **args.optimizer_options)
    except ValueError as e:
        raise UsageError(f"--optimizer-arg: {e}") from None
    model = Model(args, args.seed)
    optimizer.build(model.trainable_variables())
    # Shuffling and random regrowth; its state is part of every checkpoint.
    rng = np.random.default_rng(seed_sequence(args.seed, "host"))
    do_updates = bool(not args.disable_pruning and model.sparse_layers and plan.num_updates > 0)

    segments_done, perm = 0, None
    if checkpoint is not None:
        meta, arrays = checkpoint
        restore(meta, arrays, model, optimizer, config, args.checkpoint_path)
        segments_done = int(meta["segments_done"])
        rng.bit_generator.state = meta["rng_state"]
        perm = arrays["perm"]
        logger.info("restored %s after %d of %d Rig-L steps (training step %d)",
                    args.checkpoint_path, segments_done, plan.total_segments, meta["step"])
    for folder in (args.records_path, args.checkpoint_path):
        if folder is not None:
            remove_stale_temps(folder)
    if args.records_path is not None and segments_done == 0 and args.test_mode != "tests":
        write_record(args.records_path, 0, model.fc1)

    for name, layer in model.layers.items():
        logger.info("%s: %s %dx%d, %d of %d %s (density %.4f), capacity %s", name,
                    type(layer).__name__, layer.spec.input_size, layer.spec.output_size,
                    layer.nnz, layer.spec.input_blocks * layer.spec.output_blocks,
                    "elements" if layer.spec.block_size == 1
                    else f"{layer.spec.block_size}x{layer.spec.block_size} blocks",
                    layer.density, getattr(layer, "capacity", "-"))

    train_segment = make_train_segment(model, optimizer, plan, args.batch_size, x_train, y_train,
                                       rates, dense_grads=do_updates and args.regrow == "rigl",
                                       weight_decay=args.weight_decay)
    samples, train_seconds, update_seconds = 0, 0.0, 0.0
    epoch_seconds: dict[int, float] = {}
    segments = range(segments_done, plan.total_segments)
    if args.test_mode == "tests":
        segments = range(0)  # evaluate the restored (or initial) model only
    elif args.single_train_step_only:
        segments = segments[:1]
    for segment in segments:
        epoch, first, count = plan.segment(segment)
        step = plan.first_step(segment)
        if first == 0 or perm is None:
            perm = rng.permutation(n_train).astype(np.int32)
        update = do_updates and segment < plan.num_updates
        if args.single_train_step_only:
            count, update = 1, False
        started = time.perf_counter()
        done, loss_sum, correct, dense_grads = train_segment(
            perm, first, count, step, update and args.regrow == "rigl")
        done = int(done)
        if done < count:
            raise TrainingError(f"the loss became NaN/Inf at training step {step + done - 1} "
                                f"(epoch {epoch + 1})")
        moved = {}
        if update:
            update_started = time.perf_counter()
            moved = update_patterns(model, optimizer, [g.numpy() for g in dense_grads],
                                    segment, plan.num_updates, args, rng)
            update_seconds += time.perf_counter() - update_started
        elapsed = time.perf_counter() - started
        train_seconds += elapsed
        epoch_seconds[epoch] = epoch_seconds.get(epoch, 0.0) + elapsed
        samples += count * args.batch_size
        step += count
        if update and args.records_path is not None:
            write_record(args.records_path, segment + 1, model.fc1)  # named by Rig-L updates done
        logger.info(
            "Rig-L step %d/%d  epoch %d/%d  step %d/%d  lr %.3g  loss %.4f  acc %.3f%s  %.0f "
            "samples/s", segment + 1, plan.total_segments, epoch + 1, plan.epochs, step,
            plan.total_steps, learning_rate_at(step - 1, plan, rates), float(loss_sum) / count,
            int(correct) / (count * args.batch_size),
            "".join(f"  {name} moved {n}" for name, n in moved.items()),
            count * args.batch_size / elapsed)
        if args.single_train_step_only:
            logger.info("stopped after one training step (--single-train-step-only)")
            break
        last = segment + 1 == plan.total_segments
        if args.checkpoint_path is not None and ((segment + 1) % args.checkpoint_freq == 0
                                                 or last):
            save_checkpoint(args.checkpoint_path, model, optimizer, config, segment + 1, step,
                            perm, rng)

    test_loss = test_accuracy = None  # --test-mode training: no evaluation
    if args.test_mode != "training":
        test_loss, test_accuracy = (float(v) for v in make_evaluate(model, x_test, y_test)())
        if not math.isfinite(test_loss):
            raise TrainingError("the test loss is NaN/Inf; the weights have diverged")
    traces = train_segment.experimental_get_tracing_count()
    logger.debug("the training loop was traced %d time(s)", traces)
    return {"test_loss": test_loss, "test_accuracy": test_accuracy, "samples": samples,
            "train_seconds": train_seconds, "update_seconds": update_seconds,
            "epoch_seconds": epoch_seconds, "traces": traces}


def main(argv=None) -> int:
    args = parse_args(argv)
    # Progress goes to stdout: stderr is kept for the one line that explains a failure.
    handlers = [logging.StreamHandler(sys.stdout)]
    if args.log is not None:
        try:
            handlers.append(logging.FileHandler(args.log, mode="w"))
        except OSError as e:
            print(f"{PROG}: error: --log {args.log}: cannot write ({e.strerror or e})",
                  file=sys.stderr)
            return 1
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers)
    if args.ipu_only_given:
        logger.info("ignored on the CPU (IPU only): %s", ", ".join(args.ipu_only_given))
    try:
        data = load_mnist(args.data_dir)
        results = train(args, data)
    except (UsageError, TrainingError, MnistError, OSError) as e:
        return report_failure(PROG, e)
    if results["test_loss"] is not None:
        print(f"Test loss: {results['test_loss']:.3f} Test accuracy: "
              f"{results['test_accuracy']:.4f}")  # exact: 10,000 test images
    if results["samples"]:
        epochs = results["epoch_seconds"]
        print(f"Throughput: {results['samples'] / results['train_seconds']:.0f} samples/s "
              f"({results['samples']} samples in {results['train_seconds']:.1f} s; "
              f"{sum(epochs.values()) / len(epochs):.1f} s per epoch)")
        print(f"Host Rig-L updates: {results['update_seconds']:.2f} s "
              f"({100 * results['update_seconds'] / results['train_seconds']:.1f}% of training time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
