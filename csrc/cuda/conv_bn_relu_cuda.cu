// CUDA kernels of the fused Conv1d -> BatchNorm1d -> ReLU (+ residual) op, forward and backward.
//
// Straightforward by design: direct convolutions with shared-memory tiles (no tensor cores),
// float32 accumulation for float32/float16/bfloat16 inputs, and deterministic reductions (every
// sum has a fixed order: per-thread partials in a fixed stride, then a shared-memory tree). No
// atomics. Layout: x (B, C_in, L), weight (C_out, C_in, K), y/out/residual (B, C_out, L_out),
// contiguous. Padding is masked loads (zeros outside [0, L)), never a padded copy.
//
// Forward:  conv_forward_kernel (conv + either the full epilogue, or a float32 y for training)
//           -> train only: channel_stats_kernel ((count, mean, M2) per channel, Chan merge)
//           -> apply_kernel (normalize, residual, ReLU).
// Backward: grad_rows_kernel (ReLU masks, grad_residual, per-channel sums of g and g * xhat)
//           -> train only: grad_y_train_kernel (grad_y = gamma*invstd*(g - mean g - xhat mean gxhat))
//           -> grad_input_kernel (transposed direct conv) and grad_weight_kernel (tiled
//              reductions over (batch, position)).
#include "../conv_bn_relu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

// float32, float16 and bfloat16 only (float64 stays on the CPU kernels).
#define FASTRES_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)        \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastres {
namespace {

constexpr int kThreads = 256;
constexpr int kTileT = 64;                     // positions per conv block
constexpr int kTileC = 16;                     // channels per conv block
constexpr int kRowsPerPass = kThreads / kTileT;  // 4: each thread owns kTileC / 4 outputs
constexpr int kOutPerThread = kTileC / kRowsPerPass;
constexpr int kSmemBudget = 40 * 1024;         // bytes of dynamic shared memory per block

// The conv's index arithmetic, passed by value to kernels.
struct Geo {
  int64_t batch, c_in, length, c_out, taps, l_out, stride, dilation, pad_left;
};

Geo to_geo(const ConvGeometry& g) {
  return {g.batch, g.c_in, g.length, g.c_out, g.taps, g.l_out, g.stride, g.dilation, g.pad_left};
}

__host__ __device__ inline int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Channels per shared-memory chunk so that chunk * (span + kTileC * taps) floats fit the budget.
int channel_chunk(int64_t span, int64_t taps, int64_t channels) {
  const int64_t per_channel = (span + kTileC * taps) * static_cast<int64_t>(sizeof(float));
  const int64_t chunk = std::min<int64_t>({16, channels, kSmemBudget / per_channel});
  TORCH_CHECK(chunk >= 1, "fastres_ext CUDA: receptive field too long for a shared-memory tile "
              "(span ", span, ", taps ", taps, ")");
  return static_cast<int>(chunk);
}

// Deterministic block-wide sum of `count` values per thread (tree in shared memory).
template <int kCount>
__device__ void block_sum(float (&v)[kCount], float* smem) {
  for (int i = 0; i < kCount; ++i) smem[i * kThreads + threadIdx.x] = v[i];
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width)
      for (int i = 0; i < kCount; ++i)
        smem[i * kThreads + threadIdx.x] += smem[i * kThreads + threadIdx.x + width];
    __syncthreads();
  }
  for (int i = 0; i < kCount; ++i) v[i] = smem[i * kThreads];
  __syncthreads();
}

// ------------------------------------------------------------------------------------ forward

