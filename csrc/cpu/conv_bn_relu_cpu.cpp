// CPU kernels of the fused Conv1d -> BatchNorm1d -> ReLU (+ residual) op, forward and backward.
//
// Layout: x (B, C_in, L), weight (C_out, C_in, K), y/out/residual (B, C_out, L_out), all
// contiguous. Inputs may be float32, bfloat16, float16 or float64; everything is computed in
// acc_t (float32, or float64 for float64 inputs) and rounded once when written.
//
// How the work is cut: the output is split into (batch item, tile of TILE output positions)
// work items, run by at::parallel_for. Per item the conv is K GEMMs (one per tap k) on the
// tile's accumulator:  acc[C_out, tile] += W_k[C_out, C_in] @ x[b, :, t*stride + k*d - pad_left]
// over the columns of the tile whose input position lies inside [0, L). Padding is therefore
// index bounds on the GEMM's column range, never a padded copy of x. At stride 1 the shifted
// input is a plain strided view of x (row stride L) that BLAS reads in place; at stride > 1 the
// tile's columns are gathered into a small per-tile buffer first.
// While the accumulator is still in cache the rest of the stage runs on it:
//   eval  : BN folded into W and the bias beforehand; out = relu(relu?(acc) + residual)
//   none  : out = relu(relu?(acc) + residual)
//   train : per-tile (count, mean, M2) of every channel, merged in a fixed order (Chan), then a
//           second pass out = relu(relu?(y * scale + shift) + residual) over y.
//   layer : layer norm over the channels of each position: the tile holds every channel of
//           its positions, so their mean and variance (two passes over the channels, in order)
//           and the epilogue run on it in cache; backward's projection over the channels of a
//           position is a pass per batch item.
// Another activation (gelu, gelu_tanh, silu, tanh, leaky_relu, elu) replaces both ReLUs in the
// same places; the activation is a template parameter of the epilogue and of backward's first
// pass, so ReLU's loops are the ones they were. Its derivative is taken at its input, which
// backward recomputes from the saved x-hat (or y) and the residual with forward's expression.
// The tiling depends only on the shapes, never on the thread count, and every reduction runs in
// a fixed order, so the results do not depend on the number of threads (weight gradient: BLAS
// threads over the output, see below).
//
// Why GEMMs inside at::parallel_for: BLAS called inside a parallel region runs single-threaded,
// so the cores are used by the tiles and each tile's epilogue runs on the core that holds it in
// cache. One multi-threaded GEMM over a whole batch item measured no faster and needs a separate
// pass over y for the epilogue.
#include "../conv_bn_relu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "blas.h"

namespace fastres {
namespace {

template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

// Row-major C[m, n] = op(A)[m, kd] @ op(B)[kd, n] + beta * C.
// A is stored (m x kd) with row stride lda, or (kd x m) when trans_a; B likewise (kd x n) or
// (n x kd) when trans_b. Row strides let A, B and C be windows into larger matrices.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t kd, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0 || kd <= 0) return;  // callers never need the kd == 0 case
#ifdef FASTRES_BLAS_SYMBOLS
  // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T @ op(A)^T.
  const char op_b = trans_b ? 'T' : 'N', op_a = trans_a ? 'T' : 'N';
  const int cm = static_cast<int>(n), cn = static_cast<int>(m), ck = static_cast<int>(kd);
  const int l_b = static_cast<int>(ldb), l_a = static_cast<int>(lda);
  const int l_c = static_cast<int>(ldc);
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&op_b, &op_a, &cm, &cn, &ck, &one, b, &l_b, a, &l_a, &beta, c, &l_c);
  } else {
    dgemm_(&op_b, &op_a, &cm, &cn, &ck, &one, b, &l_b, a, &l_a, &beta, c, &l_c);
  }
