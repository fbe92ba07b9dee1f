// CUDA kernels of the fused Conv1d -> BatchNorm1d -> ReLU (+ residual) op, forward and backward
// (docs/spec.md, "Backend contract"): the convolution runs in cuDNN, everything around it in
// the fused elementwise kernels of this file.
//
// Layout: x (B, C_in, L), weight (C_out, C_in, K), out/residual/saved (B, C_out, L_out), all
// contiguous. Everything is computed in float32 for float32/float16/bfloat16 inputs; no atomics:
// every reduction is per-segment partials merged in a fixed order, so results are bitwise
// reproducible run to run (the conv too when torch.backends.cudnn.deterministic is set).
//
// THE CONV. ATen's convolution (cuDNN), so it runs at cuDNN speed and follows nn.Conv1d's TF32
// setting. cuDNN pads symmetrically, so the conv is padded by P = pad_left + stride * skip on
// both sides (skip = ceil((pad_right - pad_left) / stride) when the right side pads more, else
// 0) and its outputs [skip, skip + L_out) are the stage's: causal padding is the seed TCN's
// "chomp" (skip 0, the trailing outputs are dropped), "same" with an odd total at stride 1
// starts one output later. x is never padded; the kept outputs are read in place with the conv
// output's row stride L_full. The conv bias is not given to cuDNN: it is added in float32 here.
// 16-bit inputs: the conv output (y) must stay float32 wherever a gradient may follow, because
// rounding y to 16 bits before batch norm flips ReLU masks near zero, which cost the eager
// backend's gradients 2-3e-2 (fastres/backends/eager.py; docs/spec.md's bound is 1e-2).
// cuDNN writes its output in its input dtype, so those calls convert x and the weight to
// float32 first; the conv then runs exactly (16-bit values are exact in TF32) at TF32 speed
// under PyTorch's default setting. Only a call that provably has no backward (batch norm or
// relu_before_add, and nothing saved for backward), in eval or without batch norm, runs the
// conv natively in 16 bits: its output error is 16-bit rounding of the conv, as plain
// PyTorch's. Backward convs always run in the input dtype.
//
// KERNELS. Elementwise kernels walk rows (b, c) of L_out in segments, one thread block per
// segment, each thread taking chunks of kChunk = 8 consecutive values (one 16-byte vector of
// 16-bit values, two of float32). Loads and stores are as wide as every tensor's row stride and
// alignment allow (up to 16 bytes: V below); which elements a thread sums never depends on V.
// Forward, train:  cuDNN conv -> batch_stats_partials_kernel (per segment: Welford over chunks
//                  of 8, merged in a fixed tree, Chan) -> batch_stats_finalize_kernel (per
//                  channel: merge the partials in order; batch mean/var; running statistics;
//                  the channel's mean and 1/std) -> bn_relu_apply_kernel.
// Forward, eval:   cuDNN conv -> bn_relu_apply_kernel, normalizing with the running statistics.
//                  Not folded into the conv weights: the apply pass is needed anyway (residual,
//                  ReLU, the chomp, the bias in float32), folding would move the same bytes and
//                  add a launch that rescales and re-rounds the weights.
// Forward, none:   cuDNN conv -> bn_relu_apply_kernel (bias, ReLUs, residual).
// Backward:        bn_relu_grad_kernel (ReLU masks, grad_residual, sums of g and g * x-hat)
//                  -> channel_sums_kernel (grad_beta, grad_gamma) -> train only: a second
//                  bn_relu_grad_kernel pass (grad_y = k (g - mean g - x-hat mean g x-hat))
//                  -> channel_sums_kernel (grad_bias). grad_y is written straight into a buffer
//                  of the conv's full output shape (B, C_out, L_full), zeros where forward
//                  dropped outputs, so cuDNN takes it as it is: grad_x at stride 1 is a cuDNN
//                  conv of grad_y with the flipped, transposed weight written straight into
//                  grad_x; otherwise at::convolution_backward and a copy; grad_weight is
//                  at::convolution_backward's (C_out * C_in * K values, copied).
//
// BYTES per training step of one stage (N = B * C_out * L_out outputs, N_in = B * C_in * L
// inputs; e = the input dtype's size, 2 or 4; c = the conv's dtype size, 4 except for 16-bit
// forward-only calls; s = the saved x-hat's size, e, or 4 when relu_before_add keeps it in
// float32; the outputs cuDNN computes and the chomp drops add L_full / L_out - 1 to the conv's
// write and to grad_y; C-sized traffic left out):
//   forward  x -> float32 (16-bit, c = 4)        read e N_in, write 4 N_in
//            cuDNN conv                          read c N_in, write c N
//            batch_stats_partials_kernel (train) read c N
//            bn_relu_apply_kernel                read c N (+ e N residual), write e N + s N
//   backward bn_relu_grad_kernel, pass 1         read 2e N + s N, write e N (with a residual)
//            bn_relu_grad_kernel, pass 2 (train) read e N (residual: its gradient is g) or
//                                                2e N (none), + s N; write e N grad_y
//            cuDNN dgrad                         read e N, write e N_in (+ read e N_in, write
//                                                e N_in for the copy at stride > 1)
//            cuDNN wgrad                         read e N + e N_in
// Float32, stage with a residual (C_in = C_out): forward 8 (conv) + 4 + 16 = 28 bytes per
// element, backward 16 + 12 + 8 + 8 = 44. Plain PyTorch (F.pad, conv, batch_norm, add, relu)
// moves 8 (pad) + 8 (conv) + 12 (BN: stats, apply) + 12 (add) + 8 (relu) = 48 forward and
// 12 (relu) + 20 (BN: reduce, apply) + 16 (conv) = 48 backward. Eval forward-only: 8 + 12
// against plain's 8 + 8 + 8 + 12 + 8. 16-bit inputs: the float32 conv output costs the
// conversion of x and twice the bytes of y; benchmarks/NOTES.md ("CUDA extension") works out
// a whole TemporalBlock against plain bf16 PyTorch and against the eager backend.
#include "../conv_bn_relu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