// Grid (ceil(L_out / 64), ceil(C_out / 16), B), 256 threads. Each block computes the
// (16 channels x 64 positions) tile of conv(x[b]) + bias, looping over input channels in
// chunks: the chunk's input span (64 outputs need (64-1)*stride + (K-1)*dilation + 1 inputs)
// and weights are staged in shared memory. Then, in registers:
//   y_acc given (training): y_acc = conv, float32 (statistics come later);
//   else: y = conv if y is given; out = relu(relu?(conv * scale + shift) + residual), with
//         scale/shift per channel (nullptr: identity, no batch norm).
template <typename scalar_t>
__global__ void conv_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                    const scalar_t* __restrict__ bias, Geo g, int ci_chunk,
                                    int span, float* __restrict__ y_acc,
                                    const float* __restrict__ scale,
                                    const float* __restrict__ shift,
                                    const scalar_t* __restrict__ residual, bool relu_before_add,
                                    scalar_t* __restrict__ y, scalar_t* __restrict__ out) {
  extern __shared__ float smem[];
  float* xs = smem;                                 // [ci_chunk][span]
  float* ws = smem + static_cast<int64_t>(ci_chunk) * span;  // [kTileC][ci_chunk][taps]
  const int64_t b = blockIdx.z, co0 = static_cast<int64_t>(blockIdx.y) * kTileC;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileT;
  const int64_t in0 = t0 * g.stride - g.pad_left;  // input position of tap 0 at output t0
  const int tl = threadIdx.x % kTileT, row = threadIdx.x / kTileT;
  const int taps = static_cast<int>(g.taps);
  float acc[kOutPerThread] = {};

  for (int64_t ci0 = 0; ci0 < g.c_in; ci0 += ci_chunk) {
    const int nci = static_cast<int>(std::min<int64_t>(ci_chunk, g.c_in - ci0));
    for (int i = threadIdx.x; i < nci * span; i += kThreads) {
      const int ci = i / span;
      const int64_t pos = in0 + i % span;
      xs[i] = (pos >= 0 && pos < g.length)
                  ? static_cast<float>(x[((b * g.c_in) + ci0 + ci) * g.length + pos]) : 0.f;
    }
    for (int i = threadIdx.x; i < kTileC * nci * taps; i += kThreads) {
      const int co = i / (nci * taps), ci = (i / taps) % nci, k = i % taps;
      ws[(co * ci_chunk + ci) * taps + k] =
          co0 + co < g.c_out
              ? static_cast<float>(w[((co0 + co) * g.c_in + ci0 + ci) * g.taps + k]) : 0.f;
    }
    __syncthreads();
    for (int ci = 0; ci < nci; ++ci) {
      for (int k = 0; k < taps; ++k) {
        const float xv = xs[ci * span + tl * g.stride + k * g.dilation];
        for (int j = 0; j < kOutPerThread; ++j)
          acc[j] += ws[((row + j * kRowsPerPass) * ci_chunk + ci) * taps + k] * xv;
      }
    }
    __syncthreads();
  }

  const int64_t t = t0 + tl;
  if (t >= g.l_out) return;
  for (int j = 0; j < kOutPerThread; ++j) {
    const int64_t co = co0 + row + j * kRowsPerPass;
    if (co >= g.c_out) continue;
    const float v = acc[j] + (bias ? static_cast<float>(bias[co]) : 0.f);
    const int64_t idx = (b * g.c_out + co) * g.l_out + t;
    if (y_acc) {
      y_acc[idx] = v;
      continue;
    }
    if (y) y[idx] = static_cast<scalar_t>(v);
    float z = scale ? v * scale[co] + shift[co] : v;
    if (relu_before_add) z = fmaxf(z, 0.f);
    if (residual) z += static_cast<float>(residual[idx]);
    out[idx] = static_cast<scalar_t>(fmaxf(z, 0.f));
  }
}

