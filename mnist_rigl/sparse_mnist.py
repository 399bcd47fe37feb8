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

With only the original's flags, the run is the original's: its defaults, its
learning-rate schedule, its records and checkpoints. This project's better
recipe is a few flags away (see `make mnist`).

Examples:
    python -m mnist_rigl.sparse_mnist --densities 0.1 0.3 --records-path rigl_records
    python -m mnist_rigl.sparse_mnist --restore 20240101-120000 --start-epoch 4
    python -m mnist_rigl.sparse_mnist --checkpoint-path ckpt --resume-latest

Runs are deterministic for a seed: shuffling and random regrowth come from a
seeded numpy generator, dropout from stateless random ops seeded by the step,
and `--resume-latest` after a kill ends bit for bit where the uninterrupted run ends.
"""

import sys
from pathlib import Path


import argparse
import contextlib
import datetime
import hashlib
import io
import json
import logging
import math
import time

import numpy as np

from ipu_sparse_ops import sparse_training
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
LR_PROGRESS = (0.2, 0.4, 0.6, 0.8)  # fractions of the epochs where the rate steps down
LR_VALUES = (0.02, 0.01, 0.005, 0.001, 0.0001)
ADAM_LR = 0.002  # Adam uses one constant rate (also scaled by 16 / batch size)
OPTIMIZERS = ("GradientDescent", "Momentum", "Adam")
# The original's optimizer options; --optimizer-arg overrides them one by one.
OPTIMIZER_DEFAULTS = {"Momentum": {"momentum": 0.0001, "use_nesterov": True}}
CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_VERSION = 2
RUN_NAME_FORMAT = "%Y%m%d-%H%M%S"  # a new run's checkpoint folder, as the original names it
RECORD_NAME = "weights_fc1_{step:06d}.npz"  # fc1's pattern (this project's record)
DENSE_RECORD_NAME = "weights_fc1_{step:06d}.npy"  # fc1's dense weight (the original's record)
PERMUTATION_FILE = "pixel_permutation.npy"
IMAGE_SHAPE = (28, 28)
# Flags that define the training trajectory: a checkpoint only resumes a run that agrees.
RUN_DEFINING_FLAGS = (
    "densities", "droprate", "weight_decay", "seed", "batch_size", "steps_per_epoch", "epochs",
    "disable_pruning", "regrow", "prune_ratio", "optimizer", "optimizer_options", "data_type",
    "block_size", "pooling_type", "hidden_size", "train_samples", "cosine_options",
    "permute_input", "gradient_accumulation_count", "batches_per_step_override")


# ---- command line ----------------------------------------------------------------------

def add_ipu_only_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("IPU-only flags of the original", IPU_ONLY + ".")
    group.add_argument("--partials-type", action=IpuOnlyFlag, choices=("fp32", "fp16"),
                       default="fp32", help="type of the matmuls' intermediate sums")
    group.add_argument("--disable-shared-buckets", action=IpuOnlyFlag, nargs=0, default=False,
                       help="no bucket sharing between the forward and backward passes")
    group.add_argument("--pipelining", action=IpuOnlyFlag, nargs=0, default=False,
                       help="pipeline the model over IPUs")
    group.add_argument("--pipeline-schedule", action=IpuOnlyFlag,
                       choices=("Grouped", "Interleaved", "Sequential"), default="Grouped",
                       help="order of the pipeline's forward and backward passes")
    group.add_argument("--on-demand", action=IpuOnlyFlag, nargs=0, default=False,
                       help="attach to the IPU only when it runs")
    parser.set_defaults(ipu_only_given=())


def optimizer_name(text: str) -> str:
    """'adam' -> 'Adam': the original's names, matched regardless of case."""
    return {name.lower(): name for name in OPTIMIZERS}.get(text.lower(), text)


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
                             "such as those from always-blank pixels, until Rig-L prunes them "
                             "(the original had none: 0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of everything random (default: drawn and logged; "
                             "a restored run takes its checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="training batch size (images per weight update)")
    parser.add_argument("--gradient-accumulation-count", type=int, default=1, metavar="N",
                        help="split each batch into N micro-batches and apply their averaged "
                             "gradient once (N must divide --batch-size)")
    parser.add_argument("--steps-per-epoch", type=int, default=5,
                        help="Rig-L steps (pattern updates) per epoch; the training steps "
                             "between two of them run in one traced loop")
    parser.add_argument("--batches-per-step-override", type=int, default=None, metavar="N",
                        help="train N batches per Rig-L step instead of an epoch's share; "
                             "an epoch is then --steps-per-epoch such steps, drawn from "
                             "back-to-back shuffled passes over the data")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="train on only the first N training images (quick runs)")
    parser.add_argument("--disable-pruning", action="store_true",
                        help="keep the initial random patterns (static sparsity)")
    parser.add_argument("--regrow", choices=("rigl", "random"), default="rigl",
                        help="where new connections grow: largest |dense gradient| (Rig-L) "
                             "or uniformly at random (SET)")
    parser.add_argument("--prune-ratio", type=float, default=0.3,
                        help="the largest fraction of a layer's connections one update moves; "
                             "--cosine-prune-schedule scales it down")
    parser.add_argument("--cosine-prune-schedule", default=json.dumps(
                            sparse_training.COSINE_DEFAULTS), metavar="JSON",
                        help="update t of T = steps-per-epoch x epochs (t = 1..T) moves "
                             "ceil(ceil(prune_ratio * nnz) * s) connections, s = 0 for "
                             "t < zero_steps, else 0.5 * (1 + cos(phase_delay + 2 pi * period * "
                             "(t - zero_steps) / (T - zero_steps))): phase_delay in radians, "
                             "period in whole cycles, so the last update moves nothing")
    parser.add_argument("--disable-dense-grad-override", action="store_true",
                        help="never compute the dense gradient in the training loop; it is "
                             "only computed for Rig-L regrowth anyway, which then cannot run")
    parser.add_argument("--block-size", type=int, choices=(1, 4, 8, 16), default=1,
                        help="block size of fc1 (fc2 stays element-wise)")
    parser.add_argument("--pooling-type", choices=("NONE", "AVG", "MAX", "SUM"), default="NONE",
                        help="how the op pools fc1's dense gradient over a block for Rig-L "
                             "(NONE: the full gradient reaches the host, which sums |g|)")
    parser.add_argument("--permute-input", choices=("none", "block", "random"), default="none",
                        help="a fixed permutation of the input pixels: block puts each "
                             "fc1 block's inputs on one tile of the image (4 pixels: 2x2, "
                             "8: 4x2, 16: 4x4), random shuffles them; saved as "
                             f"{PERMUTATION_FILE} in --records-path for the pictures")
    parser.add_argument("--data-type", choices=("fp32", "fp16"), default="fp32",
                        help="storage and compute type of the weights and activations")
    parser.add_argument("--optimizer", type=optimizer_name, choices=OPTIMIZERS,
                        default="Momentum", help="weight update rule")
    parser.add_argument("--optimizer-arg", action="append", default=[], metavar="NAME=JSON",
                        help="optimizer option, repeatable, e.g. use_nesterov=false or "
                             "momentum=0.9 (Momentum defaults: momentum=0.0001, "
                             "use_nesterov=true; Adam: beta1, beta2, epsilon)")
    parser.add_argument("--records-path", type=Path, default=None,
                        help="folder for fc1 before training and after every Rig-L update t: "
                             "its dense weight weights_fc1_<t>.npy (as the original) and its "
                             "pattern weights_fc1_<t>.npz, for visualise_connectivity.py")
    parser.add_argument("--checkpoint-path", type=Path, default=Path("checkpoints"),
                        help="folder of checkpoints, one sub-folder per run named by its "
                             "start time (written atomically)")
    parser.add_argument("--checkpoint-freq", type=int, default=1, metavar="EPOCHS",
                        help="checkpoint after epochs 1, 1 + N, 1 + 2N, ... and the last")
    parser.add_argument("--restore", default=None, metavar="NAME",
                        help="load the checkpoint of run NAME in --checkpoint-path (needs "
                             "--start-epoch) and keep checkpointing there")
    parser.add_argument("--start-epoch", type=int, default=None, metavar="N",
                        help="with --restore, the epoch where training and the learning-rate "
                             "and pruning schedules resume")
    parser.add_argument("--resume-latest", action="store_true",
                        help="continue the newest run in --checkpoint-path exactly where its "
                             "checkpoint left off, or start a new run if there is none (for "
                             "restart loops)")
    parser.add_argument("--data-dir", default=None,
                        help="read MNIST from the four IDX files here instead of the caches")
    parser.add_argument("--log-level", default="INFO",
                        choices=("NOTSET", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                        help="logging level")
    parser.add_argument("--log", type=Path, default=None, metavar="FILE",
                        help="write the table 'Iteration Density_<d1>_<d2>', then per Rig-L "
                             "step the batches trained so far and that step's training "
                             "accuracy (overwritten)")
    parser.add_argument("--test-mode", choices=("training", "tests", "all"), default="all",
                        help="train only (no test evaluation), test only (the restored "
                             "checkpoint, else the initial model), or both")
    parser.add_argument("--single-train-step-only", action="store_true",
                        help="stop after the first Rig-L step's training loop: no update, no "
                             "checkpoint, no test")
    parser.add_argument("--use-wandb", action="store_true",
                        help="log to Weights & Biases if the wandb package is installed "
                             "(WANDB_MODE=offline works without a network)")
    parser.add_argument("--wandb-project-name", default=None, help="wandb project (needed)")
    parser.add_argument("--wandb-tags", nargs="+", default=None, help="wandb run tags")
    parser.add_argument("--wandb-name", default=None, help="wandb run name")
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
    positive = ("hidden_size", "batch_size", "steps_per_epoch", "epochs", "checkpoint_freq",
                "gradient_accumulation_count")
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_samples", "batches_per_step_override"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size % args.gradient_accumulation_count:
        raise UsageError(f"--gradient-accumulation-count {args.gradient_accumulation_count} "
                         f"does not divide --batch-size {args.batch_size}")
    if not 0.0 <= args.droprate < 1.0:
        raise UsageError(f"--droprate must be in [0, 1), got {args.droprate:g}")
    if not 0.0 <= args.weight_decay < 1.0:
        raise UsageError(f"--weight-decay must be in [0, 1), got {args.weight_decay:g}")
    if not 0.0 <= args.prune_ratio <= 1.0:
        raise UsageError(f"--prune-ratio must be in [0, 1], got {args.prune_ratio:g}")
    try:
        args.cosine_options = sparse_training.cosine_options(args.cosine_prune_schedule)
    except ValueError as e:
        raise UsageError(f"--cosine-prune-schedule: {e}") from None
    updates = args.steps_per_epoch * args.epochs
    if args.cosine_options["zero_steps"] >= updates:
        raise UsageError(f"--cosine-prune-schedule: zero_steps {args.cosine_options['zero_steps']}"
                         f" leaves none of the {updates} Rig-L updates to prune")
    bs = args.block_size
    for name, size in (("784 inputs", INPUT_SIZE), (f"--hidden-size {args.hidden_size}",
                                                    args.hidden_size)):
        if size % bs:
            raise UsageError(f"--block-size {bs} does not divide {name}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if (args.disable_dense_grad_override and args.regrow == "rigl"
            and not args.disable_pruning):
        raise UsageError("--disable-dense-grad-override leaves Rig-L regrowth no gradient; "
                         "add --regrow random or --disable-pruning")
    if args.single_train_step_only and args.test_mode == "tests":
        raise UsageError("--single-train-step-only needs training; --test-mode tests has none")
    if args.use_wandb and not args.wandb_project_name:
        raise UsageError("--use-wandb needs --wandb-project-name")
    check_restore_args(args)
    trains = args.test_mode != "tests"
    if args.records_path is not None and trains:
        check_writable_dir(args.records_path, "--records-path")
    if trains and not args.single_train_step_only:
        check_writable_dir(args.checkpoint_path, "--checkpoint-path")
    # Last, as it imports TensorFlow: the optimizer and its options.
    try:
        from ipu_sparse_ops.optimizers import make_optimizer, parse_optimizer_args
    except ImportError as e:  # pragma: no cover - missing build
        raise UsageError(f"cannot import ipu_sparse_ops ({e}); run `make -j` first") from None
    try:
        given = parse_optimizer_args(args.optimizer_arg)
        if "learning_rate" in given:
            raise ValueError("the learning rate follows the built-in schedule and cannot be set")
        args.optimizer_options = {**OPTIMIZER_DEFAULTS.get(args.optimizer, {}), **given}
        make_optimizer(args.optimizer, 0.0, **args.optimizer_options)  # checks the options
    except ValueError as e:
        raise UsageError(f"--optimizer-arg: {e}") from None


def check_restore_args(args: argparse.Namespace) -> None:
    """--restore NAME needs --start-epoch and an existing checkpoint; --resume-latest neither."""
    if args.restore is not None and args.resume_latest:
        raise UsageError("--restore and --resume-latest exclude each other")
    if args.start_epoch is not None and args.restore is None:
        raise UsageError("--start-epoch needs --restore (the run to resume)")
    if args.restore is None:
        return
    if args.start_epoch is None:
        raise UsageError("--restore needs --start-epoch (where the learning-rate and pruning "
                         "schedules resume)")
    if not 0 <= args.start_epoch <= args.epochs:
        raise UsageError(f"--start-epoch must be in [0, --epochs {args.epochs}], "
                         f"got {args.start_epoch}")
    if not (args.checkpoint_path / args.restore / CHECKPOINT_JSON).is_file():
        raise UsageError(f"--restore: no checkpoint named {args.restore!r} in "
                         f"{args.checkpoint_path}")


# ---- schedule --------------------------------------------------------------------------

def learning_rate(optimizer: str, batch_size: int, epoch: int, epochs: int) -> float:
    """The original's rate for `epoch` (0-based): a step down at each LR_PROGRESS fraction of
    the epochs (Adam: one constant rate), scaled by 16 / batch size."""
    scale = REFERENCE_BATCH_SIZE / batch_size
    if optimizer == "Adam":
        return ADAM_LR * scale
    return LR_VALUES[sum(epoch / epochs >= p for p in LR_PROGRESS)] * scale


def segment_steps(plan: SegmentPlan, segment: int, batches_per_segment: int | None):
    """(first global training step, number of steps) of Rig-L step `segment`.

    By default the Rig-L steps of an epoch share its batches; with the
    original's --batches-per-step-override each is `batches_per_segment` long.
    """
    if batches_per_segment is not None:
        return segment * batches_per_segment, batches_per_segment
    return plan.first_step(segment), plan.segment(segment)[2]


class BatchOrder:
    """Which images each training step sees, drawn lazily from the host generator.

    Pass p over the training set is a fresh permutation, cut into
    `batches_per_pass` batches (the remainder is left out); global step g trains
    on batch g % batches_per_pass of pass g // batches_per_pass. A permutation is
    drawn when a step first needs it, so the generator's use (shared with random
    regrowth) depends only on the steps trained.
    """

    def __init__(self, n_train: int, batch_size: int, batches_per_pass: int,
                 rng: np.random.Generator):
        self.n_train, self.batch_size, self.batches_per_pass = n_train, batch_size, batches_per_pass
        self.rng = rng
        self.perms: dict[int, np.ndarray] = {}

    def window(self, first_step: int, count: int) -> tuple[np.ndarray, int]:
        """(image indices of the passes that steps first_step .. + count touch, the first
        step's batch within them): what the segment loop takes as `perm` and `first_batch`."""
        passes = range(first_step // self.batches_per_pass,
                       (first_step + count - 1) // self.batches_per_pass + 1)
        self.perms = {p: perm for p, perm in self.perms.items() if p >= passes[0]}
        for p in passes:
            if p not in self.perms:
                self.perms[p] = self.rng.permutation(self.n_train).astype(np.int32)
        used = self.batches_per_pass * self.batch_size
        window = np.concatenate([self.perms[p][:used] for p in passes])
        return window, first_step - passes[0] * self.batches_per_pass

    def state(self, next_step: int) -> dict[str, np.ndarray]:
        """The permutations drawn for steps from `next_step` on, for a checkpoint."""
        first = next_step // self.batches_per_pass
        return {f"perm/{p}": perm for p, perm in self.perms.items() if p >= first}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.perms = {int(key.split("/")[1]): value.astype(np.int32)
                      for key, value in arrays.items() if key.startswith("perm/")}


# ---- files -----------------------------------------------------------------------------

def pixel_permutation(mode: str, block_size: int, seed: int) -> np.ndarray:
    """The original's --permute-input: network input j is image pixel perm[j] (row-major).

    "block" orders the pixels tile by tile, each tile of block_size pixels
    (height the smallest power of two whose square reaches the block size, so
    16: 4x4, 8: 4x2, 4: 2x2), so that an fc1 block of block_size inputs sees
    one compact patch rather than a sliver of one image row. "random" is a
    seeded shuffle; "none" the identity.
    """
    rows, cols = IMAGE_SHAPE
    if mode == "random":
        return np.random.default_rng(seed_sequence(seed, "pixels")).permutation(rows * cols)
    if mode == "none":
        return np.arange(rows * cols)
    height = 1
    while height * height < block_size:
        height *= 2
    width = block_size // height
    pixels = np.arange(rows * cols).reshape(rows // height, height, cols // width, width)
    return pixels.transpose(0, 2, 1, 3).reshape(-1)


def write_record(folder: Path, updates: int, layer) -> None:
    """fc1 after `updates` Rig-L updates: its dense weight (the original's record) and its
    connections, just-grown zeros included (which the dense weight cannot show)."""
    triplets = layer.get_triplets()
    arrays = {"row_indices": triplets.row_indices, "col_indices": triplets.col_indices,
              "values": triplets.values}
    if layer.spec.block_size > 1:
        arrays["block_size"] = np.array(layer.spec.block_size)
    write_atomically(folder / RECORD_NAME.format(step=updates), lambda f: np.savez(f, **arrays))
    dense = layer.get_dense()
    write_atomically(folder / DENSE_RECORD_NAME.format(step=updates), lambda f: np.save(f, dense))


# ---- model -----------------------------------------------------------------------------

SEED_STREAMS = ("fc1", "fc2", "host", "pixels")  # independent streams from --seed


def seed_sequence(seed: int, stream: str) -> np.random.SeedSequence:
    """The numpy seed of one use of randomness: fc1/fc2 initialisation, the host
    generator that shuffles and regrows at random (whose state is checkpointed), or
    the --permute-input random permutation."""
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


def make_train_segment(model: Model, optimizer, batch_size: int, x_train, y_train,
                       learning_rate, dense_grads: bool, weight_decay: float,
                       accumulation: int = 1):
    """The segment loop (`training_run.make_segment_loop`) over this model's training step.

    `learning_rate` is a tf.Variable the host sets before each segment (the
    original fed it per device loop). Each step splits its batch into
    `accumulation` micro-batches and applies the mean of their gradients once.
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
    x_train = tf.convert_to_tensor(x_train)
    y_train = tf.convert_to_tensor(y_train.astype(np.int32))
    micro = batch_size // accumulation

    def micro_step(perm, start, dropout_step, compute_dense_grad):
        indices = perm[start:start + micro]
        x = normalised_batch(tf.gather(x_train, indices), dtype)
        labels = tf.gather(y_train, indices)
        with tf.GradientTape() as tape:
            tape.watch(anchors)
            logits = tf.cast(model(x, dropout_step, training=True,
                                   compute_dense_grad=compute_dense_grad), tf.float32)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.int32))
        return loss, correct, tape.gradient(loss, trainables + anchors)

    def step_fn(perm, batch, step, compute_dense_grad):
        loss, correct, grads = micro_step(perm, batch * batch_size, step * accumulation,
                                          compute_dense_grad)
        for m in range(1, accumulation):
            more = micro_step(perm, batch * batch_size + m * micro, step * accumulation + m,
                              compute_dense_grad)
            loss, correct = loss + more[0], correct + more[1]
            grads = [tf.convert_to_tensor(a) + tf.convert_to_tensor(b)
                     for a, b in zip(grads, more[2])]
        if accumulation > 1:
            loss = loss / accumulation
            grads = [g / tf.constant(accumulation, g.dtype) for g in grads]
        grads, anchor_grads = grads[:len(trainables)], grads[len(trainables):]
        if weight_decay:
            grads = [g + tf.constant(weight_decay, v.dtype) * v if decay else g
                     for g, v, decay in zip(grads, trainables, decayed)]
        optimizer.apply_gradients(zip(grads, trainables), learning_rate=learning_rate)
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

def update_patterns(model: Model, optimizer, dense_grads, t: int, T: int,
                    args: argparse.Namespace, rng: np.random.Generator) -> dict[str, int]:
    """Rig-L update t of T (t = 1..T) on every sparse layer; connections moved per layer.

    Each layer drops its --cosine-prune-schedule share of weakest connections
    and grows as many (`ipu_sparse_ops.rigl`); kept connections keep their
    values and optimizer slots, new ones start at zero. Every gradient is
    checked before any layer changes: NaN/Inf raises TrainingError with the
    model intact.
    """
    from ipu_sparse_ops import rigl

    prune_count = sparse_training.prune_schedule("cosine", **args.cosine_options)
    counts = {name: prune_count(t, T, args.prune_ratio, layer.nnz)
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
    return json.loads(json.dumps(config))  # tuples -> lists, as they come back from JSON


def new_run_folder(checkpoint_path: Path) -> Path:
    """checkpoint_path/<start time>, as the original names a run (-2, -3 ... if taken)."""
    name = datetime.datetime.now().strftime(RUN_NAME_FORMAT)
    folder, n = checkpoint_path / name, 1
    while folder.exists():
        n += 1
        folder = checkpoint_path / f"{name}-{n}"
    return folder


def latest_run_folder(checkpoint_path: Path) -> Path | None:
    """The run folder in checkpoint_path whose checkpoint was written last, if any."""
    runs = [json_path.parent for json_path in checkpoint_path.glob(f"*/{CHECKPOINT_JSON}")]
    return max(runs, key=lambda run: (run / CHECKPOINT_JSON).stat().st_mtime_ns, default=None)


def save_checkpoint(folder: Path, model: Model, optimizer, config: dict, segments_done: int,
                    step: int, order: BatchOrder, rng: np.random.Generator) -> None:
    """npz of arrays + JSON sidecar naming it (with its SHA-256); both written atomically.

    The npz goes first under a new name, then the JSON that points to it, so a
    kill at any moment leaves a JSON naming a complete npz.
    """
    folder.mkdir(parents=True, exist_ok=True)
    arrays = order.state(step)
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

def start_wandb(args: argparse.Namespace):
    """The wandb run of --use-wandb, or None (one log line) if wandb is not installed."""
    try:
        import wandb
    except ImportError:
        logger.warning("--use-wandb: the wandb package is not installed; nothing is logged "
                       "to Weights & Biases")
        return None
    config = {key: str(value) if isinstance(value, Path) else value
              for key, value in vars(args).items()}
    return wandb.init(project=args.wandb_project_name, name=args.wandb_name,
                      tags=args.wandb_tags, config=config)


def open_run(args: argparse.Namespace) -> tuple[Path, tuple[dict, dict] | None]:
    """The run's checkpoint folder and the checkpoint to start from (None: a fresh start)."""
    if args.restore is not None:
        folder = args.checkpoint_path / args.restore
        return folder, read_checkpoint(folder)
    if args.resume_latest:
        folder = latest_run_folder(args.checkpoint_path)
        if folder is not None:
            return folder, read_checkpoint(folder)
        logger.warning("no checkpoint in %s yet: starting a new run", args.checkpoint_path)
    return new_run_folder(args.checkpoint_path), None


def train(args: argparse.Namespace, data) -> dict:
    """The whole run; returns the final metrics. Raises UsageError / TrainingError."""
    from ipu_sparse_ops import optimizers
    from ipu_sparse_ops.tf_startup import tf

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
    T = plan.total_segments  # Rig-L steps, each followed by update t = 1..T

    run_folder, checkpoint = open_run(args)
    if checkpoint is not None and args.seed is None:
        args.seed = checkpoint[0]["config"]["seed"]
    if args.seed is None:
        args.seed = int(np.random.SeedSequence().entropy % 2**31)
        logger.info("seed %d (pass --seed %d to repeat this run)", args.seed, args.seed)
    config = run_config(args)

    permutation = pixel_permutation(args.permute_input, args.block_size, args.seed)
    if args.permute_input != "none":
        x_train = x_train.reshape(n_train, INPUT_SIZE)[:, permutation]
        x_test = x_test.reshape(len(x_test), INPUT_SIZE)[:, permutation]

    optimizer = optimizers.make_optimizer(args.optimizer, 0.0, **args.optimizer_options)
    model = Model(args, args.seed)
    optimizer.build(model.trainable_variables())
    # Shuffling and random regrowth; its state is part of every checkpoint.
    rng = np.random.default_rng(seed_sequence(args.seed, "host"))
    order = BatchOrder(n_train, args.batch_size, batches_per_epoch, rng)
    do_updates = bool(not args.disable_pruning and model.sparse_layers)

    segments_done = 0
    if checkpoint is not None:
        meta, arrays = checkpoint
        restore(meta, arrays, model, optimizer, config, run_folder)
        rng.bit_generator.state = meta["rng_state"]
        order.load_state(arrays)
        segments_done = int(meta["segments_done"])
        if args.restore is not None and args.start_epoch * plan.steps_per_epoch != segments_done:
            logger.warning("%s was saved after Rig-L step %d; resuming at epoch %d as asked",
                           run_folder, segments_done, args.start_epoch)
            segments_done = args.start_epoch * plan.steps_per_epoch
        logger.info("restored %s; resuming at Rig-L step %d of %d (epoch %d)", run_folder,
                    segments_done + 1, T, segments_done // plan.steps_per_epoch + 1)
    trains = args.test_mode != "tests"
    if trains and not args.single_train_step_only:
        remove_stale_temps(args.checkpoint_path)
        logger.info("checkpoints go to %s", run_folder)
    if args.records_path is not None and trains:
        remove_stale_temps(args.records_path)
        write_atomically(args.records_path / PERMUTATION_FILE, lambda f: np.save(f, permutation))
        if segments_done == 0:
            write_record(args.records_path, 0, model.fc1)

    for name, layer in model.layers.items():
        logger.info("%s: %s %dx%d, %d of %d %s (density %.4f), capacity %s", name,
                    type(layer).__name__, layer.spec.input_size, layer.spec.output_size,
                    layer.nnz, layer.spec.input_blocks * layer.spec.output_blocks,
                    "elements" if layer.spec.block_size == 1
                    else f"{layer.spec.block_size}x{layer.spec.block_size} blocks",
                    layer.density, getattr(layer, "capacity", "-"))

    want_grads = do_updates and args.regrow == "rigl"
    rate = tf.Variable(0.0, trainable=False, name="learning_rate")
    train_segment = make_train_segment(model, optimizer, args.batch_size, x_train, y_train,
                                       rate, dense_grads=want_grads,
                                       weight_decay=args.weight_decay,
                                       accumulation=args.gradient_accumulation_count)
    log_file = wandb_run = None
    if trains and args.log is not None:
        try:
            log_file = open(args.log, "w")  # noqa: SIM115 - written line by line, closed below
        except OSError as e:
            raise UsageError(f"--log {args.log}: cannot write ({e.strerror or e})") from None
        log_file.write(f"Iteration Density_{args.densities[0]}_{args.densities[1]}\n")
        log_file.flush()
    if args.use_wandb:
        wandb_run = start_wandb(args)
    try:
        results = run_segments(args, plan, model, optimizer, train_segment, rate, order, rng,
                               range(segments_done, T if trains else segments_done),
                               do_updates, run_folder, config, log_file, wandb_run)
        results["test_loss"] = results["test_accuracy"] = None
        if args.test_mode != "training" and not args.single_train_step_only:
            test_loss, test_accuracy = (float(v) for v in make_evaluate(model, x_test, y_test)())
            if not math.isfinite(test_loss):
                raise TrainingError("the test loss is NaN/Inf; the weights have diverged")
            results.update(test_loss=test_loss, test_accuracy=test_accuracy)
            if wandb_run is not None:
                wandb_run.summary["Test Loss"] = test_loss
                wandb_run.summary["Test Accuracy"] = test_accuracy
    finally:
        if log_file is not None:
            log_file.close()
        if wandb_run is not None:
            wandb_run.finish()
    results["traces"] = train_segment.experimental_get_tracing_count()
    results["run_folder"] = run_folder
    logger.debug("the training loop was traced %d time(s)", results["traces"])
    return results


def run_segments(args, plan, model, optimizer, train_segment, rate, order, rng, segments,
                 do_updates, run_folder, config, log_file, wandb_run) -> dict:
    """Train the Rig-L steps `segments`, each one traced loop then update t = segment + 1."""
    T = plan.total_segments
    samples, train_seconds, update_seconds = 0, 0.0, 0.0
    epoch_seconds: dict[int, float] = {}
    for segment in segments:
        epoch = segment // plan.steps_per_epoch
        step, count = segment_steps(plan, segment, args.batches_per_step_override)
        rate.assign(learning_rate(args.optimizer, args.batch_size, epoch, plan.epochs))
        perm, first = order.window(step, count)
        update = do_updates and not args.single_train_step_only
        started = time.perf_counter()
        done, loss_sum, correct, dense_grads = train_segment(
            perm, first, count, step, update and args.regrow == "rigl")
        done = int(done)
        if done < count:
            raise TrainingError(f"the loss became NaN/Inf at training step {step + done - 1} "
                                f"(epoch {epoch + 1})")
        elapsed = time.perf_counter() - started
        accuracy = int(correct) / (count * args.batch_size)
        samples += count * args.batch_size
        step += count
        if args.single_train_step_only:
            train_seconds += elapsed
            epoch_seconds[epoch] = elapsed
            logger.info("stopped after the first Rig-L step's %d training steps "
                        "(--single-train-step-only)", count)
            break
        moved, t = {}, segment + 1
        if update:
            update_started = time.perf_counter()
            moved = update_patterns(model, optimizer, [g.numpy() for g in dense_grads], t, T,
                                    args, rng)
            update_seconds += time.perf_counter() - update_started
            if args.records_path is not None:
                write_record(args.records_path, t, model.fc1)
        elapsed = time.perf_counter() - started
        train_seconds += elapsed
        epoch_seconds[epoch] = epoch_seconds.get(epoch, 0.0) + elapsed
        logger.info(
            "Rig-L step %d/%d  epoch %d/%d  step %d  lr %.3g  loss %.4f  acc %.3f%s  %.0f "
            "samples/s", t, T, epoch + 1, plan.epochs, step, float(rate.numpy()),
            float(loss_sum) / count, accuracy,
            "".join(f"  {name} moved {n}" for name, n in moved.items()),
            count * args.batch_size / elapsed)
        if log_file is not None:
            log_file.write(f"{step} {accuracy}\n")
            log_file.flush()
        if wandb_run is not None:
            if update:
                fraction = sparse_training.cosine_schedule(t, T, **args.cosine_options)
                wandb_run.log({"Prune Schedule": args.prune_ratio * fraction}, commit=False)
            wandb_run.log({"Loss": float(loss_sum) / count, "Accuracy": accuracy,
                           "Throughput": count * args.batch_size / elapsed}, commit=True)
        epoch_done, within = divmod(t, plan.steps_per_epoch)
        if within == 0 and ((epoch_done - 1) % args.checkpoint_freq == 0 or t == T):
            save_checkpoint(run_folder, model, optimizer, config, t, step, order, rng)
    return {"samples": samples, "train_seconds": train_seconds,
            "update_seconds": update_seconds, "epoch_seconds": epoch_seconds}


def main(argv=None) -> int:
    args = parse_args(argv)
    # Progress goes to stdout: stderr is kept for the one line that explains a failure.
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)], force=True)
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
