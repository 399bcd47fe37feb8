// Block-sparse matmul and SDDMM kernels, compiled once per instruction set.
//
// The batch is the vector dimension: activations are packed to
// [chunk][row][nv Vecs], a chunk holding nv * kLanes batch rows, so one row of
// a chunk is a contiguous run and a block's rows follow each other.
// - Forward (and, on W^T, the input gradient): each output column keeps
//   ColumnTile x nv accumulators in registers while its non-zero blocks stream
//   past; the input rows are visited in panels that stay in L2 (blocks) or L1
//   (element-wise).
// - Grad-values (SDDMM): one chunk as wide as the batch, so each dot product
//   reads two contiguous rows; tiles of rows share every load. Where x is large
//   and the pattern dense, chunks of the batch sweep L1 panels and add their
//   shares of each dot product.
// - Blocks exactly one Vec wide (block 16 on AVX-512) pack x and dy as block
//   rows of x^T instead ("slabs"): the SDDMM sums outer products over the batch
//   and the forward keeps batch rows of y in registers, neither needing a
//   horizontal sum.
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

// Vec is one native vector register; accumulators leave room for the operands.
#if defined(__AVX512F__)
constexpr int kLanes = 16;            // floats per Vec
constexpr int kMaxAccumulators = 24;  // of 32 registers
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kMaxAccumulators = 12;  // of 16 registers
#else
constexpr int kLanes = 4;
constexpr int kMaxAccumulators = 12;
#endif
constexpr int64_t kPackRowTile = 64;  // rows per packing work item
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

template <size_t... I>
inline Vec InterleaveLow(Vec a, Vec b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (I % 2 ? kLanes + I / 2 : I / 2)...);
}
template <size_t... I>
inline Vec InterleaveHigh(Vec a, Vec b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (I % 2 ? kLanes + kLanes / 2 + I / 2 : kLanes / 2 + I / 2)...);
}

// Transposes kLanes x kLanes floats in registers: log2(kLanes) perfect
// shuffles of the rows (row i with row i + kLanes / 2) are a transpose.
inline void TransposeInRegisters(Vec (&rows)[kLanes]) {
  constexpr auto kIndices = std::make_index_sequence<kLanes>();
  for (int stage = 1; stage < kLanes; stage *= 2) {
    Vec shuffled[kLanes];
#pragma GCC unroll 16
    for (int i = 0; i < kLanes / 2; ++i) {
      shuffled[2 * i] = InterleaveLow(rows[i], rows[i + kLanes / 2], kIndices);
      shuffled[2 * i + 1] = InterleaveHigh(rows[i], rows[i + kLanes / 2], kIndices);
    }
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) rows[i] = shuffled[i];
  }
}

inline Vec LoadUnaligned(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void StoreUnaligned(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// Within each run of B lanes, the low (kHigh false) or high half of a's run
// followed by the same half of b's.
template <int B, bool kHigh, size_t... I>
inline Vec HalvesOfRuns(Vec a, Vec b, std::index_sequence<I...>) {
  return __builtin_shufflevector(
      a, b, (I % B < B / 2 ? I / B * B + I % B + (kHigh ? B / 2 : 0)
                           : kLanes + I / B * B + I % B - B / 2 + (kHigh ? B / 2 : 0))...);
}

// One step of the reduction below: n vectors whose partial sums sit in runs of
// B lanes become n / 2 vectors with runs of B / 2, each pair folded together.
template <int B>
inline void FoldPairs(Vec* v, int n) {
  constexpr auto kIndices = std::make_index_sequence<kLanes>();
  for (int m = 0; m < n / 2; ++m) {
    v[m] = HalvesOfRuns<B, false>(v[2 * m], v[2 * m + 1], kIndices) +
           HalvesOfRuns<B, true>(v[2 * m], v[2 * m + 1], kIndices);
  }
  if constexpr (B > 2) FoldPairs<B / 2>(v, n / 2);
}

constexpr int BitReversed(int i) {
  int r = 0;
  for (int bit = 1; bit < kLanes; bit *= 2) r = r * 2 + (i / bit) % 2;
  return r;
}

// out[i] = the sum of the lanes of acc[i], for N accumulators: each kLanes of
// them fold pairwise into one Vec (2 (kLanes - 1) shuffles and kLanes - 1 adds
// per kLanes sums, half the shuffles of a transpose; it decides the SDDMM's
// speed at small batch). The folds leave sum i in lane BitReversed(i); one
// permutation puts it back in lane i.
template <size_t... I>
inline Vec InBitReversedOrder(Vec v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, BitReversed(I)...);
}

template <int N>
[[gnu::always_inline]] inline void HorizontalSums(const Vec (&acc)[N], float* out) {
  static_assert(N % kLanes == 0, "HorizontalSums takes whole groups of kLanes");
#pragma GCC unroll 4
  for (int g = 0; g < N; g += kLanes) {
    Vec v[kLanes];
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) v[i] = acc[g + i];
    FoldPairs<kLanes>(v, kLanes);
    StoreUnaligned(out + g, InBitReversedOrder(v[0], std::make_index_sequence<kLanes>()));
  }
}


// The two packed operands of a kernel call.
enum class Operand { kFirst, kSecond };

// Storage for an operand, kept by the calling thread from one call to the
// next: a fresh allocation of this size comes from new pages, whose faults
// cost more than a small matmul itself (64 x 1024 x 1024 at density 0.05:
// forward 209 us with fresh buffers, 104 us with kept ones, one thread).
Vec* KeptBuffer(Operand operand, int64_t count) {
  thread_local std::unique_ptr<Vec[]> buffers[2];
  thread_local int64_t sizes[2] = {0, 0};
  const int i = static_cast<int>(operand);
  if (sizes[i] < count) {
    buffers[i].reset();
    buffers[i].reset(new Vec[count]);
    sizes[i] = count;
  }
  return buffers[i].get();
}

// Activations laid out as [chunks][rows][nv] Vecs, zero-padded past the batch.
// Pack and Unpack transpose kLanes x kLanes tiles in registers; only the edges
// of a size that is not a multiple of kLanes go element by element.
class Packed {
 public:
  Packed(Operand operand, int64_t batch, int64_t rows, int nv)
      : rows_(rows),
        nv_(nv),
        chunks_((batch + nv * kLanes - 1) / (nv * kLanes)),
        data_(KeptBuffer(operand, chunks_ * rows * nv)) {}

  int64_t chunks() const { return chunks_; }
  Vec* chunk(int64_t c) { return data_ + c * rows_ * nv_; }
  const Vec* chunk(int64_t c) const { return data_ + c * rows_ * nv_; }

