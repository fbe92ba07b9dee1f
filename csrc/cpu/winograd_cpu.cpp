// Winograd F(2,3) for a stride-1, 3-tap conv on channels-last (NLC) rows, with the bias, the
// residual add and ReLU folded into the output transform: what the oneDNN eval program
// (fastres/backends/onednn.py) runs for its stride-1 k3 convs when the extension is built.
//
// Why: two outputs of a 3-tap conv, y0 = g0 d0 + g1 d1 + g2 d2 and y1 = g0 d1 + g1 d2 + g2 d3
// (correlation, as torch's conv), take 4 products instead of 6 (Lavin and Gray, 2015):
//   m0 = (d0 - d2) g0,  m1 = (d1 + d2) (g0 + g1 + g2) / 2,
//   m2 = (d2 - d1) (g0 - g1 + g2) / 2,  m3 = (d1 - d3) g2,
//   y0 = m0 + m1 + m2,  y1 = m1 - m2 - m3.
// Over channels each m is a GEMM: (tiles, C_in) by (C_in, C_out), the four batched into one
// at::bmm (torch's sgemm: MKL or oneDNN, whichever torch was built with). A third of the
// conv's multiply-adds go; the transforms are adds over the activations (O(C L)). The
// interpolation points 0, 1, -1 and infinity make every transform coefficient 0, +-1 or 1/2:
// exact in float32, so the rounding is the GEMM's plus one rounding per transform add
// (benchmarks/NOTES.md measures it against float64).
//
// Dilation d: outputs n and n + d read taps n - p + {0, d, 2d, 3d}, so a tile is the pair
// (n0, n0 + d) with n0 = 2 d q + r, r < d: the tiles run over the dilation's phases. Input
// rows outside [0, L_in) are the zero padding (no padded copy); an output pair's second row
// past L_out is computed and dropped.
//
// Inputs: x (B, L_in, C_in) contiguous; v (4, C_in, C_out) the transformed weights
// (winograd_f23_weights in fastres/backends/onednn.py computes them in float64); bias
// (C_out); residual (B, L_out, C_out) contiguous or None. Output (B, L_out, C_out).
// ReLU is torch.relu's (`z < 0 ? 0 : z` keeps NaN). Not for non-finite inputs: inf - inf in
// the input transform makes NaN where the direct conv may give inf, so the program runs the
// direct conv on its exact path (non-finite or overflowing inputs). float32 only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace fastres {
namespace {

// The transforms are adds along the contiguous channels; compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at load time, as csrc/cpu/nlc_bn_train_cpu.cpp's loops are.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WINO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WINO_CLONES
#endif

// Chunk sizing (see winograd_f23_nlc_cpu): floats of one chunk's (tiles, C_in + C_out) rows,
// about 512 KB per transform plane set, and the fewest tiles a chunk's GEMM gets.
constexpr int64_t kChunkFloats = 32768;
constexpr int64_t kMinChunk = 128;

using In = const float* __restrict__;
using Out = float* __restrict__;

// One tile's four transformed input rows; a null tap is a zero row.
WINO_CLONES void input_tile(In d0, In d1, In d2, In d3, Out u0, Out u1, Out u2, Out u3,
                            int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    const float a = d0 ? d0[i] : 0.f, b = d1 ? d1[i] : 0.f;
    const float e = d2 ? d2[i] : 0.f, f = d3 ? d3[i] : 0.f;
    u0[i] = a - e;
    u1[i] = b + e;
    u2[i] = e - b;
    u3[i] = b - f;
  }
}

// The same with every tap present: the common case, without the selects.
WINO_CLONES void input_tile_full(In d0, In d1, In d2, In d3, Out u0, Out u1, Out u2, Out u3,
                                 int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    u0[i] = d0[i] - d2[i];
    u1[i] = d1[i] + d2[i];
    u2[i] = d2[i] - d1[i];
    u3[i] = d1[i] - d3[i];
  }
}

// One tile's two output rows: y0 = (m0 + m1) + m2 and y1 = (m1 - m2) - m3, each + bias
// (+ residual), then ReLU; y1 null where the pair's second row is past the output. The
// variants are separate instantiations: no select inside the loops.
template <bool kResidual, bool kRelu>
WINO_CLONES void output_pair(In m0, In m1, In m2, In m3, In bias, In r0, In r1, Out y0,
                             float* __restrict__ y1, int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    float z = (m0[i] + m1[i]) + m2[i] + bias[i];
    if (kResidual) z += r0[i];
    y0[i] = kRelu ? (z < 0.f ? 0.f : z) : z;
  }
  if (!y1) return;
  for (int64_t i = 0; i < c; ++i) {
    float z = (m1[i] - m2[i]) - m3[i] + bias[i];
    if (kResidual) z += r1[i];
    y1[i] = kRelu ? (z < 0.f ? 0.f : z) : z;
  }
}

