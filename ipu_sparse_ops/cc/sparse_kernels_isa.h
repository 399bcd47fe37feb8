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
  // out = lhs @ W. With value_perm == nullptr block k of the pattern is
  // values[k]; otherwise it is values[value_perm[k]] transposed (the pattern
  // being W^T's), which turns the forward kernel into the input gradient.
  void (*matmul)(const BlockPattern& pattern, const float* values,
                 const int32_t* value_perm, const float* lhs, int64_t batch,
                 float* out, const ParallelFor& parallel_for);
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
