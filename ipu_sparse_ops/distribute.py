"""Data-parallel training on `tf.distribute`: the strategies, and one pattern on every replica.

Every replica (every device of every worker) holds its own copy of each
`SparseDense` pattern. `RigL` decides a new pattern on the host of every worker
from identical inputs (all-reduced gradients, identically seeded draws) and
assigns it to that worker's copies; `PatternCheck` proves the copies agree by
gathering a fingerprint of each copy from every replica at each update.

The strategies are TensorFlow's own: `MirroredStrategy` over several logical
CPU devices of one process, `MultiWorkerMirroredStrategy` over processes
described by `TF_CONFIG`, with CPU collectives over gRPC.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np

from ipu_sparse_ops.cluster import tf_config
from ipu_sparse_ops.tf_startup import tf

# The fingerprint is sum_i metainfo[i] * w_i mod P with fixed weights w_i in [1, P):
# P prime, so any change of one entry by less than P changes it. Every product
# stays below 2**62 and every partial sum below 2**63, so int64 never overflows.
_PRIME = 2_147_483_647  # 2**31 - 1
_WEIGHT_STEP = 1_103_515_245  # w_i = 1 + (i * step mod (P - 1)), i.e. spread over [1, P)

STRATEGIES = ("none", "mirrored", "multi-worker")


class PatternMismatchError(RuntimeError):
    """The replicas hold different patterns of a layer; the message names it."""


def use_logical_cpus(count: int) -> None:
    """Split the CPU into `count` logical devices, one replica each for `MirroredStrategy`.

    TensorFlow fixes its devices when it first initialises, so this must run
    before anything builds a tensor; raises RuntimeError otherwise.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError:
        raise RuntimeError(f"cannot split the CPU into {count} devices: TensorFlow was already "
                           "initialised in this process") from None


def fingerprint(metainfo) -> tf.Tensor:
    """An int64 in [0, 2**31 - 1): a cheap hash of an int32 pattern tensor of any shape."""
    flat = tf.cast(tf.reshape(metainfo, [-1]), tf.int64) % _PRIME
    index = tf.range(tf.size(flat, out_type=tf.int64), dtype=tf.int64)
    weights = 1 + (index * _WEIGHT_STEP) % (_PRIME - 1)
    return tf.reduce_sum((flat * weights) % _PRIME) % _PRIME


def fingerprint_numpy(metainfo: np.ndarray) -> int:
    """`fingerprint` in numpy (the tests' independent reference)."""
    flat = np.asarray(metainfo, np.int64).reshape(-1) % _PRIME
    weights = 1 + (np.arange(flat.size, dtype=np.int64) * _WEIGHT_STEP) % (_PRIME - 1)
    return int(np.sum((flat * weights) % _PRIME) % _PRIME)


class PatternCheck:
    """Gathers each replica's fingerprint of every layer's pattern and compares them.

    Under a strategy of several replicas, one traced function runs on every
    replica (of every worker: a collective all-gather) and reads that replica's
    own copy of each layer's `metainfo`. With one replica there is nothing to
    compare and `check` costs nothing.
    """

    def __init__(self, strategy, layers):
        self.strategy, self.layers = strategy, list(layers)
        self.replicas = strategy.num_replicas_in_sync
        self._gather = None
        if self.replicas > 1:
            variables = [layer.metainfo.value for layer in self.layers]

            def on_replica():
                return tf.stack([fingerprint(v.read_value()) for v in variables])[None]

            @tf.function
            def gather():
                return strategy.gather(strategy.run(on_replica), axis=0)
            self._gather = gather

    def fingerprints(self) -> np.ndarray:
        """[replicas, layers] int64: every replica's fingerprint of every layer."""
        if self._gather is None:
            return np.array([[fingerprint_numpy(layer.metainfo.numpy()) for layer in self.layers]])
        return self._gather().numpy()

    def check(self, when: str) -> None:
        """Raise PatternMismatchError naming the first layer whose replicas disagree."""
        if self._gather is None:
            return
        prints = self.fingerprints()
        for column, layer in enumerate(self.layers):
            values = prints[:, column]
            if (values != values[0]).any():
                differ = [int(r) for r in np.flatnonzero(values != values[0])]
                raise PatternMismatchError(
                    f"{layer.name}: the replicas hold different patterns {when} (replicas "
                    f"{differ} of {self.replicas} differ from replica 0's fingerprint)")


