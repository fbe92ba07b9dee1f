"""The module level: how the outermost fused module runs its stages, and what explain shows."""
import copy
import dataclasses

import pytest
import torch

import fastres
from fastres import _ext, backends, dispatch
from fastres.conventions import rel_err


def test_explain_and_autotune_report_every_level_and_restore_state(fresh_dispatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(fastres.TemporalConvNet(3, [6, 6], kernel_size=3, dropout=0.1),
                                torch.nn.Conv1d(6, 1, 1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32)
    rng = torch.get_rng_state()
    report = fastres.autotune(model, x)
    modules = [d for d in report if d.level == "module"]
    stages = [d for d in report if d.call is not None]
    # The outermost fused module (the TemporalConvNet) chose once for all its blocks.
    assert [d.module for d in modules] == ["0"]
    assert modules[0].backend.startswith("policy: ") and "measured" in modules[0].reason
    policy = modules[0].backend.split(": ")[1]
    if policy != "stages" and policy not in backends.names():
        assert not stages  # plain, or a whole-module path: no stage reaches the op
    else:
        assert [d.module for d in stages] == [f"0.network.{b}.conv{i}" for b in (0, 1)
                                             for i in (1, 2)]
        assert all(d.call.needs_grad and d.call.norm == "train" for d in stages)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    again = fastres.explain(model, x)
    assert [d.backend for d in again] == [d.backend for d in report]
    assert str(again).count("policy:") == 1  # printed once, one row per choice
    model.eval()
    assert all(d.call.norm == "eval" and not d.call.needs_grad
               for d in fastres.explain(model, x) if d.call is not None)


def test_a_module_is_never_slower_than_its_plain_policy(monkeypatch, fresh_dispatch):
    """With the C++ kernels made slow, a block whose stages would each pick them runs plain."""
    if backends.unavailable_reason("cpp") is not None:
        pytest.skip("needs the cpp backend")
    cpp = backends.get("cpp")
    real = cpp.module.forward

    def slow(*args, **kwargs):
        import time
        time.sleep(5e-3)
        return real(*args, **kwargs)
    monkeypatch.setattr(cpp.module, "forward", slow)
    block = fastres.TemporalBlock(4, 4, 3).eval()
    with torch.no_grad():
        block(torch.randn(2, 4, 64))
    (choice,) = dispatch.module.choices(block).values()
    assert choice.name != "cpp" and choice.times_s["cpp"] > choice.times_s["plain"]
    if choice.name != "plain":  # another path (oneDNN, say) won, by the margin: the median
        # of its round-by-round time ratio to plain, which the rule judges (not the medians')
        assert 0 < choice.ratio <= 0.95


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
    by_grad = {key[-1]: c for key, c in dispatch.module.choices(block).items()}
    assert by_grad[False].baseline == "plain" and "eager" not in by_grad[False].times_s
    assert by_grad[True].baseline == "eager" and "plain" not in by_grad[True].times_s
    assert by_grad[True].name != "plain"


def test_explain_says_why_a_hooked_batchnorm_runs_as_modules():
    block = fastres.TemporalBlock(4, 4, 3)
    seen = []
    block.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    report = fastres.explain(block, torch.randn(2, 4, 16))
    stage = next(d for d in report if d.module == "conv1")
    assert stage.backend == "eager" and "hooks" in stage.reason
    assert seen == [torch.Size([2, 4, 16])]  # the hook fired, once: nothing was measured
    assert any("hooks" in d.reason for d in report if d.level == "module")


def test_module_choices_persist_and_are_not_reused_for_another_structure(fresh_dispatch):
    import dataclasses
    real = dispatch.module.measure
    dispatch.module.measure = lambda *a, **k: dataclasses.replace(real(*a, **k), final=True)
    try:
        block = fastres.TemporalBlock(4, 4, 3).eval()
        x = torch.randn(2, 4, 64)
        with torch.no_grad():
            block(x)
        dispatch.forget()
        dispatch.module.measure = lambda *a, **k: pytest.fail("measured again")
        with torch.no_grad():
            copy.deepcopy(block).__dict__.pop("_fastres_choices", None)
            fresh = copy.deepcopy(block)
            fresh.__dict__.pop("_fastres_choices", None)
            fresh(x)  # the same structure and input: the stored choice
        (choice,) = dispatch.module.choices(fresh).values()
        assert choice.source == "cached"
        other = fastres.TemporalBlock(4, 4, 5).eval()  # another kernel size: measured
        dispatch.module.measure = lambda *a, **k: dataclasses.replace(real(*a, **k), final=True)
        with torch.no_grad():
            other(x)
        (choice,) = dispatch.module.choices(other).values()
        assert choice.source == "measured"
    finally:
        dispatch.module.measure = real


def test_the_onednn_training_program_is_a_candidate_that_trains_as_plain(monkeypatch,
                                                                         fresh_dispatch,
                                                                         fresh_seed):
    """In training on a CPU the module level also times the oneDNN training program
    (fastres/backends/onednn_train.py); where it wins, two SGD steps of the fused model
    match the plain twin's (outputs, every gradient, running statistics)."""
    from fastres.backends import onednn_train
    if onednn_train.unavailable_reason() is not None:
        pytest.skip(f"oneDNN training program: {onednn_train.unavailable_reason()}")
    real = dispatch.module.measure
    timed = []

    def measure_then_take_the_program(level, runs, *args, **kwargs):
        choice = real(level, runs, *args, **kwargs)
        timed.append(sorted(runs))
        return dataclasses.replace(choice, name="onednn-train", final=False)
    monkeypatch.setattr(dispatch.module, "measure", measure_then_take_the_program)
    torch.manual_seed(fresh_seed)
    fused = fastres.TemporalConvNet(4, [8, 8], kernel_size=3, dropout=0.0).train()
    plain = fastres.unfuse(copy.deepcopy(fused))
    models = {"fused": fused, "plain": plain}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    g = torch.Generator().manual_seed(fresh_seed)
    for step in range(2):
        x = torch.randn(3, 4, 50, generator=g)
        outs = {}
        for name, model in models.items():
            optimizers[name].zero_grad()
            outs[name] = model(x)
            outs[name].square().mean().backward()
            optimizers[name].step()
        assert rel_err(outs["fused"], outs["plain"]) < 1e-5
        for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
            assert rel_err(p, q) < 1e-5, n
        for b, c in zip(fused.buffers(), plain.buffers()):
            assert rel_err(b.double(), c.double()) < 1e-5
    assert timed and "onednn-train" in timed[0]
    (choice,) = dispatch.module.choices(fused).values()
    assert choice.name == "onednn-train"


def test_a_registered_whole_module_program_runs_where_offered_and_chosen(monkeypatch,
                                                                        fresh_dispatch):
    """Whole-module programs are what exists (fastres.backends.register_module_program):
    the module level times one only where its `offered` says, runs it once chosen, and
    runs the stages where it returns None for an input."""
    calls = []

    class Counting(backends.ModuleProgram):
        name = "counting"

        def offered(self, module, x, needs_grad):
            return not needs_grad

        def run(self, module, x):
            calls.append(x.shape[0])
            return None if x.shape[0] == 5 else module.plain_forward(x)
    monkeypatch.setitem(backends.module_programs(), "counting", Counting())
    real, timed = dispatch.module.measure, []

    def measure_then_take_it(level, runs, *args, **kwargs):
        timed.append(sorted(runs))
        choice = real(level, runs, *args, **kwargs)
        return dataclasses.replace(choice, name="counting") if "counting" in runs else choice
    monkeypatch.setattr(dispatch.module, "measure", measure_then_take_it)
    block = fastres.TemporalBlock(4, 4, 3).eval()
    plain = fastres.unfuse(copy.deepcopy(block))
    for batch in (2, 5):  # (5: the program declines the input, the stages run)
        x = torch.randn(batch, 4, 30)
        with torch.no_grad():
            for _ in range(2):
                before = len(calls)
                out = block(x)
                assert calls[before:] and calls[-1] == batch
                assert rel_err(out, plain(x)) < 1e-5
    assert timed and all("counting" in names for names in timed)
    block.train()
    block(torch.randn(2, 4, 30, requires_grad=True)).sum().backward()
    assert "counting" not in timed[-1]


@pytest.mark.parametrize("walk", ["python", "compiled"])
def test_hooked_sees_every_kind_of_hook_at_any_depth(walk, monkeypatch):
    """dispatch.module.hooked, asked on every call of a fused module: the compiled walk and
    the Python one agree on forward, pre-forward, backward and backward-pre hooks, on the
    module itself or any module below it."""
    if walk == "python":
        monkeypatch.setitem(_ext._DIRECT, "modules_hooked", None)
    elif _ext.direct("modules_hooked") is None:
        pytest.skip(f"the compiled walk: {_ext.load_error()}")
    net = fastres.TemporalConvNet(3, [4, 4], kernel_size=2)
    deep = net.network[1].bn2
    assert not dispatch.module.hooked(net) and not dispatch.module.hooked(None, net)
    for register in (lambda m: m.register_forward_hook(lambda *a: None),
                     lambda m: m.register_forward_pre_hook(lambda *a: None),
                     lambda m: m.register_full_backward_hook(lambda *a: None),
                     lambda m: m.register_full_backward_pre_hook(lambda *a: None)):
        handle = register(deep)
        assert dispatch.module.hooked(net) and dispatch.module.hooked(None, deep)
        assert not dispatch.module.hooked(net.network[0])
        handle.remove()
        assert not dispatch.module.hooked(net)
    hooks = torch.nn.modules.module
    for register in (hooks.register_module_forward_hook, hooks.register_module_forward_pre_hook,
                     hooks.register_module_full_backward_hook,
                     hooks.register_module_full_backward_pre_hook):
        with register(lambda *a: None):  # (a global hook: every module has it)
            assert dispatch.module.hooked(net)
        assert not dispatch.module.hooked(net)
