"""The op level: which backend runs one call, forced, stored, measured or by the static rule."""
import json
import threading
import time

import pytest
import torch

import fastres
from fastres import backends, dispatch
from fastres.backends import Call
from fastres.backends.base import KernelBackend


def call(**changes):
    fields = dict(device="cpu", dtype=torch.float32, batch=2, c_in=4, c_out=4, length=1024,
                  kernel_size=3, stride=1, dilation=1, pad_left=2, pad_right=0, norm="eval",
                  has_bias=True, has_residual=False, relu_before_add=False, needs_grad=False)
    fields.update(changes)
    return Call(**fields)


def choose(c: Call):
    return dispatch.op.choose(tuple(getattr(c, f) for f in c.__dataclass_fields__))


class Composite(KernelBackend):
    """The composite kernels under another name: a test backend."""

    devices, dtypes = ("cpu",), (torch.float32,)

    def __init__(self, name):
        super().__init__()
        self.name, self.description = name, f"composite, as {name}"

    def load(self):
        from fastres.backends import composite
        return composite


@pytest.fixture
def extra_backend(monkeypatch):
    """Register a test backend as the CPU's only fused candidate."""
    def register(backend):
        monkeypatch.setitem(backends._REGISTRY, backend.name, backend)
        monkeypatch.setitem(dispatch.op.PREFERENCE, "cpu", [backend.name])
        return backend
    return register


def test_registry_lists_backends_as_objects_with_their_capabilities():
    assert backends.names()[0] == "eager"
    for backend in backends.all_backends():
        assert backends.get(backend.name) is backend
        assert backend.devices and backend.dtypes and backend.description
    assert "eager" in fastres.available_backends()
    assert "composite" in fastres.available_backends()
    assert set(fastres.available_backends()) <= set(backends.names())
    triton = backends.get("triton")
    assert triton.counts_batches and triton.saves_mask_bits and triton.streams
    assert not backends.get("cpp").saves_mask_bits


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown fastres backend 'nope'"):
        with fastres.use_backend("nope"):
            pass


def test_unavailable_backend_names_why(monkeypatch):
    class Ghost(Composite):
        def load(self):
            raise ImportError("no kernels here")
    ghost = Ghost("ghost")
    monkeypatch.setitem(backends._REGISTRY, "ghost", ghost)
    assert "no kernels here" in ghost.unavailable_reason()
    assert "ghost" not in fastres.available_backends()
    with pytest.raises(RuntimeError, match="'ghost' is not available: cannot import"):
        with fastres.use_backend("ghost"):
            pass


def test_supports_names_device_and_dtype():
    cpu = call()
    assert backends.get("composite").supports(cpu) is None
    assert "runs on cuda" in backends.get("cuda").supports(cpu) or \
        backends.get("cuda").unavailable_reason() is not None
    assert backends.get("eager").supports(call(dtype=torch.float64)) is None


def test_use_backend_is_scoped():
    assert dispatch.forced_backend() is None
    with fastres.use_backend("composite"):
        assert dispatch.forced_backend() == "composite"
        choice = choose(call())
        assert (choice.name, choice.source) == ("composite", "forced")
    assert dispatch.forced_backend() is None


def test_forced_backend_that_cannot_run_the_call_raises():
    with fastres.use_backend("composite"):
        with pytest.raises(RuntimeError, match="'composite' cannot run this call"):
            choose(call(device="meta"))


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "composite")
    assert choose(call()).name == "composite"
    monkeypatch.setenv("FASTRES_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown fastres backend"):
        choose(call())


def test_default_on_cpu_is_never_the_interpreter(fresh_dispatch):
    # Triton may run on CPU through TRITON_INTERPRET for tests, but never by default.
    for c in (call(), call(needs_grad=True), call(dtype=torch.bfloat16)):
        assert "triton" not in dispatch.candidates(c)


