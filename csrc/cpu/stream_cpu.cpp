// Streaming inference on CPU: one call advances a whole causal stack (TemporalBlocks, 1x1
// convs, ReLUs) by one step or by a chunk of n steps. fastres/stream/ builds the inputs and
// documents the semantics; this file is its C++ kernel, registered as fastres_ext::stream_forward.
//
// What the Python side packs once, when a stream is built:
//   weights  one contiguous buffer: every conv as K taps of W_k[C_in][C_out] (row-major, so a
//            tap is the right-hand side of a GEMM over rows of channels-last activations), then
//            its bias. Batch norm is already folded in (W' = W * scale, b' = (b - mean) * scale
//            + beta), weight norm already applied.
//   meta     int64: a header and one record per layer (offsets into weights and state); the
//            layout constants are mirrored in fastres/stream/layout.py (META_*) and checked here.
//   state    every layer's input ring: (K-1)*d + 1 slots of (B, C) values; the input of time t
//            sits in slot t mod slots. Zero-filled, it is the causal zero padding.
//   position the number of steps taken so far (int64, advanced by this kernel).
//
// A layer reads the input of `lag` steps back from the chunk itself when it is inside the
// chunk, else from its ring (circular indexing; nothing is ever shifted), then writes the
// chunk's last inputs into the ring. The ring keeps one slot more than the conv needs so that
// the slot being written never is one a step reads: the Triton kernel relies on that, and the
// state layout is the same for every backend.
//
// Activations inside a call are channels-last, [b][t][c], in 4 workspace buffers used in
// rotation. A conv over rows of that layout is K GEMMs (one per tap) whose left-hand sides are
// shifted row windows: no im2col, no padded copy. Float32 chunks whose convs read no ring (the
// whole-stack path's fresh zero state) run "chunk tiles" instead where the CPU has AVX-512: the
// K taps, bias and epilogue of a tile of rows in registers, no BLAS call (below, with why).
// Work is split across threads by batch item
// (one parallel region for the whole stack) when there are at least as many items as threads or
// the chunk is a single step, else by time inside each conv (a region per conv, because the
// next conv reads earlier rows of this one's output).
//
// Instruction sets. The extension is compiled for baseline x86-64 (setup.py passes no -march);
// what needs more is chosen at run time by the CPU's features, never its model: the GEMMs and
// single-row kernels are target_clones for AVX-512, AVX2 + FMA and baseline (the loader picks
// one), and the optional bf16 weights' AVX512_BF16 dot product (a target attribute) runs only
// where CPUID reports it, a portable widening kernel everywhere else ("bf16 weights" below);
// the chunk tiles (AVX-512F, a target attribute) likewise, the GEMMs everywhere else.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "blas.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace fastres {
namespace {

// ----------------------------------------------------------------------------- meta layout
// Mirrored in fastres/stream/layout.py; a mismatch is caught by the header checks below.
// Header: n_layers, batch, c_in, c_out, max_c, state size, weights size, layout version.
constexpr int64_t kHeader = 8;
constexpr int64_t kFields = 16;  // per layer, see Layer
constexpr int64_t kMetaVersion = 1;
enum LayerKind : int64_t { kBlock = 0, kPointwise = 1, kRelu = 2 };

// One layer of the stack. Offsets index `weights` (w*, b*) or `state` (ring_*); -1 = absent.
struct Layer {
  int64_t kind, c_in, c_out, taps, dilation, slots;
  int64_t ring_in;   // ring of this layer's input: slots * B * c_in values
  int64_t ring_mid;  // block: ring of the first stage's output h, slots * B * c_out values
  int64_t w1, b1;    // block: conv1; pointwise: the conv
  int64_t w2, b2;    // block: conv2
  int64_t wd, bd;    // block: 1x1 downsample of the residual (wd = -1: identity)
  bool relu_before_add;  // block: relu(relu(conv2) + res) (weight-norm blocks) or relu(conv2 + res)
};

struct Net {
  c10::SmallVector<Layer, 32> layers;  // on the stack up to 32 layers: no allocation per step
  int64_t batch, c_in, c_out, max_c, state_size, weights_size;
  int64_t max_taps = 1;  // the most taps of any conv
};

Net parse_meta(const at::Tensor& meta) {
  TORCH_CHECK(meta.dim() == 1 && meta.scalar_type() == at::kLong && meta.is_contiguous() &&
                  meta.device().is_cpu() && meta.numel() >= kHeader,
              "fastres_ext.stream_forward: meta must be a contiguous int64 CPU vector");
  const int64_t* m = meta.data_ptr<int64_t>();
  Net net{{}, m[1], m[2], m[3], m[4], m[5], m[6]};
  const int64_t n_layers = m[0];
  TORCH_CHECK(m[7] == kMetaVersion && n_layers >= 1 &&
                  meta.numel() == kHeader + n_layers * kFields,
              "fastres_ext.stream_forward: meta has the wrong layout (version ", m[7],
              ", expected ", kMetaVersion, "): rebuild the stream");
  auto in_weights = [&](int64_t off, int64_t size) {
    return off == -1 || (off >= 0 && off + size <= net.weights_size);
  };
  auto in_state = [&](int64_t off, int64_t size) {
    return off >= 0 && off + size <= net.state_size;
  };
  int64_t channels = net.c_in;
  for (int64_t i = 0; i < n_layers; ++i) {
    const int64_t* r = m + kHeader + i * kFields;
    Layer l{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12],
            r[13], r[14] != 0};
    const int64_t ring_in = l.slots * net.batch * l.c_in;
    const bool block = l.kind == kBlock;
    const int64_t taps = block ? l.taps : 1;
    bool ok = (block || l.kind == kPointwise || l.kind == kRelu) && l.c_in == channels &&
              l.c_in >= 1 && l.c_out >= 1 && l.c_in <= net.max_c && l.c_out <= net.max_c &&
              l.taps >= 1 && l.dilation >= 1 && l.slots == (taps - 1) * l.dilation + 1 &&
              in_state(l.ring_in, ring_in);
    if (block) {
      ok = ok && in_state(l.ring_mid, l.slots * net.batch * l.c_out) && l.w1 >= 0 &&
           l.w2 >= 0 && in_weights(l.w1, l.taps * l.c_in * l.c_out) &&
           in_weights(l.w2, l.taps * l.c_out * l.c_out) && in_weights(l.b1, l.c_out) &&
           in_weights(l.b2, l.c_out) && in_weights(l.wd, l.c_in * l.c_out) &&
           in_weights(l.bd, l.c_out) && (l.wd >= 0 || l.c_in == l.c_out);
    } else if (l.kind == kPointwise) {
      ok = ok && l.w1 >= 0 && in_weights(l.w1, l.c_in * l.c_out) && in_weights(l.b1, l.c_out);
    } else {
      ok = ok && l.c_in == l.c_out;
    }
    TORCH_CHECK(ok, "fastres_ext.stream_forward: meta record of layer ", i,
                " is inconsistent (channels, ring or weight offsets): rebuild the stream");
    channels = l.c_out;
    net.max_taps = std::max(net.max_taps, taps);
    net.layers.push_back(l);
  }
  TORCH_CHECK(channels == net.c_out, "fastres_ext.stream_forward: meta channel counts disagree");
  return net;
}

// ----------------------------------------------------------------------------- GEMM

// 64 bytes of channels as a GCC/Clang vector type: one AVX-512 register, two AVX2 ones, four
// SSE ones, whatever the target. (A plain loop over a local array vectorizes too, but GCC keeps
// that array on the stack and reloads it every iteration; vector-typed locals stay in registers.)
typedef float f32x64b __attribute__((vector_size(64)));
typedef double f64x64b __attribute__((vector_size(64)));
template <typename T> struct Vec64;
template <> struct Vec64<float> { using type = f32x64b; };
template <> struct Vec64<double> { using type = f64x64b; };

// Unaligned vector load and store: memcpy, which the compiler turns into one unaligned move
// (an aligned attribute on the typedef would be dropped where it is a template argument).
// Always inlined, so no vector crosses a call: GCC's -Wpsabi note about vector returns does not
// apply.
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename V, typename T>
inline __attribute__((always_inline)) V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline __attribute__((always_inline)) void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// The end of a single-row kernel's tile of 4 vectors of channels: c[0 .. 4 * kV) = r, then
// max(c, 0) where `relu` (kV = 64 bytes of T).
template <typename T, typename V>
inline __attribute__((always_inline)) void store_tile4(T* c, V r0, V r1, V r2, V r3,
                                                        bool relu) {
  constexpr int64_t kV = 64 / sizeof(T);
  if (relu) {
    const V zero = {};
    r0 = r0 > zero ? r0 : zero;
    r1 = r1 > zero ? r1 : zero;
    r2 = r2 > zero ? r2 : zero;
    r3 = r3 > zero ? r3 : zero;
  }
  store(c, r0);
  store(c + kV, r1);
  store(c + 2 * kV, r2);
  store(c + 3 * kV, r3);
}

// c[m][:] += a[m][:] @ w for rows m < rows; a's rows are kd long with stride lda, w is
// (kd, n) row-major, c's rows have stride ldc. Vectorized over the output channels j, which are
// contiguous in w and c, so no sum is reassociated across channels. A tile of 4 vectors of
// channels is accumulated in two sets of registers (even and odd q, added at the end): eight
// independent multiply-add chains keep both FMA units busy.
template <typename T>
inline __attribute__((always_inline)) void rows_times_packed(int64_t rows, int64_t n,
                                                             int64_t kd, const T* a,
                                                             int64_t lda, const T* w, T* c,
                                                             int64_t ldc) {
  using V = typename Vec64<T>::type;
  constexpr int64_t kV = 64 / sizeof(T);  // channels per vector
  for (int64_t m = 0; m < rows; ++m) {
    const T* ar = a + m * lda;
    T* cr = c + m * ldc;
    int64_t j = 0;
    for (; j + 4 * kV <= n; j += 4 * kV) {
      V e0 = load<V>(cr + j), e1 = load<V>(cr + j + kV), e2 = load<V>(cr + j + 2 * kV),
        e3 = load<V>(cr + j + 3 * kV);
      V o0 = {}, o1 = {}, o2 = {}, o3 = {};
      int64_t q = 0;
      for (; q + 2 <= kd; q += 2) {
        const T* w0 = w + q * n + j;
        const T* w1 = w0 + n;
        const T a0 = ar[q], a1 = ar[q + 1];
        e0 += a0 * load<V>(w0);
        e1 += a0 * load<V>(w0 + kV);
        e2 += a0 * load<V>(w0 + 2 * kV);
        e3 += a0 * load<V>(w0 + 3 * kV);
        o0 += a1 * load<V>(w1);
        o1 += a1 * load<V>(w1 + kV);
        o2 += a1 * load<V>(w1 + 2 * kV);
        o3 += a1 * load<V>(w1 + 3 * kV);
      }
      if (q < kd) {
        const T* w0 = w + q * n + j;
        const T a0 = ar[q];
        e0 += a0 * load<V>(w0);
        e1 += a0 * load<V>(w0 + kV);
        e2 += a0 * load<V>(w0 + 2 * kV);
        e3 += a0 * load<V>(w0 + 3 * kV);
      }
      store(cr + j, e0 + o0);
      store(cr + j + kV, e1 + o1);
      store(cr + j + 2 * kV, e2 + o2);
      store(cr + j + 3 * kV, e3 + o3);
    }
    for (; j + kV <= n; j += kV) {  // single vectors of channels
      V e = load<V>(cr + j);
      for (int64_t q = 0; q < kd; ++q) e += ar[q] * load<V>(w + q * n + j);
      store(cr + j, e);
    }
    for (; j < n; ++j) {  // the last few channels
      T e = cr[j];
      for (int64_t q = 0; q < kd; ++q) e += ar[q] * w[q * n + j];
      cr[j] = e;
    }
  }
}

// Compiled for AVX-512, AVX2 + FMA and baseline x86-64, picked at load time by the CPU (the
// extension itself is built for baseline x86-64). fp-contract=fast lets the multiply-adds
// become FMAs where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTRES_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), \
                 optimize("fp-contract=fast")))
#else
#define FASTRES_CLONES
#endif

FASTRES_CLONES void small_gemm(int64_t rows, int64_t n, int64_t kd, const float* a, int64_t lda,
                               const float* w, float* c, int64_t ldc) {
  rows_times_packed<float>(rows, n, kd, a, lda, w, c, ldc);
}

