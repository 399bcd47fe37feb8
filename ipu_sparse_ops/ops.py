"""The dynamic sparse matmul op: y = lhs @ W with W's pattern a runtime tensor.

Loads `libsparse_matmul_ops.so` (built by `make -j`) and registers its
gradients. The pattern and values are ordinary tensors (usually variables), so
assigning a new pattern of the same capacity never re-traces a tf.function.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ipu_sparse_ops.sparse import MatmulSpec, Representation
from ipu_sparse_ops.tf_startup import tf

# IPU_SPARSE_OPS_LIBRARY picks another build (the fuzz suite's AddressSanitizer one).
_LIBRARY_PATH = Path(os.environ.get("IPU_SPARSE_OPS_LIBRARY")
                     or Path(__file__).with_name("libsparse_matmul_ops.so"))
if not _LIBRARY_PATH.exists():
    raise ImportError(f"{_LIBRARY_PATH} is missing: run `make -j` in the repository root first")
_ops = tf.load_op_library(str(_LIBRARY_PATH))


def kernel_isa() -> str:
    """The instruction set the op's kernels run with here: generic, avx2 or avx512.

    The best this CPU supports, unless IPU_SPARSE_OPS_ISA forces a lower one.
    """
    isa = ctypes.CDLL(str(_LIBRARY_PATH)).IpuSparseOpsKernelIsa
    isa.restype = ctypes.c_char_p
    return isa().decode()


def dense_grad_anchor(spec: MatmulSpec) -> tf.Tensor:
    """A zero tensor whose gradient, through `sparse_matmul`, is the dense gradient."""
    return tf.zeros(spec.dense_grad_shape, dtype=spec.data_type_tf)


def sparse_matmul(lhs, representation: Representation, spec: MatmulSpec,
                  compute_dense_grad=False, dense_grad_anchor=None) -> tf.Tensor:
    """lhs [batch, input_size] @ W -> [batch, output_size].

    Differentiable with respect to `lhs` and `representation.nz_values`. For the
    dense gradient dL/dW ([input_size, output_size], or for pooling SUM/AVG/MAX
    the pool of |dL/dW| over each block, [input_blocks, output_blocks]) pass a
    `dense_grad_anchor` of that shape (its value is never read) and take the
    gradient with respect to it. `compute_dense_grad` may be a bool tensor: the
    gradient is computed only when it is true at run time, else it is zeros, so
    switching it never re-traces.
    """
    dtype = spec.data_type_tf
    lhs = tf.convert_to_tensor(lhs, dtype=dtype)
    if lhs.shape.rank != 2 or lhs.shape[1] != spec.input_size:
        raise ValueError(f"lhs must be [batch, {spec.input_size}], got {lhs.shape}")
    if dense_grad_anchor is None:
        dense_grad_anchor = _constant((), dtype)
    if isinstance(compute_dense_grad, bool):
        compute_dense_grad = _constant(compute_dense_grad, "bool")
    return _ops.ipu_sparse_matmul(
        lhs, representation.metainfo, representation.nz_values, dense_grad_anchor,
        compute_dense_grad, output_size=spec.output_size, pooling_type=spec.pooling_type)


_EAGER_CONSTANTS: dict = {}


def _constant(value, dtype: str) -> tf.Tensor:
    """`value` (a bool, or () for an empty [0, 0] anchor) as a tensor.

    Made once per process when eager: each eager op costs about as much as the
    small matmul it would feed (MNIST's 16x784x320 forward: 112 us per call
    with them made afresh, 31 us without). In a graph it is a new constant.
    """
    def make():
        return tf.zeros((0, 0), dtype=dtype) if value == () else tf.constant(value, dtype=dtype)
    if not tf.executing_eagerly():
        return make()
    key = (value, dtype)
    if key not in _EAGER_CONSTANTS:
        _EAGER_CONSTANTS[key] = make()
    return _EAGER_CONSTANTS[key]


@tf.RegisterGradient("IpuSparseMatmul")
def _sparse_matmul_grad(op, grad):
    lhs, metainfo, nz_values, anchor, compute = op.inputs
    block_size = nz_values.shape[1]
    grad_lhs = _ops.ipu_sparse_matmul_grad_input(
        grad, metainfo, nz_values, input_size=lhs.shape[1])
    grad_values = _ops.ipu_sparse_matmul_grad_values(
        lhs, grad, metainfo, block_size=block_size)
    grad_anchor = None
    if anchor.shape.num_elements() != 0:
        pooling_type = op.get_attr("pooling_type").decode()
        grad_anchor = tf.cond(compute,
                              lambda: dense_gradient(lhs, grad, block_size, pooling_type),
                              lambda: tf.zeros(anchor.shape, anchor.dtype))
    return grad_lhs, None, grad_values, grad_anchor, None


def dense_gradient(lhs, grad_product, block_size=1, pooling_type="NONE") -> tf.Tensor:
    """lhs^T grad_product [input_size, output_size], or with pooling SUM/AVG/MAX
    the pool of its |.| over each block [input_blocks, output_blocks].

    The product is TensorFlow's own matmul, in float32 for float16 storage too:
    the fastest dense x^T dy this process has (oneDNN or Eigen, whichever
    TensorFlow runs), so Rig-L's ranking costs what a dense layer's gradient does.
    """
    dense = tf.matmul(tf.cast(lhs, tf.float32), tf.cast(grad_product, tf.float32), transpose_a=True)
    if pooling_type != "NONE":
        dense = _ops.ipu_sparse_matmul_pool_abs(dense, block_size=block_size,
                                                pooling_type=pooling_type)
    return tf.cast(dense, lhs.dtype)