  // Fills from a row-major [batch, rows] matrix.
  void Pack(const float* src, int64_t batch, const ParallelFor& parallel_for) {
    const int64_t width = nv_ * kLanes;
    const int64_t tiles = (rows_ + kPackRowTile - 1) / kPackRowTile;
    parallel_for(chunks_ * tiles, kPackRowTile * width * 2, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t c = u / tiles;
        const int64_t r0 = (u % tiles) * kPackRowTile;
        const int64_t r1 = std::min(rows_, r0 + kPackRowTile);
        const int64_t r_vec_end = r0 + (r1 - r0) / kLanes * kLanes;
        float* dst = reinterpret_cast<float*>(chunk(c));
        for (int64_t i0 = 0; i0 < width; i0 += kLanes) {
          const int64_t b0 = c * width + i0;
          if (b0 + kLanes <= batch) {
            for (int64_t r = r0; r < r_vec_end; r += kLanes) {
              Vec tile[kLanes];
#pragma GCC unroll 16
              for (int i = 0; i < kLanes; ++i) tile[i] = LoadUnaligned(src + (b0 + i) * rows_ + r);
              TransposeInRegisters(tile);
#pragma GCC unroll 16
              for (int i = 0; i < kLanes; ++i) StoreUnaligned(dst + (r + i) * width + i0, tile[i]);
            }
            for (int64_t r = r_vec_end; r < r1; ++r)
              for (int i = 0; i < kLanes; ++i) dst[r * width + i0 + i] = src[(b0 + i) * rows_ + r];
          } else {
            for (int64_t r = r0; r < r1; ++r)
              for (int i = 0; i < kLanes; ++i)
                dst[r * width + i0 + i] = b0 + i < batch ? src[(b0 + i) * rows_ + r] : 0.0f;
          }
        }
      }
    });
  }

  // Writes back to a row-major [batch, rows] matrix, dropping the padding.
  void Unpack(float* dst, int64_t batch, const ParallelFor& parallel_for) const {
    const int64_t width = nv_ * kLanes;
    const int64_t tiles = (rows_ + kPackRowTile - 1) / kPackRowTile;
    parallel_for(chunks_ * tiles, kPackRowTile * width * 2, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t c = u / tiles;
        const int64_t r0 = (u % tiles) * kPackRowTile;
        const int64_t r1 = std::min(rows_, r0 + kPackRowTile);
        const int64_t r_vec_end = r0 + (r1 - r0) / kLanes * kLanes;
        const float* src = reinterpret_cast<const float*>(chunk(c));
        for (int64_t i0 = 0; i0 < width && c * width + i0 < batch; i0 += kLanes) {
          const int64_t b0 = c * width + i0;
          if (b0 + kLanes <= batch) {
            for (int64_t r = r0; r < r_vec_end; r += kLanes) {
              Vec tile[kLanes];
#pragma GCC unroll 16
              for (int i = 0; i < kLanes; ++i) tile[i] = LoadUnaligned(src + (r + i) * width + i0);
              TransposeInRegisters(tile);
#pragma GCC unroll 16
              for (int i = 0; i < kLanes; ++i) StoreUnaligned(dst + (b0 + i) * rows_ + r, tile[i]);
            }
            for (int64_t r = r_vec_end; r < r1; ++r)
              for (int i = 0; i < kLanes; ++i) dst[(b0 + i) * rows_ + r] = src[r * width + i0 + i];
          } else {
            for (int64_t b = b0; b < batch; ++b)
              for (int64_t r = r0; r < r1; ++r) dst[b * rows_ + r] = src[r * width + b - c * width];
          }
        }
      }
    });
  }

 private:
  int64_t rows_;
  int nv_;
  int64_t chunks_;
  Vec* data_;
};

// Operands of the kernels for blocks kLanes wide: block i's kLanes columns of
// every batch row, one Vec per row, as [blocks][batch] Vecs (a block row of
// x^T, contiguous).
Vec* PackBlockSlabs(Operand operand, const float* src, int64_t batch, int64_t blocks,
                    const ParallelFor& parallel_for) {
  Vec* slabs = KeptBuffer(operand, blocks * batch);
  const int64_t width = blocks * kLanes;
  parallel_for(blocks, batch * 2, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t b = 0; b < batch; ++b) {
        slabs[i * batch + b] = LoadUnaligned(src + b * width + i * kLanes);
      }
    }
  });
  return slabs;
}

// Columns of a block one pass of the forward kernel accumulates. Per block row
// a pass loads NV Vecs of x and broadcasts TC weights for TC * NV FMAs, so the
// best split of the register budget is near TC = NV; 4 columns leave NV = 3 on
// AVX2 (12 accumulators) and NV = 6 on AVX-512 (24).
constexpr int ColumnTile(int block_size) { return std::min(block_size, 4); }

// Candidate chunk widths (in Vecs) the forward kernel is compiled for, besides
// the register limit kMaxAccumulators / ColumnTile itself.
constexpr int kNvCandidates[] = {1, 2, 4, 8, 16};

// Vecs per chunk: balances the loads each FMA needs ((nv + tc) / (nv * tc))
// against the zero padding a wide chunk adds to the batch. An FMA and its loads
// mostly issue side by side, while padding lanes are wasted in full, so the
// cost of a useful FMA is taken as (1 + loads per FMA) / useful share (block
// 16 at batch 256: 4 Vecs with no padding ran 12% faster than 6 with 11%).
int ChooseNv(int64_t batch, int column_tile) {
  const int max_nv = kMaxAccumulators / column_tile;
  auto score = [&](int nv) {
    const int64_t width = int64_t{nv} * kLanes;
    const int64_t padded = (batch + width - 1) / width * width;
    const double loads_per_fma = double(nv + column_tile) / (nv * column_tile);
    return double(batch) / padded / (1 + loads_per_fma);
  };
  int best = max_nv;
  for (int nv : kNvCandidates) {
    if (nv < max_nv && score(nv) > score(best)) best = nv;
  }
  return best;
}

// Bytes of x one row panel spans: about half an L2, so the panel stays there
// while every column of a work item takes its non-zeros from it (random rows
// of a larger x would come from L3, which the cores share).
constexpr int64_t kPanelBytes = 256 * 1024;
// An element-wise non-zero does nv FMAs on the nv Vecs of x it loads (a block
// reuses each row BS times), so from L2 the loads bound it, in the forward
// and the SDDMM alike. Where x is larger than an L2 panel and the pattern
// dense enough, chunks of the batch (at most max_chunk_nv Vecs) in panels
// that stay in L1 feed the FMAs faster (256x4096x4096 d 0.3, 32 KB-L1 EPYC:
// forward 27.9 -> 23.8 ms; d 0.1, 6 non-zeros per column and panel, forward
// 9.9 -> 9.5, grad-values 12.3 -> 11.3); a sparser pattern would leave each
// column so few non-zeros per panel that the per-panel work (accumulators
// loaded and stored, horizontal sums) costs more (d 0.05, 3 per panel: forward
// 5.8 -> 7.7 ms), and an x that fits one L2 panel is near already (16x784x320:
// 22 -> 33 us with L1 panels).
constexpr int64_t kL1PanelBytes = 32 * 1024;
constexpr int kL1PanelMaxNv = 8;
constexpr double kL1PanelMinNonZeros = 4;  // per column and panel

