// CPU OpKernels of the dynamic sparse matmul: check every input, convert
// float16 storage to float32 at the edges, and call the plain C++ kernels on
// TensorFlow's intra-op thread pool.
#include <limits>
#include <string>

#include "claiming_parallel_for.h"
#include "sparse_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace ipu_sparse_ops {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;

ParallelFor IntraOpParallelFor(OpKernelContext* ctx) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return ClaimingParallelFor(pool->NumThreads(),
                             [pool](std::function<void()> task) { pool->Schedule(std::move(task)); });
}

// A float32 view of a float or half tensor (half is converted into scratch).
template <typename T>
tensorflow::Status FloatData(OpKernelContext* ctx, const Tensor& t, Tensor* scratch,
                             const float** data) {
  if constexpr (std::is_same_v<T, float>) {
    *data = t.flat<float>().data();
  } else {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, t.shape(), scratch));
    scratch->flat<float>() = t.flat<T>().template cast<float>();
    *data = scratch->flat<float>().data();
  }
  return tensorflow::Status();
}

// Where a kernel writes float32 results for `out`: `out` itself for float, or
// a float scratch that Finish() converts into it for half.
template <typename T>
class FloatOutput {
 public:
  FloatOutput(OpKernelContext* ctx, Tensor* out) : ctx_(ctx), out_(out) {
    if constexpr (std::is_same_v<T, float>) {
      data_ = out->flat<float>().data();
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, out->shape(), &scratch_));
      data_ = scratch_.flat<float>().data();
    }
  }
  float* data() { return data_; }
  void Finish() {
    if constexpr (!std::is_same_v<T, float>) {
      out_->flat<T>() = scratch_.flat<float>().template cast<T>();
    }
  }

 private:
  OpKernelContext* ctx_;
  Tensor* out_;
  Tensor scratch_;
  float* data_ = nullptr;
};

// Checks the pattern tensors against the activations' sizes; sets *pattern.
void ParsePattern(OpKernelContext* ctx, const Tensor& metainfo, int64_t capacity,
                  int64_t block_size, int64_t input_size, int64_t output_size,
                  BlockPattern* pattern) {
  OP_REQUIRES(ctx, metainfo.dims() == 1,
              InvalidArgument("metainfo must be a vector, got shape ", metainfo.shape().DebugString()));
  OP_REQUIRES(ctx, block_size == 1 || block_size == 4 || block_size == 8 || block_size == 16,
              InvalidArgument("block size must be 1, 4, 8 or 16, got ", block_size));
  OP_REQUIRES(ctx, input_size % block_size == 0 && output_size % block_size == 0,
              InvalidArgument("input size ", input_size, " and output size ", output_size,
                              " must be multiples of the block size ", block_size));
  OP_REQUIRES(ctx, capacity <= std::numeric_limits<int32_t>::max(),
              InvalidArgument("capacity ", capacity, " does not fit int32 metainfo"));
  const std::string error = ValidateMetainfo(
      metainfo.flat<int32_t>().data(), metainfo.NumElements(), capacity,
      input_size / block_size, output_size / block_size, block_size, pattern);
  OP_REQUIRES(ctx, error.empty(), InvalidArgument("malformed sparse metainfo: ", error));
}

void CheckValues(OpKernelContext* ctx, const Tensor& values) {
  OP_REQUIRES(ctx, values.dims() == 3 && values.dim_size(1) == values.dim_size(2),
              InvalidArgument("nz_values must be [capacity, block_size, block_size], got ",
                              values.shape().DebugString()));
}

void CheckMatrix(OpKernelContext* ctx, const Tensor& t, const char* name) {
  OP_REQUIRES(ctx, t.dims() == 2,
              InvalidArgument(name, " must be a matrix, got shape ", t.shape().DebugString()));
}

// A W without elements ([0, n] or [n, 0]) makes every product zero. The
// kernels are not asked: they assume both sizes positive (they would divide by
// a zero block count, or leave the output unwritten).
bool EmptyWeight(const BlockPattern& pattern) {
  return pattern.input_blocks == 0 || pattern.output_blocks == 0;
}

template <typename T>
void SetZero(Tensor* t) {
  t->flat<T>().setZero();
}