def test_static_rule_runs_cpp_only_where_it_measured_faster():
    has_cpp = backends.unavailable_reason("cpp") is None
    long, short = dispatch.CPP_MIN_LENGTH, dispatch.CPP_MIN_LENGTH - 1
    expect = "cpp" if has_cpp else "eager"
    assert dispatch.static_choice(call(length=long)).name == expect
    assert dispatch.static_choice(call(length=short)).name == "eager"
    assert dispatch.static_choice(call(needs_grad=True)).name == "eager"
    assert dispatch.static_choice(call(stride=2)).name == "eager"
    for dtype in (torch.bfloat16, torch.float16):
        assert dispatch.static_choice(call(dtype=dtype, needs_grad=True, stride=2,
                                           length=short)).name == expect


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
    text = dispatch.describe_default(cpu, torch.float32)
    assert ("measured per call signature" in text) == has_cpp
    monkeypatch.setenv("FASTRES_DISPATCH", "static")
    assert dispatch.describe_default(cpu, torch.float32).endswith("eager")
    with fastres.use_backend("composite"):
        assert dispatch.describe_default(cpu, torch.float32) == "composite (forced)"


# --------------------------------------------------------------------------- measurement


def _stage_args(seed, training=True, length=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, length, generator=g, requires_grad=True)
    w = torch.randn(6, 4, 3, generator=g).requires_grad_()
    bn = torch.nn.BatchNorm1d(6)
    kwargs = dict(running_mean=bn.running_mean, running_var=bn.running_var,
                  bn_weight=bn.weight, bn_bias=bn.bias, training=training,
                  num_batches_tracked=bn.num_batches_tracked, momentum=None)
    return x, w, bn, kwargs


def test_a_slow_backend_is_never_chosen(extra_backend, fresh_dispatch, fresh_seed):
    class Slow(Composite):
        def forward(self, *args, **kwargs):
            time.sleep(20e-3)
            return super().forward(*args, **kwargs)
    extra_backend(Slow("sluggish"))
    for training in (True, False):
        x, w, _, kwargs = _stage_args(fresh_seed, training)
        with dispatch.recording() as log:
            fastres.conv_bn_relu(x, w, **kwargs)
        (_, c, choice), = log
        assert dispatch.candidates(c) == ["eager", "sluggish"]
        assert choice.name == "eager" and choice.source == "measured"
        assert "sluggish" in choice.times_s  # it was timed, and lost


def test_a_wrong_backend_is_never_chosen_however_fast(extra_backend, fresh_dispatch,
                                                      fresh_seed):
    """A backend that is fast and wrong (its gradient of the weight is off) fails the
    correctness probe and is left out, with the reason, before any timing."""
    class Wrong(Composite):
        def backward(self, *args, **kwargs):
            grads = list(super().backward(*args, **kwargs))
            grads[1] = grads[1] * 1.01
            return grads
    extra_backend(Wrong("wrong"))
    real = backends.get("eager").run
    backends.get("eager").run = lambda *a, **k: (time.sleep(5e-3), real(*a, **k))[1]
    try:
        x, w, _, kwargs = _stage_args(fresh_seed)
        with dispatch.recording() as log:
            fastres.conv_bn_relu(x, w, **kwargs).sum().backward()
    finally:
        del backends.get("eager").run
    (_, _, choice), = log
    assert choice.name == "eager"
    assert "grad_weight" in choice.excluded["wrong"] and "probe" in choice.excluded["wrong"]
    assert "wrong" not in choice.times_s


def test_a_fused_backend_that_beats_eager_is_chosen(monkeypatch, fresh_dispatch, fresh_seed):
    if backends.unavailable_reason("cpp") is not None:
        pytest.skip("needs the cpp backend")
    real = backends.get("eager").run

    def slow_eager(*args, **kwargs):
        time.sleep(20e-3)
        return real(*args, **kwargs)
    monkeypatch.setattr(backends.get("eager"), "run", slow_eager)
    x, w, _, kwargs = _stage_args(fresh_seed)
    with dispatch.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs).sum().backward()
    assert [c.name for _, _, c in log] == ["cpp"]
    assert "less time than eager" in log[0][2].why()


