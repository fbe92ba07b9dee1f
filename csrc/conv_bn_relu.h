// Shared declarations of the fused Conv1d -> BatchNorm1d -> ReLU (+ residual) kernels.
//
// The contract is docs/spec.md ("Backend contract"): what forward and backward compute, what
// forward saves for backward (x-hat, or y without batch norm) and in which dtype. The kernels
// write into tensors the caller allocates (the Python side allocates them through
// fastres._alloc so tests can poison them with NaN).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>

namespace fastres {

// What the op does with the conv output: no batch norm, the running statistics, batch ones, or
// layer norm over the channels of each position (statistics per (batch item, position), written
// to batch_mean / batch_var of shape (B, L_out); backward's var is that). The codes are
// fastres.conventions.NORM_CODES.
enum NormMode : int64_t { kNormNone = 0, kNormEval = 1, kNormTrain = 2, kNormLayer = 3 };

// The epilogue's activation, which replaces every ReLU of the stage (docs/spec.md,
// "Activation"). The codes are fastres/backends/_activation.py's ACT_*; leaky_relu's slope and
// elu's alpha travel as activation_param.
enum ActivationCode : int64_t {
  kActRelu = 0,
  kActGelu = 1,      // exact: z * Phi(z)
  kActGeluTanh = 2,  // 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
  kActSilu = 3,
  kActTanh = 4,
  kActLeakyRelu = 5,
  kActElu = 6,
};
constexpr int64_t kActivationCount = 7;

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

// Checks shared by both devices (csrc/checks.cpp); they return the geometry.
ConvGeometry check_forward_args(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                int64_t dilation, int64_t pad_left, int64_t pad_right,
                                int64_t norm_mode, const at::Tensor& out,
                                const at::Tensor& saved, const at::Tensor& batch_mean,
                                const at::Tensor& batch_var);
ConvGeometry check_backward_args(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                 int64_t dilation, int64_t pad_left, int64_t pad_right,
                                 int64_t norm_mode, bool relu_before_add, int64_t activation,
                                 const at::Tensor& out, const at::Tensor& saved,
                                 const at::Tensor& grad_x, const at::Tensor& grad_weight);
void check_activation(int64_t activation, double activation_param);

// forward: out, saved (x-hat / y / empty), batch_mean and batch_var (train) are written;
// running_mean / running_var are updated in place in train mode with momentum_factor.
#define FASTRES_FORWARD_ARGS                                                                    \
  const at::Tensor &x, const at::Tensor &weight, const OptTensor &bias, const OptTensor &gamma, \
      const OptTensor &beta, const OptTensor &running_mean, const OptTensor &running_var,       \
      const OptTensor &residual, int64_t stride, int64_t dilation, int64_t pad_left,           \
      int64_t pad_right, int64_t norm_mode, double eps, double momentum_factor,                \
      bool relu_before_add, int64_t activation, double activation_param, const at::Tensor &out, \
      const at::Tensor &saved, const at::Tensor &batch_mean, const at::Tensor &batch_var
// backward: every gradient tensor is written; an absent input's gradient is an empty tensor.
// residual: the forward's, given where an activation other than ReLU follows the residual add
// (backward recomputes the activation's input from saved and it); absent otherwise.
#define FASTRES_BACKWARD_ARGS                                                                 \
  const at::Tensor &grad_out, const at::Tensor &x, const at::Tensor &weight,                  \
      const OptTensor &gamma, const OptTensor &beta, const at::Tensor &saved,                 \
      const at::Tensor &out, const at::Tensor &var, const OptTensor &residual,               \
      bool has_residual, int64_t stride, int64_t dilation, int64_t pad_left,                  \
      int64_t pad_right, int64_t norm_mode, double eps, bool relu_before_add,                 \
      int64_t activation, double activation_param, const at::Tensor &grad_x,                \
      const at::Tensor &grad_weight, const at::Tensor &grad_bias,                             \
      const at::Tensor &grad_gamma, const at::Tensor &grad_beta,                              \
      const at::Tensor &grad_residual

void conv_bn_relu_forward_cpu(FASTRES_FORWARD_ARGS);
void conv_bn_relu_backward_cpu(FASTRES_BACKWARD_ARGS);
#ifdef FASTRES_WITH_CUDA
void conv_bn_relu_forward_cuda(FASTRES_FORWARD_ARGS);
void conv_bn_relu_backward_cuda(FASTRES_BACKWARD_ARGS);
#endif

}  // namespace fastres