#else
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols},
                                 {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor c_view = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::Tensor a_view = view(a, m, kd, lda, trans_a), b_view = view(b, kd, n, ldb, trans_b);
  if (beta == T(0)) {
    at::mm_out(c_view, a_view, b_view);
  } else {
    c_view.addmm_(a_view, b_view, beta, 1);
  }
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Reductions keep kLanes independent partial sums (element i goes to lane i % kLanes) so the
// compiler can vectorize them without reassociating floating point itself; the order depends
// on the length alone, so results stay deterministic.
constexpr int kLanes = 8;

template <typename acc_t>
acc_t sum_lanes(const acc_t (&part)[kLanes]) {
  acc_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// Sum of term(i) over [0, n), in lanes.
template <typename acc_t, typename Term>
acc_t lane_sum(int64_t n, Term term) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += term(i + l);
  for (; i < n; ++i) part[i % kLanes] += term(i);
  return sum_lanes(part);
}

// Output positions per work item: long enough for the GEMMs to run at speed, short enough that
// the (C_out x tile) accumulator stays in L2, and small enough to give both cores several items
// at small batch. Depends on the shapes only (see the file comment on thread independence).
int64_t tile_length(int64_t channels, int64_t batch, int64_t length) {
  int64_t tile = 512;
  // (256 KiB and 128 KiB budgets measured the same as 512 KiB at C=128/256; MKL blocks inside.)
  while (tile > 64 && channels * tile * 4 > (512 << 10)) tile /= 2;
  while (tile > 64 && batch * ceil_div(length, tile) < 8) tile /= 2;
  const int64_t tiles = ceil_div(length, std::min(tile, length));
  return ceil_div(length, tiles);  // equal tiles
}

// The activation at z (docs/spec.md, "Activation"), with PyTorch's formulas; `a` is
// leaky_relu's slope or elu's alpha. ReLU as torch.relu: `z < 0 ? 0 : z` keeps NaN, where
// std::max would drop it.
constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kGeluKappa = 0.044715;

template <int64_t kAct, typename acc_t>
inline acc_t activate(acc_t z, acc_t a) {
  if constexpr (kAct == kActRelu) {
    return z < acc_t(0) ? acc_t(0) : z;
  } else if constexpr (kAct == kActGelu) {
    return z * acc_t(0.5) * (acc_t(1) + std::erf(z * acc_t(kSqrtHalf)));
  } else if constexpr (kAct == kActGeluTanh) {
    const acc_t u = acc_t(kSqrt2OverPi) * (z + acc_t(kGeluKappa) * z * z * z);
    return acc_t(0.5) * z * (acc_t(1) + std::tanh(u));
  } else if constexpr (kAct == kActSilu) {
    return z / (acc_t(1) + std::exp(-z));
  } else if constexpr (kAct == kActTanh) {
    return std::tanh(z);
  } else if constexpr (kAct == kActLeakyRelu) {
    return z > acc_t(0) ? z : z * a;
  } else {
    static_assert(kAct == kActElu, "unknown activation");
    return z > acc_t(0) ? z : a * std::expm1(z);
  }
}

// d activate / dz at z, as PyTorch's backward formulas (leaky_relu and elu: the slope side
// wherever z > 0 is false, NaN included, as theirs).
template <int64_t kAct, typename acc_t>
inline acc_t activation_grad(acc_t z, acc_t a) {
  if constexpr (kAct == kActGelu) {
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(z * acc_t(kSqrtHalf)));
    return cdf + z * acc_t(kInvSqrt2Pi) * std::exp(acc_t(-0.5) * z * z);
  } else if constexpr (kAct == kActGeluTanh) {
    const acc_t z2 = z * z;
    const acc_t t = std::tanh(acc_t(kSqrt2OverPi) * (z + acc_t(kGeluKappa) * z2 * z));
    return acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * z * (acc_t(1) - t * t) *
                                             acc_t(kSqrt2OverPi) *
                                             (acc_t(1) + acc_t(3 * kGeluKappa) * z2);
  } else if constexpr (kAct == kActSilu) {
    const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-z));
    return s * (acc_t(1) + z * (acc_t(1) - s));
  } else if constexpr (kAct == kActTanh) {
    const acc_t t = std::tanh(z);
    return acc_t(1) - t * t;
  } else if constexpr (kAct == kActLeakyRelu) {
    return z > acc_t(0) ? acc_t(1) : a;
  } else {
    static_assert(kAct == kActElu, "ReLU's gradient is its mask (grad_mask_row)");
    return z > acc_t(0) ? acc_t(1) : a * std::exp(z);
  }
}

// Calls f with the activation code as a compile-time constant.
template <typename F>
void with_activation(int64_t code, F&& f) {
  switch (code) {
    case kActRelu: return f(std::integral_constant<int64_t, kActRelu>{});
    case kActGelu: return f(std::integral_constant<int64_t, kActGelu>{});
    case kActGeluTanh: return f(std::integral_constant<int64_t, kActGeluTanh>{});
    case kActSilu: return f(std::integral_constant<int64_t, kActSilu>{});
    case kActTanh: return f(std::integral_constant<int64_t, kActTanh>{});
    case kActLeakyRelu: return f(std::integral_constant<int64_t, kActLeakyRelu>{});
    case kActElu: return f(std::integral_constant<int64_t, kActElu>{});
    default: TORCH_CHECK(false, "fastres_ext: unknown activation code ", code);
  }
}

template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// Taps repacked as W_k[C_out, C_in] (k-major) in acc_t, each row scaled by row_scale (BN fold).
template <typename acc_t>
std::vector<acc_t> pack_taps(const at::Tensor& weight, const std::vector<acc_t>* row_scale) {
  const at::Tensor w = as_acc<acc_t>(weight);
  const int64_t c_out = w.size(0), c_in = w.size(1), taps = w.size(2);
  const acc_t* src = w.data_ptr<acc_t>();
  std::vector<acc_t> packed(taps * c_out * c_in);
  for (int64_t co = 0; co < c_out; ++co) {
    const acc_t s = row_scale ? (*row_scale)[co] : acc_t(1);
    for (int64_t ci = 0; ci < c_in; ++ci)
      for (int64_t k = 0; k < taps; ++k)
        packed[(k * c_out + co) * c_in + ci] = src[(co * c_in + ci) * taps + k] * s;
  }
  return packed;
}

template <typename acc_t>
std::vector<acc_t> to_vector(const OptTensor& t, int64_t n, acc_t fill) {
  std::vector<acc_t> v(n, fill);
  if (t.has_value() && t->defined() && t->numel() > 0) {
    const at::Tensor c = as_acc<acc_t>(*t);
    std::copy(c.data_ptr<acc_t>(), c.data_ptr<acc_t>() + n, v.begin());
  }
  return v;
}

// acc[C_out, nt] (row stride nt) = bias + conv of batch item xb over output positions
// [t0, t0 + nt). gather is scratch of C_in * nt values, used at stride > 1.
template <typename acc_t>
void conv_tile(const ConvGeometry& g, const acc_t* xb, const acc_t* taps, const acc_t* bias,
               int64_t t0, int64_t nt, acc_t* acc, acc_t* gather) {
  for (int64_t co = 0; co < g.c_out; ++co) std::fill(acc + co * nt, acc + (co + 1) * nt, bias[co]);
  for (int64_t k = 0; k < g.taps; ++k) {
    const int64_t lo = std::max(t0, g.first_valid(k)), hi = std::min(t0 + nt, g.end_valid(k));
    if (lo >= hi) continue;  // this tap reads only padding here
    const acc_t* w_k = taps + k * g.c_out * g.c_in;
    const acc_t* cols = xb + g.input_pos(lo, k);
    int64_t ld = g.length;
    if (g.stride > 1) {
      for (int64_t ci = 0; ci < g.c_in; ++ci)
        for (int64_t t = lo; t < hi; ++t)
          gather[ci * (hi - lo) + (t - lo)] = xb[ci * g.length + g.input_pos(t, k)];
      cols = gather;
      ld = hi - lo;
    }
    gemm<acc_t>(false, false, g.c_out, hi - lo, g.c_in, w_k, g.c_in, cols, ld, acc_t(1),
                acc + (lo - t0), nt);
  }
}

