"""Train a two-layer MNIST network whose layers are genuinely sparse, rewired by Rig-L.

The model is 784 -> hidden (ReLU, bias) -> dropout -> 10 (bias), a Keras model
of `ipu_sparse_ops.keras.SparseDense` layers (a layer of density 1 is a plain
`Dense`), trained by `model.fit` with the `RigL` callback. An epoch is cut into
`--steps-per-epoch` Rig-L steps; the training steps of one run inside one
traced loop (`steps_per_execution`, the CPU stand-in for the IPU's device
iterations), and only the last of them computes the dense (or block-pooled)
gradient. After each, `RigL` prunes the weakest connections of every sparse
layer and regrows as many where that gradient is largest (Rig-L, Evci et al.
2020) or at random (SET), with the cosine-decayed count; the optimizer's
slots follow the new pattern.

With only the original's flags, the run is the original's: its defaults, its
learning-rate schedule, its records and checkpoints. This project's better
recipe is a few flags away (see `make mnist`).

Examples:
    python -m mnist_rigl.sparse_mnist --densities 0.1 0.3 --records-path rigl_records
    python -m mnist_rigl.sparse_mnist --restore 20240101-120000 --start-epoch 4
    python -m mnist_rigl.sparse_mnist --checkpoint-path ckpt --resume-latest

Runs are deterministic for a seed: batches come from shuffles keyed by (seed,
pass), random regrowth from draws keyed by (seed, update), dropout from a
counter saved with the model, so `--resume-latest` after a kill ends bit for
bit where the uninterrupted run ends.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ipu_sparse_ops import sparse_training
from ipu_sparse_ops.cli import ArgumentParser
from ipu_sparse_ops.ipu_only_flags import IPU_ONLY, IpuOnlyFlag
from ipu_sparse_ops.keras_optimizers import check_options, parse_optimizer_args
from ipu_sparse_ops.training_run import (
    TrainingError, UsageError, add_distribute_flags, batch_dataset, check_distribute_args,
    check_writable_dir, chief_folder, fit_errors, make_strategy, parse_flags, remove_stale_temps,
    report_failure, save_model_atomically, shard_batches, write_atomically)
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
CHECKPOINT_VERSION = 3  # 3: the model and its optimizer as a .keras file
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
    add_distribute_flags(parser)
    parser.add_argument("--backup-dir", type=Path, default=None,
                        help="keras.callbacks.BackupAndRestore's folder (with multi-worker, "
                             "one sub-folder per worker): a run killed and started again with "
                             "the same flags continues from its last finished epoch")
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
    """Check the flags before any data is loaded (and before TensorFlow is imported)."""
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
    # A restored run takes its checkpoint's seed.
    check_distribute_args(
        args, seed_known=args.seed is not None or args.restore is not None or args.resume_latest,
        micro_batch=args.batch_size // args.gradient_accumulation_count)
    trains = args.test_mode != "tests"
    if args.backup_dir is not None:
        if args.restore is not None or args.resume_latest:
            raise UsageError("--backup-dir resumes by itself; it excludes --restore and "
                             "--resume-latest")
        if args.seed is None:
            raise UsageError("--backup-dir needs --seed: a restarted run must draw what the "
                             "first one drew")
        check_writable_dir(args.backup_dir, "--backup-dir")
    if args.records_path is not None and trains:
        check_writable_dir(args.records_path, "--records-path")
    if trains and not args.single_train_step_only:
        check_writable_dir(args.checkpoint_path, "--checkpoint-path")
    try:
        given = parse_optimizer_args(args.optimizer_arg)
        if "learning_rate" in given:
            raise ValueError("the learning rate follows the built-in schedule and cannot be set")
        args.optimizer_options = {**OPTIMIZER_DEFAULTS.get(args.optimizer, {}), **given}
        check_options(args.optimizer, args.optimizer_options)
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


@dataclass(frozen=True)
class RunPlan:
    """How the flags cut the run into `fit` steps.

    A Rig-L step is `segment_batches` batches, as the original: an epoch's
    batches shared by --steps-per-epoch steps (the remainder left out), or
    --batches-per-step-override of them. With --gradient-accumulation-count N
    each batch is N micro-batches, and `fit` steps are micro-batches.
    """

    batch_size: int
    accumulation: int
    segment_batches: int
    segments_per_epoch: int
    epochs: int
    batches_per_pass: int  # batches cut from each shuffled pass over the data

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.accumulation

    @property
    def fit_steps_per_segment(self) -> int:
        return self.segment_batches * self.accumulation

    @property
    def fit_steps_per_epoch(self) -> int:
        return self.fit_steps_per_segment * self.segments_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.segment_batches * self.segments_per_epoch

    @property
    def total_segments(self) -> int:
        return self.segments_per_epoch * self.epochs


def run_plan(args: argparse.Namespace, n_train: int) -> RunPlan:
    batches_per_pass = n_train // args.batch_size
    if args.batches_per_step_override is not None:
        segment = args.batches_per_step_override
    else:
        segment = batches_per_pass // args.steps_per_epoch
        batches_per_pass = segment * args.steps_per_epoch
    if batches_per_pass < 1 or segment < 1:
        raise UsageError(f"{n_train} training images make {n_train // args.batch_size} batches "
                         f"of {args.batch_size}, fewer than --steps-per-epoch "
                         f"{args.steps_per_epoch}")
    return RunPlan(args.batch_size, args.gradient_accumulation_count, segment,
                   args.steps_per_epoch, args.epochs, batches_per_pass)


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


def layer_connections(layer):
    """(triplets, dense weight) of fc1, sparse or dense."""
    from ipu_sparse_ops.keras import SparseDense
    from ipu_sparse_ops.sparse import Triplets

    if isinstance(layer, SparseDense):
        return layer.get_triplets(), layer.get_dense()
    dense = layer.kernel.numpy()
    rows, cols = np.indices(dense.shape).reshape(2, -1)
    return Triplets(rows, cols, dense.reshape(-1)), dense


def write_record(folder: Path, updates: int, layer) -> None:
    """fc1 after `updates` Rig-L updates: its dense weight (the original's record) and its
    connections, just-grown zeros included (which the dense weight cannot show)."""
    triplets, dense = layer_connections(layer)
    arrays = {"row_indices": triplets.row_indices, "col_indices": triplets.col_indices,
              "values": triplets.values}
    block_size = getattr(layer, "block_size", 1)
    if block_size > 1:
        arrays["block_size"] = np.array(block_size)
    write_atomically(folder / RECORD_NAME.format(step=updates), lambda f: np.savez(f, **arrays))
    write_atomically(folder / DENSE_RECORD_NAME.format(step=updates), lambda f: np.save(f, dense))


# ---- model -----------------------------------------------------------------------------

# Independent streams from --seed (append only: an index fixes a stream's draws).
SEED_STREAMS = ("fc1", "fc2", "host", "pixels", "dropout", "regrow")


def seed_sequence(seed: int, stream: str) -> np.random.SeedSequence:
    """The numpy seed of one use of randomness: fc1/fc2 initialisation, the batch order
    ("host"), the --permute-input random permutation, dropout, random regrowth."""
    return np.random.SeedSequence(seed, spawn_key=(SEED_STREAMS.index(stream),))


def stream_seed(seed: int, stream: str) -> int:
    return int(seed_sequence(seed, stream).generate_state(1, np.uint64)[0] % 2 ** 63)


def build_model(args: argparse.Namespace, seed: int, steps_per_execution: int = 1):
    """standardise -> fc1 (ReLU, bias) -> dropout -> fc2 (bias), compiled for this run
    (`steps_per_execution`: the training steps of one Rig-L step)."""
    import keras
    from ipu_sparse_ops.keras import SeededDropout, SparseDense, WeightDecay
    from ipu_sparse_ops.keras_optimizers import make_optimizer

    dtype = {"fp32": "float32", "fp16": "float16"}[args.data_type]
    decay = WeightDecay(args.weight_decay) if args.weight_decay else None  # not the biases

    def fc(name, units, density, block_size, pooling, activation):
        if density < 1.0:
            return SparseDense(units, density, block_size=block_size, pooling=pooling,
                               activation=activation, seed=stream_seed(seed, name),
                               kernel_regularizer=decay, dtype=dtype, name=name)
        return keras.layers.Dense(
            units, activation=activation, dtype=dtype, name=name, kernel_regularizer=decay,
            kernel_initializer=keras.initializers.GlorotUniform(stream_seed(seed, name) % 2 ** 31))

    model = keras.Sequential([
        keras.Input((INPUT_SIZE,), dtype="uint8"),
        # In float32 even for fp16 layers, which take its output cast.
        keras.layers.Rescaling(1 / (255 * PIXEL_STD), offset=-PIXEL_MEAN / PIXEL_STD,
                               name="standardise"),
        fc("fc1", args.hidden_size, args.densities[0], args.block_size, args.pooling_type, "relu"),
        SeededDropout(args.droprate, stream_seed(seed, "dropout"), dtype=dtype, name="dropout"),
        fc("fc2", NUM_CLASSES, args.densities[1], 1, "NONE", None),
    ], name="sparse_mnist")
    first_rate = learning_rate(args.optimizer, args.batch_size, 0, args.epochs)
    optimizer = make_optimizer(args.optimizer, first_rate, dtype=dtype,
                               gradient_accumulation_steps=args.gradient_accumulation_count,
                               **args.optimizer_options)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer, cross_entropy, steps_per_execution=steps_per_execution, metrics=[
        "accuracy", keras.metrics.SparseCategoricalCrossentropy(from_logits=True,
                                                                name="cross_entropy")])
    model.optimizer.build(model.trainable_variables)
    return model


def describe(model) -> None:
    from ipu_sparse_ops.keras import SparseDense

    for layer in model.layers:
        if isinstance(layer, SparseDense):
            spec = layer.spec
            total = spec.input_blocks * spec.output_blocks
            unit = "elements" if spec.block_size == 1 else f"{spec.block_size}x{spec.block_size} blocks"
            logger.info("%s: SparseDense %dx%d, %d of %d %s (density %.4f), capacity %d",
                        layer.name, spec.input_size, spec.output_size, layer.nnz, total, unit,
                        layer.nnz / total, layer.capacity)
        elif layer.name.startswith("fc"):
            logger.info("%s: Dense %dx%d", layer.name, *layer.kernel.shape)


def evaluate(model, x_test, y_test) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole test set, without dropout."""
    results = model.evaluate(x_test, y_test.astype(np.int32), batch_size=1000, verbose=0,
                             return_dict=True)
    return float(results["cross_entropy"]), float(results["accuracy"])


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


def save_checkpoint(folder: Path, model, config: dict, epochs_done: int) -> None:
    """The model with its optimizer (.keras) + a JSON sidecar naming it, with its SHA-256.

    The .keras file goes first under a new name, then the JSON that points to
    it, so a kill at any moment leaves a JSON naming a complete model file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{epochs_done:04d}.keras"
    save_model_atomically(model, folder / name)
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    meta = {"version": CHECKPOINT_VERSION, "config": config, "epochs_done": epochs_done,
            "model": name, "sha256": digest}
    write_atomically(folder / CHECKPOINT_JSON,
                     lambda f: f.write(json.dumps(meta, indent=1).encode()))
    for old in folder.glob("checkpoint-*.keras"):
        if old.name != name:
            with contextlib.suppress(OSError):
                old.unlink()


def read_checkpoint(folder: Path) -> dict | None:
    """The metadata of the checkpoint in `folder`, None if there is none.

    Raises UsageError (one line) for a checkpoint that is unreadable or whose
    model file does not match its recorded SHA-256.
    """
    meta_path = folder / CHECKPOINT_JSON
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {meta.get('version')}, expected {CHECKPOINT_VERSION}")
        if Path(meta["model"]).name != meta["model"]:
            raise ValueError("model must name a file in the checkpoint folder")
        blob = (folder / meta["model"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ValueError(f"{meta['model']} does not match its recorded SHA-256")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"corrupt checkpoint in {folder}: {e}") from None
    return meta


def restore(meta: dict, model, config: dict, folder: Path) -> None:
    if meta["config"] != config:
        diffs = [f"{key}={meta['config'].get(key)!r} (now {value!r})"
                 for key, value in config.items() if meta["config"].get(key) != value]
        raise UsageError(f"checkpoint in {folder} belongs to another run: {', '.join(diffs)}")
    try:
        model.load_weights(folder / meta["model"])  # the optimizer's state included
    except Exception as e:  # noqa: BLE001 - any defect in the file is a corrupt checkpoint
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


def open_run(args: argparse.Namespace) -> tuple[Path, dict | None]:
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


class RunFiles:
    """What the run writes besides checkpoints, per Rig-L step: --log, records, wandb."""

    def __init__(self, args: argparse.Namespace, model, updates: bool):
        self.args, self.fc1, self.updates = args, model.get_layer("fc1"), updates
        self.log_file = self.wandb_run = None
        if args.log is not None:
            try:
                self.log_file = open(args.log, "w")  # noqa: SIM115 - closed by close()
            except OSError as e:
                raise UsageError(f"--log {args.log}: cannot write ({e.strerror or e})") from None
            self.log_file.write(f"Iteration Density_{args.densities[0]}_{args.densities[1]}\n")
            self.log_file.flush()
        if args.use_wandb:
            self.wandb_run = start_wandb(args)

    def on_segment(self, record: dict) -> None:
        args = self.args
        if self.updates and args.records_path is not None:
            write_record(args.records_path, record["segment"], self.fc1)
        if self.log_file is not None:
            self.log_file.write(f"{record['step']} {record['accuracy']}\n")
            self.log_file.flush()
        if self.wandb_run is not None:
            if self.updates:
                T = args.steps_per_epoch * args.epochs
                share = sparse_training.cosine_schedule(record["segment"], T,
                                                        **args.cosine_options)
                self.wandb_run.log({"Prune Schedule": args.prune_ratio * share}, commit=False)
            self.wandb_run.log({"Loss": record["loss"], "Accuracy": record["accuracy"],
                                "Throughput": record["samples"] / record["seconds"]},
                               commit=True)

    def close(self, test_loss=None, test_accuracy=None) -> None:
        if self.log_file is not None:
            self.log_file.close()
        if self.wandb_run is not None:
            if test_loss is not None:
                self.wandb_run.summary["Test Loss"] = test_loss
                self.wandb_run.summary["Test Accuracy"] = test_accuracy
            self.wandb_run.finish()


def backed_up_epochs(folder: Path) -> int:
    """The epochs done by the run keras.callbacks.BackupAndRestore backed up in `folder`
    (0 if none), so that the batches and logs resume where its weights do."""
    try:
        return int(json.loads((folder / "training_metadata.json").read_text())["epoch"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--backup-dir: {folder / 'training_metadata.json'} is unreadable "
                         f"({e})") from None


def train(args: argparse.Namespace, data, strategy=None) -> dict:
    """The whole run (under `strategy`, by default TensorFlow's default one); returns
    the final metrics. Raises UsageError / TrainingError."""
    from ipu_sparse_ops.tf_startup import tf
    import keras
    from ipu_sparse_ops import distribute
    from ipu_sparse_ops.keras import RigL, sparse_layers
    from ipu_sparse_ops.segment_log import SegmentLog, per_segment

    x_train, y_train, x_test, y_test = data
    if args.train_samples is not None:
        x_train, y_train = x_train[:args.train_samples], y_train[:args.train_samples]
    n_train = len(x_train)
    plan = run_plan(args, n_train)
    T = plan.total_segments  # Rig-L steps, each followed by update t = 1..T

    strategy = strategy or tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    run_folder, checkpoint = open_run(args)
    if checkpoint is not None and args.seed is None:
        args.seed = checkpoint["config"]["seed"]
    if args.seed is None:
        args.seed = int(np.random.SeedSequence().entropy % 2**31)
        logger.info("seed %d (pass --seed %d to repeat this run)", args.seed, args.seed)
    config = run_config(args)

    permutation = pixel_permutation(args.permute_input, args.block_size, args.seed)
    x_train = x_train.reshape(n_train, INPUT_SIZE)[:, permutation]
    x_test = x_test.reshape(len(x_test), INPUT_SIZE)[:, permutation]

    # Grappler's arithmetic optimizer regrouped chains of adds (weight decay into
    # the momentum update) one way in one trace and another way in the next, so a
    # seed's runs differed in the last bits and then grew apart.
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    per_execution = distribute.steps_per_execution(strategy, plan.fit_steps_per_segment)
    with strategy.scope():
        model = build_model(args, args.seed, per_execution)
    epochs_done = 0
    if checkpoint is not None:
        restore(checkpoint, model, config, run_folder)
        epochs_done = int(checkpoint["epochs_done"])
        if args.restore is not None and args.start_epoch != epochs_done:
            logger.warning("%s was saved after epoch %d; resuming at epoch %d as asked",
                           run_folder, epochs_done, args.start_epoch)
            epochs_done = args.start_epoch
            # RigL and the schedules read the step from here.
            model.optimizer.iterations.assign(epochs_done * plan.batches_per_epoch)
        logger.info("restored %s; resuming at Rig-L step %d of %d (epoch %d)", run_folder,
                    epochs_done * plan.segments_per_epoch + 1, T, epochs_done + 1)
    backup = None
    if args.backup_dir is not None:
        folder = args.backup_dir
        if args.distribute == "multi-worker":  # every worker saves (reads are collective)
            folder = folder / f"worker-{strategy.cluster_resolver.task_id}"
        backup = keras.callbacks.BackupAndRestore(str(folder))
        epochs_done = backed_up_epochs(folder)  # the data and logs resume there too
        if epochs_done:
            logger.info("%s holds a backup after epoch %d; resuming there", folder, epochs_done)
    trains = args.test_mode != "tests"
    if trains and not args.single_train_step_only and chief:
        remove_stale_temps(run_folder)  # what a killed save left, when resuming
        logger.info("checkpoints go to %s", run_folder)
    if args.records_path is not None and trains and chief:
        remove_stale_temps(args.records_path)
        write_atomically(args.records_path / PERMUTATION_FILE, lambda f: np.save(f, permutation))
        if epochs_done == 0:
            write_record(args.records_path, 0, model.get_layer("fc1"))
    describe(model)

    sparse = sparse_layers(model)
    updates = bool(not args.disable_pruning and sparse and not args.single_train_step_only)
    rigl_callback = RigL(plan.fit_steps_per_segment, prune_ratio=args.prune_ratio,
                         regrow=args.regrow, schedule="cosine",
                         cosine_options=args.cosine_options, seed=stream_seed(args.seed, "regrow"),
                         total_steps=T * plan.fit_steps_per_segment) if updates else None
    files = RunFiles(args, model, updates) if trains and chief else None
    log = SegmentLog(batch_size=plan.micro_batch, segments=T,
                     steps_per_segment=plan.fit_steps_per_segment, rigl=rigl_callback,
                     loss_key="cross_entropy", first_segment=epochs_done * plan.segments_per_epoch,
                     on_segment=files.on_segment if files and updates else None,
                     logger=logger)
    schedule = keras.callbacks.LearningRateScheduler(
        lambda epoch: learning_rate(args.optimizer, args.batch_size, epoch, args.epochs))

    def checkpoint_after(epoch, logs=None):
        done = epoch + 1
        if (done - 1) % args.checkpoint_freq == 0 or done == args.epochs:
            with chief_folder(run_folder, chief) as folder:  # every worker saves
                save_checkpoint(folder, model, config, done)

    segment_log = log
    if per_execution < plan.fit_steps_per_segment:
        log = per_segment(log, plan.fit_steps_per_segment)
    callbacks = [*([backup] if backup else []), schedule,
                 *([rigl_callback] if rigl_callback else []), log]
    if not args.single_train_step_only:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=checkpoint_after))
    dataset = batch_dataset(x_train, y_train.astype(np.int32), batch_size=plan.micro_batch,
                            batches_per_pass=plan.batches_per_pass * plan.accumulation,
                            seed=stream_seed(args.seed, "host"),
                            first_step=epochs_done * plan.fit_steps_per_epoch)
    dataset = shard_batches(dataset, args.distribute)
    # Traces of the training step: one at the first execution, and none after if
    # pattern updates never re-trace (counted before evaluate traces its own).
    traced = {}
    count_traces = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: traced.setdefault(
            "first", sum(layer.traces for layer in sparse)))
    results = {"test_loss": None, "test_accuracy": None, "traces": 0}
    try:
        if trains:
            epochs, steps = ((1, plan.fit_steps_per_segment) if args.single_train_step_only
                             else (args.epochs, plan.fit_steps_per_epoch))
            with fit_errors(args.distribute, resumes_with="--backup-dir"):
                model.fit(dataset, initial_epoch=0 if args.single_train_step_only else epochs_done,
                          epochs=epochs, steps_per_epoch=steps, verbose=0, shuffle=False,
                          callbacks=[*callbacks, count_traces])
            if sparse and "first" in traced:
                results["traces"] = 1 + sum(layer.traces for layer in sparse) - traced["first"]
            if args.single_train_step_only:
                logger.info("stopped after the first Rig-L step's %d training steps "
                            "(--single-train-step-only)", plan.segment_batches)
        if args.test_mode != "training" and not args.single_train_step_only:
            test_loss, test_accuracy = evaluate(model, x_test, y_test)
            if not math.isfinite(test_loss):
                raise TrainingError("the test loss is NaN/Inf; the weights have diverged")
            results.update(test_loss=test_loss, test_accuracy=test_accuracy)
    finally:
        if files is not None:
            files.close(results["test_loss"], results["test_accuracy"])
    records = segment_log.records
    epoch_seconds: dict[int, float] = {}
    for record in records:
        epoch_seconds[record["epoch"]] = epoch_seconds.get(record["epoch"], 0.0) + record["seconds"]
    steady = records[1:]  # this process's first Rig-L step also traces the training loop
    results.update(samples=sum(r["samples"] for r in records),
                   train_seconds=sum(r["seconds"] for r in records),
                   update_seconds=sum(r["update_seconds"] for r in records),
                   steady_samples=sum(r["samples"] for r in steady),
                   steady_seconds=sum(r["seconds"] for r in steady),
                   steady_update_seconds=sum(r["update_seconds"] for r in steady),
                   epoch_seconds=epoch_seconds, run_folder=run_folder, model=model)
    logger.debug("the training loop was traced %s time(s)", results["traces"])
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    # Progress goes to stdout: stderr is kept for the one line that explains a failure.
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)], force=True)
    if args.ipu_only_given:
        logger.info("ignored on the CPU (IPU only): %s", ", ".join(args.ipu_only_given))
    try:
        strategy = make_strategy(args, logger)
        data = load_mnist(args.data_dir)
        results = train(args, data, strategy)
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
    if results["steady_samples"]:
        print(f"Steady throughput: {results['steady_samples'] / results['steady_seconds']:.0f} "
              "samples/s after the first segment, which traces the loop (host Rig-L updates "
              f"{100 * results['steady_update_seconds'] / results['steady_seconds']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
