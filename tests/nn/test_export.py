"""Export: fastres.unfuse(model), then ONNX (run in onnxruntime) or TorchScript.

The exported model must compute what the fused model computes in eval mode (fp32 bound
1e-5), at a batch size and length other than the ones it was exported with, and hold no
fastres op. onnx, onnxruntime and onnxscript (torch's ONNX exporter needs it) are in the
"test" extra.
"""
import copy
import io

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch.export import Dim

import fastres
from fastres.conventions import rel_err
from fastres.nn import ConvBNReLUSequential
from model_parity import TOL
from upstream import SeedTCN, randomize_bn


def _resnet():
    return fastres.ResNet1d([1, 1, 1, 1], in_channels=2, num_classes=3, widths=(8, 8, 16, 16))


def _tcn():
    return fastres.TemporalConvNet(2, [8, 8, 6], kernel_size=3, dropout=0.1)


def _converted_seed_tcn():
    fused, report = fastres.convert(SeedTCN(2, [8, 6], kernel_size=3), return_report=True)
    assert len(report.swapped) == 2
    return fused


MODELS = {"ResNet1d": _resnet, "TemporalConvNet": _tcn, "converted SeedTCN": _converted_seed_tcn}


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def fused(request):
    torch.manual_seed(sorted(MODELS).index(request.param))
    return randomize_bn(MODELS[request.param]()).eval()


def _inputs(seed, batch, length):
    return torch.randn(batch, 2, length, generator=torch.Generator().manual_seed(seed))


def test_onnx_export_runs_in_onnxruntime(fused, tmp_path):
    plain = fastres.unfuse(fused)
    batch, length = Dim.AUTO, Dim.AUTO  # exported for any batch size and length
    program = torch.onnx.export(plain, (_inputs(0, 2, 64),), dynamo=True,
                                dynamic_shapes={"x": {0: batch, 2: length}}, verbose=False)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    assert not [n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, shape in ((1, (3, 100)), (2, (1, 37))):
        x = _inputs(seed, *shape)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = fused(x)
        assert got.shape == tuple(want.shape)
        assert rel_err(torch.from_numpy(np.ascontiguousarray(got)), want) < TOL


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_of_the_unfused_model(fused, how):
    plain = fastres.unfuse(fused)
    example = _inputs(3, 2, 64)
    compiled = torch.jit.script(plain) if how == "script" else torch.jit.trace(plain, example)
    buffer = io.BytesIO()
    torch.jit.save(compiled, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    # Tracing records the shapes' arithmetic for the example; a scripted model takes any.
    shapes = ((3, 100), (1, 37)) if how == "script" else ((2, 64),)
    for seed, shape in enumerate(shapes, start=4):
        x = _inputs(seed, *shape)
        with torch.no_grad():
            assert rel_err(loaded(x), fused(x)) < TOL


def test_unfused_model_keeps_fused_weights(fused):
    plain = fastres.unfuse(copy.deepcopy(fused))
    assert plain.state_dict().keys() == fused.state_dict().keys()
    fused_types = (fastres.TemporalBlock, fastres.BasicBlock, fastres.ResNet1d,
                   ConvBNReLUSequential)
    assert any(isinstance(m, fused_types) for m in fused.modules())
    assert not any(isinstance(m, fused_types) for m in plain.modules())
