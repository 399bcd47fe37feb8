"""A transformer encoder whose projections are dynamic sparse matmuls.

Every weight matrix is a `TokenLinear`: one `SparseFcLayer` applied to each
token (the tokens of a batch are flattened into the op's batch dimension), or,
with `SparsityConfig(dense=True)`, a `DenseFcLayer` holding exactly the same
weights densified, which is how the numerics tool builds its reference twin.
Attention scores, softmax and context stay dense.

Pieces (each a Keras layer, all built eagerly):

- `TokenEmbedding`: a fixed sinusoidal position code, group-normed, added to
  the input features, then a sparse projection in -> hidden with bias.
- `SelfAttention`: sparse q, k, v (heads * qkv_length each, by default one
  concatenated matmul) and output projections, without biases by default;
  dense scaled dot-product attention between them.
- `FeedForward`: sparse hidden -> ff (bias), GELU, dropout, sparse ff -> hidden (bias).
- `GroupNorm`: layer norm as a group norm with one group over each token's
  features, gamma initialised to 0.1 (so new branches start small), beta to 0.
- `EncoderLayer`: pre-norm, x + drop(attn(norm(x))) then x + drop(ffn(norm(x))).
- `TokenSumOutput`: sparse hidden -> classes (no bias) summed over the tokens.
- `SequenceClassifier`: the whole model used on MNIST rows.

Sizes that are not a multiple of the block size are padded up: the input
gets zero features and the surplus outputs are dropped, so the padding never
carries a gradient and Rig-L never grows into it. The part of a block that
lies in the padding starts at zero and stays there; `padded_real_elements()`
lets `rigl.rigl_update` compare such blocks per real element.

Every call takes `compute_dense_grad` (a Python or tensor bool, see
`SparseFcLayer`) and `dropout_seed` (None: no dropout; else a [2] int tensor
for stateless dropout, folded per site so runs are reproducible). In float16
the norms, the softmax and the token sum are computed in float32.

`named_sparse_layers()` lists every `SparseFcLayer` of a block under a path
like "encoder0/attention/qkv", the names Rig-L and checkpoints use;
`trainable_variables_list()` lists the `tf.Variable`s an optimizer trains.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import keras
import numpy as np
from ipu_sparse_ops.tf_startup import tf

from ipu_sparse_ops.layers import DenseFcLayer, SparseFcLayer, random_glorot_triplets
from ipu_sparse_ops.sparse import (
    BLOCK_SIZES, DATA_TYPES, POOLING_TYPES, MatmulSpec, Triplets, capacity_for_density,
    dense_from_triplets)


@dataclass(frozen=True)
class SparsityConfig:
    """How every projection of a model is built.

    Attributes:
        sparsity: fraction of (block) weights that are zero; 0 makes dense layers
            that Rig-L leaves alone.
        block_size: 1 for element-wise, else 4, 8 or 16.
        data_type: "fp32" or "fp16".
        pooling_type: how the dense gradient is pooled over a block ("NONE" keeps
            the full gradient).
        dense: build the dense twin: `DenseFcLayer`s holding the same weights,
            zeros included (the reference of the numerics tool).
    """

    sparsity: float = 0.9
    block_size: int = 1
    data_type: str = "fp32"
    pooling_type: str = "NONE"
    dense: bool = False

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

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def tf_dtype(self) -> tf.DType:
        return tf.float16 if self.data_type == "fp16" else tf.float32


def child_seed(seed, name: str) -> np.random.SeedSequence:
    """An independent, process-stable seed for the part called `name` (crc32, not hash())."""
    if not isinstance(seed, np.random.SeedSequence):
        seed = np.random.SeedSequence(seed)
    return np.random.SeedSequence(seed.entropy,
                                  spawn_key=tuple(seed.spawn_key) + (zlib.crc32(name.encode()),))


def fold_seed(seed, name: str):
    """A distinct stateless-random seed for one dropout site, or None when seed is None."""
    if seed is None:
        return None
    return tf.random.experimental.stateless_fold_in(
        tf.cast(seed, tf.int64), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def dropout(x, keep_prob: float, seed):
    """Stateless inverted dropout; the identity when seed is None or keep_prob is 1."""
    if seed is None or keep_prob >= 1.0:
        return x
    keep = tf.random.stateless_uniform(tf.shape(x), seed=seed) < keep_prob
    return tf.where(keep, x / tf.cast(keep_prob, x.dtype), tf.zeros_like(x))


def sinusoidal_position_encoding(length: int, width: int) -> np.ndarray:
    """[length, width] float32: sin(p / 10000^(2i/width)) at column 2i, cos at 2i + 1."""
    position = np.arange(length, dtype=np.float64)[:, None]
    pair = np.arange(0, width, 2, dtype=np.float64)[None, :]
    angle = position / np.power(10000.0, pair / width)
    encoding = np.zeros((length, width))
    encoding[:, 0::2] = np.sin(angle)
    encoding[:, 1::2] = np.cos(angle[:, :width // 2])
    return encoding.astype(np.float32)


def round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


class _Block(keras.layers.Layer):
    """A layer made of named parts; walks them for sparse layers and trainable variables."""

    def __init__(self, config: SparsityConfig, name: str | None):
        super().__init__(name=name, dtype=config.tf_dtype.name)
        self.config = config
        self._parts: dict[str, keras.layers.Layer] = {}

    def _add_part(self, name: str, part):
        self._parts[name] = part
        setattr(self, name, part)  # tracked by Keras
        return part

    def named_leaves(self) -> dict[str, "TokenLinear | GroupNorm"]:
        """Every TokenLinear and GroupNorm inside, by path ("attention/q"), in build order."""
        found = {}
        for name, part in self._parts.items():
            if isinstance(part, _Block):
                found.update({f"{name}/{sub}": leaf for sub, leaf in part.named_leaves().items()})
            else:
                found[name] = part
        return found

    def named_linears(self) -> dict[str, "TokenLinear"]:
        """Every TokenLinear inside, by path."""
        return {name: leaf for name, leaf in self.named_leaves().items()
                if isinstance(leaf, TokenLinear)}

    def padded_real_elements(self) -> dict[str, np.ndarray]:
        """`TokenLinear.real_elements()` of every sparse layer whose sizes were padded."""
        return {name: lin.real_elements() for name, lin in self.named_linears().items()
                if isinstance(lin.fc, SparseFcLayer)
                and (lin.spec.input_size, lin.spec.output_size) != (lin.in_features,
                                                                    lin.out_features)}

    def named_sparse_layers(self) -> dict[str, SparseFcLayer]:
        """Every SparseFcLayer inside (the layers Rig-L updates), by path."""
        return {name: lin.fc for name, lin in self.named_linears().items()
                if isinstance(lin.fc, SparseFcLayer)}

    def trainable_variables_list(self) -> list[tf.Variable]:
        """The tf.Variables an optimizer trains, in a fixed order."""
        variables = []
        for leaf in self.named_leaves().values():
            variables.extend(leaf.trainable_variables_list())
        return variables

    def state(self) -> dict[str, np.ndarray]:
        """Every weight (patterns included) as numpy arrays keyed "path/name", for checkpoints."""
        return {f"{path}/{key}": value for path, leaf in self.named_leaves().items()
                for key, value in leaf.state().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state()` returned; ValueError for a missing or misshapen entry."""
        for path, leaf in self.named_leaves().items():
            prefix = f"{path}/"
            part = {key[len(prefix):]: value for key, value in state.items()
                    if key.startswith(prefix)}
            missing = sorted(set(leaf.state()) - set(part))
            if missing:
                raise ValueError(f"the state lacks {prefix}{missing[0]}")
            leaf.load_state(part)