def steps_per_execution(strategy, wanted: int) -> int:
    """`wanted`, or 1 under a strategy of several replicas.

    Keras 3 runs steps_per_execution > 1 as a `tf.while_loop` whose body calls
    `strategy.run` inside a `tf.cond`; the optimizer's cross-replica merge
    there fails ("You must feed a value for placeholder tensor",
    keras-team/keras#19246), for a plain `Dense` model as for ours.
    """
    return wanted if strategy.num_replicas_in_sync == 1 else 1


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (checkpoints, records, summaries)."""
    return bool(strategy.extended.should_checkpoint)


def make_strategy(kind: str, *, replicas: int = 2, timeout_seconds: float = 60.0):
    """The strategy of `--distribute kind`: the default one, MirroredStrategy over
    `replicas` logical CPUs (call before TensorFlow initialises), or
    MultiWorkerMirroredStrategy over the cluster in `TF_CONFIG`.

    For multi-worker, `timeout_seconds` bounds how long a worker waits for its
    peers to join (a watchdog process then ends it with one line on stderr)
    and how long a peer may go silent mid-run (the coordination service's
    heartbeat timeout: the collectives then fail with an OpError on every
    other worker). Raises ValueError for a bad `kind`, replica count or TF_CONFIG.
    """
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        use_logical_cpus(replicas)
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices[:replicas])
    if kind != "multi-worker":
        raise ValueError(f"distribute must be one of {STRATEGIES}, got {kind!r}")
    config = tf_config()
    if config is None:
        raise ValueError("--distribute multi-worker needs TF_CONFIG (the cluster and this "
                         "worker's task)")
    _configure_coordination(config, timeout_seconds)
    _mend_keras_multi_worker()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    task = config["task"]
    peers = [address for job, addresses in config["cluster"].items() for i, address in
             enumerate(addresses) if (job, i) != (task["type"], int(task["index"]))]
    # Joining blocks in TensorFlow's C++ runtime, deaf to signals, for as long as a
    # peer is missing; the watchdog ends the process with one line instead.
    with _watchdog(timeout_seconds, f"{task['type']} {task['index']} could not reach its "
                                    f"peers {', '.join(peers)} within {timeout_seconds:g} s"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)  # all joined
    return strategy


# The watchdog: a separate process, since the blocked call holds Python's lock and
# ignores SIGTERM. It waits for a line on stdin; if none comes in time it writes
# the message and SIGKILLs the process it guards.
_WATCHDOG = """
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], seconds)[0]:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


@contextlib.contextmanager
def _watchdog(seconds: float, message: str):
    """SIGKILL this process, `message` on stderr, unless the block ends within `seconds`."""
    prog = os.path.basename(sys.argv[0]) or "python"
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds),
                                f"{prog}: error: {message}"], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        watcher.stdin.write(b"done\n")
        watcher.stdin.close()
        watcher.wait()


def _configure_coordination(config: dict, timeout_seconds: float) -> None:
    """The coordination service MultiWorkerMirroredStrategy would start, with timeouts.

    The strategy configures it itself with TensorFlow's defaults (workers wait
    an hour for each other) unless one is configured already.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    if context.context().coordination_service is not None:
        return
    cluster = config["cluster"]
    jobs = [name for name in ("chief", "worker") if name in cluster]
    leader = f"/job:{jobs[0]}/replica:0/task:0"
    milliseconds = int(timeout_seconds * 1000)
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=leader,
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=name,
                                                                  num_tasks=len(cluster[name]))
                          for name in jobs],
        cluster_register_timeout_in_ms=milliseconds, heartbeat_timeout_in_ms=milliseconds,
        shutdown_barrier_timeout_in_ms=milliseconds)


def _mend_keras_multi_worker() -> None:
    """Two mends to Keras 3's TensorFlow trainer, without which `fit` fails under
    MultiWorkerMirroredStrategy before its first step (Keras 3.15):

    - it builds a model made under a strategy from the mean of the replicas' first
      batches, handing the collective reduce a tuple of PerReplica values
      ("Attempt to convert a value (PerReplica ...)"); only shapes matter there,
      so this builds from this worker's first replica's batch;
    - it averages each step's logs with `strategy.reduce("MEAN", v, axis=0)`,
      which fails for the scalar logs every metric returns; this averages them
      over the replicas alone (axis None), as it does under MirroredStrategy.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src import tree

    if getattr(tf_trainer, "_ipu_sparse_ops_mended", False):
        return
    tf_trainer._ipu_sparse_ops_mended = True
    reduce_per_replica = tf_trainer.reduce_per_replica
    symbolic_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def multi_worker(strategy) -> bool:
        return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

    def mended_reduce(values, strategy, reduction):
        if not multi_worker(strategy) or reduction not in ("auto", "mean", "sum"):
            return reduce_per_replica(values, strategy, reduction)
        op = "SUM" if reduction == "sum" else "MEAN"  # with one device a worker's are tensors
        return tree.map_structure(
            lambda v: strategy.reduce(op, v, axis=None) if v is not None else v, values)

    def mended_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not multi_worker(strategy):
            return symbolic_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            first = next(batches)
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, first)
            break
        return symbolic_build(self, data_batch=data_batch)

    tf_trainer.reduce_per_replica = mended_reduce
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = mended_build
