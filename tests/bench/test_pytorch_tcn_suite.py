"""The pytorch-tcn suite (fastres/bench/pytorch_tcn.py): its candidates compute the same
model (fastres's is pytorch-tcn's converted), and a run gives a row per candidate."""
import pytest
import torch

from fastres.bench import pytorch_tcn as suite
from fastres.bench import runner
from fastres.conventions import rel_err

pytest.importorskip("pytorch_tcn", reason="pytorch-tcn is not installed (the bench extra)")


def _settings():
    return runner.Settings(size="quick", device=torch.device("cpu"), dtypes=[torch.float32],
                           only=["pytorch-tcn"], compile_mode=None)


def test_every_configuration_at_both_batches_and_modes():
    tasks = suite.tasks(_settings())
    seen = {(t.case["config"], t.case["batch"], t.case["mode"]) for t in tasks}
    assert seen == {(c, b, m) for c in suite.CONFIGS for b in suite.BATCHES
                    for m in ("train", "infer")}
    assert all(t.baseline == "pytorch-tcn" and t.impls == suite.IMPLS for t in tasks)


def test_candidates_compute_the_same_outputs():
    for task in suite.tasks(_settings()):
        if task.case["mode"] != "infer" or task.case["batch"] != 1:
            continue
        outs = [task.make(impl)() for impl in task.impls]
        assert rel_err(outs[1], outs[0]) < 1e-5, task.name


def test_a_task_runs_and_reports_the_speedup():
    task = suite.tasks(_settings())[0]
    config = runner.timing.TimingConfig(min_rounds=2, max_rounds=2, max_time_s=0.0,
                                        min_block_s=0.0, warmup_s=0.0, min_warmup_calls=1)
    task.timing = config
    rows = runner.run_task(task, _settings())
    assert [r["impl"] for r in rows] == suite.IMPLS
    assert all(r["status"] == "ok" and r["speedup"] > 0 for r in rows), rows
