// Block-sparse matmul and SDDMM kernels, compiled once per instruction set.
//
// The batch is the vector dimension: activations are packed to
// [chunk][row][nv Vecs], a chunk holding nv * kLanes batch rows, so one row of
// a chunk is a contiguous run and a block's rows follow each other. Each
// non-zero block then updates block_size x nv accumulator vectors that stay in
// registers (at most kMaxAccumulators of them).
#include <algorithm>
#include <memory>

#include "sparse_kernels_isa.h"

#ifndef IPU_ISA_TABLE
#error "Define IPU_ISA_TABLE (kGenericKernels, kAvx2Kernels or kAvx512Kernels)."
#endif
#ifndef IPU_ISA_NAME
#error "Define IPU_ISA_NAME (a string naming the instruction set)."
#endif

namespace ipu_sparse_ops {
namespace internal {
namespace {

constexpr int kLanes = 16;            // floats per Vec
constexpr int kMaxAccumulators = 16;  // Vec registers a forward tile may use
constexpr int64_t kPackRowTile = 64;  // rows per packing work item
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// Activations laid out as [chunks][rows][nv] Vecs, zero-padded past the batch.
class Packed {
 public:
  Packed(int64_t batch, int64_t rows, int nv)
      : rows_(rows),
        nv_(nv),
        chunks_((batch + nv * kLanes - 1) / (nv * kLanes)),
        data_(new Vec[chunks_ * rows * nv]) {}

  int64_t chunks() const { return chunks_; }
  Vec* chunk(int64_t c) { return data_.get() + c * rows_ * nv_; }
  const Vec* chunk(int64_t c) const { return data_.get() + c * rows_ * nv_; }

  // Fills from a row-major [batch, rows] matrix.
  void Pack(const float* src, int64_t batch, const ParallelFor& parallel_for) {
    const int64_t width = nv_ * kLanes;
    const int64_t tiles = (rows_ + kPackRowTile - 1) / kPackRowTile;
    parallel_for(chunks_ * tiles, kPackRowTile * width * 2,
                 [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t c = u / tiles;
        const int64_t r0 = (u % tiles) * kPackRowTile;
        const int64_t r1 = std::min(rows_, r0 + kPackRowTile);
        float* dst = reinterpret_cast<float*>(chunk(c));
        for (int64_t i = 0; i < width; ++i) {
          const int64_t b = c * width + i;
          for (int64_t r = r0; r < r1; ++r) {
            dst[r * width + i] = b < batch ? src[b * rows_ + r] : 0.0f;
          }
        }
      }
    });
  }

  // Writes back to a row-major [batch, rows] matrix, dropping the padding.
  void Unpack(float* dst, int64_t batch, const ParallelFor& parallel_for) const {
    const int64_t width = nv_ * kLanes;
    const int64_t tiles = (rows_ + kPackRowTile - 1) / kPackRowTile;
    parallel_for(chunks_ * tiles, kPackRowTile * width * 2,
                 [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t c = u / tiles;
        const int64_t r0 = (u % tiles) * kPackRowTile;
        const int64_t r1 = std::min(rows_, r0 + kPackRowTile);
        const float* src = reinterpret_cast<const float*>(chunk(c));
        const int64_t b_end = std::min(width, batch - c * width);
        for (int64_t i = 0; i < b_end; ++i) {
          float* out_row = dst + (c * width + i) * rows_;
          for (int64_t r = r0; r < r1; ++r) out_row[r] = src[r * width + i];
        }
      }
    });
  }

