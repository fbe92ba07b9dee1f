"""The harness that judges a fused model against its plain twin, as the parity tests judge
a backend: every number against the plain model run in float64 (rel_err, fp32 bound 1e-5).
"""
import contextlib
import copy

import pytest
import torch

import fastres
from fastres.conventions import cudnn_conv_tf32_set, rel_err

TOL = 1e-5


def skip_slow_triton(backend):
    if backend == "triton":
        pytest.skip("the Triton interpreter takes ~20 s for this model on CPU; the block "
                    "tests run Triton on tiny shapes (and test_modules_on_cuda on a GPU)")



def grad_scale(name, plain_grads):
    """Scale a gradient's error is judged against (tests/parity.py's rule): a conv bias
    followed by training-mode BN has zero gradient in exact arithmetic, so it is judged
    against its conv weight's gradient instead of its own norm."""
    weight = name[:-len("bias")] + "weight"
    if name.endswith("bias") and weight in plain_grads and plain_grads[name].norm() < \
            1e-3 * plain_grads[weight].norm():
        return plain_grads[weight].norm().item()
    return None


def randomize_bn(model):
    """BatchNorm1d running statistics and affine parameters away from their fresh 0/1, drawn
    from torch's global generator (seeded by the caller), so folding them is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model


def _check(what, fused, plain, reference, scale=None):
    """The fused value against the float64 plain model, as tests/parity.py judges a backend.

    Deep models (ResNet1d) compound rounding until plain float32 PyTorch itself misses 1e-5
    against float64; there the bound is twice plain float32's own error.
    """
    err = rel_err(fused, reference, scale)
    bound = max(TOL, 2 * rel_err(plain, reference, scale))
    assert err < bound, f"{what}: {err:.2e} (bound {bound:.2e})"


def strict_fp32():
    """TF32 off (CUDA): the float32 bound of docs/spec.md is for strict float32."""
    return cudnn_conv_tf32_set(False)


def assert_train_and_eval_match(fused, plain, shape, backend=None, steps=3, seed=0,
                                device="cpu"):
    """Train `steps` steps of forward + backward, then eval, on the fused model, the plain
    float32 model and the plain model in float64; every number of the fused model must
    match float64 (outputs, input and parameter gradients, buffers).

    All models are reseeded before each forward so that dropout draws the same masks.
    """
    fused.load_state_dict(plain.state_dict(), strict=True)
    reference = copy.deepcopy(plain).double()
    models = (fused, plain, reference)
    g = torch.Generator().manual_seed(seed)
    ctx = fastres.use_backend(backend) if backend else contextlib.nullcontext()
    for m in models:
        m.train().to(device)
    with ctx, strict_fp32():
        for step in range(steps):
            x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device)
            grad = None
            results = []
            for m in models:
                dtype = torch.float64 if m is reference else torch.float32
                xm = x.to(dtype).requires_grad_()
                torch.manual_seed(100 + step)
                out = m(xm)
                if grad is None:
                    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
                params = dict(m.named_parameters())
                names = list(params)
                grads = torch.autograd.grad(out, [xm] + list(params.values()), grad.to(dtype))
                results.append((out, grads[0], dict(zip(names, grads[1:]))))
            (out_f, gx_f, gp_f), (out_p, gx_p, gp_p), (out_r, gx_r, gp_r) = results
            assert out_f.shape == out_r.shape
            _check(f"step {step} output", out_f, out_p, out_r)
            _check(f"step {step} input gradient", gx_f, gx_p, gx_r)
            assert gp_f.keys() == gp_r.keys()
            for name in gp_r:
                _check(f"step {step} gradient of {name}", gp_f[name], gp_p[name], gp_r[name],
                       grad_scale(name, gp_r))
        buffers = [dict(m.named_buffers()) for m in models]
        assert buffers[0].keys() == buffers[2].keys()
        for name, buf in buffers[0].items():
            if name.endswith("num_batches_tracked"):
                assert buf.item() == buffers[2][name].item() == steps, name
            else:
                _check(f"buffer {name}", buf, buffers[1][name], buffers[2][name])
        for m in models:
            m.eval()
        x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device)
        with torch.no_grad():
            _check("eval output", fused(x.float()), plain(x.float()), reference(x))

