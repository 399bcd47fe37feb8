"""What every training script shares: the batches of a Keras run, files written so
that a kill never leaves half of one, how a bad flag, bad input or failed run
reaches the user (one line on stderr; exit status 2 or 1), and the flags and
plumbing of data-parallel training on tf.distribute."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

TEMP_PREFIX = ".partial-"  # temp files beside their target; never loaded


class UsageError(Exception):
    """A bad flag or input (data, checkpoint); the message is one line for the user.

    Shared so that the helpers below can raise it and every script reports it
    the same way: `<script>: error: <message>` on stderr, exit status 2.
    """


class TrainingError(Exception):
    """Training cannot go on (NaN loss, NaN/Inf gradient); one line for the user."""


def batch_dataset(x, y, *, batch_size: int, batches_per_pass: int, seed: int,
                  first_step: int = 0):
    """An endless tf.data dataset of (x, y) training batches, the same for a seed on every run.

    Pass p over the data is a stateless shuffle keyed by (seed, p), cut into
    its first `batches_per_pass` batches; global step g trains on batch
    g % batches_per_pass of pass g // batches_per_pass. A run resumed at step
    `first_step` therefore sees exactly the batches the uninterrupted run saw,
    with no shuffling state to save.
    """
    from ipu_sparse_ops.tf_startup import tf

    n = len(x)
    if batches_per_pass * batch_size > n:
        raise ValueError(f"{batches_per_pass} batches of {batch_size} need more than {n} samples")
    x, y = tf.constant(x), tf.constant(y)
    first_pass, skip = divmod(first_step, batches_per_pass)
    seed = tf.constant(seed % 2 ** 63, tf.int64)

    def batches_of_pass(p):
        # One gather a pass, not one a batch: a per-batch map costs tf.data a function
        # call per step, which at batch 2 was a fifth of the transformer's step time.
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([seed, p]))
        used = tf.reshape(order[:batches_per_pass * batch_size], (batches_per_pass, batch_size))
        return tf.data.Dataset.from_tensor_slices((tf.gather(x, used), tf.gather(y, used)))

    passes = tf.data.Dataset.range(first_pass, 2 ** 62).flat_map(batches_of_pass)
    return passes.skip(skip).prefetch(2)


def save_model_atomically(model, path: Path) -> None:
    """`model.save` (a .keras file, optimizer included) to a temp file beside `path`, renamed."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX + path.stem, suffix=".keras")
    os.close(fd)
    try:
        model.save(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def steps_per_segment(n_train: int, batch_size: int, segments_per_epoch: int) -> int:
    """Training steps of one Rig-L segment: an epoch's batches shared equally (the
    remainder left out), so that `fit` runs every segment as one execution of that
    many steps. Raises UsageError when the epoch has fewer batches than segments."""
    steps = n_train // batch_size // segments_per_epoch
    if steps < 1:
        raise UsageError(f"{n_train} training images make {n_train // batch_size} batches of "
                         f"{batch_size}, fewer than --steps-per-epoch {segments_per_epoch}")
    return steps


def save_model_with_sidecar(model, path: Path, sidecar: dict) -> None:
    """The model as the .keras file `path`, then `sidecar` plus the file's SHA-256 as the
    JSON beside it (`path` with suffix .json), both atomically: a kill leaves either the
    old pair or a JSON that names a complete model."""
    path = Path(path)
    save_model_atomically(model, path)
    meta = {**sidecar, "model": path.name, "sha256": _sha256(path)}
    write_atomically(path.with_suffix(".json"),
                     lambda f: f.write(json.dumps(meta, indent=1).encode()))


def read_sidecar(path: Path) -> dict:
    """The JSON `save_model_with_sidecar` wrote beside the .keras file `path`, checked
    against the file's SHA-256. Raises FileNotFoundError if either file is missing and
    ValueError if the JSON is unreadable or the model file does not match it."""
    path = Path(path)
    text = path.with_suffix(".json").read_text()
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        meta = json.loads(text)
        digest = meta["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path.with_suffix('.json').name} is not a sidecar ({e})") from None
    if _sha256(path) != digest:
        raise ValueError(f"{path.name} does not match the SHA-256 recorded beside it")
    return meta


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_atomically(path: Path, write: Callable, mode: int | None = None) -> None:
    """Call write(binary file) on a temp file beside `path`, then rename it into place.

    The file gets permissions `mode`, by default those of a plainly created
    file (0666 less the umask) rather than mkstemp's 0600.
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX + path.name)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files `write_atomically` left in `folder` when a run was killed.

    They are never loaded (only a renamed, complete file is); this only tidies.
    """
    for stale in Path(folder).glob(TEMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def check_writable_dir(path: Path, flag: str) -> None:
    """Create folder `path` if needed and make (and drop) a file in it.

    Called while the flags are checked, so that a run that could not save its
    records or checkpoints fails before training rather than after it.
    Raises UsageError naming `flag` if the folder cannot be made or written.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=TEMP_PREFIX):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path} is not a writable folder ({e.strerror or e})") from None


def report_failure(prog: str, error: Exception) -> int:
    """Print the one stderr line that explains why a run stopped; return its exit status.

    A TrainingError reads `<prog>: training stopped: ...`, anything else
    `<prog>: error: ...`. The status is 2 for a UsageError, as for a bad flag,
    and 1 otherwise (unreadable data, a file that cannot be written, a
    diverged run), so a caller can tell "fix the command" from "it failed".
    """
    if isinstance(error, TrainingError):
        print(f"{prog}: training stopped: {error}", file=sys.stderr)
        return 1
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2 if isinstance(error, UsageError) else 1


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                check: Callable[[argparse.Namespace], None]) -> argparse.Namespace:
    """Parse `argv`, then run the script's own checks, `check(args)`, on the result.

    A UsageError from `check` leaves through `parser.error`, so a value that
    argparse accepts but the script rejects is reported exactly like a bad
    flag (with `ipu_sparse_ops.cli.ArgumentParser`: one line on stderr, status 2).
    """
    args = parser.parse_args(argv)
    try:
        check(args)
    except UsageError as e:
        parser.error(str(e))
    return args


# ---- data-parallel training (tf.distribute) --------------------------------------------

def add_distribute_flags(parser: argparse.ArgumentParser) -> None:
    """--distribute, --replicas and --peer-timeout, as every training script takes them."""
    parser.add_argument("--distribute", choices=("none", "mirrored", "multi-worker"),
                        default="none",
                        help="data-parallel training with tf.distribute: mirrored over "
                             "--replicas logical CPUs of this process, or multi-worker over "
                             "the processes TF_CONFIG describes (one per machine, each "
                             "started with the same flags); --batch-size is the global batch")
    parser.add_argument("--replicas", type=int, default=2,
                        help="with --distribute mirrored, the logical CPU devices (replicas)")
    parser.add_argument("--peer-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="with --distribute multi-worker, how long a worker waits for its "
                             "peers to join before it fails")


def check_distribute_args(args: argparse.Namespace, *, seed_known: bool,
                          micro_batch: int | None = None) -> None:
    """--distribute's needs: replicas that share the batch evenly, a TF_CONFIG, one seed.

    Sets `args.replica_count` (1 without a strategy). `seed_known`: every worker
    will draw from the same seed (given, or a checkpoint's). `micro_batch`: what
    each step trains when --batch-size is cut into micro-batches (default: the batch).
    Raises UsageError; reads TF_CONFIG without importing TensorFlow.
    """
    from ipu_sparse_ops.cluster import tf_config

    args.replica_count = 1
    if args.distribute == "mirrored":
        if args.replicas < 1:
            raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
        args.replica_count = args.replicas
    elif args.distribute == "multi-worker":
        try:
            config = tf_config()
        except ValueError as e:
            raise UsageError(str(e)) from None
        if config is None:
            raise UsageError("--distribute multi-worker needs TF_CONFIG: the cluster and this "
                             "worker's task")
        args.replica_count = sum(len(tasks) for job, tasks in config["cluster"].items()
                                 if job in ("chief", "worker"))
        if not seed_known:
            raise UsageError("--distribute multi-worker needs --seed: every worker must "
                             "draw the same model")
        if not args.peer_timeout > 0:
            raise UsageError(f"--peer-timeout must be > 0, got {args.peer_timeout:g}")
    step_batch = args.batch_size if micro_batch is None else micro_batch
    if step_batch % args.replica_count:
        per = "" if micro_batch is None else f" (per micro-batch {micro_batch})"
        raise UsageError(f"--batch-size {args.batch_size}{per} does not split evenly over "
                         f"{args.replica_count} replicas")


def make_strategy(args: argparse.Namespace, logger):
    """--distribute's strategy, made before anything initialises TensorFlow's devices.

    Raises UsageError (one line) when it cannot be made; logs the replicas to `logger`.
    """
    from ipu_sparse_ops import distribute

    try:
        strategy = distribute.make_strategy(args.distribute, replicas=args.replicas,
                                            timeout_seconds=args.peer_timeout)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--distribute {args.distribute}: {e}") from None
    if strategy.num_replicas_in_sync > 1:
        logger.info("--distribute %s: %d replicas, global batch %d", args.distribute,
                    strategy.num_replicas_in_sync, args.batch_size)
    return strategy


def shard_batches(dataset, distribute: str):
    """`dataset` of global batches; under multi-worker each worker keeps its share of
    every one (AutoShardPolicy.DATA) rather than tf.data's default split by file."""
    if distribute != "multi-worker":
        return dataset
    from ipu_sparse_ops.tf_startup import tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@contextlib.contextmanager
def fit_errors(distribute: str, resumes_with: str | None = None):
    """`model.fit`'s failures as one-line TrainingErrors: a NaN/Inf gradient, replicas
    whose patterns differ and, under multi-worker, a peer that died or hung (it aborts
    the collectives on every other worker). `resumes_with`: the flag that lets a
    restarted job go on, named in that last message."""
    from ipu_sparse_ops.tf_startup import tf
    from ipu_sparse_ops import distribute as dist, rigl

    try:
        yield
    except (rigl.NonFiniteGradientError, dist.PatternMismatchError) as e:
        raise TrainingError(str(e)) from None
    except tf.errors.OpError as e:
        if distribute != "multi-worker":
            raise
        lines = [line.strip() for line in e.message.splitlines() if line.strip()]
        cause = next((line for line in lines if "aborted by:" in line), lines[0])
        again = f" (with {resumes_with} the run resumes)" if resumes_with else ""
        raise TrainingError(f"the cluster failed ({cause.split('aborted by: ')[-1]}); "
                            f"start every worker again{again}") from None


@contextlib.contextmanager
def chief_folder(folder: Path | None, chief: bool):
    """Where this worker saves: `folder` on the chief, a temporary folder (removed
    after) on the others, which must save too, since saving reads the replica-local
    variables collectively (as Keras documents for multi-worker training)."""
    if chief:
        yield folder
        return
    with tempfile.TemporaryDirectory() as temp:
        yield Path(temp)