// running <- (1 - f) running + f batch, with the unbiased variance (n / (n - 1)), as
// nn.BatchNorm1d updates its buffers. The running statistics are float32 or float64.
template <typename acc_t>
void update_running_stats(const OptTensor& running_mean, const OptTensor& running_var,
                          const acc_t* mean, const acc_t* var, int64_t c_out, int64_t n,
                          double factor) {
  if (!running_mean.has_value() || !running_mean->defined()) return;
  AT_DISPATCH_FLOATING_TYPES(running_mean->scalar_type(), "fastres_running_stats", [&] {
    scalar_t* rm = running_mean->data_ptr<scalar_t>();
    scalar_t* rv = running_var->data_ptr<scalar_t>();
    const double unbiased = static_cast<double>(n) / static_cast<double>(n - 1);
    for (int64_t c = 0; c < c_out; ++c) {
      rm[c] = static_cast<scalar_t>((1 - factor) * rm[c] + factor * mean[c]);
      rv[c] = static_cast<scalar_t>((1 - factor) * rv[c] + factor * var[c] * unbiased);
    }
  });
}

// One row of n values of the forward epilogue. With kNorm the row is normalized,
//   xhat = (v - mean) * invstd,  z = xhat * gamma + beta,  saved = xhat;
// without, z = v (no batch norm, or batch norm already folded into the conv) and saved = v.
// Then out = act(act?(z) + residual), act ReLU unless kAct says otherwise. `saved` may be null
// (backward needs nothing).
// backward recomputes the inner ReLU mask (another activation: its input) as
// xhat * gamma + beta from the saved xhat, the same float expression as here, so both sides
// agree on every mask.
template <int64_t kAct, bool kNorm, bool kReluBeforeAdd, bool kResidual, typename scalar_t,
          typename acc_t, typename saved_t>
void epilogue_row(const acc_t* v, int64_t n, acc_t mean, acc_t invstd, acc_t gamma, acc_t beta,
                  acc_t act_param, const scalar_t* res, scalar_t* out, saved_t* saved) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t z = v[i];
    if (kNorm) {
      const acc_t xhat = (v[i] - mean) * invstd;
      if (saved) saved[i] = static_cast<saved_t>(xhat);
      z = xhat * gamma + beta;
    } else if (saved) {
      saved[i] = static_cast<saved_t>(v[i]);
    }
    if (kReluBeforeAdd) z = activate<kAct>(z, act_param);
    if (kResidual) z += static_cast<acc_t>(res[i]);
    out[i] = static_cast<scalar_t>(activate<kAct>(z, act_param));
  }
}

// The per-channel values the epilogue uses.
template <typename acc_t>
struct ChannelAffine { acc_t mean, invstd, gamma, beta; };

// epilogue_row with the mode flags resolved once per row (the loop itself has no branches).
template <int64_t kAct, typename scalar_t, typename acc_t, typename saved_t>
void epilogue(const acc_t* v, int64_t n, bool normalize, const ChannelAffine<acc_t>& a,
              bool relu_before_add, acc_t act_param, const scalar_t* res, scalar_t* out,
              saved_t* saved) {
  auto run = [&](auto norm_c, auto rba_c, auto res_c) {
    epilogue_row<kAct, decltype(norm_c)::value, decltype(rba_c)::value,
                 decltype(res_c)::value>(v, n, a.mean, a.invstd, a.gamma, a.beta, act_param,
                                         res, out, saved);
  };
  using T = std::true_type;
  using F = std::false_type;
  auto with_res = [&](auto norm_c, auto rba_c) {
    res ? run(norm_c, rba_c, T{}) : run(norm_c, rba_c, F{});
  };
  auto with_rba = [&](auto norm_c) {
    relu_before_add ? with_res(norm_c, T{}) : with_res(norm_c, F{});
  };
  normalize ? with_rba(T{}) : with_rba(F{});
}

