// Winograd F(2,3) and F(4,3) for a stride-1, 3-tap conv on channels-last (NLC) rows, with the
// bias, the residual add and ReLU folded into the output transform: what the oneDNN eval
// program (fastres/backends/onednn.py) runs for its stride-1 k3 convs when the extension is
// built. Below (winograd_ncl), F(2,3) on (B, C, L) activations for the training program's
// NCL layout (fastres/backends/onednn_train.py): its forward conv and data gradient.
//
// Why: two outputs of a 3-tap conv, y0 = g0 d0 + g1 d1 + g2 d2 and y1 = g0 d1 + g1 d2 + g2 d3
// (correlation, as torch's conv), take 4 products instead of 6 (Lavin and Gray, 2015):
//   m0 = (d0 - d2) g0,  m1 = (d1 + d2) (g0 + g1 + g2) / 2,
//   m2 = (d2 - d1) (g0 - g1 + g2) / 2,  m3 = (d1 - d3) g2,
//   y0 = m0 + m1 + m2,  y1 = m1 - m2 - m3.
// F(4,3) makes four outputs from 6 products (instead of 12) of six transformed rows, with the
// points 0, +-1, +-2, infinity (transforms below). Over channels each product is a GEMM:
// (tiles, C_in) by (C_in, C_out), all of a tile size batched into one at::bmm (torch's
// sgemm: MKL or oneDNN, whichever torch was built with). F(2,3) takes a third of the conv's
// multiply-adds away, F(4,3) half; the transforms are adds over the activations (O(C L)).
// F(2,3)'s coefficients are 0, +-1 and 1/2, exact in float32; F(4,3)'s weight transform has
// 1/6, 1/12, 1/24 (rounded once, in float64, by the caller) and its input transform
// multiplies by up to 5, so it rounds more (benchmarks/NOTES.md measures both against
// float64).
//
// Dilation d: a tile of m outputs n0, n0 + d, ..., n0 + (m-1) d reads taps n0 - p + j d,
// j < m + 2, with n0 = m d q + r, r < d: the tiles run over the dilation's phases. Input rows
// outside [0, L_in) are the zero padding (a zero row, no padded copy); a tile's outputs past
// L_out are computed and dropped.
//
// Inputs: x (B, L_in, C_in) contiguous; v (m + 2, C_in, C_out) the transformed weights
// (_Conv.use_winograd in fastres/backends/onednn.py computes them in float64); bias (C_out);
// residual (B, L_out, C_out) contiguous or None. Output (B, L_out, C_out). ReLU is
// torch.relu's (`z < 0 ? 0 : z` keeps NaN). Not for non-finite inputs: inf - inf in the input
// transform makes NaN where the direct conv may give inf, so the program runs the direct
// conv on its exact path (non-finite or overflowing inputs). float32 only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace fastres {
namespace {

// The transforms are adds along the contiguous channels; compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at load time, as csrc/cpu/nlc_bn_train_cpu.cpp's loops are.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WINO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WINO_CLONES
#endif

// Chunk sizing (see winograd_tiles): floats of one chunk's (tiles, C_in + C_out) rows,
// about 512 KB per transform plane set, and the fewest tiles a chunk's GEMM gets.
constexpr int64_t kChunkFloats = 32768;
constexpr int64_t kMinChunk = 128;

using In = const float* __restrict__;
using Out = float* __restrict__;

// One F(2,3) tile's four transformed input rows (absent taps point at a zero row).
WINO_CLONES void input_tile2(In d0, In d1, In d2, In d3, Out u0, Out u1, Out u2, Out u3,
                             int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    u0[i] = d0[i] - d2[i];
    u1[i] = d1[i] + d2[i];
    u2[i] = d2[i] - d1[i];
    u3[i] = d1[i] - d3[i];
  }
}