def test_measuring_leaves_state_as_one_plain_call(fresh_dispatch, fresh_seed):
    """Timing candidates changes nothing the user sees: running statistics, the batch counter
    (momentum=None: the cumulative average reads it), RNG state, .grad and the graph."""
    x1, w1, bn1, kw1 = _stage_args(fresh_seed)
    x2, w2, bn2, kw2 = _stage_args(fresh_seed)
    rng = torch.get_rng_state()
    with dispatch.recording() as log:
        out1 = fastres.conv_bn_relu(x1, w1, **kw1)
    assert log[0][2].source in ("measured", "rule")
    assert torch.equal(torch.get_rng_state(), rng)
    assert x1.grad is None and w1.grad is None
    with fastres.use_backend(log[0][2].name):
        out2 = fastres.conv_bn_relu(x2, w2, **kw2)
    assert torch.equal(out1, out2)
    assert bn1.num_batches_tracked.item() == bn2.num_batches_tracked.item() == 1
    assert torch.equal(bn1.running_mean, bn2.running_mean)
    assert torch.equal(bn1.running_var, bn2.running_var)
    grad = torch.randn_like(out1)
    g1 = torch.autograd.grad(out1, [x1, w1, bn1.weight, bn1.bias], grad)
    g2 = torch.autograd.grad(out2, [x2, w2, bn2.weight, bn2.bias], grad)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_a_long_input_is_measured_on_a_bounded_slice(monkeypatch, fresh_dispatch, fresh_seed):
    """The first call on a long input times candidates on a slice of it, never the whole."""
    import sys
    op_module = sys.modules["fastres.ops.conv_bn_relu"]
    seen = []
    real = op_module.run_backend

    def spy(backend, x, *args, **kwargs):
        seen.append(x.shape[0] * x.shape[2])
        return real(backend, x, *args, **kwargs)
    monkeypatch.setattr(op_module, "run_backend", spy)
    length = 4 * dispatch.measure.MAX_MEASURED_POSITIONS
    x = torch.randn(2, 4, length)
    w = torch.randn(4, 4, 3)
    with torch.no_grad():
        fastres.conv_bn_relu(x, w, norm=None)
    assert seen[-1] == 2 * length  # the real call, whole
    assert max(seen[:-1]) <= dispatch.measure.MAX_MEASURED_POSITIONS


def test_choices_persist_across_processes_with_provenance(monkeypatch, fresh_dispatch,
                                                          fresh_seed):
    import dataclasses
    real = dispatch.op.measure
    # As if measured on a quiet machine with a clear winner (final): what is stored.
    monkeypatch.setattr(dispatch.op, "measure", lambda *a, **k: dataclasses.replace(
        real(*a, **k), final=True))
    x, w, _, kwargs = _stage_args(fresh_seed, training=False, length=700)
    with dispatch.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs)
    measured = log[0][2]
    if measured.source != "measured":
        assert backends.unavailable_reason("cpp") is not None  # nothing to measure: no fused
        return
    files = list(fresh_dispatch.glob("dispatch-cpu-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["threads"] == torch.get_num_threads()
    (key, entry), = doc["entries"].items()
    assert key == log[0][1].key() and entry["name"] == measured.name
    assert set(entry["times_s"]) == set(dispatch.candidates(log[0][1]))
    assert entry["provenance"]["device"] and entry["provenance"]["measured_utc"]
    assert "load_per_core" in entry["provenance"]
    # A new process: nothing in memory; measuring again would fail, the file answers.
    dispatch.forget()
    monkeypatch.setattr(dispatch.op, "measure", lambda *a, **k: pytest.fail("re-measured"))
    with dispatch.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs)
    assert log[0][2].name == measured.name and log[0][2].source == "cached"


def test_a_choice_measured_under_load_is_not_stored(monkeypatch, fresh_dispatch, fresh_seed):
    monkeypatch.setattr(fastres.machine, "load_per_core", lambda: 4.0)
    x, w, _, kwargs = _stage_args(fresh_seed, training=False, length=700)
    with dispatch.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs)
    choice = log[0][2]
    if choice.source != "measured":
        pytest.skip("nothing to measure here (no fused backend)")
    assert not choice.final and "under load" in choice.why()
    assert not list(fresh_dispatch.glob("dispatch-*.json"))


