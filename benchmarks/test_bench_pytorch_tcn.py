"""pytest-benchmark: the `pytorch-tcn` suite of fastres bench (fastres/bench/pytorch_tcn.py),
one test per (case, implementation), grouped by case. See benchmarks/conftest.py for the
options."""
SUITE = "pytorch-tcn"


def test_pytorch_tcn(bench_case, run_bench_case):
    run_bench_case(bench_case)
