// CPU kernels of a training stage's batch norm: the batch statistics, the normalize ->
// (+ residual) -> ReLU epilogue, and its backward, around a conv run elsewhere (oneDNN through
// ATen: fastres/backends/onednn_train.py runs the conv, its data gradient and its weight
// gradient). Two layouts of the same computation: channels-last (nlc_bn_train_*, described
// first) and NCL (ncl_bn_train_*, on the (B, C, L) output of oneDNN's blocked NCL convs, read
// in place; see "The NCL variants' loops" below for how they cut and vectorize the work).
// Also the tiled transpose and the few-rows GEMM route's channel-major im2col and col2im
// (cm_im2col, cm_col2im) the same program runs.
//
// Layout: y (B, Ly, C) is the conv output as oneDNN writes it channels-last (rows of C
// contiguous values, row stride C); only its first `length` rows per batch item are the stage's
// output (a causal conv run with symmetric padding writes (K-1)*d rows more at the end, which
// are never read). out, residual and grad_out are (B, length, C), contiguous. float32 only:
// every value is float32, the reductions merge in float64.
//
// How the work is cut: rows are split into (batch item, tile of kTileRows rows) work items, run
// by at::parallel_for. Each item computes per-channel partials of its tile while the tile is in
// L1 (the loops run along the channels, the contiguous dimension, so they vectorize across C):
//   forward : the tile's mean, then its M2 (a second read of the tile, from cache);
//   backward: sums of g and g * x-hat, g = grad_out masked where out <= 0.
// The partials are merged per channel in item order, in float64 (forward: Chan's (count, mean,
// M2) merge, never sum and sum of squares): deterministic, independent of the thread count.
// Then one more pass writes the result:
//   forward : out = relu((y - mean) * invstd * gamma + beta (+ residual)), or without the
//             ReLU (relu=false: a ResNet shortcut's 1x1 conv -> BN)
//   backward: grad_y = gamma * invstd * (g - sum_g / N - x-hat * sum_gx / N), grad_residual = g,
//             and zeros in grad_y's extra rows (so the conv's backward sees the causal output's
//             gradient, padding rows included).
// x-hat is recomputed in backward from y, mean and invstd by the forward's own float
// expression, so nothing but the conv output (which the conv's weight gradient needs anyway)
// is saved. ReLU is torch.relu's: `z < 0 ? 0 : z` keeps NaN, and its backward passes the
// gradient where out is NaN (threshold_backward's `out <= 0 ? 0 : g`). Both operands of that
// select are loaded before it: `o <= 0 ? 0 : go[i]` is a conditional load, which GCC does not
// vectorize, and its branch on random signs ran the backward 10x slower.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace fastres {
namespace {

// Rows per tile: the tile's C floats times the rows stay well inside L1 (a second read of the
// tile for M2 comes from cache), and B * L / kTileRows items keep two cores busy. Depends on C
// only, so the merge order does not depend on the thread count.
int64_t tile_rows(int64_t channels) {
  return std::max<int64_t>(8, std::min<int64_t>(256, 4096 / std::max<int64_t>(channels, 1)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_rows(const at::Tensor& t, const char* name, int64_t batch, int64_t rows,
                int64_t channels) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "fastres_ext: ", name,
              " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == rows && t.size(2) == channels,
              "fastres_ext: ", name, " must have shape (", batch, ", ", rows, ", ", channels,
              "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastres_ext: ", name, " must be contiguous (B, L, C)");
}

void check_channels(const at::Tensor& t, const char* name, int64_t channels) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == channels,
              "fastres_ext: ", name, " must be a contiguous float32 CPU tensor of ", channels,
              " values");
}

const float* optional_ptr(const c10::optional<at::Tensor>& t, const char* name,
                          int64_t channels) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_channels(*t, name, channels);
  return t->data_ptr<float>();
}

// The work items: (batch item, tile) -> rows [t0, t0 + nt) of batch item b.
struct Tiles {
  int64_t batch, length, rows, per_item;
  Tiles(int64_t batch_, int64_t length_, int64_t channels)
      : batch(batch_), length(length_), rows(tile_rows(channels)),
        per_item(ceil_div(length_, tile_rows(channels))) {}
  int64_t items() const { return batch * per_item; }
  int64_t b(int64_t item) const { return item / per_item; }
  int64_t t0(int64_t item) const { return (item % per_item) * rows; }
  int64_t nt(int64_t item) const { return std::min(rows, length - t0(item)); }
};

// The four loops below run along the channels (the contiguous dimension) and vectorize across
// them. They are compiled for AVX-512, AVX2 and baseline x86-64, picked by the CPU when the
// extension loads (the extension itself is built for baseline x86-64, whose SSE2 vectors hold 4
// floats; ATen's own batch norm kernels are dispatched by CPU the same way), or forced by
// fastres_ext.bn_train_isa (the tests run every level the CPU has and compare the bits). Their
// pointers are __restrict__: with two outputs and up to eight inputs GCC's run-time alias
// checks pass its limit, and it left the backward's loops scalar; the ops check that no output
// overlaps an input. Each channel's sums run in one order whatever the level, but the levels
// do not compute the same bits: GCC contracts a * b + c into an FMA where the level has one
// (AVX2 and AVX-512), so results differ from baseline's in the last bits (measured: 1 ulp of
// invstd); every level passes the same float64 parity tests (tests/backends/
// test_onednn_train.py runs them at each level this CPU has).
//
// ISA_LEVELS(name, (params), (args)) defines name(params), which calls the body name##_body
// inlined into a function compiled for the chosen level.
enum IsaLevel : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"baseline", "x86-64-v3", "x86-64-v4"};

