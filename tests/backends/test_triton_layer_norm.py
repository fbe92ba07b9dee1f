"""Layer norm over channels on the Triton backend (docs/spec.md, "Layer norm"): fused where
one program's tile holds every channel of its positions (C_out up to
tiling.LAYER_NORM_MAX_CHANNELS), refused with a reason above, so the dispatcher runs it
plain there.

tests/backends/test_backend_parity.py's LAYER_GRID runs the kernels at the default tiles;
here the tiles are shrunk so that small shapes span several length tiles with ragged
edges and several finalize groups, on both operand paths (TMA and masked pointers). On
CPU the kernels run in Triton's interpreter (tests/conftest.py): shapes stay small.
"""
import pytest
import torch
import torch.nn.functional as F

from fastres import _alloc, backends
from fastres.dispatch.op import candidates
from fastres.parity import Case, check_parity, make_inputs, run_backend

reason = backends.unavailable_reason("triton")
pytestmark = pytest.mark.skipif(reason is not None, reason=f"triton backend unavailable: {reason}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# L_out = 70, 72 or 35: 3 or 2 length tiles of 32, the last ragged (forward and backward);
# C_out = 40 fills 40 of a 64-row tile (the padding rows must stay out of the statistics).
# L = 72 rows are 16-byte multiples (the TMA path), L = 70 and stride 2 are not (pointers).
LAYER_MULTI_TILE = [
    Case(B=2, C_in=20, C_out=40, L=72, K=3, dilation=2, residual="tensor", norm="layer"),
    Case(B=2, C_in=20, C_out=20, L=70, K=5, dilation=3, residual="identity", norm="layer",
         relu_before_add=True, activation="gelu"),
    Case(B=3, C_in=17, C_out=40, L=70, K=4, padding="same", stride=2, norm="layer",
         bias=False, affine=False, activation="leaky_relu:0.2"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LAYER_MULTI_TILE, ids=str)
def test_layer_norm_multi_tile_parity(small_tiles, case, dtype, fresh_seed):
    """Output and every gradient within the spec's bound of the float64 reference, fresh
    inputs, outputs poisoned (parity.check_parity); forced onto Triton, which raises if the
    backend refused the call."""
    from fastres.backends.triton import operands
    n_tiles = case.B * small_tiles.cdiv(case.L_out, small_tiles.MAX_BLOCK_L)
    assert case.L_out > small_tiles.MAX_BLOCK_L and case.L_out % small_tiles.MAX_BLOCK_L
    assert n_tiles > 2 * small_tiles.FINALIZE_GROUP  # both finalize levels see several rows
    x = torch.empty(case.B, case.C_in, case.L, dtype=dtype)
    assert operands.descriptor_ok(x, case.stride) == (case.L % 8 == 0 and case.stride == 1)
    check_parity(case, "triton", dtype, device=DEVICE, seed=fresh_seed)


def test_layer_norm_statistics_are_per_position(small_tiles, fresh_seed):
    """forward returns each position's mean and biased variance over the channels, (B,
    L_out), poisoned before the kernel writes them; backward reads that variance."""
    from fastres.backends import triton as tb
    case = Case(B=2, C_in=5, C_out=24, L=70, K=3, dilation=2, norm="layer")
    inputs = make_inputs(case, torch.float32, DEVICE, fresh_seed)
    x, w, bias = (inputs[k].float() for k in ("x", "weight", "bias"))
    with _alloc.poisoned():
        out, saved, _, mean, var = tb.forward(
            x, w, bias, inputs["bn_weight"].float(), inputs["bn_bias"].float(), None, None,
            None, stride=1, dilation=2, pad_left=4, pad_right=0, norm="layer", eps=1e-5,
            momentum_factor=0.0, relu_before_add=False, save_for_backward=True)
    y = F.conv1d(F.pad(inputs["x"], (4, 0)), inputs["weight"], inputs["bias"], dilation=2)
    var64, mean64 = torch.var_mean(y, dim=1, unbiased=False)
    assert mean.shape == var.shape == (case.B, case.L_out)
    assert ((mean.double() - mean64).norm() / mean64.norm()).item() < 1e-5
    assert ((var.double() - var64).norm() / var64.norm()).item() < 1e-5
    xhat = (y - mean64[:, None]) / (var64[:, None] + 1e-5).sqrt()
    assert ((saved.double() - xhat).norm() / xhat.norm()).item() < 1e-5


def test_layer_norm_propagates_nan_as_the_reference(fresh_seed):
    """A NaN in x: the output is NaN exactly where the reference's is (the whole position,
    through its mean), and every gradient the reference has a NaN in has one too."""
    from fastres.parity import nonfinite_errors
    for case in (Case(norm="layer", residual="tensor"),
                 Case(C_in=8, norm="layer", residual="identity", relu_before_add=True,
                      activation="gelu")):
        errors = nonfinite_errors(case, "triton", torch.float32, DEVICE, fresh_seed)
        assert not any(errors.values()), (case, errors)


def test_layer_norm_tiles_hold_every_channel():
    """Every layer-norm tile covers C_out up to the bound, on every path a call can take:
    the heuristic, its tuning candidates (tuning.py may pick any), the masked-pointer
    tiles and the backward pass; GPU rules as for the other tiles (powers of two, tl.dot
    sizes, the accumulator and shared-memory budgets)."""
    from fastres.backends.triton import tiling
    bound = tiling.LAYER_NORM_MAX_CHANNELS
    for dtype in (torch.float32, torch.bfloat16):
        for c_out in (1, 7, 40, 64, 65, bound - 1, bound):
            for length in (1, 70, 4096):
                cfg = tiling.layer_norm_forward_config(64, c_out, length, dtype)
                configs = tiling.candidate_configs(cfg, c_out, length, dtype) \
                    + [tiling.pointer_config(cfg, all_rows=True)]
                for c in configs:
                    assert c.block_m >= c_out
                    for block in (c.block_m, c.block_n, c.block_k):
                        assert block >= tiling.MIN_DOT and block & (block - 1) == 0
                    assert c.block_m * c.block_n <= tiling.MAX_ACC
                    assert c.smem_bytes(dtype.itemsize) <= tiling.SMEM_BUDGET
                block_c, block_l = tiling.layer_norm_backward_tiles(c_out, length)
                assert block_c >= c_out and block_c & (block_c - 1) == 0
                assert block_l >= 16 and block_l & (block_l - 1) == 0
                assert block_c * block_l <= max(tiling.LAYER_NORM_BACKWARD_TILE, 16 * block_c)


def test_layer_norm_refused_above_the_channel_bound(monkeypatch, fresh_seed):
    """Above tiling.LAYER_NORM_MAX_CHANNELS the backend says why in supports() (the
    dispatcher then leaves it out), forcing it raises that reason, and its kernels refuse
    the call rather than normalize a partial tile; the plain stage runs it instead,
    where the dispatcher leaves Triton out."""
    from fastres.backends import triton as tb
    from fastres.backends.triton import tiling
    monkeypatch.setattr(tiling, "LAYER_NORM_MAX_CHANNELS", 16)
    case = Case(B=2, C_in=3, C_out=20, L=16, K=3, norm="layer", residual="tensor")
    call = backends.Call(DEVICE, torch.float32, case.B, case.C_in, case.C_out, case.L, case.K,
                         1, 1, 2, 0, "layer", True, True, False, True)
    triton_backend = backends.get("triton")
    refusal = triton_backend.supports(call)
    assert refusal is not None and "C_out 20 > 16" in refusal \
        and "LAYER_NORM_MAX_CHANNELS" in refusal
    assert triton_backend.supports(call.__class__(**{**call.__dict__, "c_out": 16})) is None
    assert triton_backend.supports(call.__class__(**{**call.__dict__, "norm": "train"})) is None
    inputs = make_inputs(case, torch.float32, DEVICE, fresh_seed)
    with pytest.raises(RuntimeError, match="LAYER_NORM_MAX_CHANNELS"):
        run_backend(case, inputs, torch.float32, "triton")
    x = torch.randn(2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="LAYER_NORM_MAX_CHANNELS"):
        tb.forward(x, torch.randn(20, 3, 3, device=DEVICE), None, torch.ones(20),
                   torch.zeros(20), None, None, None, stride=1, dilation=1, pad_left=2,
                   pad_right=0, norm="layer", eps=1e-5, momentum_factor=0.0,
                   relu_before_add=False, save_for_backward=False)
    # Plain where not fused: on a GPU the dispatcher's candidates for the call lose Triton
    # (eager, the plain stage, always stays one).
    gpu_call = call.__class__(**{**call.__dict__, "device": "cuda:0"})
    assert "triton" not in candidates(gpu_call) and "eager" in candidates(gpu_call)
    assert "triton" in candidates(gpu_call.__class__(**{**gpu_call.__dict__, "c_out": 16}))