// float32, float16 and bfloat16 (float64 stays on the CPU kernels).
#define FASTRES_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastres {
namespace {

constexpr int kChunk = 8;             // consecutive values a thread takes per step
constexpr int kMaxThreads = 256;      // threads per block (fewer for short rows)
constexpr int kStepsPerSegment = 4;   // chunks per thread in a full segment
constexpr int kMaxWarps = kMaxThreads / 32;

// ------------------------------------------------------------------------------ geometry

// The symmetric padding cuDNN runs with and where the stage's outputs sit in its output.
struct CudnnConv {
  int64_t padding;  // on both sides
  int64_t skip;     // first kept output
  int64_t l_full;   // outputs cuDNN computes per row
};

CudnnConv cudnn_conv(const ConvGeometry& g, int64_t pad_right) {
  const int64_t extra = pad_right > g.pad_left ? pad_right - g.pad_left : 0;
  CudnnConv cc;
  cc.skip = (extra + g.stride - 1) / g.stride;
  cc.padding = g.pad_left + g.stride * cc.skip;
  cc.l_full = (g.length + 2 * cc.padding - g.dilation * (g.taps - 1) - 1) / g.stride + 1;
  // Output skip + t reads input (skip + t) * stride + k * dilation - padding, which is
  // t * stride + k * dilation - pad_left: the stage's output t.
  TORCH_CHECK(cc.skip + g.l_out <= cc.l_full, "fastres_ext CUDA: padding geometry");
  return cc;
}

// Rows (b, c) of `len` values, walked in segments of `seg_len` (a multiple of kChunk), one
// thread block per segment. The conv output's row r starts at y_stride * r + y_offset.
struct Rows {
  int64_t batch, channels, len;
  int64_t y_stride, y_offset;
  int64_t segs, seg_len;
  int threads;

  __host__ __device__ int64_t blocks() const { return batch * channels * segs; }
  __host__ __device__ int64_t parts() const { return batch * segs; }  // segments per channel
};

Rows make_rows(const ConvGeometry& g, const CudnnConv& cc) {
  Rows rows;
  rows.batch = g.batch;
  rows.channels = g.c_out;
  rows.len = g.l_out;
  rows.y_stride = cc.l_full;
  rows.y_offset = cc.skip;
  // Short rows get fewer threads rather than idle ones; the tiling depends on the shape only.
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * kChunk < g.l_out) threads *= 2;
  rows.threads = threads;
  rows.seg_len = static_cast<int64_t>(threads) * kChunk * kStepsPerSegment;
  rows.segs = (g.l_out + rows.seg_len - 1) / rows.seg_len;
  TORCH_CHECK(rows.blocks() <= std::numeric_limits<int32_t>::max(),
              "fastres_ext CUDA: tensor too large for one launch");
  return rows;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// The segment a thread block owns.
struct Segment {
  int64_t row, batch, channel, part;  // part: the segment's index among its channel's
  int64_t seg, begin, end;            // positions [begin, end) of the row
};

__device__ __forceinline__ Segment block_segment(const Rows& rows) {
  Segment s;
  const int64_t block = blockIdx.x;
  s.row = block / rows.segs;
  s.seg = block - s.row * rows.segs;
  s.batch = s.row / rows.channels;
  s.channel = s.row - s.batch * rows.channels;
  s.part = s.batch * rows.segs + s.seg;
  s.begin = s.seg * rows.seg_len;
  s.end = min64(rows.len, s.begin + rows.seg_len);
  return s;
}

// Widest vector (in values, a power of two up to kChunk) that every tensor of a pass can load
// at every chunk start: each tensor loads min(V, 16 bytes) at a time, so its base address, row
// stride and offset must all be multiples of that.
struct Access {
  const void* ptr;  // null: the pass does not touch this tensor
  int64_t elem_size, row_stride, offset;
};

int vector_width(std::initializer_list<Access> tensors, int max_width) {
  for (int v = max_width; v > 1; v /= 2) {
    bool ok = true;
    for (const Access& a : tensors) {
      if (a.ptr == nullptr) continue;
      const int64_t w = std::min<int64_t>(v, 16 / a.elem_size);
      ok = ok && a.row_stride % w == 0 && a.offset % w == 0 &&
           reinterpret_cast<uintptr_t>(a.ptr) % (w * a.elem_size) == 0;
    }
    if (ok) return v;
  }
  return 1;
}

// f(std::integral_constant<int, v>) for a width v <= kMax from vector_width(..., kMax).
template <int kMax, typename F>
void with_vector_width(int v, F&& f) {
  if constexpr (kMax >= 8) {
    if (v == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (v == 4) return f(std::integral_constant<int, 4>{});
  }
  if (v == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

// ------------------------------------------------------------------------ device helpers

// W values of T moved as one load or store of 2 to 16 bytes, assembled from 32-bit words.
template <typename T>
__device__ __forceinline__ uint32_t bits16(float v) {
  return static_cast<T>(v).x;  // c10::Half / c10::BFloat16: round to nearest even
}

template <typename T>
__device__ __forceinline__ float from_bits16(uint32_t bits) {
  return static_cast<float>(T(static_cast<uint16_t>(bits), T::from_bits()));
}

// The 32-bit words of W values of T (W * sizeof(T) >= 4).
template <typename T, int W>
__device__ __forceinline__ void to_words(const float* v, uint32_t* w) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < W; ++i) w[i] = __float_as_uint(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < W / 2; ++i) w[i] = bits16<T>(v[2 * i]) | bits16<T>(v[2 * i + 1]) << 16;
  }
}

template <typename T, int W>
__device__ __forceinline__ void from_words(const uint32_t* w, float* v) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < W; ++i) v[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < W / 2; ++i) {
      v[2 * i] = from_bits16<T>(w[i] & 0xffffu);
      v[2 * i + 1] = from_bits16<T>(w[i] >> 16);
    }
  }
}

template <typename T, int W>
__device__ __forceinline__ void load_vector(const T* __restrict__ p, float* v) {
  constexpr int kBytes = W * static_cast<int>(sizeof(T));
  uint32_t w[4];
  if constexpr (kBytes == 16) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
  } else if constexpr (kBytes == 8) {
    const uint2 r = *reinterpret_cast<const uint2*>(p);
    w[0] = r.x, w[1] = r.y;
  } else if constexpr (kBytes == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    v[0] = static_cast<float>(*p);  // one 16-bit value
    return;
  }
  from_words<T, W>(w, v);
}

template <typename T, int W>
__device__ __forceinline__ void store_vector(T* __restrict__ p, const float* v) {
  constexpr int kBytes = W * static_cast<int>(sizeof(T));
  if constexpr (kBytes < 4) {
    *p = static_cast<T>(v[0]);
  } else {
    uint32_t w[4];
    to_words<T, W>(v, w);
    // One store instruction by hand: NVVM splits a uint4 assignment through a pointer to
    // 16-bit values into 4-byte stores, and __stwb's cache operator makes it a strong store.
    if constexpr (kBytes == 16) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                   "r"(w[2]), "r"(w[3])
                   : "memory");
    } else if constexpr (kBytes == 8) {
      asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]) : "memory");
    } else {
      asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(w[0]) : "memory");
    }
  }
}

