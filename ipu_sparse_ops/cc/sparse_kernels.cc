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

// W^T in the forward kernel's form: for each input block i, the output blocks
// holding a non-zero in block-row i (ascending), with their values copied in
// that order and each block transposed. Copying once costs less than reading
// the blocks in W's scattered order for every batch chunk. Each calling thread
// keeps its copy's storage for the next call: fresh pages would cost their
// faults every time.
struct TransposedWeights {
  std::vector<int32_t> col_offsets;
  std::vector<int32_t> row_indices;
  std::vector<float> values;
};

// The calling thread's TransposedWeights. Bound to a reference there, so the
// worker threads of a ParallelFor reach the caller's copy, not their own.
TransposedWeights& KeptTransposedWeights() {
  thread_local TransposedWeights kept;
  return kept;
}

// Output-column ranges counted and scattered independently: enough to keep
// every thread busy, few enough that their per-row counters stay small.
constexpr int64_t kTransposeParts = 16;

// A counting sort by input block, parallel over output-column ranges: each
// range counts its rows, a prefix sum over (row, range) gives every range its
// own slots, and each range scatters in column order (keeping rows ascending).
const TransposedWeights& Transpose(const BlockPattern& pattern, const float* values,
                                   const ParallelFor& parallel_for) {
  const int64_t rows = pattern.input_blocks;
  const int64_t bs = pattern.block_size;
  const int64_t nnz = pattern.num_blocks();
  const int64_t parts = std::min(kTransposeParts, pattern.output_blocks);
  std::vector<int64_t> part_begin(parts + 1);  // first output block of each range
  for (int64_t q = 0; q <= parts; ++q) part_begin[q] = pattern.output_blocks * q / parts;
  const int64_t cost_per_part = (nnz / parts + 1) * (bs * bs * 2 + 4);

  std::vector<int32_t> slots(parts * rows, 0);  // counts, then first slots
  parallel_for(parts, cost_per_part, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      int32_t* count = slots.data() + q * rows;
      const int32_t k_end = pattern.col_offsets[part_begin[q + 1]];
      for (int32_t k = pattern.col_offsets[part_begin[q]]; k < k_end; ++k) {
        ++count[pattern.row_indices[k]];
      }
    }
  });
  // Exclusive prefix sum over (row, range), in two sequential sweeps of the
  // [range][row] counts (a sweep down each row would miss the cache at each step).
  TransposedWeights& t = KeptTransposedWeights();
  t.col_offsets.assign(rows + 1, 0);
  for (int64_t q = 0; q < parts; ++q)
    for (int64_t i = 0; i < rows; ++i) t.col_offsets[i + 1] += slots[q * rows + i];
  for (int64_t i = 0; i < rows; ++i) t.col_offsets[i + 1] += t.col_offsets[i];
  std::vector<int32_t> next(t.col_offsets.begin(), t.col_offsets.end() - 1);
  for (int64_t q = 0; q < parts; ++q) {
    for (int64_t i = 0; i < rows; ++i) {
      const int32_t count = slots[q * rows + i];
      slots[q * rows + i] = next[i];
      next[i] += count;
    }
  }
  t.row_indices.resize(nnz);
  t.values.resize(nnz * bs * bs);
  parallel_for(parts, cost_per_part, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      int32_t* cursor = slots.data() + q * rows;
      for (int64_t j = part_begin[q]; j < part_begin[q + 1]; ++j) {
        for (int32_t k = pattern.col_offsets[j]; k < pattern.col_offsets[j + 1]; ++k) {
          const int32_t slot = cursor[pattern.row_indices[k]]++;
          t.row_indices[slot] = static_cast<int32_t>(j);
          const float* block = values + int64_t{k} * bs * bs;
          float* transposed = t.values.data() + int64_t{slot} * bs * bs;
          if (bs == 1) {  // most patterns: keep the general loop out of their way
            *transposed = *block;
            continue;
          }
          for (int64_t r = 0; r < bs; ++r)
            for (int64_t c = 0; c < bs; ++c) transposed[c * bs + r] = block[r * bs + c];
        }
      }
    }
  });
  return t;
}

}  // namespace

void SparseMatmul(const BlockPattern& pattern, const float* values,
                  const float* lhs, int64_t batch, float* out,
                  const ParallelFor& parallel_for) {
  if (batch == 0) return;
  Kernels().matmul(pattern, values, lhs, batch, out, parallel_for);
}

void SparseMatmulGradInput(const BlockPattern& pattern, const float* values,
                           const float* grad_out, int64_t batch,
                           float* grad_lhs, const ParallelFor& parallel_for) {
  if (batch == 0) return;
  if (Kernels().grad_input_scatter(pattern, values, grad_out, batch, grad_lhs, parallel_for)) {
    return;
  }
  const TransposedWeights& t = Transpose(pattern, values, parallel_for);
  const BlockPattern transposed = {pattern.output_blocks, pattern.input_blocks,
                                   pattern.block_size, t.col_offsets.data(),
                                   t.row_indices.data()};
  Kernels().matmul(transposed, t.values.data(), grad_out, batch, grad_lhs, parallel_for);
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
