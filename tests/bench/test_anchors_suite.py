"""The anchors suite (fastres/bench/anchors.py): its candidates compute the same function on
the same weights, each compiled candidate gets a graph of its own, and the suite is opt-in."""
import pytest
import torch

from fastres.bench import anchors, runner
from fastres.conventions import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def quick_settings(dtypes=(torch.float32,)):
    return runner.Settings(size="quick", device=CPU, dtypes=list(dtypes), only=["anchors"],
                           compile_mode=None)


def test_listed_but_opt_in():
    assert runner.SUITES["anchors"] is anchors
    settings = runner.make_settings("default", CPU, None)
    assert "anchors" not in settings.only  # minutes of compiling: only when named
    assert runner.make_settings("default", CPU, None, only=["anchors"]).only == ["anchors"]


def test_tasks_name_every_candidate_and_count_flops():
    tasks = anchors.tasks(quick_settings((torch.float32, torch.bfloat16)))
    rows = len(anchors._ROWS["quick"])
    infer = [t for t in tasks if t.case["mode"] == "infer"]
    train = [t for t in tasks if t.case["mode"] == "train"]
    assert len(infer) == 2 * rows and len(train) == rows  # training rows: float32 only
    for task in infer:
        assert task.impls == list(anchors.IMPLS) and task.baseline == "plain"
        assert set(task.compiled) == {"compiled", "compiled-freezing", "onnxruntime"}
        assert task.flops > 0
    for task in train:
        assert task.impls == list(anchors.TRAIN_IMPLS) and task.baseline == "plain"
        assert task.compiled == ["compiled"] and task.case["dtype"] == "float32"


@pytest.mark.parametrize("impl", ["fastres", "fastres-onednn"])
def test_candidates_agree_with_plain(impl):
    task = anchors.tasks(quick_settings())[0]
    plain, other = task.make("plain"), task.make(impl)
    # both rotate through the same input sets in the same order
    for _ in range(2):
        assert rel_err(other(), plain()) < 1e-5


@pytest.mark.parametrize("impl", ["fastres", "fastres-onednn-train"])
def test_train_candidates_agree_with_plain(impl):
    """Two SGD steps from the same weights on the same inputs: the same losses (the second
    after each candidate's own update)."""
    task = next(t for t in anchors.tasks(quick_settings()) if t.case["mode"] == "train")
    assert task.case["model"].startswith("TemporalBlock")
    plain, other = task.make("plain"), task.make(impl)
    for _ in range(2):
        assert rel_err(other().detach(), plain().detach()) < 1e-5


def test_onednn_train_runs_the_resnet_row_as_plain():
    """The ResNet1d training row through its training program: two SGD steps, the same
    losses as plain (the strided convs' weight gradients are the program's own GEMM)."""
    task = next(t for t in anchors.tasks(quick_settings()) if t.case["mode"] == "train"
                and t.case["model"].startswith("ResNet1d"))
    plain, other = task.make("plain"), task.make("fastres-onednn-train")
    for _ in range(2):
        assert rel_err(other().detach(), plain().detach()) < 1e-5


def test_compiled_candidates_do_not_share_a_graph():
    """torch.compile of two models of one class would share one dynamo cache entry: each
    candidate compiles behind a code object of its own."""
    first, second = anchors._entry(torch.nn.Identity()), anchors._entry(torch.nn.Identity())
    assert first.__code__ is not second.__code__
    assert first.__code__.co_name != second.__code__.co_name


def test_onnxruntime_refuses_bf16_with_a_reason():
    pytest.importorskip("onnxruntime")
    with pytest.raises(RuntimeError, match="no torch.bfloat16 convolution"):
        anchors._onnxruntime_forward(torch.nn.Identity(), torch.zeros(1, 1, 4).bfloat16())