bool UseL1Panels(const BlockPattern& pattern, int64_t nv, int64_t max_chunk_nv) {
  if (pattern.block_size != 1 || pattern.input_blocks * nv * int64_t{sizeof(Vec)} <= kPanelBytes) {
    return false;
  }
  const int64_t rows = kL1PanelBytes / (std::min(nv, max_chunk_nv) * sizeof(Vec));
  const double density =
      double(pattern.num_blocks()) / pattern.output_blocks / pattern.input_blocks;
  return density * std::min(rows, pattern.input_blocks) >= kL1PanelMinNonZeros;
}

// The first k in [k, k_max) whose row is p1 or more (rows ascend): a vector of
// rows compared at a time, as a column has a dozen or more non-zeros per L1
// panel, and a scalar loop's exit branch missed at each (256x4096x4096 d 0.3
// forward 5% faster on AVX-512).
inline int32_t PanelEnd(const int32_t* rows, int32_t k, int32_t k_max, int32_t p1) {
#if defined(__AVX512F__)
  const __m512i bound = _mm512_set1_epi32(p1);
  for (; k + 16 <= k_max; k += 16) {
    const __mmask16 below = _mm512_cmplt_epi32_mask(_mm512_loadu_si512(rows + k), bound);
    if (below != 0xFFFF) return k + __builtin_popcount(below);
  }
#elif defined(__AVX2__)
  const __m256i bound = _mm256_set1_epi32(p1);
  for (; k + 8 <= k_max; k += 8) {
    const __m256i row = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + k));
    const int below = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bound, row)));
    if (below != 0xFF) return k + __builtin_popcount(below);
  }
#endif
  while (k < k_max && rows[k] < p1) ++k;
  return k;
}

// Output columns that sweep the panels together; their cursors live on the stack.
constexpr int64_t kColumnGroup = 128;

// Calls visit(j, k_begin, k_end, first_panel) for the non-zeros [k_begin, k_end)
// of each column j in [j0, j1) that fall in each panel of panel_rows input
// rows, panel by panel for kColumnGroup columns at a time. A cursor per column
// remembers where its next panel starts (rows increase within a column), and a
// short linear scan finds where the panel ends.
template <typename Visit>
inline void SweepPanels(const BlockPattern& pattern, int64_t j0, int64_t j1,
                        int64_t panel_rows, Visit&& visit) {
  const int32_t* row_indices = pattern.row_indices;
  for (int64_t g0 = j0; g0 < j1; g0 += kColumnGroup) {
    const int64_t g1 = std::min(j1, g0 + kColumnGroup);
    int32_t cursor[kColumnGroup];
    for (int64_t j = g0; j < g1; ++j) cursor[j - g0] = pattern.col_offsets[j];
    for (int64_t p0 = 0; p0 < pattern.input_blocks; p0 += panel_rows) {
      const int64_t p1 = p0 + panel_rows;
      for (int64_t j = g0; j < g1; ++j) {
        const int32_t k_begin = cursor[j - g0];
        int32_t k_end = pattern.col_offsets[j + 1];
        if (p1 < pattern.input_blocks) {
          k_end = PanelEnd(row_indices, k_begin, k_end, static_cast<int32_t>(p1));
        }
        cursor[j - g0] = k_end;
        visit(j, k_begin, k_end, p0 == 0);
      }
    }
  }
}

// acc += block w (row-major) times x's BS rows, on TC of its columns from c0.
// Per row: its NV Vecs of x loaded once, then each of the TC weights
// broadcast for its NV FMAs: TC * NV accumulators + NV operands + 1 weight
// fit AVX2's 16 registers (TC weights broadcast first would not: 30% slower).
template <int BS, int NV, int TC>
inline void AccumulateBlock(const Vec* xr, const float* w, int c0, Vec (&acc)[TC][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < BS; ++r) {
    Vec xv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) xv[v] = xr[r * NV + v];
#pragma GCC unroll 16
    for (int c = 0; c < TC; ++c) {
      const float wc = w[r * BS + c0 + c];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[c][v] += xv[v] * wc;
    }
  }
}

// Independent accumulator sets an element-wise column's non-zeros rotate
// through: with fewer than 8 accumulators (a narrow batch), one set would wait
// on the FMA latency. (Blocks have enough independent FMAs of their own.)
constexpr int AccumulatorSets(int block_size, int accumulators) {
  return block_size > 1 || accumulators >= 8 ? 1 : 8 / accumulators;
}

// acc (+)= the blocks k in [k_begin, k_end) of one column, on TC of its columns.
template <int BS, int NV, int TC>
inline void AccumulateColumn(const int32_t* row_indices, const float* values,
                             const Vec* x, int c0, int32_t k_begin, int32_t k_end,
                             Vec (&acc)[TC][NV]) {
  constexpr int U = AccumulatorSets(BS, TC * NV);
  if constexpr (U == 1) {  // straight into acc: a second set would not fit the registers
    for (int32_t k = k_begin; k < k_end; ++k) {
      AccumulateBlock<BS, NV, TC>(x + int64_t{row_indices[k]} * BS * NV,
                                  values + int64_t{k} * BS * BS, c0, acc);
    }
    return;
  }
  Vec sets[U][TC][NV] = {};
  int32_t k = k_begin;
  for (; k + U <= k_end; k += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      AccumulateBlock<BS, NV, TC>(x + int64_t{row_indices[k + u]} * BS * NV,
                                  values + int64_t{k + u} * BS * BS, c0, sets[u]);
    }
  }
  for (; k < k_end; ++k) {
    AccumulateBlock<BS, NV, TC>(x + int64_t{row_indices[k]} * BS * NV,
                                values + int64_t{k} * BS * BS, c0, sets[0]);
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int c = 0; c < TC; ++c)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[c][v] += sets[u][c][v];
}