int best_isa_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return kAvx2;
#endif
  return kBaseline;
}

int& isa_level() {
  static int level = best_isa_level();
  return level;
}

#define LOOP_BODY static inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ISA_LEVELS(name, params, args)                                       \
  __attribute__((target("arch=x86-64-v4"))) void name##_v4 params {       \
    name##_body args;                                                       \
  }                                                                         \
  __attribute__((target("arch=x86-64-v3"))) void name##_v3 params {       \
    name##_body args;                                                       \
  }                                                                         \
  void name##_v1 params { name##_body args; }                               \
  void name params {                                                        \
    switch (isa_level()) {                                                  \
      case kAvx512: name##_v4 args; break;                                  \
      case kAvx2: name##_v3 args; break;                                    \
      default: name##_v1 args;                                              \
    }                                                                       \
  }
#else
#define ISA_LEVELS(name, params, args) \
  void name params { name##_body args; }
#endif

// Restrict-qualified pointers of the loops below (inputs, outputs).
using In = const float* __restrict__;
using Out = float* __restrict__;

// A tile's per-channel mean (m) and M2 about it; nt rows of c channels.
LOOP_BODY void tile_mean_m2_body(In tile, int64_t nt, int64_t c, Out m, Out m2) {
  std::fill(m, m + c, 0.f);
  std::fill(m2, m2 + c, 0.f);
  for (int64_t r = 0; r < nt; ++r)
    for (int64_t ch = 0; ch < c; ++ch) m[ch] += tile[r * c + ch];
  const float inv_nt = 1.f / static_cast<float>(nt);
  for (int64_t ch = 0; ch < c; ++ch) m[ch] *= inv_nt;
  for (int64_t r = 0; r < nt; ++r)
    for (int64_t ch = 0; ch < c; ++ch) {
      const float d = tile[r * c + ch] - m[ch];
      m2[ch] += d * d;
    }
}
ISA_LEVELS(tile_mean_m2, (In tile, int64_t nt, int64_t c, Out m, Out m2), (tile, nt, c, m, m2))

// One output row of the forward's epilogue (rr: the residual row, or null).
LOOP_BODY void epilogue_row_body(In src, In rr, Out dst, int64_t c, In mf, In sf, In gf, In bf,
                                 float relu_floor) {
  if (rr) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const float z = (src[ch] - mf[ch]) * sf[ch] * gf[ch] + bf[ch] + rr[ch];
      dst[ch] = z < relu_floor ? 0.f : z;
    }
  } else {
    for (int64_t ch = 0; ch < c; ++ch) {
      const float z = (src[ch] - mf[ch]) * sf[ch] * gf[ch] + bf[ch];
      dst[ch] = z < relu_floor ? 0.f : z;
    }
  }
}
ISA_LEVELS(epilogue_row, (In src, In rr, Out dst, int64_t c, In mf, In sf, In gf, In bf,
           float relu_floor), (src, rr, dst, c, mf, sf, gf, bf, relu_floor))

// A tile's per-channel sums of g and g * x-hat (g: grad_out masked where out <= relu_floor).
LOOP_BODY void tile_grad_sums_body(In go, In o, In yy, int64_t nt, int64_t c, In mf, In sf,
                                   float relu_floor, Out sg, Out sgx) {
  std::fill(sg, sg + c, 0.f);
  std::fill(sgx, sgx + c, 0.f);
  for (int64_t r = 0; r < nt; ++r)
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t i = r * c + ch;
      const float gv = go[i], ov = o[i];  // both loaded: a select, no branch
      const float gi = ov <= relu_floor ? 0.f : gv;
      sg[ch] += gi;
      sgx[ch] += gi * ((yy[i] - mf[ch]) * sf[ch]);
    }
}
ISA_LEVELS(tile_grad_sums, (In go, In o, In yy, int64_t nt, int64_t c, In mf, In sf,
           float relu_floor, Out sg, Out sgx), (go, o, yy, nt, c, mf, sf, relu_floor, sg, sgx))

// One row of grad_y (and of grad_residual where gr is not null).
LOOP_BODY void grad_row_body(In go, In o, In yy, Out gr, Out dst, int64_t c, In k1p, In mgp, In mf,
                             In sf, In mgxp, float relu_floor) {
  if (gr) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const float gv = go[ch], ov = o[ch];
      const float gi = ov <= relu_floor ? 0.f : gv;
      gr[ch] = gi;
      dst[ch] = k1p[ch] * (gi - mgp[ch] - ((yy[ch] - mf[ch]) * sf[ch]) * mgxp[ch]);
    }
  } else {
    for (int64_t ch = 0; ch < c; ++ch) {
      const float gv = go[ch], ov = o[ch];
      const float gi = ov <= relu_floor ? 0.f : gv;
      dst[ch] = k1p[ch] * (gi - mgp[ch] - ((yy[ch] - mf[ch]) * sf[ch]) * mgxp[ch]);
    }
  }
}
ISA_LEVELS(grad_row, (In go, In o, In yy, Out gr, Out dst, int64_t c, In k1p, In mgp, In mf,
           In sf, In mgxp, float relu_floor), (go, o, yy, gr, dst, c, k1p, mgp, mf, sf, mgxp,
           relu_floor))