// Layer norm's forward on one tile acc[C_out, nt] (row stride nt) that holds every channel of
// its positions: per position, the mean and biased variance over the channels (two passes, the
// channels in order, vectorized over positions) into pos_mean / pos_var, then each channel row's
// x-hat = (y - mean) * invstd and the epilogue on it (x-hat with mean 0 and invstd 1, which
// leave it exact, so backward's recomputation x-hat * gamma + beta is forward's). Rows of
// out / residual / saved start at base + co * row_stride.
template <int64_t kAct, typename scalar_t, typename acc_t, typename saved_t>
void layer_norm_tile(const acc_t* acc, int64_t nt, int64_t c_out, acc_t eps,
                     const std::vector<acc_t>& gamma, const std::vector<acc_t>& beta,
                     bool relu_before_add, acc_t act_param, acc_t* mean, acc_t* invstd,
                     acc_t* xhat, acc_t* pos_mean, acc_t* pos_var, const scalar_t* res,
                     scalar_t* out, saved_t* saved, int64_t base, int64_t row_stride) {
  std::fill(mean, mean + nt, acc_t(0));
  std::fill(invstd, invstd + nt, acc_t(0));
  for (int64_t co = 0; co < c_out; ++co) {
    const acc_t* row = acc + co * nt;
    for (int64_t i = 0; i < nt; ++i) mean[i] += row[i];
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(c_out);
  for (int64_t i = 0; i < nt; ++i) mean[i] *= inv_c;
  for (int64_t co = 0; co < c_out; ++co) {
    const acc_t* row = acc + co * nt;
    for (int64_t i = 0; i < nt; ++i) invstd[i] += (row[i] - mean[i]) * (row[i] - mean[i]);
  }
  for (int64_t i = 0; i < nt; ++i) {
    const acc_t var = invstd[i] * inv_c;
    pos_mean[i] = mean[i];
    pos_var[i] = var;
    invstd[i] = acc_t(1) / std::sqrt(var + eps);
  }
  for (int64_t co = 0; co < c_out; ++co) {
    const acc_t* row = acc + co * nt;
    for (int64_t i = 0; i < nt; ++i) xhat[i] = (row[i] - mean[i]) * invstd[i];
    const int64_t at = base + co * row_stride;
    epilogue<kAct>(xhat, nt, true, ChannelAffine<acc_t>{0, 1, gamma[co], beta[co]},
                   relu_before_add, act_param, res ? res + at : nullptr, out + at,
                   saved ? saved + at : saved);
  }
}

// Calls f with the typed pointer of `saved`: scalar_t*, acc_t* (float32 x-hat for 16-bit
// inputs, conventions.saved_dtype), or a null scalar_t* when nothing is saved.
template <typename scalar_t, typename acc_t, typename F>
void with_saved_ptr(const at::Tensor& saved, F&& f) {
  if (saved.numel() == 0) {
    f(static_cast<scalar_t*>(nullptr));
  } else if (saved.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    f(saved.data_ptr<scalar_t>());
  } else {
    TORCH_CHECK(saved.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "fastres_ext: saved must have x's dtype or the accumulation dtype");
    f(saved.data_ptr<acc_t>());
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x_in, const at::Tensor& weight, const OptTensor& bias,
                    const OptTensor& bn_weight, const OptTensor& bn_bias,
                    const OptTensor& running_mean, const OptTensor& running_var,
                    const OptTensor& residual, const ConvGeometry& g, int64_t norm_mode,
                    double eps, double momentum_factor, bool relu_before_add,
                    int64_t activation, double activation_param, const at::Tensor& out,
                    const at::Tensor& saved, const at::Tensor& batch_mean,
                    const at::Tensor& batch_var) {
  using acc_t = typename AccType<scalar_t>::type;
  const bool save = saved.numel() > 0;
  const int64_t c_out = g.c_out, l_out = g.l_out;
  const at::Tensor x = as_acc<acc_t>(x_in);  // no copy for float32 / float64
  const acc_t* xp = x.data_ptr<acc_t>();
  const at::Tensor res_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  const scalar_t* res = res_c.defined() ? res_c.data_ptr<scalar_t>() : nullptr;
  scalar_t* outp = out.data_ptr<scalar_t>();
  const bool train = norm_mode == kNormTrain, eval = norm_mode == kNormEval;
  const bool layer = norm_mode == kNormLayer;
  acc_t* pos_mean = layer ? batch_mean.data_ptr<acc_t>() : nullptr;  // (B, L_out)
  acc_t* pos_var = layer ? batch_var.data_ptr<acc_t>() : nullptr;

  // Per channel: the conv bias and the epilogue's normalization.
  std::vector<acc_t> conv_bias = to_vector<acc_t>(bias, c_out, 0);
  const std::vector<acc_t> gamma = to_vector<acc_t>(bn_weight, c_out, 1);
  const std::vector<acc_t> beta = to_vector<acc_t>(bn_bias, c_out, 0);
  std::vector<ChannelAffine<acc_t>> affine(c_out, ChannelAffine<acc_t>{0, 1, 1, 0});
  bool normalize = false;
  std::vector<acc_t> fold_scale;  // empty: taps unscaled
  if (eval) {
    const std::vector<acc_t> rmean = to_vector<acc_t>(running_mean, c_out, 0);
    const std::vector<acc_t> rvar = to_vector<acc_t>(running_var, c_out, 1);
    for (int64_t c = 0; c < c_out; ++c)
      affine[c] = {rmean[c], acc_t(1) / std::sqrt(rvar[c] + static_cast<acc_t>(eps)), gamma[c],
                   beta[c]};
    // Fold unless backward needs x-hat, or a channel's invstd is not finite (eps = 0 with a
    // zero running variance): then (y - mean) * invstd gives +-inf as the unfolded formula
    // does, where W * inf would turn every sum into NaN.
    normalize = save || std::any_of(affine.begin(), affine.end(), [](const auto& a) {
                  return !std::isfinite(static_cast<double>(a.invstd));
                });
    if (!normalize) {
      // Nothing asks for x-hat: fold BN into the conv, W' = W * gamma * invstd and
      // b' = (b - mean) * gamma * invstd + beta, so the epilogue is only the ReLUs and the add.
      fold_scale.resize(c_out);
      for (int64_t c = 0; c < c_out; ++c) {
        fold_scale[c] = gamma[c] * affine[c].invstd;
        conv_bias[c] = (conv_bias[c] - affine[c].mean) * fold_scale[c] + beta[c];
      }
    }
  }
  const std::vector<acc_t> taps =
      pack_taps<acc_t>(weight, fold_scale.empty() ? nullptr : &fold_scale);

  const int64_t tile = tile_length(c_out, g.batch, l_out);
  const int64_t tiles_per_item = ceil_div(l_out, tile);
  const int64_t items = g.batch * tiles_per_item;

  // Training keeps the conv output in acc_t until the statistics are known.
  at::Tensor y_acc = train ? at::empty({g.batch, c_out, l_out}, x.options()) : at::Tensor();
  acc_t* y_accp = train ? y_acc.data_ptr<acc_t>() : nullptr;
  // Per (work item, channel) statistics of the tile: count is the tile's length.
  std::vector<acc_t> part_mean(train ? items * c_out : 0), part_m2(train ? items * c_out : 0);

  const acc_t act_param = static_cast<acc_t>(activation_param);
  with_activation(activation, [&](auto act_c) {
  constexpr int64_t kAct = decltype(act_c)::value;
  with_saved_ptr<scalar_t, acc_t>(saved, [&](auto* savedp) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(c_out * tile);
      std::vector<acc_t> gather(g.stride > 1 ? g.c_in * tile : 0);
      std::vector<acc_t> col_mean(layer ? tile : 0), col_invstd(layer ? tile : 0);
      std::vector<acc_t> xhat_row(layer ? tile : 0);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / tiles_per_item, t0 = (item % tiles_per_item) * tile;
        const int64_t nt = std::min(tile, l_out - t0);
        conv_tile<acc_t>(g, xp + b * g.c_in * g.length, taps.data(), conv_bias.data(), t0, nt,
                         acc.data(), gather.data());
        if (layer) {
          layer_norm_tile<kAct>(acc.data(), nt, c_out, static_cast<acc_t>(eps), gamma, beta,
                                relu_before_add, act_param, col_mean.data(), col_invstd.data(),
                                xhat_row.data(), pos_mean + b * l_out + t0,
                                pos_var + b * l_out + t0, res, outp, savedp,
                                b * c_out * l_out + t0, l_out);
          continue;
        }
        for (int64_t co = 0; co < c_out; ++co) {
          const acc_t* row = acc.data() + co * nt;
          const int64_t base = (b * c_out + co) * l_out + t0;
          if (train) {
            // Two passes over the row while it is in L1: the tile's mean, then its M2.
            const acc_t m = lane_sum<acc_t>(nt, [&](int64_t i) { return row[i]; }) /
                            static_cast<acc_t>(nt);
            const acc_t m2 =
                lane_sum<acc_t>(nt, [&](int64_t i) { return (row[i] - m) * (row[i] - m); });
            part_mean[item * c_out + co] = m;
            part_m2[item * c_out + co] = m2;
            std::copy(row, row + nt, y_accp + base);
          } else {
            epilogue<kAct>(row, nt, normalize, affine[co], relu_before_add, act_param,
                           res ? res + base : nullptr, outp + base,
                           savedp ? savedp + base : savedp);
          }
        }
      }
    });
    if (!train) return;

    // Merge the tiles' (count, mean, M2) per channel in item order (Chan et al.):
    // deterministic, and exact where sum / sum-of-squares would cancel when |mean| >> std.
    acc_t* bmean = batch_mean.data_ptr<acc_t>();
    acc_t* bvar = batch_var.data_ptr<acc_t>();
    for (int64_t co = 0; co < c_out; ++co) {  // serial: cheaper than a parallel region
      acc_t n = 0, m = 0, m2 = 0;
      for (int64_t item = 0; item < items; ++item) {
        const int64_t t0 = (item % tiles_per_item) * tile;
        const acc_t nb = static_cast<acc_t>(std::min(tile, l_out - t0));
        const acc_t mb = part_mean[item * c_out + co], delta = mb - m, total = n + nb;
        m += delta * (nb / total);
        m2 += part_m2[item * c_out + co] + delta * delta * (n * nb / total);
        n = total;
      }
      bmean[co] = m;
      bvar[co] = m2 / n;
      affine[co] = {m, acc_t(1) / std::sqrt(m2 / n + static_cast<acc_t>(eps)), gamma[co],
                    beta[co]};
    }
    update_running_stats<acc_t>(running_mean, running_var, bmean, bvar, c_out,
                                g.batch * l_out, momentum_factor);

    // Second pass: normalize (saving x-hat), residual, ReLU; rows of (batch item, channel).
    at::parallel_for(0, g.batch * c_out, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t co = r % c_out, base = r * l_out;
        epilogue<kAct>(y_accp + base, l_out, true, affine[co], relu_before_add, act_param,
                       res ? res + base : nullptr, outp + base,
                       savedp ? savedp + base : savedp);
      }
    });
  });
  });
}