// y[columns j0..j1) of one chunk; block k of W is values[k] (row-major). The
// input rows are swept in panels of panel_rows; partial sums wait in y between
// panels.
template <int BS, int NV>
void MatmulColumns(const BlockPattern& pattern, const float* values,
                   const Vec* x, Vec* y, int64_t j0, int64_t j1, int64_t panel_rows) {
  constexpr int TC = ColumnTile(BS);
  SweepPanels(pattern, j0, j1, panel_rows,
              [&](int64_t j, int32_t k_begin, int32_t k_end, bool first) {
    // The next panel's non-zeros of column j: kColumnGroup visits from now,
    // among as many other columns' streams as the hardware prefetcher cannot
    // follow (without this, L1 panels lost 25-30% to misses on these loads).
    __builtin_prefetch(pattern.row_indices + k_end);
    __builtin_prefetch(pattern.row_indices + k_end + 16);
    __builtin_prefetch(values + int64_t{k_end} * BS * BS);
    __builtin_prefetch(values + int64_t{k_end + 16} * BS * BS);
    if (k_begin == k_end && !first) return;
    for (int c0 = 0; c0 < BS; c0 += TC) {
      Vec* yc = y + (j * BS + c0) * NV;
      Vec acc[TC][NV];
#pragma GCC unroll 16
      for (int c = 0; c < TC; ++c)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[c][v] = first ? Vec{} : yc[c * NV + v];
      AccumulateColumn<BS, NV, TC>(pattern.row_indices, values, x, c0, k_begin, k_end, acc);
#pragma GCC unroll 16
      for (int c = 0; c < TC; ++c)
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) yc[c * NV + v] = acc[c][v];
    }
  });
}

template <int BS, int NV>
void MatmulTiled(const BlockPattern& pattern, const float* values,
                 const float* lhs, int64_t batch, float* out, int64_t panel_bytes,
                 const ParallelFor& parallel_for) {
  const int64_t out_blocks = pattern.output_blocks;
  const int64_t panel_rows = std::max<int64_t>(1, panel_bytes / (BS * NV * sizeof(Vec)));
  Packed x(Operand::kFirst, batch, pattern.input_blocks * BS, NV);
  Packed y(Operand::kSecond, batch, out_blocks * BS, NV);
  x.Pack(lhs, batch, parallel_for);
  const int64_t blocks_per_column = pattern.num_blocks() / out_blocks + 1;
  // Every chunk of a column group in turn, so that the group's W, read from
  // memory for the first chunk, comes from cache for the others (256x4096x4096
  // d 0.3, 2 chunks, avx512: gin 34.2 -> 30.8 ms; avx2 block 8 fwd 29.2 -> 24.0).
  parallel_for(out_blocks, blocks_per_column * BS * BS * NV * 2 * x.chunks(),
               [&](int64_t begin, int64_t end) {
    for (int64_t g0 = begin; g0 < end; g0 += kColumnGroup) {
      const int64_t g1 = std::min(end, g0 + kColumnGroup);
      for (int64_t c = 0; c < x.chunks(); ++c) {
        MatmulColumns<BS, NV>(pattern, values, x.chunk(c), y.chunk(c), g0, g1, panel_rows);
      }
    }
  });
  y.Unpack(out, batch, parallel_for);
}

// Runs MatmulTiled<BS, kNv> if nv == kNv and that many Vecs fit the registers.
template <int BS, int kNv>
bool MatmulIfNv(int nv, const BlockPattern& pattern, const float* values,
                const float* lhs, int64_t batch, float* out, int64_t panel_bytes,
                const ParallelFor& parallel_for) {
  if constexpr (kNv * ColumnTile(BS) <= kMaxAccumulators) {
    if (nv == kNv) {
      MatmulTiled<BS, kNv>(pattern, values, lhs, batch, out, panel_bytes, parallel_for);
      return true;
    }
  }
  return false;
}

// y rows [b0, b0 + R) of block column j from x's slabs (PackBlockSlabs), for
// blocks kLanes wide: per row of a block, one Vec of W (its kLanes columns)
// times R x values broadcast into the FMAs, R accumulators for the R rows of
// y, which are stored straight to the row-major output.
template <int R>
[[gnu::always_inline]] inline void SlabMatmulRows(const BlockPattern& pattern,
                                                  const float* values, const Vec* x,
                                                  int64_t batch, int64_t b0, int64_t j,
                                                  float* out) {
  Vec acc[R] = {};
  for (int32_t k = pattern.col_offsets[j]; k < pattern.col_offsets[j + 1]; ++k) {
    const float* x_rows =
        reinterpret_cast<const float*>(x + int64_t{pattern.row_indices[k]} * batch + b0);
    const float* w = values + int64_t{k} * kLanes * kLanes;
#pragma GCC unroll 16
    for (int r = 0; r < kLanes; ++r) {
      const Vec w_row = LoadUnaligned(w + r * kLanes);
#pragma GCC unroll 16
      for (int b = 0; b < R; ++b) acc[b] += w_row * x_rows[b * kLanes + r];
    }
  }
  const int64_t out_width = pattern.output_blocks * kLanes;
#pragma GCC unroll 16
  for (int b = 0; b < R; ++b) StoreUnaligned(out + (b0 + b) * out_width + j * kLanes, acc[b]);
}

// Batch rows SlabMatmulRows takes at a time (its accumulators).
constexpr int kSlabRows = 16;
// Whether blocks kLanes wide take the slab forward: kSlabRows accumulators and
// a row of W need AVX-512's 32 registers (AVX2's 16, with 8 rows: 256x4096x4096
// block 8 d 0.1 7.1 -> 9.4 ms).
constexpr bool kSlabMatmul = kMaxAccumulators > kSlabRows;

// Batch rows one work item of the slab forward covers, kSlabRows at a time,
// where W is larger than an L2 (2 kPanelBytes): W then streams from memory
// once per tile while its column's blocks stay in cache for the tile's row
// groups (256x4096x4096 block 16 d 0.3, 20 MB of W: forward 14.8 -> 12.3 ms
// with 256 rows rather than 16). A W that stays in cache anyway takes items of
// kSlabRows, which share out more evenly (256x1024x1024 block 16 d 0.1, 410 KB
// of W, 2 threads: 0.35 ms against 0.37 with 256 rows).
constexpr int64_t kSlabTileRows = 256;

int64_t SlabTileRows(const BlockPattern& pattern) {
  const int64_t w_bytes = pattern.num_blocks() * kLanes * int64_t{sizeof(Vec)};
  return w_bytes > 2 * kPanelBytes ? kSlabTileRows : kSlabRows;
}