// One block per channel: batch mean and biased variance of y_acc[:, c, :] from per-thread
// Welford partials merged pairwise in a fixed tree (Chan), then scale/shift of the BN apply.
__global__ void channel_stats_kernel(const float* __restrict__ y_acc, Geo g,
                                     const float* __restrict__ gamma,
                                     const float* __restrict__ beta, float eps,
                                     float* __restrict__ mean, float* __restrict__ var,
                                     float* __restrict__ scale, float* __restrict__ shift) {
  __shared__ float s_n[kThreads], s_mean[kThreads], s_m2[kThreads];
  const int64_t c = blockIdx.x, count = g.batch * g.l_out;
  float n = 0.f, m = 0.f, m2 = 0.f;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const float v = y_acc[((i / g.l_out) * g.c_out + c) * g.l_out + i % g.l_out];
    n += 1.f;
    const float delta = v - m;
    m += delta / n;
    m2 += delta * (v - m);
  }
  s_n[threadIdx.x] = n;
  s_mean[threadIdx.x] = m;
  s_m2[threadIdx.x] = m2;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      const float na = s_n[threadIdx.x], nb = s_n[threadIdx.x + width], total = na + nb;
      if (total > 0.f) {
        const float delta = s_mean[threadIdx.x + width] - s_mean[threadIdx.x];
        s_mean[threadIdx.x] += delta * (nb / total);
        s_m2[threadIdx.x] += s_m2[threadIdx.x + width] + delta * delta * (na * nb / total);
        s_n[threadIdx.x] = total;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float mu = s_mean[0], v = s_m2[0] / s_n[0];
    mean[c] = mu;
    var[c] = v;
    scale[c] = gamma[c] * rsqrtf(v + eps);
    shift[c] = beta[c] - mu * scale[c];
  }
}

// Elementwise over (B, C_out, L_out): out = relu(relu?(y_acc * scale + shift) + residual);
// y = y_acc rounded to the input dtype when y is given.
template <typename scalar_t>
__global__ void apply_kernel(const float* __restrict__ y_acc, Geo g,
                             const float* __restrict__ scale, const float* __restrict__ shift,
                             const scalar_t* __restrict__ residual, bool relu_before_add,
                             scalar_t* __restrict__ y, scalar_t* __restrict__ out) {
  const int64_t total = g.batch * g.c_out * g.l_out;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = (idx / g.l_out) % g.c_out;
    const float v = y_acc[idx];
    if (y) y[idx] = static_cast<scalar_t>(v);
    float z = v * scale[c] + shift[c];
    if (relu_before_add) z = fmaxf(z, 0.f);
    if (residual) z += static_cast<float>(residual[idx]);
    out[idx] = static_cast<scalar_t>(fmaxf(z, 0.f));
  }
}

// ----------------------------------------------------------------------------------- backward

// One block per channel c. g = grad_out masked by out > 0 (and by bn(y) > 0, or y > 0 without
// batch norm, when relu_before_add); grad_residual = g; grad_y = g * k1 (k1 = gamma * invstd in
// eval, 1 otherwise; training finishes grad_y in grad_y_train_kernel). Sums per channel:
// sums[0][c] = sum g, sums[1][c] = sum g * xhat, sums[2][c] = sum grad_y.
template <typename scalar_t>
__global__ void grad_rows_kernel(const scalar_t* __restrict__ grad_out,
                                 const scalar_t* __restrict__ out,
                                 const scalar_t* __restrict__ y, Geo g,
                                 const float* __restrict__ mean, const float* __restrict__ invstd,
                                 const float* __restrict__ gamma, const float* __restrict__ beta,
                                 bool norm, bool train, bool relu_before_add,
                                 scalar_t* __restrict__ grad_residual, float* __restrict__ grad_y,
                                 float* __restrict__ sums) {
  __shared__ float smem[3 * kThreads];
  const int64_t c = blockIdx.x, count = g.batch * g.l_out;
  const float mu = norm ? mean[c] : 0.f, is = norm ? invstd[c] : 1.f;
  const float ga = norm ? gamma[c] : 1.f, be = norm ? beta[c] : 0.f;
  const float k1 = (norm && !train) ? ga * is : 1.f;
  float partial[3] = {0.f, 0.f, 0.f};
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const int64_t idx = ((i / g.l_out) * g.c_out + c) * g.l_out + i % g.l_out;
    float gi = static_cast<float>(out[idx]) > 0.f ? static_cast<float>(grad_out[idx]) : 0.f;
    if (grad_residual) grad_residual[idx] = static_cast<scalar_t>(gi);
    if (norm) {
      const float xhat = (static_cast<float>(y[idx]) - mu) * is;
      if (relu_before_add && !(xhat * ga + be > 0.f)) gi = 0.f;
      partial[0] += gi;
      partial[1] += gi * xhat;
    } else if (relu_before_add && !(static_cast<float>(y[idx]) > 0.f)) {
      gi = 0.f;
    }
    grad_y[idx] = gi * k1;
    partial[2] += gi * k1;
  }
  block_sum<3>(partial, smem);
  if (threadIdx.x == 0)
    for (int i = 0; i < 3; ++i) sums[i * g.c_out + c] = partial[i];
}