FASTRES_CLONES void small_gemm(int64_t rows, int64_t n, int64_t kd, const double* a,
                               int64_t lda, const double* w, double* c, int64_t ldc) {
  rows_times_packed<double>(rows, n, kd, a, lda, w, c, ldc);
}

// One row of a single step: c[:n] = bias + sum_k a[k][:kd] @ w_k over the conv's taps k, where
// w_k = w + k * kd * n is tap k's (kd, n) row-major matrix (so the K taps are one (K*kd, n)
// matrix, read once from start to end) and a[k] tap k's input row (nullptr: zero, skipped: the
// causal padding of a fresh state); then c = max(c, 0) where `relu`. The bias, the sums of every
// tap and the ReLU stay in registers: one pass over the outputs per conv instead of a bias copy
// and a load and store of the outputs per tap. The same 8 multiply-add chains as above.
template <typename T>
inline __attribute__((always_inline)) void row_times_taps(int64_t n, int64_t kd, int64_t taps,
                                                          const T* const* a, const T* w,
                                                          const T* bias, T* c, bool relu) {
  using V = typename Vec64<T>::type;
  constexpr int64_t kV = 64 / sizeof(T);
  const V zero = {};
  int64_t j = 0;
  for (; j + 4 * kV <= n; j += 4 * kV) {
    V e0 = zero, e1 = zero, e2 = zero, e3 = zero;
    if (bias) {
      e0 = load<V>(bias + j);
      e1 = load<V>(bias + j + kV);
      e2 = load<V>(bias + j + 2 * kV);
      e3 = load<V>(bias + j + 3 * kV);
    }
    V o0 = zero, o1 = zero, o2 = zero, o3 = zero;
    for (int64_t k = 0; k < taps; ++k) {
      const T* ar = a[k];
      if (ar == nullptr) continue;
      const T* wk = w + k * kd * n + j;
      int64_t q = 0;
      for (; q + 2 <= kd; q += 2) {
        const T* w0 = wk + q * n;
        const T* w1 = w0 + n;
        const T a0 = ar[q], a1 = ar[q + 1];
        e0 += a0 * load<V>(w0);
        e1 += a0 * load<V>(w0 + kV);
        e2 += a0 * load<V>(w0 + 2 * kV);
        e3 += a0 * load<V>(w0 + 3 * kV);
        o0 += a1 * load<V>(w1);
        o1 += a1 * load<V>(w1 + kV);
        o2 += a1 * load<V>(w1 + 2 * kV);
        o3 += a1 * load<V>(w1 + 3 * kV);
      }
      if (q < kd) {
        const T* w0 = wk + q * n;
        const T a0 = ar[q];
        e0 += a0 * load<V>(w0);
        e1 += a0 * load<V>(w0 + kV);
        e2 += a0 * load<V>(w0 + 2 * kV);
        e3 += a0 * load<V>(w0 + 3 * kV);
      }
    }
    store_tile4(c + j, e0 + o0, e1 + o1, e2 + o2, e3 + o3, relu);
  }
  for (; j + kV <= n; j += kV) {  // single vectors of channels: 4 chains over the inputs
    V e0 = bias ? load<V>(bias + j) : zero, e1 = zero, e2 = zero, e3 = zero;
    for (int64_t k = 0; k < taps; ++k) {
      const T* ar = a[k];
      if (ar == nullptr) continue;
      const T* wk = w + k * kd * n + j;
      int64_t q = 0;
      for (; q + 4 <= kd; q += 4) {
        e0 += ar[q] * load<V>(wk + q * n);
        e1 += ar[q + 1] * load<V>(wk + (q + 1) * n);
        e2 += ar[q + 2] * load<V>(wk + (q + 2) * n);
        e3 += ar[q + 3] * load<V>(wk + (q + 3) * n);
      }
      for (; q < kd; ++q) e0 += ar[q] * load<V>(wk + q * n);
    }
    V e = (e0 + e1) + (e2 + e3);
    if (relu) e = e > zero ? e : zero;
    store(c + j, e);
  }
  if (j < n) {  // the last few channels: inputs outside, channels inside (rows of w in order)
    T acc[kV];
    const int64_t rest = n - j;
    for (int64_t i = 0; i < rest; ++i) acc[i] = bias ? bias[j + i] : T(0);
    for (int64_t k = 0; k < taps; ++k) {
      const T* ar = a[k];
      if (ar == nullptr) continue;
      const T* wk = w + k * kd * n + j;
      for (int64_t q = 0; q < kd; ++q)
        for (int64_t i = 0; i < rest; ++i) acc[i] += ar[q] * wk[q * n + i];
    }
    for (int64_t i = 0; i < rest; ++i) c[j + i] = relu && !(acc[i] > T(0)) ? T(0) : acc[i];
  }
}

FASTRES_CLONES void step_row(int64_t n, int64_t kd, int64_t taps, const float* const* a,
                             const float* w, const float* bias, float* c, bool relu) {
  row_times_taps<float>(n, kd, taps, a, w, bias, c, relu);
}

FASTRES_CLONES void step_row(int64_t n, int64_t kd, int64_t taps, const double* const* a,
                             const double* w, const double* bias, double* c, bool relu) {
  row_times_taps<double>(n, kd, taps, a, w, bias, c, relu);
}

// Below this many rows the loop above beats a BLAS call (whose fixed cost is a few us).
constexpr int64_t kBlasMinRows = 16;

template <typename T>
void gemm_acc(int64_t rows, int64_t n, int64_t kd, const T* a, int64_t lda, const T* w, T* c,
              int64_t ldc) {
  if (rows <= 0) return;
#ifdef FASTRES_BLAS_SYMBOLS
  if (rows >= kBlasMinRows) {
    // Column-major BLAS sees the row-major matrices transposed: C^T += W^T @ A^T.
    const char no = 'N';
    const int cm = static_cast<int>(n), cn = static_cast<int>(rows), ck = static_cast<int>(kd);
    const int l_w = static_cast<int>(n), l_a = static_cast<int>(lda), l_c = static_cast<int>(ldc);
    const T one = 1;
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&no, &no, &cm, &cn, &ck, &one, w, &l_w, a, &l_a, &one, c, &l_c);
    } else {
      dgemm_(&no, &no, &cm, &cn, &ck, &one, w, &l_w, a, &l_a, &one, c, &l_c);
    }
    return;
  }
#endif
  small_gemm(rows, n, kd, a, lda, w, c, ldc);
}

// ----------------------------------------------------------------------------- bf16 weights

// The optional bfloat16 weights of single steps (fastres.stream(..., weight_dtype=bf16)): a
// step of one stream reads every weight once and is bound by the cache's bandwidth, so half
// the bytes is about half the weight read. Sums, biases and everything between convs stay
// float32. Layout (fastres/stream/plan.py packs it): a conv's K taps as one (K*C_in, C_out)
// matrix, rows in pairs interleaved per output channel, [K*C_in/2][C_out][2], at twice the
// conv's offset in the float32 buffer (so at the same byte offset, 64-byte aligned as the
// float32 taps: a vector load never splits a cache line); an odd row count is padded with a
// zero row. The bf16 buffer holds twice as many values as the float32 one, half of them
// unused: the bytes a step reads are what halves.
//
// Two kernels read it, one chosen at run time by the CPU's features (never its model):
//   widen  any CPU: a 32-bit lane of the weights holds one output channel's pair; the even
//          row's weight is the lane shifted left 16 bits, the odd row's the lane with its
//          low 16 bits cleared: each is then a float32, multiplied by float32 inputs. Built
//          for AVX-512, AVX2 + FMA and baseline x86-64 (target_clones, as the GEMM).
//   dot    CPUs with AVX512_BF16: vdpbf16ps multiplies a lane's bf16 pair by a pair of
//          inputs and adds both products to a float32 sum, one instruction for widen's four
//          (how much faster that is depends on the CPU: benchmarks/NOTES.md); the inputs are
//          rounded to bf16 for it (the instruction takes bf16 on both sides). Compiled with
//          a target attribute, run only where CPUID says so.
// dot is the default where it runs; fastres._C.stream_bf16_kernel(name) picks one (tests
// run both on a CPU that has both, benchmarks compare them).

bool cpu_has_bf16_dot() {
  // Asked once: CPUID traps to the hypervisor in a VM (microseconds, as much as a step).
  static const bool has = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    __builtin_cpu_init();  // may run from a static initializer (g_bf16_kernel)
    if (!__builtin_cpu_supports("avx512f") || !__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx))
      return false;
    return ((eax >> 5) & 1) != 0;  // CPUID.(EAX=7,ECX=1):EAX[5] = AVX512_BF16
#else
    return false;
#endif
  }();
  return has;
}

enum class Bf16Kernel { kWiden, kDot };
// The kernel single bf16 rows run (set once at load time, changed only by stream_bf16_kernel).
Bf16Kernel g_bf16_kernel = cpu_has_bf16_dot() ? Bf16Kernel::kDot : Bf16Kernel::kWiden;

typedef uint32_t u32x64b __attribute__((vector_size(64)));