// One F(4,3) tile's six transformed input rows: B^T d with
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
//          0 4 0 -5 0 1].
WINO_CLONES void input_tile4(const float* const* d, float* const* u, int64_t c) {
  In d0 = d[0];
  In d1 = d[1];
  In d2 = d[2];
  In d3 = d[3];
  In d4 = d[4];
  In d5 = d[5];
  Out u0 = u[0];
  Out u1 = u[1];
  Out u2 = u[2];
  Out u3 = u[3];
  Out u4 = u[4];
  Out u5 = u[5];
  for (int64_t i = 0; i < c; ++i) {
    const float a = d4[i] - 4.f * d2[i], b = d3[i] - 4.f * d1[i];
    const float e = d4[i] - d2[i], f = 2.f * (d3[i] - d1[i]);
    u0[i] = 4.f * d0[i] - 5.f * d2[i] + d4[i];
    u1[i] = a + b;
    u2[i] = a - b;
    u3[i] = e + f;
    u4[i] = e - f;
    u5[i] = 4.f * d1[i] - 5.f * d3[i] + d5[i];
  }
}

// The epilogue of one output row: + bias (+ residual), then ReLU.
template <bool kResidual, bool kRelu>
inline float finish(float z, float bias, const float* r, int64_t i) {
  z += bias;
  if (kResidual) z += r[i];
  return kRelu ? (z < 0.f ? 0.f : z) : z;
}

// One F(2,3) tile's output rows: y0 = (m0 + m1) + m2, y1 = (m1 - m2) - m3; y[s] null where
// that row is past the output. The variants are separate instantiations: no select inside
// the loops.
template <bool kResidual, bool kRelu>
WINO_CLONES void output_tile2(const float* const* m, In bias, const float* const* r,
                              float* const* y, int64_t c) {
  In m0 = m[0];
  In m1 = m[1];
  In m2 = m[2];
  In m3 = m[3];
  if (Out y0 = y[0])
    for (int64_t i = 0; i < c; ++i)
      y0[i] = finish<kResidual, kRelu>((m0[i] + m1[i]) + m2[i], bias[i], r[0], i);
  if (Out y1 = y[1])
    for (int64_t i = 0; i < c; ++i)
      y1[i] = finish<kResidual, kRelu>((m1[i] - m2[i]) - m3[i], bias[i], r[1], i);
}

// One F(4,3) tile's output rows: A^T m with
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
template <bool kResidual, bool kRelu>
WINO_CLONES void output_tile4(const float* const* m, In bias, const float* const* r,
                              float* const* y, int64_t c) {
  In m0 = m[0];
  In m1 = m[1];
  In m2 = m[2];
  In m3 = m[3];
  In m4 = m[4];
  In m5 = m[5];
  if (Out y0 = y[0])
    for (int64_t i = 0; i < c; ++i)
      y0[i] = finish<kResidual, kRelu>(m0[i] + (m1[i] + m2[i]) + (m3[i] + m4[i]), bias[i], r[0], i);
  if (Out y1 = y[1])
    for (int64_t i = 0; i < c; ++i)
      y1[i] = finish<kResidual, kRelu>((m1[i] - m2[i]) + 2.f * (m3[i] - m4[i]), bias[i], r[1], i);
  if (Out y2 = y[2])
    for (int64_t i = 0; i < c; ++i)
      y2[i] = finish<kResidual, kRelu>((m1[i] + m2[i]) + 4.f * (m3[i] + m4[i]), bias[i], r[2], i);
  if (Out y3 = y[3])
    for (int64_t i = 0; i < c; ++i)
      y3[i] = finish<kResidual, kRelu>((m1[i] - m2[i]) + 8.f * (m3[i] - m4[i]) + m5[i], bias[i],
                                       r[3], i);
}

using OutputTile = void (*)(const float* const*, In, const float* const*, float* const*, int64_t);

template <int kM>
OutputTile output_tile(bool residual, bool relu) {
  if (kM == 2)
    return residual ? (relu ? &output_tile2<true, true> : &output_tile2<true, false>)
                    : (relu ? &output_tile2<false, true> : &output_tile2<false, false>);
  return residual ? (relu ? &output_tile4<true, true> : &output_tile4<true, false>)
                  : (relu ? &output_tile4<false, true> : &output_tile4<false, false>);
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "fastres_ext: ", name, " must be a contiguous float32 CPU tensor");
}

