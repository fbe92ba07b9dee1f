"""Codegen checks of the Triton kernels for an H100 (sm_90), run without a GPU.

The backend's launchers run against a compile-only driver (fastres/backends/triton/
codegen.py): every GEMM kernel of a training step is compiled for sm_90 with the tiles,
warps, stages and specialization (pointer alignment, divisibility) the launcher really
uses at B=32, L=4096, K=3, in bf16 and float32-with-tf32, C in {64, 256}, and its SASS is
read. What the interpreter cannot show is asserted here: tensor-core wgmma (HGMMA), no
operand loaded by narrow scalar loads inside the GEMM loop, operand copies (TMA or
cp.async) issued inside the loop and ahead of it (a software pipeline), no spills or local
memory. The compile needs Triton's bundled ptxas/cuobjdump, not a GPU.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = """
    import json, torch
    from fastres.backends.triton import codegen
    reports = []
    for dtype in (torch.bfloat16, torch.float32):
        for C in (64, 256):
            launches = codegen.training_step_launches(C, dtype)
            if (dtype, C) != (torch.bfloat16, 64):  # every kernel compiles once, below
                launches = [x for x in launches if x.name.startswith("conv_")]
            # Stage 1 of an identity block: its dgrad adds the shortcut's gradient.
            launches += [x for x in codegen.training_step_launches(
                C, dtype, residual=False, shortcut_grad=True) if x.name == "conv_dgrad_kernel"]
            for launch in launches:
                compiled = codegen.compile_launch(launch)
                report = codegen.inspect(compiled, launch.name, codegen.describe(launch))
                entry = dict(vars(report), dtype=str(dtype), C=C,
                             pipelined=report.pipelined,
                             narrow=report.narrow_operand_loads,
                             tickets=codegen.tickets(compiled))
                reports.append(entry)
    # Negative control: rows that are not 16-byte multiples take the masked-pointer path.
    for launch in codegen.training_step_launches(64, torch.bfloat16, L=4100):
        if launch.name.startswith("conv_"):
            report = codegen.inspect(codegen.compile_launch(launch), "unaligned rows")
            reports.append(dict(vars(report), dtype="bf16", C=64, pipelined=report.pipelined,
                                narrow=report.narrow_operand_loads))
    # Launches of one stage's training step at the real shape (no compile needed).
    for C in (64, 256):
        names = [x.name for x in codegen.training_step_launches(C, torch.bfloat16,
                                                                distinct=False)]
        reports.append(dict(kernel="launches", C=C, names=names))
    print("REPORTS" + json.dumps(reports))
"""


def _compiled_in_a_fresh_process(script: str, tag: str):
    """Run `script` in a new Python without the interpreter switch (Triton compiles for sm_90
    there) and return the JSON it printed after `tag`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith(tag))
    return json.loads(line[len(tag):])


@pytest.fixture(scope="module")
def reports():
    return _compiled_in_a_fresh_process(_SCRIPT, "REPORTS")


def test_stage_launches_at_the_real_shape(reports):
    """B=32, L=4096: 6 Triton launches a stage (the finalizes inside the kernels), as the
    interpreter count of tests/backends/test_triton_launches.py at its small shape."""
    for entry in (r for r in reports if r["kernel"] == "launches"):
        assert entry["names"] == ["conv_forward_kernel", "conv_forward_kernel",
                                  "relu_bn_backward_kernel", "relu_bn_backward_kernel",
                                  "conv_dgrad_kernel", "conv_wgrad_kernel"], entry


def _gemms(reports):
    gemms = [r for r in reports if r["kernel"].startswith("conv_")]  # not the control
    # forward (statistics and normalizing passes), dgrad (also adding the shortcut
    # gradient) and wgrad for each of bf16 / fp32 and C = 64 / 256
    assert len(gemms) == 20, [(r["kernel"], r["dtype"], r["C"]) for r in gemms]
    return gemms


def test_every_kernel_compiles_for_sm90(reports):
    names = {r["kernel"] for r in reports} - {"unaligned rows", "launches"}
    assert names == {"conv_forward_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel",
                     "relu_bn_backward_kernel"}