// Values of T per load or store in a chunk of vector width V: at most 16 bytes.
template <int V, typename T>
constexpr int kPiece = V * sizeof(T) > 16 ? 16 / static_cast<int>(sizeof(T)) : V;

// n values at p as float32 (zeros past n). A full chunk moves in pieces of kPiece values,
// aligned because chunks start at multiples of kChunk and vector_width checked the rest.
template <int V, typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int n, float (&v)[kChunk]) {
  if (n == kChunk) {
#pragma unroll
    for (int i = 0; i < kChunk; i += kPiece<V, T>) load_vector<T, kPiece<V, T>>(p + i, v + i);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) v[j] = j < n ? static_cast<float>(p[j]) : 0.f;
  }
}

template <int V, typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int n, const float (&v)[kChunk]) {
  if (n == kChunk) {
#pragma unroll
    for (int i = 0; i < kChunk; i += kPiece<V, T>) store_vector<T, kPiece<V, T>>(p + i, v + i);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
      if (j < n) p[j] = static_cast<T>(v[j]);
  }
}

// torch.relu: NaN stays NaN (fmaxf would drop it).
__device__ __forceinline__ float relu(float z) { return z < 0.f ? 0.f : z; }

// The epilogue's activation (docs/spec.md, "Activation"; conv_bn_relu.h's ActivationCode), with
// PyTorch's formulas; `a` is leaky_relu's slope or elu's alpha. The code is the same for a whole
// launch, so the switch never diverges within a warp.
__device__ __forceinline__ float activate(float z, int64_t act, float a) {
  switch (act) {
    case kActRelu: return relu(z);
    case kActGelu: return z * 0.5f * (1.f + erff(z * 0.70710678118654752f));
    case kActGeluTanh:
      return 0.5f * z * (1.f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    case kActSilu: return z / (1.f + expf(-z));
    case kActTanh: return tanhf(z);
    case kActLeakyRelu: return z > 0.f ? z : z * a;
    default: return z > 0.f ? z : a * expm1f(z);  // kActElu
  }
}

// d activate / dz at z, as PyTorch's backward formulas (leaky_relu and elu take the slope side
// wherever z > 0 is false, NaN included). Not for ReLU, whose gradient is its mask.
__device__ __forceinline__ float activation_grad(float z, int64_t act, float a) {
  switch (act) {
    case kActGelu:
      return 0.5f * (1.f + erff(z * 0.70710678118654752f)) +
             z * 0.39894228040143268f * expf(-0.5f * z * z);
    case kActGeluTanh: {
      const float t = tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z));
      return 0.5f * (1.f + t) +
             0.5f * z * (1.f - t * t) * 0.79788456080286536f * (1.f + 3.f * 0.044715f * z * z);
    }
    case kActSilu: {
      const float sig = 1.f / (1.f + expf(-z));
      return sig * (1.f + z * (1.f - sig));
    }
    case kActTanh: {
      const float t = tanhf(z);
      return 1.f - t * t;
    }
    case kActLeakyRelu: return z > 0.f ? 1.f : a;
    default: return z > 0.f ? 1.f : a * expf(z);  // kActElu
  }
}

// The batch-norm affine map, rounded as the C++ CPU kernel rounds it (a multiply, then an add;
// never a fused multiply-add): forward's inner ReLU and backward's mask recomputed from the
// saved x-hat agree bit for bit.
__device__ __forceinline__ float bn_affine(float xhat, float gamma, float beta) {
  return __fadd_rn(__fmul_rn(xhat, gamma), beta);
}

// (count, mean, M2) of a set of values; merge is Chan's pairwise update.
struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n, delta = b.mean - a.mean, wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ Welford shfl_down(const Welford& w, int offset) {
  return {__shfl_down_sync(0xffffffffu, w.n, offset),
          __shfl_down_sync(0xffffffffu, w.mean, offset),
          __shfl_down_sync(0xffffffffu, w.m2, offset)};
}

// Merge of every thread's Welford in a fixed tree (lanes, then warps); thread 0 gets it.
// blockDim.x is a multiple of 32 and at most kMaxThreads; every thread must call it.
__device__ Welford block_welford(Welford w) {
  __shared__ Welford warp_result[kMaxWarps];
  for (int offset = 16; offset > 0; offset /= 2) w = merge(w, shfl_down(w, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_result[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < static_cast<int>(blockDim.x / 32) ? warp_result[lane] : Welford{0.f, 0.f, 0.f};
    for (int offset = 16; offset > 0; offset /= 2) w = merge(w, shfl_down(w, offset));
  }
  return w;
}

// Sums of N values per thread in a fixed tree; thread 0 gets them. Same rules as above.
template <int N>
__device__ void block_sum(float (&v)[N]) {
  __shared__ float warp_result[N][kMaxWarps];
#pragma unroll
  for (int i = 0; i < N; ++i)
    for (int offset = 16; offset > 0; offset /= 2)
      v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) warp_result[i][warp] = v[i];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v[i] = lane < static_cast<int>(blockDim.x / 32) ? warp_result[i][lane] : 0.f;
      for (int offset = 16; offset > 0; offset /= 2)
        v[i] += __shfl_down_sync(0xffffffffu, v[i], offset);
    }
  }
}

// ------------------------------------------------------------------------------- forward

// Per segment of a row of the float32 conv output: (mean, M2) of its values, from Welford
// statistics of chunks of 8 (two passes over the chunk in registers) merged per thread in
// order, then across the block in a fixed tree. Partials are channel-major: [c][b * segs + s].
template <int V>
__global__ void __launch_bounds__(kMaxThreads)
    batch_stats_partials_kernel(const float* __restrict__ y, Rows rows,
                                float* __restrict__ part_mean, float* __restrict__ part_m2) {
  const Segment seg = block_segment(rows);
  const float* y_row = y + seg.row * rows.y_stride + rows.y_offset;
  Welford w{0.f, 0.f, 0.f};
  for (int64_t t = seg.begin + static_cast<int64_t>(threadIdx.x) * kChunk; t < seg.end;
       t += static_cast<int64_t>(blockDim.x) * kChunk) {
    const int n = static_cast<int>(min64(kChunk, seg.end - t));
    float v[kChunk];
    load_chunk<V>(y_row + t, n, v);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) sum += v[j];  // zeros past n
    const float mean = sum / static_cast<float>(n);
    float m2 = 0.f;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const float d = j < n ? v[j] - mean : 0.f;
      m2 += d * d;
    }
    w = merge(w, Welford{static_cast<float>(n), mean, m2});
  }
  w = block_welford(w);
  if (threadIdx.x == 0) {
    const int64_t p = seg.channel * rows.parts() + seg.part;
    part_mean[p] = w.mean;
    part_m2[p] = w.m2;
  }
}