// F(kM, 3) over all tiles of x into out (shapes checked by the caller).
template <int kM>
void winograd_tiles(const at::Tensor& x, const at::Tensor& v, const at::Tensor& bias,
                    const float* res_ptr, int64_t d, int64_t pad_left, bool relu,
                    at::Tensor& out) {
  constexpr int kTaps = kM + 2;
  const int64_t batch = x.size(0), length = x.size(1), c_in = x.size(2);
  const int64_t c_out = v.size(2), out_length = out.size(1);
  const int64_t groups = (out_length + kM * d - 1) / (kM * d);  // q per phase
  const int64_t tiles = groups * d;                               // per batch item
  const int64_t rows = batch * tiles;
  // Tiles run in chunks of `chunk`: transform, GEMM and output transform of one chunk while
  // its (kTaps, chunk, C_in + C_out) floats stay in cache (the whole batch's transformed
  // input of a long sequence would not), and no fewer than kMinChunk rows per GEMM, so the
  // transformed weights, read once per chunk, are reused over many rows. The chunks are
  // the parallel work items (each GEMM single-threaded inside); their bounds depend on the
  // shape only, so the result does not depend on the thread count.
  const int64_t chunk =
      std::min(rows, std::max<int64_t>(kMinChunk, kChunkFloats / (c_in + c_out)));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const OutputTile finish_tile = output_tile<kM>(res_ptr != nullptr, relu);
  const std::vector<float> zeros(c_in, 0.f);  // the padding's rows
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    auto u = at::empty({kTaps, chunk, c_in}, x.options());
    auto m = at::empty({kTaps, chunk, c_out}, x.options());
    float* up = u.data_ptr<float>();  // plane stride chunk * C, also for a short last chunk
    const float* mp = m.data_ptr<float>();
    for (int64_t ci = begin; ci < end; ++ci) {
      const int64_t t0 = ci * chunk, nt = std::min(chunk, rows - t0);
      for (int64_t t = t0; t < t0 + nt; ++t) {
        const int64_t b = t / tiles, k = t % tiles;
        const int64_t n0 = kM * d * (k / d) + k % d;
        const float* tap[kTaps];
        float* row[kTaps];
        for (int j = 0; j < kTaps; ++j) {
          const int64_t i = n0 - pad_left + j * d;
          tap[j] = i >= 0 && i < length ? xp + (b * length + i) * c_in : zeros.data();
          row[j] = up + (j * chunk + t - t0) * c_in;
        }
        if (kM == 2)
          input_tile2(tap[0], tap[1], tap[2], tap[3], row[0], row[1], row[2], row[3], c_in);
        else
          input_tile4(tap, row, c_in);
      }
      at::Tensor mc = nt == chunk ? m : m.narrow(1, 0, nt);
      at::bmm_out(mc, nt == chunk ? u : u.narrow(1, 0, nt), v);
      for (int64_t t = t0; t < t0 + nt; ++t) {
        const int64_t b = t / tiles, k = t % tiles;
        const int64_t n0 = kM * d * (k / d) + k % d;
        if (n0 >= out_length) continue;  // a phase's last tile wholly past the end
        const float* mt[kTaps];
        for (int j = 0; j < kTaps; ++j) mt[j] = mp + (j * chunk + t - t0) * c_out;
        const float* r[kM];
        float* y[kM];
        for (int s = 0; s < kM; ++s) {
          const int64_t n = n0 + s * d;
          const bool inside = n < out_length;
          const int64_t at = (b * out_length + n) * c_out;
          y[s] = inside ? op + at : nullptr;
          r[s] = inside && res_ptr ? res_ptr + at : nullptr;
        }
        finish_tile(mt, bp, r, y, c_out);
      }
    }
  });
}

