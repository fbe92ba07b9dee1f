"""pytest-benchmark: the `block` suite of fastres bench (fastres/bench/block.py), one test per
(case, implementation), grouped by case. See benchmarks/conftest.py for the options."""
SUITE = "block"


def test_block(bench_case, run_bench_case):
    run_bench_case(bench_case)
