"""fastres.stream's fold: what streams, what is refused (naming the module and why), and
telling when the model changed since the fold."""
import random

import pytest
import torch
from torch import nn

import fastres
from fastres import stream as stream_fn
from fastres.stream import StreamError
from stream_helpers import (CPU_BACKENDS, assert_parity, full_forward, in_channels,
                            random_input, random_tcn, requires_cpp)
from upstream import SeedTCN, SeedTemporalBlock, warnings_ignored


def test_stale_and_refold_keep_the_state():
    rng = random.Random(14)
    model = random_tcn(rng, "batch", max_levels=3)
    x = random_input(rng, in_channels(model), 10, 1, torch.float32)
    s = stream_fn(model, backend=CPU_BACKENDS[0])
    s.step(x[..., :4])
    assert not s.stale()
    # The last conv's output feeds no ring, so after changing it (through .data: no version
    # counter moves) and refolding, the kept state continues as the new model's forward.
    model.network[-1].conv2.weight.data.mul_(1.5)
    assert s.stale()
    s.refold()
    assert not s.stale() and s.position == 4
    assert_parity(s.step(x[..., 4:]), full_forward(model, x)[..., 4:], torch.float32)


# ----------------------------------------------------------------------------- refusals


def _bn_training():
    net = fastres.TemporalConvNet(2, [4], kernel_size=2).eval()
    net.network[0].bn2.train()
    return net, "network.0.bn2 (BatchNorm1d): batch norm in training mode"


def _no_running_stats():
    net = fastres.TemporalConvNet(2, [4], kernel_size=2).eval()
    net.network[0].bn1 = nn.BatchNorm1d(4, track_running_stats=False).eval()
    return net, "without running statistics"


def _seed_tcn_root():
    return fastres.convert(SeedTCN(2, [4, 4])), "if its forward runs .network, stream that"