at::Tensor winograd_nlc_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& residual, int64_t dilation,
                            int64_t pad_left, int64_t out_length, bool relu) {
  check_f32(x, "x");
  check_f32(v, "v");
  check_f32(bias, "bias");
  TORCH_CHECK(x.dim() == 3, "fastres_ext: x must be (B, L, C_in), got ", x.sizes());
  const int64_t batch = x.size(0), length = x.size(1), c_in = x.size(2);
  TORCH_CHECK(v.dim() == 3 && (v.size(0) == 4 || v.size(0) == 6) && v.size(1) == c_in,
              "fastres_ext: v must be (4 or 6, ", c_in, ", C_out) (F(2,3) or F(4,3)), got ",
              v.sizes());
  const int64_t c_out = v.size(2);
  TORCH_CHECK(bias.numel() == c_out, "fastres_ext: bias must have ", c_out, " values");
  TORCH_CHECK(dilation >= 1 && pad_left >= 0 && out_length >= 0,
              "fastres_ext: bad dilation, padding or output length");
  TORCH_CHECK(out_length <= length + 2 * pad_left,
              "fastres_ext: output length ", out_length, " reads past the input");
  const float* res_ptr = nullptr;
  if (residual.has_value() && residual->defined()) {
    check_f32(*residual, "residual");
    TORCH_CHECK(residual->dim() == 3 && residual->size(0) == batch &&
                    residual->size(1) == out_length && residual->size(2) == c_out,
                "fastres_ext: residual must be (", batch, ", ", out_length, ", ", c_out, ")");
    res_ptr = residual->data_ptr<float>();
  }
  auto out = at::empty({batch, out_length, c_out}, x.options());
  if (batch == 0 || out_length == 0) return out;
  if (v.size(0) == 4)
    winograd_tiles<2>(x, v, bias, res_ptr, dilation, pad_left, relu, out);
  else
    winograd_tiles<4>(x, v, bias, res_ptr, dilation, pad_left, relu, out);
  (void)length;
  return out;
}


// ---------------------------------------------------------------------------- NCL, training
//
// The training program's NCL layout (fastres/backends/onednn_train.py) keeps (B, C, L)
// activations, so there a tile's taps of one channel are a strided run of one row, and
// each product is (C_out, C_in) by (C_in, tiles): the transformed input of a chunk of tiles
// is 4 planes of (C_in, tiles), the GEMM's output 4 planes of (C_out, tiles). Both the
// forward conv and its data gradient run here: the data gradient of a stride-1 3-tap conv
// is the 3-tap conv of grad_y with the weights flipped and transposed, g'_j = g_{2-j}^T, whose
// transformed weights are those of the forward conv transposed, planes 0 and 3 swapped
// (v'0 = g2^T = v3^T, v'1 = v1^T, v'2 = v2^T, v'3 = v0^T): `transposed` pairs input plane j
// with v's plane kSwap[j] read transposed (the GEMM's transpose flag, no copy), so one
// weight transform per step serves both directions.
//
// Overflow and non-finite values: the op also answers whether every transformed input
// stayed below 0.5e38 / gain (gain: the largest row sum of |weights| of the conv it computes,
// from winograd_weights_ncl; NaN or inf: never). Then every product and every output stays
// below 1.5e38 plus the bias: no inf, no NaN can arise inside. It is false for a NaN or inf
// input (it reaches a transformed row as NaN or inf), a non-finite weight, or values large
// enough to overflow; the caller then runs oneDNN's direct conv, whose NaN and inf are
// torch's. A false answer may stop early: its output is not to be read.

constexpr int kSwap[4] = {3, 1, 2, 0};

// One channel's four transformed rows for the tiles of one batch item: tile i's taps are
// row[base(i) + j d], base(i) = 2 d (i / d) + i % d - start, start the first tap of tile 0
// of the run (zero rows included in `row`). Returns whether every value is below `bound`.
template <bool kD1>
WINO_CLONES bool ncl_input_tiles(In row, int64_t d, int64_t first, int64_t count, Out u0,
                                 Out u1, Out u2, Out u3, float bound) {
  int bad = 0;
  if (kD1) {  // base(i) = 2 i: stride-2 taps
    for (int64_t i = 0; i < count; ++i) {
      const float a0 = row[2 * i], a1 = row[2 * i + 1], a2 = row[2 * i + 2], a3 = row[2 * i + 3];
      const float v0 = a0 - a2, v1 = a1 + a2, v2 = a2 - a1, v3 = a1 - a3;
      u0[i] = v0;
      u1[i] = v1;
      u2[i] = v2;
      u3[i] = v3;
      bad |= !(std::fabs(v0) < bound) | !(std::fabs(v1) < bound) | !(std::fabs(v2) < bound) |
             !(std::fabs(v3) < bound);
    }
    return bad == 0;
  }
  // runs of consecutive tiles of one group q (phases r): contiguous taps
  int64_t i = 0;
  while (i < count) {
    const int64_t k = first + i, r = k % d;
    const int64_t run = std::min(d - r, count - i);
    In t = row + (2 * d * (k / d) + r) - (2 * d * (first / d) + first % d);
    for (int64_t s = 0; s < run; ++s) {
      const float a0 = t[s], a1 = t[s + d], a2 = t[s + 2 * d], a3 = t[s + 3 * d];
      const float v0 = a0 - a2, v1 = a1 + a2, v2 = a2 - a1, v3 = a1 - a3;
      u0[i + s] = v0;
      u1[i + s] = v1;
      u2[i + s] = v2;
      u3[i + s] = v3;
      bad |= !(std::fabs(v0) < bound) | !(std::fabs(v1) < bound) | !(std::fabs(v2) < bound) |
             !(std::fabs(v3) < bound);
    }
    i += run;
  }
  return bad == 0;
}