template <typename T>
class SparseMatmulOp : public OpKernel {
 public:
  explicit SparseMatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("output_size", &output_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pooling_type", &pooling_type_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& lhs = ctx->input(0);
    const Tensor& metainfo = ctx->input(1);
    const Tensor& values = ctx->input(2);
    const Tensor& anchor = ctx->input(3);
    const Tensor& compute_dense_grad = ctx->input(4);
    CheckMatrix(ctx, lhs, "lhs");
    CheckValues(ctx, values);
    if (!ctx->status().ok()) return;
    OP_REQUIRES(ctx, compute_dense_grad.dims() == 0,
                InvalidArgument("compute_dense_grad must be a scalar"));
    const int64_t capacity = values.dim_size(0);
    const int64_t block_size = values.dim_size(1);
    const int64_t input_size = lhs.dim_size(1);
    const int64_t output_size = output_size_;
    BlockPattern pattern;
    ParsePattern(ctx, metainfo, capacity, block_size, input_size, output_size, &pattern);
    if (!ctx->status().ok()) return;
    const int64_t pool = pooling_type_ == "NONE" ? 1 : block_size;
    OP_REQUIRES(ctx, anchor.NumElements() == 0 ||
                         anchor.shape() == TensorShape({input_size / pool, output_size / pool}),
                InvalidArgument("dense_grad_anchor must be empty or have the dense gradient's shape [",
                                input_size / pool, ", ", output_size / pool, "], got ",
                                anchor.shape().DebugString()));

    Tensor* product = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {lhs.dim_size(0), output_size}, &product));
    if (EmptyWeight(pattern)) return SetZero<T>(product);
    Tensor lhs_scratch, values_scratch;
    const float* lhs_data = nullptr;
    OP_REQUIRES_OK(ctx, FloatData<T>(ctx, lhs, &lhs_scratch, &lhs_data));
    const float* values_data = nullptr;
    OP_REQUIRES_OK(ctx, FloatData<T>(ctx, values, &values_scratch, &values_data));
    FloatOutput<T> out(ctx, product);
    if (!ctx->status().ok()) return;
    SparseMatmul(pattern, values_data, lhs_data, lhs.dim_size(0), out.data(),
                 IntraOpParallelFor(ctx));
    out.Finish();
  }

 private:
  int64_t output_size_;
  std::string pooling_type_;
};

template <typename T>
class SparseMatmulGradInputOp : public OpKernel {
 public:
  explicit SparseMatmulGradInputOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("input_size", &input_size_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& metainfo = ctx->input(1);
    const Tensor& values = ctx->input(2);
    CheckMatrix(ctx, grad, "grad_product");
    CheckValues(ctx, values);
    if (!ctx->status().ok()) return;
    const int64_t capacity = values.dim_size(0);
    const int64_t block_size = values.dim_size(1);
    BlockPattern pattern;
    ParsePattern(ctx, metainfo, capacity, block_size, input_size_, grad.dim_size(1), &pattern);
    if (!ctx->status().ok()) return;

    Tensor* grad_lhs = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {grad.dim_size(0), input_size_}, &grad_lhs));
    if (EmptyWeight(pattern)) return SetZero<T>(grad_lhs);
    Tensor grad_scratch, values_scratch;
    const float* grad_data = nullptr;
    OP_REQUIRES_OK(ctx, FloatData<T>(ctx, grad, &grad_scratch, &grad_data));
    const float* values_data = nullptr;
    OP_REQUIRES_OK(ctx, FloatData<T>(ctx, values, &values_scratch, &values_data));
    FloatOutput<T> out(ctx, grad_lhs);
    if (!ctx->status().ok()) return;
    SparseMatmulGradInput(pattern, values_data, grad_data, grad.dim_size(0), out.data(),
                          IntraOpParallelFor(ctx));
    out.Finish();
  }

 private:
  int64_t input_size_;
};

