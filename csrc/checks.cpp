// Argument checks shared by the CPU and CUDA kernels: shapes, contiguity and what the saved
// tensor must hold (docs/spec.md, "Backend contract"). The Python op validates user input with
// clear messages first; these guard the kernels against a caller that breaks the contract.
#include "conv_bn_relu.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace fastres {
namespace {

ConvGeometry geometry(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                      int64_t dilation, int64_t pad_left, int64_t pad_right,
                      const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3, "fastres_ext: x and weight must be 3-D");
  TORCH_CHECK(x.size(1) == weight.size(1), "fastres_ext: channel mismatch");
  TORCH_CHECK(stride >= 1 && dilation >= 1 && pad_left >= 0 && pad_right >= 0,
              "fastres_ext: bad stride/dilation/padding");
  ConvGeometry g{x.size(0), x.size(1), x.size(2), weight.size(0), weight.size(2), 0,
                 stride, dilation, pad_left};
  // conventions.output_length
  g.l_out = (g.length + pad_left + pad_right - dilation * (g.taps - 1) - 1) / stride + 1;
  TORCH_CHECK(g.l_out >= 1, "fastres_ext: empty output");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == g.batch && out.size(1) == g.c_out &&
                  out.size(2) == g.l_out && out.is_contiguous(),
              "fastres_ext: out must be a contiguous (B, C_out, L_out) tensor");
  return g;
}

void check_saved(const at::Tensor& saved, const at::Tensor& out, const char* what) {
  TORCH_CHECK(saved.numel() == 0 || (saved.is_contiguous() && saved.sizes() == out.sizes()),
              "fastres_ext: saved must be empty or shaped like out (", what, ")");
}

}  // namespace

ConvGeometry check_forward_args(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                int64_t dilation, int64_t pad_left, int64_t pad_right,
                                int64_t norm_mode, const at::Tensor& out,
                                const at::Tensor& saved, const at::Tensor& batch_mean,
                                const at::Tensor& batch_var) {
  const ConvGeometry g = geometry(x, weight, stride, dilation, pad_left, pad_right, out);
  check_saved(saved, out, "forward");
  TORCH_CHECK(norm_mode >= kNormNone && norm_mode <= kNormLayer, "fastres_ext: bad norm_mode ",
              norm_mode);
  if (norm_mode == kNormTrain)
    TORCH_CHECK(batch_mean.numel() == g.c_out && batch_var.numel() == g.c_out,
                "fastres_ext: training needs batch_mean/batch_var of C_out values");
  if (norm_mode == kNormLayer)
    TORCH_CHECK(batch_mean.numel() == g.batch * g.l_out && batch_var.numel() == g.batch * g.l_out &&
                    batch_mean.is_contiguous() && batch_var.is_contiguous(),
                "fastres_ext: layer norm needs batch_mean/batch_var of B * L_out values");
  return g;
}

void check_activation(int64_t activation, double activation_param) {
  TORCH_CHECK(activation >= 0 && activation < kActivationCount,
              "fastres_ext: unknown activation code ", activation);
  TORCH_CHECK(std::isfinite(activation_param) && activation_param >= 0 &&
                  (activation != kActElu || activation_param > 0),
              "fastres_ext: bad activation parameter ", activation_param);
}

ConvGeometry check_backward_args(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                 int64_t dilation, int64_t pad_left, int64_t pad_right,
                                 int64_t norm_mode, bool relu_before_add, int64_t activation,
                                 const at::Tensor& out, const at::Tensor& saved,
                                 const at::Tensor& grad_x, const at::Tensor& grad_weight) {
  const ConvGeometry g = geometry(x, weight, stride, dilation, pad_left, pad_right, out);
  check_saved(saved, out, "backward");
  TORCH_CHECK((norm_mode == kNormNone && !relu_before_add && activation == kActRelu) ||
                  saved.numel() == out.numel(),
              "fastres_ext: backward needs the saved x-hat (or y without batch norm)");
  TORCH_CHECK(grad_x.is_contiguous() && grad_weight.is_contiguous(),
              "fastres_ext: gradients must be contiguous");
  TORCH_CHECK(grad_x.numel() == 0 || grad_x.sizes() == x.sizes(),
              "fastres_ext: grad_x must be shaped like x, or empty (x needs no gradient)");
  return g;
}

}  // namespace fastres