// One block per channel (training): grad_y = gamma * invstd * (g - sum g / N - xhat * sum gxhat
// / N) in place; sums[2][c] = sum grad_y (the conv bias gradient).
template <typename scalar_t>
__global__ void grad_y_train_kernel(const scalar_t* __restrict__ y, Geo g,
                                    const float* __restrict__ mean,
                                    const float* __restrict__ invstd,
                                    const float* __restrict__ gamma, float* __restrict__ grad_y,
                                    float* __restrict__ sums) {
  __shared__ float smem[kThreads];
  const int64_t c = blockIdx.x, count = g.batch * g.l_out;
  const float mu = mean[c], is = invstd[c], k1 = gamma[c] * is;
  const float mean_g = sums[c] / count, mean_gx = sums[g.c_out + c] / count;
  float partial[1] = {0.f};
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    const int64_t idx = ((i / g.l_out) * g.c_out + c) * g.l_out + i % g.l_out;
    const float xhat = (static_cast<float>(y[idx]) - mu) * is;
    const float gy = k1 * (grad_y[idx] - mean_g - xhat * mean_gx);
    grad_y[idx] = gy;
    partial[0] += gy;
  }
  block_sum<1>(partial, smem);
  if (threadIdx.x == 0) sums[2 * g.c_out + c] = partial[0];
}

// Grid (ceil(L / 64), ceil(C_in / 16), B). grad_x[b, ci, j] = sum over co, k with
// j = t * stride + k * dilation - pad_left of W[co, ci, k] * grad_y[b, co, t]. The block stages
// the span of grad_y positions its 64 inputs receive from (t in [t_min, t_min + span)) and the
// weights of a chunk of output channels in shared memory.
template <typename scalar_t>
__global__ void grad_input_kernel(const float* __restrict__ grad_y,
                                  const scalar_t* __restrict__ w, Geo g, int co_chunk, int span,
                                  scalar_t* __restrict__ grad_x) {
  extern __shared__ float smem[];
  float* gs = smem;                                  // [co_chunk][span]
  float* ws = smem + static_cast<int64_t>(co_chunk) * span;  // [kTileC (ci)][co_chunk][taps]
  const int64_t b = blockIdx.z, ci0 = static_cast<int64_t>(blockIdx.y) * kTileC;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileT;
  const int64_t t_min = floor_div(j0 + g.pad_left - (g.taps - 1) * g.dilation, g.stride);
  const int jl = threadIdx.x % kTileT, row = threadIdx.x / kTileT;
  const int taps = static_cast<int>(g.taps);
  const int64_t j = j0 + jl;
  float acc[kOutPerThread] = {};

  for (int64_t co0 = 0; co0 < g.c_out; co0 += co_chunk) {
    const int nco = static_cast<int>(std::min<int64_t>(co_chunk, g.c_out - co0));
    for (int i = threadIdx.x; i < nco * span; i += kThreads) {
      const int co = i / span;
      const int64_t t = t_min + i % span;
      gs[i] = (t >= 0 && t < g.l_out) ? grad_y[(b * g.c_out + co0 + co) * g.l_out + t] : 0.f;
    }
    for (int i = threadIdx.x; i < kTileC * nco * taps; i += kThreads) {
      const int ci = i / (nco * taps), co = (i / taps) % nco, k = i % taps;
      ws[(ci * co_chunk + co) * taps + k] =
          ci0 + ci < g.c_in
              ? static_cast<float>(w[((co0 + co) * g.c_in + ci0 + ci) * g.taps + k]) : 0.f;
    }
    __syncthreads();
    for (int k = 0; k < taps; ++k) {
      const int64_t num = j + g.pad_left - k * g.dilation;  // = t * stride
      if (num < 0 || num % g.stride != 0) continue;
      const int64_t ts = num / g.stride - t_min;
      if (ts >= span) continue;
      for (int co = 0; co < nco; ++co) {
        const float gv = gs[co * span + ts];
        for (int r = 0; r < kOutPerThread; ++r)
          acc[r] += ws[((row + r * kRowsPerPass) * co_chunk + co) * taps + k] * gv;
      }
    }
    __syncthreads();
  }
  if (j >= g.length) return;
  for (int r = 0; r < kOutPerThread; ++r) {
    const int64_t ci = ci0 + row + r * kRowsPerPass;
    if (ci < g.c_in) grad_x[(b * g.c_in + ci) * g.length + j] = static_cast<scalar_t>(acc[r]);
  }
}