def test_finalize_tickets_follow_a_barrier(reports):
    """Each fused finalize takes its tickets as batch_stats.py says the GPU needs: one
    thread's acq_rel gpu-scope atomic add, after a bar.sync that orders the block's
    partial stores before it. Two tickets (group, then all groups) in the statistics pass
    and backward pass 1, one in wgrad; none in the other passes."""
    expected = {"stats": 2, "norm": 0, "reduce": 2, "grad_y": 0, "dgrad": 0, "wgrad": 1}
    seen = set()
    for r in (r for r in reports if r.get("tickets") is not None):
        kind = {"conv_dgrad_kernel": "dgrad", "conv_wgrad_kernel": "wgrad"}.get(r["kernel"])
        if r["kernel"] == "conv_forward_kernel":
            kind = r["config"].split()[0]
        if r["kernel"] == "relu_bn_backward_kernel":
            kind = "reduce" if r["tickets"] else "grad_y"
        seen.add(kind)
        assert len(r["tickets"]) == expected[kind], r
        for ticket in r["tickets"]:
            assert ticket == dict(acq_rel_gpu=True, one_thread=True, barrier_before=True), r
    assert seen == set(expected)


def test_gemms_use_wgmma(reports):
    for r in _gemms(reports):
        assert r["hgmma"] > 0 and r["mma_sync"] == 0, r


def test_gemm_operands_are_not_narrow_scalar_loads(reports):
    for r in _gemms(reports):
        assert r["narrow"] == 0, r
        assert r["tma"] > 0 or r["cp_async"] > 0, r  # operands arrive by async bulk copies


def test_gemm_operand_loads_are_pipelined(reports):
    for r in _gemms(reports):
        assert r["async_in_loop"] and r["async_before_loop"], r


def test_no_spills_or_local_memory(reports):
    for r in _gemms(reports):
        assert r["spill_bytes"] == 0 and r["local"] == 0, r


def test_tiles_differ_with_the_problem(reports):
    """C=64 and C=256 no longer compile to the same code: the output-channel tile covers C."""
    fwd = {(r["C"], r["config"]) for r in _gemms(reports)
           if r["kernel"] == "conv_forward_kernel" and "bfloat16" in r["dtype"]}
    def co(config):
        return next(token for token in config.split() if token.startswith("CO"))
    assert {co(config) for C, config in fwd if C == 64} == {"CO64"}, fwd
    assert {co(config) for C, config in fwd if C == 256} == {"CO256"}, fwd


def test_inspect_flags_an_unpipelined_scalar_kernel(reports):
    """Negative control: the masked-pointer path (rows not 16-byte multiples) is what the
    checks above exist to catch; the same inspection must flag it."""
    controls = [r for r in reports if r["kernel"] == "unaligned rows"]
    assert len(controls) == 4  # forward (two passes), dgrad, wgrad
    for control in controls:
        assert control["narrow"] > 0 and control["tma"] == 0 and not control["pipelined"], control
        # slow, but within registers: the pointer path keeps small tiles
        assert control["spill_bytes"] == 0 and control["local"] == 0, control


_ACTIVATION_SCRIPT = """
    import json, torch
    from fastres.backends import triton as backend
    from fastres.backends.triton import codegen
    B, C, L, K = 4, 64, 1024, 3
    x, w = torch.zeros(B, C, L, dtype=torch.bfloat16), torch.zeros(C, C, K, dtype=torch.bfloat16)
    bias, gamma, beta = torch.zeros(C, dtype=torch.bfloat16), torch.ones(C), torch.zeros(C)
    res = torch.zeros(B, C, L, dtype=torch.bfloat16)
    geo = dict(stride=1, dilation=2, pad_left=(K - 1) * 2, pad_right=0)
    found = []
    for act in ["gelu", "gelu_tanh", "silu", "tanh", "leaky_relu:0.2", "elu:0.5"]:
        def run():
            out, saved, bits, _, var = backend.forward(
                x, w, bias, gamma, beta, None, None, res, norm="train", eps=1e-5,
                momentum_factor=0.1, relu_before_add=True, save_for_backward=True,
                activation=act, **geo)
            backend.backward(torch.zeros_like(out), x, w, gamma, beta, saved, out, var,
                             has_bias=True, has_residual=True, norm="train", eps=1e-5,
                             relu_before_add=True, mask_bits=bits, activation=act,
                             residual=res, **geo)
        for launch in codegen.run_captured(run):
            if launch.name in ("conv_forward_kernel", "relu_bn_backward_kernel"):
                act_code = codegen.constexpr(launch, "ACT")
                stack = codegen.resources(codegen.compile_launch(launch))["stack"]
                found.append(dict(act=act, kernel=launch.name, code=act_code, stack=stack))
    print("ACTIVATIONS" + json.dumps(found))
"""


