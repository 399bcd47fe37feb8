"""A small Rig-L fit under tf.distribute strategies, for tests/test_distribute.py.

    python tests/distribute_job.py OUT RUN [RUN ...]

RUN is none (one replica), mirrored (two logical CPUs of this process),
multi-worker (the cluster in TF_CONFIG, one CPU per worker), mirrored-corrupt
(mirrored, with replica 1's copy of fc1's pattern changed just before the
second update's check) or multi-worker-seeds (each worker draws its random
regrowth from its own seed). Each run trains the same model on the same global
batches and writes OUT-RUN.npz: after each Rig-L update each layer's pattern
and values on every local replica (<layer>_metainfo, <layer>_values:
[updates, local replicas, ...]), the traces of the training step after each
epoch, the fingerprints gathered last, and `error`, the PatternMismatchError's
message if the check failed.
"""

import os
import sys

import numpy as np

from ipu_sparse_ops import distribute

SAMPLES, FEATURES, CLASSES, BATCH = 256, 32, 4, 32
UPDATE_FREQ, EPOCHS = 4, 3  # 8 steps an epoch: updates at steps 4, 8, ..., 24
STRATEGIES: dict = {}


def run(kind: str, out: str) -> None:
    from ipu_sparse_ops.tf_startup import tf
    import keras
    from ipu_sparse_ops.keras import RigL, SeededDropout, SparseDense, WeightDecay

    base = kind.removesuffix("-corrupt").removesuffix("-seeds")
    if base not in STRATEGIES:  # one per process: a second one's collectives reuse keys
        STRATEGIES[base] = distribute.make_strategy(
            base, replicas=2, timeout_seconds=float(os.environ.get("PEER_TIMEOUT", 60)))
    strategy = STRATEGIES[base]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)  # a fixed task: labels from a random linear map
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((FEATURES, CLASSES)), axis=1).astype(np.int32)
    # Keras hands each replica its share of every global batch of the dataset (numpy
    # arrays fail under MultiWorkerMirroredStrategy); each worker shards by element.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).with_options(options)
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((FEATURES,)),
            # Pooled |g| is not linear in g: replicas must sum before pooling.
            SparseDense(64, 0.25, block_size=4, activation="relu", pooling="MAX", seed=1,
                        kernel_regularizer=WeightDecay(1e-2), name="fc1"),
            SeededDropout(0.0, seed=3, name="dropout"),
            SparseDense(CLASSES, 0.5, pooling="SUM", seed=2, name="fc2")])
        model.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      steps_per_execution=distribute.steps_per_execution(strategy, 2))
    seed_offset = strategy.cluster_resolver.task_id if kind.endswith("-seeds") else 0
    rigl = RigL(UPDATE_FREQ, prune_ratio=0.3,
                regrow="random" if kind.endswith("-seeds") else "rigl", seed=5 + seed_offset)
    layers = [model.get_layer("fc1"), model.get_layer("fc2")]
    recorded = {f"{layer.name}_{part}": [] for layer in layers for part in ("metainfo", "values")}
    traces = []

    def local_copies(variable):
        value = variable.value
        return [np.asarray(v) for v in getattr(value, "values", [value])]

    def record(batch, logs):
        if len(rigl.history) > len(recorded["fc1_metainfo"]):
            for layer in layers:
                recorded[f"{layer.name}_metainfo"].append(local_copies(layer.metainfo))
                recorded[f"{layer.name}_values"].append(local_copies(layer.nz_values))

    real_check = distribute.PatternCheck.check

    def corrupt_then_check(checker, when):
        if kind.endswith("-corrupt") and len(rigl.history) == 1:
            copy = layers[0].metainfo.value.values[1]
            broken = copy.numpy()
            broken[-1] += 1
            copy.assign(broken)
        real_check(checker, when)

    callbacks = [rigl, keras.callbacks.LambdaCallback(
        on_train_batch_end=record,
        on_epoch_end=lambda epoch, logs: traces.append(sum(l.traces for l in layers)))]
    error = ""
    distribute.PatternCheck.check = corrupt_then_check
    try:
        model.fit(batches, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks)
    except distribute.PatternMismatchError as e:
        error = str(e)
    finally:
        distribute.PatternCheck.check = real_check
    arrays = {key: np.array(value) for key, value in recorded.items()}
    worker = f"-{strategy.cluster_resolver.task_id}" if base == "multi-worker" else ""
    np.savez(f"{out}-{kind}{worker}.npz", traces=np.array(traces), error=error,
             replicas=strategy.num_replicas_in_sync, fingerprints=rigl.pattern_check.fingerprints(),
             steps=np.array([u["step"] for u in rigl.history]), **arrays)


def main() -> int:
    out, kinds = sys.argv[1], sys.argv[2:]
    if any(kind.startswith("mirrored") for kind in kinds):
        distribute.use_logical_cpus(2)  # before TensorFlow initialises
    for kind in kinds:
        run(kind, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