// One output channel's rows for the tiles first .. first + count - 1 of one batch item:
// y[n0] = (m0 + m1) + m2 + bias, y[n0 + d] = (m1 - m2) - m3 + bias, rows past out_length
// dropped.
template <bool kD1>
WINO_CLONES void ncl_output_tiles(In m0, In m1, In m2, In m3, float bias, int64_t d,
                                  int64_t first, int64_t count, int64_t out_length, Out y) {
  if (kD1) {
    // tiles whose both rows are inside, then the last one's first row
    const int64_t full = std::max<int64_t>(0, std::min(count, out_length / 2 - first));
    Out yb = y + 2 * first;
    for (int64_t i = 0; i < full; ++i) {
      yb[2 * i] = ((m0[i] + m1[i]) + m2[i]) + bias;
      yb[2 * i + 1] = ((m1[i] - m2[i]) - m3[i]) + bias;
    }
    for (int64_t i = full; i < count; ++i) {
      const int64_t n = 2 * (first + i);
      if (n < out_length) y[n] = ((m0[i] + m1[i]) + m2[i]) + bias;
      if (n + 1 < out_length) y[n + 1] = ((m1[i] - m2[i]) - m3[i]) + bias;
    }
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = first + i, n = 2 * d * (k / d) + k % d;
    if (n < out_length) y[n] = ((m0[i] + m1[i]) + m2[i]) + bias;
    if (n + d < out_length) y[n + d] = ((m1[i] - m2[i]) - m3[i]) + bias;
  }
}

template <bool kD1>
bool winograd_ncl_tiles(const at::Tensor& x, const at::Tensor& v, const float* bias,
                        int64_t d, int64_t pad_left, bool transposed, float bound,
                        at::Tensor& out) {
  const int64_t batch = x.size(0), c_in = x.size(1), length = x.size(2);
  const int64_t c_out = out.size(1), out_length = out.size(2);
  const int64_t groups = (out_length + 2 * d - 1) / (2 * d);
  const int64_t tiles = groups * d;  // per batch item
  const int64_t rows = batch * tiles;
  const int64_t chunk =
      std::min(rows, std::max<int64_t>(kMinChunk, kChunkFloats / (c_in + c_out)));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  // the taps of `chunk` consecutive tiles of one item span at most this many positions
  const int64_t window = 2 * d * ((chunk + d - 1) / d + 1) + 3 * d + 1;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    auto u = at::empty({4 * c_in * chunk}, x.options());
    auto m = at::empty({4 * c_out * chunk}, x.options());
    std::vector<float> row(window);
    for (int64_t ci = begin; ci < end && ok.load(std::memory_order_relaxed); ++ci) {
      const int64_t t0 = ci * chunk, nt = std::min(chunk, rows - t0);
      float* up = u.data_ptr<float>();
      const float* mp = m.data_ptr<float>();
      bool fine = true;
      // the chunk's tiles item by item: tiles k0 .. k0 + cnt - 1 of item b, at column col
      for (int64_t t = t0; t < t0 + nt;) {
        const int64_t b = t / tiles, k0 = t % tiles;
        const int64_t cnt = std::min(tiles - k0, t0 + nt - t), col = t - t0;
        const int64_t start = 2 * d * (k0 / d) + k0 % d - pad_left;  // tile k0's first tap
        const int64_t last = 2 * d * ((k0 + cnt - 1) / d) + (k0 + cnt - 1) % d - pad_left + 3 * d;
        const int64_t lo = std::max<int64_t>(start, 0), hi = std::min(last + 1, length);
        for (int64_t c = 0; c < c_in; ++c) {
          const float* src = xp + (b * c_in + c) * length;
          const int64_t span = last + 1 - start;
          if (lo >= hi) {
            std::fill(row.begin(), row.begin() + span, 0.f);
          } else {
            std::fill(row.begin(), row.begin() + (lo - start), 0.f);
            std::copy(src + lo, src + hi, row.begin() + (lo - start));
            std::fill(row.begin() + (hi - start), row.begin() + span, 0.f);
          }
          float* plane[4];  // transformed row j goes to the GEMM's plane (kSwap[j])
          for (int j = 0; j < 4; ++j)
            plane[j] = up + ((transposed ? kSwap[j] : j) * c_in + c) * nt + col;
          fine &= ncl_input_tiles<kD1>(row.data(), d, k0, cnt, plane[0], plane[1], plane[2],
                                       plane[3], bound);
        }
        t += cnt;
      }
      if (!fine) {
        ok.store(false, std::memory_order_relaxed);
        break;
      }
      auto uc = u.narrow(0, 0, 4 * c_in * nt).view({4, c_in, nt});
      auto mc = m.narrow(0, 0, 4 * c_out * nt).view({4, c_out, nt});
      at::bmm_out(mc, transposed ? v.transpose(1, 2) : v, uc);
      for (int64_t t = t0; t < t0 + nt;) {
        const int64_t b = t / tiles, k0 = t % tiles;
        const int64_t cnt = std::min(tiles - k0, t0 + nt - t), col = t - t0;
        for (int64_t o = 0; o < c_out; ++o) {
          const float* mt[4];
          for (int j = 0; j < 4; ++j)
            mt[j] = mp + ((transposed ? kSwap[j] : j) * c_out + o) * nt + col;
          ncl_output_tiles<kD1>(mt[0], mt[1], mt[2], mt[3], bias ? bias[o] : 0.f, d, k0, cnt,
                                out_length, op + (b * c_out + o) * out_length);
        }
        t += cnt;
      }
    }
  });
  return ok.load();
}