// The NCL variants' loops (ncl_bn_train_forward/backward below): `rows` (batch item, channel)
// rows of the (B, C, L) conv output per call (one call per work item, not per row: at 32
// positions a row is two vectors), each contiguous along the positions, so they vectorize
// along L. A row's sums run in kLanes independent float32 lanes (lane j takes positions
// i + j), added by halves (8 + 8, 4 + 4, ...): no reassociation, so GCC vectorizes them
// without -ffast-math and every clone (16, 8 or 4 floats a vector) computes the same bits.
// Row r of a call is channel (c0 + r) % c.
constexpr int64_t kLanes = 16;

// The lanes' sum, by halves (the same order in every clone).
inline float fold_lanes(float* acc) {
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// Per row: its mean m (float32) and the sum of (x - m)^2 about it, of the n values at
// y + r * stride; written to mean_out[r * out_stride], m2_out[r * out_stride].
LOOP_BODY void ncl_rows_mean_m2_body(In y, int64_t rows, int64_t stride, int64_t n,
                                     double* mean_out, double* m2_out, int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = y + r * stride;
    float acc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j];
    for (int64_t j = 0; i + j < n; ++j) acc[j] += x[i + j];
    const float m = fold_lanes(acc) / static_cast<float>(n);
    float sq[kLanes] = {};
    for (i = 0; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const float d = x[i + j] - m;
        sq[j] += d * d;
      }
    for (int64_t j = 0; i + j < n; ++j) {
      const float d = x[i + j] - m;
      sq[j] += d * d;
    }
    mean_out[r * out_stride] = m;
    m2_out[r * out_stride] = fold_lanes(sq);
  }
}
ISA_LEVELS(ncl_rows_mean_m2, (In y, int64_t rows, int64_t stride, int64_t n, double* mean_out,
           double* m2_out, int64_t out_stride), (y, rows, stride, n, mean_out, m2_out,
           out_stride))

// The forward's epilogue on rows (row r: y + r * y_stride, out and rr + r * n); the same
// float expression as epilogue_row's.
LOOP_BODY void ncl_epilogue_rows_body(In y, int64_t y_stride, In rr, Out out, int64_t rows,
                                      int64_t n, int64_t c0, int64_t c, In mf, In sf, In gf, In bf,
                                      float relu_floor) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t ch = (c0 + r) % c;
    const float m = mf[ch], s = sf[ch], g = gf[ch], bt = bf[ch];
    const float* src = y + r * y_stride;
    float* dst = out + r * n;
    if (rr) {
      const float* rrow = rr + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const float z = (src[i] - m) * s * g + bt + rrow[i];
        dst[i] = z < relu_floor ? 0.f : z;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float z = (src[i] - m) * s * g + bt;
        dst[i] = z < relu_floor ? 0.f : z;
      }
    }
  }
}
ISA_LEVELS(ncl_epilogue_rows, (In y, int64_t y_stride, In rr, Out out, int64_t rows, int64_t n,
           int64_t c0, int64_t c, In mf, In sf, In gf, In bf, float relu_floor), (y, y_stride, rr,
           out, rows, n, c0, c, mf, sf, gf, bf, relu_floor))

// Per row: the sums of g and g * x-hat (g: grad_out masked where out <= relu_floor) over its
// n positions; go and o rows at r * stride, y rows at r * y_stride.
LOOP_BODY void ncl_rows_grad_sums_body(In go, In o, In yy, int64_t rows, int64_t stride,
                                       int64_t y_stride, int64_t n, int64_t c0, int64_t c, In mf,
                                       In sf, float relu_floor, double* sg_out, double* sgx_out,
                                       int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t ch = (c0 + r) % c;
    const float m = mf[ch], s = sf[ch];
    const float* gr = go + r * stride;
    const float* orow = o + r * stride;
    const float* yr = yy + r * y_stride;
    float ag[kLanes] = {}, agx[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        const float gv = gr[i + j], ov = orow[i + j];  // both loaded: a select, no branch
        const float gi = ov <= relu_floor ? 0.f : gv;
        ag[j] += gi;
        agx[j] += gi * ((yr[i + j] - m) * s);
      }
    for (int64_t j = 0; i + j < n; ++j) {
      const float gv = gr[i + j], ov = orow[i + j];
      const float gi = ov <= relu_floor ? 0.f : gv;
      ag[j] += gi;
      agx[j] += gi * ((yr[i + j] - m) * s);
    }
    sg_out[r * out_stride] = fold_lanes(ag);
    sgx_out[r * out_stride] = fold_lanes(agx);
  }
}
ISA_LEVELS(ncl_rows_grad_sums, (In go, In o, In yy, int64_t rows, int64_t stride,
           int64_t y_stride, int64_t n, int64_t c0, int64_t c, In mf, In sf, float relu_floor,
           double* sg_out, double* sgx_out, int64_t out_stride), (go, o, yy, rows, stride,
           y_stride, n, c0, c, mf, sf, relu_floor, sg_out, sgx_out, out_stride))