// The forward for blocks kLanes wide: the block-row slabs of x and a work item
// per tile of batch rows and block column, so no horizontal packing of y
// (256x4096x4096 block 16 d 0.1, AVX-512: 5.8 -> 4.8 ms; 16x784x320 11 -> 8 us).
void SlabMatmul(const BlockPattern& pattern, const float* values, const float* lhs,
                int64_t batch, float* out, const ParallelFor& parallel_for) {
  const Vec* x = PackBlockSlabs(Operand::kFirst, lhs, batch, pattern.input_blocks, parallel_for);
  const int64_t out_blocks = pattern.output_blocks;
  const int64_t tile_rows = SlabTileRows(pattern);
  const int64_t tiles = (batch + tile_rows - 1) / tile_rows;
  const int64_t blocks_per_column = pattern.num_blocks() / out_blocks + 1;
  parallel_for(tiles * out_blocks, blocks_per_column * kLanes * std::min(batch, tile_rows) * 2,
               [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t j = u % out_blocks;
      int64_t b0 = u / out_blocks * tile_rows;
      const int64_t b1 = std::min(batch, b0 + tile_rows);
      for (; b0 + kSlabRows <= b1; b0 += kSlabRows) {
        SlabMatmulRows<kSlabRows>(pattern, values, x, batch, b0, j, out);
      }
      for (; b0 + 4 <= b1; b0 += 4) SlabMatmulRows<4>(pattern, values, x, batch, b0, j, out);
      for (; b0 < b1; ++b0) SlabMatmulRows<1>(pattern, values, x, batch, b0, j, out);
    }
  });
}

template <int BS>
void MatmulForBlockSize(const BlockPattern& pattern, const float* values,
                        const float* lhs, int64_t batch, float* out,
                        const ParallelFor& parallel_for) {
  if constexpr (kSlabMatmul && BS == kLanes) {
    return SlabMatmul(pattern, values, lhs, batch, out, parallel_for);
  }
  constexpr int kMaxNv = kMaxAccumulators / ColumnTile(BS);
  int nv = ChooseNv(batch, ColumnTile(BS));
  int64_t panel_bytes = kPanelBytes;
  if (UseL1Panels(pattern, nv, kL1PanelMaxNv)) {
    nv = std::min(nv, kL1PanelMaxNv);
    panel_bytes = kL1PanelBytes;
  }
  // The same candidates as ChooseNv: kNvCandidates, then kMaxNv.
  MatmulIfNv<BS, 1>(nv, pattern, values, lhs, batch, out, panel_bytes, parallel_for) ||
      MatmulIfNv<BS, 2>(nv, pattern, values, lhs, batch, out, panel_bytes, parallel_for) ||
      MatmulIfNv<BS, 4>(nv, pattern, values, lhs, batch, out, panel_bytes, parallel_for) ||
      MatmulIfNv<BS, 8>(nv, pattern, values, lhs, batch, out, panel_bytes, parallel_for) ||
      MatmulIfNv<BS, 16>(nv, pattern, values, lhs, batch, out, panel_bytes, parallel_for) ||
      MatmulIfNv<BS, kMaxNv>(nv, pattern, values, lhs, batch, out, panel_bytes, parallel_for);
}

void Matmul(const BlockPattern& pattern, const float* values, const float* lhs,
            int64_t batch, float* out, const ParallelFor& parallel_for) {
  switch (pattern.block_size) {
    case 1: return MatmulForBlockSize<1>(pattern, values, lhs, batch, out, parallel_for);
    case 4: return MatmulForBlockSize<4>(pattern, values, lhs, batch, out, parallel_for);
    case 8: return MatmulForBlockSize<8>(pattern, values, lhs, batch, out, parallel_for);
    case 16: return MatmulForBlockSize<16>(pattern, values, lhs, batch, out, parallel_for);
  }
}

// The widest batch (in Vecs) and the most multiply-adds the element-wise
// input gradient scatters. Past either, the forward kernel on W^T's pattern
// (kept by the caller from call to call) is faster: each non-zero's dx rows
// are then read-modify-written from L2 rather than accumulated in registers
// (128x784x320: 148 vs 175 us; 256x4096x4096: about 1.4 against 1.8 forward
// times), while at batch 16 the scatter takes half the time.
constexpr int kScatterMaxNv = 4;
constexpr int64_t kScatterSmallWork = int64_t{1} << 22;

// grad_lhs = grad_out @ W^T for an element-wise W without transposing the
// pattern: non-zero W[i, j] adds W[i, j] * dy[:, j] to dx[:, i]. The batch is
// one chunk of NV Vecs (batch <= NV * kLanes); a work item is one panel of rows
// (L2-sized, and at most half the rows, so that both threads get work), so no
// two items write one row; each column finds its panel's non-zeros by binary search.
template <int NV>
void GradInputScatterNv(const BlockPattern& pattern, const float* values,
                        const float* grad_out, int64_t batch, float* grad_lhs,
                        const ParallelFor& parallel_for) {
  const int64_t nnz = pattern.num_blocks();
  const int64_t rows = pattern.input_blocks;
  const int64_t columns = pattern.output_blocks;
  const int32_t* row_indices = pattern.row_indices;
  Packed dy(Operand::kFirst, batch, columns, NV);
  Packed dx(Operand::kSecond, batch, rows, NV);
  dy.Pack(grad_out, batch, parallel_for);
  constexpr int64_t kMinPanels = 2;
  const int64_t panel_rows =
      std::min<int64_t>(kPanelBytes / (NV * sizeof(Vec)),
                        std::max<int64_t>(1, (rows + kMinPanels - 1) / kMinPanels));
  const int64_t panels = (rows + panel_rows - 1) / panel_rows;
  Vec* dx_rows = dx.chunk(0);
  const Vec* dy_rows = dy.chunk(0);
  parallel_for(panels, (nnz / panels + columns) * NV * 3 + panel_rows * NV,
               [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p0 = u * panel_rows;
      const int64_t p1 = std::min(rows, p0 + panel_rows);
      std::fill(dx_rows + p0 * NV, dx_rows + p1 * NV, Vec{});
      for (int64_t j = 0; j < columns; ++j) {
        const int32_t* col_begin = row_indices + pattern.col_offsets[j];
        const int32_t* col_end = row_indices + pattern.col_offsets[j + 1];
        const int32_t k_begin = static_cast<int32_t>(
            (p0 == 0 ? col_begin : std::lower_bound(col_begin, col_end, p0)) - row_indices);
        const int32_t k_end = static_cast<int32_t>(
            (p1 == rows ? col_end : std::lower_bound(col_begin, col_end, p1)) - row_indices);
        if (k_begin == k_end) continue;
        Vec dyv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) dyv[v] = dy_rows[j * NV + v];
        for (int32_t k = k_begin; k < k_end; ++k) {
          Vec* dxr = dx_rows + int64_t{row_indices[k]} * NV;
          const float w = values[k];
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) dxr[v] += w * dyv[v];
        }
      }
    }
  });
  dx.Unpack(grad_lhs, batch, parallel_for);
}

