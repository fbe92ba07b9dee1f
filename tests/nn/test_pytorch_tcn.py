"""fastres against pytorch-tcn itself: its TCN converted by fastres.convert, over a grid of
its options, judged as every fused module is (tests/model_parity.py): outputs, the input's,
the embeddings' and every parameter's gradient, and the running statistics, each against
pytorch-tcn run in float64, within docs/spec.md's fp32 bound (or twice plain float32
pytorch-tcn's own error, where deep stacks compound rounding past it). Fresh random
inputs and upstream gradients every step; same weights (convert copies them).

Options fastres cannot take raise errors that name the option.
"""
import contextlib
import copy
import itertools
import random
import warnings

import pytest
import torch

import fastres
from fastres.conventions import rel_err
from fastres.nn import pytorch_tcn as tcn_map
from availability import cpu_backends
from model_parity import TOL, _check, grad_scale, strict_fp32

pytorch_tcn = pytest.importorskip(
    "pytorch_tcn", reason="pytorch-tcn is not installed (pip install pytorch-tcn, or the "
    "test extra): the parity grid runs against it")

B, C_IN, L = 3, 4, 24
CHANNELS = [6, 6, 5]

OPTIONS = dict(
    use_norm=["weight_norm", "batch_norm", "layer_norm", None],
    activation=["relu", "gelu", "tanh", "leaky_relu", "elu"],
    use_skip_connections=[False, True],
    use_gate=[False, True],
    causal=[True, False],
    input_shape=["NCL", "NLC"],
    embeddings=[None, "add", "concat"],
    output=[None, "projection", "projection+activation"],
    dilation_reset=[None, 2],
)
DEFAULTS = {name: values[0] for name, values in OPTIONS.items()}


def _grid():
    """Every value of every option once (the rest at pytorch-tcn's defaults), then random
    combinations of all options (fixed seed, so the ids are stable)."""
    configs = [dict(DEFAULTS)]
    for name, values in OPTIONS.items():
        for value in values[1:]:
            configs.append({**DEFAULTS, name: value})
    rng = random.Random(25)
    for _ in range(20):
        configs.append({name: rng.choice(values) for name, values in OPTIONS.items()})
    return configs


def _config_id(config):
    changed = [f"{k}={v}" for k, v in config.items() if v != DEFAULTS[k]]
    return ",".join(changed) or "defaults"


GRID = _grid()


def _tcn_kwargs(config, dropout=0.0):
    kw = dict(kernel_size=3, dropout=dropout, use_norm=config["use_norm"],
              activation=config["activation"],
              use_skip_connections=config["use_skip_connections"],
              use_gate=config["use_gate"], causal=config["causal"],
              input_shape=config["input_shape"], dilation_reset=config["dilation_reset"])
    if config["embeddings"] is not None:
        kw.update(embedding_shapes=[(3,), (2, L)], embedding_mode=config["embeddings"])
    if config["output"] is not None:
        kw["output_projection"] = 3
    if config["output"] == "projection+activation":
        kw["output_activation"] = "sigmoid"
    return kw