// grad_y on rows (and grad_residual where gres is not null): the first n of each y row of
// y_rows positions, zeros after; grad_row's expression.
LOOP_BODY void ncl_grad_rows_body(In go, In o, In yy, Out gres, Out gy, int64_t rows, int64_t n,
                                  int64_t y_rows, int64_t c0, int64_t c, In k1p, In mgp, In mf,
                                  In sf, In mgxp, float relu_floor) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t ch = (c0 + r) % c;
    const float k1 = k1p[ch], mg = mgp[ch], m = mf[ch], s = sf[ch], mgx = mgxp[ch];
    const float* gr = go + r * n;
    const float* orow = o + r * n;
    const float* yr = yy + r * y_rows;
    float* dst = gy + r * y_rows;
    if (gres) {
      float* rdst = gres + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const float gv = gr[i], ov = orow[i];
        const float gi = ov <= relu_floor ? 0.f : gv;
        rdst[i] = gi;
        dst[i] = k1 * (gi - mg - ((yr[i] - m) * s) * mgx);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float gv = gr[i], ov = orow[i];
        const float gi = ov <= relu_floor ? 0.f : gv;
        dst[i] = k1 * (gi - mg - ((yr[i] - m) * s) * mgx);
      }
    }
    for (int64_t i = n; i < y_rows; ++i) dst[i] = 0.f;
  }
}
ISA_LEVELS(ncl_grad_rows, (In go, In o, In yy, Out gres, Out gy, int64_t rows, int64_t n,
           int64_t y_rows, int64_t c0, int64_t c, In k1p, In mgp, In mf, In sf, In mgxp,
           float relu_floor), (go, o, yy, gres, gy, rows, n, y_rows, c0, c, k1p, mgp, mf, sf,
           mgxp, relu_floor))

}  // namespace

// Positions per statistics tile of an NCL row: a row's tiles are merged as the NLC tiles are,
// so a long row's float32 sums stay short (as the NLC tiles' kTileRows). Depends on nothing
// but the shape, so the merge order does not depend on the thread count.
constexpr int64_t kNclTile = 512;
// (batch item, channel) rows per work item of the NCL loops: work items of a few KB at short
// rows. Depends on nothing but the shape (the merge runs per channel in a fixed order anyway).
constexpr int64_t kNclRows = 16;

// Activations: (B, rows, C) for NLC, (B, C, rows) for NCL.
void check_act(const at::Tensor& t, const char* name, bool ncl, int64_t batch, int64_t rows,
               int64_t channels) {
  if (ncl) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "fastres_ext: ", name,
                " must be a float32 CPU tensor");
    TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == channels &&
                    t.size(2) == rows,
                "fastres_ext: ", name, " must have shape (", batch, ", ", channels, ", ", rows,
                "), got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "fastres_ext: ", name, " must be contiguous (B, C, L)");
  } else {
    check_rows(t, name, batch, rows, channels);
  }
}