def test_a_choice_won_within_the_noise_is_not_stored(monkeypatch, fresh_dispatch):
    """A fused path 5% faster than eager (exactly the margin) with samples spread 10%: which
    one wins is the noise's call, so the choice holds for this process only."""
    monkeypatch.setattr(fastres.machine, "load_per_core", lambda: 0.5)  # (a quiet machine)
    samples = {"eager": [1.0, 1.1, 0.9, 1.05, 0.95], "fused": [0.95, 1.05, 0.85, 1.0, 0.9]}
    monkeypatch.setattr(dispatch.measure.timing, "measure", lambda runs, device, config: {
        name: dispatch.measure.timing.Stats([t * 1e-3 for t in samples[name]], 1, 0.0)
        for name in runs})
    choice = dispatch.measure.measure("op", {"eager": None, "fused": None}, "eager", "cpu",
                                      False)
    assert not choice.final and "noise" in choice.provenance["not_final"]
    samples["fused"] = [t * 0.5 for t in samples["eager"]]  # twice as fast: clear
    assert dispatch.measure.measure("op", {"eager": None, "fused": None}, "eager", "cpu",
                                    False).final


def test_a_fused_path_must_win_clear_of_the_noise(monkeypatch):
    """Judged round by round: a burst of load that slows both sides of a round cancels, and
    the path 15% faster in every round wins; a path 15% faster on the median whose rounds
    scatter around that (its ratios spread 18%) is too close to call, so the baseline runs
    and the next process measures again. An irrelevant third candidate's noise does not
    decide either way."""
    monkeypatch.setattr(fastres.machine, "load_per_core", lambda: 0.5)  # (a quiet machine)
    samples = {"base": [1.0, 1.25, 0.9, 1.0, 1.2], "fused": [0.85, 1.06, 0.77, 0.85, 1.02],
               "noisy": [2.0, 4.0, 1.0, 3.0, 2.5]}
    monkeypatch.setattr(dispatch.measure.timing, "measure", lambda runs, device, config: {
        name: dispatch.measure.timing.Stats([t * 1e-3 for t in samples[name]], 1, 0.0)
        for name in runs})
    runs = dict.fromkeys(samples)
    choice = dispatch.measure.measure("module", runs, "base", "cpu", False)
    assert choice.name == "fused" and choice.final and choice.spread < 0.05
    # The ratio it decided by is the rounds' (0.85 in each: the median of 0.85, 0.848,
    # 0.856, 0.85, 0.85), and its reason says that saving, not the medians' (1 - 0.85/1.0).
    expected = sorted(f / b for f, b in zip(samples["fused"], samples["base"]))[2]
    assert choice.ratio == pytest.approx(expected) and "took 15% less time" in choice.why()
    samples["base"] = [1.0] * 5
    samples["fused"] = [0.7, 1.1, 0.85, 0.95, 0.8]
    choice = dispatch.measure.measure("module", runs, "base", "cpu", False)
    assert choice.name == "base" and not choice.final
    assert "too close to call" in choice.why()


def test_a_reason_says_more_time_where_the_best_fused_path_was_slower():
    """A fused path with the lower median can be slower round by round (the paired ratio,
    what the margin is judged by); the reason then says how much more time it took, not a
    negative saving."""
    choice = dispatch.Choice("op", "eager", "measured", "measured",
                             {"eager": 100e-6, "cpp": 99e-6}, 0.02, 0.05, "eager", ratio=1.12)
    assert "cpp took 12% more time than eager, short of the 5%" in choice.why()
    assert "-" not in choice.why().split(": ", 1)[1]


