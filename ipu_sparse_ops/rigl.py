"""The step between the op and `sparse_training`'s numpy Rig-L: scores from a dense gradient.

`block_scores` turns the full dense gradient a layer's `RigL` update ranks
into one score per block (|g| pooled by the layer's SUM/AVG/MAX; NONE sums),
`per_element` corrects blocks that reach into padding, and
`check_finite` stops a run before a NaN/Inf gradient can corrupt a pattern
(`NonFiniteGradientError`, a one-line ValueError for the script to report).
"""

from __future__ import annotations

import numpy as np

from ipu_sparse_ops.sparse import MatmulSpec


class NonFiniteGradientError(ValueError):
    """A dense gradient holds NaN or Inf; no pattern was changed. The message is one line."""


def block_scores(spec: MatmulSpec, dense_grad) -> np.ndarray:
    """Rig-L scores [input_blocks, output_blocks] (float32) from the full dL/dW.

    Each block's |g| is pooled by `spec.pooling_type` (NONE and SUM: summed),
    as the op pools it; pooling on the host lets replicas sum their gradients
    first. Element-wise (block size 1) the score is |g|.

    Raises:
        ValueError: the gradient is not [input_size, output_size] of this spec.
    """
    grad = np.abs(np.asarray(dense_grad, dtype=np.float32))
    if grad.shape != (spec.input_size, spec.output_size):
        raise ValueError(f"dense gradient has shape {grad.shape}, expected "
                         f"{(spec.input_size, spec.output_size)} for this layer")
    bs = spec.block_size
    if bs == 1:
        return grad
    blocks = grad.reshape(spec.input_blocks, bs, spec.output_blocks, bs)
    if spec.pooling_type == "MAX":
        return blocks.max(axis=(1, 3))
    scores = blocks.sum(axis=(1, 3), dtype=np.float32)
    return scores / bs ** 2 if spec.pooling_type == "AVG" else scores


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