class TokenLinear(keras.layers.Layer):
    """[..., in_features] -> [..., out_features] through one sparse (or dense twin) matmul.

    The weight is drawn once from `seed`: a uniformly random pattern holding
    `density` of the (block) positions of the padded [in, out] matrix, with
    Glorot-uniform values widened for the density (`random_glorot_triplets`)
    times `init_scale`, and zero wherever a block reaches into the padding. The dense twin
    (`config.dense`) holds that matrix densified.

    Attributes:
        fc: the SparseFcLayer (or DenseFcLayer) on the padded sizes.
        spec: its MatmulSpec.
    """

    def __init__(self, in_features: int, out_features: int, config: SparsityConfig, *,
                 use_bias: bool, seed, init_scale: float = 1.0, name: str | None = None):
        super().__init__(name=name, dtype=config.tf_dtype.name)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"sizes must be positive, got {in_features} -> {out_features}")
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        bs = config.block_size
        in_padded, out_padded = round_up(in_features, bs), round_up(out_features, bs)
        count, capacity = capacity_for_density(in_padded // bs, out_padded // bs, config.density)
        pooling = "NONE" if config.dense else config.pooling_type
        self.spec = MatmulSpec(in_padded, out_padded, capacity, bs, config.data_type, pooling)
        triplets = self._zero_padding(random_glorot_triplets(self.spec, count=count, seed=seed))
        if init_scale != 1.0:
            triplets = triplets._replace(
                values=(triplets.values * init_scale).astype(triplets.values.dtype))
        if config.dense or config.density == 1.0:
            self.fc = DenseFcLayer(self.spec, dense_from_triplets(self.spec, triplets),
                                   use_bias=use_bias, name="fc")
        else:
            self.fc = SparseFcLayer(self.spec, triplets, use_bias=use_bias, name="fc")
        self.built = True

    def _zero_padding(self, triplets: Triplets) -> Triplets:
        """Zero the part of each block that lies beyond the real input or output size."""
        bs = self.spec.block_size
        if bs == 1:
            return triplets
        rows = triplets.row_indices[:, None] * bs + np.arange(bs)[None, :]
        cols = triplets.col_indices[:, None] * bs + np.arange(bs)[None, :]
        inside = (rows < self.in_features)[:, :, None] & (cols < self.out_features)[:, None, :]
        return triplets._replace(values=np.where(inside, triplets.values, 0).astype(
            triplets.values.dtype))

    def call(self, x, compute_dense_grad=False):
        x = tf.convert_to_tensor(x, self.compute_dtype)
        lead = tf.shape(x)[:-1]
        flat = tf.reshape(x, [-1, self.in_features])
        if self.spec.input_size > self.in_features:
            flat = tf.pad(flat, [[0, 0], [0, self.spec.input_size - self.in_features]])
        y = self.fc(flat, compute_dense_grad=compute_dense_grad)
        if self.spec.output_size > self.out_features:
            y = y[:, :self.out_features]
        y = tf.reshape(y, tf.concat([lead, [self.out_features]], axis=0))
        if x.shape.rank is not None:
            y.set_shape(x.shape[:-1].concatenate([self.out_features]))
        return y

    def trainable_variables_list(self) -> list[tf.Variable]:
        fc = self.fc
        weight = fc.nz_values if isinstance(fc, SparseFcLayer) else fc.kernel
        return [weight] + ([fc.bias] if fc.bias is not None else [])

    def real_elements(self) -> np.ndarray:
        """[input_blocks, output_blocks]: how many elements of each block are not padding."""
        bs = self.spec.block_size
        rows = np.clip(self.in_features - np.arange(self.spec.input_blocks) * bs, 0, bs)
        cols = np.clip(self.out_features - np.arange(self.spec.output_blocks) * bs, 0, bs)
        return np.outer(rows, cols)

    def state(self) -> dict[str, np.ndarray]:
        return self.fc.state()

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.fc.load_state(state)

    def dense_weight(self) -> np.ndarray:
        """The current weight as a dense [in_features, out_features] array (padding cut off)."""
        return self.fc.get_dense()[:self.in_features, :self.out_features]


class GroupNorm(keras.layers.Layer):
    """Group norm with one group over the features of each token (i.e. a layer norm).

    y = gamma * (x - mean) / sqrt(var + epsilon) + beta, mean and var over the
    last axis, computed in float32. gamma starts at 0.1, beta at 0.
    """

    def __init__(self, width: int, config: SparsityConfig, *, epsilon: float = 1e-5,
                 gamma_init: float = 0.1, name: str | None = None):
        super().__init__(name=name, dtype=config.tf_dtype.name)
        self.epsilon = epsilon
        self._gamma = self.add_weight(name="gamma", shape=(width,), dtype=config.tf_dtype.name,
                                      initializer=keras.initializers.Constant(gamma_init))
        self._beta = self.add_weight(name="beta", shape=(width,), dtype=config.tf_dtype.name,
                                     initializer="zeros")
        self.gamma = self._gamma.value
        self.beta = self._beta.value
        self.built = True

    def call(self, x):
        x32 = tf.cast(x, tf.float32)
        mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
        normed = (x32 - mean) * tf.math.rsqrt(variance + self.epsilon)
        y = normed * tf.cast(self.gamma, tf.float32) + tf.cast(self.beta, tf.float32)
        return tf.cast(y, self.compute_dtype)

    def trainable_variables_list(self) -> list[tf.Variable]:
        return [self.gamma, self.beta]

    def state(self) -> dict[str, np.ndarray]:
        return {"gamma": self.gamma.numpy(), "beta": self.beta.numpy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for key, variable in (("gamma", self.gamma), ("beta", self.beta)):
            value = np.asarray(state[key])
            if value.shape != tuple(variable.shape):
                raise ValueError(f"{key} has shape {value.shape}, expected {tuple(variable.shape)}")
            variable.assign(value.astype(variable.dtype.as_numpy_dtype))


class TokenEmbedding(_Block):
    """[batch, tokens, in] -> [batch, tokens, hidden]: x + norm(position code), dropout,
    then a sparse projection with bias.

    As in Graphcore's original, the position code has the input's width and
    goes through a trainable group norm (`position_norm`, gamma 0.1) so that it
    starts small beside pixels in [0, 1].
    """

    def __init__(self, in_features: int, hidden: int, max_tokens: int, config: SparsityConfig,
                 *, seed, keep_prob: float = 1.0, name: str | None = "embedding"):
        super().__init__(config, name)
        self.keep_prob = keep_prob
        self.position_code = tf.constant(sinusoidal_position_encoding(max_tokens, in_features),
                                         dtype=config.tf_dtype)
        self._add_part("position_norm", GroupNorm(in_features, config))
        self._add_part("projection", TokenLinear(in_features, hidden, config, use_bias=True,
                                                 seed=child_seed(seed, "projection")))

    def call(self, x, compute_dense_grad=False, dropout_seed=None):
        x = tf.convert_to_tensor(x, self.compute_dtype)
        x = x + self.position_norm(self.position_code[:tf.shape(x)[1]])
        x = dropout(x, self.keep_prob, fold_seed(dropout_seed, "embedding"))
        return self.projection(x, compute_dense_grad=compute_dense_grad)


class SelfAttention(_Block):
    """Multi-head self-attention with sparse q, k, v and output projections.

    q, k, v: hidden -> heads * qkv_length; scores q k^T / sqrt(qkv_length),
    softmax over the keys, context = scores v (all dense, per head), then the
    output projection heads * qkv_length -> hidden.

    With `concat_qkv` (the original's default) q, k and v are the three thirds
    of one sparse projection hidden -> 3 * heads * qkv_length ("qkv"): one op
    call instead of three, and Rig-L moves connections between them. `bias`
    gives all four projections a bias (the original had none by default).
    """

    def __init__(self, hidden: int, heads: int, qkv_length: int, config: SparsityConfig, *,
                 seed, concat_qkv: bool = True, bias: bool = False,
                 name: str | None = "attention"):
        super().__init__(config, name)
        if heads < 1 or qkv_length < 1:
            raise ValueError(f"heads and qkv_length must be positive, got {heads}, {qkv_length}")
        self.heads = heads
        self.qkv_length = qkv_length
        self.concat_qkv = concat_qkv
        width = heads * qkv_length
        if concat_qkv:
            self._add_part("qkv", TokenLinear(hidden, 3 * width, config, use_bias=bias,
                                              seed=child_seed(seed, "qkv")))
        else:
            for part in ("q", "k", "v"):
                self._add_part(part, TokenLinear(hidden, width, config, use_bias=bias,
                                                 seed=child_seed(seed, part)))
        self._add_part("out", TokenLinear(width, hidden, config, use_bias=bias,
                                          seed=child_seed(seed, "out")))

    def _split_heads(self, x):
        shape = tf.shape(x)
        x = tf.reshape(x, [shape[0], shape[1], self.heads, self.qkv_length])
        return tf.transpose(x, [0, 2, 1, 3])  # [batch, heads, tokens, qkv_length]

    def call(self, x, compute_dense_grad=False):
        if self.concat_qkv:
            qkv = tf.split(self.qkv(x, compute_dense_grad=compute_dense_grad), 3, axis=-1)
        else:
            qkv = [self._parts[name](x, compute_dense_grad=compute_dense_grad)
                   for name in ("q", "k", "v")]
        q, k, v = (self._split_heads(part) for part in qkv)
        scores = tf.matmul(q, k, transpose_b=True)
        scores = tf.cast(scores, tf.float32) * (1.0 / math.sqrt(self.qkv_length))
        weights = tf.cast(tf.nn.softmax(scores, axis=-1), v.dtype)
        context = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])
        shape = tf.shape(x)
        context = tf.reshape(context, [shape[0], shape[1], self.heads * self.qkv_length])
        return self.out(context, compute_dense_grad=compute_dense_grad)


