// Validation, dispatch and the instruction-set-neutral parts of the kernels.
#include "sparse_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
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

// W^T's pattern in the forward kernel's form: for each input block i, the
// output blocks holding a non-zero in block-row i (ascending); for each slot k
// of W, the slot its block goes to, transposed; and W's slots split into the
// ranges of output blocks the transpose was counted in.
struct TransposedPattern {
  std::vector<int32_t> key;  // W's sizes and metainfo: what it was built from
  std::vector<int32_t> col_offsets;
  std::vector<int32_t> row_indices;
  std::vector<int32_t> destination;
  std::vector<int32_t> part_slots;  // [parts + 1]

  int64_t bytes() const {
    return int64_t(key.size() + col_offsets.size() + row_indices.size() +
                   destination.size() + part_slots.size()) * 4;
  }
};

// Output-column ranges counted and scattered independently: enough to keep
// every thread busy, few enough that their per-row counters stay small.
constexpr int64_t kTransposeParts = 16;

// A counting sort by input block, parallel over output-column ranges: each
// range counts its rows, a prefix sum over (row, range) gives every range its
// own slots, and each range scatters in column order (keeping rows ascending).
void BuildTransposed(const BlockPattern& pattern, const ParallelFor& parallel_for,
                     TransposedPattern* t) {
  const int64_t rows = pattern.input_blocks;
  const int64_t nnz = pattern.num_blocks();
  const int64_t parts = std::min(kTransposeParts, pattern.output_blocks);
  std::vector<int64_t> part_begin(parts + 1);  // first output block of each range
  for (int64_t q = 0; q <= parts; ++q) part_begin[q] = pattern.output_blocks * q / parts;
  const int64_t cost_per_part = (nnz / parts + 1) * 8;

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
  t->col_offsets.assign(rows + 1, 0);
  for (int64_t q = 0; q < parts; ++q)
    for (int64_t i = 0; i < rows; ++i) t->col_offsets[i + 1] += slots[q * rows + i];
  for (int64_t i = 0; i < rows; ++i) t->col_offsets[i + 1] += t->col_offsets[i];
  std::vector<int32_t> next(t->col_offsets.begin(), t->col_offsets.end() - 1);
  for (int64_t q = 0; q < parts; ++q) {
    for (int64_t i = 0; i < rows; ++i) {
      const int32_t count = slots[q * rows + i];
      slots[q * rows + i] = next[i];
      next[i] += count;
    }
  }
  t->row_indices.resize(nnz);
  t->destination.resize(nnz);
  t->part_slots.resize(parts + 1);
  for (int64_t q = 0; q <= parts; ++q) t->part_slots[q] = pattern.col_offsets[part_begin[q]];
  parallel_for(parts, cost_per_part, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      int32_t* cursor = slots.data() + q * rows;
      for (int64_t j = part_begin[q]; j < part_begin[q + 1]; ++j) {
        for (int32_t k = pattern.col_offsets[j]; k < pattern.col_offsets[j + 1]; ++k) {
          const int32_t slot = cursor[pattern.row_indices[k]]++;
          t->row_indices[slot] = static_cast<int32_t>(j);
          t->destination[k] = slot;
        }
      }
    }
  });
}

// The key of a pattern: its sizes, then its metainfo up to the last used slot.
void PatternKey(const BlockPattern& pattern, std::vector<int32_t>* key) {
  const int32_t sizes[] = {static_cast<int32_t>(pattern.input_blocks),
                           static_cast<int32_t>(pattern.output_blocks),
                           static_cast<int32_t>(pattern.block_size)};
  key->assign(sizes, sizes + 3);
  key->insert(key->end(), pattern.col_offsets, pattern.col_offsets + pattern.output_blocks + 1);
  key->insert(key->end(), pattern.row_indices, pattern.row_indices + pattern.num_blocks());
}

bool HasKey(const TransposedPattern& t, const BlockPattern& pattern) {
  const int64_t columns = pattern.output_blocks + 1;
  const int64_t nnz = pattern.num_blocks();
  return int64_t(t.key.size()) == 3 + columns + nnz && t.key[0] == pattern.input_blocks &&
         t.key[1] == pattern.output_blocks && t.key[2] == pattern.block_size &&
         std::equal(pattern.col_offsets, pattern.col_offsets + columns, t.key.begin() + 3) &&
         std::equal(pattern.row_indices, pattern.row_indices + nnz, t.key.begin() + 3 + columns);
}

// The transposed patterns this thread built, most recently used first. A
// pattern lives for many steps between Rig-L updates, so the input gradient
// builds W^T's pattern once per pattern, not per call; the lookup compares
// the whole metainfo (a few MB at most, read once), so a hit is exact.
// Per thread, so no locks: TensorFlow runs an op on whichever inter-op thread
// is free, and each thread then builds its own copy once.
constexpr size_t kKeptPatterns = 8;
constexpr int64_t kKeptPatternBytes = int64_t{256} << 20;  // per thread

