"""The CUDA kernels of fastres._C (csrc/cuda): registered wherever they were built, and on a
GPU right on what the parity grid's tiny shapes do not reach.

test_backend_parity.py's test_grid_cuda runs the cuda backend over the whole grid (float32
with TF32 and strict, bfloat16, float16). These add rows cut into several segments, every
vector width, a misaligned operand, stride > 1, cuDNN switched off, the forward-only 16-bit
conv, the TF32 setting, bitwise determinism and 64-bit offsets. Without a GPU they skip; their
CPU twins check what can be checked here (the kernels are built and registered, and the
backend reports itself unavailable: tests/backends/test_cpp_ext.py).
"""
import importlib.util
import os
import re
import sys

import pytest
import torch

import fastres
from fastres import backends
from fastres.conventions import cudnn_conv_tf32_set, rel_err
from fastres.parity import TF32_TOLERANCE, Case, check_parity, make_inputs, run_backend
from fastres.reference import conv_bn_relu_reference

EXT_REASON = backends.unavailable_reason("cpp")  # the extension itself (any device)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _compiled_with_cuda():
    return EXT_REASON is None and torch.ops.fastres_ext.compiled_with_cuda()


@pytest.mark.skipif(EXT_REASON is not None, reason=f"fastres._C does not load: {EXT_REASON}")
def test_cuda_kernels_are_registered_exactly_when_built():
    # The CPU twin of everything below: a build with CUDA kernels registers them with the
    # dispatcher for CUDA tensors (so a GPU machine reaches csrc/cuda), one without does not.
    with_cuda = _compiled_with_cuda()
    for op in ("fastres_ext::forward", "fastres_ext::backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == with_cuda


def _sass_tool():
    """benchmarks/cuda_sass.py, the script that prints the same report."""
    spec = importlib.util.spec_from_file_location(
        "cuda_sass", os.path.join(REPO, "benchmarks", "cuda_sass.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not _compiled_with_cuda(),
                    reason="fastres._C has no CUDA kernels here (built without nvcc)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiled_kernels_never_spill_and_move_16_bytes(arch):
    # The machine code itself, read from the built extension: no kernel spills to local
    # memory, and the widest instantiation of every elementwise kernel (8 values of 16 bits
    # or 4 of 32 per access) loads, and where it writes stores, 16 bytes per instruction.
    sass = _sass_tool()
    tool = sass.find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's copy) to read the kernels with")
    found = sass.kernels(sass.extension_path(), arch, tool)
    if not found:
        pytest.skip(f"fastres._C was built without {arch} (TORCH_CUDA_ARCH_LIST)")
    families = {k.name.split("<")[0] for k in found}
    assert families == {"batch_stats_partials_kernel", "batch_stats_finalize_kernel",
                        "bn_relu_apply_kernel", "bn_relu_grad_kernel", "channel_sums_kernel"}
    for k in found:
        assert k.stack == 0 and k.local == 0 and k.local_accesses == 0, k
        assert 0 < k.registers <= 64, k  # 4+ blocks of 256 threads per SM
        width = re.search(r", (\d+)>$|<(\d+)>$", k.name)
        if k.name.split("<")[0] in ("batch_stats_finalize_kernel", "channel_sums_kernel"):
            continue
        values = int(width.group(1) or width.group(2))
        value_bytes = 4 if k.name.startswith(("bn_relu_apply_kernel<float",
                                              "bn_relu_grad_kernel<float",
                                              "batch_stats_partials_kernel")) else 2
        if values * value_bytes == 16:
            assert k.loads.get(16, 0) >= 1, k
            if not k.name.startswith("batch_stats_partials_kernel"):
                assert k.stores.get(16, 0) >= 1, k


requires_cuda_ext = pytest.mark.skipif(
    not torch.cuda.is_available() or not _compiled_with_cuda(),
    reason="needs a CUDA GPU and fastres._C built with its CUDA kernels (CPU twin: "
           "test_cuda_kernels_are_registered_exactly_when_built)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Rows of L_out > 8192 values span two segments of 256 threads x 8 values x 4 steps. The
# conv output's row stride L_full decides the vector width: L + 2 (causal, K=3, d=1) gives
# 2 values, L + 8 (d=4) 8, an odd length 1.
SEGMENT_CASES = [
    Case(B=2, C_in=8, C_out=16, L=9000, K=3, dilation=1, residual="tensor"),
    Case(B=2, C_in=8, C_out=8, L=8200, K=3, dilation=4, residual="identity",
         relu_before_add=True),
    Case(B=3, C_in=4, C_out=6, L=8193, K=2, dilation=3, padding="same", norm="eval",
         residual="tensor"),  # odd "same" total: the kept outputs start one later
    Case(B=2, C_in=8, C_out=8, L=9001, K=5, stride=2, padding="same"),  # dgrad via a copy
    Case(B=1, C_in=4, C_out=4, L=300, K=3, dilation=200, norm="none", relu_before_add=True,
         residual="tensor"),  # receptive field longer than the sequence
    Case(B=4, C_in=16, C_out=16, L=64, K=3, dilation=2, bias=False, affine=False,
         momentum=None),  # short rows: one warp per row
]


def _strict_fp32():
    return cudnn_conv_tf32_set(False)


@requires_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=str)
def test_segments_and_vector_widths(case, dtype):
    with _strict_fp32():
        check_parity(case, "cuda", dtype, device="cuda", seed=case.L)


@requires_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_cudnn(dtype):
    # ATen's own convs forward, and the data gradient through at::convolution_backward.
    case = Case(B=2, C_in=8, C_out=8, L=600, K=3, dilation=2, residual="identity")
    with torch.backends.cudnn.flags(enabled=False), _strict_fp32():
        check_parity(case, "cuda", dtype, device="cuda", seed=5)


def _outputs(case, dtype, seed=0, grad_out=None):
    """Output, running statistics and every gradient of one cuda-backend call, in order."""
    inputs = make_inputs(case, dtype, "cuda", seed)
    if grad_out is not None:
        inputs["grad_out"] = grad_out
    out, grads, rm, rv = run_backend(case, inputs, dtype, "cuda")
    return [out, rm, rv] + [grads[k] for k in sorted(grads)]


DETERMINISM_CASE = Case(B=3, C_in=16, C_out=24, L=9000, K=3, dilation=4, residual="tensor")


@requires_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype):
    # Every reduction of the kernels runs in a fixed order; cuDNN too once it is told to be
    # deterministic (as for nn.Conv1d).
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        first, second = _outputs(DETERMINISM_CASE, dtype), _outputs(DETERMINISM_CASE, dtype)
    for a, b in zip(first, second):
        assert a is None and b is None or torch.equal(a, b)


@requires_cuda_ext
def test_results_do_not_depend_on_the_vector_width():
    # A grad_out one element off 16-byte alignment makes the backward kernels load one value
    # at a time; which values each thread sums must not change, so the results are bitwise
    # those of the aligned call.
    case, dtype = DETERMINISM_CASE, torch.bfloat16
    aligned = make_inputs(case, dtype, "cuda", seed=1)["grad_out"].to(dtype)
    buffer = torch.empty(aligned.numel() + 1, dtype=aligned.dtype, device="cuda")
    shifted = buffer[1:].view(aligned.shape).copy_(aligned)
    assert shifted.data_ptr() % 16 != 0
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        expected = _outputs(case, dtype, seed=1, grad_out=aligned)
        got = _outputs(case, dtype, seed=1, grad_out=shifted)
    for a, b in zip(expected, got):
        assert a is None and b is None or torch.equal(a, b)


@requires_cuda_ext
@pytest.mark.parametrize("tf32", [False, True], ids=["strict", "tf32"])
def test_follows_the_tf32_setting(tf32):
    # C_in * K = 768 products per output: TF32 convs are off by ~1e-4, strict float32 ones
    # by ~1e-7. Passing the strict bound proves strict mode is honoured.
    case = Case(B=2, C_in=256, C_out=64, L=512, K=3, dilation=2, residual="tensor")
    with cudnn_conv_tf32_set(tf32):
        check_parity(case, "cuda", torch.float32, device="cuda",
                     tol=TF32_TOLERANCE if tf32 else None)


FORWARD_ONLY_CASES = [
    Case(B=2, C_in=16, C_out=16, L=2000, K=3, dilation=4, norm="eval", residual="identity"),
    Case(B=2, C_in=16, C_out=32, L=2001, K=4, padding="same", norm="eval", residual="tensor",
         relu_before_add=True),
    Case(B=2, C_in=16, C_out=16, L=2000, K=3, norm="none", relu_before_add=True,
         residual="tensor"),
]


@requires_cuda_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", FORWARD_ONLY_CASES, ids=str)
def test_forward_only_16bit_conv(case, dtype):
    # With no backward to follow (eval or no batch norm, under no_grad) 16-bit convs run
    # natively and round their output once; the output stays within the 16-bit bound.
    inputs = make_inputs(case, dtype, "cuda", seed=7)
    args = {k: v for k, v in inputs.items() if k != "grad_out"}
    x = args["x"].to(dtype)
    residual = {"identity": x, "tensor": args.get("residual", x).to(dtype)}.get(case.residual)
    call = dict(training=False, padding=case.padding, dilation=case.dilation,
                relu_before_add=case.relu_before_add, residual=residual,
                norm=None if case.norm == "none" else "batch")
    stats = [args.get(k) for k in ("running_mean", "running_var", "bn_weight", "bn_bias")]
    with torch.no_grad(), fastres.use_backend("cuda"):
        out = fastres.conv_bn_relu(x, args["weight"].to(dtype), args["bias"].to(dtype),
                                   *[None if s is None else s.float() for s in stats], **call)
    call["residual"] = None if residual is None else residual.double()
    expected = conv_bn_relu_reference(x.double(), args["weight"], args["bias"], *stats, **call)
    assert out.dtype == dtype
    assert rel_err(out, expected) < 1e-2


@requires_cuda_ext
def test_offsets_past_2_to_the_31():
    """B * C_out * L_out > 2**31: row offsets in int32 would wrap. The last channels, whose
    rows start past 2**31 elements, must match the same channels computed on their own
    (forward, running statistics and every per-channel gradient)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 32 * 2**30:
        pytest.skip(f"needs ~32 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    C, L, dtype = 2**15, 2**16 + 1, torch.bfloat16
    assert C * L > 2**31 and (C - 1) * L > 2**31  # the last row starts past it
    g = torch.Generator(device="cuda").manual_seed(0)
    new = lambda *s, scale=1.0, shift=0.0, dtype=torch.float32: (  # noqa: E731
        torch.randn(*s, device="cuda", generator=g, dtype=dtype) * scale + shift)
    x = new(1, 1, L, dtype=dtype)
    weight = new(C, 1, 3, scale=3 ** -0.5).to(dtype)
    bias = new(C, scale=0.5).to(dtype)
    gamma, beta = new(C, scale=0.1, shift=1.0), new(C, scale=0.3)
    running_mean, running_var = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    params = [weight, bias, gamma, beta]
    for p in params:
        p.requires_grad_(True)
    with fastres.use_backend("cuda"):
        out = fastres.conv_bn_relu(x, weight, bias, running_mean, running_var, gamma, beta,
                                   training=True, padding="causal")
    grad_out = new(*out.shape, dtype=dtype)
    grads = torch.autograd.grad(out, params, grad_out)

    picked = torch.tensor([0, C - 2, C - 1], device="cuda")
    sub = [p.detach()[picked].double().requires_grad_(True) for p in params]
    sub_rm, sub_rv = torch.zeros(3, device="cuda").double(), torch.ones(3, device="cuda").double()
    expected = conv_bn_relu_reference(x.double(), sub[0], sub[1], sub_rm, sub_rv, sub[2], sub[3],
                                      training=True, padding="causal")
    expected_grads = torch.autograd.grad(expected, sub, grad_out[:, picked].double())
    assert rel_err(out[:, picked], expected) < 1e-2
    assert rel_err(running_mean[picked], sub_rm) < 1e-2
    assert rel_err(running_var[picked], sub_rv) < 1e-2
    for name, got, want in zip(("weight", "bias", "gamma", "beta"), grads, expected_grads):
        scale = grad_out[:, picked].double().abs().sum((0, 2)).norm().item() \
            if name == "bias" else None  # zero in exact arithmetic under training BN
        assert rel_err(got[picked], want, scale) < 1e-2, name