// The scatter above with one chunk as wide as the batch needs. Declines
// (returns false) for blocks, wide batches and large work (see kScatterMaxNv).
bool GradInputScatter(const BlockPattern& pattern, const float* values,
                      const float* grad_out, int64_t batch, float* grad_lhs,
                      const ParallelFor& parallel_for) {
  if (pattern.block_size != 1 || batch > kScatterMaxNv * kLanes ||
      pattern.num_blocks() * batch > kScatterSmallWork) {
    return false;
  }
  if (batch <= kLanes) {
    GradInputScatterNv<1>(pattern, values, grad_out, batch, grad_lhs, parallel_for);
  } else if (batch <= 2 * kLanes) {
    GradInputScatterNv<2>(pattern, values, grad_out, batch, grad_lhs, parallel_for);
  } else {
    GradInputScatterNv<kScatterMaxNv>(pattern, values, grad_out, batch, grad_lhs, parallel_for);
  }
  return true;
}

// acc[r][c] += x_rows[r][v] * dy_rows[c][v] for v < nv: TR x TC
// independent accumulator chains, each Vec loaded serving TC or TR FMAs.
template <int TR, int TC>
inline void DotTile(const Vec* const (&x_rows)[TR], const Vec* const (&dy_rows)[TC],
                    int64_t nv, Vec (&acc)[TR][TC]) {
  for (int64_t v = 0; v < nv; ++v) {
    Vec dyv[TC];
#pragma GCC unroll 16
    for (int c = 0; c < TC; ++c) dyv[c] = dy_rows[c][v];
#pragma GCC unroll 16
    for (int r = 0; r < TR; ++r) {
      const Vec xv = x_rows[r][v];
#pragma GCC unroll 16
      for (int c = 0; c < TC; ++c) acc[r][c] += xv * dyv[c];
    }
  }
}

// Non-zeros of a column that share each load of dy in the element-wise SDDMM.
constexpr int kDotGroup = kMaxAccumulators >= 16 ? 16 : 8;
// Rows x columns of a block tile in the block SDDMM: (r + c) / (r * c) loads
// per FMA. Fewer rows of x than of dy: x rows change with every block, while
// the column's dy rows stay in L1 for all its blocks.
constexpr int kDotTileRows = kMaxAccumulators >= 16 ? 4 : 2;
constexpr int kDotTileCols = 4;

// Writes the lane sums of acc[0, n) to out, or adds them to it; the rest of
// acc is padding.
[[gnu::always_inline]] inline void StoreDots(const Vec (&acc)[kDotGroup], int n,
                                             bool accumulate, float* out) {
  float dots[kDotGroup];
  HorizontalSums(acc, dots);
  if (n == kDotGroup) {
#pragma GCC unroll 16
    for (int e = 0; e < kDotGroup; ++e) out[e] = accumulate ? out[e] + dots[e] : dots[e];
  } else {
    for (int e = 0; e < n; ++e) out[e] = accumulate ? out[e] + dots[e] : dots[e];
  }
}

// Calls group(G, k, n) for the non-zeros [k_begin, k_end) of one column in
// groups of kDotGroup, G a std::integral_constant: a group computes all its G
// dot products (those past n repeating the last row rather than branch per
// row), so the last few take the smallest of 1/4, 1/2 or 3/4 kDotGroup that
// holds them (256x4096x4096 grad-values, AVX-512: d 0.1 13.3 -> 11.8 ms with
// 26 non-zeros per column and L2 panel; at d 0.3 a full group for the last 3
// of 19 per L1 panel cost a quarter of the time). group must be always_inline
// (called, it cost d 0.3 15%).
template <typename Group>
[[gnu::always_inline]] inline void ForEachDotGroup(int32_t k_begin, int32_t k_end, Group&& group) {
  int32_t k = k_begin;
  for (; k + kDotGroup <= k_end; k += kDotGroup) {
    group(std::integral_constant<int, kDotGroup>(), k, kDotGroup);
  }
  const int n = k_end - k;
  constexpr int kQuarter = kDotGroup / 4;
  if (n > 3 * kQuarter) {
    group(std::integral_constant<int, kDotGroup>(), k, n);
  } else if (n > 2 * kQuarter) {
    group(std::integral_constant<int, 3 * kQuarter>(), k, n);
  } else if (n > kQuarter) {
    group(std::integral_constant<int, 2 * kQuarter>(), k, n);
  } else if (n > 0) {
    group(std::integral_constant<int, kQuarter>(), k, n);
  }
}

// grad_values[k] = x row . dy_row for the element-wise non-zeros k in
// [k_begin, k_end) of one column, the rows of a group sharing each load of dy.
inline void DotColumn(const int32_t* row_indices, const Vec* x, const Vec* dy_row,
                      int64_t nv, int32_t k_begin, int32_t k_end, float* grad_values) {
  const Vec* const dy_rows[1] = {dy_row};
  auto group = [&](auto group_size, int32_t k, int n) __attribute__((always_inline)) {
    constexpr int G = decltype(group_size)::value;
    const Vec* x_rows[G];
    for (int e = 0; e < G; ++e) x_rows[e] = x + int64_t{row_indices[k + std::min(e, n - 1)]} * nv;
    Vec acc[G][1] = {};
    DotTile<G, 1>(x_rows, dy_rows, nv, acc);
    Vec sums[kDotGroup] = {};
    for (int e = 0; e < G; ++e) sums[e] = acc[e][0];
    StoreDots(sums, n, false, grad_values + k);
  };
  ForEachDotGroup(k_begin, k_end, group);
}

// Dot products DotGroup computes side by side: one at a time, each waited on
// the FMA latency (256x4096x4096 d 0.3 grad-values 4% slower).
constexpr int kDotInterleave = 2;

// out[e] (+)= x row rows[e] . dy for e < G, on NV Vecs of each row (rows are
// stride Vecs apart, dy is in registers); rows past n repeat the last.
template <int NV, int G>
[[gnu::always_inline]] inline void DotGroup(const int32_t* rows, int n, const Vec* x,
                                            int64_t stride, const Vec (&dy)[NV],
                                            bool accumulate, float* out) {
  static_assert(G % kDotInterleave == 0 && G <= kDotGroup, "G rows in whole steps");
  Vec acc[kDotGroup] = {};
#pragma GCC unroll 16
  for (int e0 = 0; e0 < G; e0 += kDotInterleave) {
    const Vec* xr[kDotInterleave];
#pragma GCC unroll 4
    for (int e = 0; e < kDotInterleave; ++e) {
      xr[e] = x + int64_t{rows[std::min(e0 + e, n - 1)]} * stride;
    }
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
#pragma GCC unroll 4
      for (int e = 0; e < kDotInterleave; ++e) acc[e0 + e] += xr[e][v] * dy[v];
  }
  StoreDots(acc, n, accumulate, out);
}

