"""pytest-benchmark runs of the `fastres bench` suites (same cases, same candidates).

    pytest benchmarks/                                   # default size, CUDA if present
    pytest benchmarks/ --fastres-size quick              # a smoke run
    pytest benchmarks/test_bench_op.py --benchmark-save=base
    pytest benchmarks/test_bench_op.py --benchmark-compare   # against the last saved run

Each test is one (case, implementation) pair of a suite; its benchmark group is the case,
so pytest-benchmark's table and --benchmark-compare line the implementations up per case.
Compilation is kept out of the timed rounds: the first call (compile included) is made
and recorded in extra_info before pytest-benchmark starts timing.
"""
import time

import pytest
import torch

from fastres.bench import runner, timing


def pytest_addoption(parser):
    group = parser.getgroup("fastres", "fastres benchmark matrix")
    group.addoption("--fastres-size", default="default", choices=runner.SIZES,
                    help="matrix size, as fastres bench (default: default)")
    group.addoption("--fastres-device", default=None, choices=["cpu", "cuda"],
                    help="default: cuda when available, else cpu")
    group.addoption("--fastres-dtype", default=None,
                    help="comma-separated dtypes (default: as fastres bench)")
    group.addoption("--fastres-compile", default="auto",
                    choices=["auto", "default", "max-autotune", "none"],
                    help="torch.compile mode of the compiled candidates (as fastres bench)")


def _settings(config) -> runner.Settings:
    device = config.getoption("--fastres-device") or (
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype_text = config.getoption("--fastres-dtype")
    return runner.make_settings(config.getoption("--fastres-size"), torch.device(device),
                                runner.parse_dtypes(dtype_text) if dtype_text else None,
                                config.getoption("--fastres-compile"))


@pytest.fixture(scope="session")
def fastres_settings(request):
    return _settings(request.config)


def pytest_generate_tests(metafunc):
    """Parametrize `bench_case` with (task, impl) of the test module's SUITE."""
    if "bench_case" not in metafunc.fixturenames:
        return
    settings = _settings(metafunc.config)
    if settings.device.type == "cuda" and not torch.cuda.is_available():
        metafunc.parametrize("bench_case", [pytest.param(
            None, marks=pytest.mark.skip(reason="no CUDA device here"))], ids=["no-cuda"])
        return
    suite = runner.load_suite(metafunc.module.SUITE)
    reason = suite.unavailable_reason(settings)
    if reason:
        metafunc.parametrize("bench_case", [pytest.param(
            None, marks=pytest.mark.skip(reason=reason))], ids=["unavailable"])
        return
    pairs = [(task, impl) for task in suite.tasks(settings) for impl in task.impls]
    metafunc.parametrize("bench_case", pairs, ids=[f"{t.name}-{i}" for t, i in pairs])


@pytest.fixture
def run_bench_case(benchmark, fastres_settings):
    """Benchmark one (task, impl) pair; record the case and throughput in extra_info."""

    def run(bench_case):
        task, impl = bench_case
        device = fastres_settings.device
        if impl in task.compiled:
            torch._dynamo.reset()   # see runner.run_task
        fn = task.make(impl)
        start = time.perf_counter()
        fn()
        timing.synchronize(device)
        benchmark.extra_info["first_call_s"] = time.perf_counter() - start
        for _ in range(2):  # warm-up outside the timed rounds
            fn()
        timing.synchronize(device)

        def call():
            fn()
            timing.synchronize(device)   # time the device's work, not the launch

        benchmark.group = f"{task.suite}:{task.name}"
        benchmark.extra_info.update(case=task.case, impl=impl)
        benchmark(call)
        if benchmark.stats is None:   # --benchmark-disable: the call ran once, untimed
            return
        median = benchmark.stats.stats.median
        if task.flops:
            benchmark.extra_info["tflops"] = task.flops / median / 1e12
        if task.bytes:
            benchmark.extra_info["gbps"] = task.bytes / median / 1e9
        if task.items:
            benchmark.extra_info["items_per_s"] = task.items / median
        if impl in task.compiled:
            benchmark.extra_info["compile_s"] = max(
                0.0, benchmark.extra_info["first_call_s"] - median)

    return run
