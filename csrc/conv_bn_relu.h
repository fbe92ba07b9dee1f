// Shared declarations of the fused Conv1d -> BatchNorm1d -> ReLU (+ residual) kernels.
//
// The op contract is fastres/backends/reference.py (forward/backward, saved tensors, dtypes);
// SPEC.md says what is computed. The kernels write into tensors the caller allocates (the
// Python backend allocates them through fastres._alloc so tests can poison them with NaN).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>

namespace fastres {

// What the op does with the conv output: no batch norm, the running statistics, or batch ones.
enum NormMode : int64_t { kNormNone = 0, kNormEval = 1, kNormTrain = 2 };

// Sizes and the index arithmetic of a padded, strided, dilated 1-D convolution.
// Output position t reads input position t * stride + k * dilation - pad_left for tap k;
// padding is never materialized: positions outside [0, length) are skipped (they are zeros).
struct ConvGeometry {
  int64_t batch, c_in, length, c_out, taps, l_out, stride, dilation, pad_left;

  int64_t input_pos(int64_t t, int64_t k) const { return t * stride + k * dilation - pad_left; }

  // First output position whose tap k reads inside the input.
  int64_t first_valid(int64_t k) const {
    const int64_t need = pad_left - k * dilation;  // t * stride >= need
    return need <= 0 ? 0 : (need + stride - 1) / stride;
  }
  // One past the last output position whose tap k reads inside the input.
  int64_t end_valid(int64_t k) const {
    const int64_t room = length - 1 + pad_left - k * dilation;  // t * stride <= room
    return room < 0 ? 0 : std::min(l_out, room / stride + 1);
  }
};

using OptTensor = c10::optional<at::Tensor>;

void conv_bn_relu_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& mean,
    const OptTensor& var, const OptTensor& residual, int64_t stride, int64_t dilation,
    int64_t pad_left, int64_t pad_right, int64_t norm_mode, double eps, bool relu_before_add,
    const at::Tensor& out, const at::Tensor& y, const at::Tensor& batch_mean,
    const at::Tensor& batch_var);

void conv_bn_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const at::Tensor& y, const at::Tensor& out, const at::Tensor& mean, const at::Tensor& var,
    bool has_residual, int64_t stride, int64_t dilation, int64_t pad_left, int64_t pad_right,
    int64_t norm_mode, double eps, bool relu_before_add, const at::Tensor& grad_x,
    const at::Tensor& grad_weight, const at::Tensor& grad_bias, const at::Tensor& grad_bn_weight,
    const at::Tensor& grad_bn_bias, const at::Tensor& grad_residual);

#ifdef FASTRES_WITH_CUDA
void conv_bn_relu_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& mean,
    const OptTensor& var, const OptTensor& residual, int64_t stride, int64_t dilation,
    int64_t pad_left, int64_t pad_right, int64_t norm_mode, double eps, bool relu_before_add,
    const at::Tensor& out, const at::Tensor& y, const at::Tensor& batch_mean,
    const at::Tensor& batch_var);

void conv_bn_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const at::Tensor& y, const at::Tensor& out, const at::Tensor& mean, const at::Tensor& var,
    bool has_residual, int64_t stride, int64_t dilation, int64_t pad_left, int64_t pad_right,
    int64_t norm_mode, double eps, bool relu_before_add, const at::Tensor& grad_x,
    const at::Tensor& grad_weight, const at::Tensor& grad_bias, const at::Tensor& grad_bn_weight,
    const at::Tensor& grad_bn_bias, const at::Tensor& grad_residual);
#endif

// Checks shared by both devices; returns the geometry.
ConvGeometry check_forward_args(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                int64_t dilation, int64_t pad_left, int64_t pad_right,
                                const at::Tensor& out);

}  // namespace fastres