 private:
  int64_t rows_;
  int nv_;
  int64_t chunks_;
  std::unique_ptr<Vec[]> data_;
};

// Vecs per chunk: enough to cover the batch, capped by the register budget.
int ChooseNv(int64_t batch, int64_t block_size) {
  const int max_nv = kMaxAccumulators / static_cast<int>(block_size);
  int nv = 1;
  while (nv < max_nv && nv * kLanes < batch) nv *= 2;
  return nv;
}

inline float HorizontalSum(Vec v) {
  float sum = 0.0f;
#pragma GCC unroll 16
  for (int i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// y[columns j0..j1) of one chunk. Block k of W is values[k] (row-major), or
// values[perm[k]] transposed when kPermuted.
template <int BS, int NV, bool kPermuted>
void MatmulColumns(const BlockPattern& pattern, const float* values,
                   const int32_t* perm, const Vec* x, Vec* y, int64_t j0,
                   int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    Vec acc[BS][NV];
#pragma GCC unroll 16
    for (int c = 0; c < BS; ++c)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[c][v] = Vec{};
    for (int32_t k = pattern.col_offsets[j]; k < pattern.col_offsets[j + 1]; ++k) {
      const Vec* xr = x + int64_t{pattern.row_indices[k]} * BS * NV;
      const float* w = values + int64_t{kPermuted ? perm[k] : k} * BS * BS;
#pragma GCC unroll 16
      for (int r = 0; r < BS; ++r) {
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) {
          const Vec xv = xr[r * NV + v];
#pragma GCC unroll 16
          for (int c = 0; c < BS; ++c) {
            acc[c][v] += xv * (kPermuted ? w[c * BS + r] : w[r * BS + c]);
          }
        }
      }
    }
    Vec* yc = y + j * BS * NV;
#pragma GCC unroll 16
    for (int c = 0; c < BS; ++c)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) yc[c * NV + v] = acc[c][v];
  }
}

template <int BS, int NV, bool kPermuted>
void MatmulTiled(const BlockPattern& pattern, const float* values,
                 const int32_t* perm, const float* lhs, int64_t batch,
                 float* out, const ParallelFor& parallel_for) {
  const int64_t out_blocks = pattern.output_blocks;
  Packed x(batch, pattern.input_blocks * BS, NV);
  Packed y(batch, out_blocks * BS, NV);
  x.Pack(lhs, batch, parallel_for);
  const int64_t blocks_per_column = pattern.num_blocks() / out_blocks + 1;
  parallel_for(x.chunks() * out_blocks, blocks_per_column * BS * BS * NV * 2,
               [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end;) {
      const int64_t c = u / out_blocks;
      const int64_t j0 = u % out_blocks;
      const int64_t j1 = std::min(out_blocks, j0 + (end - u));
      MatmulColumns<BS, NV, kPermuted>(pattern, values, perm, x.chunk(c),
                                       y.chunk(c), j0, j1);
      u += j1 - j0;
    }
  });
  y.Unpack(out, batch, parallel_for);
}

template <int BS, bool kPermuted>
void MatmulForBlockSize(const BlockPattern& pattern, const float* values,
                        const int32_t* perm, const float* lhs, int64_t batch,
                        float* out, const ParallelFor& parallel_for) {
  const int nv = ChooseNv(batch, BS);
  if constexpr (BS * 16 <= kMaxAccumulators) {
    if (nv == 16) return MatmulTiled<BS, 16, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
    if (nv == 8) return MatmulTiled<BS, 8, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
  }
  if constexpr (BS * 4 <= kMaxAccumulators) {
    if (nv == 4) return MatmulTiled<BS, 4, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
  }
  if constexpr (BS * 2 <= kMaxAccumulators) {
    if (nv == 2) return MatmulTiled<BS, 2, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
  }
  MatmulTiled<BS, 1, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
}

template <bool kPermuted>
void MatmulAnyBlock(const BlockPattern& pattern, const float* values,
                    const int32_t* perm, const float* lhs, int64_t batch,
                    float* out, const ParallelFor& parallel_for) {
  switch (pattern.block_size) {
    case 1: return MatmulForBlockSize<1, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
    case 4: return MatmulForBlockSize<4, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
    case 8: return MatmulForBlockSize<8, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
    case 16: return MatmulForBlockSize<16, kPermuted>(pattern, values, perm, lhs, batch, out, parallel_for);
  }
}

void Matmul(const BlockPattern& pattern, const float* values,
            const int32_t* value_perm, const float* lhs, int64_t batch,
            float* out, const ParallelFor& parallel_for) {
  if (value_perm == nullptr) {
    MatmulAnyBlock<false>(pattern, values, nullptr, lhs, batch, out, parallel_for);
  } else {
    MatmulAnyBlock<true>(pattern, values, value_perm, lhs, batch, out, parallel_for);
  }
}

