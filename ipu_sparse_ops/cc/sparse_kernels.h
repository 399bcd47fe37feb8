// CPU kernels for the dynamic block-sparse matmul y = x W.
//
// Nothing here knows about TensorFlow or Python: the op glue hands in raw
// pointers, a validated pattern and a ParallelFor. All arithmetic is float32;
// callers convert float16 storage at the edges.
//
// Patterns are block-CSC (sparse_pattern.h): storing by output column lets
// threads own disjoint outputs in the forward pass and the SDDMM; the input
// gradient runs the same forward kernel on the transposed pattern.
#ifndef IPU_SPARSE_OPS_CC_SPARSE_KERNELS_H_
#define IPU_SPARSE_OPS_CC_SPARSE_KERNELS_H_

#include <cstdint>
#include <functional>
#include <string>

#include "sparse_pattern.h"

namespace ipu_sparse_ops {

// Runs fn(begin, end) over disjoint ranges covering [0, n); cost is a rough
// per-item cycle count used to decide how finely to split.
using ParallelFor = std::function<void(
    int64_t n, int64_t cost_per_item,
    const std::function<void(int64_t, int64_t)>& fn)>;

enum class Pooling { kSum, kAvg, kMax };

// Preconditions of every function below: the pattern has been validated and
// both its block counts are at least 1 (the op returns zeros for an empty W
// without calling in here).

// out[batch, output] = lhs[batch, input] @ W.
void SparseMatmul(const BlockPattern& pattern, const float* values,
                  const float* lhs, int64_t batch, float* out,
                  const ParallelFor& parallel_for);

// grad_lhs[batch, input] = grad_out[batch, output] @ W^T. The calling thread
// keeps W^T's pattern for the next call with the same pattern (a few of them,
// compared index by index), so it is built once per pattern, not per step.
void SparseMatmulGradInput(const BlockPattern& pattern, const float* values,
                           const float* grad_out, int64_t batch,
                           float* grad_lhs, const ParallelFor& parallel_for);

// grad_values[k] = (lhs^T grad_out) restricted to block k, for the pattern's
// blocks; slots past the pattern (capacity headroom) are set to zero.
void SparseMatmulGradValues(const BlockPattern& pattern, const float* lhs,
                            const float* grad_out, int64_t batch,
                            int64_t capacity, float* grad_values,
                            const ParallelFor& parallel_for);

// pooled[i, j] = pool of |dense[block (i, j)]| over each block_size^2 block.
void PoolAbsBlocks(const float* dense, int64_t rows, int64_t cols,
                   int64_t block_size, Pooling pooling, float* pooled,
                   const ParallelFor& parallel_for);

// Which instruction set the kernels run with on this CPU ("avx512", ...).
const char* KernelIsa();

}  // namespace ipu_sparse_ops

#endif  // IPU_SPARSE_OPS_CC_SPARSE_KERNELS_H_
