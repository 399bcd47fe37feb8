"""A transformer encoder whose projections are `ipu_sparse_ops.keras.SparseDense` layers.

The pieces are functions that add layers to a Keras functional graph, so a
whole model, or one part of it (the numerics tool's feed-forward block,
attention or encoder layer), is a plain `keras.Model`: `model.fit` trains it
with the `RigL` callback, `.keras` files save it, and `keras.to_dense` gives
its dense twin. Every projection is a `SparseDense` (a plain `Dense` at
density 1); attention scores, softmax and context stay dense.

- `embedding`: a fixed sinusoidal position code, group-normed, added to the
  input features, dropout, then a projection in -> hidden with bias.
- `self_attention`: q, k, v (heads * qkv_length each, by default one
  concatenated projection) and an output projection, without biases by
  default, around dense scaled dot-product attention.
- `feed_forward`: hidden -> ff (bias, GELU), dropout, ff -> hidden (bias).
- `GroupNorm`: layer norm as a group norm with one group over each token's
  features, gamma initialised to 0.1 (so new branches start small), beta to 0.
- `encoder_layer`: pre-norm, x + drop(attn(norm(x))) then x + drop(ffn(norm(x))).
- `classifier`: the whole model used on MNIST rows, logits summed over tokens.

Sizes that are not a multiple of the block size are padded by `SparseDense`
itself. In float16 the norms, the softmax and the token sum run in float32.
Dropout is `SeededDropout`, one per site, each with its own seed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from ipu_sparse_ops.tf_startup import tf  # before keras: it imports TensorFlow
import keras

from ipu_sparse_ops.keras import SeededDropout, SparseDense
from ipu_sparse_ops.sparse import BLOCK_SIZES, DATA_TYPES, POOLING_TYPES

PACKAGE = "ipu_sparse_ops.transformer"


@dataclass(frozen=True)
class Settings:
    """What every part of a model shares.

    Attributes:
        sparsity: fraction of (block) weights that are zero; 0 makes every
            projection a plain `Dense` that Rig-L leaves alone.
        block_size: 1 for element-wise, else 4, 8 or 16.
        data_type: "fp32" or "fp16".
        pooling_type: how the dense gradient is pooled over a block for Rig-L.
        seed: the weights' and dropout masks' seed; each layer derives its own.
        dropout_rate: of every dropout site (0: none).
    """

    sparsity: float = 0.9
    block_size: int = 1
    data_type: str = "fp32"
    pooling_type: str = "NONE"
    seed: int = 0
    dropout_rate: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.data_type not in DATA_TYPES:
            raise ValueError(f"data_type must be one of {tuple(DATA_TYPES)}, "
                             f"got {self.data_type!r}")
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, "
                             f"got {self.pooling_type!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    @property
    def dtype(self) -> str:
        return "float16" if self.data_type == "fp16" else "float32"

    def seed_of(self, name: str) -> int:
        """A process-stable seed for the layer called `name` (crc32 of it, not hash())."""
        sequence = np.random.SeedSequence(self.seed, spawn_key=(zlib.crc32(name.encode()),))
        return int(sequence.generate_state(1, np.uint32)[0] >> 1)


def projection(x, units: int, settings: Settings, name: str, *, use_bias: bool,
               activation=None, init_scale: float = 1.0):
    """[..., in] -> [..., units]: a `SparseDense`, or a `Dense` at density 1.

    `init_scale` multiplies the initial weights (the token-summed head uses 1 / tokens).
    """
    seed = settings.seed_of(name)
    if settings.sparsity > 0.0:
        layer = SparseDense(units, 1.0 - settings.sparsity, block_size=settings.block_size,
                            pooling=settings.pooling_type, activation=activation,
                            use_bias=use_bias, seed=seed, dtype=settings.dtype, name=name)
    else:
        layer = keras.layers.Dense(units, activation=activation, use_bias=use_bias,
                                   kernel_initializer=keras.initializers.GlorotUniform(seed),
                                   dtype=settings.dtype, name=name)
    y = layer(x)
    if init_scale != 1.0:
        weight = layer.nz_values if isinstance(layer, SparseDense) else layer.kernel
        weight.assign(weight * init_scale)
    return y


def dropout(x, settings: Settings, name: str):
    """`SeededDropout` with the site's own seed; the identity without dropout."""
    if settings.dropout_rate == 0.0:
        return x
    return SeededDropout(settings.dropout_rate, settings.seed_of(name), dtype=settings.dtype,
                         name=name)(x)