// Batch statistics of y's first `length` positions per batch item, the running statistics
// update (momentum_factor, unbiased variance, as nn.BatchNorm1d), and
//   out = relu((y - mean) * invstd * gamma + beta (+ residual)).
// mean and invstd (float32, per channel) are written for the backward. ncl: y is (B, C, Ly)
// and out, residual (B, C, length); else (B, Ly, C) and (B, length, C).
void bn_train_forward(const at::Tensor& y, int64_t length, const c10::optional<at::Tensor>& gamma,
                      const c10::optional<at::Tensor>& beta,
                      const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var, double eps,
                      double momentum_factor, const c10::optional<at::Tensor>& residual,
                      const at::Tensor& out, const at::Tensor& mean_out,
                      const at::Tensor& invstd_out, bool relu, bool ncl) {
  TORCH_CHECK(y.dim() == 3, "fastres_ext: y must be ", ncl ? "(B, C, Ly)" : "(B, Ly, C)");
  const int64_t batch = y.size(0), y_rows = y.size(ncl ? 2 : 1), c = y.size(ncl ? 1 : 2);
  TORCH_CHECK(length >= 1 && length <= y_rows, "fastres_ext: length ", length,
              " outside [1, ", y_rows, "]");
  TORCH_CHECK(batch * length > 1, "fastres_ext: batch statistics need more than one value per "
              "channel");
  check_act(y, "y", ncl, batch, y_rows, c);
  check_act(out, "out", ncl, batch, length, c);
  at::assert_no_overlap(out, y);  // the loops' pointers are __restrict__
  check_channels(mean_out, "mean", c);
  check_channels(invstd_out, "invstd", c);
  const float* g = optional_ptr(gamma, "gamma", c);
  const float* bt = optional_ptr(beta, "beta", c);
  const float* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    check_act(*residual, "residual", ncl, batch, length, c);
    at::assert_no_overlap(out, *residual);
    res = residual->data_ptr<float>();
  }
  const float* yp = y.data_ptr<float>();
  float* op = out.data_ptr<float>();

  // Per-channel (count, mean, M2), merged by Chan's rule in a fixed order, in float64.
  std::vector<double> n(c, 0.0), mean(c, 0.0), m2(c, 0.0);
  auto merge = [&](int64_t ch, double nb, double mb, double m2b) {
    const double delta = mb - mean[ch], total = n[ch] + nb;
    mean[ch] += delta * (nb / total);
    m2[ch] += m2b + delta * delta * (n[ch] * nb / total);
    n[ch] = total;
  };
  if (ncl) {
    // Items of kNclRows (batch item, channel) rows, each row cut into tiles of kNclTile
    // positions; merged per channel in (batch item, tile) order.
    const int64_t per_row = ceil_div(length, kNclTile), rows = batch * c;
    std::vector<double> part_mean(rows * per_row), part_m2(rows * per_row);
    at::parallel_for(0, ceil_div(rows, kNclRows), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r0 = item * kNclRows, nr = std::min(kNclRows, rows - r0);
        for (int64_t t = 0; t < per_row; ++t)
          ncl_rows_mean_m2(yp + r0 * y_rows + t * kNclTile, nr, y_rows,
                           std::min(kNclTile, length - t * kNclTile),
                           &part_mean[r0 * per_row + t], &part_m2[r0 * per_row + t], per_row);
      }
    });
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < per_row; ++t) {
          const int64_t i = (b * c + ch) * per_row + t;
          merge(ch, static_cast<double>(std::min(kNclTile, length - t * kNclTile)),
                part_mean[i], part_m2[i]);
        }
  } else {
    const Tiles tiles(batch, length, c);
    std::vector<float> part_mean(tiles.items() * c), part_m2(tiles.items() * c);
    at::parallel_for(0, tiles.items(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const float* tile = yp + (tiles.b(item) * y_rows + tiles.t0(item)) * c;
        const int64_t nt = tiles.nt(item);
        tile_mean_m2(tile, nt, c, part_mean.data() + item * c, part_m2.data() + item * c);
      }
    });
    for (int64_t item = 0; item < tiles.items(); ++item) {
      const double nb = static_cast<double>(tiles.nt(item));
      for (int64_t ch = 0; ch < c; ++ch)
        merge(ch, nb, part_mean[item * c + ch], part_m2[item * c + ch]);
    }
  }
  const double count = static_cast<double>(batch * length);
  std::vector<float> mean_f(c), invstd_f(c), gamma_f(c), beta_f(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    const double var = m2[ch] / count;
    mean_f[ch] = static_cast<float>(mean[ch]);
    invstd_f[ch] = static_cast<float>(1.0 / std::sqrt(var + eps));
    gamma_f[ch] = g ? g[ch] : 1.f;
    beta_f[ch] = bt ? bt[ch] : 0.f;
  }
  std::copy(mean_f.begin(), mean_f.end(), mean_out.data_ptr<float>());
  std::copy(invstd_f.begin(), invstd_f.end(), invstd_out.data_ptr<float>());
  if (running_mean.has_value() && running_mean->defined()) {
    check_channels(*running_mean, "running_mean", c);
    TORCH_CHECK(running_var.has_value() && running_var->defined(),
                "fastres_ext: running_var is missing");
    check_channels(*running_var, "running_var", c);
    float* rm = running_mean->data_ptr<float>();
    float* rv = running_var->data_ptr<float>();
    const double unbiased = count / (count - 1.0);
    for (int64_t ch = 0; ch < c; ++ch) {
      rm[ch] = static_cast<float>((1 - momentum_factor) * rm[ch] + momentum_factor * mean[ch]);
      rv[ch] = static_cast<float>((1 - momentum_factor) * rv[ch] +
                                  momentum_factor * (m2[ch] / count) * unbiased);
    }
  }

  // The epilogue. Without the ReLU (a shortcut's BN) the comparison is with NaN, always
  // false: the loop stays one select, no branch.
  const float relu_floor = relu ? 0.f : std::numeric_limits<float>::quiet_NaN();
  const float* mf = mean_f.data();
  const float* sf = invstd_f.data();
  const float* gf = gamma_f.data();
  const float* bf = beta_f.data();
  if (ncl) {  // items of kNclRows (batch item, channel) rows
    at::parallel_for(0, ceil_div(batch * c, kNclRows), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r0 = item * kNclRows, nr = std::min(kNclRows, batch * c - r0);
        ncl_epilogue_rows(yp + r0 * y_rows, y_rows, res ? res + r0 * length : nullptr,
                          op + r0 * length, nr, length, r0 % c, c, mf, sf, gf, bf, relu_floor);
      }
    });
    return;
  }
  at::parallel_for(0, batch * length, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / length, t = row % length;
      const float* src = yp + (b * y_rows + t) * c;
      epilogue_row(src, res ? res + row * c : nullptr, op + row * c, c, mf, sf, gf, bf,
                   relu_floor);
    }
  });
}

