// The block-CSC sparsity pattern shared by the op, its kernels and the host
// utilities, and the checks every pattern passes before any index is used.
//
// metainfo = [col_offsets (output_blocks + 1), row_indices (capacity)]: the
// non-zero blocks of block-column j sit at block rows
// row_indices[col_offsets[j] .. col_offsets[j + 1]), strictly increasing, and
// their values are [block_size, block_size] row-major in the same order. Slots
// past col_offsets[output_blocks] are capacity headroom and never read.
#ifndef IPU_SPARSE_OPS_CC_SPARSE_PATTERN_H_
#define IPU_SPARSE_OPS_CC_SPARSE_PATTERN_H_

#include <cstdint>
#include <string>
#include <vector>

namespace ipu_sparse_ops {

struct BlockPattern {
  int64_t input_blocks;
  int64_t output_blocks;
  int64_t block_size;
  const int32_t* col_offsets;  // [output_blocks + 1]
  const int32_t* row_indices;  // [col_offsets[output_blocks]]

  int64_t num_blocks() const { return col_offsets[output_blocks]; }
};

// Checks every offset and index of metainfo; returns "" and sets *pattern when
// valid, otherwise says what is wrong. Nothing reads an unvalidated index.
std::string ValidateMetainfo(const int32_t* metainfo, int64_t metainfo_size,
                             int64_t capacity, int64_t input_blocks,
                             int64_t output_blocks, int64_t block_size,
                             BlockPattern* pattern);

// Builds metainfo from block coordinates (rows[k], cols[k]); order[s] is the
// triplet whose value goes to slot s. Returns "" or what is wrong (an index out
// of range, a duplicate, more blocks than capacity).
std::string BuildMetainfo(const int64_t* rows, const int64_t* cols,
                          int64_t count, int64_t input_blocks,
                          int64_t output_blocks, int64_t capacity,
                          std::vector<int32_t>* metainfo,
                          std::vector<int64_t>* order);

}  // namespace ipu_sparse_ops

#endif  // IPU_SPARSE_OPS_CC_SPARSE_PATTERN_H_
