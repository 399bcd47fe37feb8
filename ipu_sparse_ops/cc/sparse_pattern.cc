#include "sparse_pattern.h"

#include <algorithm>
#include <limits>
#include <numeric>

namespace ipu_sparse_ops {
namespace {

std::string Describe(const char* what, int64_t index, int64_t value) {
  return std::string(what) + "[" + std::to_string(index) + "] = " + std::to_string(value);
}

// Every offset and index in range and rows strictly increasing per column.
// It runs on every op call, so each check is a count or a maximum over one
// flat array, loops the compiler vectorises (an `ok &=` chain it does not),
// cloned for the wider vectors of the CPUs that have them.
__attribute__((target_clones("avx512f", "avx2", "default")))
bool LooksValid(const int32_t* col_offsets, const int32_t* row_indices,
                int64_t capacity, int64_t input_blocks, int64_t output_blocks) {
  if (col_offsets[0] != 0) return false;
  uint32_t bad_offsets = 0;
  for (int64_t j = 0; j < output_blocks; ++j) {
    bad_offsets += (col_offsets[j + 1] < col_offsets[j]) | (col_offsets[j + 1] > capacity);
  }
  if (bad_offsets != 0) return false;
  const int64_t nnz = col_offsets[output_blocks];
  if (nnz == 0) return true;
  // Unsigned, a negative row wraps to 2^31 or above: past the bound, which is
  // capped at 2^31 (no int32 row reaches it) so that a huge input_blocks does
  // not let a wrapped row through.
  uint32_t highest_row = 0;
  for (int64_t k = 0; k < nnz; ++k) {
    highest_row = std::max(highest_row, static_cast<uint32_t>(row_indices[k]));
  }
  const int64_t row_bound = std::min<int64_t>(input_blocks, int64_t{1} << 31);
  if (highest_row >= static_cast<uint64_t>(row_bound)) return false;
  // Rows must rise at every step of the flat array except where a column
  // starts: count the steps that do not, then forgive those at column starts.
  uint32_t not_rising = 0;
  for (int64_t k = 1; k < nnz; ++k) not_rising += row_indices[k] <= row_indices[k - 1];
  for (int64_t j = 1; j < output_blocks; ++j) {
    const int32_t start = col_offsets[j];
    if (start > col_offsets[j - 1] && start < nnz) {
      not_rising -= row_indices[start] <= row_indices[start - 1];
    }
  }
  return not_rising == 0;
}

// What LooksValid rejected, naming the first bad offset or index.
std::string FirstError(const int32_t* col_offsets, const int32_t* row_indices,
                       int64_t capacity, int64_t input_blocks, int64_t output_blocks) {
  if (col_offsets[0] != 0) return Describe("col_offsets", 0, col_offsets[0]) + ", expected 0";
  for (int64_t j = 0; j < output_blocks; ++j) {
    const int32_t begin = col_offsets[j];
    const int32_t end = col_offsets[j + 1];
    if (end < begin) {
      return Describe("col_offsets", j + 1, end) + " is below " + Describe("col_offsets", j, begin);
    }
    if (end > capacity) {
      return Describe("col_offsets", j + 1, end) + " exceeds the capacity " + std::to_string(capacity);
    }
    for (int32_t k = begin; k < end; ++k) {
      const int32_t row = row_indices[k];
      if (row < 0 || row >= input_blocks) {
        return Describe("row_indices", k, row) + " is outside [0, " + std::to_string(input_blocks) + ")";
      }
      if (k > begin && row <= row_indices[k - 1]) {
        return Describe("row_indices", k, row) + " in column " + std::to_string(j) +
               (row == row_indices[k - 1] ? " is a duplicate" : " is out of order");
      }
    }
  }
  return "metainfo is malformed";  // unreachable: LooksValid and this loop agree
}

}  // namespace

std::string ValidateMetainfo(const int32_t* metainfo, int64_t metainfo_size,
                             int64_t capacity, int64_t input_blocks,
                             int64_t output_blocks, int64_t block_size,
                             BlockPattern* pattern) {
  if (block_size != 1 && block_size != 4 && block_size != 8 && block_size != 16) {
    return "block size must be 1, 4, 8 or 16, got " + std::to_string(block_size);
  }
  if (input_blocks < 0 || output_blocks < 0 || capacity < 0) {
    return "sizes must not be negative, got input_blocks " + std::to_string(input_blocks) +
           ", output_blocks " + std::to_string(output_blocks) + ", capacity " + std::to_string(capacity);
  }
  // Written so that no sum can overflow: col_offsets[0] must exist to be read.
  if (metainfo_size < 1 || output_blocks > metainfo_size - 1 ||
      metainfo_size - 1 - output_blocks != capacity) {
    return "metainfo has " + std::to_string(metainfo_size) +
           " entries, expected output_blocks + 1 + capacity = " + std::to_string(output_blocks) +
           " + 1 + " + std::to_string(capacity);
  }
  const int32_t* col_offsets = metainfo;
  const int32_t* row_indices = metainfo + output_blocks + 1;
  if (!LooksValid(col_offsets, row_indices, capacity, input_blocks, output_blocks)) {
    return FirstError(col_offsets, row_indices, capacity, input_blocks, output_blocks);
  }
  *pattern = {input_blocks, output_blocks, block_size, col_offsets, row_indices};
  return "";
}

std::string BuildMetainfo(const int64_t* rows, const int64_t* cols,
                          int64_t count, int64_t input_blocks,
                          int64_t output_blocks, int64_t capacity,
                          std::vector<int32_t>* metainfo,
                          std::vector<int64_t>* order) {
  if (input_blocks < 0 || output_blocks < 0 || capacity < 0) {
    return "sizes must not be negative, got input_blocks " + std::to_string(input_blocks) +
           ", output_blocks " + std::to_string(output_blocks) + ", capacity " + std::to_string(capacity);
  }
  if (capacity > std::numeric_limits<int32_t>::max()) {
    return "capacity " + std::to_string(capacity) + " does not fit int32 metainfo";
  }
  if (count > capacity) {
    return std::to_string(count) + " non-zero blocks exceed the capacity " + std::to_string(capacity);
  }
  for (int64_t k = 0; k < count; ++k) {
    if (rows[k] < 0 || rows[k] >= input_blocks) {
      return Describe("row_indices", k, rows[k]) + " is outside [0, " + std::to_string(input_blocks) + ")";
    }
    if (cols[k] < 0 || cols[k] >= output_blocks) {
      return Describe("col_indices", k, cols[k]) + " is outside [0, " + std::to_string(output_blocks) + ")";
    }
  }
  order->resize(count);
  std::iota(order->begin(), order->end(), 0);
  std::sort(order->begin(), order->end(), [&](int64_t a, int64_t b) {
    return cols[a] != cols[b] ? cols[a] < cols[b] : rows[a] < rows[b];
  });
  metainfo->assign(output_blocks + 1 + capacity, 0);
  int32_t* col_offsets = metainfo->data();
  int32_t* row_indices = col_offsets + output_blocks + 1;
  for (int64_t s = 0; s < count; ++s) {
    const int64_t k = (*order)[s];
    if (s > 0) {
      const int64_t prev = (*order)[s - 1];
      if (rows[prev] == rows[k] && cols[prev] == cols[k]) {
        return "duplicate non-zero at (" + std::to_string(rows[k]) + ", " +
               std::to_string(cols[k]) + "), triplets " + std::to_string(prev) +
               " and " + std::to_string(k);
      }
    }
    ++col_offsets[cols[k] + 1];
    row_indices[s] = static_cast<int32_t>(rows[k]);
  }
  for (int64_t j = 0; j < output_blocks; ++j) col_offsets[j + 1] += col_offsets[j];
  return "";
}

}  // namespace ipu_sparse_ops