def test_activation_kernels_compile_for_sm90():
    """Every activation's forward epilogue and elementwise backward compile for sm_90 (the
    interpreter runs them; this is the code a GPU would run), with its named code as the
    ACT constexpr and at most a few bytes of local memory."""
    found = _compiled_in_a_fresh_process(_ACTIVATION_SCRIPT, "ACTIVATIONS")
    from fastres.backends._activation import parse_activation
    assert {f["act"] for f in found} == {"gelu", "gelu_tanh", "silu", "tanh",
                                         "leaky_relu:0.2", "elu:0.5"}
    for f in found:
        assert f["code"] == parse_activation(f["act"]).code, f
        assert f["stack"] <= 32, f


_LAYER_NORM_SCRIPT = """
    import json, torch
    from fastres.backends import triton as backend
    from fastres.backends.triton import codegen, tiling
    B, L, K = 32, 4096, 3
    C = tiling.LAYER_NORM_MAX_CHANNELS  # the widest layer whose tile holds every channel
    tiling.dot_precision = lambda dt, dev: "tf32"  # float32 as nn.Conv1d runs it by default
    found = []
    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.zeros(B, C, L, dtype=dtype), torch.zeros(C, C, K, dtype=dtype)
        bias, gamma, beta = torch.zeros(C, dtype=dtype), torch.ones(C), torch.zeros(C)
        res = torch.zeros(B, C, L, dtype=dtype)
        geo = dict(stride=1, dilation=2, pad_left=(K - 1) * 2, pad_right=0)
        def run():
            out, saved, bits, _, var = backend.forward(
                x, w, bias, gamma, beta, None, None, res, norm="layer", eps=1e-5,
                momentum_factor=0.0, relu_before_add=False, save_for_backward=True, **geo)
            backend.backward(torch.zeros_like(out), x, w, gamma, beta, saved, out, var,
                             has_bias=True, has_residual=True, norm="layer", eps=1e-5,
                             relu_before_add=False, mask_bits=bits, **geo)
        launches = codegen.run_captured(run, distinct=False)
        found.append(dict(dtype=str(dtype), names=[x.name for x in launches]))
        for launch in launches:
            if launch.name in ("conv_forward_kernel", "relu_bn_backward_kernel"):
                compiled = codegen.compile_launch(launch)
                report = codegen.inspect(compiled, launch.name, codegen.describe(launch))
                found.append(dict(vars(report), dtype=str(dtype), pipelined=report.pipelined,
                                  tickets=codegen.tickets(compiled)))
    print("LAYER" + json.dumps(found))
"""


def test_layer_norm_kernels_compile_for_sm90():
    """Layer norm's kernels at the widest fused layer (C = tiling.LAYER_NORM_MAX_CHANNELS,
    B=32, L=4096, bf16 and float32 with tf32 dots): one forward launch whose tile holds
    every channel, on tensor cores; one elementwise backward pass (its finalize's two
    tickets after a barrier); no spills or local memory in either."""
    found = _compiled_in_a_fresh_process(_LAYER_NORM_SCRIPT, "LAYER")
    sequences = [f["names"] for f in found if "names" in f]
    assert sequences == [["conv_forward_kernel", "relu_bn_backward_kernel",
                          "conv_dgrad_kernel", "conv_wgrad_kernel"]] * 2, sequences
    reports = [f for f in found if "names" not in f]
    assert len(reports) == 4
    for r in reports:
        assert r["spill_bytes"] == 0 and r["local"] == 0, r
        if r["kernel"] == "conv_forward_kernel":
            assert r["config"].startswith("layer") and "CO256" in r["config"], r
            assert r["hgmma"] > 0 and r["pipelined"] and not r["tickets"], r
        else:
            assert len(r["tickets"]) == 2, r
            for ticket in r["tickets"]:
                assert ticket == dict(acq_rel_gpu=True, one_thread=True,
                                      barrier_before=True), r