// Dot products over the whole batch between TR rows of x and TC rows of dy,
// kept as TR x TC independent accumulator chains.
template <int TR, int TC, int NV>
inline void DotTile(const Packed& x, const int64_t (&x_rows)[TR],
                    const Packed& dy, int64_t dy_row, float (&out)[TR][TC]) {
  Vec acc[TR][TC];
#pragma GCC unroll 16
  for (int r = 0; r < TR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < TC; ++c) acc[r][c] = Vec{};
  for (int64_t chunk = 0; chunk < x.chunks(); ++chunk) {
    const Vec* xc = x.chunk(chunk);
    const Vec* dyc = dy.chunk(chunk) + dy_row * NV;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
#pragma GCC unroll 16
      for (int r = 0; r < TR; ++r) {
        const Vec xv = xc[x_rows[r] * NV + v];
#pragma GCC unroll 16
        for (int c = 0; c < TC; ++c) acc[r][c] += xv * dyc[c * NV + v];
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < TR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < TC; ++c) out[r][c] = HorizontalSum(acc[r][c]);
}

// grad_values for the blocks of columns [j0, j1).
template <int BS, int NV>
void GradValuesColumns(const BlockPattern& pattern, const Packed& x,
                       const Packed& dy, float* grad_values, int64_t j0,
                       int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const int32_t k_begin = pattern.col_offsets[j];
    const int32_t k_end = pattern.col_offsets[j + 1];
    if constexpr (BS == 1) {
      // Four non-zeros of the column share each load of dy.
      constexpr int kGroup = 4;
      for (int32_t k = k_begin; k < k_end; k += kGroup) {
        const int n = std::min<int32_t>(kGroup, k_end - k);
        int64_t rows[kGroup];
        for (int e = 0; e < kGroup; ++e) rows[e] = pattern.row_indices[k + std::min(e, n - 1)];
        float dots[kGroup][1];
        DotTile<kGroup, 1, NV>(x, rows, dy, j, dots);
        for (int e = 0; e < n; ++e) grad_values[k + e] = dots[e][0];
      }
    } else {
      // A 4 x 4 tile of the block at a time.
      constexpr int kTile = 4;
      for (int32_t k = k_begin; k < k_end; ++k) {
        const int64_t row0 = int64_t{pattern.row_indices[k]} * BS;
        float* g = grad_values + int64_t{k} * BS * BS;
        for (int r0 = 0; r0 < BS; r0 += kTile) {
          const int64_t rows[kTile] = {row0 + r0, row0 + r0 + 1, row0 + r0 + 2, row0 + r0 + 3};
          for (int c0 = 0; c0 < BS; c0 += kTile) {
            float dots[kTile][kTile];
            DotTile<kTile, kTile, NV>(x, rows, dy, j * BS + c0, dots);
            for (int r = 0; r < kTile; ++r)
              for (int c = 0; c < kTile; ++c) g[(r0 + r) * BS + c0 + c] = dots[r][c];
          }
        }
      }
    }
  }
}

template <int BS>
void GradValuesForBlockSize(const BlockPattern& pattern, const float* lhs,
                            const float* grad_out, int64_t batch,
                            float* grad_values, const ParallelFor& parallel_for) {
  // Chunks are summed inside DotTile, so one chunk width serves every batch.
  constexpr int kNv = 1;
  Packed x(batch, pattern.input_blocks * BS, kNv);
  Packed dy(batch, pattern.output_blocks * BS, kNv);
  x.Pack(lhs, batch, parallel_for);
  dy.Pack(grad_out, batch, parallel_for);
  const int64_t blocks_per_column =
      pattern.num_blocks() / pattern.output_blocks + 1;
  parallel_for(pattern.output_blocks,
               blocks_per_column * BS * BS * x.chunks() * kLanes * 2,
               [&](int64_t begin, int64_t end) {
    GradValuesColumns<BS, kNv>(pattern, x, dy, grad_values, begin, end);
  });
}

void GradValues(const BlockPattern& pattern, const float* lhs,
                const float* grad_out, int64_t batch, float* grad_values,
                const ParallelFor& parallel_for) {
  switch (pattern.block_size) {
    case 1: return GradValuesForBlockSize<1>(pattern, lhs, grad_out, batch, grad_values, parallel_for);
    case 4: return GradValuesForBlockSize<4>(pattern, lhs, grad_out, batch, grad_values, parallel_for);
    case 8: return GradValuesForBlockSize<8>(pattern, lhs, grad_out, batch, grad_values, parallel_for);
    case 16: return GradValuesForBlockSize<16>(pattern, lhs, grad_out, batch, grad_values, parallel_for);
  }
}

}  // namespace

extern const IsaKernels IPU_ISA_TABLE = {IPU_ISA_NAME, &Matmul, &GradValues};

}  // namespace internal
}  // namespace ipu_sparse_ops