// The non-zeros k in [k_begin, k_end) of one column on NV Vecs of the batch,
// few enough that the column's dy stays in registers, so a non-zero needs one
// x pointer (DotColumn keeps a group's pointers live, more than there are
// general-purpose registers: 16x784x320 took 2.2x as long).
template <int NV>
[[gnu::always_inline]] inline void DotColumnChunk(const int32_t* row_indices, const Vec* x,
                                                  int64_t stride, const Vec* dy_row,
                                                  int32_t k_begin, int32_t k_end,
                                                  bool accumulate, float* grad_values) {
  Vec dy[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) dy[v] = dy_row[v];
  auto group = [&](auto group_size, int32_t k, int n) __attribute__((always_inline)) {
    DotGroup<NV, decltype(group_size)::value>(row_indices + k, n, x, stride, dy, accumulate,
                                              grad_values + k);
  };
  ForEachDotGroup(k_begin, k_end, group);
}

// The widest chunk (in Vecs) DotColumnChunk keeps in registers beside
// kDotGroup accumulators and one operand.
constexpr int kDotMaxNarrowNv = kMaxAccumulators >= 16 ? 8 : 4;

// Calls f(std::integral_constant<int, nv>()) for any nv in [1, W]: the kernels
// keep a chunk of nv Vecs in registers, so nv must be a constant.
template <int W = kDotMaxNarrowNv, typename F>
inline void WithNarrowNv(int64_t nv, F&& f) {
  if constexpr (W > 1) {
    if (nv < W) return WithNarrowNv<W - 1>(nv, std::forward<F>(f));
  }
  f(std::integral_constant<int, W>());
}

// Whether the SDDMM takes L1 panels (where UseL1Panels holds): a chunk of 4
// Vecs (AVX2's registers) leaves few FMAs per horizontal sum (256x4096x4096
// grad-values in the AVX2 build, min of 4 interleaved rounds: d 0.3 29.5 ->
// 27.7 ms, d 0.1 11.0 -> 11.8), no clear gain.
constexpr bool kDotL1Panels = kDotMaxNarrowNv >= 8;

// L1 panels one pass over the batch's chunks visits: their bounds in each
// column are found once and serve every chunk.
constexpr int kL1PanelsPerPass = 4;

// The element-wise SDDMM of columns [j0, j1) where UseL1Panels holds: from L2
// a non-zero's x row is one load per FMA at half the speed of L1 (perf put the
// samples on those loads). x and dy are packed in chunks of NV Vecs, and for
// each chunk the rows are swept in L1-sized panels; each chunk adds its share
// to grad_values (which stay in L2 for the pass: the pass's rows of a column
// group), so a dot product takes one horizontal sum per chunk. A panel must be
// contiguous: as NV-Vec runs of rows one batch-wide chunk apart, it fell on
// half of L1's sets (256x4096x4096 d 0.3, AVX-512, 2 threads: 32.1 -> 26.2 ms
// with L1 panels, -> 21.9 ms with contiguous ones).
template <int NV>
void GradValuesElementwiseL1(const BlockPattern& pattern, const Packed& x, const Packed& dy,
                             float* grad_values, int64_t j0, int64_t j1) {
  const int64_t l1_rows = kL1PanelBytes / (NV * sizeof(Vec));
  const int64_t rows = pattern.input_blocks;
  const int32_t* row_indices = pattern.row_indices;
  for (int64_t g0 = j0; g0 < j1; g0 += kColumnGroup) {
    const int64_t g1 = std::min(j1, g0 + kColumnGroup);
    int32_t bounds[kColumnGroup][kL1PanelsPerPass + 1];
    for (int64_t j = g0; j < g1; ++j) bounds[j - g0][kL1PanelsPerPass] = pattern.col_offsets[j];
    for (int64_t p0 = 0; p0 < rows; p0 += kL1PanelsPerPass * l1_rows) {
      for (int64_t j = g0; j < g1; ++j) {
        int32_t* b = bounds[j - g0];
        const int32_t col_end = pattern.col_offsets[j + 1];
        b[0] = b[kL1PanelsPerPass];
        for (int s = 0; s < kL1PanelsPerPass; ++s) {
          const int64_t p1 = p0 + (s + 1) * l1_rows;
          b[s + 1] = p1 >= rows ? col_end
                                : PanelEnd(row_indices, b[s], col_end, static_cast<int32_t>(p1));
        }
        // This column's indices and gradients of the next pass, a pass from
        // now (as in MatmulColumns: too many streams for the hardware).
        for (int line = 0; line < 4; ++line) {
          __builtin_prefetch(row_indices + b[kL1PanelsPerPass] + 16 * line);
          __builtin_prefetch(grad_values + b[kL1PanelsPerPass] + 16 * line, 1);
        }
      }
      for (int64_t c = 0; c < x.chunks(); ++c) {
        for (int s = 0; s < kL1PanelsPerPass; ++s) {
          for (int64_t j = g0; j < g1; ++j) {
            const int32_t* b = bounds[j - g0];
            if (b[s] == b[s + 1]) continue;
            DotColumnChunk<NV>(row_indices, x.chunk(c), NV, dy.chunk(c) + j * NV, b[s],
                               b[s + 1], c > 0, grad_values);
          }
        }
      }
    }
  }
}

// The element-wise SDDMM in L1 panels: chunks of equal width (the fewest of at
// most kDotMaxNarrowNv Vecs), so the padding is under one Vec per chunk.
void GradValuesInL1Panels(const BlockPattern& pattern, const float* lhs, const float* grad_out,
                          int64_t batch, float* grad_values, const ParallelFor& parallel_for) {
  const int64_t nv = (batch + kLanes - 1) / kLanes;
  const int64_t chunks = (nv + kDotMaxNarrowNv - 1) / kDotMaxNarrowNv;
  WithNarrowNv((nv + chunks - 1) / chunks, [&](auto chunk_nv) {
    constexpr int NV = decltype(chunk_nv)::value;
    Packed x(Operand::kFirst, batch, pattern.input_blocks, NV);
    Packed dy(Operand::kSecond, batch, pattern.output_blocks, NV);
    x.Pack(lhs, batch, parallel_for);
    dy.Pack(grad_out, batch, parallel_for);
    const int64_t blocks_per_column = pattern.num_blocks() / pattern.output_blocks + 1;
    parallel_for(pattern.output_blocks, blocks_per_column * chunks * (2 * NV + 3),
                 [&](int64_t begin, int64_t end) {
      GradValuesElementwiseL1<NV>(pattern, x, dy, grad_values, begin, end);
    });
  });
}