// Grid (ceil(C_out / 16), ceil(C_in / 16), K), 256 threads = a 16 x 16 tile of grad_weight[:, :, k]:
// grad_w[co, ci, k] = sum over b, t of grad_y[b, co, t] * x[b, ci, t * stride + k * dilation -
// pad_left], in chunks of 64 positions staged in shared memory, always in the same order.
template <typename scalar_t>
__global__ void grad_weight_kernel(const float* __restrict__ grad_y,
                                   const scalar_t* __restrict__ x, Geo g,
                                   scalar_t* __restrict__ grad_w) {
  __shared__ float gs[kTileC][kTileT + 1];
  __shared__ float xs[kTileC][kTileT + 1];
  const int64_t co0 = static_cast<int64_t>(blockIdx.x) * kTileC;
  const int64_t ci0 = static_cast<int64_t>(blockIdx.y) * kTileC, k = blockIdx.z;
  const int co_l = threadIdx.x / kTileC, ci_l = threadIdx.x % kTileC;
  float acc = 0.f;
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t t0 = 0; t0 < g.l_out; t0 += kTileT) {
      for (int i = threadIdx.x; i < kTileC * kTileT; i += kThreads) {
        const int r = i / kTileT, tt = i % kTileT;
        const int64_t t = t0 + tt, pos = t * g.stride + k * g.dilation - g.pad_left;
        const bool t_ok = t < g.l_out;
        gs[r][tt] = (t_ok && co0 + r < g.c_out)
                        ? grad_y[(b * g.c_out + co0 + r) * g.l_out + t] : 0.f;
        xs[r][tt] = (t_ok && ci0 + r < g.c_in && pos >= 0 && pos < g.length)
                        ? static_cast<float>(x[(b * g.c_in + ci0 + r) * g.length + pos]) : 0.f;
      }
      __syncthreads();
      for (int tt = 0; tt < kTileT; ++tt) acc += gs[co_l][tt] * xs[ci_l][tt];
      __syncthreads();
    }
  }
  if (co0 + co_l < g.c_out && ci0 + ci_l < g.c_in)
    grad_w[((co0 + co_l) * g.c_in + ci0 + ci_l) * g.taps + k] = static_cast<scalar_t>(acc);
}