// c[:n] = bias + a[:2 * pairs] @ W, then max(c, 0) where `relu`; W the pair-interleaved bf16
// matrix at w (rows 2p and 2p+1 of channel j in the 32-bit lane p * n + j), a the float32
// inputs of the conv's rows side by side (an odd count padded with a zero). Four vectors of
// channels, even and odd rows in separate sums: the 8 chains of step_row.
FASTRES_CLONES void step_row_bf16_widen(int64_t n, int64_t pairs, const float* a,
                                        const uint16_t* w16, const float* bias, float* c,
                                        bool relu) {
  using V = f32x64b;
  using U = u32x64b;
  const uint32_t* w = reinterpret_cast<const uint32_t*>(w16);
  const V zero = {};
  const U high = U{} + 0xFFFF0000u;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    V e0 = zero, e1 = zero, e2 = zero, e3 = zero;
    if (bias) {
      e0 = load<V>(bias + j);
      e1 = load<V>(bias + j + 16);
      e2 = load<V>(bias + j + 32);
      e3 = load<V>(bias + j + 48);
    }
    V o0 = zero, o1 = zero, o2 = zero, o3 = zero;
    for (int64_t p = 0; p < pairs; ++p) {
      const uint32_t* wp = w + p * n + j;
      const float a0 = a[2 * p], a1 = a[2 * p + 1];
      const U u0 = load<U>(wp), u1 = load<U>(wp + 16), u2 = load<U>(wp + 32),
              u3 = load<U>(wp + 48);
      e0 += a0 * (V)(u0 << 16);
      e1 += a0 * (V)(u1 << 16);
      e2 += a0 * (V)(u2 << 16);
      e3 += a0 * (V)(u3 << 16);
      o0 += a1 * (V)(u0 & high);
      o1 += a1 * (V)(u1 & high);
      o2 += a1 * (V)(u2 & high);
      o3 += a1 * (V)(u3 & high);
    }
    store_tile4(c + j, e0 + o0, e1 + o1, e2 + o2, e3 + o3, relu);
  }
  for (; j + 16 <= n; j += 16) {  // single vectors of channels
    V e = bias ? load<V>(bias + j) : zero, o = zero;
    for (int64_t p = 0; p < pairs; ++p) {
      const U u = load<U>(w + p * n + j);
      e += a[2 * p] * (V)(u << 16);
      o += a[2 * p + 1] * (V)(u & high);
    }
    V r = e + o;
    if (relu) r = r > zero ? r : zero;
    store(c + j, r);
  }
  for (; j < n; ++j) {  // the last few channels
    float e = bias ? bias[j] : 0.f;
    for (int64_t p = 0; p < pairs; ++p) {
      const uint32_t u = w[p * n + j];
      const uint32_t lo = u << 16, hi = u & 0xFFFF0000u;
      float w0, w1;
      std::memcpy(&w0, &lo, 4);
      std::memcpy(&w1, &hi, 4);
      e += a[2 * p] * w0 + a[2 * p + 1] * w1;
    }
    c[j] = relu && !(e > 0.f) ? 0.f : e;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTRES_BF16_DOT 1
// The same with vdpbf16ps, from the K taps' input rows (nullptr: zero): the inputs first
// rounded to bf16 side by side (to nearest even, 16 at a time), then per pair one broadcast
// and one dot product per 16 channels.
__attribute__((target("avx512f,avx512bf16,avx512vl"))) void step_row_bf16_dot(
    int64_t n, int64_t kd, int64_t taps, const float* const* a, const uint16_t* w16,
    const float* bias, float* c, bool relu) {
  const int64_t rows = taps * kd, pairs = (rows + 1) / 2;
  c10::SmallVector<uint32_t, 1024> packed;  // on the stack up to 2048 inputs
  packed.resize_for_overwrite(pairs);
  uint32_t* ap = packed.data();
  uint16_t* ah = reinterpret_cast<uint16_t*>(ap);
  for (int64_t k = 0; k < taps; ++k) {  // tap k's row at ah + k * kd (a pair may straddle)
    for (int64_t i = 0; i < kd; i += 16) {
      const __mmask16 m = kd - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (kd - i)) - 1);
      const __m512 v = a[k] ? _mm512_maskz_loadu_ps(m, a[k] + i) : _mm512_setzero_ps();
      _mm256_mask_storeu_epi16(ah + k * kd + i, m, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
  if (rows % 2) ah[rows] = 0;
  const uint32_t* w = reinterpret_cast<const uint32_t*>(w16);
  const __m512 zero = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    __m512 e0 = zero, e1 = zero, e2 = zero, e3 = zero;
    if (bias) {
      e0 = _mm512_loadu_ps(bias + j);
      e1 = _mm512_loadu_ps(bias + j + 16);
      e2 = _mm512_loadu_ps(bias + j + 32);
      e3 = _mm512_loadu_ps(bias + j + 48);
    }
    __m512 o0 = zero, o1 = zero, o2 = zero, o3 = zero;
    int64_t p = 0;
    for (; p + 2 <= pairs; p += 2) {
      const uint32_t* w0 = w + p * n + j;
      const uint32_t* w1 = w0 + n;
      const __m512bh a0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[p]));
      const __m512bh a1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[p + 1]));
      e0 = _mm512_dpbf16_ps(e0, a0, (__m512bh)_mm512_loadu_si512(w0));
      e1 = _mm512_dpbf16_ps(e1, a0, (__m512bh)_mm512_loadu_si512(w0 + 16));
      e2 = _mm512_dpbf16_ps(e2, a0, (__m512bh)_mm512_loadu_si512(w0 + 32));
      e3 = _mm512_dpbf16_ps(e3, a0, (__m512bh)_mm512_loadu_si512(w0 + 48));
      o0 = _mm512_dpbf16_ps(o0, a1, (__m512bh)_mm512_loadu_si512(w1));
      o1 = _mm512_dpbf16_ps(o1, a1, (__m512bh)_mm512_loadu_si512(w1 + 16));
      o2 = _mm512_dpbf16_ps(o2, a1, (__m512bh)_mm512_loadu_si512(w1 + 32));
      o3 = _mm512_dpbf16_ps(o3, a1, (__m512bh)_mm512_loadu_si512(w1 + 48));
    }
    if (p < pairs) {
      const uint32_t* w0 = w + p * n + j;
      const __m512bh a0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[p]));
      e0 = _mm512_dpbf16_ps(e0, a0, (__m512bh)_mm512_loadu_si512(w0));
      e1 = _mm512_dpbf16_ps(e1, a0, (__m512bh)_mm512_loadu_si512(w0 + 16));
      e2 = _mm512_dpbf16_ps(e2, a0, (__m512bh)_mm512_loadu_si512(w0 + 32));
      e3 = _mm512_dpbf16_ps(e3, a0, (__m512bh)_mm512_loadu_si512(w0 + 48));
    }
    __m512 r0 = _mm512_add_ps(e0, o0), r1 = _mm512_add_ps(e1, o1),
           r2 = _mm512_add_ps(e2, o2), r3 = _mm512_add_ps(e3, o3);
    if (relu) {
      r0 = _mm512_max_ps(r0, zero);
      r1 = _mm512_max_ps(r1, zero);
      r2 = _mm512_max_ps(r2, zero);
      r3 = _mm512_max_ps(r3, zero);
    }
    _mm512_storeu_ps(c + j, r0);
    _mm512_storeu_ps(c + j + 16, r1);
    _mm512_storeu_ps(c + j + 32, r2);
    _mm512_storeu_ps(c + j + 48, r3);
  }
  for (; j < n; j += 16) {  // single vectors of channels, the last one masked
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    __m512 e = bias ? _mm512_maskz_loadu_ps(m, bias + j) : zero;
    for (int64_t p = 0; p < pairs; ++p)
      e = _mm512_dpbf16_ps(e, (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[p])),
                           (__m512bh)_mm512_maskz_loadu_epi32(m, w + p * n + j));
    if (relu) e = _mm512_max_ps(e, zero);
    _mm512_mask_storeu_ps(c + j, m, e);
  }
}
#endif

// One row of a conv with bf16 weights, from the K taps' input rows (nullptr: zero), by the
// kernel of this CPU (widen or dot, above).
void step_row_bf16(int64_t n, int64_t kd, int64_t taps, const float* const* a,
                   const uint16_t* w, const float* bias, float* c, bool relu) {
#ifdef FASTRES_BF16_DOT
  if (g_bf16_kernel == Bf16Kernel::kDot) {
    step_row_bf16_dot(n, kd, taps, a, w, bias, c, relu);
    return;
  }
#endif
  const int64_t rows = taps * kd, pairs = (rows + 1) / 2;
  c10::SmallVector<float, 2048> in;  // on the stack up to 2048 inputs
  in.resize_for_overwrite(2 * pairs);
  float* ip = in.data();
  for (int64_t k = 0; k < taps; ++k) {
    if (a[k]) std::memcpy(ip + k * kd, a[k], kd * sizeof(float));
    else std::memset(ip + k * kd, 0, kd * sizeof(float));
  }
  if (rows % 2) ip[rows] = 0.f;
  step_row_bf16_widen(n, pairs, ip, w, bias, c, relu);
}

// ----------------------------------------------------------------------------- chunk tiles

// A conv over a chunk of rows without BLAS: the "tiles" kernel of float32 chunks whose taps
// read no ring (a fresh zero state: the whole-stack path of fastres/stream/whole_sequence.py,
// and 1x1 convs). The GEMM path above makes per conv a bias copy, K BLAS calls of
// (rows, c_in) x (c_in, c_out), then a pass for the ReLU and one for the residual: at 64
// channels and a few hundred rows each call is a few microseconds of fixed cost and every pass
// re-reads the outputs. Here a tile of MR rows x NV vectors of 16 output channels sits in
// AVX-512 registers (MR * NV <= 24 of the 32) from the bias to the stored output: all K taps
// are summed into it (tap k's rows are the tile's rows shifted back by lag_k, read in place,
// a zero row where t - lag_k < 0: the causal padding), and the epilogue (ReLU; or the residual
// add and ReLU, with the weight-norm block's ReLU before the add) runs on the registers. Per
// input channel a tile loads NV weight vectors and broadcasts MR inputs for MR * NV FMAs.
// Work is cut by 64 output channels (outer: that slice of the taps' weights, K * c_in * 64
// floats, 48 KB at c_in = 64, stays in L1/L2 while every row tile reads it), then tiles of MR
// rows; the last vector of channels is masked (any c_out), the last tile has fewer rows.
// Threads split rows as the GEMM path does (run_phase's ranges).
//
// AVX-512 only (a target attribute, run where CPUID reports AVX512F); elsewhere, and for
// float64 or chunks that read a ring, the GEMM path runs. fastres._C.stream_chunk_kernel(name)
// switches between the two (tests run both, benchmarks compare them).

bool cpu_has_avx512f() {
  static const bool has = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return false;
#endif
  }();
  return has;
}

enum class ChunkKernel { kGemm, kTiles };
#if defined(__x86_64__) && defined(__GNUC__)
ChunkKernel g_chunk_kernel = cpu_has_avx512f() ? ChunkKernel::kTiles : ChunkKernel::kGemm;
#else
ChunkKernel g_chunk_kernel = ChunkKernel::kGemm;
#endif

// What a tile does with its sums: store them, their ReLU, relu(sum + res) or
// relu(relu(sum) + res).
enum class Epilogue { kNone, kRelu, kAddRelu, kReluAddRelu };

// One conv's operands for tiles: weights K x [c_in][c_out], bias (or nullptr), the source rows
// (row stride ld), the destination rows and the residual rows (same stride), `zeros` a row of
// c_in zeros for taps that read before the chunk.
struct TileConv {
  int64_t c_in, c_out, taps, dilation, ld;
  const float* w;
  const float* bias;
  const float* src;
  float* dst;
  const float* res;
  const float* zeros;
  Epilogue epi;
};

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTRES_TILES 1
#define FASTRES_AVX512 __attribute__((target("avx512f"), always_inline)) inline

// Rows [t, t + MR) (row index t of a sequence whose row 0 is at base), output channels
// [j, j + 16 * NV) with the last vector masked by `last`.
template <int MR, int NV>
FASTRES_AVX512 void tile(const TileConv& cv, const float* base_src, float* base_dst,
                         const float* base_res, int64_t t, int64_t j, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
    const __m512 b = cv.bias ? _mm512_maskz_loadu_ps(m, cv.bias + j + 16 * v)
                             : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r][v] = b;
  }
  for (int64_t k = 0; k < cv.taps; ++k) {
    const int64_t lag = (cv.taps - 1 - k) * cv.dilation;
    if (t + MR - 1 - lag < 0) continue;  // every row of the tile reads the zero padding
    const float* a[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
      a[r] = t + r - lag >= 0 ? base_src + (t + r - lag) * cv.ld : cv.zeros;
    const float* wk = cv.w + k * cv.c_in * cv.c_out + j;
    for (int64_t q = 0; q < cv.c_in; ++q) {
      const float* wq = wk + q * cv.c_out;
      __m512 wv[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v)
        wv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, wq + 16 * v)
                            : _mm512_loadu_ps(wq + 16 * v);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 x = _mm512_set1_ps(a[r][q]);
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, wv[v], acc[r][v]);
      }
    }
  }
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* d = base_dst + (t + r) * cv.ld + j;
    const float* rs = base_res ? base_res + (t + r) * cv.ld + j : nullptr;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      __m512 e = acc[r][v];
      if (cv.epi == Epilogue::kReluAddRelu) e = _mm512_max_ps(e, zero);
      if (cv.epi == Epilogue::kAddRelu || cv.epi == Epilogue::kReluAddRelu)
        e = _mm512_add_ps(e, _mm512_maskz_loadu_ps(m, rs + 16 * v));
      if (cv.epi != Epilogue::kNone) e = _mm512_max_ps(e, zero);
      _mm512_mask_storeu_ps(d + 16 * v, m, e);
    }
  }
}

// The last rows of a range, fewer than a full tile: a tile of exactly `rest` rows.
template <int NV, int M>
FASTRES_AVX512 void tail_tile(int64_t rest, const TileConv& cv, const float* s, float* d,
                              const float* r, int64_t t, int64_t j, __mmask16 last) {
  if constexpr (M > 0) {
    if (rest == M) tile<M, NV>(cv, s, d, r, t, j, last);
    else tail_tile<NV, M - 1>(rest, cv, s, d, r, t, j, last);
  }
}

// Rows [t0, t1) of channels [j, j + 16 * NV): NV = 4 takes 6 rows a tile (24 sums), fewer
// vectors take more rows, up to 12.
template <int NV>
FASTRES_AVX512 void tile_rows(const TileConv& cv, const float* s, float* d, const float* r,
                              int64_t t0, int64_t t1, int64_t j, __mmask16 last) {
  constexpr int MR = NV == 4 ? 6 : NV == 3 ? 8 : 12;
  int64_t t = t0;
  for (; t + MR <= t1; t += MR) tile<MR, NV>(cv, s, d, r, t, j, last);
  if (t < t1) tail_tile<NV, MR - 1>(t1 - t, cv, s, d, r, t, j, last);
}

// The conv on rows [t0, t1) of the sequence whose row 0 is row `row0` of src, dst and res.
__attribute__((target("avx512f"))) void conv_tiles(const TileConv& cv, int64_t row0,
                                                   int64_t t0, int64_t t1) {
  const float* s = cv.src + row0 * cv.ld;
  float* d = cv.dst + row0 * cv.ld;
  const float* r = cv.res ? cv.res + row0 * cv.ld : nullptr;
  for (int64_t j = 0; j < cv.c_out; j += 64) {
    const int64_t left = cv.c_out - j;
    const int nv = left >= 64 ? 4 : static_cast<int>((left + 15) / 16);
    const int64_t in_last = left - 16 * (nv - 1);
    const __mmask16 last = in_last >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << in_last) - 1);
    switch (nv) {
      case 4: tile_rows<4>(cv, s, d, r, t0, t1, j, last); break;
      case 3: tile_rows<3>(cv, s, d, r, t0, t1, j, last); break;
      case 2: tile_rows<2>(cv, s, d, r, t0, t1, j, last); break;
      default: tile_rows<1>(cv, s, d, r, t0, t1, j, last); break;
    }
  }
}
#endif