using OutputPair = void (*)(In, In, In, In, In, In, In, Out, float* __restrict__, int64_t);

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "fastres_ext: ", name, " must be a contiguous float32 CPU tensor");
}

at::Tensor winograd_f23_nlc_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& bias,
                                const c10::optional<at::Tensor>& residual, int64_t dilation,
                                int64_t pad_left, int64_t out_length, bool relu) {
  check_f32(x, "x");
  check_f32(v, "v");
  check_f32(bias, "bias");
  TORCH_CHECK(x.dim() == 3, "fastres_ext: x must be (B, L, C_in), got ", x.sizes());
  const int64_t batch = x.size(0), length = x.size(1), c_in = x.size(2);
  TORCH_CHECK(v.dim() == 3 && v.size(0) == 4 && v.size(1) == c_in,
              "fastres_ext: v must be (4, ", c_in, ", C_out), got ", v.sizes());
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
  const int64_t d = dilation;
  const int64_t pairs = (out_length + 2 * d - 1) / (2 * d);  // q per phase
  const int64_t tiles = pairs * d;                              // per batch item
  const int64_t rows = batch * tiles;
  // Tiles run in chunks of `chunk`: transform, GEMM and output transform of one chunk while
  // its (4, chunk, C_in + C_out) floats stay in cache (the whole batch's transformed input
  // of a long sequence would not), and no fewer than kMinChunk rows per GEMM, so the
  // transformed weights, read once per chunk, are reused over many rows. The chunks are
  // the parallel work items (each GEMM single-threaded inside); their bounds depend on the
  // shape only, so the result does not depend on the thread count.
  const int64_t chunk = std::min(rows, std::max<int64_t>(kMinChunk, kChunkFloats / (c_in + c_out)));
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const OutputPair pair = res_ptr ? (relu ? &output_pair<true, true> : &output_pair<true, false>)
                                  : (relu ? &output_pair<false, true> : &output_pair<false, false>);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    auto u = at::empty({4, chunk, c_in}, x.options());
    auto m = at::empty({4, chunk, c_out}, x.options());
    for (int64_t ci = begin; ci < end; ++ci) {
      const int64_t t0 = ci * chunk, nt = std::min(chunk, rows - t0);
      auto uc = nt == chunk ? u : u.narrow(1, 0, nt);
      auto mc = nt == chunk ? m : m.narrow(1, 0, nt);
      float* up = u.data_ptr<float>();  // plane stride chunk * c_in, also for a short chunk
      for (int64_t t = t0; t < t0 + nt; ++t) {
        const int64_t b = t / tiles, k = t % tiles;
        const int64_t n0 = 2 * d * (k / d) + k % d;
        const float* tap[4];
        bool full = true;
        for (int j = 0; j < 4; ++j) {
          const int64_t i = n0 - pad_left + j * d;
          const bool inside = i >= 0 && i < length;
          tap[j] = inside ? xp + (b * length + i) * c_in : nullptr;
          full = full && inside;
        }
        float* u0 = up + (t - t0) * c_in;
        const int64_t plane = chunk * c_in;
        if (full)
          input_tile_full(tap[0], tap[1], tap[2], tap[3], u0, u0 + plane, u0 + 2 * plane,
                          u0 + 3 * plane, c_in);
        else
          input_tile(tap[0], tap[1], tap[2], tap[3], u0, u0 + plane, u0 + 2 * plane,
                     u0 + 3 * plane, c_in);
      }
      at::bmm_out(mc, uc, v);
      const float* mp = m.data_ptr<float>();
      const int64_t plane = chunk * c_out;
      for (int64_t t = t0; t < t0 + nt; ++t) {
        const int64_t b = t / tiles, k = t % tiles;
        const int64_t n0 = 2 * d * (k / d) + k % d;
        if (n0 >= out_length) continue;  // a phase's last pair past the end
        const float* m0 = mp + (t - t0) * c_out;
        const int64_t row = b * out_length + n0;
        const bool second = n0 + d < out_length;
        const float* r0 = res_ptr ? res_ptr + row * c_out : nullptr;
        pair(m0, m0 + plane, m0 + 2 * plane, m0 + 3 * plane, bp, r0,
             second && r0 ? r0 + d * c_out : nullptr, op + row * c_out,
             second ? op + (row + d) * c_out : nullptr, c_out);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastres_ext, m) {
  m.def(
      "winograd_f23_nlc(Tensor x, Tensor v, Tensor bias, Tensor? residual, int dilation, "
      "int pad_left, int out_length, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastres_ext, CPU, m) { m.impl("winograd_f23_nlc", &winograd_f23_nlc_cpu); }

// Not differentiable (an inference path): straight to the CPU kernel.
TORCH_LIBRARY_IMPL(fastres_ext, Autograd, m) {
  m.impl("winograd_f23_nlc", torch::CppFunction::makeFallthrough());
}

}  // namespace fastres