class FeedForward(_Block):
    """Sparse hidden -> ff (bias), GELU, dropout, sparse ff -> hidden (bias)."""

    def __init__(self, hidden: int, ff: int, config: SparsityConfig, *, seed,
                 keep_prob: float = 1.0, name: str | None = "ffn"):
        super().__init__(config, name)
        self.keep_prob = keep_prob
        self._add_part("fc1", TokenLinear(hidden, ff, config, use_bias=True,
                                          seed=child_seed(seed, "fc1")))
        self._add_part("fc2", TokenLinear(ff, hidden, config, use_bias=True,
                                          seed=child_seed(seed, "fc2")))

    def call(self, x, compute_dense_grad=False, dropout_seed=None):
        h = tf.nn.gelu(self.fc1(x, compute_dense_grad=compute_dense_grad))
        h = dropout(h, self.keep_prob, fold_seed(dropout_seed, "ffn"))
        return self.fc2(h, compute_dense_grad=compute_dense_grad)


class EncoderLayer(_Block):
    """Pre-norm encoder layer: x + drop(attention(norm(x))), then x + drop(ffn(norm(x)))."""

    def __init__(self, hidden: int, heads: int, qkv_length: int, ff: int,
                 config: SparsityConfig, *, seed, keep_prob: float = 1.0,
                 concat_qkv: bool = True, attention_bias: bool = False,
                 name: str | None = "encoder"):
        super().__init__(config, name)
        self.keep_prob = keep_prob
        self._add_part("attention_norm", GroupNorm(hidden, config))
        self._add_part("attention", SelfAttention(hidden, heads, qkv_length, config,
                                                  seed=child_seed(seed, "attention"),
                                                  concat_qkv=concat_qkv, bias=attention_bias))
        self._add_part("ffn_norm", GroupNorm(hidden, config))
        self._add_part("ffn", FeedForward(hidden, ff, config, seed=child_seed(seed, "ffn"),
                                          keep_prob=keep_prob))

    def call(self, x, compute_dense_grad=False, dropout_seed=None):
        branch = self.attention(self.attention_norm(x), compute_dense_grad=compute_dense_grad)
        x = x + dropout(branch, self.keep_prob, fold_seed(dropout_seed, "attention_residual"))
        branch = self.ffn(self.ffn_norm(x), compute_dense_grad=compute_dense_grad,
                          dropout_seed=fold_seed(dropout_seed, "ffn_block"))
        return x + dropout(branch, self.keep_prob, fold_seed(dropout_seed, "ffn_residual"))


