"""Backend selection happens in one place, with backends as objects that say why they cannot run."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import fastres
from fastres import backends
from fastres.backends import Call


def call(**changes):
    fields = dict(device="cpu", dtype=torch.float32, batch=2, c_in=4, c_out=4, length=1024,
                  kernel_size=3, stride=1, dilation=1, pad_left=2, pad_right=0, norm="eval",
                  has_bias=True, has_residual=False, relu_before_add=False, needs_grad=False)
    fields.update(changes)
    return Call(**fields)


def test_registry_lists_backends_as_objects():
    assert backends.names()[0] == "eager"
    for backend in backends.all_backends():
        assert backends.get(backend.name) is backend
        assert backend.devices and backend.dtypes and backend.description
    assert "eager" in fastres.available_backends()
    assert "composite" in fastres.available_backends()
    assert set(fastres.available_backends()) <= set(backends.names())


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown fastres backend 'nope'"):
        with fastres.use_backend("nope"):
            pass


def test_unavailable_backend_names_why(monkeypatch):
    ghost = backends.KernelBackend("ghost", "fastres.backends._does_not_exist", ("cpu",),
                                   (torch.float32,), "a backend whose module is missing")
    monkeypatch.setitem(backends._REGISTRY, "ghost", ghost)
    assert "cannot import" in ghost.unavailable_reason()
    assert "ghost" not in fastres.available_backends()
    with pytest.raises(RuntimeError, match="'ghost' is not available: cannot import"):
        with fastres.use_backend("ghost"):
            pass


def test_supports_names_device_and_dtype():
    cpu = call()
    assert backends.get("composite").supports(cpu) is None
    assert "runs on cuda" in backends.get("cuda").supports(cpu) or \
        backends.get("cuda").unavailable_reason() is not None
    f64 = call(dtype=torch.float64)
    assert backends.get("eager").supports(f64) is None
    if backends.get("triton").unavailable_reason() is None:
        assert "does not take float64" in backends.get("triton").supports(f64)


def test_use_backend_is_scoped():
    assert backends.forced_backend() is None
    with fastres.use_backend("composite"):
        assert backends.forced_backend() == "composite"
        assert backends.choose(call()) == backends.Decision("composite", "forced")
    assert backends.forced_backend() is None


def test_forced_backend_that_cannot_run_the_call_raises():
    with fastres.use_backend("composite"):
        with pytest.raises(RuntimeError, match="'composite' cannot run this call"):
            backends.choose(call(device="meta"))


def test_default_on_cpu_is_never_the_interpreter():
    # Triton may run on CPU through TRITON_INTERPRET for tests, but never by default.
    for c in (call(), call(needs_grad=True), call(dtype=torch.bfloat16)):
        assert backends.choose(c).backend in ("cpp", "eager")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "composite")
    assert backends.choose(call()).backend == "composite"
    monkeypatch.setenv("FASTRES_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown fastres backend"):
        backends.choose(call())


def test_static_rule_runs_cpp_only_where_it_measured_faster():
    has_cpp = backends.unavailable_reason("cpp") is None
    long, short = backends.CPP_MIN_LENGTH, backends.CPP_MIN_LENGTH - 1
    expect = "cpp" if has_cpp else "eager"
    assert backends.static_choice(call(length=long)).backend == expect
    assert backends.static_choice(call(length=short)).backend == "eager"
    assert backends.static_choice(call(needs_grad=True)).backend == "eager"
    assert backends.static_choice(call(stride=2)).backend == "eager"
    # 16-bit: the C++ kernels (float32 accumulation) whenever built, any call
    for dtype in (torch.bfloat16, torch.float16):
        assert backends.static_choice(call(dtype=dtype, needs_grad=True, stride=2,
                                           length=short)).backend == expect


def test_eager_path_never_calls_the_custom_op(monkeypatch):
    calls = []
    real = backends.get
    monkeypatch.setattr(backends, "get", lambda name: calls.append(name) or real(name))
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, requires_grad=True)
    with fastres.use_backend("eager"):
        fastres.conv_bn_relu(x, w, training=True).sum().backward()
    assert "composite" not in calls and x.grad is not None
    with fastres.use_backend("composite"):
        fastres.conv_bn_relu(x, w, training=True).sum().backward()
    assert calls.count("composite") >= 2  # the forward and the backward op


def test_describe_default_states_the_policy(monkeypatch):
    cpu = torch.device("cpu")
    has_cpp = backends.unavailable_reason("cpp") is None
    text = backends.describe_default(cpu, torch.float32)
    assert ("measured per call signature" in text) == has_cpp
    monkeypatch.setenv("FASTRES_DISPATCH", "static")
    assert backends.describe_default(cpu, torch.float32).endswith("eager")
    with fastres.use_backend("composite"):
        assert backends.describe_default(cpu, torch.float32) == "composite (forced)"


# --------------------------------------------------------------------------- measurement


@pytest.fixture
def fresh_dispatch(monkeypatch, tmp_path):
    """Measured dispatch with an empty, private persistent cache, on one thread (two
    spinning threads per process on a loaded 2-core machine make tiny calls take 100 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("FASTRES_DISPATCH", raising=False)
    monkeypatch.delenv("FASTRES_BACKEND", raising=False)
    monkeypatch.setenv("FASTRES_DISPATCH_CACHE", str(tmp_path))
    backends.forget_decisions()
    yield tmp_path
    backends.forget_decisions()
    torch.set_num_threads(threads)


class SlowBackend(backends.KernelBackend):
    """The composite kernels with a delay: a backend that must never win."""

    def __init__(self, delay_s):
        super().__init__("sluggish", "fastres.backends.composite", ("cpu",),
                         (torch.float32,), "composite, slowed down")
        self.delay_s = delay_s

    def forward(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return super().forward(*args, **kwargs)


def _stage_args(seed, training=True, length=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, length, generator=g, requires_grad=True)
    w = torch.randn(6, 4, 3, generator=g).requires_grad_()
    bn = torch.nn.BatchNorm1d(6)
    kwargs = dict(running_mean=bn.running_mean, running_var=bn.running_var,
                  bn_weight=bn.weight, bn_bias=bn.bias, training=training,
                  num_batches_tracked=bn.num_batches_tracked, momentum=None)
    return x, w, bn, kwargs


def test_a_slow_backend_is_never_chosen(monkeypatch, fresh_dispatch, fresh_seed):
    monkeypatch.setitem(backends._REGISTRY, "sluggish", SlowBackend(20e-3))
    monkeypatch.setitem(backends._PREFERENCE, "cpu", ["sluggish"])
    for training in (True, False):
        x, w, _, kwargs = _stage_args(fresh_seed, training)
        with backends.recording() as log:
            fastres.conv_bn_relu(x, w, **kwargs)
        (_, call, decision), = log
        assert backends.candidates(call) == ["eager", "sluggish"]
        assert decision.backend == "eager" and decision.reason.startswith("measured")
        assert "sluggish" in decision.reason  # it was timed, and lost


def test_a_fused_backend_that_beats_eager_is_chosen(monkeypatch, fresh_dispatch, fresh_seed):
    if backends.unavailable_reason("cpp") is not None:
        pytest.skip("needs the cpp backend")
    real = backends.get("eager").run

    def slow_eager(*args, **kwargs):
        time.sleep(20e-3)
        return real(*args, **kwargs)
    monkeypatch.setattr(backends.get("eager"), "run", slow_eager)
    x, w, _, kwargs = _stage_args(fresh_seed)
    with backends.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs).sum().backward()
    assert [d.backend for _, _, d in log] == ["cpp"]


def test_measuring_leaves_state_as_one_plain_call(fresh_dispatch, fresh_seed):
    """Timing candidates changes nothing the user sees: running statistics, the batch counter
    (momentum=None: the cumulative average reads it), RNG state, .grad and the graph."""
    x1, w1, bn1, kw1 = _stage_args(fresh_seed)
    x2, w2, bn2, kw2 = _stage_args(fresh_seed)
    rng = torch.get_rng_state()
    with backends.recording() as log:
        out1 = fastres.conv_bn_relu(x1, w1, **kw1)
    assert log[0][2].reason.startswith("measured")
    assert torch.equal(torch.get_rng_state(), rng)
    assert x1.grad is None and w1.grad is None
    with fastres.use_backend(log[0][2].backend):
        out2 = fastres.conv_bn_relu(x2, w2, **kw2)
    assert torch.equal(out1, out2)
    assert bn1.num_batches_tracked.item() == bn2.num_batches_tracked.item() == 1
    assert torch.equal(bn1.running_mean, bn2.running_mean)
    assert torch.equal(bn1.running_var, bn2.running_var)
    grad = torch.randn_like(out1)
    g1 = torch.autograd.grad(out1, [x1, w1, bn1.weight, bn1.bias], grad)
    g2 = torch.autograd.grad(out2, [x2, w2, bn2.weight, bn2.bias], grad)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_choices_persist_across_processes_and_are_reported(monkeypatch, fresh_dispatch,
                                                           fresh_seed):
    x, w, _, kwargs = _stage_args(fresh_seed, training=False, length=700)
    with backends.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs)
    measured = log[0][2]
    files = list(fresh_dispatch.glob("dispatch-cpu-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["versions"]["torch"] == torch.__version__
    (key, entry), = doc["entries"].items()
    assert key == log[0][1].key() and entry["backend"] == measured.backend
    assert set(entry["times_s"]) == set(backends.candidates(log[0][1]))
    # A new process: nothing in memory; measuring again would fail, the file answers.
    backends.forget_decisions()
    monkeypatch.setattr(backends.autotune, "measure", lambda *a: pytest.fail("re-measured"))
    with backends.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs)
    assert log[0][2].backend == measured.backend
    assert log[0][2].reason.startswith("measured earlier")
    # The CLI lists it.
    from fastres import cli
    out = subprocess.run([sys.executable, "-m", "fastres", "dispatch"], capture_output=True,
                         text=True, env={**os.environ, "FASTRES_DISPATCH_CACHE": str(fresh_dispatch)})
    assert out.returncode == 0, out.stderr
    assert key in out.stdout and measured.backend in out.stdout
    assert cli  # imported for the module path


def test_static_mode_and_no_cache_measure_nothing(monkeypatch, fresh_dispatch, fresh_seed):
    monkeypatch.setenv("FASTRES_DISPATCH", "static")
    monkeypatch.setattr(backends.autotune, "measure", lambda *a: pytest.fail("measured"))
    x, w, _, kwargs = _stage_args(fresh_seed)
    with backends.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs)
    assert log[0][2].reason.startswith("static rule") or log[0][2].backend == "eager"
    assert not list(fresh_dispatch.glob("*.json"))


