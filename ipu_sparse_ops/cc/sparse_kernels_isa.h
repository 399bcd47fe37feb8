// Internal: the kernels that are compiled once per instruction set.
//
// sparse_kernels_isa.cc is built several times with different -m flags (see the
// Makefile); each build defines one IsaKernels table, and sparse_kernels.cc
// picks the best table the running CPU supports.
#ifndef IPU_SPARSE_OPS_CC_SPARSE_KERNELS_ISA_H_
#define IPU_SPARSE_OPS_CC_SPARSE_KERNELS_ISA_H_

#include "sparse_kernels.h"

namespace ipu_sparse_ops {
namespace internal {

struct IsaKernels {
  const char* name;
  // out = lhs @ W, block k of the pattern being values[k] (row-major). Run on
  // W^T's pattern and transposed blocks it is the input gradient.
  void (*matmul)(const BlockPattern& pattern, const float* values,
                 const float* lhs, int64_t batch, float* out,
                 const ParallelFor& parallel_for);
  // grad_lhs = grad_out @ W^T, scattering each non-zero of an element-wise W
  // (no transposed pattern to build). Returns false, having done nothing, for
  // block patterns and where matmul on W^T is faster (see the kernel).
  bool (*grad_input_scatter)(const BlockPattern& pattern, const float* values,
                             const float* grad_out, int64_t batch,
                             float* grad_lhs, const ParallelFor& parallel_for);
  // grad_values[k] = lhs^T grad_out on block k, for k < pattern.num_blocks().
  void (*grad_values)(const BlockPattern& pattern, const float* lhs,
                      const float* grad_out, int64_t batch, float* grad_values,
                      const ParallelFor& parallel_for);
};

extern const IsaKernels kGenericKernels;
#if defined(__x86_64__)
extern const IsaKernels kAvx2Kernels;
extern const IsaKernels kAvx512Kernels;
#endif

}  // namespace internal
}  // namespace ipu_sparse_ops

#endif  // IPU_SPARSE_OPS_CC_SPARSE_KERNELS_ISA_H_
