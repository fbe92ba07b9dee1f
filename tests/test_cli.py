"""The `fastres` command: argument errors, bench outputs and their schema, `fastres check`."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import fastres
from fastres import cli
from fastres.backends import composite as composite_backend
from fastres.bench import runner, timing
from fastres.bench.tcn_vs_rnn import crossover, matched_hidden, _rnn_params
from fastres.parity import CHECK_CASES, NONFINITE_CASES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _error_of(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- argument errors


def test_bad_dtype_is_an_argparse_error(capsys):
    err = _error_of(["bench", "--dtype", "float32,int8"], capsys)
    assert "argument --dtype: invalid dtype 'int8'" in err
    assert "float32, bfloat16, float16" in err


def test_unknown_suite_is_named(capsys):
    err = _error_of(["bench", "--only", "op,gpu-magic"], capsys)
    assert "argument --only: unknown suite 'gpu-magic'" in err
    assert "op, block, model, tcn-vs-rnn" in err


def test_full_and_quick_exclude_each_other(capsys):
    err = _error_of(["bench", "--full", "--quick"], capsys)
    assert "not allowed with argument" in err


def test_a_subcommand_is_required(capsys):
    err = _error_of([], capsys)
    assert "bench" in err and "check" in err


def test_bad_threads(capsys):
    assert "expected a positive integer, got '0'" in _error_of(["bench", "--threads", "0"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    err = _error_of(["bench", "--device", "cuda"], capsys)
    assert "no CUDA device is available" in err


def test_check_unknown_backend(capsys):
    assert "unknown backend 'nope'" in _error_of(["check", "--backend", "nope"], capsys)


def test_dtype_aliases():
    assert cli._dtype_list("bf16, fp32,half,float32") == [torch.bfloat16, torch.float32,
                                                           torch.float16]


# --------------------------------------------------------------------------- bench outputs

ENVIRONMENT_KEYS = {"device", "device_name", "torch", "triton", "fastres", "git_commit", "python",
                    "platform", "cpu_count", "torch_threads", "cuda", "cudnn", "cudnn_conv_tf32",
                    "backends_available", "backend_unavailable",
                    "default_backend", "copy_bandwidth_gbs", "load_average_start",
                    "load_average_end", "allocator"}


@pytest.fixture(scope="module")
def quick_op_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        code = cli.main(["bench", "--quick", "--only", "op", "--out", str(out), "--prefix", "t",
                         "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)   # --threads sets it for the process
    return code, out


def test_quick_bench_writes_json_markdown_png(quick_op_run, capsys):
    code, out = quick_op_run
    assert code == 0
    assert sorted(os.listdir(out)) == ["t.json", "t.md", "t.png"]
    with open(out / "t.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "t.md").read_text()
    assert "## op: One conv -> BN -> ReLU (+add) stage" in markdown
    assert "| case | impl | median |" in markdown
    assert "B2-C16-L256-K3-d2-causal+res-float32-train" in markdown


def test_bench_json_schema_is_stable(quick_op_run):
    _, out = quick_op_run
    doc = json.loads((out / "t.json").read_text())
    assert set(doc) == {"schema_version", "created_utc", "settings", "environment", "suites",
                        "wall_time_s", "command", "dispatch"}
    # every choice measured in this run; the stored cache neither read nor written
    assert doc["dispatch"]["reused_cache"] is False and doc["dispatch"]["from_cache"] == 0
    assert doc["schema_version"] == 2
    assert doc["command"].startswith("fastres bench --quick --only op")
    assert doc["settings"] == {"size": "quick", "device": "cpu", "dtypes": ["float32"],
                               "only": ["op"], "compile_mode": None, "model_compile_mode": None}
    assert ENVIRONMENT_KEYS <= set(doc["environment"])
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["environment"]["fastres"] == fastres.__version__
    assert doc["environment"]["torch_threads"] == 1
    assert doc["environment"]["allocator"]["settled_bytes"] == timing.SETTLE_BYTES
    assert set(doc["suites"]) == {"op"}
    op = doc["suites"]["op"]
    assert set(op) == {"title", "status", "reason", "rows", "summary", "wall_time_s"}
    assert op["status"] == "ok"
    tasks = {row["task"] for row in op["rows"]}
    assert tasks == {"B2-C16-L256-K3-d2-causal+res-float32-eval",
                     "B2-C16-L256-K3-d2-causal+res-float32-train"}
    for row in op["rows"]:
        assert tuple(row) == runner.ROW_KEYS
        assert row["status"] == "ok", row["error"]
        assert row["impl"] in ("eager", "fastres") or row["impl"].startswith("fastres[")
        assert row["median_s"] > 0 and len(row["times_s"]) == row["rounds"] >= 3
        assert row["p25_s"] <= row["median_s"] <= row["p75_s"]
        assert row["gbps"] > 0 and row["tflops"] > 0
        assert row["case"]["B"] == 2 and row["case"]["K"] == 3
    eager = [r for r in op["rows"] if r["impl"] == "eager"]
    assert all(r["speedup"] == 1.0 for r in eager)
    # Each row says what the dispatcher ran on its first call, and why: the op's one
    # choice per fastres row (forced where the impl names a backend), none for plain eager.
    assert all(r["runs"] is None and r["choices"] is None for r in eager)
    for row in op["rows"]:
        if row["impl"] == "eager":
            continue
        (choice,) = row["choices"]
        assert choice["level"] == "op" and choice["runs"] == row["runs"]
        assert choice["call"].startswith("float32 B2 16->16 L256 K3 d2 s1")
        if row["impl"].startswith("fastres["):
            assert row["runs"] == row["impl"][len("fastres["):-1] and choice["why"] == "forced"
        else:
            assert choice["why"].startswith("measured")
    markdown = (out / "t.md").read_text()
    assert "| compile | runs |" in markdown and "What the dispatcher chose, and why:" in markdown


# --------------------------------------------------------------------------- pieces of bench


def test_a_candidate_records_the_choices_of_its_first_call_only():
    """The wrapper every bench candidate runs in: its first call's choices (here two forced
    stages) are kept; later calls run the candidate without recording anything again."""
    block = fastres.TemporalBlock(4, 4, kernel_size=3, dilation=1).eval()
    x, calls = torch.randn(1, 4, 16), []

    def candidate():
        calls.append(1)
        with fastres.use_backend("cpp"), torch.no_grad():
            return block(x)

    wrapped = runner._FirstCallChoices(candidate)
    wrapped()
    first = wrapped.choices
    assert [(c["level"], c["runs"], c["why"]) for c in first] == [("op", "cpp", "forced")] * 2
    assert first[0]["call"].startswith("float32 B1 4->4 L16 K3 d1 s1 eval")
    wrapped()
    assert wrapped.choices is first and len(calls) == 2
    assert runner.runs_summary(first) == "cpp x2"
    assert runner.runs_summary([{"level": "module", "runs": "cpp"}] + first) == "cpp, cpp x2"
    assert runner.runs_summary([{"level": "module", "runs": "stages"},
                                {"level": "op", "runs": "cpp"},
                                {"level": "op", "runs": "eager"}]) == "stages, cpp, eager"
    # The markdown's reasons count the stages that share one (those following a module).
    from fastres.bench import report
    module = {"level": "module", "runs": "cpp", "why": "measured: cpp 1 ms, plain 2 ms"}
    follow = {"level": "op", "runs": "cpp", "why": "the enclosing module measured fastest"}
    rows = [{"task": "T", "impl": "fastres", "choices": [module] + [follow] * 3},
            {"task": "T", "impl": "plain", "choices": None}]
    assert report._choice_lines({"rows": rows}) == [
        "T fastres: module cpp (measured: cpp 1 ms, plain 2 ms); "
        "op cpp x3 (the enclosing module measured fastest)"]



_MAPPED_WHILE_HELD = """
import ctypes, json, sys, torch
from fastres.bench import timing

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
                .split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_while_held(nbytes):
    before = libc.mallinfo2().hblkhd
    block = torch.empty(nbytes, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd - before
    del block
    return mapped

fresh = mapped_while_held(4 << 20)
timing.settle_allocator()
print(json.dumps([fresh, mapped_while_held(4 << 20)]))
"""


def _glibc_version():
    name, version = platform.libc_ver()
    return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" else None


@pytest.mark.skipif((_glibc_version() or (0, 0)) < (2, 33) or any(
    k.startswith("MALLOC_") or k == "LD_PRELOAD" for k in os.environ),
    reason="glibc's malloc with its default, dynamic thresholds is what the settling is for "
           "(and mallinfo2, which reads them out, is glibc 2.33's)")
def test_settling_the_allocator_serves_mib_tensors_from_the_heap():
    """In a fresh process a 4 MiB tensor gets its own mapping (its pages faulted in on
    every allocation); after settle_allocator, the bench's first step, it comes from the
    heap."""
    out = subprocess.run([sys.executable, "-c", _MAPPED_WHILE_HELD], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    fresh, settled = json.loads(out.stdout)
    assert fresh >= 4 << 20 and settled == 0


def test_measure_interleaves_and_separates_the_first_call():
    calls = []

    def candidate(name, first_cost=0.0):
        state = {"first": True}

        def fn():
            if state["first"] and first_cost:
                torch.randn(200, 200) @ torch.randn(200, 200)  # a slow "compile"
            state["first"] = False
            calls.append(name)
        return fn

    config = timing.TimingConfig(min_rounds=4, max_rounds=4, max_time_s=0, min_block_s=0,
                                 warmup_s=0, min_warmup_calls=1)
    stats = timing.measure({"a": candidate("a"), "b": candidate("b"), "c": candidate("c")},
                           torch.device("cpu"), config)
    timed = calls[6:]  # first call + one warm-up call each
    assert [timed[i:i + 3] for i in range(0, 12, 3)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert all(len(s.times_s) == 4 and s.number == 1 for s in stats.values())


def test_measure_reports_a_failing_candidate_and_keeps_the_others():
    def broken():
        raise RuntimeError("kernel exploded")
    stats = timing.measure({"ok": lambda: None, "broken": broken}, torch.device("cpu"),
                           timing.TIMING["quick"])
    assert isinstance(stats["broken"], RuntimeError)
    assert len(stats["ok"].times_s) == 3


def test_rotation_count_defeats_the_cache():
    cpu = torch.device("cpu")
    cache = timing.cache_bytes(cpu)
    assert timing.rotation_count(cache * 2, cpu) == 1
    small = cache // 10
    assert timing.rotation_count(small, cpu) * small >= min(2 * cache, 16 * small)


def test_crossover_interpolates_in_log_log():
    rnn = [(64, 1.0), (256, 4.0), (1024, 16.0)]
    # Slower at 64 (ratio 2), faster from 256 on (ratio 0.5): log-midpoint 128.
    mid = crossover([(64, 2.0), (256, 2.0), (1024, 2.0)], rnn)
    assert (mid["length"], mid["first_faster_length"]) == (128, 256)
    every = crossover([(64, 0.5), (256, 1.0), (1024, 2.0)], rnn)
    assert every["length"] == 64 and "every length" in every["note"]
    never = crossover([(64, 2.0), (256, 8.0), (1024, 32.0)], rnn)
    assert never["length"] is None and "RNN faster" in never["note"]
    # Faster at 256 but slower again at 1024: no crossover "for good" before 1024.
    back = crossover([(64, 2.0), (256, 2.0), (1024, 20.0)], rnn)
    assert back["length"] is None


def test_rnn_parameter_counts_match_the_formula():
    for kind, cls in (("lstm", torch.nn.LSTM), ("gru", torch.nn.GRU)):
        rnn = cls(8, 24, num_layers=2, batch_first=True)
        head = torch.nn.Linear(24, 8)
        actual = sum(p.numel() for p in [*rnn.parameters(), *head.parameters()])
        assert _rnn_params(kind, 8, 24, 2) == actual
        hidden = matched_hidden(kind, 20000, 8, 2)
        assert abs(_rnn_params(kind, 8, hidden, 2) - 20000) < 0.05 * 20000


# --------------------------------------------------------------------------- fastres check


def test_check_passes_on_cpu(capsys):
    assert cli.main(["check", "--device", "cpu", "--backend", "composite"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    n = (len(CHECK_CASES) + len(NONFINITE_CASES)) * len(fastres.backends.get("composite").dtypes)
    assert f"{n}/{n} passed" in out


def test_check_draws_fresh_inputs_and_a_seed_repeats_them(capsys):
    from fastres.parity import run_check
    first = run_check("cpu", ["composite"], {"train": CHECK_CASES["train"]}, seed=7)
    again = run_check("cpu", ["composite"], {"train": CHECK_CASES["train"]}, seed=7)
    other = run_check("cpu", ["composite"], {"train": CHECK_CASES["train"]})
    assert [r.errors for r in first] == [r.errors for r in again]
    assert [r.seed for r in first] != [r.seed for r in other]


def test_check_fails_a_backend_that_swallows_nan(monkeypatch, capsys):
    forward = composite_backend.forward

    def zeroing(*args, **kwargs):  # max(z, 0): what a ReLU written with maximum does
        out, saved, mean, var = forward(*args, **kwargs)
        return out.nan_to_num(0.0), saved, mean, var

    monkeypatch.setattr(composite_backend, "forward", zeroing)
    assert cli.main(["check", "--device", "cpu", "--backend", "composite"]) == 1
    out = capsys.readouterr().out
    assert "FAIL composite float32 NaN in x,eval+res: out NaN positions=inf" in out


def test_check_fails_and_names_the_case_when_a_backend_is_wrong(monkeypatch, capsys):
    forward = composite_backend.forward

    def perturbed(*args, **kwargs):
        out, y, mean, var = forward(*args, **kwargs)
        return out + 1e-3, y, mean, var

    monkeypatch.setattr(composite_backend, "forward", perturbed)
    assert cli.main(["check", "--device", "cpu", "--backend", "composite"]) == 1
    out = capsys.readouterr().out
    assert "FAIL composite float32 train+res: out=" in out
    assert "FAIL composite float64 eval+res,same: out=" in out
    table_rows = [line.split() for line in out.splitlines() if line.startswith("composite ")]
    assert ["composite", "float32", "train", "FAIL"] == [table_rows[0][i] for i in (0, 1, 2, -1)]


def test_check_reports_a_crashing_backend(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("backward kernel missing")

    monkeypatch.setattr(composite_backend, "backward", broken)
    assert cli.main(["check", "--device", "cpu", "--backend", "composite"]) == 1
    assert "RuntimeError: backward kernel missing" in capsys.readouterr().out


def test_check_prints_a_wrong_pytorch_kernel_apart_and_still_passes(monkeypatch, capsys):
    """A wrong upstream kernel is printed as PyTorch's, and does not fail the check when
    every fastres backend passes (here: PyTorch's float32 weight gradient made wrong on one
    geometry of the grid, whatever this CPU's own does)."""
    from fastres import parity
    errors = parity.conv1d_errors
    bad = parity.Conv1dCase(2, 3, 19, 64, 5, 8, 2, 16)

    def one_wrong(case, *args, **kwargs):
        result = errors(case, *args, **kwargs)
        return dict(result, grad_weight=1.2) if case == bad else \
            {k: 0.0 for k in result}  # the rest right, so the count is this CPU-independent

    monkeypatch.setattr(parity, "conv1d_errors", one_wrong)
    assert cli.main(["check", "--device", "cpu", "--backend", "composite"]) == 0
    out = capsys.readouterr().out
    n = len(parity.UPSTREAM_CASES)
    assert f"{n} geometries, strided and widely dilated among them): wrong on 1\n" in out
    assert ("PyTorch's conv1d weight gradient is wrong here: F.conv1d(x 2x3x64, weight "
            "19x3x5, stride=2, dilation=8, padding=16), float32: relative error 1.2 against "
            "float64 (bound 1e-05") in out
    assert "they do not change this command's exit status" in out
    assert "FAIL" not in out

    monkeypatch.setattr(parity, "conv1d_errors", lambda case, *a, **k: {"out": 0.0})
    assert cli.main(["check", "--device", "cpu", "--backend", "composite"]) == 0
    assert f"{n} geometries, strided and widely dilated among them): right on every one" \
        in capsys.readouterr().out
    assert cli.main(["check", "--device", "cpu", "--backend", "composite",
                     "--no-upstream"]) == 0
    assert "PyTorch's own conv1d" not in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-m", "fastres", "bench", "--help"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--only SUITES" in result.stdout and "--full" in result.stdout


def test_busy_machine_warning():
    from fastres.bench.environment import busy_warning
    env = {"device": "cpu", "cpu_count": 2, "torch_threads": 2,
           "load_average_start": [0.2, 0.3, 0.3], "load_average_end": [1.9, 1.0, 0.5]}
    assert busy_warning(env) is None
    env["load_average_start"] = [3.4, 3.0, 2.0]
    assert "machine was busy (1-min load average up to 3.4 on 2 cores" in busy_warning(env)
    assert busy_warning(dict(env, device="cuda")) is None


def test_op_work_model():
    from fastres.bench.op import OpCase
    eval_case = OpCase(B=1, C=2, L=4, K=3, dilation=1, mode="eval")
    assert eval_case.flops() == 2 * 1 * 2 * 4 * 2 * 3
    # x, residual, out (4 bytes x 8 elements each) + weights (12 x 4 bytes).
    assert eval_case.bytes() == 3 * 32 + 48
    train = OpCase(B=1, C=2, L=4, K=3, dilation=1, mode="train")
    assert train.flops() == 3 * eval_case.flops()
    # forward: x, y, y, res, out; backward: 2 x (grad_out, y, 1-bit mask), x, grad_x,
    # grad_res, weights + grad_weight; weights in the forward.
    assert train.bytes() == 5 * 32 + 2 * (32 + 32 + 1) + 3 * 32 + 2 * 48 + 48
    assert OpCase(B=1, C=2, L=4, K=3, dilation=1, dtype="bfloat16").bytes() < train.bytes()