REFUSED = {
    "same padding (BasicBlock)": lambda: (fastres.BasicBlock(4, 4).eval(), "'same' padding"),
    "ResNet1d": lambda: (fastres.ResNet1d(in_channels=2).eval(), "ResNet1d"),
    "stride (causal BasicBlock)": lambda: (
        fastres.BasicBlock(4, 8, 2, "auto", causal=True).eval(), "stride 2"),
    "stride (1x1 conv)": lambda: (nn.Conv1d(4, 4, 1, stride=2), "stride 2"),
    "bare conv with kernel 3": lambda: (nn.Conv1d(4, 4, 3, padding=1), "kernel_size 3"),
    "training-mode batch norm": lambda: (
        fastres.TemporalConvNet(2, [4], dropout=0.0).train(),
        "network.0.bn1 (BatchNorm1d): batch norm in training mode"),
    "one BN in training mode": _bn_training,
    "BN without running stats": _no_running_stats,
    "active dropout": lambda: (
        fastres.TemporalConvNet(2, [4], dropout=0.2, norm="weight").train(),
        "dropout (p=0.2) is active in training mode"),
    "unknown module": lambda: (nn.Sequential(nn.LSTM(4, 4)), "0 (LSTM): unknown module"),
    "upstream block not converted": lambda: (SeedTemporalBlock(4, 4, 3),
                                             "fastres.convert(model) first"),
    "converted model root": _seed_tcn_root,
    "fused conv runs": lambda: (fastres.convert(nn.Sequential(
        nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())).eval(),
        "ConvBNReLUSequential"),
    "channel mismatch": lambda: (nn.Sequential(fastres.TemporalConvNet(2, [4]).eval(),
                                               nn.Conv1d(5, 3, 1)), "takes 5 channels"),
    "leading ReLU": lambda: (nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 1)),
                             "cannot start with a ReLU"),
    "nothing to stream": lambda: (nn.Sequential(nn.Identity()), "no layer to stream"),
    "grouped conv": lambda: (nn.Conv1d(4, 4, 1, groups=2), "grouped"),
    "not a module": lambda: ("model", "expected an nn.Module"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_models_say_which_module_and_why(case):
    with warnings_ignored():
        model, message = REFUSED[case]()
    with pytest.raises(StreamError) as exc:
        stream_fn(model, backend="torch")
    assert message in str(exc.value), str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_train_mode_without_bn_or_active_dropout_streams():
    # Training mode changes nothing here (weight norm, dropout 0): nothing to refuse.
    torch.manual_seed(0)
    net = fastres.TemporalConvNet(2, [4, 4], kernel_size=2, dropout=0.0, norm="weight").train()
    x = torch.randn(1, 2, 7)
    assert_parity(stream_fn(net, backend="torch").step(x), full_forward(net, x), torch.float32)



@pytest.mark.parametrize("change", ["bn eps", "conv dilation"])
def test_every_attribute_that_changes_the_result_makes_the_fold_stale(change):
    rng = random.Random(change)
    model = random_tcn(rng, "batch", max_levels=2)
    x = random_input(rng, in_channels(model), 12, 2, torch.float32)
    s = stream_fn(model, backend="torch")
    assert not s.stale()
    block = model.network[0]
    if change == "bn eps":
        block.bn1.eps = 0.5   # a large eps changes every folded scale
    else:   # what the fold reads as the block's dilation
        block.conv1.dilation = block.conv2.dilation = (2,)
    assert s.stale(), change
    if change == "bn eps":
        s.refold()   # the refolded stream computes with the new eps
        assert not s.stale()
        assert_parity(s.step(x), full_forward(model, x), torch.float32)


@requires_cpp
def test_the_compiled_walk_gives_what_the_python_walk_gives():
    """fastres._C.stream_sources (the staleness check's walk on every whole-stack call) against
    fold.py's Python walk: the same modes in the same order and the same tensor objects, on
    a model with a shared module (walked once), absent children, parameters and buffers
    (None), weight norm's parametrizations and both modes; anything else a TypeError."""
    import fastres._C as extension
    from fastres.stream import fold
    torch.manual_seed(0)
    for norm, training in (("batch", False), ("weight", True), (None, False)):
        net = fastres.TemporalConvNet(3, [6, 4], kernel_size=2, norm=norm).train(training)
        net.network[0].shared = net.network[1]        # a child twice: walked once
        net.network[1].absent = None                  # a None child
        net.network[1].conv1.register_parameter("spare", None)
        net.network[1].conv1.register_buffer("nothing", None)
        net.network[0].conv1.padding = (7,)           # an attribute that changes the result
        want = fold._walk_sources(net)
        got = extension.stream_sources(net, fold._RESULT_ATTRS)
        assert got[1] == want[1] and len(got[0]) == len(want[0])
        assert all(a is b for a, b in zip(got[0], want[0]))
        assert fold._sources(net)[1] == want[1]
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        extension.stream_sources(object(), fold._RESULT_ATTRS)
    with pytest.raises(TypeError):
        extension.stream_sources(net, list(fold._RESULT_ATTRS))


@requires_cpp
def test_the_value_check_sees_every_changed_bit(fresh_seed):
    """fastres._C.stream_same_values (Snapshot.matches and the oneDNN packs, through
    fastres._ext.same_values) against the torch.ops twin on a model's own tensors: equal
    copies match; one value moved by one ulp (either way, anywhere in any tensor), a NaN
    put in, a shape or dtype changed, a tensor missing do not; NaNs with the same bits
    match; a non-contiguous tensor is compared by value; anything but tensors is a
    TypeError."""
    import fastres._C as extension
    from fastres import _ext
    from fastres.stream import fold
    rng = random.Random(fresh_seed)
    model = random_tcn(rng, rng.choice(["batch", "weight"]), max_levels=3).eval()
    tensors, _ = fold._sources(model)
    tensors = [t.detach() for t in tensors]
    both = (extension.stream_same_values,
            lambda a, b: torch.ops.fastres_ext.stream_same_values.default(list(a), list(b)))

    def same(now, then):
        answers = {compare(now, then) for compare in both}
        assert len(answers) == 1, "the direct call and torch.ops disagree"
        return answers.pop()
    copies = [t.clone() for t in tensors]
    assert same(tensors, copies) and _ext.same_values(tensors, copies)
    assert same([], []) and not same(tensors, copies[:-1])
    floats = [i for i, t in enumerate(tensors) if t.is_floating_point() and t.numel()]
    for _ in range(20):
        i = rng.choice(floats)
        k = rng.randrange(tensors[i].numel())
        moved = [t.clone() for t in copies]
        flat = moved[i].view(-1)
        toward = torch.tensor(rng.choice([float("inf"), -float("inf")]), dtype=flat.dtype)
        flat[k] = torch.nextafter(flat[k], toward)   # one ulp
        assert not same(tensors, moved) and not _ext.same_values(tensors, moved)
        flat[k] = float("nan")
        assert not same(tensors, moved)
        with_nan = [t.clone() for t in moved]        # the same NaN bits on both sides
        assert same(moved, with_nan)
    i = floats[0]
    changed = list(copies)
    changed[i] = copies[i].double()
    assert not same(tensors, changed)
    changed[i] = copies[i].reshape(-1, 1)
    assert not same(tensors, changed)
    wide = torch.randn(5, 8)
    assert same([wide[:, ::2]], [wide[:, ::2].clone()])          # not contiguous
    assert not same([wide[:, ::2]], [wide[:, 1::2].clone()])
    with pytest.raises(TypeError, match="tensors only"):
        extension.stream_same_values(tensors, [1.0] * len(tensors))
    with pytest.raises(TypeError, match="must be a sequence"):
        extension.stream_same_values(3, copies)
