"""Sparse transformer encoder pieces built on `SparseFcLayer` (see `encoder`)."""

from ipu_sparse_ops.transformer.encoder import (  # noqa: F401
    EncoderLayer, FeedForward, GroupNorm, SelfAttention, SequenceClassifier, SparsityConfig,
    TokenEmbedding, TokenLinear, TokenSumOutput, child_seed, dropout, fold_seed,
    sinusoidal_position_encoding)
