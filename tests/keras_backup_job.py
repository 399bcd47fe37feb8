"""A small Rig-L fit with keras.callbacks.BackupAndRestore, for the kill-and-restart test.

    python tests/keras_backup_job.py BACKUP_DIR RESULT.npz [EPOCHS]

Started again after a SIGKILL it resumes from the last finished epoch. It
writes the final pattern, values and test accuracy to RESULT.npz.
"""
import sys

import keras
import numpy as np
import tensorflow as tf

from ipu_sparse_ops.keras import RigL, SparseDense

SAMPLES, FEATURES, CLASSES = 2048, 64, 4


def main(backup_dir: str, result: str, epochs: int) -> None:
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)  # a fixed task: labels from a random linear map
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((FEATURES, CLASSES)), axis=1)
    model = keras.Sequential([keras.Input((FEATURES,)),
                              SparseDense(128, 0.2, activation="relu", seed=1),
                              SparseDense(CLASSES, 0.5, seed=2)])
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    rigl = RigL(8, regrow="random", seed=3)  # random regrowth: the rng must resume too
    model.fit(x[:1536], y[:1536], batch_size=32, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(backup_dir), rigl])
    _, accuracy = model.evaluate(x[1536:], y[1536:], verbose=0)
    first, second = model.layers
    np.savez(result, metainfo1=first.metainfo.numpy(), values1=first.nz_values.numpy(),
             metainfo2=second.metainfo.numpy(), values2=second.nz_values.numpy(),
             accuracy=accuracy)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 12)
