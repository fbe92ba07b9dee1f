"""pytest-benchmark: the `model` suite of fastres bench (fastres/bench/model.py), one test per
(case, implementation), grouped by case. See benchmarks/conftest.py for the options."""
SUITE = "model"


def test_model(bench_case, run_bench_case):
    run_bench_case(bench_case)