def _pytorch_tcn(config, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its xavier-with-gelu gain warning
        model = pytorch_tcn.TCN(C_IN, CHANNELS, **_tcn_kwargs(config, dropout))
    # Batch / layer norm parameters and running statistics off their init values.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def _inputs(config, g, dtype=torch.float64):
    x = torch.randn(B, C_IN, L, generator=g, dtype=dtype)
    if config["input_shape"] == "NLC":
        x = x.transpose(1, 2).contiguous()
    if config["embeddings"] is None:
        return x, None
    return x, [torch.randn(B, 3, generator=g, dtype=dtype),
               torch.randn(B, 2, L, generator=g, dtype=dtype)]


def _convert(model):
    fused, report = fastres.convert(model, return_report=True)
    assert isinstance(fused, fastres.TemporalConvNet), report.summary()
    assert len(report.swapped) == 1 and not report.skipped, report.summary()
    return fused


def _run(model, x, embeddings, dtype, seed):
    xm = x.to(dtype).requires_grad_()
    em = None if embeddings is None else [e.to(dtype).requires_grad_() for e in embeddings]
    torch.manual_seed(seed)  # the same dropout masks in every model
    out = model(xm) if em is None else model(xm, embeddings=em)
    return xm, em, out


def _assert_matches(fused, plain, steps=2, seed=0, config=None, backend=None):
    """Train steps (forward + backward) then eval; every number of `fused` against `plain`
    (pytorch-tcn) run in float64. backend: forced on every fused stage (None: measured)."""
    reference = copy.deepcopy(plain).double()
    models = (fused, plain, reference)
    g = torch.Generator().manual_seed(seed)
    for m in models:
        m.train()
    forced = fastres.use_backend(backend) if backend else contextlib.nullcontext()
    with strict_fp32(), forced:
        for step in range(steps):
            x, embeddings = _inputs(config, g)
            grad, results = None, []
            for m in models:
                dtype = torch.float64 if m is reference else torch.float32
                xm, em, out = _run(m, x, embeddings, dtype, 100 + step)
                if grad is None:
                    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
                params = dict(m.named_parameters())
                leaves = [xm] + (em or []) + list(params.values())
                grads = torch.autograd.grad(out, leaves, grad.to(dtype), allow_unused=True)
                n_in = 1 + len(em or [])
                results.append((out, grads[:n_in], dict(zip(params, grads[n_in:]))))
            (out_f, gin_f, gp_f), (out_p, gin_p, gp_p), (out_r, gin_r, gp_r) = results
            assert out_f.shape == out_r.shape
            _check(f"step {step} output", out_f, out_p, out_r)
            for i, (a, b, c) in enumerate(zip(gin_f, gin_p, gin_r)):
                _check(f"step {step} gradient of input {i}", a, b, c)
            assert gp_f.keys() == gp_r.keys()
            for name, want in gp_r.items():
                if want is None:  # e.g. embedding_projection_2 in "add" mode, as upstream
                    assert gp_f[name] is None, name
                    continue
                _check(f"step {step} gradient of {name}", gp_f[name], gp_p[name], want,
                       grad_scale(name, gp_r))
        buffers = [{k: v for k, v in m.named_buffers() if not k.endswith("padder.buffer")}
                   for m in models]
        assert buffers[0].keys() == buffers[2].keys()
        for name, buf in buffers[0].items():
            if name.endswith("num_batches_tracked"):
                assert buf.item() == buffers[2][name].item() == steps, name
            else:
                _check(f"buffer {name}", buf, buffers[1][name], buffers[2][name])
        for m in models:
            m.eval()
        x, embeddings = _inputs(config, g)
        with torch.no_grad():
            outs = [_run(m, x, embeddings, torch.float64 if m is reference else torch.float32,
                         0)[2] for m in models]
        _check("eval output", *outs)


@pytest.mark.parametrize("backend", [None, "cpp", "composite"],
                         ids=["measured", "cpp", "composite"])
@pytest.mark.parametrize("config", GRID, ids=[_config_id(c) for c in GRID])
def test_converted_matches_pytorch_tcn(config, backend):
    """At these sizes the measured policy mostly picks the plain twin's code; forcing a
    fused backend runs every stage that fuses through the op."""
    if backend is not None and backend not in cpu_backends():
        pytest.skip(f"backend {backend} unavailable here")
    plain = _pytorch_tcn(config)
    fused = _convert(plain)
    _assert_matches(fused, plain, config=config, backend=backend)


@pytest.mark.parametrize("config", [DEFAULTS, {**DEFAULTS, "use_norm": "batch_norm"},
                                    {**DEFAULTS, "use_skip_connections": True}],
                         ids=["weight_norm", "batch_norm", "skips"])
def test_dropout_draws_the_same_masks(config):
    """With dropout active in training, the fused model draws its masks in pytorch-tcn's
    order: the same seed gives the same outputs and gradients."""
    plain = _pytorch_tcn(config, dropout=0.3)
    fused = _convert(plain)
    _assert_matches(fused, plain, config=config)


@pytest.mark.parametrize("config", GRID[:12], ids=[_config_id(c) for c in GRID[:12]])
def test_same_seed_builds_the_same_model(config):
    """TemporalConvNet with pytorch-tcn's options and initializer, from one seed, holds
    pytorch-tcn's weights (creation order and gains as upstream)."""
    plain = _pytorch_tcn(config, seed=7)
    options = tcn_map.tcn_options(plain)
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fastres.TemporalConvNet(**{**options, "dilations": None,
                                           "dilation_reset": config["dilation_reset"]},
                                        kernel_initializer="xavier_uniform")
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = pytorch_tcn.TCN(C_IN, CHANNELS, **_tcn_kwargs(config))
    want = tcn_map.state_dict_from_pytorch_tcn(fresh.state_dict())
    got = fused.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("config", GRID[:12], ids=[_config_id(c) for c in GRID[:12]])
def test_state_dict_loads_both_ways(config):
    plain = _pytorch_tcn(config, seed=3)
    fused = _convert(plain)
    # fastres -> pytorch-tcn: strict, every value equal
    other = _pytorch_tcn(config, seed=4)
    other.load_state_dict(tcn_map.state_dict_to_pytorch_tcn(fused), strict=True)
    for name, value in plain.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
    # pytorch-tcn -> fastres: strict, into a TemporalConvNet built from the options alone
    rebuilt = fastres.TemporalConvNet(**tcn_map.tcn_options(plain))
    rebuilt.load_state_dict(tcn_map.state_dict_from_pytorch_tcn(plain.state_dict()),
                            strict=True)
    x, embeddings = _inputs(config, torch.Generator().manual_seed(0), torch.float32)
    rebuilt.eval(), plain.eval()
    with torch.no_grad():
        args = (x,) if embeddings is None else (x, embeddings)
        assert rel_err(rebuilt(*args), plain(*args)) < TOL


def test_unfuse_of_a_converted_tcn_is_plain_and_equal():
    config = {**DEFAULTS, "use_norm": "batch_norm", "use_skip_connections": True,
              "input_shape": "NLC"}
    plain = _pytorch_tcn(config).eval()
    fused = _convert(plain).eval()
    unfused = fastres.unfuse(fused)
    assert type(unfused.network[0]).__name__ == "PlainTCNBlock"
    x, _ = _inputs(config, torch.Generator().manual_seed(1), torch.float32)
    with torch.no_grad():
        assert rel_err(unfused(x), plain(x)) < TOL
    back = fastres.convert(unfused)
    assert type(back.network[0]).__name__ == "TCNBlock"


def test_convert_leaves_unsupported_models_with_the_option_named():
    model = _pytorch_tcn(DEFAULTS, dropout=0.1)
    model.network[1].dropout2.p = 0.5  # not one dropout: no TemporalConvNet argument says so
    converted, report = fastres.convert(model, return_report=True)
    assert type(converted) is type(model)
    assert not report.swapped
    assert "dropout" in report.summary() and "pytorch-tcn" in report.summary()


def test_convert_leaves_a_model_the_probe_disagrees_with():
    model = _pytorch_tcn(DEFAULTS)
    model.network[0].activation2 = torch.nn.Tanh()  # edited after construction
    converted, report = fastres.convert(model, return_report=True)
    assert type(converted) is type(model)
    assert "probe outputs differ" in report.summary()


def test_convert_inside_a_model():
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tcn = pytorch_tcn.TCN(C_IN, CHANNELS, kernel_size=3, use_norm="batch_norm")
            self.head = torch.nn.Linear(CHANNELS[-1], 2)

        def forward(self, x):
            return self.head(self.tcn(x)[..., -1])

    model = Classifier().eval()
    fused, report = fastres.convert(model, return_report=True)
    assert [s.name for s in report.swapped] == ["tcn"]
    x = torch.randn(B, C_IN, L)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < TOL


@pytest.mark.parametrize("build, match", [
    (lambda: fastres.TemporalConvNet(4, [4, 4], dilations=[1, 2], dilation_reset=2),
     "dilations and dilation_reset"),
    (lambda: fastres.TemporalConvNet(4, [4, 4], dilations=[1]), "dilations lists 1 levels"),
    (lambda: fastres.TemporalConvNet(4, [4], dilation_reset=0), "dilation_reset must be"),
    (lambda: fastres.TemporalConvNet(4, [4], norm="group"), "norm must be one of"),
    (lambda: fastres.TemporalConvNet(4, [4], activation="swish"), "activation must be one of"),
    (lambda: fastres.TemporalConvNet(4, [4], output_activation="swish"),
     "output_activation must be one of"),
    (lambda: fastres.TemporalConvNet(4, [4], output_projection=0), "output_projection must"),
    (lambda: fastres.TemporalConvNet(4, [4], input_layout="LNC"), "input_layout must be"),
    (lambda: fastres.TemporalConvNet(4, [4], causal="yes"), "causal must be"),
    (lambda: fastres.TemporalConvNet(4, [4], gate=1.0), "gate must be"),
    (lambda: fastres.TemporalConvNet(4, [4], skip_connections="yes"), "skip_connections must"),
    (lambda: fastres.TemporalConvNet(4, [4], embedding_shapes=[(2,)], embedding_mode="mul"),
     "embedding_mode must be"),
    (lambda: fastres.TemporalConvNet(4, [4], embedding_shapes=[(2, 3, 4)]),
     "embedding_shapes"),
    (lambda: fastres.TemporalConvNet(4, [4], kernel_initializer="orthogonal"),
     "kernel_initializer must be"),
    (lambda: fastres.TemporalConvNet(4, [4], activation="gelu",
                                     kernel_initializer="kaiming_uniform"),
     "kernel_initializer='kaiming_uniform' does not support activation='gelu'"),
    (lambda: fastres.TemporalConvNet(4, [4], gate=True, block="temporal"), "gate=True"),
    (lambda: fastres.TemporalConvNet(4, [4], block="wavenet"), "block must be"),
    (lambda: fastres.TemporalConvNet(4, [4], lookahead=1), "lookahead"),
])
def test_refused_options_name_the_option(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_embeddings_raise():
    net = fastres.TemporalConvNet(4, [6], kernel_size=3, embedding_shapes=[(3,)])
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="embedding_shapes entry"):
        net(x, [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="steps"):
        net(x, [torch.randn(2, 3, 15)])
    plain = fastres.TemporalConvNet(4, [6], kernel_size=3)
    with pytest.raises(ValueError, match="without embedding_shapes"):
        plain(x, [torch.randn(2, 3)])


@pytest.mark.parametrize("options", [dict(input_layout="NLC"), dict(output_projection=3),
                                     dict(output_activation="tanh")],
                         ids=["NLC", "projection", "output_activation"])
def test_network_options_on_temporal_blocks(options):
    """NLC, an output projection and an output activation around TemporalBlocks: computed
    around the stack (never by the whole-network path, which runs the stack alone), and
    refused by fastres.stream."""
    torch.manual_seed(0)
    net = fastres.TemporalConvNet(4, [6, 6], kernel_size=3, **options).eval()
    assert type(net.network[0]) is fastres.TemporalBlock and not net.stack_only
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        want = net.network(x)
        if net.projection_out is not None:
            want = net.projection_out(want)
        if net.activation_out is not None:
            want = net.activation_out(want)
        xin = x.transpose(1, 2) if options.get("input_layout") == "NLC" else x
        got = net(xin)
        if options.get("input_layout") == "NLC":
            assert got.shape == (1, 32, 6)
            got = got.transpose(1, 2)
    assert rel_err(got, want) < TOL
    with pytest.raises(fastres.StreamError, match="beyond the stack of blocks"):
        fastres.stream(net)


def test_nlc_enters_the_blocks_as_a_view():
    net = fastres.TemporalConvNet(4, [6], kernel_size=3, input_layout="NLC").eval()
    seen = []
    net.network[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 32, 4)
    with torch.no_grad():
        net(x)
    assert seen[0].data_ptr() == x.data_ptr() and seen[0].shape == (2, 4, 32)


@pytest.mark.parametrize("use_norm", ["weight_norm", "batch_norm"])
def test_skip_network_is_chosen_for_at_the_module_level(use_norm, fresh_seed):
    """A converted skip-connection TCN (NCL, nothing else beyond its blocks) runs under one
    module-level choice, as a stack of blocks does, and that level's plain policy computes
    exactly what its unfused twin computes (training, dropout drawn from the same seed)."""
    config = {**DEFAULTS, "use_skip_connections": True, "use_norm": use_norm}
    model = _convert(_pytorch_tcn(config, dropout=0.2, seed=fresh_seed)).train()
    x = torch.randn(B, C_IN, L, generator=torch.Generator().manual_seed(fresh_seed))
    report = str(fastres.explain(model, x))
    assert "(whole module)" in report and "policy:" in report, report
    plain = fastres.unfuse(copy.deepcopy(model)).train()
    outs = []
    for run in (model.plain_forward, plain):
        torch.manual_seed(fresh_seed)
        outs.append(run(x))
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


def test_explain_names_why_stages_run_plain():
    net = fastres.TemporalConvNet(4, [6, 6], kernel_size=3, norm="layer", gate=True,
                                  activation="selu")
    # Run stage by stage (a forced backend: a measured "plain" policy would run the
    # blocks' plain twins, with no stage to explain).
    with fastres.use_backend("eager"):
        report = str(fastres.explain(net, torch.randn(2, 4, 16)))
    assert "gating" in report and "not one the fused op's epilogue computes" in report
    assert "layer norm" not in report  # (fused: the op's norm="layer")


def test_defaults_are_unchanged():
    """The default TemporalConvNet is still locuslab's stack of TemporalBlocks: same keys,
    same draws from one seed, forward = its stack."""
    torch.manual_seed(0)
    net = fastres.TemporalConvNet(3, [5, 5], kernel_size=2)
    torch.manual_seed(0)
    blocks = [fastres.TemporalBlock(3, 5, 2, dilation=1, dropout=0.2),
              fastres.TemporalBlock(5, 5, 2, dilation=2, dropout=0.2)]
    assert net.stack_only and all(type(b) is fastres.TemporalBlock for b in net.network)
    want = torch.nn.Sequential(*blocks).state_dict()
    got = net.network.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [k for k in net.state_dict() if not k.startswith("network.")] == []


def test_pytorch_tcn_dilation_schedule():
    for levels, reset in itertools.product([1, 3, 7], [None, 1, 2, 4, 8]):
        net = fastres.TemporalConvNet(2, [3] * levels, kernel_size=2, dilation_reset=reset)
        upstream = pytorch_tcn.TCN(2, [3] * levels, kernel_size=2, dilation_reset=reset)
        assert [b.conv1.dilation[0] for b in net.network] == list(upstream.dilations)


ACTIVATION_CONFIGS = [{**DEFAULTS, "activation": a, "use_norm": n}
                      for a, n in [("gelu", "batch_norm"), ("tanh", None),
                                   ("leaky_relu", "weight_norm"), ("elu", "batch_norm"),
                                   ("relu", "layer_norm"), ("gelu", "layer_norm")]]


@pytest.mark.parametrize("config", ACTIVATION_CONFIGS, ids=_config_id)
def test_activations_and_layer_norm_run_fused(config, monkeypatch):
    """Every stage of a gelu / tanh / leaky_relu / elu / layer-norm TCN runs through the
    fused stage with its activation, on the C++ kernels, and the model matches pytorch-tcn
    (train steps, gradients, running statistics, eval)."""
    if "cpp" not in cpu_backends():
        pytest.skip("backend cpp unavailable here")
    from fastres.nn import tcn_block
    real = tcn_block.conv_bn_relu_stage
    activations = []

    def stage(*args, activation="relu", **kwargs):
        activations.append(activation)
        return real(*args, activation=activation, **kwargs)
    monkeypatch.setattr(tcn_block, "conv_bn_relu_stage", stage)
    plain = _pytorch_tcn(config)
    fused = _convert(plain)
    _assert_matches(fused, plain, config=config, backend="cpp")
    want = {"gelu": "gelu", "tanh": "tanh", "leaky_relu": "leaky_relu", "elu": "elu",
            "relu": "relu"}
    assert activations and {a.partition(":")[0] for a in activations} \
        == {want[config["activation"]]}


def test_explain_says_which_activations_the_op_does_not_compute():
    net = fastres.TemporalConvNet(4, [6, 6], kernel_size=3, norm="batch", activation="gelu")
    with fastres.use_backend("eager"):
        report = str(fastres.explain(net, torch.randn(2, 4, 16)))
    assert "not one the fused op's epilogue computes" not in report
    net = fastres.TemporalConvNet(4, [6, 6], kernel_size=3, norm="batch", activation="selu")
    with fastres.use_backend("eager"):
        report = str(fastres.explain(net, torch.randn(2, 4, 16)))
    assert "not one the fused op's epilogue computes" in report
