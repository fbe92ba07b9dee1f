"""fastres/timing.py: the one timer's statistics and its interleaved loop."""
import numpy as np
import pytest
import torch

from fastres import timing


@pytest.mark.parametrize("n", [1, 2, 3, 7, 30])
def test_quartiles_interpolate_as_numpy_does(n):
    samples = list(np.random.default_rng(n).exponential(1e-3, n))
    stats = timing.Stats(samples, 1, 0.0)
    expected = np.percentile(samples, [25, 50, 75])  # numpy's default: linear
    np.testing.assert_allclose(stats.quartiles(), expected, rtol=1e-12)
    assert stats.median_s == pytest.approx(expected[1], rel=1e-12)
    assert stats.spread == pytest.approx((expected[2] - expected[0]) / expected[1], rel=1e-9)
    doc = stats.to_json()
    assert doc["times_s"] == samples and doc["rounds"] == n and doc["min_s"] == min(samples)
    assert (doc["p25_s"], doc["median_s"], doc["p75_s"]) == pytest.approx(tuple(expected))


def test_measure_interleaves_and_keeps_a_failing_candidate_apart():
    order = []
    config = timing.TimingConfig(min_rounds=4, max_rounds=4, max_time_s=0.0, min_block_s=0.0,
                                 warmup_s=0.0, min_warmup_calls=1)

    def broken():
        raise ValueError("no")
    results = timing.measure({"a": lambda: order.append("a"), "b": lambda: order.append("b"),
                              "broken": broken}, torch.device("cpu"), config)
    assert isinstance(results["broken"], ValueError)
    assert [len(results[n].times_s) for n in "ab"] == [4, 4]
    rounds = order[-8:]  # after first calls and warm-up: one call each per round, rotating
    assert rounds == ["a", "b", "b", "a", "a", "b", "b", "a"]


@pytest.mark.parametrize("min_block_calls", [1, 2, 3])
def test_a_block_holds_at_least_min_block_calls(min_block_calls):
    """However long one call is, a timed block runs min_block_calls of them (the module
    level's blocks: two, so no sample is only a cold first call)."""
    calls = []
    config = timing.TimingConfig(min_rounds=2, max_rounds=2, max_time_s=0.0, min_block_s=0.0,
                                 warmup_s=0.0, min_warmup_calls=1,
                                 min_block_calls=min_block_calls)
    results = timing.measure({"a": lambda: calls.append(1)}, torch.device("cpu"), config)
    assert results["a"].number == min_block_calls
    assert len(calls) == 2 + 2 * min_block_calls  # first call, warm-up, two rounds
