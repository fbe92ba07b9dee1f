"""pytest-benchmark: the `anchors` suite of fastres bench (fastres/bench/anchors.py): fastres
against plain eager, torch.compile (with and without freezing) and ONNX Runtime, eval, one
test per (case, implementation), grouped by case. See benchmarks/conftest.py for the options."""
SUITE = "anchors"


def test_anchors(bench_case, run_bench_case):
    run_bench_case(bench_case)