template <typename acc_t>
struct GradRowSums { acc_t g, gxhat, gy; };

// One row (batch item, channel) of the backward's first pass, specialized so the loop has no
// branches on the mode: g = grad_out masked where out <= 0 (torch.relu's backward: a NaN output
// passes the gradient), and where xhat * gamma + beta <= 0 (or y <= 0 without norm) when
// relu_before_add; grad_residual = g; grad_y = g (train: finished in pass 2) or
// gamma * invstd * g (eval). `saved` is the forward's saved tensor: x-hat, or y without norm.
// Returns the row's sums of g, g * xhat and grad_y.
template <bool kNorm, bool kTrain, bool kRba, bool kRes, typename scalar_t, typename acc_t,
          typename saved_t>
GradRowSums<acc_t> grad_mask_row(const scalar_t* grad_out, const scalar_t* out,
                                 const saved_t* saved, int64_t n, acc_t invstd, acc_t gamma,
                                 acc_t beta, scalar_t* grad_res, acc_t* grad_y) {
  const acc_t k1 = (kNorm && !kTrain) ? gamma * invstd : acc_t(1);
  acc_t sum_g[kLanes] = {}, sum_gx[kLanes] = {}, sum_gy[kLanes] = {};
  auto element = [&](int64_t i, int lane) {
    acc_t gi = static_cast<acc_t>(out[i]) <= acc_t(0) ? acc_t(0) : static_cast<acc_t>(grad_out[i]);
    if (kRes) grad_res[i] = static_cast<scalar_t>(gi);
    if (kNorm) {
      const acc_t xhat = static_cast<acc_t>(saved[i]);
      if (kRba) gi = xhat * gamma + beta <= acc_t(0) ? acc_t(0) : gi;
      sum_g[lane] += gi;
      sum_gx[lane] += gi * xhat;
    } else if (kRba) {
      gi = static_cast<acc_t>(saved[i]) <= acc_t(0) ? acc_t(0) : gi;
    }
    const acc_t gy = gi * k1;
    sum_gy[lane] += gy;
    grad_y[i] = gy;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) element(i + l, l);
  for (; i < n; ++i) element(i, static_cast<int>(i % kLanes));
  return {sum_lanes(sum_g), sum_lanes(sum_gx), sum_lanes(sum_gy)};
}

