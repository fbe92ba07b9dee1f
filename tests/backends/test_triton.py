"""Triton backend checks the parity grid does not make: several tiles along every axis,
Welford precision, determinism, poisoning, the GPU compile path and the interface.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET);
shapes stay small. Tile limits are shrunk through fastres.backends.triton.tiling so that
small shapes still span several C_out / C_in / L tiles with ragged edges.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastres import _alloc, backends
from fastres.conventions import cudnn_conv_tf32_set
from fastres.parity import Case, check_parity, make_inputs, run_backend
from availability import requires_cuda

reason = backends.unavailable_reason("triton")
pytestmark = pytest.mark.skipif(reason is not None, reason=f"triton backend unavailable: {reason}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide channel tiles, 32-long length tiles, a few wgrad splits, and finalize
    reductions of more than 4 rows in two levels."""
    from fastres.backends.triton import tiling
    monkeypatch.setattr(tiling, "MAX_BLOCK_CO", 16)
    monkeypatch.setattr(tiling, "MAX_BLOCK_CI", 16)
    monkeypatch.setattr(tiling, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(tiling, "MAX_BLOCK_L", 32)
    monkeypatch.setattr(tiling, "MAX_WGRAD_SPLITS", 2)
    monkeypatch.setattr(tiling, "FINALIZE_ROWS", 4)  # > 4 tiles: two-level finalize
    return tiling


# L=70 (dgrad's length) is 3 tiles of 32, the last ragged, and so is L_out=70 (or 35, 24 at
# stride 2, 3); C_out=40 is 3 tiles of 16, C_in=20 is 2; wgrad's (b, l-block) pairs are cut
# into 2 splits.
MULTI_TILE = [
    Case(B=2, C_in=20, C_out=40, L=70, K=3, dilation=2, residual="tensor", norm="train"),
    Case(B=2, C_in=20, C_out=40, L=70, K=4, padding="same", stride=2, norm="eval",
         relu_before_add=True, residual="tensor"),
    Case(B=3, C_in=20, C_out=20, L=70, K=5, dilation=3, residual="identity", norm="none",
         relu_before_add=True),
    Case(B=1, C_in=17, C_out=33, L=70, K=3, padding="same", stride=3, norm="train",
         bias=False, affine=False, momentum=None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MULTI_TILE, ids=str)
def test_multi_tile_parity(small_tiles, case, dtype):
    from fastres.backends.triton import tiling
    block_l = tiling.conv_tiles(case.C_in, case.C_out, case.L)[2]
    assert block_l == 32 and case.L > 2 * block_l and case.L % block_l  # dgrad: 3 L tiles, ragged
    check_parity(case, "triton", dtype, device=DEVICE)


def test_tiles_are_powers_of_two_and_dot_sized():
    # GPU rules the interpreter does not enforce: tl.arange sizes are powers of two and
    # every tl.dot dimension is at least 16, whatever the shape.
    from fastres.backends.triton import tiling
    for c_reduce in (1, 3, 16, 17, 100, 4096):
        for c_tile in (1, 7, 64, 65, 1000):
            for length in (1, 2, 15, 70, 10**6):
                for block in tiling.conv_tiles(c_reduce, c_tile, length):
                    assert block >= 16 and block & (block - 1) == 0
                for block in tiling.elementwise_tiles(c_tile, length):
                    assert block >= 1 and block & (block - 1) == 0


def test_wgrad_split_heuristic_covers_every_pair():
    from fastres.backends.triton import tiling
    for n_pairs in range(1, 40):
        for programs in (1, 3, 17, 600):
            n_splits, per = tiling.wgrad_splits(n_pairs, programs)
            assert 1 <= n_splits <= max(1, tiling.MAX_WGRAD_SPLITS)
            assert (n_splits - 1) * per < n_pairs <= n_splits * per  # no empty split


def test_wgrad_last_split_partly_empty(small_tiles, monkeypatch):
    # B=1, 3 length tiles, 2 splits of 2 pairs: the last split runs one masked-off pair.
    monkeypatch.setattr(small_tiles, "WGRAD_TARGET_PROGRAMS", 10**6)
    assert small_tiles.wgrad_splits(3, 1) == (2, 2)
    check_parity(Case(B=1, C_in=16, C_out=16, L=70, K=1, norm="none"), "triton", torch.float32,
                 device=DEVICE)


@pytest.mark.parametrize("y_float32", [True, False])
def test_train_y_dtype_knob(monkeypatch, y_float32):
    from fastres.backends.triton import tiling
    monkeypatch.setattr(tiling, "TRAIN_Y_FLOAT32", y_float32)
    case = Case(B=2, C_in=4, C_out=8, L=16, residual="tensor", relu_before_add=True)
    # Rounding y to bf16 before normalizing costs accuracy, so the x.dtype variant is only
    # held to a looser bound; both must produce every output and gradient.
    check_parity(case, "triton", torch.bfloat16, device=DEVICE, tol=1e-2 if y_float32 else 5e-2)


def _batch_stats(x, weight, bias):
    from fastres.backends import triton as tb
    K = weight.shape[2]
    _, _, mean, var = tb.forward(x, weight, bias, torch.ones_like(bias, dtype=torch.float32),
                                 torch.zeros_like(bias, dtype=torch.float32), None, None, None,
                                 stride=1, dilation=1, pad_left=K - 1, pad_right=0,
                                 norm="train", eps=1e-5, momentum_factor=0.0,
                                 relu_before_add=False, save_for_backward=False)
    return mean, var


def test_welford_merge_large_mean(small_tiles):
    """|mean| ~ 1e3 against std ~ 1: (count, mean, M2) partials keep the variance; raw
    sum / sum of squares in float32 would not (checked below on the same y)."""
    g = torch.Generator().manual_seed(3)
    B, C_in, C_out, L, K = 3, 8, 24, 70, 3
    x = torch.randn(B, C_in, L, generator=g).to(DEVICE)
    weight = (torch.randn(C_out, C_in, K, generator=g) / (C_in * K) ** 0.5).to(DEVICE)
    bias = (torch.randn(C_out, generator=g) + 1e3).to(DEVICE)  # y's mean ~ 1e3, std ~ 1
    n_tiles = B * small_tiles.cdiv(L, small_tiles.conv_tiles(C_in, C_out, L)[2])
    assert n_tiles > small_tiles.FINALIZE_ROWS  # the two-level merge runs
    mean, var = _batch_stats(x, weight, bias)
    y64 = torch.nn.functional.conv1d(torch.nn.functional.pad(x.double(), (K - 1, 0)),
                                     weight.double(), bias.double())
    var64, mean64 = torch.var_mean(y64, dim=(0, 2), unbiased=False)
    assert (mean64.abs() / var64.sqrt()).min() > 50  # the regime this test is about
    mean_err = ((mean.double() - mean64).abs() / mean64.abs()).max().item()
    var_err = ((var.double() - var64).abs() / var64).max().item()
    print(f"batch mean rel err {mean_err:.2e}, var rel err {var_err:.2e}")
    assert mean_err < 1e-6, mean_err
    assert var_err < 1e-4, var_err
    # The naive formula on the exactly computed y, rounded to float32, misses that bound.
    y32 = y64.float()
    naive = (y32 * y32).mean((0, 2)) - y32.mean((0, 2)) ** 2
    naive_err = ((naive.double() - var64).abs() / var64).max().item()
    print(f"sum/sum-of-squares var rel err {naive_err:.2e}")
    assert naive_err > 100 * var_err and naive_err > 1e-4, (naive_err, var_err)


def _step(case, dtype, seed=0):
    inputs = make_inputs(case, dtype, DEVICE, seed)
    out, grads, rm, rv = run_backend(case, inputs, dtype, "triton")
    return [out, rm, rv] + [grads[k] for k in sorted(grads)]


def test_bitwise_deterministic(small_tiles):
    case = Case(B=2, C_in=20, C_out=40, L=70, K=3, dilation=2, residual="tensor", norm="train")
    first, second = _step(case, torch.float32), _step(case, torch.float32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_poison_fills_nan_and_outputs_are_fully_written(small_tiles):
    with _alloc.poisoned():
        assert torch.isnan(_alloc.empty((4,), dtype=torch.float32, device=DEVICE)).all()
    case = Case(B=2, C_in=20, C_out=40, L=70, K=3, residual="tensor", norm="train",
                relu_before_add=True)
    for tensor in _step(case, torch.bfloat16):  # run_backend poisons every allocation
        assert torch.isfinite(tensor).all()


def test_poison_catches_an_unwritten_tile(small_tiles):
    """Negative control: launch the forward kernel without its last length tile; the
    poisoned output must show NaN exactly there."""
    from fastres.backends.triton import conv_forward, tiling
    B, C_in, C_out, L, K = 1, 16, 16, 70, 3
    x = torch.randn(B, C_in, L, device=DEVICE)
    weight = torch.randn(C_out, C_in, K, device=DEVICE)
    block_ci, block_co, block_l = tiling.conv_tiles(C_in, C_out, L)
    with _alloc.poisoned():
        out = _alloc.empty((B, C_out, L), dtype=x.dtype, device=DEVICE)
    grid = (tiling.cdiv(L, block_l) - 1, 1)  # B = 1: axis 0 is the length tile
    conv_forward.conv_forward_kernel[grid](
        x, weight, x, out, out, out, x, x, x, x, x, x, C_in, C_out, L, L, K, 1, 1, K - 1, 1e-5,
        MODE=conv_forward.MODE_NONE, HAS_BIAS=False, SAVE_Y=False, HAS_RES=False,
        RELU_BEFORE_ADD=False, DOT_PRECISION="ieee", DOT_UPCAST=False,
        BLOCK_CO=block_co, BLOCK_CI=block_ci, BLOCK_L=block_l)
    written = grid[0] * block_l
    assert torch.isfinite(out[..., :written]).all()
    assert torch.isnan(out[..., written:]).all()


def test_interface():
    tb = backends.get("triton")
    assert tb.fused and "cuda" in tb.devices
    assert ("cpu" in tb.devices) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert tb.dtypes == (torch.float32, torch.float16, torch.bfloat16)
    assert "triton" in backends.available_backends()


def _python(code, env_update):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_reason_without_triton():
    # A machine without triton: loading the backend gives a reason, not an ImportError.
    result = _python("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        from fastres import backends
        print(backends.unavailable_reason("triton"))
        print(backends.available_backends())
    """, {})
    assert result.returncode == 0, result.stderr
    reason_line, available = result.stdout.strip().splitlines()
    assert "triton" in reason_line and reason_line != "None"
    assert "triton" not in available


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs these kernels for real")
def test_kernels_compile_for_sm90():
    """CPU twin of the GPU tests: compile every kernel for an H100 (sm_90) without one,
    which checks what the interpreter does not (operand types, constexpr use, what the
    NVIDIA lowering accepts)."""
    result = _python("""
        import sys
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastres.backends.triton import conv_dgrad, conv_forward, conv_wgrad

        def build(fn, types, consts):
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            try:
                src = ASTSource(fn=fn, signature=sig, constexprs={
                    (fn.arg_names.index(n),): v for n, v in consts.items()})
            except TypeError as exc:  # ASTSource's arguments differ across triton versions
                print("ASTSource API differs:", exc)
                sys.exit(3)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

        for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
            p = "*" + dt
            build(conv_forward.conv_forward_kernel,
                  dict(x_ptr=p, w_ptr=p, bias_ptr=p, y_ptr="*fp32", out_ptr=p, res_ptr=p,
                       mean_ptr="*fp32", var_ptr="*fp32", gamma_ptr="*fp32", beta_ptr="*fp32",
                       part_mean_ptr="*fp32", part_m2_ptr="*fp32", eps="fp32"),
                  dict(MODE=2, HAS_BIAS=True, SAVE_Y=False, HAS_RES=True, RELU_BEFORE_ADD=True,
                       DOT_PRECISION=prec, DOT_UPCAST=False, BLOCK_CO=64, BLOCK_CI=32,
                       BLOCK_L=64))
            build(conv_dgrad.conv_dgrad_kernel, dict(grad_y_ptr=p, w_ptr=p, grad_x_ptr=p),
                  dict(DOT_PRECISION=prec, DOT_UPCAST=False, BLOCK_CI=16, BLOCK_CO=16,
                       BLOCK_T=16))
            build(conv_wgrad.conv_wgrad_kernel, dict(grad_y_ptr=p, x_ptr=p, part_ptr="*fp32"),
                  dict(DOT_PRECISION=prec, DOT_UPCAST=False, BLOCK_CO=32, BLOCK_CI=16,
                       BLOCK_L=64))
        from fastres.backends.triton import batch_stats, bn_apply, bn_backward
        f32 = "*fp32"
        build(bn_apply.bn_relu_apply_kernel,
              dict(y_ptr=f32, res_ptr="*bf16", out_ptr="*bf16", y_saved_ptr="*bf16",
                   mean_ptr=f32, var_ptr=f32, gamma_ptr=f32, beta_ptr=f32, eps="fp32"),
              dict(HAS_RES=True, RELU_BEFORE_ADD=True, SAVE_Y=True, BLOCK_C=32, BLOCK_L=64))
        for norm, reduce_bn in ((2, True), (2, False), (0, False)):
            build(bn_backward.relu_bn_backward_kernel,
                  dict(grad_out_ptr="*bf16", out_ptr="*bf16", saved_ptr="*bf16",
                       var_ptr=f32, gamma_ptr=f32, beta_ptr=f32, sum_g_ptr=f32,
                       sum_gxhat_ptr=f32, grad_res_ptr="*bf16", grad_y_ptr="*bf16",
                       part_ptr=f32, n_per_channel="fp32", eps="fp32"),
                  dict(NORM=norm, RELU_BEFORE_ADD=True, WRITE_GRAD_RES=reduce_bn,
                       REDUCE_BN=reduce_bn, WRITE_GRAD_Y=not reduce_bn,
                       REDUCE_GRAD_Y=not reduce_bn, BLOCK_C=32, BLOCK_L=64))
        for counts_given in (False, True):
            build(batch_stats.welford_merge_kernel,
                  dict(part_mean_ptr=f32, part_m2_ptr=f32, part_count_ptr=f32, mean_ptr=f32,
                       m2_ptr=f32, count_ptr=f32),
                  dict(COUNTS_GIVEN=counts_given, FINAL=counts_given, BLOCK_T=64, BLOCK_C=32))
        build(batch_stats.sum_partials_kernel, dict(part_ptr=f32, out_ptr="*bf16"),
              dict(BLOCK_P=32, BLOCK_M=128))
        print("compiled")
    """, {})
    if result.returncode == 3:
        pytest.skip(f"this triton's compile API differs: {result.stdout.strip()}")
    if result.returncode != 0 and "ptxas" in result.stderr:
        pytest.skip(f"no ptxas in this triton install: {result.stderr[-300:]}")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", MULTI_TILE, ids=str)
def test_multi_tile_parity_cuda_default_tiles(case, dtype):
    # The default (large) tiles on the GPU, compiled, with strict fp32 dots.
    with cudnn_conv_tf32_set(False):
        check_parity(case, "triton", dtype, device="cuda")


@requires_cuda
@pytest.mark.parametrize("norm_mode", ["none", "train"])
def test_int64_indexing_cuda(norm_mode):
    """B * C * L over 2**31 elements: offsets computed in int32 would wrap and write the
    wrong rows. Checks the last batch row (forward) against F.conv1d on that row alone."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs ~40 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    from fastres.backends import triton as tb
    C, L, K = 16, 2**20, 3
    B = 2**31 // (C * L) + 1  # 129 rows: the last ones start past 2**31 elements
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, C, L, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = torch.randn(C, C, K, device="cuda", dtype=torch.bfloat16, generator=g) / (C * K) ** 0.5
    gamma = torch.ones(C, device="cuda")
    beta = torch.zeros(C, device="cuda")
    out, _, mean, var = tb.forward(
        x, weight, None, gamma if norm_mode == "train" else None,
        beta if norm_mode == "train" else None, None, None, None, stride=1, dilation=1,
        pad_left=K - 1, pad_right=0, norm=norm_mode, eps=1e-5, momentum_factor=0.0,
        relu_before_add=False, save_for_backward=False)
    last = torch.nn.functional.conv1d(torch.nn.functional.pad(x[-1:].float(), (K - 1, 0)),
                                      weight.float())
    if norm_mode == "train":
        last = (last - mean[:, None]) * torch.rsqrt(var + 1e-5)[:, None]
    expected = torch.relu(last)
    err = ((out[-1:].float() - expected).norm() / expected.norm()).item()
    assert err < 1e-2, err
