"""Sparse transformer encoder pieces as Keras layers on `SparseDense` (see `encoder`)."""

from ipu_sparse_ops.transformer.encoder import (  # noqa: F401
    Attention, GroupNorm, PositionCode, Settings, SplitQKV, TokenSum, classifier, embedding,
    encoder_layer, feed_forward, projection, projections, self_attention,
    sinusoidal_position_encoding)
from ipu_sparse_ops.transformer.schedule import StepDecay  # noqa: F401
