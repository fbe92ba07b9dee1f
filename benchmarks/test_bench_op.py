"""pytest-benchmark: the `op` suite of fastres bench (fastres/bench/op.py), one test per
(case, implementation), grouped by case. See benchmarks/conftest.py for the options."""
SUITE = "op"


def test_op(bench_case, run_bench_case):
    run_bench_case(bench_case)