// The element-wise SDDMM of columns [j0, j1) elsewhere: each non-zero reads a
// random row of x, so the rows are swept in L2-sized panels (a column group's
// dy rows are read again per panel, far less than x's rows would come from L3).
void GradValuesElementwise(const BlockPattern& pattern, const Vec* x, const Vec* dy,
                           int64_t nv, float* grad_values, int64_t j0, int64_t j1) {
  const int64_t panel_rows = std::max<int64_t>(1, kPanelBytes / (nv * sizeof(Vec)));
  SweepPanels(pattern, j0, j1, panel_rows,
              [&](int64_t j, int32_t k_begin, int32_t k_end, bool) {
    if (nv > kDotMaxNarrowNv) {
      DotColumn(pattern.row_indices, x, dy + j * nv, nv, k_begin, k_end, grad_values);
    } else {
      WithNarrowNv(nv, [&](auto narrow_nv) {
        DotColumnChunk<decltype(narrow_nv)::value>(pattern.row_indices, x, nv, dy + j * nv,
                                                   k_begin, k_end, false, grad_values);
      });
    }
  });
}

// grad_values for the blocks of columns [j0, j1). x and dy are packed as one
// chunk of nv Vecs per row, so every dot product streams contiguous memory.
template <int BS>
void GradValuesColumns(const BlockPattern& pattern, const Vec* x, const Vec* dy,
                       int64_t nv, float* grad_values, int64_t j0, int64_t j1) {
  if constexpr (BS == 1) {
    GradValuesElementwise(pattern, x, dy, nv, grad_values, j0, j1);
    return;
  }
  for (int64_t j = j0; j < j1; ++j) {
    for (int32_t k = pattern.col_offsets[j]; k < pattern.col_offsets[j + 1]; ++k) {
      const Vec* x_block = x + int64_t{pattern.row_indices[k]} * BS * nv;
      const Vec* dy_block = dy + j * BS * nv;
      float* g = grad_values + int64_t{k} * BS * BS;
      for (int r0 = 0; r0 < BS; r0 += kDotTileRows) {
        const Vec* x_rows[kDotTileRows];
        for (int r = 0; r < kDotTileRows; ++r) x_rows[r] = x_block + (r0 + r) * nv;
        for (int c0 = 0; c0 < BS; c0 += kDotTileCols) {
          const Vec* dy_rows[kDotTileCols];
          for (int c = 0; c < kDotTileCols; ++c) dy_rows[c] = dy_block + (c0 + c) * nv;
          Vec acc[kDotTileRows][kDotTileCols] = {};
          DotTile<kDotTileRows, kDotTileCols>(x_rows, dy_rows, nv, acc);
          float dots[kDotTileRows * kDotTileCols];
          HorizontalSums(reinterpret_cast<const Vec(&)[kDotTileRows * kDotTileCols]>(acc), dots);
          for (int r = 0; r < kDotTileRows; ++r)
            for (int c = 0; c < kDotTileCols; ++c)
              g[(r0 + r) * BS + c0 + c] = dots[r * kDotTileCols + c];
        }
      }
    }
  }
}

// grad_values for the blocks of columns [j0, j1) on slabs (PackBlockSlabs):
// a block's gradient is a sum of outer products over the batch, each an x Vec
// (the block's rows) times kLanes dy values broadcast into its FMAs, so
// kLanes accumulators hold the block's columns and one transpose in registers
// turns them into rows: no horizontal sums, and any batch without padding.
void GradValuesSlabColumns(const BlockPattern& pattern, const Vec* x, const Vec* dy,
                           int64_t batch, float* grad_values, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* dy_slab = reinterpret_cast<const float*>(dy + j * batch);
    for (int32_t k = pattern.col_offsets[j]; k < pattern.col_offsets[j + 1]; ++k) {
      const Vec* x_slab = x + int64_t{pattern.row_indices[k]} * batch;
      Vec acc[kLanes] = {};
      for (int64_t b = 0; b < batch; ++b) {
        const Vec xv = x_slab[b];
#pragma GCC unroll 16
        for (int c = 0; c < kLanes; ++c) acc[c] += xv * dy_slab[b * kLanes + c];
      }
      TransposeInRegisters(acc);
      float* g = grad_values + int64_t{k} * kLanes * kLanes;
#pragma GCC unroll 16
      for (int r = 0; r < kLanes; ++r) StoreUnaligned(g + r * kLanes, acc[r]);
    }
  }
}

// Whether blocks kLanes wide take the slabs: with 4 lanes (the generic build)
// four accumulators wait on the FMA latency (128x784x320 block 4: 151 -> 202 us).
constexpr bool kSlabGradValues = kLanes >= 8;

template <int BS>
void GradValuesForBlockSize(const BlockPattern& pattern, const float* lhs,
                            const float* grad_out, int64_t batch,
                            float* grad_values, const ParallelFor& parallel_for) {
  if constexpr (kSlabGradValues && BS == kLanes) {
    const Vec* x = PackBlockSlabs(Operand::kFirst, lhs, batch, pattern.input_blocks, parallel_for);
    const Vec* dy =
        PackBlockSlabs(Operand::kSecond, grad_out, batch, pattern.output_blocks, parallel_for);
    const int64_t blocks_per_column = pattern.num_blocks() / pattern.output_blocks + 1;
    parallel_for(pattern.output_blocks, blocks_per_column * BS * batch * 2,
                 [&](int64_t begin, int64_t end) {
      GradValuesSlabColumns(pattern, x, dy, batch, grad_values, begin, end);
    });
    return;
  }
  const int64_t nv = (batch + kLanes - 1) / kLanes;
  if (kDotL1Panels && UseL1Panels(pattern, nv, kDotMaxNarrowNv)) {  // element-wise only
    return GradValuesInL1Panels(pattern, lhs, grad_out, batch, grad_values, parallel_for);
  }
  // One chunk as wide as the batch: a dot product is then one contiguous run.
  Packed x(Operand::kFirst, batch, pattern.input_blocks * BS, static_cast<int>(nv));
  Packed dy(Operand::kSecond, batch, pattern.output_blocks * BS, static_cast<int>(nv));
  x.Pack(lhs, batch, parallel_for);
  dy.Pack(grad_out, batch, parallel_for);
  const int64_t blocks_per_column =
      pattern.num_blocks() / pattern.output_blocks + 1;
  // Cycles per column, in the forward's units: an FMA and a load per Vec of each
  // dot product, and a share of a horizontal sum. (Counted per lane, a 26 us
  // job at 16x784x320 looked 16 times larger and was split among the threads
  // for more than it saved.)
  parallel_for(pattern.output_blocks, blocks_per_column * BS * BS * (2 * nv + 3),
               [&](int64_t begin, int64_t end) {
    GradValuesColumns<BS>(pattern, x.chunk(0), dy.chunk(0), nv, grad_values, begin, end);
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

extern const IsaKernels IPU_ISA_TABLE = {IPU_ISA_NAME, &Matmul, &GradInputScatter, &GradValues};

}  // namespace internal
}  // namespace ipu_sparse_ops