// One block per channel: merge the channel's partials in order (thread i takes partials i,
// i + blockDim, ...; then the fixed tree), then write the batch mean (with the conv bias) and
// biased variance, update the running statistics (unbiased variance, momentum_factor) and keep
// the conv-only mean and 1/std for the apply kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) batch_stats_finalize_kernel(
    const float* __restrict__ part_mean, const float* __restrict__ part_m2, Rows rows,
    const scalar_t* __restrict__ bias, float eps, double momentum_factor,
    float* __restrict__ running_mean, float* __restrict__ running_var,
    float* __restrict__ batch_mean, float* __restrict__ batch_var, float* __restrict__ center,
    float* __restrict__ invstd) {
  const int64_t c = blockIdx.x, parts = rows.parts();
  Welford w{0.f, 0.f, 0.f};
  for (int64_t p = threadIdx.x; p < parts; p += blockDim.x) {
    const int64_t seg = p % rows.segs;
    const int64_t count = min64(rows.seg_len, rows.len - seg * rows.seg_len);
    w = merge(w, Welford{static_cast<float>(count), part_mean[c * parts + p],
                         part_m2[c * parts + p]});
  }
  w = block_welford(w);
  if (threadIdx.x == 0) {
    const int64_t n = rows.batch * rows.len;
    const float var = w.m2 / static_cast<float>(n);
    const float mean = w.mean + (bias ? static_cast<float>(bias[c]) : 0.f);
    batch_mean[c] = mean;
    batch_var[c] = var;
    center[c] = w.mean;  // the apply kernel normalizes the conv output without its bias
    invstd[c] = 1.f / sqrtf(var + eps);
    if (running_mean) {
      const double f = momentum_factor, unbiased = static_cast<double>(n) / (n - 1);
      running_mean[c] = static_cast<float>((1 - f) * running_mean[c] + f * mean);
      running_var[c] = static_cast<float>((1 - f) * running_var[c] + f * var * unbiased);
    }
  }
}

// How the apply kernel normalizes a conv value v of channel c: x-hat = (v - center) * invstd.
struct ChannelNorm {
  int64_t mode;                                          // NormMode
  const float* center;                                   // train: the finalize kernel's
  const float* invstd;                                   //   conv-only mean and 1/std
  const float* running_mean;                             // eval
  const float* running_var;
  float eps;
  const float* gamma;                                    // train, eval
  const float* beta;
};

struct Affine {
  float center, invstd, gamma, beta;
};

template <typename scalar_t>
__device__ __forceinline__ Affine channel_affine(const ChannelNorm& nz,
                                                 const scalar_t* __restrict__ bias, int64_t c) {
  const float b = bias ? static_cast<float>(bias[c]) : 0.f;
  Affine a{-b, 1.f, 1.f, 0.f};  // no batch norm: x-hat = v + bias exactly (1 is exact)
  if (nz.mode == kNormTrain) {
    a.center = nz.center[c];
    a.invstd = nz.invstd[c];
  } else if (nz.mode == kNormEval) {
    a.center = nz.running_mean[c] - b;
    a.invstd = 1.f / sqrtf(nz.running_var[c] + nz.eps);
  }
  if (nz.mode != kNormNone) {
    a.gamma = nz.gamma[c];
    a.beta = nz.beta[c];
  }
  return a;
}

// out = relu([relu](x-hat * gamma + beta) + residual) from the conv output y (read in place,
// row stride L_full), x-hat = (y - center) * invstd; x-hat (y + bias without batch norm) is
// written to `saved` when it is given. Another activation (act) replaces both ReLUs.
template <typename scalar_t, typename y_t, typename saved_t, int V>
__global__ void __launch_bounds__(kMaxThreads) bn_relu_apply_kernel(
    const y_t* __restrict__ y, Rows rows, ChannelNorm nz, const scalar_t* __restrict__ bias,
    const scalar_t* __restrict__ residual, bool relu_before_add, int64_t act, float act_param,
    scalar_t* __restrict__ out, saved_t* __restrict__ saved) {
  const Segment seg = block_segment(rows);
  const Affine a = channel_affine(nz, bias, seg.channel);
  const bool normalize = nz.mode != kNormNone;
  const y_t* y_row = y + seg.row * rows.y_stride + rows.y_offset;
  const int64_t base = seg.row * rows.len;
  for (int64_t t = seg.begin + static_cast<int64_t>(threadIdx.x) * kChunk; t < seg.end;
       t += static_cast<int64_t>(blockDim.x) * kChunk) {
    const int n = static_cast<int>(min64(kChunk, seg.end - t));
    float v[kChunk], res[kChunk], o[kChunk];
    load_chunk<V>(y_row + t, n, v);
    if (residual) load_chunk<V>(residual + base + t, n, res);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      v[j] = __fmul_rn(__fsub_rn(v[j], a.center), a.invstd);  // x-hat, kept for `saved`
      float z = normalize ? bn_affine(v[j], a.gamma, a.beta) : v[j];
      if (relu_before_add) z = activate(z, act, act_param);
      if (residual) z += res[j];
      o[j] = activate(z, act, act_param);
    }
    store_chunk<V>(out + base + t, n, o);
    if (saved) store_chunk<V>(saved + base + t, n, v);
  }
}

// ------------------------------------------------------------------------------ backward

// What a pass of bn_relu_grad_kernel does.
enum GradPass : int {
  kMaskAndSums = 0,     // train, first pass: g, grad_residual, sums of g and g * x-hat
  kTrainGradY = 1,      // train, second pass: grad_y and its sum
  kOnePass = 2,         // eval / none: all of it at once (grad_y = k g needs no batch sums)
};

template <typename scalar_t, typename saved_t>
struct GradArgs {
  const scalar_t* grad_out;
  const scalar_t* out;
  const saved_t* saved;          // x-hat, or y + bias without batch norm; null if not saved
  const scalar_t* residual;      // the forward's, for an activation other than ReLU; or null
  scalar_t* grad_residual;       // null without a residual
  scalar_t* grad_y;              // (B, C_out, L_full): the conv output's layout
  const float* gamma;
  const float* beta;
  const float* var;              // the variance forward normalized with
  const float* grad_beta;        // kTrainGradY: the sums of the first pass
  const float* grad_gamma;
  float* part;                   // [3][C_out][parts]: sums of g, g * x-hat, grad_y
  float eps, inv_n;
  int64_t mode;
  bool relu_before_add;
  int64_t activation;            // ActivationCode; not ReLU: its derivative at its input,
  float act_param;               // recomputed from saved (and the residual) as forward did
};