// grad_mask_row for an activation other than ReLU: its derivative at its input z2 =
// act?(z1) + residual, z1 = xhat * gamma + beta (or y = saved without norm), recomputed with
// forward's float expressions; with relu_before_add also at z1.
template <int64_t kAct, bool kNorm, bool kTrain, bool kRba, bool kRes, typename scalar_t,
          typename acc_t, typename saved_t>
GradRowSums<acc_t> grad_activation_row(const scalar_t* grad_out, const scalar_t* res,
                                       const saved_t* saved, int64_t n, acc_t invstd,
                                       acc_t gamma, acc_t beta, acc_t act_param,
                                       scalar_t* grad_res, acc_t* grad_y) {
  const acc_t k1 = (kNorm && !kTrain) ? gamma * invstd : acc_t(1);
  acc_t sum_g[kLanes] = {}, sum_gx[kLanes] = {}, sum_gy[kLanes] = {};
  auto element = [&](int64_t i, int lane) {
    const acc_t s = static_cast<acc_t>(saved[i]);
    const acc_t z1 = kNorm ? s * gamma + beta : s;
    acc_t z2 = kRba ? activate<kAct>(z1, act_param) : z1;
    if (kRes) z2 += static_cast<acc_t>(res[i]);
    acc_t gi = static_cast<acc_t>(grad_out[i]) * activation_grad<kAct>(z2, act_param);
    if (kRes) grad_res[i] = static_cast<scalar_t>(gi);
    if (kRba) gi *= activation_grad<kAct>(z1, act_param);
    if (kNorm) {
      sum_g[lane] += gi;
      sum_gx[lane] += gi * s;
    }
    const acc_t gy = gi * k1;
    sum_gy[lane] += gy;
    grad_y[i] = gy;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) element(i + l, l);
  for (; i < n; ++i) element(i, static_cast<int>(i % kLanes));
  return {sum_lanes(sum_g), sum_lanes(sum_gx), sum_lanes(sum_gy)};
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                     const at::Tensor& weight, const OptTensor& bn_weight,
                     const OptTensor& bn_bias, const at::Tensor& saved_in,
                     const at::Tensor& out_in, const at::Tensor& var,
                     const OptTensor& residual, bool has_residual, const ConvGeometry& g,
                     int64_t norm_mode, double eps, bool relu_before_add, int64_t activation,
                     double activation_param, const at::Tensor& grad_x,
                     const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                     const at::Tensor& grad_bn_weight, const at::Tensor& grad_bn_bias,
                     const at::Tensor& grad_residual) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t c_out = g.c_out, c_in = g.c_in, l_out = g.l_out, rows = g.batch * c_out;
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor saved = saved_in.contiguous();
  const scalar_t* gop = grad_out.data_ptr<scalar_t>();
  const scalar_t* outp = out.data_ptr<scalar_t>();
  scalar_t* gresp = has_residual ? grad_residual.data_ptr<scalar_t>() : nullptr;
  const at::Tensor res_c = activation != kActRelu && has_residual ? residual->contiguous()
                                                                  : at::Tensor();
  const scalar_t* resp = res_c.defined() ? res_c.data_ptr<scalar_t>() : nullptr;
  const acc_t act_param = static_cast<acc_t>(activation_param);
  const bool norm = norm_mode != kNormNone, train = norm_mode == kNormTrain;
  const bool layer = norm_mode == kNormLayer;

  std::vector<acc_t> invstd(c_out, 1);
  const std::vector<acc_t> gamma = to_vector<acc_t>(bn_weight, c_out, 1);
  const std::vector<acc_t> beta = to_vector<acc_t>(bn_bias, c_out, 0);
  if (norm && !layer) {
    const std::vector<acc_t> v = to_vector<acc_t>(var, c_out, 1);
    for (int64_t c = 0; c < c_out; ++c)
      invstd[c] = acc_t(1) / std::sqrt(v[c] + static_cast<acc_t>(eps));
  }

  // grad_y in acc_t: the gradient reaching the conv output, per row (batch item, channel).
  at::Tensor grad_y = at::empty({g.batch, c_out, l_out},
                                x_in.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* gyp = grad_y.data_ptr<acc_t>();
  // Per-row partial sums, reduced over the batch in a fixed order below.
  std::vector<acc_t> row_g(rows, 0), row_gxhat(rows, 0), row_gy(rows, 0);
  std::vector<acc_t> grad_beta(c_out, 0), grad_gamma(c_out, 0);

  with_saved_ptr<scalar_t, acc_t>(saved, [&](auto* savedp) {
  // Pass 1: g = grad_out through the ReLU masks; grad_residual = g; sums of g and g * xhat.
  // In eval/none mode grad_y is final here (it needs no batch-wide sums).
  auto pass1 = [&](auto norm_c, auto train_c, auto rba_c, auto res_c) {
    constexpr bool kNorm = decltype(norm_c)::value, kTrain = decltype(train_c)::value;
    constexpr bool kRba = decltype(rba_c)::value, kRes = decltype(res_c)::value;
    with_activation(activation, [&](auto act_c) {
      constexpr int64_t kAct = decltype(act_c)::value;
      at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t c = r % c_out, base = r * l_out;
          GradRowSums<acc_t> sums;
          if constexpr (kAct == kActRelu) {
            sums = grad_mask_row<kNorm, kTrain, kRba, kRes>(
                gop + base, outp + base, savedp ? savedp + base : savedp, l_out, invstd[c],
                gamma[c], beta[c], kRes ? gresp + base : nullptr, gyp + base);
          } else {
            sums = grad_activation_row<kAct, kNorm, kTrain, kRba, kRes>(
                gop + base, kRes ? resp + base : nullptr, savedp + base, l_out, invstd[c],
                gamma[c], beta[c], act_param, kRes ? gresp + base : nullptr, gyp + base);
          }
          row_g[r] = sums.g;
          row_gxhat[r] = sums.gxhat;
          row_gy[r] = sums.gy;
        }
      });
    });
  };
  using T = std::true_type;
  using F = std::false_type;
  auto with_res = [&](auto norm_c, auto train_c, auto rba_c) {
    has_residual ? pass1(norm_c, train_c, rba_c, T{}) : pass1(norm_c, train_c, rba_c, F{});
  };
  auto with_rba = [&](auto norm_c, auto train_c) {
    relu_before_add ? with_res(norm_c, train_c, T{}) : with_res(norm_c, train_c, F{});
  };
  if (!norm) with_rba(F{}, F{});
  else if (train || layer) with_rba(T{}, T{});  // (kTrain: grad_y = g, finished below)
  else with_rba(T{}, F{});
  for (int64_t r = 0; r < rows; ++r) {
    grad_beta[r % c_out] += row_g[r];
    grad_gamma[r % c_out] += row_gxhat[r];
  }

  if (train) {
    // Pass 2: grad_y = gamma * invstd * (g - grad_beta / N - xhat * grad_gamma / N).
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(g.batch * l_out);
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % c_out, base = r * l_out;
        const acc_t k1 = gamma[c] * invstd[c], mean_g = grad_beta[c] * inv_n;
        const acc_t mean_gx = grad_gamma[c] * inv_n;
        acc_t* gy_row = gyp + base;
        const auto* xhat_row = savedp + base;
        row_gy[r] = lane_sum<acc_t>(l_out, [&](int64_t i) {
          const acc_t gy = k1 * (gy_row[i] - mean_g - static_cast<acc_t>(xhat_row[i]) * mean_gx);
          gy_row[i] = gy;
          return gy;
        });
      }
    });
  }
  if (layer) {
    // Pass 2, per batch item: at each position, over its channels,
    //   grad_y = invstd (gamma g - mean_c(gamma g) - xhat mean_c(gamma g xhat)),
    // the channels summed in order (vectorized over positions); var is (B, L_out).
    const at::Tensor var_c = as_acc<acc_t>(var);
    const acc_t* varp = var_c.data_ptr<acc_t>();
    const acc_t inv_c = acc_t(1) / static_cast<acc_t>(c_out);
    at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s1(l_out), s2(l_out), inv(l_out);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(s1.begin(), s1.end(), acc_t(0));
        std::fill(s2.begin(), s2.end(), acc_t(0));
        for (int64_t c = 0; c < c_out; ++c) {
          const acc_t* gy_row = gyp + (b * c_out + c) * l_out;
          const auto* xhat_row = savedp + (b * c_out + c) * l_out;
          for (int64_t i = 0; i < l_out; ++i) {
            const acc_t gg = gamma[c] * gy_row[i];
            s1[i] += gg;
            s2[i] += gg * static_cast<acc_t>(xhat_row[i]);
          }
        }
        for (int64_t i = 0; i < l_out; ++i) {
          inv[i] = acc_t(1) / std::sqrt(varp[b * l_out + i] + static_cast<acc_t>(eps));
          s1[i] *= inv_c;
          s2[i] *= inv_c;
        }
        for (int64_t c = 0; c < c_out; ++c) {
          const int64_t r = b * c_out + c;
          acc_t* gy_row = gyp + r * l_out;
          const auto* xhat_row = savedp + r * l_out;
          row_gy[r] = lane_sum<acc_t>(l_out, [&](int64_t i) {
            const acc_t gy =
                inv[i] * (gamma[c] * gy_row[i] - s1[i] - static_cast<acc_t>(xhat_row[i]) * s2[i]);
            gy_row[i] = gy;
            return gy;
          });
        }
      }
    });
  }
  });
  if (norm) {
    for (int64_t c = 0; c < c_out; ++c) {
      grad_bn_weight.data_ptr<acc_t>()[c] = grad_gamma[c];
      grad_bn_bias.data_ptr<acc_t>()[c] = grad_beta[c];
    }
  }
  if (grad_bias.numel() > 0) {
    std::vector<acc_t> gb(c_out, 0);
    for (int64_t r = 0; r < rows; ++r) gb[r % c_out] += row_gy[r];
    scalar_t* gbp = grad_bias.data_ptr<scalar_t>();
    for (int64_t c = 0; c < c_out; ++c) gbp[c] = static_cast<scalar_t>(gb[c]);
  }

  const std::vector<acc_t> taps = pack_taps<acc_t>(weight, nullptr);
  const at::Tensor x = as_acc<acc_t>(x_in);
  const acc_t* xp = x.data_ptr<acc_t>();

  // grad_x: tiles of input positions j; tap k sends grad_y[:, t] to j = t*stride + k*d - pad_left:
  //   acc[C_in, tile] += W_k^T[C_in, C_out] @ grad_y[b, :, t(j)]
  // Tiles own disjoint input positions, so no two threads write the same element. An empty
  // grad_x means x needs no gradient (a network's input): the whole data-gradient conv is skipped.
  if (grad_x.numel() > 0) {
    const int64_t tile = tile_length(c_in, g.batch, g.length);
    const int64_t tiles_per_item = ceil_div(g.length, tile);
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, g.batch * tiles_per_item, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(c_in * tile), scratch(g.stride > 1 ? c_in * l_out : 0);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / tiles_per_item, j0 = (item % tiles_per_item) * tile;
        const int64_t nj = std::min(tile, g.length - j0);
        const acc_t* gy_b = gyp + b * c_out * l_out;
        std::fill(acc.begin(), acc.begin() + c_in * nj, acc_t(0));
        for (int64_t k = 0; k < g.taps; ++k) {
          const acc_t* w_k = taps.data() + k * c_out * c_in;
          const int64_t offset = k * g.dilation - g.pad_left;  // j = t * stride + offset
          const int64_t t_lo = std::max<int64_t>(0, ceil_div(std::max<int64_t>(j0 - offset, 0), g.stride));
          const int64_t t_hi = std::min(l_out, floor_div(j0 + nj - 1 - offset, g.stride) + 1);
          if (t_lo >= t_hi) continue;
          if (g.stride == 1) {
            gemm<acc_t>(true, false, c_in, t_hi - t_lo, c_out, w_k, c_in, gy_b + t_lo, l_out,
                        acc_t(1), acc.data() + (t_lo + offset - j0), nj);
          } else {
            const int64_t nt = t_hi - t_lo;
            gemm<acc_t>(true, false, c_in, nt, c_out, w_k, c_in, gy_b + t_lo, l_out, acc_t(0),
                        scratch.data(), nt);
            for (int64_t ci = 0; ci < c_in; ++ci)
              for (int64_t t = t_lo; t < t_hi; ++t)
                acc[ci * nj + t * g.stride + offset - j0] += scratch[ci * nt + (t - t_lo)];
          }
        }
        for (int64_t ci = 0; ci < c_in; ++ci) {
          scalar_t* dst = gxp + (b * c_in + ci) * g.length + j0;
          for (int64_t j = 0; j < nj; ++j) dst[j] = static_cast<scalar_t>(acc[ci * nj + j]);
        }
      }
    });
  }

  // grad_weight[:, :, k] = sum_b grad_y[b][:, t] @ x[b][:, t*stride + k*d - pad_left]^T over the
  // t whose input is inside x: GEMMs with a long inner dimension (L_out). Work items are
  // (tap, block of output channels); each sums over the batch in order, so the result does not
  // depend on the thread count. One parallel region: many small BLAS-threaded calls measured
  // far slower on a loaded 2-core machine (a fork/join per call).
  {
    std::vector<acc_t> gw(g.taps * c_out * c_in, acc_t(0));
    const int64_t co_block = std::min<int64_t>(c_out, 32);
    const int64_t blocks = ceil_div(c_out, co_block);
    at::parallel_for(0, g.taps * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gather(g.stride > 1 ? c_in * l_out : 0);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t k = item / blocks, co0 = (item % blocks) * co_block;
        const int64_t nco = std::min(co_block, c_out - co0);
        const int64_t lo = g.first_valid(k), hi = g.end_valid(k), n = hi - lo;
        if (n <= 0) continue;  // this tap only ever reads padding: its gradient is zero
        for (int64_t b = 0; b < g.batch; ++b) {
          const acc_t* xb = xp + b * c_in * g.length;
          const acc_t* cols = xb + g.input_pos(lo, k);
          int64_t ld = g.length;
          if (g.stride > 1) {
            for (int64_t ci = 0; ci < c_in; ++ci)
              for (int64_t t = lo; t < hi; ++t)
                gather[ci * n + (t - lo)] = xb[ci * g.length + g.input_pos(t, k)];
            cols = gather.data();
            ld = n;
          }
          gemm<acc_t>(false, true, nco, c_in, n, gyp + (b * c_out + co0) * l_out + lo, l_out,
                      cols, ld, acc_t(1), gw.data() + (k * c_out + co0) * c_in, c_in);
        }
      }
    });
    scalar_t* gwp = grad_weight.data_ptr<scalar_t>();
    for (int64_t co = 0; co < c_out; ++co)
      for (int64_t ci = 0; ci < c_in; ++ci)
        for (int64_t k = 0; k < g.taps; ++k)
          gwp[(co * c_in + ci) * g.taps + k] =
              static_cast<scalar_t>(gw[(k * c_out + co) * c_in + ci]);
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.defined() || t.numel() == 0 || t.device().is_cpu(), "fastres_ext: ", name,
              " must be a CPU tensor");
}

}  // namespace