std::tuple<at::Tensor, bool> winograd_ncl_cpu(const at::Tensor& x, const at::Tensor& v,
                                              const c10::optional<at::Tensor>& bias,
                                              int64_t dilation, int64_t pad_left,
                                              int64_t out_length, bool transposed,
                                              double gain) {
  check_f32(x, "x");
  check_f32(v, "v");
  TORCH_CHECK(x.dim() == 3, "fastres_ext: x must be (B, C_in, L), got ", x.sizes());
  TORCH_CHECK(v.dim() == 3 && v.size(0) == 4,
              "fastres_ext: v must be (4, C_out, C_in) (F(2,3)), got ", v.sizes());
  const int64_t batch = x.size(0), c_in = x.size(1), length = x.size(2);
  const int64_t v_in = transposed ? v.size(1) : v.size(2);
  const int64_t c_out = transposed ? v.size(2) : v.size(1);
  TORCH_CHECK(v_in == c_in, "fastres_ext: v is for ", v_in, " input channels, x has ", c_in);
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->numel() == c_out, "fastres_ext: bias must have ", c_out, " values");
    bias_ptr = bias->data_ptr<float>();
  }
  TORCH_CHECK(dilation >= 1 && pad_left >= 0 && out_length >= 0,
              "fastres_ext: bad dilation, padding or output length");
  TORCH_CHECK(out_length <= length + 2 * pad_left,
              "fastres_ext: output length ", out_length, " reads past the input");
  auto out = at::empty({batch, c_out, out_length}, x.options());
  // transformed inputs below this keep every value inside the conv below 1.5e38 (NaN
  // gain: never true, as NaN compares false)
  const double limit = 0.5e38 / gain;
  const float bound = limit > 3e38 ? std::numeric_limits<float>::infinity()
                                   : static_cast<float>(limit);
  if (batch == 0 || out_length == 0) return {out, true};
  const bool ok = dilation == 1
      ? winograd_ncl_tiles<true>(x, v, bias_ptr, 1, pad_left, transposed, bound, out)
      : winograd_ncl_tiles<false>(x, v, bias_ptr, dilation, pad_left, transposed, bound, out);
  return {out, ok};
}