// ----------------------------------------------------------------------------- the stack

// Up to this many rows (batch items of a thread) a single step runs row by row
// (Stack::run_step_rows), each row reading a conv's weights once; more rows read them once a
// tap per row (Stack::run_items), which keeps a tap in L1 across rows. Measured on the 8 x 64
// model: row by row is about 10% faster for one row, 20-50% slower for 2-8 (benchmarks/NOTES.md).
constexpr int64_t kStepRowsMax = 1;
constexpr int64_t kStepRowsMaxTaps = 16;  // its tap pointers live on the stack

int64_t mod(int64_t a, int64_t m) { return ((a % m) + m) % m; }

// One conv as the kernel sees it: K taps of W_k[c_in][c_out] at `w`, bias at `b` (or none),
// its input ring at `ring` in the state (slots (K-1)*d + 1), or none (1x1 convs).
template <typename T>
struct Conv {
  int64_t c_in, c_out, taps, dilation, slots;
  const T* w;
  const T* b;
  const T* ring;  // nullptr: no history (a 1x1 conv, or a fresh zero state)
  const uint16_t* w16;  // the bf16 weights of a single step, or nullptr
};

// Everything one call shares: the chunk is n steps of B batch items, starting after `pos`
// steps; activations are [b][t][c] buffers with rows max_c apart.
template <typename T>
class Stack {
 public:
  // `zeros`: a row of max_c zeros (the tiles kernel's causal padding), or nullptr (no tiles).
  Stack(const Net& net, const T* weights, T* state, int64_t pos, int64_t n,
        const uint16_t* weights16 = nullptr, const T* zeros = nullptr)
      : net_(net), weights_(weights), weights16_(n == 1 ? weights16 : nullptr), state_(state),
        zeros_(zeros), pos_(pos), n_(n), ld_(net.max_c) {}

  // Runs every layer over batch items [b0, b1) and all n steps, phase after phase, writing the
  // rings as it goes (rows of different batch items never interact).
  void run_items(T* const* buf, int64_t b0, int64_t b1) const {
    int in = 0;
    for (const Layer& l : net_.layers) {
      const Buffers s = buffers(in);
      for (int phase = 0; phase < phases(l); ++phase) run_phase(l, phase, buf, s, b0, b1, 0, n_);
      write_rings(l, buf, s, b0, b1);
      in = s.out;
    }
  }

  // The same with the time steps of each phase split across threads (few batch items); a
  // thread gets at least `min_macs` multiply-adds.
  void run_split_time(T* const* buf, int64_t min_macs) const {
    int in = 0;
    for (const Layer& l : net_.layers) {
      const Buffers s = buffers(in);
      for (int phase = 0; phase < phases(l); ++phase) {
        const int64_t grain = std::max<int64_t>(1, min_macs / phase_macs(l, phase));
        for (int64_t b = 0; b < net_.batch; ++b) {
          at::parallel_for(0, n_, grain, [&](int64_t t0, int64_t t1) {
            run_phase(l, phase, buf, s, b, b + 1, t0, t1);
          });
        }
      }
      write_rings(l, buf, s, 0, net_.batch);
      in = s.out;
    }
  }

  // One step (n == 1) of batch items [b0, b1) row by row: per layer, each conv's K taps in one
  // pass over its weights (step_row), the weights read in the order they are packed (conv1,
  // conv2, downsample), the residual and ReLU on the row, the rings written with one copy per
  // row. What the few rows of a single step are bound by is reading the weights (from L2 for
  // a model of a few hundred KB): this does that and little else (benchmarks/NOTES.md).
  void run_step_rows(T* const* buf, int64_t b0, int64_t b1) const {
    int in = 0;
    const int64_t batch = net_.batch;
    for (const Layer& l : net_.layers) {
      const Buffers s = buffers(in);
      const int64_t slot = pos_ % l.slots;  // this step's slot; pos_ >= 0
      // Tap k's input row of batch item b from the ring `ring` (c channels) or, for lag 0, the
      // row itself; nullptr where there is no history (a fresh state kept nowhere).
      auto tap_rows = [&](const T** rows, const T* ring, int64_t c, const T* current,
                          int64_t b) {
        for (int64_t k = 0; k < l.taps; ++k) {
          const int64_t lag = (l.taps - 1 - k) * l.dilation;
          if (lag == 0) {
            rows[k] = current;
          } else if (state_ == nullptr) {
            rows[k] = nullptr;
          } else {
            const int64_t back = slot >= lag ? slot - lag : slot - lag + l.slots;
            rows[k] = ring + (back * batch + b) * c;
          }
        }
      };
      for (int64_t b = b0; b < b1; ++b) {
        const T* x = buf[s.in] + b * ld_;
        T* out = buf[s.out] + b * ld_;
        if (l.kind == kRelu) {
          relu_row(x, out, l.c_out);
        } else if (l.kind == kPointwise) {
          row_conv(l.c_out, l.c_in, 1, &x, l.w1, l.b1, out, false);
        } else {
          const T* rows[kStepRowsMaxTaps];
          T* h = buf[s.mid] + b * ld_;
          tap_rows(rows, state_ ? state_ + l.ring_in : nullptr, l.c_in, x, b);
          row_conv(l.c_out, l.c_in, l.taps, rows, l.w1, l.b1, h, true);
          tap_rows(rows, state_ ? state_ + l.ring_mid : nullptr, l.c_out, h, b);
          row_conv(l.c_out, l.c_out, l.taps, rows, l.w2, l.b2, out, l.relu_before_add);
          const T* res = x;
          if (l.wd >= 0) {
            T* r = buf[s.res] + b * ld_;
            row_conv(l.c_out, l.c_in, 1, &x, l.wd, l.bd, r, false);
            res = r;
          }
          for (int64_t i = 0; i < l.c_out; ++i) {
            const T z = out[i] + res[i];
            out[i] = z > T(0) ? z : T(0);
          }
          if (state_ != nullptr)
            std::memcpy(state_ + l.ring_mid + (slot * batch + b) * l.c_out, h,
                        l.c_out * sizeof(T));
        }
        if (state_ != nullptr)
          std::memcpy(state_ + l.ring_in + (slot * batch + b) * l.c_in, x, l.c_in * sizeof(T));
      }
      in = s.out;
    }
  }

  // Which workspace buffer holds the stack's output after run_* (the input starts in 0).
  int output_buffer() const {
    int in = 0;
    for (size_t i = 0; i < net_.layers.size(); ++i) in = buffers(in).out;
    return in;
  }

  // Multiply-adds of one step of one batch item through the whole stack.
  int64_t row_macs() const {
    int64_t macs = 0;
    for (const Layer& l : net_.layers)
      for (int phase = 0; phase < phases(l); ++phase) macs += phase_macs(l, phase);
    return macs;
  }

 private:
  // Which of the 4 workspace buffers hold a layer's input, the block's h, the projected
  // residual and the output (the next layer's input).
  struct Buffers { int in, mid, res, out; };
  static Buffers buffers(int in) { return {in, (in + 1) % 4, (in + 2) % 4, (in + 3) % 4}; }

  static int phases(const Layer& l) { return l.kind == kBlock ? 2 : 1; }

  // Multiply-adds of one row (one step of one batch item) of a phase.
  static int64_t phase_macs(const Layer& l, int phase) {
    if (l.kind == kRelu) return l.c_out;
    if (l.kind == kPointwise) return l.c_in * l.c_out;
    if (phase == 0) return l.taps * l.c_in * l.c_out;
    return l.taps * l.c_out * l.c_out + (l.wd >= 0 ? l.c_in * l.c_out : 0);
  }

  Conv<T> conv(const Layer& l, int which) const {
    const bool history = state_ != nullptr && l.slots > 1;
    if (which == 1)
      return {l.c_in, l.c_out, l.taps, l.dilation, l.slots, weights_ + l.w1, bias(l.b1),
              history ? state_ + l.ring_in : nullptr, half(l.w1)};
    if (which == 2)
      return {l.c_out, l.c_out, l.taps, l.dilation, l.slots, weights_ + l.w2, bias(l.b2),
              history ? state_ + l.ring_mid : nullptr, half(l.w2)};
    return {l.c_in, l.c_out, 1, 1, 1, weights_ + l.wd, bias(l.bd), nullptr,  // downsample
            half(l.wd)};
  }
  // One row of the conv whose weights start at `w` and bias at `b` (offsets into the
  // buffers): from the bf16 weights where this step has them, else the compute dtype's.
  void row_conv(int64_t n, int64_t kd, int64_t taps, const T* const* rows, int64_t w,
                int64_t b, T* c, bool relu) const {
    if constexpr (std::is_same_v<T, float>) {
      if (weights16_) {
        step_row_bf16(n, kd, taps, rows, half(w), bias(b), c, relu);
        return;
      }
    }
    step_row(n, kd, taps, rows, weights_ + w, bias(b), c, relu);
  }
  const uint16_t* half(int64_t off) const { return weights16_ ? weights16_ + 2 * off : nullptr; }
  const T* bias(int64_t off) const { return off < 0 ? nullptr : weights_ + off; }

  // Rows of one phase: batch items [b0, b1), time steps [t0, t1). A block's phase 0 is
  // h = relu(conv1(x)); phase 1 is out = relu([relu](conv2(h)) + residual). A pointwise layer
  // is out = conv(x), a ReLU layer out = relu(x).
  void run_phase(const Layer& l, int phase, T* const* buf, const Buffers& s, int64_t b0,
                 int64_t b1, int64_t t0, int64_t t1) const {
    const T* x = buf[s.in];
    T* out = buf[s.out];
    if (l.kind == kRelu) {
      for_each_row(b0, b1, t0, t1, [&](int64_t row) {
        relu_row(x + row * ld_, out + row * ld_, l.c_out);
      });
      return;
    }
    if (tiles_run(l, phase, buf, s, b0, b1, t0, t1)) return;
    if (l.kind == kPointwise) {
      conv_rows(conv(l, 1), x, out, b0, b1, t0, t1);
      return;
    }
    if (phase == 0) {
      T* h = buf[s.mid];
      conv_rows(conv(l, 1), x, h, b0, b1, t0, t1);
      for_each_row(b0, b1, t0, t1, [&](int64_t row) {
        relu_row(h + row * ld_, h + row * ld_, l.c_out);
      });
      return;
    }
    const T* res = x;
    if (l.wd >= 0) {
      conv_rows(conv(l, 3), x, buf[s.res], b0, b1, t0, t1);
      res = buf[s.res];
    }
    conv_rows(conv(l, 2), buf[s.mid], out, b0, b1, t0, t1);
    for_each_row(b0, b1, t0, t1, [&](int64_t row) {
      T* o = out + row * ld_;
      const T* r = res + row * ld_;
      if (l.relu_before_add) {
        for (int64_t i = 0; i < l.c_out; ++i) {
          const T z = (o[i] > T(0) ? o[i] : T(0)) + r[i];
          o[i] = z > T(0) ? z : T(0);
        }
      } else {
        for (int64_t i = 0; i < l.c_out; ++i) {
          const T z = o[i] + r[i];
          o[i] = z > T(0) ? z : T(0);
        }
      }
    });
  }