def test_a_close_call_is_timed_again_with_the_rounds_pooled(monkeypatch):
    """Noisy first rounds, steady ones after: the decision waits for them (and stops timing
    once it is clear); never more than PASSES passes."""
    passes = []
    noisy = {"base": [1.0, 1.0, 1.0], "fused": [0.65, 1.05, 0.8]}

    def fake(runs, device, config):
        passes.append(sorted(runs))
        steady = {"base": [1.0] * 3, "fused": [0.8] * 3}
        source = noisy if len(passes) == 1 else steady
        return {name: dispatch.measure.timing.Stats([t * 1e-3 for t in source[name]], 1, 0.0)
                for name in runs}
    monkeypatch.setattr(dispatch.measure.timing, "measure", fake)
    choice = dispatch.measure.measure("module", dict.fromkeys(noisy), "base", "cpu", False)
    assert len(passes) == 2 and choice.name == "fused"
    passes.clear()
    noisy["fused"] = [0.96, 1.25, 0.77]  # noisy every pass now: too close, the baseline runs
    monkeypatch.setattr(dispatch.measure.timing, "measure", lambda runs, device, config: (
        passes.append(1) or {n: dispatch.measure.timing.Stats([t * 1e-3 for t in noisy[n]], 1,
                                                               0.0) for n in runs}))
    choice = dispatch.measure.measure("module", dict.fromkeys(noisy), "base", "cpu", False)
    assert len(passes) == dispatch.measure.PASSES and choice.name == "base"
    assert len(choice.times_s) == 2 and not choice.final


def test_the_training_margin_is_the_op_levels_alone(monkeypatch):
    """An op call timed alone with its backward needs 15%; a module's whole training step,
    timed as it runs, needs the forward margin: a path 10% faster wins there and not here."""
    samples = {"base": [1.0] * 5, "fused": [0.9] * 5}
    monkeypatch.setattr(dispatch.measure.timing, "measure", lambda runs, device, config: {
        name: dispatch.measure.timing.Stats([t * 1e-3 for t in samples[name]], 1, 0.0)
        for name in runs})
    runs = {"base": None, "fused": None}
    op_call = dispatch.measure.measure("op", runs, "base", "cpu", True)
    module_step = dispatch.measure.measure("module", runs, "base", "cpu", True)
    assert op_call.name == "base" and op_call.margin == dispatch.MARGIN_BACKWARD
    assert module_step.name == "fused" and module_step.margin == dispatch.MARGIN_FORWARD


def test_static_mode_measures_nothing(monkeypatch, fresh_dispatch, fresh_seed):
    monkeypatch.setenv("FASTRES_DISPATCH", "static")
    monkeypatch.setattr(dispatch.op, "measure", lambda *a, **k: pytest.fail("measured"))
    x, w, _, kwargs = _stage_args(fresh_seed)
    with dispatch.recording() as log:
        fastres.conv_bn_relu(x, w, **kwargs)
    assert log[0][2].source in ("static", "rule")
    assert not list(fresh_dispatch.glob("*.json"))


def test_forced_backend_reaches_backward_on_another_thread(monkeypatch, fresh_seed):
    calls = []

    class Recorder(Composite):
        def forward(self, *args, **kwargs):
            calls.append(("forward", threading.get_ident()))
            return super().forward(*args, **kwargs)

        def backward(self, *args, **kwargs):
            calls.append(("backward", threading.get_ident()))
            return super().backward(*args, **kwargs)
    monkeypatch.setitem(backends._REGISTRY, "recorder", Recorder("recorder"))
    x, w, _, kwargs = _stage_args(fresh_seed)
    with fastres.use_backend("recorder"):
        out = fastres.conv_bn_relu(x, w, **kwargs)
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert [what for what, _ in calls] == ["forward", "backward"]
    assert calls[1][1] == worker.ident != calls[0][1]
    assert x.grad is not None


def test_double_backward_says_plainly_it_is_not_supported(fresh_seed):
    x, w, _, kwargs = _stage_args(fresh_seed)
    with fastres.use_backend("composite"):
        out = fastres.conv_bn_relu(x, w, **kwargs)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
