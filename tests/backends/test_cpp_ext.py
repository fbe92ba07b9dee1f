"""The compiled extension fastres._C: it is built where it should be, its backends report
themselves honestly, and the CPU kernels give the same result whatever the thread count.

Parity of the cpp backend (grid, hypothesis, float64 gradcheck) runs in test_parity.py, which
covers every available backend; the CUDA backend's GPU parity is test_grid_cuda there.
"""
import json
import os

import pytest
import torch

import fastres
from fastres import backends, dispatch
from availability import requires_cuda
from fastres.parity import Case, check_parity, make_inputs, run_backend

CPP_REASON = backends.unavailable_reason("cpp")
requires_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"cpp backend: {CPP_REASON}")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _extension_module():
    import importlib
    return importlib.import_module("fastres._C")


BUILD_INFO = os.path.join(os.path.dirname(fastres.__file__), "_build_info.json")


def test_extension_build_did_not_fail_silently():
    """setup.py degrades to a pure-Python install when the extension does not build, and
    the cpp/cuda tests then skip; fail loudly here instead. The install records what it
    tried (fastres/_build_info.json); CI (CI=true) must have built it in any case."""
    if not os.path.exists(BUILD_INFO):
        if IN_CI:
            pytest.fail("CI installed fastres without building fastres._C (no _build_info.json)")
        pytest.skip("fastres was not built by setup.py here (pip install --no-build-isolation "
                    "-e . builds it)")
    with open(BUILD_INFO) as f:
        info = json.load(f)
    assert info["built"], f"building fastres._C failed: {info.get('error')}"
    _extension_module()
    assert backends.unavailable_reason("cpp") is None
    if info["cuda"] and os.environ.get("FASTRES_NO_CUDA") != "1":
        # nvcc was there at build time: the CUDA sources must have compiled and linked.
        assert torch.ops.fastres_ext.compiled_with_cuda(), \
            "fastres._C was built without its CUDA kernels although nvcc exists"


def test_a_build_without_cuda_kernels_says_why():
    """A build without the CUDA kernels (the default where no GPU is visible) records why,
    the cuda backend repeats it, and where a GPU is visible only FASTRES_NO_CUDA=1 may have
    left them out (else the CUDA tests would skip on a machine that could run them)."""
    if not os.path.exists(BUILD_INFO):
        pytest.skip("fastres was not built by setup.py here (test_extension_build_did_not_"
                    "fail_silently says whether that is allowed)")
    with open(BUILD_INFO) as f:
        info = json.load(f)
    if not info["built"] or info["cuda"]:
        return  # a failed build, or one with CUDA kernels: the test above judges those
    reason = info.get("cuda_reason")
    assert reason, f"fastres._C was built without CUDA kernels and no reason was recorded: {info}"
    assert reason in backends.unavailable_reason("cuda")
    if torch.cuda.is_available() and torch.version.cuda and "FASTRES_NO_CUDA" not in reason:
        pytest.fail(f"a GPU is visible but fastres._C has no CUDA kernels: {reason}")


@requires_cpp
def test_available_backends_report_the_extension():
    names = fastres.available_backends()
    assert "cpp" in names
    assert "cpp" in dispatch.describe_default(torch.device("cpu"), torch.bfloat16)
    with_cuda = torch.ops.fastres_ext.compiled_with_cuda()
    assert ("cuda" in names) == (with_cuda and torch.cuda.is_available())
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in backends.unavailable_reason("cuda") or not with_cuda


def test_backends_explain_a_missing_extension(monkeypatch):
    # With the extension unloadable, both backends say why instead of raising.
    from fastres import _ext
    monkeypatch.setattr(_ext, "_loaded", True)
    monkeypatch.setattr(_ext, "_load_error", "fastres._C does not load (test)")
    for name in ("cpp", "cuda"):
        assert "does not load" in backends.unavailable_reason(name)
    assert "cpp" not in fastres.available_backends()


def _run_with_threads(threads, case, dtype):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_backend(case, make_inputs(case, dtype, seed=3), dtype, "cpp")
    finally:
        torch.set_num_threads(previous)


THREAD_CASES = [
    # Big enough to be cut into many tiles (B * L_out spans several work items).
    Case(B=4, C_in=24, C_out=40, L=700, K=3, dilation=4, residual="tensor"),
    Case(B=3, C_in=16, C_out=16, L=530, K=3, dilation=2, norm="eval", residual="identity"),
    Case(B=2, C_in=8, C_out=12, L=401, K=5, stride=2, padding="same", norm="none",
         relu_before_add=True, residual="tensor"),
]


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", THREAD_CASES, ids=str)
def test_thread_count_independence(case, dtype):
    out1, grads1, rm1, rv1 = _run_with_threads(1, case, dtype)
    out2, grads2, rm2, rv2 = _run_with_threads(2, case, dtype)
    # The tiling and every reduction order depend on the shapes only, so forward is bitwise
    # equal; the weight gradient runs in threaded BLAS, held to 1e-6 relative.
    assert torch.equal(out1, out2)
    if rm1 is not None:
        assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    for name, g1 in grads1.items():
        g2 = grads2[name].double()
        err = (g1.double() - g2).norm() / g2.norm().clamp_min(1e-30)
        assert err < 1e-6, f"grad_{name} differs between 1 and 2 threads by {err:.2e}"


@requires_cpp
@pytest.mark.parametrize("case", THREAD_CASES, ids=str)
def test_cpp_parity_on_many_tiles(case):
    # The parity grid uses tiny shapes (one tile); these cross tile and padding boundaries.
    check_parity(case, "cpp", torch.float32)


@requires_cpp
def test_cpp_receptive_field_longer_than_a_tile():
    check_parity(Case(B=2, C_in=5, C_out=6, L=300, K=3, dilation=150, residual="tensor"), "cpp",
                 torch.float32)


@requires_cpp
def test_cpp_ops_reject_bad_outputs():
    x, w = torch.randn(2, 3, 10), torch.randn(4, 3, 3)
    wrong = torch.empty(2, 4, 9)
    empty = torch.empty(0)
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.fastres_ext.forward(x, w, None, None, None, None, None, None, 1, 1, 2, 0, 0,
                                      1e-5, 0.0, False, 0, 0.0, wrong, empty, empty, empty)
    right = torch.empty(2, 4, 10)
    with pytest.raises(RuntimeError, match="unknown activation code"):
        torch.ops.fastres_ext.forward(x, w, None, None, None, None, None, None, 1, 1, 2, 0, 0,
                                      1e-5, 0.0, False, 7, 0.0, right, empty, empty, empty)
    with pytest.raises(RuntimeError, match="bad activation parameter"):
        torch.ops.fastres_ext.forward(x, w, None, None, None, None, None, None, 1, 1, 2, 0, 0,
                                      1e-5, 0.0, False, 6, 0.0, right, empty, empty, empty)


@requires_cuda
def test_cuda_backend_available_with_gpu():
    if CPP_REASON is not None or not torch.ops.fastres_ext.compiled_with_cuda():
        pytest.skip("fastres._C not built with CUDA here")
    assert "cuda" in fastres.available_backends()
    check_parity(Case(B=4, C_in=24, C_out=40, L=700, dilation=4, residual="tensor"), "cuda",
                 torch.float32, device="cuda")


def test_cuda_backend_unavailable_without_gpu():
    # The CPU twin of the test above: without a GPU the cuda backend says so and is not listed.
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert backends.unavailable_reason("cuda") is not None
    assert "cuda" not in fastres.available_backends()
