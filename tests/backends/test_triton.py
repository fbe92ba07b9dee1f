"""Triton backend checks the parity grid does not make: several tiles along every axis,
Welford precision, determinism, poisoning, the GPU compile path and the interface.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET);
shapes stay small. Tile limits are shrunk through fastres.backends.triton.tiling so that
small shapes still span several C_out / C_in / L tiles with ragged edges.
"""
import dataclasses
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


# L=70 (dgrad's length) is 3 tiles of 32, the last ragged, and so is L_out=70 (or 35, 24 at
# stride 2, 3); C_out=40 is 3 tiles of 16, C_in=20 is 2; wgrad's (b, l-block) pairs are cut
# into 2 splits. L=70 rows are not 16-byte multiples: the masked-pointer path. L=72 rows are:
# the tensor-descriptor (TMA) path, also with ragged tiles (72 = 2 * 32 + 8).
MULTI_TILE = [
    Case(B=2, C_in=20, C_out=40, L=72, K=3, dilation=2, residual="tensor", norm="train"),
    Case(B=2, C_in=20, C_out=40, L=70, K=4, padding="same", stride=2, norm="eval",
         relu_before_add=True, residual="tensor"),
    Case(B=3, C_in=20, C_out=20, L=70, K=5, dilation=3, residual="identity", norm="none",
         relu_before_add=True),
    Case(B=3, C_in=20, C_out=20, L=72, K=5, dilation=3, padding="same", residual="identity",
         norm="eval", relu_before_add=True),
    Case(B=1, C_in=17, C_out=33, L=70, K=3, padding="same", stride=3, norm="train",
         bias=False, affine=False, momentum=None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MULTI_TILE, ids=str)
def test_multi_tile_parity(small_tiles, case, dtype):
    from fastres.backends.triton import operands, tiling
    block_l = tiling.dgrad_config(case.C_in, case.C_out, case.L, dtype).block_n
    assert block_l == 32 and case.L > 2 * block_l and case.L % block_l  # dgrad: 3 L tiles, ragged
    x = torch.empty(case.B, case.C_in, case.L, dtype=dtype)
    assert operands.descriptor_ok(x, case.stride) == (case.L % 8 == 0 and case.stride == 1)
    check_parity(case, "triton", dtype, device=DEVICE)


def test_tma_can_be_switched_off(small_tiles, monkeypatch):
    """FASTRES_TRITON_TMA=0 (tiling.USE_TMA): aligned rows take the masked-pointer path."""
    from fastres.backends.triton import operands
    case = Case(B=2, C_in=16, C_out=16, L=32, K=3, dilation=2, residual="tensor")
    x = torch.empty(case.B, case.C_in, case.L)
    assert operands.descriptor_ok(x)
    monkeypatch.setattr(small_tiles, "USE_TMA", False)
    assert not operands.descriptor_ok(x)
    check_parity(case, "triton", torch.bfloat16, device=DEVICE)


def test_tiles_are_powers_of_two_dot_sized_and_fit_shared_memory():
    # GPU rules the interpreter does not enforce: tl.arange sizes are powers of two, every
    # tl.dot dimension is at least 16, and the pipelined operand buffers fit shared memory.
    from fastres.backends.triton import tiling
    configs = (tiling.forward_config, tiling.dgrad_config, tiling.wgrad_config)
    for dtype in (torch.float32, torch.bfloat16):
        for c_in in (1, 3, 16, 17, 100, 4096):
            for c_out in (1, 7, 64, 65, 1000):
                for length in (1, 2, 15, 70, 10**6):
                    for config in configs:
                        cfg = config(c_in, c_out, length, dtype)
                        for block in (cfg.block_m, cfg.block_n, cfg.block_k):
                            assert block >= 16 and block & (block - 1) == 0
                        assert cfg.block_m * cfg.block_n <= tiling.MAX_ACC
                        assert cfg.smem_bytes(dtype.itemsize) <= tiling.SMEM_BUDGET
                        assert cfg.num_stages >= 2 and cfg.num_warps in (4, 8)
                    for block in tiling.elementwise_tiles(c_out, length):
                        assert block >= 1 and block & (block - 1) == 0


def test_tiles_fit_the_problem():
    """x is read once per forward program column: BLOCK_CO covers all of C_out up to 256."""
    from fastres.backends.triton import tiling
    for C in (64, 128, 256):
        cfg = tiling.forward_config(C, C, 4096, torch.bfloat16)
        assert cfg.block_m == C and cfg.block_n >= 64  # one program column: x read once
    assert tiling.forward_config(64, 64, 4096, torch.bfloat16) != \
        tiling.forward_config(256, 256, 4096, torch.bfloat16)


def test_wgrad_split_heuristic_covers_every_pair():
    from fastres.backends.triton import tiling
    for n_pairs in range(1, 40):
        for programs in (1, 3, 17, 600):
            n_splits, per = tiling.wgrad_splits(n_pairs, programs)
            assert 1 <= n_splits <= max(1, tiling.MAX_WGRAD_SPLITS)
            assert (n_splits - 1) * per < n_pairs <= n_splits * per  # no empty split


@pytest.mark.parametrize("length", [70, 72], ids=["pointers", "tma"])
def test_wgrad_last_split_partly_empty(small_tiles, monkeypatch, length):
    # B=1, 3 length tiles, 2 splits of 2 pairs: the last split runs one pair past the
    # batch, which must read zeros (masks on the pointer path, TMA's zero fill on the other).
    monkeypatch.setattr(small_tiles, "WGRAD_TARGET_PROGRAMS", 10**6)
    assert small_tiles.wgrad_splits(3, 1) == (2, 2)
    check_parity(Case(B=1, C_in=16, C_out=16, L=length, K=1, norm="none"), "triton",
                 torch.float32, device=DEVICE)


def _batch_stats(x, weight, bias):
    from fastres.backends import triton as tb
    K = weight.shape[2]
    _, _, _, mean, var = tb.forward(x, weight, bias, torch.ones_like(bias, dtype=torch.float32),
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
    n_tiles = B * small_tiles.cdiv(L, small_tiles.forward_config(C_in, C_out, L,
                                                                 torch.float32).block_n)
    assert n_tiles > 2 * small_tiles.FINALIZE_GROUP  # both merge levels see several rows
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



# Two weights per output channel: training batch norm keeps the weight gradient orthogonal to
# the weight, so only one direction is left, and bf16 rounding of grad_y showed in it magnified
# (this draw: 7.2e-3 with a bf16 grad_y, 1.7e-2 at worst over 1000 simulated draws).
TWO_WEIGHTS = Case(B=4, C_in=1, C_out=32, L=5, K=2, stride=2, padding="same",
                   residual="tensor", norm="train")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_gradient_of_few_weights_per_channel_is_not_magnified(dtype, fresh_seed):
    """At C_in * K <= FLOAT32_WGRAD_MAX_WEIGHTS the weight gradient of 16-bit training runs
    from a float32 grad_y: within 2.5 units of the dtype's rounding (bf16 2^-9, fp16 2^-12)
    of the float64 reference (at most 1.63 over 300 draws), on a draw that reached 3.7 units
    with a 16-bit grad_y, and on fresh ones."""
    from fastres.backends.triton import FLOAT32_WGRAD_MAX_WEIGHTS
    from fastres.parity import parity_errors
    assert TWO_WEIGHTS.C_in * TWO_WEIGHTS.K <= FLOAT32_WGRAD_MAX_WEIGHTS
    bound = 2.5 * (2.0 ** -9 if dtype == torch.bfloat16 else 2.0 ** -12)
    for seed in (1073, fresh_seed, fresh_seed + 1, fresh_seed + 2):
        err = parity_errors(TWO_WEIGHTS, "triton", dtype, DEVICE, seed)["grad_weight"]
        assert err < bound, f"seed {seed}: grad_weight {err:.2e} over {bound:.2e}"


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
    from fastres.backends.triton import conv_forward, operands, tiling
    B, C_in, C_out, L, K = 1, 16, 16, 70, 3
    x = torch.randn(B, C_in, L, device=DEVICE)
    taps = operands.tap_major_weight(torch.randn(C_out, C_in, K, device=DEVICE))
    cfg = tiling.forward_config(C_in, C_out, L, x.dtype)
    block_l = cfg.block_n
    with _alloc.poisoned():
        out = _alloc.empty((B, C_out, L), dtype=x.dtype, device=DEVICE)
    grid = (tiling.cdiv(L, block_l) - 1, 1)  # B = 1: axis 0 is the length tile
    conv_forward.conv_forward_kernel[grid](
        x, taps, x, out, out, out, out, x, x, x, x, x, x, x, x, x, x, x, x, 0.0, x,
        C_in, C_out, L, L, K, 1, 1, K - 1, 1e-5,
        taps.shape[2], taps.shape[1], MODE=conv_forward.MODE_NONE.value, HAS_BIAS=False,
        SAVE_Y=False, HAS_RES=False, RELU_BEFORE_ADD=False, DOT_PRECISION="ieee",
        DOT_UPCAST=False, TMA=False, BLOCK_CO=cfg.block_m, BLOCK_CI=cfg.block_k,
        BLOCK_L=block_l)
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


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", MULTI_TILE, ids=str)
def test_multi_tile_parity_cuda_default_tiles(case, dtype):
    # The default (large) tiles on the GPU, compiled, with strict fp32 dots (set through
    # the API nn.Conv1d reads on this torch: the legacy flag raises on torch >= 2.9).
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
    out, _, _, mean, var = tb.forward(
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


def _stage_backward(dtype, residual, out_override=None, seed=0, bits=True, L=40, **extra):
    """Triton forward + backward of one training stage; backward may get another `out`,
    (bits=False) not the mask bits forward saved, and `extra` keywords."""
    from fastres.backends import triton as tb
    g = torch.Generator().manual_seed(seed)
    B, C, K = 2, 16, 3
    x = torch.randn(B, C, L, generator=g).to(DEVICE, dtype)
    w = (torch.randn(C, C, K, generator=g) / (C * K) ** 0.5).to(DEVICE, dtype)
    gamma = (torch.rand(C, generator=g) + 0.5).to(DEVICE)
    beta = (torch.randn(C, generator=g) * 0.5).to(DEVICE)
    res = torch.randn(B, C, L, generator=g).to(DEVICE, dtype) if residual else None
    geometry = dict(stride=1, dilation=1, pad_left=K - 1, pad_right=0, norm="train", eps=1e-5,
                    relu_before_add=False)
    out, saved, mask_bits, _, var = tb.forward(x, w, None, gamma, beta, None, None, res,
                                    momentum_factor=0.0, save_for_backward=True, **geometry)
    grad_out = torch.randn(B, C, L, generator=g).to(DEVICE, dtype)
    out_seen = out if out_override is None else out_override(out)
    return tb.backward(grad_out, x, w, gamma, beta, saved, out_seen, var, has_bias=False,
                       has_residual=residual, mask_bits=mask_bits if bits else None,
                       **geometry, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_without_residual_takes_the_mask_from_xhat(dtype):
    """Backward never reads out: without a residual it recomputes out's sign from the saved
    x-hat (float32, or the float16 x-hat 16-bit training normalizes with), with one it
    reads the mask bits forward saved; zeros in place of out change nothing. Negative
    control: with a residual and no bits it must read out, and the zeros change the
    gradients."""
    def zeros(out):
        return torch.zeros_like(out)
    for residual, bits, same in ((False, True, True), (True, True, True), (True, False, False)):
        grads = _stage_backward(dtype, residual, seed=3, bits=bits)
        blind = _stage_backward(dtype, residual, zeros, seed=3, bits=bits)
        equal = all(torch.equal(a, b) for a, b in zip(grads, blind) if a is not None)
        assert equal == same, (dtype, residual, bits)


def unpack_mask_bits(bits, length):
    """torch twin of mask_bits.load_bits: (B, C, cdiv(L, 8)) uint8 -> (B, C, L) bool."""
    shifts = torch.arange(8, device=bits.device)
    unpacked = (bits.long()[..., None] >> shifts) & 1
    return unpacked.flatten(-2)[..., :length].bool(), unpacked.flatten(-2)[..., length:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["train", "eval", "none"])
def test_mask_bits_are_the_stored_outputs_sign(dtype, norm):
    """With a residual, forward saves one bit an element, set exactly where out is not <= 0
    (NaN included: its gradient passes, as torch.relu's backward passes it); ragged L
    (45: the last byte half used, zeros past L) and several length tiles."""
    from fastres.backends import triton as tb
    g = torch.Generator().manual_seed(5)
    B, C, L, K = 2, 16, 45, 3
    x = torch.randn(B, C, L, generator=g).to(DEVICE, dtype)
    x[1, :, 7] = float("nan")  # NaN outputs at positions 7.. of row 1 (causal, K=3)
    w = (torch.randn(C, C, K, generator=g) / (C * K) ** 0.5).to(DEVICE, dtype)
    res = torch.randn(B, C, L, generator=g).to(DEVICE, dtype)
    stats = None if norm == "train" else torch.zeros(C, device=DEVICE)
    params = (None, None) if norm == "none" else (torch.ones(C, device=DEVICE),
                                                  torch.zeros(C, device=DEVICE))
    out, _, mask_bits, _, _ = tb.forward(
        x, w, None, *params, stats, None if stats is None else torch.ones(C, device=DEVICE),
        res, stride=1, dilation=1, pad_left=K - 1, pad_right=0, norm=norm, eps=1e-5,
        momentum_factor=0.0, relu_before_add=False, save_for_backward=True)
    assert mask_bits.dtype == torch.uint8 and mask_bits.shape == (B, C, 6)
    keep, past_end = unpack_mask_bits(mask_bits, L)
    assert torch.equal(keep, ~(out <= 0))
    assert out.isnan().any() and keep[out.isnan()].all()
    assert (past_end == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_residual_gradient_changes_nothing_else(dtype):
    """defer_grad_residual (ops.ResidualGradLink, stage 2): no grad_residual, and every
    other gradient bit for bit the one computed with it (pass 2 reads grad_out under the
    bits instead of grad_residual: the same values). Without bits or a residual there is
    nothing to defer from: a clear error."""
    for L in (40, 45):
        kept = _stage_backward(dtype, True, seed=L, L=L)
        deferred = _stage_backward(dtype, True, seed=L, L=L, defer_grad_residual=True)
        assert kept[5] is not None and deferred[5] is None
        for a, b in zip(kept[:5], deferred[:5]):
            assert (a is None and b is None) or torch.equal(a, b)
    for residual, bits in ((True, False), (False, True)):
        with pytest.raises(ValueError, match="defer_grad_residual"):
            _stage_backward(dtype, residual, bits=bits, defer_grad_residual=True)
    assert backends.get("triton").adds_grad_x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dgrad_adds_the_addend_under_its_bits(dtype):
    """grad_x_addend with grad_x_addend_bits: the data-gradient kernel adds the addend
    where the bits are set and nothing elsewhere (NaN there included), bit for bit as the
    addend masked beforehand; ragged L (45) and several length tiles."""
    L = 45
    g = torch.Generator().manual_seed(17)
    addend = torch.randn(2, 16, L, generator=g).to(DEVICE, dtype)
    bits = torch.randint(0, 256, (2, 16, 6), generator=g, dtype=torch.uint8).to(DEVICE)
    bits[..., -1] &= 0x1F  # nothing past L
    keep, _ = unpack_mask_bits(bits, L)
    addend[~keep] = float("nan")
    masked = torch.where(keep, addend, 0)
    plain = _stage_backward(dtype, False, seed=4, L=L)[0]
    with_bits = _stage_backward(dtype, False, seed=4, L=L, grad_x_addend=addend,
                                grad_x_addend_bits=bits)[0]
    premasked = _stage_backward(dtype, False, seed=4, L=L, grad_x_addend=masked)[0]
    assert torch.isfinite(with_bits.float()).all()
    assert torch.equal(with_bits, premasked)
    assert not torch.equal(with_bits, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_saves_float16_xhat_and_the_mask_as_bits(dtype):
    """16-bit training saves x-hat in float16 (half the bytes of float32) for batch norm's
    gradient, but out comes from the float32 x-hat (out is not relu(saved * gamma + beta)
    everywhere: that would flip masks) and its mask is saved as bits, exactly out's sign.
    relu_before_add and few weights per channel keep a float32 x-hat."""
    from fastres.backends import triton as tb
    g = torch.Generator().manual_seed(11)
    B, C, L, K = 2, 16, 40, 3
    x = torch.randn(B, C, L, generator=g).to(DEVICE, dtype)
    w = (torch.randn(C, C, K, generator=g) / (C * K) ** 0.5).to(DEVICE, dtype)
    gamma = (torch.rand(C, generator=g) + 0.5).to(DEVICE)
    beta = (torch.randn(C, generator=g) * 0.5).to(DEVICE)
    out, saved, mask_bits, mean, var = tb.forward(
        x, w, None, gamma, beta, None, None, None, stride=1, dilation=1, pad_left=K - 1,
        pad_right=0, norm="train", eps=1e-5, momentum_factor=0.0, relu_before_add=False,
        save_for_backward=True)
    assert saved.dtype == torch.float16 == tb.saved_dtype(dtype, "train", False, C * K)
    assert tb.saved_dtype(dtype, "train", False, 4) == torch.float32
    assert tb.saved_dtype(dtype, "train", True, C * K) == torch.float32
    keep, _ = unpack_mask_bits(mask_bits, L)
    assert torch.equal(keep, ~(out <= 0))
    # out is the float32 normalization's, to out's own rounding ...
    y = torch.nn.functional.conv1d(torch.nn.functional.pad(x.double(), (K - 1, 0)), w.double())
    ref = (y - y.mean((0, 2), keepdim=True)) / (y.var((0, 2), unbiased=False, keepdim=True)
                                                 + 1e-5).sqrt()
    expected = torch.relu(ref * gamma.double()[:, None] + beta.double()[:, None])
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
    # ... and x-hat itself is the batch normalization, to float16's rounding.
    assert ((saved.double() - ref).norm() / ref.norm()).item() < 1e-3


@pytest.mark.parametrize("residual", ["none", "tensor"])
def test_float16_xhat_flips_no_masks(residual, fresh_seed):
    """The float16 x-hat costs fp16 training nothing beyond fp16's rounding. A mask taken
    from the rounded x-hat (recomputed from it, or out computed from it) flips wherever
    |z| is below x-hat's rounding, about 1e-4 of the elements at this size, each a whole
    gradient value: 8e-3 in grad_x and grad_residual, where fp16 rounding gives 3e-4.
    fastres check's train+res,big case, fresh draws."""
    from fastres import parity
    case = dataclasses.replace(parity.CHECK_CASES["train+res,big"], residual=residual)
    errors = parity.parity_errors(case, "triton", torch.float16, DEVICE, fresh_seed)
    assert errors["grad_x"] < 1e-3 and errors["grad_weight"] < 1e-3, errors
    if residual != "none":
        assert errors["grad_residual"] < 1e-4, errors


def test_mask_from_xhat_rounds_like_the_stored_output():
    """A positive float32 z that rounds to zero in fp16 (1e-8 < fp16's smallest subnormal)
    is a zero output, so its gradient is masked, as a read of out would mask it."""
    from fastres.backends import triton as tb
    B, C, L, K = 1, 4, 32, 1
    xhat = torch.tensor([1e-8, 1.0, -1.0, 3e-8]).repeat(B, C, L // 4).reshape(B, C, L)
    gamma, beta = torch.ones(C), torch.zeros(C)
    out = torch.relu(xhat * gamma[:, None] + beta[:, None]).half()
    assert (out[..., 0] == 0).all() and (xhat[..., 0] > 0).all()
    grad_out = torch.ones(B, C, L, dtype=torch.half)
    x = torch.zeros(B, C, L, dtype=torch.half)
    w = torch.zeros(C, C, K, dtype=torch.half)
    grads = tb.backward(grad_out, x, w, gamma, beta, xhat.float(), out, torch.ones(C),
                        has_bias=False, has_residual=False, stride=1, dilation=1, pad_left=0,
                        pad_right=0, norm="train", eps=0.0, relu_before_add=False)
    grad_beta = grads[4]
    assert torch.equal(grad_beta, (grad_out.float() * (out > 0)).sum((0, 2)))  # L/4 each