// One segment of rows of the backward's elementwise work. g = grad_out where out > 0 or NaN
// (torch.relu's backward), and where x-hat * gamma + beta > 0 (y > 0 without batch norm) with
// relu_before_add; grad_residual = g (before the inner mask). grad_y = gamma * invstd * g in
// eval, g without batch norm, gamma * invstd * (g - sum g / N - x-hat sum g x-hat / N) in train.
// The blocks owning a row's first and last segments also zero the conv outputs forward dropped.
template <typename scalar_t, typename saved_t, int V>
__global__ void __launch_bounds__(kMaxThreads)
    bn_relu_grad_kernel(GradArgs<scalar_t, saved_t> a, Rows rows, int pass) {
  const Segment seg = block_segment(rows);
  const int64_t c = seg.channel;
  const bool normalize = a.mode != kNormNone;
  const float gamma = normalize ? a.gamma[c] : 1.f, beta = normalize ? a.beta[c] : 0.f;
  const float k = normalize ? gamma * (1.f / sqrtf(a.var[c] + a.eps)) : 1.f;
  const float mean_g = pass == kTrainGradY ? a.grad_beta[c] * a.inv_n : 0.f;
  const float mean_gx = pass == kTrainGradY ? a.grad_gamma[c] * a.inv_n : 0.f;
  const int64_t base = seg.row * rows.len;
  scalar_t* gy_row = a.grad_y + seg.row * rows.y_stride;
  float sums[3] = {0.f, 0.f, 0.f};  // g, g * x-hat, grad_y
  for (int64_t t = seg.begin + static_cast<int64_t>(threadIdx.x) * kChunk; t < seg.end;
       t += static_cast<int64_t>(blockDim.x) * kChunk) {
    const int n = static_cast<int>(min64(kChunk, seg.end - t));
    float g[kChunk], xhat[kChunk];
    if (a.saved) {
      load_chunk<V>(a.saved + base + t, n, xhat);
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) xhat[j] = 0.f;  // unused: nothing reads x-hat then
    }
    if (pass == kTrainGradY && a.grad_residual) {
      load_chunk<V>(a.grad_residual + base + t, n, g);  // the first pass's g, exact
    } else {
      load_chunk<V>(a.grad_out + base + t, n, g);
      if (a.activation == kActRelu) {
        float o[kChunk];
        load_chunk<V>(a.out + base + t, n, o);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) g[j] = o[j] <= 0.f ? 0.f : g[j];
      } else {
        float res[kChunk];
        if (a.residual) load_chunk<V>(a.residual + base + t, n, res);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          const float inner = normalize ? bn_affine(xhat[j], gamma, beta) : xhat[j];
          float z = a.relu_before_add ? activate(inner, a.activation, a.act_param) : inner;
          if (a.residual) z += res[j];
          g[j] *= activation_grad(z, a.activation, a.act_param);
        }
      }
      if (pass != kTrainGradY && a.grad_residual) store_chunk<V>(a.grad_residual + base + t, n, g);
    }
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (a.relu_before_add) {
        const float inner = normalize ? bn_affine(xhat[j], gamma, beta) : xhat[j];
        g[j] = a.activation == kActRelu ? (inner <= 0.f ? 0.f : g[j])
                                        : g[j] * activation_grad(inner, a.activation, a.act_param);
      }
      if (j < n && pass != kTrainGradY) {
        sums[0] += g[j];
        if (normalize) sums[1] += g[j] * xhat[j];
      }
    }
    if (pass != kMaskAndSums) {
      float gy[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        gy[j] = pass == kTrainGradY ? k * (g[j] - mean_g - xhat[j] * mean_gx) : k * g[j];
        if (j < n) sums[2] += gy[j];
      }
      store_chunk<V>(gy_row + rows.y_offset + t, n, gy);
    }
  }
  if (pass != kMaskAndSums) {
    // Outputs the forward conv computed and dropped get a zero gradient.
    const scalar_t zero = static_cast<scalar_t>(0.f);
    if (seg.seg == 0)
      for (int64_t t = threadIdx.x; t < rows.y_offset; t += blockDim.x) gy_row[t] = zero;
    if (seg.seg == rows.segs - 1)
      for (int64_t t = rows.y_offset + rows.len + threadIdx.x; t < rows.y_stride; t += blockDim.x)
        gy_row[t] = zero;
  }
  block_sum<3>(sums);
  if (threadIdx.x == 0) {
    const int64_t parts = rows.parts();
    for (int q = 0; q < 3; ++q) {
      const bool mine = pass == kOnePass || (q == 2) == (pass == kTrainGradY);
      if (mine) a.part[(q * rows.channels + c) * parts + seg.part] = sums[q];
    }
  }
}

// Block (c, q): the sum over a channel's partials of quantity q0 + q, in a fixed order, into
// grad_beta (sum g), grad_gamma (sum g * x-hat) or grad_bias (sum grad_y); null: not wanted.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    channel_sums_kernel(const float* __restrict__ part, int64_t channels, int64_t parts, int q0,
                        float* __restrict__ grad_beta, float* __restrict__ grad_gamma,
                        scalar_t* __restrict__ grad_bias) {
  const int q = q0 + static_cast<int>(blockIdx.y);
  const int64_t c = blockIdx.x;
  if ((q == 0 && !grad_beta) || (q == 1 && !grad_gamma) || (q == 2 && !grad_bias)) return;
  float sum[1] = {0.f};
  const float* src = part + (q * channels + c) * parts;
  for (int64_t p = threadIdx.x; p < parts; p += blockDim.x) sum[0] += src[p];
  block_sum<1>(sum);
  if (threadIdx.x == 0) {
    if (q == 0) grad_beta[c] = sum[0];
    if (q == 1) grad_gamma[c] = sum[0];
    if (q == 2) grad_bias[c] = static_cast<scalar_t>(sum[0]);
  }
}

// --------------------------------------------------------------------------------- host

void check_cuda(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(!t.defined() || t.numel() == 0 || (t.is_cuda() && t.device() == x.device()),
              "fastres_ext: ", name, " must be a CUDA tensor on x's device");
}

bool given(const OptTensor& t) { return t.has_value() && t->defined() && t->numel() > 0; }