class RecordingBackend(backends.KernelBackend):
    """The composite kernels, recording which thread ran forward and backward."""

    def __init__(self):
        super().__init__("recorder", "fastres.backends.composite", ("cpu",),
                         (torch.float32,), "composite, recording its calls")
        self.calls = []

    def forward(self, *args, **kwargs):
        self.calls.append(("forward", threading.get_ident()))
        return super().forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.calls.append(("backward", threading.get_ident()))
        return super().backward(*args, **kwargs)


def test_forced_backend_reaches_backward_on_another_thread(monkeypatch, fresh_seed):
    recorder = RecordingBackend()
    monkeypatch.setitem(backends._REGISTRY, "recorder", recorder)
    x, w, _, kwargs = _stage_args(fresh_seed)
    with fastres.use_backend("recorder"):
        out = fastres.conv_bn_relu(x, w, **kwargs)
    # backward outside the block, on a thread where nothing is forced
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert [what for what, _ in recorder.calls] == ["forward", "backward"]
    assert recorder.calls[1][1] == worker.ident != recorder.calls[0][1]
    assert x.grad is not None


# --------------------------------------------------------------------------- explain, autotune


def test_explain_and_autotune_report_every_stage_and_restore_state(fresh_dispatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastres.TemporalConvNet(3, [6, 6], kernel_size=3, dropout=0.1),
                                torch.nn.Conv1d(6, 1, 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32)
    rng = torch.get_rng_state()
    report = fastres.autotune(model, x)
    modules = [d for d in report if d.call is None]
    stages = [d for d in report if d.call is not None]
    # The outermost fused modules (the blocks here) measured a policy for their stages.
    assert [d.module for d in modules] == ["0.network.0", "0.network.1"]
    assert all(d.backend.startswith("policy: ") and "whole module measured" in d.reason
               for d in modules)
    # A block on its plain policy runs its plain twin's code: no stage to report. The others
    # report both stages, with the reason of their own choice or the block's.
    expected = [f"{m.module}.conv{i}" for m in modules if m.backend != "policy: plain"
                for i in (1, 2)]
    assert [d.module for d in stages] == expected
    assert all(d.call.needs_grad and d.call.norm == "train" for d in stages)
    assert all(d.reason.startswith(("measured", "no fused", "the enclosing module"))
               for d in stages)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    again = fastres.explain(model, x)
    assert [d.backend for d in again] == [d.backend for d in report]
    # (which stages it lists depends on the policies measured: a plain block lists none)
    assert all(d.module in str(again) for d in report)
    model.eval()
    assert all(d.call.norm == "eval" and not d.call.needs_grad
               for d in fastres.explain(model, x) if d.call is not None)


def test_a_module_is_never_slower_than_its_eager_policy(monkeypatch, fresh_dispatch):
    """A module times its whole forward under each policy: with the C++ kernels made slow,
    a block whose stages would each pick them (their own measurement says so) runs eager."""
    if backends.unavailable_reason("cpp") is None:
        cpp = backends.get("cpp")
        real = cpp.module.forward

        def slow(*args, **kwargs):
            time.sleep(5e-3)
            return real(*args, **kwargs)
        monkeypatch.setattr(cpp.module, "forward", slow)
        monkeypatch.setattr(backends.autotune, "measure", lambda names, make_run, device, grad:
                            backends.autotune.Measurement("cpp", {"cpp": 1.0, "eager": 2.0},
                                                          "now"))
        block = fastres.TemporalBlock(4, 4, 3).eval()
        x = torch.randn(2, 4, 64)
        with torch.no_grad():
            block(x)
        (policy,) = fastres.nn.policy.policies(block).values()
        assert policy.backend == "plain" and policy.times_s["auto"] > policy.times_s["plain"]
    else:
        pytest.skip("needs the cpp backend")



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_16_bit_module_is_judged_against_plain_only_without_gradients(dtype, fresh_dispatch):
    """Plain 16-bit PyTorch rounds the conv output before batch norm: its outputs stay within
    the 1e-2 bound, its gradients do not. So a 16-bit forward-only call is timed against the
    plain twin, and a training call against eager (PyTorch's kernels computing in float32),
    never against the plain twin."""
    block = fastres.TemporalBlock(4, 4, 3).to(dtype)
    x = torch.randn(2, 4, 64).to(dtype)
    block.eval()
    with torch.no_grad():
        block(x)
    block.train()
    block(x.requires_grad_()).float().sum().backward()
    by_grad = {key[-1]: p for key, p in fastres.nn.policy.policies(block).items()}
    assert "plain" in by_grad[False].times_s and "eager" not in by_grad[False].times_s
    assert "eager" in by_grad[True].times_s and "plain" not in by_grad[True].times_s
    assert by_grad[True].backend != "plain"


def test_explain_says_why_a_hooked_batchnorm_runs_unfused():
    block = fastres.TemporalBlock(4, 4, 3)
    seen = []
    block.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    report = [d for d in fastres.explain(block, torch.randn(2, 4, 16)) if d.module != ""]
    stage = next(d for d in report if d.module == "conv1")
    assert stage.backend == "eager" and "forward hooks" in stage.reason
    assert seen == [torch.Size([2, 4, 16])]  # the hook fired, once: nothing was measured
    assert any("hooks" in d.reason for d in fastres.explain(block, torch.randn(2, 4, 16))
               if d.module == "")
