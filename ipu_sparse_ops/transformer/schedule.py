"""`StepDecay`: a learning rate that steps down at given training steps, after a warm-up."""

from __future__ import annotations

from collections.abc import Sequence

from ipu_sparse_ops.tf_startup import tf  # before keras: it imports TensorFlow
import keras


@keras.saving.register_keras_serializable(package="ipu_sparse_ops.transformer")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """rates[i] from training step boundaries[i - 1] on, times min(1, (step + 1) / warmup_steps).

    `step` counts the updates applied before this one (the optimizer's
    iterations), so boundaries are the first steps of each later stage and
    warmup_steps 1 means none. A class rather than a callback so that the
    rate changes inside a traced multi-step execution and is saved with the
    optimizer.
    """

    def __init__(self, boundaries: Sequence[int], rates: Sequence[float],
                 warmup_steps: float = 1.0):
        if len(rates) != len(boundaries) + 1:
            raise ValueError(f"{len(boundaries)} boundaries need {len(boundaries) + 1} rates, "
                             f"got {len(rates)}")
        self.boundaries = [int(b) for b in boundaries]
        self.rates = [float(r) for r in rates]
        self.warmup_steps = float(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.int64)
        stage = tf.reduce_sum(tf.cast(step >= tf.constant(self.boundaries, tf.int64), tf.int32))
        rate = tf.gather(tf.constant(self.rates, tf.float32), stage)
        return rate * tf.minimum(1.0, tf.cast(step + 1, tf.float32) / self.warmup_steps)

    def get_config(self):
        return {"boundaries": self.boundaries, "rates": self.rates,
                "warmup_steps": self.warmup_steps}
