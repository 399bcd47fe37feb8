"""Rig-L on live layers: prune, regrow and push a new pattern into `SparseFcLayer`s.

`sparse_training` holds the algorithm in plain numpy on triplets; this module
is the thin step that applies it to a trained layer and its optimizer:

1. read the layer's connections (`get_triplets`, in slot order),
2. turn the dense gradient the op returned into one score per block,
3. `sparse_training.prune_and_regrow`,
4. `push_triplets` (an assign: no re-trace) and `Optimizer.follow_pattern`,
   so kept connections keep their values and optimizer slots while new ones
   start from zero, value and slots alike.

A NaN or Inf in a gradient raises `NonFiniteGradientError` before anything
is changed. `rigl_update_layers` checks every layer's gradient first, so a
model is never left half updated.

Used by `sparse_transformer_rigl_mnist.py` and meant for every script that
trains `SparseFcLayer`s. `rigl_update(layer, optimizer, dense_grad, n_prune,
regrow, rng)` takes the arguments of `mnist_rigl/sparse_mnist.py`'s inline
step, in the same order, and behaves the same, except that a NaN/Inf gradient
raises `NonFiniteGradientError` (a ValueError) for the script to turn into its
own one-line error. A training script does, after the last step of a segment whose
dense gradients it fetched (the gradients with respect to each layer's
`dense_grad_anchor`, computed on that step only)::

    counts = {name: schedule(t, T, prune_ratio, layer.nnz) for name, layer in sparse.items()}
    try:
        moved = rigl.rigl_update_layers(sparse, optimizer, grads, counts, "rigl", rng)
    except rigl.NonFiniteGradientError as e:
        ...  # stop training with str(e) as the one-line reason
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ipu_sparse_ops import sparse_training
from ipu_sparse_ops.sparse import MatmulSpec


class NonFiniteGradientError(ValueError):
    """A dense gradient holds NaN or Inf; no pattern was changed. The message is one line."""


def block_scores(spec: MatmulSpec, dense_grad) -> np.ndarray:
    """The op's dense gradient for `spec` as Rig-L scores [input_blocks, output_blocks] (float32).

    For pooling NONE the gradient is the full dL/dW [input_size, output_size]:
    element-wise it is returned as is (prune_and_regrow ranks |g|), for blocks
    |g| is summed over each block on the host. For SUM/AVG/MAX the op already
    pooled |g| per block and it is returned as is.

    Raises:
        ValueError: the gradient does not have the op's shape for this spec.
    """
    grad = np.asarray(dense_grad, dtype=np.float32)
    if grad.shape != tuple(spec.dense_grad_shape):
        raise ValueError(f"dense gradient has shape {grad.shape}, expected "
                         f"{tuple(spec.dense_grad_shape)} for this layer")
    if spec.pooling_type == "NONE" and spec.block_size > 1:
        bs = spec.block_size
        grad = np.abs(grad).reshape(spec.input_blocks, bs, spec.output_blocks, bs).sum(axis=(1, 3))
    return grad


def check_finite(name: str, dense_grad) -> None:
    """Raise `NonFiniteGradientError` naming `name` if `dense_grad` holds NaN or Inf."""
    bad = np.count_nonzero(~np.isfinite(np.asarray(dense_grad, dtype=np.float32)))
    if bad:
        raise NonFiniteGradientError(
            f"{name}: the dense gradient holds {bad} NaN/Inf values; stopping before it "
            "corrupts the sparsity pattern")


def per_element(spec: MatmulSpec, real_elements) -> np.ndarray:
    """[input_blocks, output_blocks] factor turning a block sum into a sum per real element.

    `real_elements[r, c]` counts the elements of block (r, c) inside the real
    (unpadded) matrix; the factor is bs^2 / count, and 0 for a block wholly in
    the padding, so such a block is pruned first and never grown.
    """
    real = np.asarray(real_elements, dtype=np.float64)
    if real.shape != (spec.input_blocks, spec.output_blocks):
        raise ValueError(f"real_elements has shape {real.shape}, expected "
                         f"{(spec.input_blocks, spec.output_blocks)}")
    if np.any(real < 0) or np.any(real > spec.block_size ** 2):
        raise ValueError(f"real_elements must be in [0, {spec.block_size ** 2}]")
    return np.divide(spec.block_size ** 2, real, out=np.zeros_like(real), where=real > 0)


def rigl_update(layer, optimizer, dense_grad, n_prune: int, regrow: str,
                rng: np.random.Generator | None, *, real_elements=None) -> int:
    """Prune the n_prune weakest connections of `layer`, regrow as many, push the pattern.

    Args:
        layer: a `layers.SparseFcLayer`.
        optimizer: the `optimizers.Optimizer` training `layer.nz_values` (its slots
            are re-aligned), or None when there are no slots to carry.
        dense_grad: for regrow "rigl", the gradient of the loss with respect to
            `layer.dense_grad_anchor` (numpy or tensor; see `block_scores`).
            Ignored for "random".
        n_prune: how many connections (blocks) to move; 0 leaves the layer as is.
        regrow: "rigl" (grow where the gradient is largest) or "random" (SET).
        rng: seeded generator; needed for "random" only.
        real_elements: optional [input_blocks, output_blocks] count of each block's
            elements that are real, for a layer whose sizes were padded up to the
            block size (`transformer.TokenLinear.real_elements()`). Block
            magnitudes, and summed gradient scores (pooling NONE, SUM, AVG), are
            then compared per real element: otherwise a block half in the padding
            looks half as strong, and e.g. the last classes of a 10-wide output
            with 8 x 8 blocks lose their connections first.

    Returns:
        How many connections were grown.

    Raises:
        NonFiniteGradientError: NaN/Inf in the gradient (the layer is untouched).
        ValueError: bad n_prune, regrow method, gradient or real_elements shape.
    """
    spec = layer.spec
    grad = None
    if regrow == "rigl":
        check_finite(layer.name, dense_grad)
        grad = block_scores(spec, dense_grad)
    triplets = layer.get_triplets()
    ranked = triplets
    if real_elements is not None:
        factor = per_element(spec, real_elements)
        per_connection = factor[triplets.row_indices, triplets.col_indices]
        values = np.asarray(triplets.values, dtype=np.float64)
        ranked = triplets._replace(
            values=values * per_connection.reshape((-1,) + (1,) * (values.ndim - 1)))
        if grad is not None and spec.pooling_type != "MAX":
            grad = (np.abs(grad) * factor).astype(np.float32)
    new, kept_from = sparse_training.prune_and_regrow(
        ranked, n_prune, regrow, shape=(spec.input_blocks, spec.output_blocks),
        grad=grad, rng=rng)
    if ranked is not triplets:  # the ranking used scaled values; keep the real ones
        new = new._replace(values=sparse_training.follow_pattern(triplets.values, kept_from))
    slot_kept_from = layer.push_triplets(new, kept_from)
    if optimizer is not None:
        optimizer.follow_pattern(layer.nz_values, slot_kept_from)
    return int(np.count_nonzero(kept_from < 0))


def rigl_update_layers(layers: Mapping[str, object], optimizer, dense_grads: Mapping[str, object],
                       prune_counts: Mapping[str, int], regrow: str,
                       rng: np.random.Generator | None,
                       real_elements: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """`rigl_update` on several layers, after checking every gradient is finite.

    Args:
        layers: name -> SparseFcLayer, updated in this order (it fixes the use of
            `rng` for random regrowth, so keep it stable for reproducible runs).
        dense_grads: name -> dense gradient (regrow "rigl"; may be empty for "random").
        prune_counts: name -> connections to move in that layer.
        real_elements: optional name -> real element counts (see `rigl_update`).

    Returns:
        name -> number of connections grown.
    """
    if regrow == "rigl":
        missing = [name for name in layers if name not in dense_grads]
        if missing:
            raise ValueError(f"no dense gradient for {', '.join(missing)}")
        for name in layers:
            check_finite(name, dense_grads[name])
    real_elements = real_elements or {}
    return {name: rigl_update(layer, optimizer, dense_grads.get(name), prune_counts[name],
                              regrow, rng, real_elements=real_elements.get(name))
            for name, layer in layers.items()}