  // run_phase by the tiles kernel (bias, every tap and the epilogue in one pass over the
  // outputs), where it runs for this phase's convs: false where it does not (nothing done).
  bool tiles_run(const Layer& l, int phase, T* const* buf, const Buffers& s, int64_t b0,
                 int64_t b1, int64_t t0, int64_t t1) const {
#ifdef FASTRES_TILES
    if constexpr (std::is_same_v<T, float>) {
      if (g_chunk_kernel != ChunkKernel::kTiles || zeros_ == nullptr || l.kind == kRelu)
        return false;
      auto plain = [&](const Conv<T>& cv) { return cv.ring == nullptr && cv.w16 == nullptr; };
      const bool block = l.kind == kBlock;
      if (!plain(conv(l, 1)) || (block && (!plain(conv(l, 2)) || (l.wd >= 0 && !plain(conv(l, 3))))))
        return false;
      auto run = [&](const Conv<T>& cv, const T* src, T* dst, const T* res, Epilogue epi) {
        const TileConv tc{cv.c_in, cv.c_out, cv.taps, cv.dilation, ld_, cv.w, cv.b,
                          src,     dst,      res,     zeros_,      epi};
        for (int64_t b = b0; b < b1; ++b) conv_tiles(tc, b * n_, t0, t1);
      };
      if (!block) {
        run(conv(l, 1), buf[s.in], buf[s.out], nullptr, Epilogue::kNone);
      } else if (phase == 0) {
        run(conv(l, 1), buf[s.in], buf[s.mid], nullptr, Epilogue::kRelu);
      } else {
        const T* res = buf[s.in];
        if (l.wd >= 0) {
          run(conv(l, 3), buf[s.in], buf[s.res], nullptr, Epilogue::kNone);
          res = buf[s.res];
        }
        run(conv(l, 2), buf[s.mid], buf[s.out], res,
            l.relu_before_add ? Epilogue::kReluAddRelu : Epilogue::kAddRelu);
      }
      return true;
    }
#endif
    return false;
  }

  static void relu_row(const T* x, T* out, int64_t size) {
    for (int64_t i = 0; i < size; ++i) out[i] = x[i] > T(0) ? x[i] : T(0);
  }

  // fn(row) for every row b * n + t of the range.
  template <typename Fn>
  void for_each_row(int64_t b0, int64_t b1, int64_t t0, int64_t t1, Fn fn) const {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = t0; t < t1; ++t) fn(b * n_ + t);
  }

  // dst[b][t] = bias + sum_k W_k . input[b][t - lag_k], lag_k = (K-1-k) * d, over the rows
  // (b, t) of the range: from the chunk where t - lag_k >= 0, else from the ring.
  void conv_rows(const Conv<T>& cv, const T* src, T* dst, int64_t b0, int64_t b1, int64_t t0,
                 int64_t t1) const {
    if constexpr (std::is_same_v<T, float>) {
      // bf16 rows read the weights once per row: for many rows the float32 GEMM (BLAS),
      // which reads them once per tile of rows, is faster.
      if (cv.w16 && b1 - b0 < kBlasMinRows) {
        conv_rows_bf16(cv, src, dst, b0, b1);
        return;
      }
    }
    const int64_t batch = net_.batch;
    for_each_row(b0, b1, t0, t1, [&](int64_t row) {
      T* d = dst + row * ld_;
      if (cv.b) std::copy(cv.b, cv.b + cv.c_out, d);
      else std::fill(d, d + cv.c_out, T(0));
    });
    for (int64_t k = 0; k < cv.taps; ++k) {
      const int64_t lag = (cv.taps - 1 - k) * cv.dilation;
      const T* w = cv.w + k * cv.c_in * cv.c_out;
      if (n_ == 1) {
        // One step: the rows are batch items, all reading the same time step.
        if (lag == 0) {
          gemm_acc(b1 - b0, cv.c_out, cv.c_in, src + b0 * ld_, ld_, w, dst + b0 * ld_, ld_);
        } else if (cv.ring) {
          const T* slot = cv.ring + mod(pos_ - lag, cv.slots) * batch * cv.c_in;
          gemm_acc(b1 - b0, cv.c_out, cv.c_in, slot + b0 * cv.c_in, cv.c_in, w,
                   dst + b0 * ld_, ld_);
        }
        continue;
      }
      for (int64_t b = b0; b < b1; ++b) {
        T* d = dst + b * n_ * ld_;
        const int64_t lo = std::max(t0, lag);
        if (lo < t1)
          gemm_acc(t1 - lo, cv.c_out, cv.c_in, src + (b * n_ + lo - lag) * ld_, ld_, w,
                   d + lo * ld_, ld_);
        if (!cv.ring) continue;
        // Rows that read before the chunk: consecutive slots, split where the ring wraps.
        const int64_t hi = std::min(t1, lag);
        for (int64_t t = t0; t < hi;) {
          const int64_t slot = mod(pos_ + t - lag, cv.slots);
          const int64_t run = std::min(hi - t, cv.slots - slot);
          gemm_acc(run, cv.c_out, cv.c_in, cv.ring + (slot * batch + b) * cv.c_in,
                   batch * cv.c_in, w, d + t * ld_, ld_);
          t += run;
        }
      }
    }
  }

  // conv_rows of a single step with bf16 weights: per batch item, the K taps' input rows,
  // then one pass over the conv's bf16 weights (step_row_bf16).
  void conv_rows_bf16(const Conv<T>& cv, const T* src, T* dst, int64_t b0, int64_t b1) const {
    if constexpr (std::is_same_v<T, float>) {
      c10::SmallVector<const float*, kStepRowsMaxTaps> rows(cv.taps);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < cv.taps; ++k) {
          const int64_t lag = (cv.taps - 1 - k) * cv.dilation;
          rows[k] = lag == 0 ? src + b * ld_
                    : cv.ring ? cv.ring + (mod(pos_ - lag, cv.slots) * net_.batch + b) * cv.c_in
                              : nullptr;
        }
        step_row_bf16(cv.c_out, cv.c_in, cv.taps, rows.data(), cv.w16, cv.b, dst + b * ld_,
                      false);
      }
    }
  }

  // The chunk's last inputs of every ring of the layer, each into slot (time mod slots).
  void write_rings(const Layer& l, T* const* buf, const Buffers& s, int64_t b0, int64_t b1) const {
    if (state_ == nullptr) return;
    write_ring(state_ + l.ring_in, l.slots, l.c_in, buf[s.in], b0, b1);
    if (l.kind == kBlock) write_ring(state_ + l.ring_mid, l.slots, l.c_out, buf[s.mid], b0, b1);
  }

  void write_ring(T* ring, int64_t slots, int64_t c, const T* src, int64_t b0,
                  int64_t b1) const {
    const int64_t batch = net_.batch;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = std::max<int64_t>(0, n_ - slots); t < n_; ++t) {
        const int64_t slot = mod(pos_ + t, slots);
        std::memcpy(ring + (slot * batch + b) * c, src + (b * n_ + t) * ld_, c * sizeof(T));
      }
    }
  }

  const Net& net_;
  const T* weights_;
  const uint16_t* weights16_;  // bf16 weights (single steps only), or nullptr
  T* state_;
  const T* zeros_;  // max_c zeros for the tiles kernel, or nullptr
  const int64_t pos_, n_;
  // Row stride of the workspace buffers: max_c in every layer, so that a batch item's rows are
  // the same memory whatever the layer's width, and threads owning different items never write
  // where the other reads (with a stride of the layer's width they did, one layer apart).
  const int64_t ld_;
};


// Below about this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kParallelMacs = 1 << 19;

template <typename T>
void stream_forward_impl(const Net& net, const at::Tensor& x, const at::Tensor& weights,
                         const at::Tensor& state, const at::Tensor& position,
                         const at::Tensor& workspace, const at::Tensor& out, int64_t n,
                         const uint16_t* weights16) {
  const bool keep = state.numel() > 0;
  const int64_t pos = keep ? position.data_ptr<int64_t>()[0] : 0;
  TORCH_CHECK(pos >= 0, "fastres_ext.stream_forward: negative position ", pos);
  const int64_t buf_size = net.batch * n * net.max_c;
  at::Tensor ws = workspace;
  if (ws.numel() < 4 * buf_size) ws = at::empty({4 * buf_size}, weights.options());
  T* base = ws.data_ptr<T>();
  T* const buf[4] = {base, base + buf_size, base + 2 * buf_size, base + 3 * buf_size};

  const std::vector<T> zeros(net.max_c, T(0));
  const Stack<T> stack(net, weights.data_ptr<T>(), keep ? state.data_ptr<T>() : nullptr, pos,
                       n, weights16, zeros.data());
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t batch = net.batch, c_in = net.c_in, c_out = net.c_out;
  const T* result = buf[stack.output_buffer()];
  // (B, C, n) with any strides <-> [b][t][c] with rows max_c apart. x is read in place
  // wherever it lives (a slice x[:, :, t] of a longer sequence, a transpose, an expanded
  // tensor): the copy into the workspace is needed anyway, so strides cost nothing here.
  const int64_t ld = net.max_c;
  const int64_t xb = x.stride(0), xc = x.stride(1), xt = x.dim() == 3 ? x.stride(2) : 0;
  const int64_t ob = out.stride(0), oc = out.stride(1), ot = out.dim() == 3 ? out.stride(2) : 0;
  // Both copies are transposes of a (C, n) matrix per batch item, done by tiles of
  // kTransposeTile x kTransposeTile values: a tile's strided side then touches kTransposeTile
  // cache lines, each used whole. The plain loop (a channel's n values at a time) wrote one
  // value per 256-byte row over the whole sequence at 64 channels, and read back the same
  // way (benchmarks/NOTES.md, section 11).
  constexpr int64_t kTransposeTile = 16;
  auto transpose = [&](const T* src, int64_t s_row, int64_t s_col, T* dst, int64_t d_row,
                       int64_t d_col, int64_t rows, int64_t cols) {  // dst[c][r] = src[r][c]
    for (int64_t r0 = 0; r0 < rows; r0 += kTransposeTile) {
      const int64_t r1 = std::min(rows, r0 + kTransposeTile);
      for (int64_t c0 = 0; c0 < cols; c0 += kTransposeTile) {
        const int64_t c1 = std::min(cols, c0 + kTransposeTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r)
            dst[c * d_row + r * d_col] = src[r * s_row + c * s_col];
      }
    }
  };
  auto load_items = [&](int64_t b0, int64_t b1) {  // x[b] (C, n) -> rows [t][c]
    for (int64_t b = b0; b < b1; ++b)
      transpose(xp + b * xb, xc, xt, buf[0] + b * n * ld, ld, 1, c_in, n);
  };
  auto store_items = [&](int64_t b0, int64_t b1) {  // rows [t][c] -> out[b] (C, n)
    for (int64_t b = b0; b < b1; ++b)
      transpose(result + b * n * ld, ld, 1, op + b * ob, oc, ot, n, c_out);
  };

  auto run_items = [&](int64_t b0, int64_t b1) {
    load_items(b0, b1);
    // A single step of few rows.
    if (n == 1 && b1 - b0 <= kStepRowsMax && net.max_taps <= kStepRowsMaxTaps)
      stack.run_step_rows(buf, b0, b1);
    else
      stack.run_items(buf, b0, b1);
    store_items(b0, b1);
  };
  const bool by_items = n == 1 || batch >= at::get_num_threads();
  if (by_items && batch == 1) {  // one stream: nothing to split, no parallel region to enter
    run_items(0, 1);
  } else if (by_items) {
    const int64_t grain = std::max<int64_t>(1, kParallelMacs / (stack.row_macs() * n));
    at::parallel_for(0, batch, grain, run_items);
  } else {
    load_items(0, batch);
    stack.run_split_time(buf, kParallelMacs);
    store_items(0, batch);
  }
  if (keep) position.data_ptr<int64_t>()[0] = pos + n;
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  bool contiguous = true) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype &&
                  (!contiguous || t.is_contiguous()),
              "fastres_ext.stream_forward: ", name, " must be a ",
              contiguous ? "contiguous " : "", "CPU tensor of ", dtype, ", got ",
              t.scalar_type(), " on ", t.device());
}

// The checks of what a stream binds once (weights, meta, state, position, workspace and the
// optional bf16 weights): everything stream_forward_out checks but x and out. Returns the
// parsed meta and the bf16 weights' data (nullptr: none).
Net check_bound(const at::Tensor& weights, const at::Tensor& meta, const at::Tensor& state,
                const at::Tensor& position, const at::Tensor& workspace,
                const at::Tensor* weights16, const uint16_t** half) {
  Net net = parse_meta(meta);
  const at::ScalarType dtype = weights.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "fastres_ext.stream_forward: computes in float32 or float64, got ", dtype);
  for (auto [t, name] : {std::pair{&weights, "weights"}, {&workspace, "workspace"},
                         {&state, "state"}})
    check_tensor(*t, name, dtype);
  TORCH_CHECK(weights.numel() == net.weights_size,
              "fastres_ext.stream_forward: weights has ", weights.numel(),
              " values, meta expects ", net.weights_size);
  TORCH_CHECK(state.numel() == 0 || state.numel() == net.state_size,
              "fastres_ext.stream_forward: state has ", state.numel(), " values, meta expects ",
              net.state_size, " (or 0 for a fresh zero state)");
  TORCH_CHECK(state.numel() == 0 || (position.scalar_type() == at::kLong &&
                                     position.device().is_cpu() && position.numel() == 1),
              "fastres_ext.stream_forward: position must be a one-element int64 CPU tensor");
  *half = nullptr;
  if (weights16 != nullptr) {
    TORCH_CHECK(dtype == at::kFloat && weights16->scalar_type() == at::kBFloat16 &&
                    weights16->is_contiguous() && weights16->device().is_cpu() &&
                    weights16->numel() == 2 * net.weights_size,
                "fastres_ext.stream_forward: bf16 weights must be a contiguous bfloat16 CPU "
                "tensor of twice the float32 weights' size");
    *half = reinterpret_cast<const uint16_t*>(weights16->data_ptr());
  }
  return net;
}