at::Tensor float_vec(const OptTensor& t, int64_t n, float fill, const at::Tensor& like) {
  if (t.has_value() && t->defined() && t->numel() > 0) return t->to(at::kFloat).contiguous();
  return at::full({n}, fill, like.options().dtype(at::kFloat));
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.defined() || t.numel() == 0 || t.is_cuda(), "fastres_ext: ", name,
              " must be a CUDA tensor");
}

}  // namespace

void conv_bn_relu_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& weight_in, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& mean,
    const OptTensor& var, const OptTensor& residual, int64_t stride, int64_t dilation,
    int64_t pad_left, int64_t pad_right, int64_t norm_mode, double eps, bool relu_before_add,
    const at::Tensor& out, const at::Tensor& y, const at::Tensor& batch_mean,
    const at::Tensor& batch_var) {
  const ConvGeometry geometry =
      check_forward_args(x_in, weight_in, stride, dilation, pad_left, pad_right, out);
  check_cuda(x_in, "x");
  check_cuda(out, "out");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Geo g = to_geo(geometry);
  TORCH_CHECK(g.batch <= 65535, "fastres_ext CUDA: batch size over 65535 (grid z limit)");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  const bool train = norm_mode == kNormTrain;
  auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor scale, shift, y_acc;
  if (norm_mode == kNormEval) {
    scale = float_vec(bn_weight, g.c_out, 1.f, x) * (float_vec(var, g.c_out, 1.f, x) + eps).rsqrt();
    shift = float_vec(bn_bias, g.c_out, 0.f, x) - float_vec(mean, g.c_out, 0.f, x) * scale;
  }
  if (train) {
    y_acc = at::empty({g.batch, g.c_out, g.l_out}, x.options().dtype(at::kFloat));
    scale = at::empty({g.c_out}, x.options().dtype(at::kFloat));
    shift = at::empty({g.c_out}, x.options().dtype(at::kFloat));
  }
  const int span = static_cast<int>((kTileT - 1) * g.stride + (g.taps - 1) * g.dilation + 1);
  const int ci_chunk = channel_chunk(span, g.taps, g.c_in);
  const size_t smem = static_cast<size_t>(ci_chunk) * (span + kTileC * g.taps) * sizeof(float);
  const dim3 grid((g.l_out + kTileT - 1) / kTileT, (g.c_out + kTileC - 1) / kTileC, g.batch);
  const int64_t total = g.batch * g.c_out * g.l_out;
  const int apply_blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));

  FASTRES_DISPATCH_CUDA_TYPES(x.scalar_type(), "fastres_forward_cuda", [&] {
    scalar_t* y_out = y.numel() > 0 ? y.data_ptr<scalar_t>() : nullptr;
    conv_forward_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias_c), g,
        ci_chunk, span, train ? y_acc.data_ptr<float>() : nullptr,
        train ? nullptr : ptr_or_null<float>(scale), train ? nullptr : ptr_or_null<float>(shift),
        ptr_or_null<scalar_t>(res), relu_before_add, train ? nullptr : y_out,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (train) {
      const at::Tensor gamma = float_vec(bn_weight, g.c_out, 1.f, x);
      const at::Tensor beta = float_vec(bn_bias, g.c_out, 0.f, x);
      channel_stats_kernel<<<g.c_out, kThreads, 0, stream>>>(
          y_acc.data_ptr<float>(), g, gamma.data_ptr<float>(), beta.data_ptr<float>(),
          static_cast<float>(eps), batch_mean.data_ptr<float>(), batch_var.data_ptr<float>(),
          scale.data_ptr<float>(), shift.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      apply_kernel<scalar_t><<<apply_blocks, kThreads, 0, stream>>>(
          y_acc.data_ptr<float>(), g, scale.data_ptr<float>(), shift.data_ptr<float>(),
          ptr_or_null<scalar_t>(res), relu_before_add, y_out, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void conv_bn_relu_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const at::Tensor& y_in, const at::Tensor& out_in, const at::Tensor& mean,
    const at::Tensor& var, bool has_residual, int64_t stride, int64_t dilation, int64_t pad_left,
    int64_t pad_right, int64_t norm_mode, double eps, bool relu_before_add,
    const at::Tensor& grad_x, const at::Tensor& grad_weight, const at::Tensor& grad_bias,
    const at::Tensor& grad_bn_weight, const at::Tensor& grad_bn_bias,
    const at::Tensor& grad_residual) {
  (void)bias;
  const ConvGeometry geometry =
      check_forward_args(x_in, weight_in, stride, dilation, pad_left, pad_right, out_in);
  check_cuda(x_in, "x");
  TORCH_CHECK((norm_mode == kNormNone && !relu_before_add) || y_in.numel() == out_in.numel(),
              "fastres_ext: backward needs the saved conv output y");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Geo g = to_geo(geometry);
  TORCH_CHECK(g.batch <= 65535 && g.taps <= 65535,
              "fastres_ext CUDA: batch size or kernel size over 65535 (grid z limit)");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const bool norm = norm_mode != kNormNone, train = norm_mode == kNormTrain;
  auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor mean_f, invstd;
  if (norm) {
    mean_f = mean.to(at::kFloat).contiguous();
    invstd = (var.to(at::kFloat) + eps).rsqrt();
  }
  const at::Tensor gamma = float_vec(bn_weight, g.c_out, 1.f, x);
  const at::Tensor beta = float_vec(bn_bias, g.c_out, 0.f, x);
  const at::Tensor grad_y = at::empty({g.batch, g.c_out, g.l_out}, x.options().dtype(at::kFloat));
  const at::Tensor sums = at::empty({3, g.c_out}, x.options().dtype(at::kFloat));

  const int span_t = static_cast<int>(
      floor_div(kTileT - 1 + (g.taps - 1) * g.dilation, g.stride) + 2);
  const int co_chunk = channel_chunk(span_t, g.taps, g.c_out);
  const size_t smem = static_cast<size_t>(co_chunk) * (span_t + kTileC * g.taps) * sizeof(float);
  const dim3 grid_x((g.length + kTileT - 1) / kTileT, (g.c_in + kTileC - 1) / kTileC, g.batch);
  const dim3 grid_w((g.c_out + kTileC - 1) / kTileC, (g.c_in + kTileC - 1) / kTileC, g.taps);

  FASTRES_DISPATCH_CUDA_TYPES(x.scalar_type(), "fastres_backward_cuda", [&] {
    grad_rows_kernel<scalar_t><<<g.c_out, kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(y), g,
        ptr_or_null<float>(mean_f), ptr_or_null<float>(invstd), gamma.data_ptr<float>(),
        beta.data_ptr<float>(), norm, train, relu_before_add,
        has_residual ? grad_residual.data_ptr<scalar_t>() : nullptr, grad_y.data_ptr<float>(),
        sums.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (train) {
      grad_y_train_kernel<scalar_t><<<g.c_out, kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), g, mean_f.data_ptr<float>(), invstd.data_ptr<float>(),
          gamma.data_ptr<float>(), grad_y.data_ptr<float>(), sums.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grad_input_kernel<scalar_t><<<grid_x, kThreads, smem, stream>>>(
        grad_y.data_ptr<float>(), weight.data_ptr<scalar_t>(), g, co_chunk, span_t,
        grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_weight_kernel<scalar_t><<<grid_w, kThreads, 0, stream>>>(
        grad_y.data_ptr<float>(), x.data_ptr<scalar_t>(), g, grad_weight.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (norm) {
    grad_bn_weight.copy_(sums[1]);
    grad_bn_bias.copy_(sums[0]);
  }
  if (grad_bias.numel() > 0) grad_bias.copy_(sums[2]);
}

TORCH_LIBRARY_IMPL(fastres_ext, CUDA, m) {
  m.impl("forward", &conv_bn_relu_forward_cuda);
  m.impl("backward", &conv_bn_relu_backward_cuda);
}

}  // namespace fastres
