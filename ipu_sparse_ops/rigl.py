"""The step between the op and `sparse_training`'s numpy Rig-L: scores from a dense gradient.

The op returns the dense gradient a layer's `RigL` update ranks (full, or
pooled per block by SUM/AVG/MAX); `block_scores` turns it into one score per
block, `per_element` corrects blocks that reach into padding, and
`check_finite` stops a run before a NaN/Inf gradient can corrupt a pattern
(`NonFiniteGradientError`, a one-line ValueError for the script to report).
"""

from __future__ import annotations

import numpy as np

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
