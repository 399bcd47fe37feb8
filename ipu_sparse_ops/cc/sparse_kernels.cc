// Validation, dispatch and the instruction-set-neutral parts of the kernels.
#include "sparse_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "sparse_kernels_isa.h"

namespace ipu_sparse_ops {
namespace {

// The best kernels this CPU runs; IPU_SPARSE_OPS_ISA=generic|avx2|avx512
// forces a choice (tests use it to check every build).
const internal::IsaKernels& Kernels() {
  static const internal::IsaKernels* const kernels = [] {
    const char* forced = std::getenv("IPU_SPARSE_OPS_ISA");
    const std::string want = forced ? forced : "";
#if defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx512 && (want.empty() || want == "avx512")) return &internal::kAvx512Kernels;
    if (avx2 && (want.empty() || want == "avx512" || want == "avx2")) return &internal::kAvx2Kernels;
#endif
    return &internal::kGenericKernels;
  }();
  return *kernels;
}

// The pattern of W^T: for each input block i, the output blocks holding a
// non-zero in block-row i (ascending), and where each block sits in W's order.
struct TransposedPattern {
  std::vector<int32_t> col_offsets;
  std::vector<int32_t> row_indices;
  std::vector<int32_t> value_perm;
};

TransposedPattern Transpose(const BlockPattern& pattern) {
  const int64_t nnz = pattern.num_blocks();
  TransposedPattern t;
  t.col_offsets.assign(pattern.input_blocks + 1, 0);
  t.row_indices.resize(nnz);
  t.value_perm.resize(nnz);
  for (int64_t k = 0; k < nnz; ++k) ++t.col_offsets[pattern.row_indices[k] + 1];
  for (int64_t i = 0; i < pattern.input_blocks; ++i) t.col_offsets[i + 1] += t.col_offsets[i];
  std::vector<int32_t> cursor(t.col_offsets.begin(), t.col_offsets.end() - 1);
  for (int64_t j = 0; j < pattern.output_blocks; ++j) {
    for (int32_t k = pattern.col_offsets[j]; k < pattern.col_offsets[j + 1]; ++k) {
      const int32_t slot = cursor[pattern.row_indices[k]]++;
      t.row_indices[slot] = static_cast<int32_t>(j);
      t.value_perm[slot] = k;
    }
  }
  return t;
}

}  // namespace

void SparseMatmul(const BlockPattern& pattern, const float* values,
                  const float* lhs, int64_t batch, float* out,
                  const ParallelFor& parallel_for) {
  if (batch == 0) return;
  Kernels().matmul(pattern, values, nullptr, lhs, batch, out, parallel_for);
}

void SparseMatmulGradInput(const BlockPattern& pattern, const float* values,
                           const float* grad_out, int64_t batch,
                           float* grad_lhs, const ParallelFor& parallel_for) {
  if (batch == 0) return;
  const TransposedPattern t = Transpose(pattern);
  const BlockPattern transposed = {pattern.output_blocks, pattern.input_blocks,
                                   pattern.block_size, t.col_offsets.data(),
                                   t.row_indices.data()};
  Kernels().matmul(transposed, values, t.value_perm.data(), grad_out, batch,
                   grad_lhs, parallel_for);
}

void SparseMatmulGradValues(const BlockPattern& pattern, const float* lhs,
                            const float* grad_out, int64_t batch,
                            int64_t capacity, float* grad_values,
                            const ParallelFor& parallel_for) {
  const int64_t block_elements = pattern.block_size * pattern.block_size;
  const int64_t used = pattern.num_blocks() * block_elements;
  std::fill(grad_values + used, grad_values + capacity * block_elements, 0.0f);
  if (batch == 0) {
    std::fill(grad_values, grad_values + used, 0.0f);
    return;
  }
  Kernels().grad_values(pattern, lhs, grad_out, batch, grad_values, parallel_for);
}

void PoolAbsBlocks(const float* dense, int64_t rows, int64_t cols,
                   int64_t block_size, Pooling pooling, float* pooled,
                   const ParallelFor& parallel_for) {
  const int64_t pooled_rows = rows / block_size;
  const int64_t pooled_cols = cols / block_size;
  const float scale = pooling == Pooling::kAvg ? 1.0f / (block_size * block_size) : 1.0f;
  parallel_for(pooled_rows, cols * block_size * 2, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* out = pooled + i * pooled_cols;
      std::fill(out, out + pooled_cols, 0.0f);
      for (int64_t r = i * block_size; r < (i + 1) * block_size; ++r) {
        const float* row = dense + r * cols;
        for (int64_t j = 0; j < pooled_cols; ++j) {
          for (int64_t c = j * block_size; c < (j + 1) * block_size; ++c) {
            const float magnitude = std::fabs(row[c]);
            if (pooling != Pooling::kMax) {
              out[j] += magnitude;
            } else if (magnitude > out[j] || std::isnan(magnitude)) {
              out[j] = magnitude;  // NaN must reach the host, not vanish here
            }
          }
        }
      }
      for (int64_t j = 0; j < pooled_cols; ++j) out[j] *= scale;
    }
  });
}

const char* KernelIsa() { return Kernels().name; }

}  // namespace ipu_sparse_ops
