"""`rigl.block_scores` against a per-block loop in float64."""

import numpy as np
import pytest

from ipu_sparse_ops import rigl
from ipu_sparse_ops.sparse import MatmulSpec


def loop_scores(grad: np.ndarray, bs: int, pooling: str) -> np.ndarray:
    rows, cols = grad.shape[0] // bs, grad.shape[1] // bs
    pool = {"NONE": np.sum, "SUM": np.sum, "AVG": np.mean, "MAX": np.max}[pooling]
    scores = np.empty((rows, cols))
    for r in range(rows):
        for c in range(cols):
            scores[r, c] = pool(np.abs(grad[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs]))
    return scores


@pytest.mark.parametrize("pooling", ["NONE", "SUM", "AVG", "MAX"])
@pytest.mark.parametrize("bs", [1, 4, 16])
def test_block_scores_pool_abs_gradient_per_block(bs, pooling):
    spec = MatmulSpec(3 * bs * 2, 5 * bs, 4, block_size=bs, pooling_type=pooling)
    grad = np.random.default_rng(bs).standard_normal((spec.input_size, spec.output_size))
    scores = rigl.block_scores(spec, grad.astype(np.float32))
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, loop_scores(grad, bs, pooling), rtol=1e-5, atol=1e-6)


def test_block_scores_reject_a_gradient_of_another_shape():
    spec = MatmulSpec(32, 16, 4, block_size=4, pooling_type="SUM")
    with pytest.raises(ValueError, match=r"expected \(32, 16\)"):
        rigl.block_scores(spec, np.zeros(spec.dense_grad_shape))  # the op's pooled shape
