// pybind11 module ipu_sparse_ops.host_utils: the host side of the pattern
// format, so building metainfo for millions of non-zeros every Rig-L step is
// a sort in C++ rather than a Python loop. Shares its checks with the op.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparse_pattern.h"

namespace py = pybind11;

namespace ipu_sparse_ops {
namespace {

using IndexArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using MetainfoArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> ToNumpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

py::tuple BuildMetainfoPy(const IndexArray& rows, const IndexArray& cols,
                          int64_t input_blocks, int64_t output_blocks,
                          int64_t capacity) {
  if (rows.ndim() != 1 || cols.ndim() != 1 || rows.size() != cols.size()) {
    throw std::invalid_argument("row and column indices must be 1-D arrays of equal length");
  }
  std::vector<int32_t> metainfo;
  std::vector<int64_t> order;
  const std::string error =
      BuildMetainfo(rows.data(), cols.data(), rows.size(), input_blocks,
                    output_blocks, capacity, &metainfo, &order);
  if (!error.empty()) throw std::invalid_argument(error);
  return py::make_tuple(ToNumpy(metainfo), ToNumpy(order));
}

py::tuple PatternIndicesPy(const MetainfoArray& metainfo, int64_t capacity,
                           int64_t input_blocks, int64_t output_blocks) {
  if (metainfo.ndim() != 1) throw std::invalid_argument("metainfo must be 1-D");
  BlockPattern pattern;
  const std::string error =
      ValidateMetainfo(metainfo.data(), metainfo.size(), capacity, input_blocks,
                       output_blocks, /*block_size=*/1, &pattern);
  if (!error.empty()) throw std::invalid_argument("malformed sparse metainfo: " + error);
  std::vector<int64_t> rows(pattern.num_blocks()), cols(pattern.num_blocks());
  for (int64_t j = 0; j < output_blocks; ++j) {
    for (int32_t k = pattern.col_offsets[j]; k < pattern.col_offsets[j + 1]; ++k) {
      rows[k] = pattern.row_indices[k];
      cols[k] = j;
    }
  }
  return py::make_tuple(ToNumpy(rows), ToNumpy(cols));
}

}  // namespace
}  // namespace ipu_sparse_ops

PYBIND11_MODULE(host_utils, m) {
  m.doc() = "Host utilities for the dynamic sparse matmul pattern format.";
  m.def("build_metainfo", &ipu_sparse_ops::BuildMetainfoPy, py::arg("rows"),
        py::arg("cols"), py::arg("input_blocks"), py::arg("output_blocks"),
        py::arg("capacity"),
        "(metainfo int32, order int64): the block-CSC metainfo of the given "
        "block coordinates, and for each slot the index of its triplet. "
        "Raises ValueError on an index out of range, a duplicate or too many blocks.");
  m.def("pattern_indices", &ipu_sparse_ops::PatternIndicesPy, py::arg("metainfo"),
        py::arg("capacity"), py::arg("input_blocks"), py::arg("output_blocks"),
        "(rows, cols) of the blocks in metainfo, in slot order, after the same "
        "checks the op makes. Raises ValueError on malformed metainfo.");
}
