"""pytest-benchmark: the `tcn-vs-rnn` suite of fastres bench (fastres/bench/tcn_vs_rnn.py),
one test per (case, implementation), grouped by case. See benchmarks/conftest.py for the options."""
SUITE = "tcn-vs-rnn"


def test_tcn_vs_rnn(bench_case, run_bench_case):
    run_bench_case(bench_case)