// Backward of bn_train_forward: grad_y (zeros past `length`) for the conv's backward,
// grad_gamma and grad_beta (per channel), and grad_residual = g when given.
void bn_train_backward(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                       const at::Tensor& mean, const at::Tensor& invstd,
                       const c10::optional<at::Tensor>& gamma, const at::Tensor& grad_y,
                       const at::Tensor& grad_gamma, const at::Tensor& grad_beta,
                       const c10::optional<at::Tensor>& grad_residual, bool relu, bool ncl) {
  TORCH_CHECK(y.dim() == 3 && out.dim() == 3, "fastres_ext: y and out must be 3D");
  const int64_t batch = y.size(0), y_rows = y.size(ncl ? 2 : 1), c = y.size(ncl ? 1 : 2);
  const int64_t length = out.size(ncl ? 2 : 1);
  TORCH_CHECK(length >= 1 && length <= y_rows, "fastres_ext: out has ", length,
              " positions, y has ", y_rows);
  check_act(y, "y", ncl, batch, y_rows, c);
  check_act(out, "out", ncl, batch, length, c);
  check_act(grad_out, "grad_out", ncl, batch, length, c);
  check_act(grad_y, "grad_y", ncl, batch, y_rows, c);
  for (const at::Tensor* read : {&grad_out, &out, &y})  // the loops' pointers are __restrict__
    at::assert_no_overlap(grad_y, *read);
  check_channels(mean, "mean", c);
  check_channels(invstd, "invstd", c);
  check_channels(grad_gamma, "grad_gamma", c);
  check_channels(grad_beta, "grad_beta", c);
  const float* g = optional_ptr(gamma, "gamma", c);
  float* gres = nullptr;
  if (grad_residual.has_value() && grad_residual->defined()) {
    check_act(*grad_residual, "grad_residual", ncl, batch, length, c);
    for (const at::Tensor* other : {&grad_out, &out, &y, &grad_y})
      at::assert_no_overlap(*grad_residual, *other);
    gres = grad_residual->data_ptr<float>();
  }
  const float* gop = grad_out.data_ptr<float>();
  const float* outp = out.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* mf = mean.data_ptr<float>();
  const float* sf = invstd.data_ptr<float>();
  float* gyp = grad_y.data_ptr<float>();

  // Without the ReLU, the mask compares with NaN (always false): every g passes.
  const float relu_floor = relu ? 0.f : std::numeric_limits<float>::quiet_NaN();
  // Pass 1: per-tile sums of g and g * x-hat, added per channel in a fixed order in float64.
  std::vector<double> sum_g(c, 0.0), sum_gx(c, 0.0);
  if (ncl) {
    const int64_t per_row = ceil_div(length, kNclTile), rows = batch * c;
    std::vector<double> part_g(rows * per_row), part_gx(rows * per_row);
    at::parallel_for(0, ceil_div(rows, kNclRows), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r0 = item * kNclRows, nr = std::min(kNclRows, rows - r0);
        for (int64_t t = 0; t < per_row; ++t) {
          const int64_t p0 = t * kNclTile;
          ncl_rows_grad_sums(gop + r0 * length + p0, outp + r0 * length + p0,
                             yp + r0 * y_rows + p0, nr, length, y_rows,
                             std::min(kNclTile, length - p0), r0 % c, c, mf, sf, relu_floor,
                             &part_g[r0 * per_row + t], &part_gx[r0 * per_row + t], per_row);
        }
      }
    });
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < per_row; ++t) {
          sum_g[ch] += part_g[(b * c + ch) * per_row + t];
          sum_gx[ch] += part_gx[(b * c + ch) * per_row + t];
        }
  } else {
    const Tiles tiles(batch, length, c);
    std::vector<float> part_g(tiles.items() * c), part_gx(tiles.items() * c);
    at::parallel_for(0, tiles.items(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = tiles.b(item), t0 = tiles.t0(item), nt = tiles.nt(item);
        const float* go = gop + (b * length + t0) * c;
        const float* o = outp + (b * length + t0) * c;
        const float* yy = yp + (b * y_rows + t0) * c;
        tile_grad_sums(go, o, yy, nt, c, mf, sf, relu_floor, part_g.data() + item * c,
                       part_gx.data() + item * c);
      }
    });
    for (int64_t item = 0; item < tiles.items(); ++item)
      for (int64_t ch = 0; ch < c; ++ch) {
        sum_g[ch] += part_g[item * c + ch];
        sum_gx[ch] += part_gx[item * c + ch];
      }
  }
  const double count = static_cast<double>(batch * length);
  std::vector<float> k1(c), mean_g(c), mean_gx(c);
  float* ggp = grad_gamma.data_ptr<float>();
  float* gbp = grad_beta.data_ptr<float>();
  for (int64_t ch = 0; ch < c; ++ch) {
    ggp[ch] = static_cast<float>(sum_gx[ch]);
    gbp[ch] = static_cast<float>(sum_g[ch]);
    k1[ch] = (g ? g[ch] : 1.f) * sf[ch];
    mean_g[ch] = static_cast<float>(sum_g[ch] / count);
    mean_gx[ch] = static_cast<float>(sum_gx[ch] / count);
  }

  // Pass 2: grad_y (and grad_residual).
  const float* k1p = k1.data();
  const float* mgp = mean_g.data();
  const float* mgxp = mean_gx.data();
  if (ncl) {  // items of kNclRows (batch item, channel) rows
    at::parallel_for(0, ceil_div(batch * c, kNclRows), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r0 = item * kNclRows, nr = std::min(kNclRows, batch * c - r0);
        ncl_grad_rows(gop + r0 * length, outp + r0 * length, yp + r0 * y_rows,
                      gres ? gres + r0 * length : nullptr, gyp + r0 * y_rows, nr, length,
                      y_rows, r0 % c, c, k1p, mgp, mf, sf, mgxp, relu_floor);
      }
    });
    return;
  }
  at::parallel_for(0, batch * y_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / y_rows, t = row % y_rows;
      float* dst = gyp + row * c;
      if (t >= length) {
        std::fill(dst, dst + c, 0.f);
        continue;
      }
      const int64_t i0 = (b * length + t) * c;
      const float* go = gop + i0;
      const float* o = outp + i0;
      grad_row(go, o, yp + row * c, gres ? gres + i0 : nullptr, dst, c, k1p, mgp, mf, sf, mgxp,
               relu_floor);
    }
  });
}

#define BN_TRAIN_OPS(prefix, ncl)                                                              \
  void prefix##_bn_train_forward_cpu(                                                          \
      const at::Tensor& y, int64_t length, const c10::optional<at::Tensor>& gamma,             \
      const c10::optional<at::Tensor>& beta, const c10::optional<at::Tensor>& running_mean,    \
      const c10::optional<at::Tensor>& running_var, double eps, double momentum_factor,        \
      const c10::optional<at::Tensor>& residual, const at::Tensor& out,                        \
      const at::Tensor& mean_out, const at::Tensor& invstd_out, bool relu) {                   \
    bn_train_forward(y, length, gamma, beta, running_mean, running_var, eps, momentum_factor,  \
                     residual, out, mean_out, invstd_out, relu, ncl);                          \
  }                                                                                            \
  void prefix##_bn_train_backward_cpu(                                                         \
      const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,                  \
      const at::Tensor& mean, const at::Tensor& invstd, const c10::optional<at::Tensor>& gamma, \
      const at::Tensor& grad_y, const at::Tensor& grad_gamma, const at::Tensor& grad_beta,     \
      const c10::optional<at::Tensor>& grad_residual, bool relu) {                             \
    bn_train_backward(grad_out, out, y, mean, invstd, gamma, grad_y, grad_gamma, grad_beta,    \
                      grad_residual, relu, ncl);                                               \
  }