// The checks of one call's x and out against the stream; returns the chunk length n.
int64_t check_io(const Net& net, at::ScalarType dtype, const at::Tensor& x,
                 const at::Tensor& out) {
  check_tensor(x, "x", dtype, /*contiguous=*/false);  // read in place, any strides
  check_tensor(out, "out", dtype, /*contiguous=*/false);
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "fastres_ext.stream_forward: out must not overlap itself");
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && out.dim() == x.dim(),
              "fastres_ext.stream_forward: x and out must both be (B, C) or (B, C, n)");
  const int64_t n = x.dim() == 3 ? x.size(2) : 1;
  TORCH_CHECK(x.size(0) == net.batch && x.size(1) == net.c_in && n >= 1,
              "fastres_ext.stream_forward: x has shape ", x.sizes(), ", the stream expects (",
              net.batch, ", ", net.c_in, "[, n >= 1])");
  TORCH_CHECK(out.size(0) == net.batch && out.size(1) == net.c_out &&
                  (x.dim() == 2 || out.size(2) == n),
              "fastres_ext.stream_forward: out has shape ", out.sizes(), ", expected (",
              net.batch, ", ", net.c_out, x.dim() == 3 ? ", n)" : ")");
  return n;
}

void run_checked(const Net& net, const at::Tensor& x, const at::Tensor& weights,
                 const at::Tensor& state, const at::Tensor& position,
                 const at::Tensor& workspace, const at::Tensor& out, int64_t n,
                 const uint16_t* half) {
  if (weights.scalar_type() == at::kFloat) {
    stream_forward_impl<float>(net, x, weights, state, position, workspace, out, n, half);
  } else {
    stream_forward_impl<double>(net, x, weights, state, position, workspace, out, n, nullptr);
  }
}

// x (B, C_in) -> out (B, C_out): one step; x (B, C_in, n) -> out (B, C_out, n): n steps. x and
// out may have any strides (out must not overlap itself or x).
// state empty: run from a fresh zero state and keep nothing (the full causal forward).
// workspace: at least 4 * B * n * max_c values, or anything smaller to allocate one here.
// weights16 (fastres._C.stream_step only): the bf16 weights single steps compute with, or
// nullptr.
void stream_forward_out_cpu(const at::Tensor& x, const at::Tensor& weights,
                            const at::Tensor& meta, const at::Tensor& state,
                            const at::Tensor& position, const at::Tensor& workspace,
                            const at::Tensor& out, const at::Tensor* weights16 = nullptr) {
  const uint16_t* half = nullptr;
  const Net net = check_bound(weights, meta, state, position, workspace, weights16, &half);
  const int64_t n = check_io(net, weights.scalar_type(), x, out);
  run_checked(net, x, weights, state, position, workspace, out, n, half);
}

// A new output for x: (B, C_out[, n]), contiguous, made without the dispatcher (at::empty
// through it costs a few hundred nanoseconds of a step that is a few microseconds).
at::Tensor new_output(const at::Tensor& x, int64_t c_out) {
  const at::TensorOptions options = x.options();
  return x.dim() == 2 ? at::Tensor(at::detail::empty_cpu({x.size(0), c_out}, options))
                      : at::Tensor(at::detail::empty_cpu({x.size(0), c_out, x.size(2)}, options));
}

// The same into a new output tensor (allocated here: cheaper than from Python per step).
at::Tensor stream_forward_cpu(const at::Tensor& x, const at::Tensor& weights,
                              const at::Tensor& meta, const at::Tensor& state,
                              const at::Tensor& position, const at::Tensor& workspace,
                              const at::Tensor* weights16 = nullptr) {
  TORCH_CHECK(meta.numel() >= kHeader && (x.dim() == 2 || x.dim() == 3) && x.device().is_cpu(),
              "fastres_ext.stream_forward: x must be a (B, C) or (B, C, n) CPU tensor");
  at::Tensor out = new_output(x, meta.data_ptr<int64_t>()[3]);
  stream_forward_out_cpu(x, weights, meta, state, position, workspace, out, weights16);
  return out;
}

// The ops' signatures (torch.ops.fastres_ext): float32 or float64 weights only.
void stream_forward_out_op(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& meta,
                           const at::Tensor& state, const at::Tensor& position,
                           const at::Tensor& workspace, const at::Tensor& out) {
  stream_forward_out_cpu(x, weights, meta, state, position, workspace, out);
}

at::Tensor stream_forward_op(const at::Tensor& x, const at::Tensor& weights,
                             const at::Tensor& meta, const at::Tensor& state,
                             const at::Tensor& position, const at::Tensor& workspace) {
  return stream_forward_cpu(x, weights, meta, state, position, workspace);
}

// Whether every tensor of `now` holds exactly the bytes of the tensor at the same index of
// `then` (same dtype and shape). What fastres/stream/fold.py (Snapshot) checks its folds against:
// unlike version counters, it also sees writes through .data. NaNs compare by their bits.
bool stream_same_values(at::TensorList now, at::TensorList then) {
  if (now.size() != then.size()) return false;
  for (size_t i = 0; i < now.size(); ++i) {
    const at::Tensor& a = now[i];
    const at::Tensor& b = then[i];
    if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes() ||
        a.device() != b.device())
      return false;
    if (a.device().is_cpu() && a.is_contiguous() && b.is_contiguous()) {
      if (std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) != 0) return false;
    } else if (!at::equal(a, b)) {
      return false;
    }
  }
  return true;
}

// ----------------------------------------------------------------------------- from Python

// fastres._C.stream_step(weights, meta, state, position, workspace, weights16, x, out) -> out:
// stream_forward_out (stream_forward where out is None) with, optionally, the bf16 weights of
// single steps (weights16 None: none), called from Python without the dispatcher. A step of
// one stream is a few microseconds of work; going through torch.ops (argument parsing
// against the schema, boxing, the dispatch itself) cost as much again. Every check of
// stream_forward_out still runs, before anything is written.
PyObject* py_stream_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 8, "fastres._C.stream_step takes 8 arguments, got ", nargs);
  for (Py_ssize_t i = 0; i < 8; ++i) {
    const bool optional = i == 5 || i == 7;  // weights16, out
    TORCH_CHECK_TYPE(THPVariable_Check(args[i]) || (optional && args[i] == Py_None),
                     "fastres._C.stream_step: argument ", i, " must be a tensor");
  }
  const at::Tensor& weights = THPVariable_Unpack(args[0]);
  const at::Tensor& meta = THPVariable_Unpack(args[1]);
  const at::Tensor& state = THPVariable_Unpack(args[2]);
  const at::Tensor& position = THPVariable_Unpack(args[3]);
  const at::Tensor& workspace = THPVariable_Unpack(args[4]);
  const at::Tensor* weights16 = args[5] == Py_None ? nullptr : &THPVariable_Unpack(args[5]);
  const at::Tensor& x = THPVariable_Unpack(args[6]);
  at::Tensor out;
  if (args[7] == Py_None) {
    out = stream_forward_cpu(x, weights, meta, state, position, workspace, weights16);
  } else {
    out = THPVariable_Unpack(args[7]);
    stream_forward_out_cpu(x, weights, meta, state, position, workspace, out, weights16);
  }
  return THPVariable_Wrap(out);
  END_HANDLE_TH_ERRORS
}

// fastres._C.StreamStep(weights, meta, state, position, workspace, weights16): a stream's step
// bound to the tensors it keeps (what fastres/stream/runners.py's CppRunner holds), checked
// and parsed once; calling it, step(x, out=None) -> out, checks only x and out. Everything
// between Python and the kernel that does not depend on x is done here once: the meta table
// is parsed and checked when the object is made (as often as the stream's batch size or fold
// changes), not per step. The tensors are held, so they live as long as the step; their data
// pointers are read per call (in place changes of the state, reset and load_state, are seen).
struct BoundStep {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  // Members with constructors, made and destroyed by hand (the object is C-allocated).
  struct Held {
    Net net;
    at::Tensor weights, meta, state, position, workspace, weights16;
    const uint16_t* half;
    at::ScalarType dtype;
  }* held;
};

PyObject* bound_step_call(PyObject* self, PyObject* const* args, size_t nargsf,
                          PyObject* kwnames) {
  HANDLE_TH_ERRORS
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  TORCH_CHECK_TYPE(kwnames == nullptr && (nargs == 1 || nargs == 2),
                   "fastres._C.StreamStep takes (x, out=None) positionally");
  PyObject* out_arg = nargs == 2 ? args[1] : Py_None;
  TORCH_CHECK_TYPE(THPVariable_Check(args[0]) && (out_arg == Py_None || THPVariable_Check(out_arg)),
                   "fastres._C.StreamStep: x and out must be tensors");
  const BoundStep::Held& h = *reinterpret_cast<BoundStep*>(self)->held;
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  at::Tensor out;
  if (out_arg == Py_None) {
    TORCH_CHECK(x.device().is_cpu() && (x.dim() == 2 || x.dim() == 3),
                "fastres._C.StreamStep: x must be a (B, C) or (B, C, n) CPU tensor");
    out = new_output(x, h.net.c_out);
  } else {
    out = THPVariable_Unpack(out_arg);
  }
  const int64_t n = check_io(h.net, h.dtype, x, out);
  run_checked(h.net, x, h.weights, h.state, h.position, h.workspace, out, n, h.half);
  return out_arg == Py_None ? THPVariable_Wrap(std::move(out)) : Py_NewRef(out_arg);
  END_HANDLE_TH_ERRORS
}

PyObject* bound_step_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  HANDLE_TH_ERRORS
  PyObject* a[6];
  TORCH_CHECK_TYPE(kwargs == nullptr || PyDict_Size(kwargs) == 0,
                   "fastres._C.StreamStep takes positional arguments only");
  if (!PyArg_UnpackTuple(args, "StreamStep", 6, 6, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5]))
    return nullptr;
  for (int i = 0; i < 6; ++i)
    TORCH_CHECK_TYPE(THPVariable_Check(a[i]) || (i == 5 && a[i] == Py_None),
                     "fastres._C.StreamStep: argument ", i, " must be a tensor");
  auto held = std::make_unique<BoundStep::Held>();
  held->weights = THPVariable_Unpack(a[0]);
  held->meta = THPVariable_Unpack(a[1]);
  held->state = THPVariable_Unpack(a[2]);
  held->position = THPVariable_Unpack(a[3]);
  held->workspace = THPVariable_Unpack(a[4]);
  if (a[5] != Py_None) held->weights16 = THPVariable_Unpack(a[5]);
  TORCH_CHECK(held->state.numel() > 0,
              "fastres._C.StreamStep: a bound step keeps its state (an empty state is for "
              "stream_step's single runs)");
  held->net = check_bound(held->weights, held->meta, held->state, held->position,
                          held->workspace, a[5] == Py_None ? nullptr : &held->weights16,
                          &held->half);
  // The kernel reads `workspace` only when it holds a whole call's activations; one step's.
  TORCH_CHECK(held->workspace.numel() >= 4 * held->net.batch * held->net.max_c,
              "fastres._C.StreamStep: the workspace must hold one step's activations");
  held->dtype = held->weights.scalar_type();
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  reinterpret_cast<BoundStep*>(self)->vectorcall = bound_step_call;
  reinterpret_cast<BoundStep*>(self)->held = held.release();
  return self;
  END_HANDLE_TH_ERRORS
}

void bound_step_dealloc(PyObject* self) {
  delete reinterpret_cast<BoundStep*>(self)->held;
  Py_TYPE(self)->tp_free(self);
}

struct NoGil {  // the GIL released for a scope (exceptions included)
  PyThreadState* saved = PyEval_SaveThread();
  ~NoGil() { PyEval_RestoreThread(saved); }
};