// A per-channel float32 vector (BN parameters, statistics): its data, once checked.
float* channel_vector(const OptTensor& t, int64_t c_out, const at::Tensor& x, const char* name) {
  TORCH_CHECK(given(t) && t->numel() == c_out && t->scalar_type() == at::kFloat &&
                  t->is_contiguous(),
              "fastres_ext CUDA: ", name, " must be a contiguous float32 tensor of C_out values");
  check_cuda(*t, x, name);
  return t->data_ptr<float>();
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

Access row_access(const at::Tensor& t, int64_t row_stride, int64_t offset = 0) {
  return {t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr,
          t.defined() ? static_cast<int64_t>(t.element_size()) : 4, row_stride, offset};
}

void check_dtype(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastres_ext CUDA: float32, float16 or bfloat16 inputs only, got ", dtype);
}

// Nested ATen calls (the convs) run as part of this kernel: not autocast (the conv dtype is
// chosen here) and not recorded by autograd.
struct KernelScope {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// The cuDNN conv's full output (B, C_out, L_full), in `dtype`, without the conv bias.
at::Tensor conv_full(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g,
                     const CudnnConv& cc, at::ScalarType dtype) {
  const at::Tensor y = at::convolution(x.to(dtype), weight.to(dtype), std::nullopt, {g.stride},
                                       {cc.padding}, {g.dilation}, false, {0}, 1);
  TORCH_CHECK(y.size(2) == cc.l_full && y.is_contiguous(),
              "fastres_ext CUDA: unexpected conv output ", y.sizes());
  return y;
}

template <typename scalar_t, typename y_t, typename saved_t>
void launch_apply(const at::Tensor& y, const Rows& rows, const ChannelNorm& nz,
                  const at::Tensor& bias, const at::Tensor& residual, bool relu_before_add,
                  int64_t act, float act_param, const at::Tensor& out, const at::Tensor& saved,
                  cudaStream_t stream) {
  constexpr int kMaxWidth = 16 / sizeof(scalar_t);
  const int v = vector_width({row_access(y, rows.y_stride, rows.y_offset),
                              row_access(residual, rows.len), row_access(out, rows.len),
                              row_access(saved, rows.len)},
                             kMaxWidth);
  with_vector_width<kMaxWidth>(v, [&](auto width) {
    bn_relu_apply_kernel<scalar_t, y_t, saved_t, decltype(width)::value>
        <<<static_cast<unsigned>(rows.blocks()), rows.threads, 0, stream>>>(
            y.data_ptr<y_t>(), rows, nz, ptr_or_null<scalar_t>(bias),
            ptr_or_null<scalar_t>(residual), relu_before_add, act, act_param,
            out.data_ptr<scalar_t>(), ptr_or_null<saved_t>(saved));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Batch statistics of the float32 conv output: batch_mean/batch_var, the running statistics,
// and the (center, invstd) pair the apply kernel normalizes with (returned, (2, C_out)).
template <typename scalar_t>
at::Tensor batch_statistics(const at::Tensor& y, const Rows& rows, const at::Tensor& bias,
                            double eps, double momentum_factor, const OptTensor& running_mean,
                            const OptTensor& running_var, const at::Tensor& x,
                            const at::Tensor& batch_mean, const at::Tensor& batch_var,
                            cudaStream_t stream) {
  const int64_t c_out = rows.channels;
  const auto f32 = y.options().dtype(at::kFloat);
  const at::Tensor part = at::empty({2, c_out, rows.parts()}, f32);
  const at::Tensor norm = at::empty({2, c_out}, f32);
  const int v = vector_width({row_access(y, rows.y_stride, rows.y_offset)}, 4);
  with_vector_width<4>(v, [&](auto width) {
    batch_stats_partials_kernel<decltype(width)::value>
        <<<static_cast<unsigned>(rows.blocks()), rows.threads, 0, stream>>>(
            y.data_ptr<float>(), rows, part[0].data_ptr<float>(), part[1].data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const bool update = given(running_mean);
  float* rm = update ? channel_vector(running_mean, c_out, x, "running_mean") : nullptr;
  float* rv = update ? channel_vector(running_var, c_out, x, "running_var") : nullptr;
  TORCH_CHECK(batch_mean.scalar_type() == at::kFloat && batch_var.scalar_type() == at::kFloat,
              "fastres_ext CUDA: batch_mean/batch_var must be float32");
  batch_stats_finalize_kernel<scalar_t><<<static_cast<unsigned>(c_out), kMaxThreads, 0, stream>>>(
      part[0].data_ptr<float>(), part[1].data_ptr<float>(), rows, ptr_or_null<scalar_t>(bias),
      static_cast<float>(eps), momentum_factor, rm, rv, batch_mean.data_ptr<float>(),
      batch_var.data_ptr<float>(), norm[0].data_ptr<float>(), norm[1].data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norm;
}

template <typename scalar_t, typename saved_t>
void launch_grad(const GradArgs<scalar_t, saved_t>& a, const Rows& rows, int pass,
                 const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& saved,
                 const at::Tensor& grad_residual, const at::Tensor& grad_y,
                 const at::Tensor& residual, cudaStream_t stream) {
  constexpr int kMaxWidth = 16 / sizeof(scalar_t);
  const int v = vector_width(
      {row_access(grad_out, rows.len), row_access(out, rows.len), row_access(saved, rows.len),
       row_access(grad_residual, rows.len), row_access(grad_y, rows.y_stride, rows.y_offset),
       row_access(residual, rows.len)},
      kMaxWidth);
  with_vector_width<kMaxWidth>(v, [&](auto width) {
    bn_relu_grad_kernel<scalar_t, saved_t, decltype(width)::value>
        <<<static_cast<unsigned>(rows.blocks()), rows.threads, 0, stream>>>(a, rows, pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_sums(const at::Tensor& part, const Rows& rows, int q0, int count,
                 const at::Tensor& grad_beta, const at::Tensor& grad_gamma,
                 const at::Tensor& grad_bias, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows.channels), static_cast<unsigned>(count));
  channel_sums_kernel<scalar_t><<<grid, kMaxThreads, 0, stream>>>(
      part.data_ptr<float>(), rows.channels, rows.parts(), q0, ptr_or_null<float>(grad_beta),
      ptr_or_null<float>(grad_gamma), ptr_or_null<scalar_t>(grad_bias));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_x and grad_weight of the conv from grad_y (B, C_out, L_full). At stride 1 the data
// gradient is itself a convolution, of grad_y with the weight transposed (C_in, C_out) and
// flipped along K, padded by (K-1)*d - padding: cuDNN writes it straight into grad_x.
void conv_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                   const ConvGeometry& g, const CudnnConv& cc, const at::Tensor& grad_x,
                   const at::Tensor& grad_weight) {
  const int64_t reach = g.dilation * (g.taps - 1);
  const at::Context& ctx = at::globalContext();
  // An empty grad_x: x needs no gradient (a network's input), only the weight's is computed.
  const bool need_grad_x = grad_x.numel() > 0;
  const bool direct = g.stride == 1 && cc.padding <= reach && ctx.userEnabledCuDNN() &&
                      at::detail::getCUDAHooks().compiledWithCuDNN();
  const auto result = at::convolution_backward(
      grad_y, x, weight, std::nullopt, {g.stride}, {cc.padding}, {g.dilation}, false, {0}, 1,
      {need_grad_x && !direct, true, false});
  grad_weight.copy_(std::get<1>(result));
  if (!need_grad_x) return;
  if (!direct) {
    grad_x.copy_(std::get<0>(result));
    return;
  }
  // cuDNN convs are 2-D: (B, C, 1, L) views, as ATen runs 1-D convs.
  const at::Tensor flipped = weight.transpose(0, 1).flip({2}).contiguous().unsqueeze(2);
  at::Tensor grad_x_2d = grad_x.view({g.batch, g.c_in, 1, g.length});
  at::cudnn_convolution_out(grad_x_2d, grad_y.unsqueeze(2), flipped, {0, reach - cc.padding},
                            {1, 1}, {1, g.dilation}, 1, ctx.benchmarkCuDNN(),
                            ctx.deterministicCuDNN() || ctx.deterministicAlgorithms(),
                            ctx.allowTF32CuDNN(at::Float32Op::CONV));
}

}  // namespace

void conv_bn_relu_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const OptTensor& gamma,
    const OptTensor& beta, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& residual, int64_t stride, int64_t dilation, int64_t pad_left,
    int64_t pad_right, int64_t norm_mode, double eps, double momentum_factor,
    bool relu_before_add, int64_t activation, double activation_param, const at::Tensor& out,
    const at::Tensor& saved, const at::Tensor& batch_mean, const at::Tensor& batch_var) {
  const ConvGeometry g = check_forward_args(x, weight, stride, dilation, pad_left, pad_right,
                                            norm_mode, out, saved, batch_mean, batch_var);
  check_activation(activation, activation_param);
  const float act_param = static_cast<float>(activation_param);
  TORCH_CHECK(x.is_cuda(), "fastres_ext: x must be a CUDA tensor");
  check_dtype(x);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"},
                                {out, "out"}, {saved, "saved"}, {batch_mean, "batch_mean"},
                                {batch_var, "batch_var"}})
    check_cuda(t, x, name);
  TORCH_CHECK(norm_mode == kNormNone || norm_mode == kNormEval || norm_mode == kNormTrain,
              "fastres_ext: bad norm_mode ", norm_mode);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "fastres_ext CUDA: weight and out must have x's dtype");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const KernelScope scope;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor bias_t = given(bias) ? bias->contiguous() : at::Tensor();
  const at::Tensor res = given(residual) ? residual->contiguous() : at::Tensor();
  check_cuda(bias_t, x, "bias");
  check_cuda(res, x, "residual");
  TORCH_CHECK(!bias_t.defined() || (bias_t.numel() == g.c_out &&
                                    bias_t.scalar_type() == x.scalar_type()),
              "fastres_ext CUDA: bias must have C_out values of x's dtype");
  TORCH_CHECK(!res.defined() || (res.sizes() == out.sizes() &&
                                 res.scalar_type() == x.scalar_type()),
              "fastres_ext CUDA: residual must have out's shape and dtype");

  ChannelNorm nz{norm_mode, nullptr, nullptr, nullptr, nullptr, static_cast<float>(eps),
                 nullptr, nullptr};
  if (norm_mode != kNormNone) {
    nz.gamma = channel_vector(gamma, g.c_out, x, "gamma");
    nz.beta = channel_vector(beta, g.c_out, x, "beta");
  }
  if (norm_mode == kNormEval) {
    nz.running_mean = channel_vector(running_mean, g.c_out, x, "running_mean");
    nz.running_var = channel_vector(running_var, g.c_out, x, "running_var");
  }

  // 16-bit inputs keep the conv output in float32 unless no backward can follow (see the top).
  const bool forward_only = saved.numel() == 0 && (norm_mode != kNormNone || relu_before_add);
  const bool native_conv =
      x.scalar_type() == at::kFloat || (forward_only && norm_mode != kNormTrain);
  const CudnnConv cc = cudnn_conv(g, pad_right);
  const Rows rows = make_rows(g, cc);
  const at::Tensor y =
      conv_full(x, weight, g, cc, native_conv ? x.scalar_type() : at::kFloat);

  FASTRES_DISPATCH_CUDA_TYPES(x.scalar_type(), "fastres_forward_cuda", [&] {
    at::Tensor norm;  // keeps the train statistics alive until the apply kernel is queued
    if (norm_mode == kNormTrain) {
      norm = batch_statistics<scalar_t>(y, rows, bias_t, eps, momentum_factor, running_mean,
                                        running_var, x, batch_mean, batch_var, stream);
      nz.center = norm[0].data_ptr<float>();
      nz.invstd = norm[1].data_ptr<float>();
    }
    if (y.scalar_type() != at::kFloat) {
      launch_apply<scalar_t, scalar_t, scalar_t>(y, rows, nz, bias_t, res, relu_before_add,
                                                 activation, act_param, out, saved, stream);
    } else if (saved.numel() == 0 || saved.scalar_type() == x.scalar_type()) {
      launch_apply<scalar_t, float, scalar_t>(y, rows, nz, bias_t, res, relu_before_add,
                                              activation, act_param, out, saved, stream);
    } else {
      TORCH_CHECK(saved.scalar_type() == at::kFloat,
                  "fastres_ext CUDA: saved must have x's dtype or float32");
      launch_apply<scalar_t, float, float>(y, rows, nz, bias_t, res, relu_before_add,
                                           activation, act_param, out, saved, stream);
    }
  });
}

void conv_bn_relu_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& weight,
    const OptTensor& gamma, const OptTensor& beta, const at::Tensor& saved_in,
    const at::Tensor& out_in, const at::Tensor& var, const OptTensor& residual,
    bool has_residual, int64_t stride, int64_t dilation, int64_t pad_left, int64_t pad_right,
    int64_t norm_mode, double eps, bool relu_before_add, int64_t activation,
    double activation_param, const at::Tensor& grad_x, const at::Tensor& grad_weight,
    const at::Tensor& grad_bias, const at::Tensor& grad_gamma, const at::Tensor& grad_beta,
    const at::Tensor& grad_residual) {
  const ConvGeometry g =
      check_backward_args(x, weight, stride, dilation, pad_left, pad_right, norm_mode,
                          relu_before_add, activation, out_in, saved_in, grad_x, grad_weight);
  check_activation(activation, activation_param);
  TORCH_CHECK(x.is_cuda(), "fastres_ext: x must be a CUDA tensor");
  check_dtype(x);
  // The forward's residual: an activation other than ReLU differentiates at the sum.
  const bool read_residual = has_residual && activation != kActRelu;
  TORCH_CHECK(!read_residual || (given(residual) && residual->sizes() == out_in.sizes() &&
                                 residual->scalar_type() == x.scalar_type()),
              "fastres_ext: backward of an activation other than ReLU after a residual add "
              "needs the residual");
  const at::Tensor res = read_residual ? residual->contiguous() : at::Tensor();
  check_cuda(res, x, "residual");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{weight, "weight"},
                                {grad_out_in, "grad_out"}, {out_in, "out"},
                                {saved_in, "saved"}, {grad_x, "grad_x"},
                                {grad_weight, "grad_weight"}, {grad_bias, "grad_bias"},
                                {grad_residual, "grad_residual"}})
    check_cuda(t, x, name);
  TORCH_CHECK(grad_out_in.sizes() == out_in.sizes() &&
                  grad_out_in.scalar_type() == x.scalar_type() &&
                  out_in.scalar_type() == x.scalar_type() &&
                  weight.scalar_type() == x.scalar_type(),
              "fastres_ext CUDA: grad_out, out and weight must have x's dtype, grad_out out's "
              "shape");
  TORCH_CHECK(!has_residual || (grad_residual.sizes() == out_in.sizes() &&
                                grad_residual.scalar_type() == x.scalar_type() &&
                                grad_residual.is_contiguous()),
              "fastres_ext CUDA: grad_residual must be a contiguous tensor like out");
  TORCH_CHECK(grad_bias.numel() == 0 || (grad_bias.numel() == g.c_out &&
                                         grad_bias.scalar_type() == x.scalar_type()),
              "fastres_ext CUDA: grad_bias must be empty or C_out values of x's dtype");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const KernelScope scope;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor grad_out = grad_out_in.contiguous(), out = out_in.contiguous();
  const at::Tensor saved = saved_in.contiguous();
  const bool normalize = norm_mode != kNormNone, train = norm_mode == kNormTrain;

  const CudnnConv cc = cudnn_conv(g, pad_right);
  const Rows rows = make_rows(g, cc);
  const at::Tensor grad_y = at::empty({g.batch, g.c_out, cc.l_full}, x.options());
  const at::Tensor part = at::empty({3, g.c_out, rows.parts()}, x.options().dtype(at::kFloat));

  FASTRES_DISPATCH_CUDA_TYPES(x.scalar_type(), "fastres_backward_cuda", [&] {
    auto run = [&](auto* saved_ptr) {
      using saved_t = std::remove_const_t<std::remove_pointer_t<decltype(saved_ptr)>>;
      GradArgs<scalar_t, saved_t> a{};
      a.grad_out = grad_out.data_ptr<scalar_t>();
      a.out = out.data_ptr<scalar_t>();
      a.saved = saved_ptr;
      a.grad_residual = has_residual ? grad_residual.data_ptr<scalar_t>() : nullptr;
      a.grad_y = grad_y.data_ptr<scalar_t>();
      a.part = part.data_ptr<float>();
      a.eps = static_cast<float>(eps);
      a.inv_n = 1.f / static_cast<float>(g.batch * g.l_out);
      a.mode = norm_mode;
      a.relu_before_add = relu_before_add;
      a.residual = ptr_or_null<scalar_t>(res);
      a.activation = activation;
      a.act_param = static_cast<float>(activation_param);
      if (normalize) {
        a.gamma = channel_vector(gamma, g.c_out, x, "gamma");
        a.beta = channel_vector(beta, g.c_out, x, "beta");
        a.var = channel_vector(var, g.c_out, x, "var");
        TORCH_CHECK(grad_gamma.numel() == g.c_out && grad_beta.numel() == g.c_out &&
                        grad_gamma.scalar_type() == at::kFloat &&
                        grad_beta.scalar_type() == at::kFloat,
                    "fastres_ext CUDA: grad_gamma/grad_beta must be C_out float32 values");
        check_cuda(grad_gamma, x, "grad_gamma");
        check_cuda(grad_beta, x, "grad_beta");
      }
      const at::Tensor residual_grad = has_residual ? grad_residual : at::Tensor();
      const at::Tensor bn_beta = normalize ? grad_beta : at::Tensor();
      const at::Tensor bn_gamma = normalize ? grad_gamma : at::Tensor();
      if (train) {
        launch_grad(a, rows, kMaskAndSums, grad_out, out, saved, residual_grad, grad_y, res,
                    stream);
        launch_sums<scalar_t>(part, rows, 0, 2, bn_beta, bn_gamma, at::Tensor(), stream);
        a.grad_beta = grad_beta.data_ptr<float>();
        a.grad_gamma = grad_gamma.data_ptr<float>();
        launch_grad(a, rows, kTrainGradY, grad_out, out, saved, residual_grad, grad_y, res,
                    stream);
        launch_sums<scalar_t>(part, rows, 2, 1, at::Tensor(), at::Tensor(), grad_bias, stream);
      } else {
        launch_grad(a, rows, kOnePass, grad_out, out, saved, residual_grad, grad_y, res,
                    stream);
        launch_sums<scalar_t>(part, rows, 0, 3, bn_beta, bn_gamma, grad_bias, stream);
      }
    };
    if (saved.numel() == 0 || saved.scalar_type() == x.scalar_type()) {
      run(ptr_or_null<scalar_t>(saved));
    } else {
      TORCH_CHECK(saved.scalar_type() == at::kFloat,
                  "fastres_ext CUDA: saved must have x's dtype or float32");
      run(saved.data_ptr<float>());
    }
  });
  conv_backward(grad_y, x.contiguous(), weight.contiguous(), g, cc, grad_x, grad_weight);
}

TORCH_LIBRARY_IMPL(fastres_ext, CUDA, m) {
  m.impl("forward", &conv_bn_relu_forward_cuda);
  m.impl("backward", &conv_bn_relu_backward_cuda);
}

}  // namespace fastres