// The channels-last ops (y (B, Ly, C)) and their NCL twins (y (B, C, Ly), the layout
// oneDNN's blocked NCL convs read and write: no transpose between a conv and its batch norm).
BN_TRAIN_OPS(nlc, false)
BN_TRAIN_OPS(ncl, true)
#undef BN_TRAIN_OPS

// out[n, j, i] = src[n, i, j]: a conv weight between PyTorch's (C_out, C_in, K) layout and
// the (C_out, K, C_in) one oneDNN's channels-last conv reads and writes. ATen's copy_ of that
// permutation runs an element-wise loop with a strided inner dimension (benchmarks/NOTES.md).
// Also (B, L, C) rows <-> (B, C, L) around the NCL conv layout's convs.
void nlc_transpose_last2_cpu(const at::Tensor& src, const at::Tensor& out) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kFloat && src.dim() == 3 &&
                  src.is_contiguous(),
              "fastres_ext: src must be a contiguous float32 (N, A, B) CPU tensor");
  const int64_t n = src.size(0), a = src.size(1), b = src.size(2);
  check_rows(out, "out", n, b, a);
  const float* sp = src.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Square tiles of kTile x kTile: the tile's source rows and destination rows both stay in
  // L1 (an activation's (L, C) slab does not), work items of (slab, tile row).
  constexpr int64_t kTile = 16;
  const int64_t row_tiles = ceil_div(a, kTile);
  at::parallel_for(0, n * row_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / row_tiles, k0 = (item % row_tiles) * kTile;
      const int64_t k1 = std::min(a, k0 + kTile);
      const float* s_i = sp + i * a * b;
      float* o_i = op + i * a * b;
      for (int64_t j0 = 0; j0 < b; j0 += kTile) {
        const int64_t j1 = std::min(b, j0 + kTile);
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t k = k0; k < k1; ++k) o_i[j * a + k] = s_i[k * b + j];
      }
    }
  });
}

// The few-rows route's columns and their gradient (fastres/backends/onednn_train.py,
// GEMM_MAX_ROWS), on channel-major activations: h (C, B, L) contiguous, the columns
// (C, K, B, L_out) contiguous (the (C*K, B*L_out) matrix the conv's GEMM reads). Column
// (c, j, b, t) is h[c, b, t*s + j*d - pad_left], zero outside [0, L): the padding is never
// copied. In Python these were a padded copy, K strided slices and a stack (forward) and a
// zero fill plus one add per tap (backward), each a pass over memory and a few ops' overhead.
// Work items are channels: a channel's rows stay in L1 while its K taps are read or added.
namespace {

void check_cm(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dim &&
                  t.is_contiguous(),
              "fastres_ext: ", name, " must be a contiguous float32 CPU tensor of ", dim,
              " dims");
}

// The outputs t in [first, last) of a tap whose output t reads input position
// t * stride + offset (offset = j * dilation - pad_left for tap j) that lie in [0, length).
void tap_span(int64_t offset, int64_t stride, int64_t length, int64_t l_out, int64_t* first,
              int64_t* last) {
  *first = offset >= 0 ? 0 : std::min(l_out, (-offset + stride - 1) / stride);
  *last = length - 1 - offset < 0 ? 0 : std::min(l_out, (length - 1 - offset) / stride + 1);
  if (*last < *first) *last = *first;
}

}  // namespace

void cm_im2col_cpu(const at::Tensor& h, int64_t kernel_size, int64_t stride, int64_t dilation,
                   int64_t pad_left, const at::Tensor& cols) {
  check_cm(h, "h", 3);
  check_cm(cols, "cols", 4);
  const int64_t channels = h.size(0), batch = h.size(1), length = h.size(2);
  const int64_t l_out = cols.size(3);
  TORCH_CHECK(kernel_size >= 1 && stride >= 1 && dilation >= 1 && pad_left >= 0,
              "fastres_ext: bad conv geometry");
  TORCH_CHECK(cols.size(0) == channels && cols.size(1) == kernel_size &&
                  cols.size(2) == batch,
              "fastres_ext: cols must be (C, K, B, L_out) for h (C, B, L)");
  TORCH_CHECK(at::has_internal_overlap(cols) != at::MemOverlap::Yes &&
                  at::get_overlap_status(h, cols) == at::MemOverlapStatus::No,
              "fastres_ext: cols overlaps h");
  const float* hp = h.data_ptr<float>();
  float* cp = cols.data_ptr<float>();
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t j = 0; j < kernel_size; ++j) {
        const int64_t offset = j * dilation - pad_left;
        int64_t first, last;
        tap_span(offset, stride, length, l_out, &first, &last);
        for (int64_t b = 0; b < batch; ++b) {
          const float* src = hp + (c * batch + b) * length;
          float* dst = cp + ((c * kernel_size + j) * batch + b) * l_out;
          std::fill(dst, dst + first, 0.0f);
          if (stride == 1) {
            std::copy(src + first + offset, src + last + offset, dst + first);
          } else {
            for (int64_t t = first; t < last; ++t) dst[t] = src[t * stride + offset];
          }
          std::fill(dst + last, dst + l_out, 0.0f);
        }
      }
    }
  });
}