def sinusoidal_position_encoding(length: int, width: int) -> np.ndarray:
    """[length, width] float32: sin(p / 10000^(2i/width)) at column 2i, cos at 2i + 1."""
    position = np.arange(length, dtype=np.float64)[:, None]
    pair = np.arange(0, width, 2, dtype=np.float64)[None, :]
    angle = position / np.power(10000.0, pair / width)
    encoding = np.zeros((length, width))
    encoding[:, 0::2] = np.sin(angle)
    encoding[:, 1::2] = np.cos(angle[:, :width // 2])
    return encoding.astype(np.float32)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupNorm(keras.layers.Layer):
    """Group norm with one group over the features of each token (i.e. a layer norm).

    y = gamma * (x - mean) / sqrt(var + epsilon) + beta, mean and var over the
    last axis, computed in float32. gamma starts at 0.1, beta at 0.
    """

    def __init__(self, epsilon: float = 1e-5, gamma_init: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.epsilon, self.gamma_init = float(epsilon), float(gamma_init)

    def build(self, input_shape):
        width = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(width,),
                                     initializer=keras.initializers.Constant(self.gamma_init))
        self.beta = self.add_weight(name="beta", shape=(width,), initializer="zeros")

    def call(self, x):
        x32 = tf.cast(x, tf.float32)
        mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
        normed = (x32 - mean) * tf.math.rsqrt(variance + self.epsilon)
        y = normed * tf.cast(self.gamma, tf.float32) + tf.cast(self.beta, tf.float32)
        return tf.cast(y, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "gamma_init": self.gamma_init}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionCode(keras.layers.Layer):
    """x + norm(sinusoidal position code of x's width), as in Graphcore's original.

    The code goes through a trainable group norm (gamma 0.1) so that it starts
    small beside pixels in [0, 1].
    """

    def __init__(self, max_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.max_tokens = int(max_tokens)
        self.norm = GroupNorm(dtype=self.dtype_policy, name="position_norm")

    def build(self, input_shape):
        self.code = sinusoidal_position_encoding(self.max_tokens, input_shape[-1])
        self.norm.build(self.code.shape)

    def call(self, x):
        code = tf.constant(self.code, self.compute_dtype)[:tf.shape(x)[1]]
        return x + self.norm(code)

    def get_config(self):
        return {**super().get_config(), "max_tokens": self.max_tokens}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Attention(keras.layers.Layer):
    """Dense multi-head attention of given q, k, v [batch, tokens, heads * qkv_length].

    scores q k^T / sqrt(qkv_length), softmax over the keys (in float32),
    context = scores v per head, heads concatenated again.
    """

    def __init__(self, heads: int, qkv_length: int, **kwargs):
        super().__init__(**kwargs)
        if heads < 1 or qkv_length < 1:
            raise ValueError(f"heads and qkv_length must be positive, got {heads}, {qkv_length}")
        self.heads, self.qkv_length = int(heads), int(qkv_length)

    def _split_heads(self, x):
        shape = tf.shape(x)
        x = tf.reshape(x, [shape[0], shape[1], self.heads, self.qkv_length])
        return tf.transpose(x, [0, 2, 1, 3])  # [batch, heads, tokens, qkv_length]

    def call(self, q, k, v):
        shape = tf.shape(q)
        q, k, v = (self._split_heads(part) for part in (q, k, v))
        scores = tf.matmul(q, k, transpose_b=True)
        scores = tf.cast(scores, tf.float32) * (1.0 / math.sqrt(self.qkv_length))
        weights = tf.cast(tf.nn.softmax(scores, axis=-1), v.dtype)
        context = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])
        return tf.reshape(context, [shape[0], shape[1], self.heads * self.qkv_length])

    def get_config(self):
        return {**super().get_config(), "heads": self.heads, "qkv_length": self.qkv_length}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SplitQKV(keras.layers.Layer):
    """The concatenated projection's output as its three column thirds: q, k, v."""

    def call(self, qkv):
        return tuple(tf.split(qkv, 3, axis=-1))


@keras.saving.register_keras_serializable(package=PACKAGE)
class TokenSum(keras.layers.Layer):
    """[batch, tokens, classes] -> [batch, classes], summed in this layer's (float32) dtype."""

    def call(self, x):
        return tf.reduce_sum(x, axis=1)


def embedding(x, hidden: int, max_tokens: int, settings: Settings, name: str = "embedding"):
    """[batch, tokens, in] -> [batch, tokens, hidden]: position code, dropout, projection."""
    x = PositionCode(max_tokens, dtype=settings.dtype, name=f"{name}_position")(x)
    x = dropout(x, settings, f"{name}_dropout")
    return projection(x, hidden, settings, f"{name}_projection", use_bias=True)


def self_attention(x, heads: int, qkv_length: int, settings: Settings, name: str, *,
                   concat_qkv: bool = True, bias: bool = False):
    """Attention with q, k, v and output projections (`bias`: all four get one).

    With `concat_qkv` (the original's default) q, k and v are the three thirds
    of one projection hidden -> 3 * heads * qkv_length ("<name>_qkv"): one op
    call instead of three, and Rig-L moves connections between them.
    """
    width = heads * qkv_length
    if concat_qkv:
        qkv = projection(x, 3 * width, settings, f"{name}_qkv", use_bias=bias)
        q, k, v = SplitQKV(dtype=settings.dtype, name=f"{name}_split")(qkv)
    else:
        q, k, v = (projection(x, width, settings, f"{name}_{part}", use_bias=bias)
                   for part in ("q", "k", "v"))
    context = Attention(heads, qkv_length, dtype=settings.dtype, name=f"{name}_scores")(q, k, v)
    return projection(context, x.shape[-1], settings, f"{name}_out", use_bias=bias)


def feed_forward(x, ff: int, settings: Settings, name: str):
    """hidden -> ff (bias, GELU), dropout, ff -> hidden (bias)."""
    h = projection(x, ff, settings, f"{name}_fc1", use_bias=True, activation="gelu")
    h = dropout(h, settings, f"{name}_dropout")
    return projection(h, x.shape[-1], settings, f"{name}_fc2", use_bias=True)


def encoder_layer(x, heads: int, qkv_length: int, ff: int, settings: Settings, name: str, *,
                  concat_qkv: bool = True, attention_bias: bool = False):
    """Pre-norm encoder layer: x + drop(attention(norm(x))), then x + drop(ffn(norm(x)))."""
    normed = GroupNorm(dtype=settings.dtype, name=f"{name}_attention_norm")(x)
    branch = self_attention(normed, heads, qkv_length, settings, f"{name}_attention",
                            concat_qkv=concat_qkv, bias=attention_bias)
    x = keras.layers.Add(dtype=settings.dtype, name=f"{name}_attention_residual")(
        [x, dropout(branch, settings, f"{name}_attention_dropout")])
    normed = GroupNorm(dtype=settings.dtype, name=f"{name}_ffn_norm")(x)
    branch = feed_forward(normed, ff, settings, f"{name}_ffn")
    return keras.layers.Add(dtype=settings.dtype, name=f"{name}_ffn_residual")(
        [x, dropout(branch, settings, f"{name}_ffn_residual_dropout")])


def classifier(*, tokens: int, in_features: int, classes: int, hidden: int, heads: int,
               qkv_length: int, ff: int, settings: Settings, num_layers: int = 1,
               concat_qkv: bool = True, attention_bias: bool = False,
               name: str = "sparse_transformer") -> keras.Model:
    """uint8 images [batch, tokens, in_features] -> float32 logits [batch, classes].

    Pixels / 255, the embedding, `num_layers` encoder layers, and a projection
    to the classes (no bias) summed over the tokens. Its initial weights are
    scaled by 1 / tokens, so the summed logits start at the size of one
    token's (a sum of 28 Glorot-sized projections starts at logits of +-40,
    and the first hundreds of steps would go into shrinking them).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    images = keras.Input((tokens, in_features), dtype="uint8", name="images")
    x = keras.layers.Rescaling(1 / 255, name="pixels")(images)  # float32, cast by the next
    x = embedding(x, hidden, tokens, settings)
    for i in range(num_layers):
        x = encoder_layer(x, heads, qkv_length, ff, settings, f"encoder{i}",
                          concat_qkv=concat_qkv, attention_bias=attention_bias)
    per_token = projection(x, classes, settings, "head_projection", use_bias=False,
                           init_scale=1.0 / tokens)
    logits = TokenSum(dtype="float32", name="token_sum")(per_token)
    return keras.Model(images, logits, name=name)


def projections(model: keras.Model) -> list:
    """The model's projection layers (SparseDense or Dense), in build order."""
    return [layer for layer in model.layers
            if isinstance(layer, (SparseDense, keras.layers.Dense))]