double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// The sum of every float32 weight (what a step must at least read), vectorized as the GEMM.
FASTRES_CLONES float sum_weights(const float* w, int64_t size) {
  f32x64b a = {}, b = {}, c = {}, d = {};
  int64_t i = 0;
  for (; i + 64 <= size; i += 64) {
    a += load<f32x64b>(w + i);
    b += load<f32x64b>(w + i + 16);
    c += load<f32x64b>(w + i + 32);
    d += load<f32x64b>(w + i + 48);
  }
  float total = 0;
  for (; i < size; ++i) total += w[i];
  const f32x64b sum = a + b + c + d;
  for (int j = 0; j < 16; ++j) total += sum[j];
  return total;
}

// The integer sum of every bf16 weight a single step reads (each conv's pair-interleaved
// matrix; the biases are float32 and few): what a step with bf16 weights must at least read.
FASTRES_CLONES uint32_t sum_weights_bf16(const Net& net, const uint16_t* half) {
  u32x64b a = {}, b = {};
  uint32_t total = 0;
  auto add = [&](int64_t off, int64_t rows, int64_t cols) {
    if (off < 0) return;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(half + 2 * off);
    const int64_t lanes = (rows + 1) / 2 * cols;
    int64_t i = 0;
    for (; i + 32 <= lanes; i += 32) {
      a += load<u32x64b>(w + i);
      b += load<u32x64b>(w + i + 16);
    }
    for (; i < lanes; ++i) total += w[i];
  };
  for (const Layer& l : net.layers) {
    if (l.kind == kRelu) continue;
    const int64_t taps = l.kind == kBlock ? l.taps : 1;
    add(l.w1, taps * l.c_in, l.c_out);
    if (l.kind == kBlock) {
      add(l.w2, l.taps * l.c_out, l.c_out);
      add(l.wd, l.c_in, l.c_out);
    }
  }
  const u32x64b sum = a + b;
  for (int j = 0; j < 16; ++j) total += sum[j];
  return total;
}

// step._time(x, out, steps) -> (kernel s/step, weight read s): for benchmarks/NOTES.md's split
// of a step. The first is `steps` steps of the kernel alone, in a loop here (no Python, no
// checks), advancing the stream; the second `steps` reads of the weights a step reads (their
// sum: the float32 weights, or the bf16 ones where the step has them), what a step cannot go
// below; both the mean of their loop. Thread CPU time: on a shared machine it
// leaves out the time other jobs held the core.
PyObject* bound_step_time(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3 && THPVariable_Check(args[0]) && THPVariable_Check(args[1]) &&
                       PyLong_Check(args[2]),
                   "StreamStep._time(x, out, steps)");
  const BoundStep::Held& h = *reinterpret_cast<BoundStep*>(self)->held;
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& out = THPVariable_Unpack(args[1]);
  const int64_t steps = PyLong_AsLongLong(args[2]);
  TORCH_CHECK(steps >= 1, "StreamStep._time: steps >= 1");
  const int64_t n = check_io(h.net, h.dtype, x, out);
  double kernel = 0, read = 0;
  {
    const NoGil no_gil;
    const double t0 = thread_seconds();
    for (int64_t i = 0; i < steps; ++i)
      run_checked(h.net, x, h.weights, h.state, h.position, h.workspace, out, n, h.half);
    kernel = (thread_seconds() - t0) / static_cast<double>(steps);
    if (h.half != nullptr) {
      volatile uint32_t sink = 0;
      const double r0 = thread_seconds();
      for (int64_t i = 0; i < steps; ++i) sink = sum_weights_bf16(h.net, h.half);
      read = (thread_seconds() - r0) / static_cast<double>(steps);
      (void)sink;
    } else if (h.dtype == at::kFloat) {
      volatile float sink = 0;
      const double r0 = thread_seconds();
      for (int64_t i = 0; i < steps; ++i)
        sink = sum_weights(h.weights.data_ptr<float>(), h.weights.numel());
      read = (thread_seconds() - r0) / static_cast<double>(steps);
      (void)sink;
    }
  }
  return Py_BuildValue("(dd)", kernel, read);
  END_HANDLE_TH_ERRORS
}

// (StreamStep, its six tensors): copy.deepcopy and pickle make a step bound to the copies of
// the tensors (the copied stream's own, by deepcopy's memo).
PyObject* bound_step_reduce(PyObject* self, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  const BoundStep::Held& h = *reinterpret_cast<BoundStep*>(self)->held;
  PyObject* w16 = h.weights16.defined() ? THPVariable_Wrap(h.weights16) : Py_NewRef(Py_None);
  return Py_BuildValue("(O(NNNNNN))", reinterpret_cast<PyObject*>(Py_TYPE(self)),
                       THPVariable_Wrap(h.weights), THPVariable_Wrap(h.meta),
                       THPVariable_Wrap(h.state), THPVariable_Wrap(h.position),
                       THPVariable_Wrap(h.workspace), w16);
  END_HANDLE_TH_ERRORS
}

PyMethodDef kBoundStepMethods[] = {
    {"__reduce__", &bound_step_reduce, METH_NOARGS, "(StreamStep, its six tensors)"},
    {"_time", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&bound_step_time)),
     METH_FASTCALL, "_time(x, out, steps) -> (kernel seconds a step, weight read seconds)"},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject* bound_step_type() {
  static PyTypeObject type = [] {
    PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
    t.tp_name = "fastres._C.StreamStep";
    t.tp_basicsize = sizeof(BoundStep);
    t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL;
    t.tp_doc = "StreamStep(weights, meta, state, position, workspace, weights16): a stream's "
               "step bound to its tensors; step(x, out=None) -> out";
    t.tp_new = bound_step_new;
    t.tp_dealloc = bound_step_dealloc;
    t.tp_vectorcall_offset = offsetof(BoundStep, vectorcall);
    t.tp_call = PyVectorcall_Call;
    t.tp_methods = kBoundStepMethods;
    return t;
  }();
  return &type;
}

PyObject* py_stream_bf16_dot(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(cpu_has_bf16_dot());
}

// stream_bf16_kernel(name=None) -> the name of the kernel single bf16 rows run ("widen" or
// "dot"), after switching to `name` where given (process-wide; "dot" needs AVX512_BF16).
PyObject* py_stream_bf16_kernel(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs <= 1, "stream_bf16_kernel(name=None)");
  if (nargs == 1 && args[0] != Py_None) {
    TORCH_CHECK_TYPE(PyUnicode_Check(args[0]), "stream_bf16_kernel: name must be a str");
    const std::string name = PyUnicode_AsUTF8(args[0]);
    TORCH_CHECK(name == "widen" || name == "dot",
                "stream_bf16_kernel: name must be 'widen' or 'dot', got '", name, "'");
    TORCH_CHECK(name == "widen" || cpu_has_bf16_dot(),
                "stream_bf16_kernel: 'dot' needs a CPU with AVX512_BF16");
    g_bf16_kernel = name == "dot" ? Bf16Kernel::kDot : Bf16Kernel::kWiden;
  }
  return PyUnicode_FromString(g_bf16_kernel == Bf16Kernel::kDot ? "dot" : "widen");
  END_HANDLE_TH_ERRORS
}

// stream_chunk_kernel(name=None) -> the kernel float32 chunks that read no ring run ("gemm"
// or "tiles"), after switching to `name` where given (process-wide; "tiles" needs AVX-512).
PyObject* py_stream_chunk_kernel(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs <= 1, "stream_chunk_kernel(name=None)");
  if (nargs == 1 && args[0] != Py_None) {
    TORCH_CHECK_TYPE(PyUnicode_Check(args[0]), "stream_chunk_kernel: name must be a str");
    const std::string name = PyUnicode_AsUTF8(args[0]);
    TORCH_CHECK(name == "gemm" || name == "tiles",
                "stream_chunk_kernel: name must be 'gemm' or 'tiles', got '", name, "'");
#ifdef FASTRES_TILES
    const bool tiles = cpu_has_avx512f();
#else
    const bool tiles = false;
#endif
    TORCH_CHECK(name == "gemm" || tiles, "stream_chunk_kernel: 'tiles' needs a CPU with AVX-512");
    g_chunk_kernel = name == "tiles" ? ChunkKernel::kTiles : ChunkKernel::kGemm;
  }
  return PyUnicode_FromString(g_chunk_kernel == ChunkKernel::kTiles ? "tiles" : "gemm");
  END_HANDLE_TH_ERRORS
}

// stream_sources(model, names) -> (tensors, modes): fastres/stream/fold.py's _sources walk
// (what a fold depends on: every module once, parents before children in registration
// order, as model.modules() gives them; per module its type, `training` and the values of
// those of `names` its __dict__ holds; every parameter and buffer that is not None). The
// whole-stack path runs it on every call: in Python it cost about 2 us a module, a sixth of
// the kernel's time at one short sequence. Reads the modules' dicts only (no Python code
// runs); a module without nn.Module's dicts is a TypeError.
PyObject* py_stream_sources(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyTuple_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "stream_sources(model, names: tuple)");
    return nullptr;
  }
  // The dict keys every module has, interned once (a lookup by C string builds a str).
  static PyObject* const kParameters = PyUnicode_InternFromString("_parameters");
  static PyObject* const kBuffers = PyUnicode_InternFromString("_buffers");
  static PyObject* const kModules = PyUnicode_InternFromString("_modules");
  static PyObject* const kTraining = PyUnicode_InternFromString("training");
  if (!kParameters || !kBuffers || !kModules || !kTraining) return nullptr;
  PyObject* names = args[1];
  const Py_ssize_t n_names = PyTuple_GET_SIZE(names);
  PyObject* tensors = PyList_New(0);
  PyObject* modes = PyList_New(0);
  std::vector<PyObject*> seen;           // modules are few: a linear search beats a set
  std::vector<PyObject*> todo{args[0]};  // borrowed: the model holds every module
  std::vector<PyObject*> attrs(n_names);
  bool ok = tensors && modes;
  auto add_values = [&](PyObject* dict) {  // the values of dict that are not None
    PyObject *key, *value;
    Py_ssize_t i = 0;
    while (PyDict_Next(dict, &i, &key, &value))
      if (value != Py_None && PyList_Append(tensors, value) < 0) return false;
    return true;
  };
  while (ok && !todo.empty()) {
    PyObject* module = todo.back();
    todo.pop_back();
    if (std::find(seen.begin(), seen.end(), module) != seen.end()) continue;
    seen.push_back(module);
    PyObject* d = PyObject_GenericGetDict(module, nullptr);  // new reference
    if (!d) PyErr_Clear();
    PyObject* params = d ? PyDict_GetItem(d, kParameters) : nullptr;
    PyObject* buffers = d ? PyDict_GetItem(d, kBuffers) : nullptr;
    PyObject* children = d ? PyDict_GetItem(d, kModules) : nullptr;
    if (!params || !buffers || !children || !PyDict_Check(params) || !PyDict_Check(buffers) ||
        !PyDict_Check(children)) {
      PyErr_SetString(PyExc_TypeError, "stream_sources: not a torch.nn.Module");
      Py_XDECREF(d);
      ok = false;
      break;
    }
    PyObject* training = PyDict_GetItem(d, kTraining);
    if (training) Py_INCREF(training);
    else training = PyObject_GetAttr(module, kTraining);
    Py_ssize_t found = 0;
    for (Py_ssize_t i = 0; i < n_names; ++i) {
      PyObject* value = PyDict_GetItem(d, PyTuple_GET_ITEM(names, i));
      if (value) attrs[found++] = value;
    }
    PyObject* attr_tuple = PyTuple_New(found);
    for (Py_ssize_t i = 0; attr_tuple && i < found; ++i) {
      Py_INCREF(attrs[i]);
      PyTuple_SET_ITEM(attr_tuple, i, attrs[i]);
    }
    PyObject* mode = training && attr_tuple
                         ? PyTuple_Pack(3, reinterpret_cast<PyObject*>(Py_TYPE(module)),
                                        training, attr_tuple)
                         : nullptr;
    ok = mode && PyList_Append(modes, mode) == 0 && add_values(params) && add_values(buffers);
    Py_XDECREF(mode);
    Py_XDECREF(attr_tuple);
    Py_XDECREF(training);
    if (!ok) {
      Py_DECREF(d);
      break;
    }
    const size_t first = todo.size();  // children pushed last to first: popped in order
    PyObject *key, *child;
    Py_ssize_t i = 0;
    while (PyDict_Next(children, &i, &key, &child))
      if (child != Py_None) todo.push_back(child);
    std::reverse(todo.begin() + first, todo.end());
    Py_DECREF(d);  // the module holds its dict and the children in it
  }
  PyObject* result = nullptr;
  if (ok) {
    PyObject* mode_tuple = PyList_AsTuple(modes);
    if (mode_tuple) result = PyTuple_Pack(2, tensors, mode_tuple);
    Py_XDECREF(mode_tuple);
  }
  Py_XDECREF(tensors);
  Py_XDECREF(modes);
  return result;
}

