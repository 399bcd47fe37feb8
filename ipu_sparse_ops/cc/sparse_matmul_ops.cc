// Interfaces and shape functions of the dynamic sparse matmul ops.
//
// The sparsity pattern is a runtime int32 tensor (metainfo), so a new pattern
// of the same capacity never changes a graph. Block size and capacity come
// from nz_values' shape [capacity, block_size, block_size]; metainfo's length
// must then be output_size / block_size + 1 + capacity.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace ipu_sparse_ops {
namespace {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

}  // namespace

REGISTER_OP("IpuSparseMatmul")
    .Input("lhs: T")
    .Input("metainfo: int32")
    .Input("nz_values: T")
    .Input("dense_grad_anchor: T")
    .Input("compute_dense_grad: bool")
    .Output("product: T")
    .Attr("T: {float, half}")
    .Attr("output_size: int >= 1")
    .Attr("pooling_type: {'NONE', 'SUM', 'AVG', 'MAX'} = 'NONE'")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle lhs;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &lhs));
      int64_t output_size;
      TF_RETURN_IF_ERROR(c->GetAttr("output_size", &output_size));
      c->set_output(0, c->Matrix(c->Dim(lhs, 0), output_size));
      return Status();
    })
    .Doc(R"doc(
product = lhs @ W, W [input_size, output_size] block-sparse with its pattern in
metainfo = [col_offsets (output_blocks + 1), row_indices (capacity)] and its
blocks in nz_values [capacity, block_size, block_size].

dense_grad_anchor is never read: its gradient is dL/dW, [input_size,
output_size] for pooling_type NONE, else the SUM/AVG/MAX of |dL/dW| over each
block, [input_blocks, output_blocks] (for block size 1 that is |dL/dW|). It is computed only when
compute_dense_grad (a scalar) is true at run time, zeros otherwise.
)doc");

REGISTER_OP("IpuSparseMatmulGradInput")
    .Input("grad_product: T")
    .Input("metainfo: int32")
    .Input("nz_values: T")
    .Output("grad_lhs: T")
    .Attr("T: {float, half}")
    .Attr("input_size: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle grad;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &grad));
      int64_t input_size;
      TF_RETURN_IF_ERROR(c->GetAttr("input_size", &input_size));
      c->set_output(0, c->Matrix(c->Dim(grad, 0), input_size));
      return Status();
    })
    .Doc("grad_lhs = grad_product @ W^T.");

REGISTER_OP("IpuSparseMatmulGradValues")
    .Input("lhs: T")
    .Input("grad_product: T")
    .Input("metainfo: int32")
    .Output("grad_nz_values: T")
    .Attr("T: {float, half}")
    .Attr("block_size: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle lhs, grad, metainfo;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &lhs));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &grad));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &metainfo));
      int64_t block_size;
      TF_RETURN_IF_ERROR(c->GetAttr("block_size", &block_size));
      DimensionHandle output_blocks, capacity;
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(grad, 1), block_size, true, &output_blocks));
      TF_RETURN_IF_ERROR(c->Subtract(c->Dim(metainfo, 0), output_blocks, &capacity));
      TF_RETURN_IF_ERROR(c->Subtract(capacity, 1, &capacity));
      c->set_output(0, c->MakeShape({capacity, block_size, block_size}));
      return Status();
    })
    .Doc("grad_nz_values[k] = (lhs^T grad_product) on block k; zero past the pattern.");

REGISTER_OP("IpuSparseMatmulPoolAbs")
    .Input("dense: float")
    .Output("pooled: float")
    .Attr("block_size: int >= 1")
    .Attr("pooling_type: {'SUM', 'AVG', 'MAX'}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle dense;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &dense));
      int64_t block_size;
      TF_RETURN_IF_ERROR(c->GetAttr("block_size", &block_size));
      DimensionHandle rows, cols;
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(dense, 0), block_size, true, &rows));
      TF_RETURN_IF_ERROR(c->Divide(c->Dim(dense, 1), block_size, true, &cols));
      c->set_output(0, c->Matrix(rows, cols));
      return Status();
    })
    .Doc("The pool of |dense| over each block_size^2 block: the pooled dense gradient.");

}  // namespace ipu_sparse_ops