// grad_h[c, b, p] = the sum over taps j (in order) of gcols[c, j, b, t] with
// t * s + j * d - pad_left = p: the data gradient's col2im, every element written.
void cm_col2im_cpu(const at::Tensor& gcols, int64_t stride, int64_t dilation, int64_t pad_left,
                   const at::Tensor& grad_h) {
  check_cm(gcols, "gcols", 4);
  check_cm(grad_h, "grad_h", 3);
  const int64_t channels = gcols.size(0), kernel_size = gcols.size(1), batch = gcols.size(2);
  const int64_t l_out = gcols.size(3), length = grad_h.size(2);
  TORCH_CHECK(stride >= 1 && dilation >= 1 && pad_left >= 0, "fastres_ext: bad conv geometry");
  TORCH_CHECK(grad_h.size(0) == channels && grad_h.size(1) == batch,
              "fastres_ext: grad_h must be (C, B, L) for gcols (C, K, B, L_out)");
  TORCH_CHECK(at::get_overlap_status(gcols, grad_h) == at::MemOverlapStatus::No,
              "fastres_ext: grad_h overlaps gcols");
  const float* gp = gcols.data_ptr<float>();
  float* op = grad_h.data_ptr<float>();
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t b = 0; b < batch; ++b) {
        float* dst = op + (c * batch + b) * length;
        std::fill(dst, dst + length, 0.0f);
        for (int64_t j = 0; j < kernel_size; ++j) {
          const int64_t offset = j * dilation - pad_left;
          int64_t first, last;
          tap_span(offset, stride, length, l_out, &first, &last);
          const float* src = gp + ((c * kernel_size + j) * batch + b) * l_out;
          if (stride == 1) {
            float* d = dst + offset;
            for (int64_t t = first; t < last; ++t) d[t] += src[t];
          } else {
            for (int64_t t = first; t < last; ++t) dst[t * stride + offset] += src[t];
          }
        }
      }
    }
  });
}

// The instruction-set level the batch-norm loops run at: "auto" (the best the CPU has, the
// default), "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2) or "baseline"; "" leaves it. Returns
// the level before the call. For tests: a level the CPU lacks is refused.
std::string bn_train_isa(const std::string& level) {
  const std::string before = kIsaNames[isa_level()];
  if (level.empty()) return before;
  if (level == "auto") {
    isa_level() = best_isa_level();
    return before;
  }
  int wanted = -1;
  for (int i = 0; i < 3; ++i)
    if (level == kIsaNames[i]) wanted = i;
  TORCH_CHECK(wanted >= 0, "fastres_ext: unknown instruction-set level '", level,
              "' (auto, x86-64-v4, x86-64-v3 or baseline)");
  TORCH_CHECK(wanted <= best_isa_level(), "fastres_ext: this CPU does not run ", level);
  isa_level() = wanted;
  return before;
}

// Registered beside the fused op's kernels (csrc/ops.cpp) under the same namespace.
TORCH_LIBRARY_FRAGMENT(fastres_ext, m) {
  m.def(
      "nlc_bn_train_forward(Tensor y, int length, Tensor? gamma, Tensor? beta, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float eps, float momentum_factor, "
      "Tensor? residual, Tensor(c!) out, Tensor(d!) mean, Tensor(e!) invstd, bool relu=True) "
      "-> ()");
  m.def(
      "nlc_bn_train_backward(Tensor grad_out, Tensor out, Tensor y, Tensor mean, "
      "Tensor invstd, Tensor? gamma, Tensor(a!) grad_y, Tensor(b!) grad_gamma, "
      "Tensor(c!) grad_beta, Tensor(d!)? grad_residual, bool relu=True) -> ()");
  // the NCL twins: y, out, residual and their gradients (B, C, L)
  m.def(
      "ncl_bn_train_forward(Tensor y, int length, Tensor? gamma, Tensor? beta, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float eps, float momentum_factor, "
      "Tensor? residual, Tensor(c!) out, Tensor(d!) mean, Tensor(e!) invstd, bool relu=True) "
      "-> ()");
  m.def(
      "ncl_bn_train_backward(Tensor grad_out, Tensor out, Tensor y, Tensor mean, "
      "Tensor invstd, Tensor? gamma, Tensor(a!) grad_y, Tensor(b!) grad_gamma, "
      "Tensor(c!) grad_beta, Tensor(d!)? grad_residual, bool relu=True) -> ()");
  m.def("nlc_transpose_last2(Tensor src, Tensor(a!) out) -> ()");
  m.def("cm_im2col(Tensor h, int kernel_size, int stride, int dilation, int pad_left, "
        "Tensor(a!) cols) -> ()");
  m.def("cm_col2im(Tensor gcols, int stride, int dilation, int pad_left, Tensor(a!) grad_h) "
        "-> ()");
  m.def("bn_train_isa(str level) -> str", &bn_train_isa);
}

TORCH_LIBRARY_IMPL(fastres_ext, CPU, m) {
  m.impl("nlc_bn_train_forward", &nlc_bn_train_forward_cpu);
  m.impl("nlc_bn_train_backward", &nlc_bn_train_backward_cpu);
  m.impl("ncl_bn_train_forward", &ncl_bn_train_forward_cpu);
  m.impl("ncl_bn_train_backward", &ncl_bn_train_backward_cpu);
  m.impl("nlc_transpose_last2", &nlc_transpose_last2_cpu);
  m.impl("cm_im2col", &cm_im2col_cpu);
  m.impl("cm_col2im", &cm_col2im_cpu);
}

}  // namespace fastres