template <typename T>
class SparseMatmulGradValuesOp : public OpKernel {
 public:
  explicit SparseMatmulGradValuesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& lhs = ctx->input(0);
    const Tensor& grad = ctx->input(1);
    const Tensor& metainfo = ctx->input(2);
    CheckMatrix(ctx, lhs, "lhs");
    CheckMatrix(ctx, grad, "grad_product");
    if (!ctx->status().ok()) return;
    OP_REQUIRES(ctx, lhs.dim_size(0) == grad.dim_size(0),
                InvalidArgument("lhs and grad_product batch sizes differ: ", lhs.dim_size(0),
                                " vs ", grad.dim_size(0)));
    OP_REQUIRES(ctx, grad.dim_size(1) % block_size_ == 0,
                InvalidArgument("output size ", grad.dim_size(1),
                                " is not a multiple of the block size ", block_size_));
    const int64_t capacity = metainfo.NumElements() - grad.dim_size(1) / block_size_ - 1;
    OP_REQUIRES(ctx, capacity >= 0, InvalidArgument("metainfo is too short"));
    BlockPattern pattern;
    ParsePattern(ctx, metainfo, capacity, block_size_, lhs.dim_size(1), grad.dim_size(1), &pattern);
    if (!ctx->status().ok()) return;

    Tensor* grad_values = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {capacity, block_size_, block_size_}, &grad_values));
    if (EmptyWeight(pattern)) return SetZero<T>(grad_values);
    Tensor lhs_scratch, grad_scratch;
    const float* lhs_data = nullptr;
    OP_REQUIRES_OK(ctx, FloatData<T>(ctx, lhs, &lhs_scratch, &lhs_data));
    const float* grad_data = nullptr;
    OP_REQUIRES_OK(ctx, FloatData<T>(ctx, grad, &grad_scratch, &grad_data));
    FloatOutput<T> out(ctx, grad_values);
    if (!ctx->status().ok()) return;
    SparseMatmulGradValues(pattern, lhs_data, grad_data, lhs.dim_size(0), capacity,
                           out.data(), IntraOpParallelFor(ctx));
    out.Finish();
  }

 private:
  int64_t block_size_;
};

// The dense gradient itself is TensorFlow's own matmul (ops.py): this op only
// pools it, in one pass, for the block-sparse Rig-L ranking.
class SparseMatmulPoolAbsOp : public OpKernel {
 public:
  explicit SparseMatmulPoolAbsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    std::string pooling_type;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pooling_type", &pooling_type));
    pooling_ = pooling_type == "SUM" ? Pooling::kSum
               : pooling_type == "AVG" ? Pooling::kAvg
                                       : Pooling::kMax;
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dense = ctx->input(0);
    CheckMatrix(ctx, dense, "dense");
    if (!ctx->status().ok()) return;
    const int64_t rows = dense.dim_size(0);
    const int64_t cols = dense.dim_size(1);
    OP_REQUIRES(ctx, rows % block_size_ == 0 && cols % block_size_ == 0,
                InvalidArgument("dense gradient shape [", rows, ", ", cols,
                                "] is not a multiple of the block size ", block_size_));
    Tensor* pooled = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, {rows / block_size_, cols / block_size_}, &pooled));
    if (pooled->NumElements() == 0) return;
    PoolAbsBlocks(dense.flat<float>().data(), rows, cols, block_size_, pooling_,
                  pooled->flat<float>().data(), IntraOpParallelFor(ctx));
  }

 private:
  int64_t block_size_;
  Pooling pooling_;
};

#define IPU_REGISTER_KERNELS(T)                                                         \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("IpuSparseMatmul").Device(DEVICE_CPU).TypeConstraint<T>("T"),                \
      SparseMatmulOp<T>);                                                               \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("IpuSparseMatmulGradInput").Device(DEVICE_CPU).TypeConstraint<T>("T"),       \
      SparseMatmulGradInputOp<T>);                                                      \
  REGISTER_KERNEL_BUILDER(                                                              \
      Name("IpuSparseMatmulGradValues").Device(DEVICE_CPU).TypeConstraint<T>("T"),      \
      SparseMatmulGradValuesOp<T>);

IPU_REGISTER_KERNELS(float)
IPU_REGISTER_KERNELS(Eigen::half)

#undef IPU_REGISTER_KERNELS

REGISTER_KERNEL_BUILDER(Name("IpuSparseMatmulPoolAbs").Device(DEVICE_CPU), SparseMatmulPoolAbsOp);

}  // namespace
}  // namespace ipu_sparse_ops

// The instruction set whose kernels this process runs ("generic", "avx2" or
// "avx512"), for Python through ctypes: it is a property of the library, not a
// tensor, so it is not an op.
extern "C" const char* IpuSparseOpsKernelIsa() { return ipu_sparse_ops::KernelIsa(); }
