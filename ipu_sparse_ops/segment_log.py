"""`SegmentLog`: the training scripts' progress line, one per Rig-L segment of `model.fit`."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
from ipu_sparse_ops.tf_startup import tf  # noqa: F401 - before keras, which imports TensorFlow
import keras

from ipu_sparse_ops.training_run import TrainingError


class SegmentLog(keras.callbacks.Callback):
    """One log line per execution of the training loop: a Rig-L segment.

    `fit` runs `steps_per_execution` steps in one traced loop and reports
    running means over the epoch; the segment's own loss and accuracy are
    recovered from two consecutive means. Each segment's figures are kept
    in `records` and passed to `on_segment(record)`; a NaN/Inf loss
    raises TrainingError, so the run stops with one line.

    Args: batch_size, segments (Rig-L segments in the run), steps_per_segment,
    rigl (the run's `RigL` callback, listed before this one, or None),
    loss_key (the logged loss to report), tokens (per sample, for tokens/s),
    first_segment (of a resumed run), on_segment.
    """

    def __init__(self, *, batch_size: int, segments: int, steps_per_segment: int, rigl=None,
                 loss_key: str = "loss", tokens: int | None = None, first_segment: int = 0,
                 on_segment: Callable | None = None, logger=None):
        super().__init__()
        self.batch_size, self.segments, self.steps = batch_size, segments, steps_per_segment
        self.rigl, self.loss_key, self.tokens = rigl, loss_key, tokens
        self.segment, self.on_segment = first_segment, on_segment
        self.logger = logger or logging.getLogger(__name__)
        self.records: list[dict] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self._previous = epoch, (0, 0.0, 0.0)

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()
        self._updates_before = len(self.rigl.history) if self.rigl is not None else 0

    def on_train_batch_end(self, batch, logs=None):
        seconds = time.perf_counter() - self._started
        steps_before, loss_before, accuracy_before = self._previous
        steps = batch + 1 - steps_before
        loss_mean, accuracy_mean = float(logs[self.loss_key]), float(logs["accuracy"])
        loss = (loss_mean * (batch + 1) - loss_before * steps_before) / steps
        accuracy = (accuracy_mean * (batch + 1) - accuracy_before * steps_before) / steps
        samples = steps * self.batch_size  # a whole number of them were right
        accuracy = round(accuracy * samples) / samples
        self._previous = batch + 1, loss_mean, accuracy_mean
        self.segment += 1
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became NaN/Inf in Rig-L step {self.segment} "
                                f"(epoch {self.epoch + 1})")
        updates = self.rigl.history[self._updates_before:] if self.rigl is not None else []
        moved = {name: layer["moved"] for update in updates
                 for name, layer in update["layers"].items()}
        record = {"segment": self.segment, "epoch": self.epoch,
                  "step": int(self.model.optimizer.iterations.numpy()), "loss": loss,
                  "accuracy": accuracy, "samples": samples,
                  "seconds": seconds, "moved": moved,
                  "update_seconds": sum(update["seconds"] for update in updates),
                  "learning_rate": float(np.asarray(self.model.optimizer.learning_rate))}
        self.records.append(record)
        rate = record["samples"] / seconds
        self.logger.info(
            "Rig-L step %d/%d  epoch %d/%d  step %d  lr %.3g  loss %.4f  acc %.3f%s  "
            "%.0f samples/s%s", self.segment, self.segments, self.epoch + 1,
            self.params["epochs"], record["step"], record["learning_rate"], loss, accuracy,
            "".join(f"  {name} moved {n}" for name, n in moved.items()), rate,
            f"  {rate * self.tokens:.0f} tokens/s" if self.tokens else "")
        if self.on_segment is not None:
            self.on_segment(record)


def per_segment(inner: keras.callbacks.Callback, steps_per_segment: int):
    """`inner` handed only the batches that begin and end a Rig-L segment, so that a
    per-execution callback (SegmentLog) sees segments when each execution is one step
    (under a strategy of several replicas, see distribute.steps_per_execution)."""

    class PerSegment(keras.callbacks.Callback):
        def set_model(self, model):
            super().set_model(model)
            inner.set_model(model)

        def set_params(self, params):
            super().set_params(params)
            inner.set_params(params)

        def on_epoch_begin(self, epoch, logs=None):
            inner.on_epoch_begin(epoch, logs)

        def on_train_batch_begin(self, batch, logs=None):
            if batch % steps_per_segment == 0:
                inner.on_train_batch_begin(batch, logs)

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % steps_per_segment == 0:
                inner.on_train_batch_end(batch, logs)
    return PerSegment()