const TransposedPattern& KeptTransposedPattern(const BlockPattern& pattern,
                                               const ParallelFor& parallel_for) {
  thread_local std::vector<std::unique_ptr<TransposedPattern>> kept;
  for (size_t i = 0; i < kept.size(); ++i) {
    if (HasKey(*kept[i], pattern)) {
      std::rotate(kept.begin(), kept.begin() + i, kept.begin() + i + 1);
      return *kept.front();
    }
  }
  auto t = std::make_unique<TransposedPattern>();
  PatternKey(pattern, &t->key);
  BuildTransposed(pattern, parallel_for, t.get());
  kept.insert(kept.begin(), std::move(t));
  int64_t bytes = 0;
  for (size_t i = 0; i < kept.size(); ++i) {
    bytes += kept[i]->bytes();
    if (i > 0 && (i >= kKeptPatterns || bytes > kKeptPatternBytes)) {
      kept.resize(i);
      break;
    }
  }
  return *kept.front();
}

// W^T's values in the transposed pattern's slot order, each block transposed,
// in storage the calling thread keeps from one call to the next (fresh pages
// would cost their faults every time). Each part reads its own slots of W in
// order and writes one run per input block, so the lines being written stay in
// L2; gathering each slot from anywhere in W instead missed the caches
// (256x4096x4096 d 0.3: 14 ms, a third of the input gradient).
const float* TransposedValues(const TransposedPattern& t, const float* values,
                              int64_t block_size, const ParallelFor& parallel_for) {
  thread_local std::vector<float> kept;
  const int64_t nnz = t.destination.size();
  const int64_t bs = block_size;
  const int64_t parts = int64_t(t.part_slots.size()) - 1;
  kept.resize(nnz * bs * bs);
  float* out = kept.data();
  if (nnz == 0) return out;
  parallel_for(parts, (nnz / parts + 1) * (bs * bs * 4 + 8), [&](int64_t begin, int64_t end) {
    for (int64_t k = t.part_slots[begin]; k < t.part_slots[end]; ++k) {
      const float* block = values + k * bs * bs;
      float* transposed = out + int64_t{t.destination[k]} * bs * bs;
      if (bs == 1) {  // most patterns: keep the general loop out of their way
        *transposed = *block;
        continue;
      }
      for (int64_t r = 0; r < bs; ++r)
        for (int64_t c = 0; c < bs; ++c) transposed[c * bs + r] = block[r * bs + c];
    }
  });
  return out;
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
  const TransposedPattern& t = KeptTransposedPattern(pattern, parallel_for);
  const BlockPattern transposed = {pattern.output_blocks, pattern.input_blocks,
                                   pattern.block_size, t.col_offsets.data(),
                                   t.row_indices.data()};
  Kernels().matmul(transposed, TransposedValues(t, values, pattern.block_size, parallel_for),
                   grad_out, batch, grad_lhs, parallel_for);
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

// The larger magnitude, a NaN winning (it must reach the host, not vanish
// here); written as a select so that the loops below vectorise.
inline float MaxKeepingNaN(float pooled, float magnitude) {
  return magnitude > pooled || magnitude != magnitude ? magnitude : pooled;
}

// Pools a block row down its rows first, column by column (contiguous loops the
// compiler vectorises), then across each block's columns: element by element
// it took 0.11 ms of a 0.28 ms pooled dense gradient at 16x784x320, block 16.
void PoolAbsBlocks(const float* dense, int64_t rows, int64_t cols,
                   int64_t block_size, Pooling pooling, float* pooled,
                   const ParallelFor& parallel_for) {
  const int64_t pooled_rows = rows / block_size;
  const int64_t pooled_cols = cols / block_size;
  const float scale = pooling == Pooling::kAvg ? 1.0f / (block_size * block_size) : 1.0f;
  const bool max = pooling == Pooling::kMax;
  parallel_for(pooled_rows, cols * block_size, [&](int64_t begin, int64_t end) {
    std::vector<float> down_rows(cols);
    float* acc = down_rows.data();
    for (int64_t i = begin; i < end; ++i) {
      const float* block_row = dense + i * block_size * cols;
      for (int64_t c = 0; c < cols; ++c) acc[c] = std::fabs(block_row[c]);
      for (int64_t r = 1; r < block_size; ++r) {
        const float* row = block_row + r * cols;
        if (max) {
          for (int64_t c = 0; c < cols; ++c) acc[c] = MaxKeepingNaN(acc[c], std::fabs(row[c]));
        } else {
          for (int64_t c = 0; c < cols; ++c) acc[c] += std::fabs(row[c]);
        }
      }
      float* out = pooled + i * pooled_cols;
      for (int64_t j = 0; j < pooled_cols; ++j) {
        const float* block = acc + j * block_size;
        float v = block[0];
        for (int64_t c = 1; c < block_size; ++c) v = max ? MaxKeepingNaN(v, block[c]) : v + block[c];
        out[j] = v * scale;
      }
    }
  });
}

const char* KernelIsa() { return Kernels().name; }

}  // namespace ipu_sparse_ops