class TokenSumOutput(_Block):
    """[batch, tokens, hidden] -> [batch, classes] float32: sparse projection summed over tokens.

    The projection's initial values are scaled by `init_scale`; `SequenceClassifier`
    uses 1 / tokens, so the summed logits start at the size of one token's
    (a sum of 28 Glorot-sized projections starts at logits of +-40, and the first
    hundreds of steps go into shrinking them).
    """

    def __init__(self, hidden: int, classes: int, config: SparsityConfig, *, seed,
                 init_scale: float = 1.0, name: str | None = "head"):
        super().__init__(config, name)
        self._add_part("projection", TokenLinear(hidden, classes, config, use_bias=False,
                                                 seed=child_seed(seed, "projection"),
                                                 init_scale=init_scale))

    def call(self, x, compute_dense_grad=False):
        per_token = self.projection(x, compute_dense_grad=compute_dense_grad)
        return tf.reduce_sum(tf.cast(per_token, tf.float32), axis=1)


class SequenceClassifier(_Block):
    """Embedding, `num_layers` encoder layers and a token-summed output: logits [batch, classes].

    On MNIST each image is 28 tokens (its rows) of 28 pixels. `concat_qkv` and
    `attention_bias` are passed to every `SelfAttention`.
    """

    def __init__(self, *, in_features: int, max_tokens: int, classes: int, hidden: int,
                 heads: int, qkv_length: int, ff: int, config: SparsityConfig, seed,
                 keep_prob: float = 1.0, num_layers: int = 1, concat_qkv: bool = True,
                 attention_bias: bool = False, name: str | None = "transformer"):
        super().__init__(config, name)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self._add_part("embedding", TokenEmbedding(
            in_features, hidden, max_tokens, config, seed=child_seed(seed, "embedding"),
            keep_prob=keep_prob))
        for i in range(num_layers):
            self._add_part(f"encoder{i}", EncoderLayer(
                hidden, heads, qkv_length, ff, config, seed=child_seed(seed, f"encoder{i}"),
                keep_prob=keep_prob, concat_qkv=concat_qkv, attention_bias=attention_bias,
                name=f"encoder{i}"))
        self._add_part("head", TokenSumOutput(hidden, classes, config,
                                              seed=child_seed(seed, "head"),
                                              init_scale=1.0 / max_tokens))

    def call(self, x, compute_dense_grad=False, dropout_seed=None):
        x = self.embedding(x, compute_dense_grad=compute_dense_grad, dropout_seed=dropout_seed)
        for i in range(self.num_layers):
            x = self._parts[f"encoder{i}"](x, compute_dense_grad=compute_dense_grad,
                                          dropout_seed=fold_seed(dropout_seed, f"encoder{i}"))
        return self.head(x, compute_dense_grad=compute_dense_grad)