void conv_bn_relu_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const OptTensor& gamma,
    const OptTensor& beta, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& residual, int64_t stride, int64_t dilation, int64_t pad_left,
    int64_t pad_right, int64_t norm_mode, double eps, double momentum_factor,
    bool relu_before_add, int64_t activation, double activation_param, const at::Tensor& out,
    const at::Tensor& saved, const at::Tensor& batch_mean, const at::Tensor& batch_var) {
  const ConvGeometry g = check_forward_args(x, weight, stride, dilation, pad_left, pad_right,
                                            norm_mode, out, saved, batch_mean, batch_var);
  check_activation(activation, activation_param);
  check_cpu(x, "x");
  check_cpu(out, "out");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastres_forward_cpu", [&] {
    forward_kernel<scalar_t>(x, weight, bias, gamma, beta, running_mean, running_var, residual,
                             g, norm_mode, eps, momentum_factor, relu_before_add, activation,
                             activation_param, out, saved, batch_mean, batch_var);
  });
}

void conv_bn_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& gamma, const OptTensor& beta, const at::Tensor& saved, const at::Tensor& out,
    const at::Tensor& var, const OptTensor& residual, bool has_residual, int64_t stride,
    int64_t dilation, int64_t pad_left, int64_t pad_right, int64_t norm_mode, double eps,
    bool relu_before_add, int64_t activation, double activation_param,
    const at::Tensor& grad_x, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
    const at::Tensor& grad_gamma, const at::Tensor& grad_beta, const at::Tensor& grad_residual) {
  const ConvGeometry g =
      check_backward_args(x, weight, stride, dilation, pad_left, pad_right, norm_mode,
                          relu_before_add, activation, out, saved, grad_x, grad_weight);
  check_activation(activation, activation_param);
  TORCH_CHECK(activation == kActRelu || !has_residual ||
                  (residual.has_value() && residual->defined() && residual->sizes() == out.sizes()),
              "fastres_ext: backward of an activation other than ReLU after a residual add "
              "needs the residual");
  check_cpu(x, "x");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastres_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, x, weight, gamma, beta, saved, out, var, residual,
                              has_residual, g, norm_mode, eps, relu_before_add, activation,
                              activation_param, grad_x, grad_weight, grad_bias, grad_gamma,
                              grad_beta, grad_residual);
  });
}

}  // namespace fastres