// modules_hooked(modules) -> bool: whether any module of the sequence, or any module below
// one, has a forward, pre-forward, backward or backward-pre hook (fastres/dispatch/module.py's
// hooked, asked on every call of a fused module: in Python the walk of an 8-block TCN's 50
// modules cost about half as much as the stack path's check of its weights). None entries are
// skipped; a module without nn.Module's dicts is a TypeError.
PyObject* py_modules_hooked(PyObject* /*module*/, PyObject* arg) {
  static PyObject* const kHookDicts[] = {
      PyUnicode_InternFromString("_forward_hooks"),
      PyUnicode_InternFromString("_forward_pre_hooks"),
      PyUnicode_InternFromString("_backward_hooks"),
      PyUnicode_InternFromString("_backward_pre_hooks")};
  static PyObject* const kModules = PyUnicode_InternFromString("_modules");
  for (PyObject* key : kHookDicts)
    if (!key) return nullptr;
  if (!kModules) return nullptr;
  PyObject* seq = PySequence_Fast(arg, "modules_hooked: expected a sequence of modules");
  if (!seq) return nullptr;
  std::vector<PyObject*> todo;  // borrowed: the sequence and the modules hold them
  for (Py_ssize_t i = PySequence_Fast_GET_SIZE(seq) - 1; i >= 0; --i)
    if (PySequence_Fast_GET_ITEM(seq, i) != Py_None) todo.push_back(PySequence_Fast_GET_ITEM(seq, i));
  bool hooked = false, ok = true;
  while (ok && !hooked && !todo.empty()) {
    PyObject* module = todo.back();
    todo.pop_back();
    PyObject* d = PyObject_GenericGetDict(module, nullptr);  // new reference
    if (!d) PyErr_Clear();
    PyObject* children = d ? PyDict_GetItem(d, kModules) : nullptr;
    ok = children && PyDict_Check(children);
    for (PyObject* key : kHookDicts) {
      PyObject* hooks = ok ? PyDict_GetItem(d, key) : nullptr;
      ok = ok && hooks && PyDict_Check(hooks);
      hooked = hooked || (ok && PyDict_GET_SIZE(hooks) > 0);
    }
    PyObject *name, *child;
    Py_ssize_t i = 0;
    while (ok && PyDict_Next(children, &i, &name, &child))
      if (child != Py_None) todo.push_back(child);
    Py_XDECREF(d);
  }
  Py_DECREF(seq);
  if (!ok) {
    PyErr_SetString(PyExc_TypeError, "modules_hooked: not a torch.nn.Module");
    return nullptr;
  }
  return PyBool_FromLong(hooked);
}

// stream_same_values(now, then) -> bool: stream_same_values (above) called from Python without
// the dispatcher, for fastres/_ext.py's same_values. Through torch.ops the two lists of a
// model's tensors (112 for TemporalConvNet(64, [64] x 8)) are boxed into IValues and checked
// against the schema, about 20 us a call on the whole-stack path's every call; here each
// item is unpacked in place. Anything but two sequences of tensors is a TypeError.
PyObject* py_stream_same_values(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2, "stream_same_values(now, then) takes 2 arguments, got ", nargs);
  PyObject* now = PySequence_Fast(args[0], "stream_same_values: now must be a sequence");
  if (!now) return nullptr;
  PyObject* then = PySequence_Fast(args[1], "stream_same_values: then must be a sequence");
  if (!then) {
    Py_DECREF(now);
    return nullptr;
  }
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(now);
  bool typed = true;
  for (PyObject* seq : {now, then})
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i)
      typed = typed && THPVariable_Check(PySequence_Fast_GET_ITEM(seq, i));
  bool same = typed && size == PySequence_Fast_GET_SIZE(then);
  for (Py_ssize_t i = 0; same && i < size; ++i) {
    const at::Tensor& a = THPVariable_Unpack(PySequence_Fast_GET_ITEM(now, i));
    const at::Tensor& b = THPVariable_Unpack(PySequence_Fast_GET_ITEM(then, i));
    same = stream_same_values(at::TensorList(&a, 1), at::TensorList(&b, 1));
  }
  Py_DECREF(now);
  Py_DECREF(then);
  TORCH_CHECK_TYPE(typed, "stream_same_values: now and then must hold tensors only");
  return PyBool_FromLong(same);
  END_HANDLE_TH_ERRORS
}

// stream_unchanged(now, copies, marks, probe) -> bool: fastres/_copies.py's rule on every call
// of a fast path, in one pass without the dispatcher. marks is an int64 (n, 3) CPU tensor of
// (version counter, data pointer, element count) per tensor, taken with the copies. A tensor
// whose pointer or size moved is a change; one whose counter moved is compared in full with
// its copy (and its mark takes the new counter when equal: an op that declares a write bumps
// it without one); every other one compares its first and last probe / 2 elements, or all of
// them when it is small or not contiguous. In Python this was a loop of attribute reads per
// tensor plus a probe call per view: slower than comparing every byte of a small
// TemporalConvNet's weights (benchmarks/NOTES.md).
PyObject* py_stream_unchanged(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4, "stream_unchanged(now, copies, marks, probe) takes 4 arguments");
  PyObject* now = PySequence_Fast(args[0], "stream_unchanged: now must be a sequence");
  if (!now) return nullptr;
  PyObject* copies = PySequence_Fast(args[1], "stream_unchanged: copies must be a sequence");
  if (!copies) {
    Py_DECREF(now);
    return nullptr;
  }
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(now);
  bool typed = THPVariable_Check(args[2]) && PyLong_Check(args[3]) &&
               size == PySequence_Fast_GET_SIZE(copies);
  for (PyObject* seq : {now, copies})
    for (Py_ssize_t i = 0; typed && i < size; ++i)
      typed = THPVariable_Check(PySequence_Fast_GET_ITEM(seq, i));
  bool same = typed;
  if (typed) {
    const at::Tensor& marks = THPVariable_Unpack(args[2]);
    TORCH_CHECK(marks.scalar_type() == at::kLong && marks.is_contiguous() &&
                    marks.device().is_cpu() && marks.numel() == 3 * size,
                "stream_unchanged: marks must be a contiguous int64 CPU tensor of (n, 3)");
    int64_t* mark = marks.data_ptr<int64_t>();
    const int64_t half = std::max<int64_t>(PyLong_AsLongLong(args[3]) / 2, 1);
    for (Py_ssize_t i = 0; same && i < size; ++i, mark += 3) {
      const at::Tensor& a = THPVariable_Unpack(PySequence_Fast_GET_ITEM(now, i));
      const at::Tensor& b = THPVariable_Unpack(PySequence_Fast_GET_ITEM(copies, i));
      if (reinterpret_cast<int64_t>(a.data_ptr()) != mark[1] || a.numel() != mark[2] ||
          a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) {
        same = false;
      } else if (static_cast<int64_t>(a._version()) != mark[0]) {
        same = stream_same_values(at::TensorList(&a, 1), at::TensorList(&b, 1));
        if (same) mark[0] = static_cast<int64_t>(a._version());
      } else if (!a.device().is_cpu() || !a.is_contiguous() || !b.is_contiguous() ||
                 a.numel() <= 2 * half) {
        same = stream_same_values(at::TensorList(&a, 1), at::TensorList(&b, 1));
      } else {
        const size_t bytes = static_cast<size_t>(half) * a.element_size();
        const char* pa = static_cast<const char*>(a.data_ptr());
        const char* pb = static_cast<const char*>(b.data_ptr());
        same = std::memcmp(pa, pb, bytes) == 0 &&
               std::memcmp(pa + a.nbytes() - bytes, pb + b.nbytes() - bytes, bytes) == 0;
      }
    }
  }
  Py_DECREF(now);
  Py_DECREF(copies);
  TORCH_CHECK_TYPE(typed, "stream_unchanged: now and copies must be lists of tensors of the "
                   "same length, marks a tensor, probe an int");
  return PyBool_FromLong(same);
  END_HANDLE_TH_ERRORS
}

// stream_chunk_kernels() -> the names stream_chunk_kernel takes on this CPU.
PyObject* py_stream_chunk_kernels(PyObject* /*module*/, PyObject* /*unused*/) {
#ifdef FASTRES_TILES
  if (cpu_has_avx512f()) return Py_BuildValue("(ss)", "gemm", "tiles");
#endif
  return Py_BuildValue("(s)", "gemm");
}

PyMethodDef kStreamPythonMethods[] = {
    {"stream_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_stream_step)),
     METH_FASTCALL,
     "stream_step(weights, meta, state, position, workspace, weights16, x, out) -> out: one "
     "streaming step or chunk (fastres/stream/core.py), without the dispatcher"},
    {"stream_bf16_dot", &py_stream_bf16_dot, METH_NOARGS,
     "Whether this CPU has a bf16 dot product (AVX512_BF16) for the stream's bf16 weights"},
    {"stream_bf16_kernel",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_stream_bf16_kernel)),
     METH_FASTCALL,
     "stream_bf16_kernel(name=None) -> the kernel ('widen' or 'dot') single steps with bf16 "
     "weights run, after switching to `name` where given"},
    {"stream_sources",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_stream_sources)),
     METH_FASTCALL,
     "stream_sources(model, names) -> (tensors, modes): what a stream's fold depends on "
     "(fastres/stream/fold.py)"},
    {"stream_same_values",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_stream_same_values)),
     METH_FASTCALL,
     "stream_same_values(now, then) -> whether every tensor of `now` holds exactly the bytes "
     "of the tensor at the same index of `then` (fastres/_ext.py's same_values)"},
    {"modules_hooked", &py_modules_hooked, METH_O,
     "modules_hooked(modules) -> whether any of the modules, or any module below one, has a "
     "forward, pre-forward, backward or backward-pre hook"},
    {"stream_unchanged",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_stream_unchanged)),
     METH_FASTCALL,
     "stream_unchanged(now, copies, marks, probe) -> whether the tensors still hold their "
     "copies' values by fastres/_copies.py's rule"},
    {"stream_chunk_kernels", &py_stream_chunk_kernels, METH_NOARGS,
     "The chunk kernels ('gemm', and 'tiles' where the CPU has AVX-512) this CPU runs"},
    {"stream_chunk_kernel",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_stream_chunk_kernel)),
     METH_FASTCALL,
     "stream_chunk_kernel(name=None) -> the kernel ('gemm' or 'tiles') float32 chunks from a "
     "zero state run, after switching to `name` where given"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// The Python functions csrc/ops.cpp adds to the fastres._C module.
PyMethodDef* stream_python_methods() { return kStreamPythonMethods; }

// The StreamStep type csrc/ops.cpp adds to the fastres._C module (nullptr: an error is set).
PyTypeObject* stream_step_type() {
  PyTypeObject* type = bound_step_type();
  return PyType_Ready(type) == 0 ? type : nullptr;
}

// Both advance `state` and `position` in place (see fastres/stream/core.py).
TORCH_LIBRARY_FRAGMENT(fastres_ext, m) {
  m.def("stream_same_values(Tensor[] now, Tensor[] then) -> bool", &stream_same_values);
  m.def(
      "stream_forward(Tensor x, Tensor weights, Tensor meta, Tensor(a!) state, "
      "Tensor(b!) position, Tensor(c!) workspace) -> Tensor");
  m.def(
      "stream_forward_out(Tensor x, Tensor weights, Tensor meta, Tensor(a!) state, "
      "Tensor(b!) position, Tensor(c!) workspace, Tensor(d!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastres_ext, CPU, m) {
  m.impl("stream_forward", &stream_forward_op);
  m.impl("stream_forward_out", &stream_forward_out_op);
}

// Nothing here is differentiable: go straight to the CPU kernel instead of through autograd's
// boxed "not implemented" fallback (a few microseconds of a step that takes about ten).
TORCH_LIBRARY_IMPL(fastres_ext, Autograd, m) {
  m.impl("stream_forward", torch::CppFunction::makeFallthrough());
  m.impl("stream_forward_out", torch::CppFunction::makeFallthrough());
}

}  // namespace fastres