// One output channel's row of the weight transform: v_j[c] from the taps w[c][0..2]
// (float64 sums, rounded once), and the channel's |w| sums, added into cols[c] (per input
// channel) and into the 16 partial sums of `row` (per output channel: summed by the caller).
WINO_CLONES void weight_row(In w, Out v0, Out v1, Out v2, Out v3, double* __restrict__ cols,
                            double* __restrict__ row, int64_t c_in) {
  for (int64_t c = 0; c < c_in; ++c) {
    const double g0 = w[3 * c], g1 = w[3 * c + 1], g2 = w[3 * c + 2];
    v0[c] = w[3 * c];
    v1[c] = static_cast<float>((g0 + g1 + g2) * 0.5);
    v2[c] = static_cast<float>((g0 - g1 + g2) * 0.5);
    v3[c] = w[3 * c + 2];
    cols[c] += std::fabs(g0) + std::fabs(g1) + std::fabs(g2);
  }
  const int64_t whole = c_in - c_in % 16;
  for (int64_t c = 0; c < whole; c += 16)
    for (int l = 0; l < 16; ++l)
      row[l] += std::fabs(static_cast<double>(w[3 * (c + l)])) +
                std::fabs(static_cast<double>(w[3 * (c + l) + 1])) +
                std::fabs(static_cast<double>(w[3 * (c + l) + 2]));
  for (int64_t c = whole; c < c_in; ++c)
    row[0] += std::fabs(static_cast<double>(w[3 * c])) +
              std::fabs(static_cast<double>(w[3 * c + 1])) +
              std::fabs(static_cast<double>(w[3 * c + 2]));
}

// The largest of `values`, NaN if one is NaN (std::max would drop it).
double max_or_nan(const double* values, int64_t n) {
  double top = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(values[i])) return NAN;
    top = std::max(top, values[i]);
  }
  return top;
}

// F(2,3)'s weights for the NCL kernel from a (C_out, C_in, 3) weight, computed in float64
// and rounded once: v (4, C_out, C_in) = g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2; and
// the gains of the conv (largest sum of |w| over an output channel's weights) and of its
// data gradient (over an input channel's), in float64: NaN or inf for a non-finite weight.
// Once per training step (the weights change every step), in one pass over the weights.
std::tuple<at::Tensor, double, double> winograd_weights_ncl_cpu(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 3 &&
                  w.size(2) == 3,
              "fastres_ext: w must be a float32 CPU (C_out, C_in, 3) tensor, got ", w.sizes());
  const auto wc = w.contiguous();
  const int64_t c_out = w.size(0), c_in = w.size(1), plane = c_out * c_in;
  auto v = at::empty({4, c_out, c_in}, w.options());
  const float* g = wc.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  std::vector<double> cols(c_in, 0.0), rows(c_out);
  for (int64_t o = 0; o < c_out; ++o) {
    double row[16] = {0.0};
    const int64_t i = o * c_in;
    weight_row(g + 3 * i, vp + i, vp + plane + i, vp + 2 * plane + i, vp + 3 * plane + i,
               cols.data(), row, c_in);
    double sum = 0.0;
    for (const double r : row) sum += r;
    rows[o] = sum;
  }
  return {v, max_or_nan(rows.data(), c_out), max_or_nan(cols.data(), c_in)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastres_ext, m) {
  m.def(
      "winograd_nlc(Tensor x, Tensor v, Tensor bias, Tensor? residual, int dilation, "
      "int pad_left, int out_length, bool relu) -> Tensor");
  m.def(
      "winograd_ncl(Tensor x, Tensor v, Tensor? bias, int dilation, int pad_left, "
      "int out_length, bool transposed, float gain) -> (Tensor, bool)");
  m.def("winograd_weights_ncl(Tensor w) -> (Tensor, float, float)");
}

TORCH_LIBRARY_IMPL(fastres_ext, CPU, m) {
  m.impl("winograd_nlc", &winograd_nlc_cpu);
  m.impl("winograd_ncl", &winograd_ncl_cpu);
  m.impl("winograd_weights_ncl", &winograd_weights_ncl_cpu);
}

// Not differentiable (the training program calls them inside its autograd Function):
// straight to the CPU kernels.
TORCH_LIBRARY_IMPL(fastres_ext, Autograd, m) {
  m.impl("winograd_nlc", torch::CppFunction::makeFallthrough());
  m.impl("winograd_ncl", torch::CppFunction::makeFallthrough());
  m.impl("winograd_weights_ncl", torch::CppFunction::makeFallthrough());
}

}  // namespace fastres
