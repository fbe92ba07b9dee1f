"""benchmarks/gpu_evidence.py: the smoke run end to end, and the pieces it is built from.

The smoke run (`gpu_evidence.sh --smoke`: CPU, CUDA hidden even where a GPU exists, tiny
shapes, Triton interpreted) goes through every section, each in its own processes, so the
GPU script cannot rot between the rare GPU runs; it runs on both of CI's stacks. A second run
injects a crash, an exception and a hang into three sections and shows that the others
complete. The unit tests pin the parts whose GPU behaviour the smoke run cannot show
(budgets, SASS parsing, goal judging, shard merging).
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(REPO, "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "gpu_evidence.sh")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

from evidence import context, correctness, goals, results, triton_meta  # noqa: E402

SECTION_KEYS = ["environment", "ceilings", "check", "parity", "timings", "profile", "triton",
                "launch", "memory", "streaming"]


def run_wrapper(out, *options, env=None, timeout=900):
    """bash gpu_evidence.sh --smoke OUT ...: the wrapper CI and people run, with this
    test's Python (FASTRES_PYTHON) and no commit of a checkout (the tree may be a copy)."""
    env = dict(os.environ if env is None else env, FASTRES_PYTHON=sys.executable,
               FASTRES_COMMIT="test-commit-0123")
    env.pop("TRITON_INTERPRET", None)     # the wrapper sets what the smoke run needs
    done = subprocess.run(["bash", SCRIPT, "--smoke", str(out), *options], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    [json_path] = glob.glob(str(out / "*-evidence-smoke.json"))
    with open(json_path) as f:
        doc = json.load(f)
    return done, json_path, doc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    done, json_path, doc = run_wrapper(out)
    return done, out, json_path, doc


def test_smoke_run_completes_without_section_errors(smoke):
    done, _, _, doc = smoke
    errors = {k: s["error"] for k, s in doc["sections"].items() if s["status"] == "error"}
    assert done.returncode == 0, (errors, done.stdout[-3000:], done.stderr[-3000:])
    assert not errors


def test_smoke_writes_json_markdown_and_png(smoke):
    _, out, json_path, doc = smoke
    stem = json_path[:-len(".json")]
    assert os.path.basename(stem).startswith("cpu-") and stem.endswith("-evidence-smoke")
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(stem + ".md") as f:
        markdown = f.read()
    assert "## Goals" in markdown
    for section in doc["sections"].values():
        assert f"## {section['title']}" in markdown
    assert doc["files"] == {"json": os.path.basename(json_path),
                            "markdown": os.path.basename(stem) + ".md",
                            "png": os.path.basename(stem) + ".png"}


def test_every_section_has_a_final_status(smoke):
    doc = smoke[3]
    assert doc["schema"] == results.SCHEMA and doc["mode"] == "smoke"
    assert list(doc["sections"]) == SECTION_KEYS
    for key, section in doc["sections"].items():
        assert section["status"] in results.FINAL_STATUSES, key
        assert section["wall_s"] is not None, key
        if section["status"] != "ok":
            assert section["reason"], key
    assert doc["commit"] == "test-commit-0123" and doc["versions"]["torch"] == torch.__version__
    # What only a GPU has is skipped with a reason, not crashed on.
    assert {"what": "CUDA-graph replay", "why": "skipped: no GPU"} in \
        doc["sections"]["launch"]["skipped"]


def test_smoke_correctness_sections_judge_real_runs(smoke):
    sections = smoke[3]["sections"]
    check = sections["check"]["data"]
    assert check["total"] > 0 and check["passed"] == check["total"]
    parity = sections["parity"]["data"]
    assert parity["total"] >= 6 and parity["passed"] == parity["total"]
    assert all(r["max_error"] < r["tol"] for r in parity["cases"])
    assert len({r["seed"] for r in parity["cases"]}) > 1
    assert parity["repeat_total"] > 0 and parity["repeat_identical"] == parity["repeat_total"]


def test_smoke_timings_have_device_and_host_times(smoke):
    data = smoke[3]["sections"]["timings"]["data"]
    warm = data["warm_up"]   # every candidate called once by parallel processes first
    assert warm["processes"] == 2 and warm["calls"] > 0 and not warm["errors"], warm
    rows = data["rows"]
    impls = {r["impl"] for r in rows}
    assert {"eager", "compile", "fastres"} <= impls
    for row in rows:
        assert row["status"] == "ok", row
        assert row["device_s"] > 0 and row["host_s"] > 0
    fastres_rows = [r for r in rows if r["impl"] == "fastres"]
    assert all(r["vs_eager"] is not None and r["vs_compile"] is not None for r in fastres_rows)


def test_smoke_triton_section_reads_sm90_cubins(smoke):
    section = smoke[3]["sections"]["triton"]
    if section["status"] == "skipped":
        pytest.skip(section["reason"])
    # A busy machine may spend the section's budget before every kernel compiled: those
    # are listed as not compiled, for that reason only; what compiled is read in full.
    kernels = [k for k in section["data"]["kernels"]
               if k.get("error") != "not compiled: " + context.SPENT]
    assert kernels, section["data"]["kernels"]
    for k in kernels:
        assert "error" not in k, k
        assert k["num_warps"] and k["registers"]
        if section["data"]["cuobjdump"]:
            assert k["sass"]["instructions"] > 0
        else:
            assert k["sass"].startswith("no sass")


def test_smoke_summary_judges_every_goal(smoke):
    summary = smoke[3]["summary"]
    assert len(summary["goals"]) == len(goals.GOALS)
    for goal in summary["goals"]:
        assert goal["status"] in (goals.MET, goals.MISSED, goals.NOT_MEASURED)
    assert "not evidence" in summary["note"]


# --------------------------------------------------------------------------- errors are recorded


def test_a_crash_an_exception_and_a_hang_cost_one_section_each(tmp_path):
    """Each section runs in processes of its own with a hard timeout: a process that dies
    (os.abort, as a CUDA fault kills one), raises or hangs is recorded as that section's
    error, with what it wrote before, and the other sections complete."""
    env = dict(os.environ, FASTRES_EVIDENCE_INJECT="ceilings:raise,profile:abort,launch:hang")
    done, _, doc = run_wrapper(tmp_path, "--only", "environment,ceilings,profile,launch,memory",
                               "--section-timeout", "60", env=env)
    sections = doc["sections"]
    assert done.returncode == 1, done.stdout[-3000:]
    for key in ("ceilings", "profile", "launch"):
        assert sections[key]["status"] == "error", (key, sections[key])
        assert sections[key]["data"]["before_the_fault"] is True, key  # partial results kept
        assert "ERROR" in done.stdout and sections[key]["title"] in done.stdout
    raised = sections["ceilings"]["error"]
    assert raised["type"] == "RuntimeError" and "injected failure in ceilings" in \
        raised["message"] and "fail" in raised["traceback_tail"]
    died = sections["profile"]["error"]
    assert died["type"] == "ProcessDied" and "SIGABRT" in died["message"]
    hung = sections["launch"]["error"]
    assert hung["type"] == "Timeout" and "killed after" in hung["message"]
    assert sections["launch"]["wall_s"] < 200
    for key in ("environment", "memory"):   # before and after the failures
        assert sections[key]["status"] in ("ok", "partial"), (key, sections[key])
    assert sections["timings"]["status"] == "skipped"
    assert sections["timings"]["reason"] == "not selected (--only)"
    assert doc["commit"] == "test-commit-0123"
    assert "NOT ALL WELL" in done.stdout


def test_a_failed_check_is_failed_not_ok():
    import gpu_evidence
    section = results.Section("check", "3. check", 10, status="ok")
    section.data.update(results=[{"backend": "triton", "dtype": "float32", "case": "a",
                                  "errors": {"out": 1.0}, "passed": False, "error": None},
                                 {"backend": "cuda", "dtype": "float32", "case": "a",
                                  "errors": {"out": 0.0}, "passed": True, "error": None}])
    correctness.summarize_check(section)
    gpu_evidence.judge(section)
    assert section.status == "failed" and "1 checked row(s) failed" in section.reason
    assert section.notes[0] == "1/2 passed (triton 0/1, cuda 1/1)"


def test_shards_merge_into_one_section():
    a = results.Section("parity", "4. parity", 10, status="ok", wall_s=3.0)
    a.data.update(cases=[{"backend": "triton", "passed": True}], configurations=[2],
                  bitwise_repeat=[{"identical": True, "case": "x", "backend": "triton",
                                   "dtype": "bf16", "result": "identical"}])
    a.table("t", ["h"]).add("row a")
    b = results.Section("parity", "4. parity", 10, status="partial", wall_s=4.0)
    b.data.update(cases=[{"backend": "cuda", "passed": False, "case": "c", "dtype": "bf16",
                          "errors": {"out": 1}}], configurations=[1])
    b.table("t", ["h"]).add("row b")
    b.skip("random 3", "budget")
    merged = results.merge_sections([results.Section.from_json(a.to_json()),
                                     results.Section.from_json(b.to_json())])
    assert merged.status == "partial" and merged.wall_s == 4.0
    assert [t.rows for t in merged.tables] == [[["row a"], ["row b"]]]
    assert merged.skipped == [{"what": "random 3", "why": "budget"}]
    correctness.summarize_parity(merged)
    assert (merged.data["passed"], merged.data["total"], merged.data["configurations"]) == \
        (1, 2, 3)
    assert correctness.failures(merged) == 1


# --------------------------------------------------------------------------- streaming


class RerunStream:
    """The streaming API the section is written against (fastres.stream is being built
    elsewhere), done the slow obvious way: re-run the model on everything since reset()."""

    def __init__(self, model):
        self.model, self.history = model, None

    def reset(self):
        self.history = None

    def step(self, x_t):
        x_t = x_t[..., None]
        self.history = x_t if self.history is None else torch.cat([self.history, x_t], -1)
        return self.model(self.history)[..., -1]


def test_streaming_section_runs_against_the_stream_api(monkeypatch):
    import fastres
    from evidence import memory_stream

    monkeypatch.setattr(fastres, "stream", RerunStream, raising=False)
    ctx = context.Context(device=torch.device("cpu"), smoke=True,
                          timing=context.SMOKE_TIMING, host_calls=2,
                          budget=context.Budget(900, 1e18))  # the API, not time
    section = results.Section("streaming", "10. Streaming", 5)
    memory_stream.run_streaming(ctx, section)
    rows = section.data["rows"]
    assert [(r["B"], r["impl"]) for r in rows] == [(1, "step"), (64, "step")]
    for row in rows:
        assert row["status"] == "ok" and row["device_s"] > 0
        assert row["rel_err_vs_forward"] < 1e-5
    assert {"what": "CUDA-graph capture of step()", "why": "skipped: no GPU"} in section.skipped


def test_streaming_section_is_unavailable_without_the_api(monkeypatch):
    import fastres
    from evidence import memory_stream

    monkeypatch.delattr(fastres, "stream", raising=False)
    with pytest.raises(results.SectionUnavailable, match="not available in this build"):
        memory_stream.run_streaming(None, results.Section("streaming", "10. Streaming", 5))


# --------------------------------------------------------------------------- budgets


def test_section_budget_is_nominal_while_the_run_is_on_time():
    assert context.section_budget(30, remaining_s=400, nominal_rest_s=300) == 30


def test_late_sections_share_what_is_left_in_proportion():
    assert context.section_budget(30, remaining_s=150, nominal_rest_s=300) == pytest.approx(15)
    assert context.section_budget(30, remaining_s=-1, nominal_rest_s=300) == 0.0


# --------------------------------------------------------------------------- SASS

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;          /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P1 LDG.E.U16 R6, desc[UR4][R8.64] ;
        /*0030*/               @P0 LDG.E R7, desc[UR4][R8.64] ;
        /*0040*/                   LDG.E.LTC128B.64 R10, desc[UR4][R8.64] ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0060*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0070*/                   UTMALDG.2D [UR8], [UR10] ;
        /*0080*/                   STL [R1+0x4], R5 ;
        /*0090*/                   LDL R5, [R1+0x4] ;
        /*00a0*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*00b0*/                   STG.E.U16 desc[UR4][R2.64], R9 ;
"""


def test_sass_counts_the_instruction_mix():
    counts = triton_meta.sass_counts(SASS)
    assert counts["instructions"] == 12
    assert (counts["HGMMA"], counts["HMMA"], counts["LDGSTS"], counts["UTMALDG"]) == (1, 1, 1, 1)
    # LTC128B is a cache hint, not a width; predicated loads count.
    assert counts["LDG_by_bits"] == {"16": 1, "32": 1, "64": 1, "128": 1}
    assert counts["STG_by_bits"] == {"16": 1}
    assert (counts["LDL"], counts["STL"]) == (1, 1)


def test_resource_usage_of_the_function():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function conv_forward_kernel:\n"
            "  REG:174 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:680 TEXTURE:0\n")
    assert triton_meta.resource_usage(text) == {"REG": 174, "STACK": 8, "SHARED": 1024,
                                                "LOCAL": 16}


def test_kernel_report_without_cuobjdump_says_no_sass():
    report = triton_meta.kernel_report(b"", {"num_warps": 4, "num_stages": 3, "shared": 0},
                                       None, n_regs=40, n_spills=0)
    assert report["sass"].startswith("no sass") and report["registers"] == 40


# --------------------------------------------------------------------------- goals


def _doc(timing_rows, memory_rows=(), streaming_rows=()):
    section = lambda rows: {"data": {"rows": list(rows)}}  # noqa: E731
    return {"mode": "gpu", "sections": {
        "timings": section(timing_rows), "memory": section(memory_rows),
        "streaming": section(streaming_rows), "check": {"data": {}}, "parity": {"data": {}}}}


def _row(suite, C, d, dtype, mode, impl, device_s, vs_eager=None, vs_compile=None):
    return {"suite": suite, "C": C, "dilation": d, "dtype": dtype, "mode": mode, "impl": impl,
            "status": "ok", "device_s": device_s, "vs_eager": vs_eager, "vs_compile": vs_compile,
            "workload": f"{suite} C{C} d{d} {dtype} {mode}"}


def _judged(doc):
    return {g["goal"]: g for g in goals.summarize(doc)["goals"]}


def test_goals_take_the_worst_row():
    doc = _doc([_row("block", 64, 4, "bfloat16", "train", "fastres", 1.0, 2.5, 1.4),
                _row("block", 128, 4, "bfloat16", "train", "fastres", 1.0, 1.9, 1.5),
                _row("block", 256, 4, "bfloat16", "train", "fastres", 1.0, 1.0, 1.0)])
    judged = _judged(doc)
    vs_eager = judged["memory-bound (C <= 128, bf16): TemporalBlock train step vs eager"]
    assert vs_eager["measured"] == 1.9 and vs_eager["status"] == goals.MISSED
    assert "block C128" in vs_eager["evidence"] and "of 2" in vs_eager["evidence"]
    vs_compile = judged["memory-bound (C <= 128, bf16): TemporalBlock train step vs torch.compile"]
    assert vs_compile["measured"] == 1.4 and vs_compile["status"] == goals.MET
    compute = judged["compute-bound (C >= 256): op and TemporalBlock vs eager"]
    assert compute["status"] == goals.MISSED
    eval_goal = judged["memory-bound (C <= 128, bf16): TemporalBlock eval vs eager"]
    assert eval_goal["status"] == goals.NOT_MEASURED


def test_dilation_and_best_baseline_goals():
    rows = [_row("op", 64, 1, "bfloat16", "train", "fastres", 1.0),
            _row("op", 64, 16, "bfloat16", "train", "fastres", 1.2),
            _row("op", 64, 16, "bfloat16", "train", "eager", 1.5),
            _row("op", 64, 16, "bfloat16", "train", "compile", 1.17),
            _row("op", 64, 1, "bfloat16", "train", "eager", 2.0)]
    judged = _judged(_doc(rows))
    dilation = judged["dilation >= 8 within 1.1x of dilation 1 (op time ratio)"]
    assert dilation["measured"] == pytest.approx(1.2) and dilation["status"] == goals.MISSED
    best = judged["no shape below 0.97x of the best baseline (default dispatch)"]
    assert best["measured"] == pytest.approx(1.17 / 1.2) and best["status"] == goals.MET


def test_memory_and_streaming_goals():
    memory = [{"workload": "TCN bf16", "impl": "fastres", "vs_eager": 0.55},
              {"workload": "TCN fp32", "impl": "fastres", "vs_eager": 0.65}]
    streaming = [{"B": 1, "impl": "step+graph", "status": "ok", "device_s": 6e-6, "host_s": 9e-6},
                 {"B": 64, "impl": "step+graph", "status": "ok", "device_s": 2e-5, "host_s": 9e-6}]
    judged = _judged(_doc([], memory, streaming))
    assert judged["TemporalConvNet training peak memory vs eager"]["measured"] == 0.65
    stream = judged["streaming step with CUDA-graph capture"]
    assert stream["measured"] == 9e-6 and stream["status"] == goals.MET


# --------------------------------------------------------------------------- parity pieces


def test_same_bits_compares_bits_nan_included():
    a = torch.tensor([1.0, float("nan")])
    assert correctness.same_bits(a, a.clone())
    assert not correctness.same_bits(a, torch.tensor([1.0, 2.0]))
    assert not correctness.same_bits(a, a.to(torch.float64))
    assert correctness.same_bits(None, None) and not correctness.same_bits(a, None)


def test_random_cases_are_valid_and_in_range():
    import random
    rng = random.Random(0)
    for _ in range(200):
        case = correctness.random_case(rng)
        assert case.L_out >= 1 and case.B * case.L_out > 1
        assert 64 <= case.C_in <= 512 and 2 <= case.K <= 7 and case.dilation <= 64
        assert case.B <= 256 and case.L <= 16384
        if case.residual == "identity":
            assert case.C_in == case.C_out and case.stride == 1
        small = correctness.shrink(case)
        assert small.L_out >= 1 and small.B * small.C_out * small.L <= 2 * 12 * 37


def test_fixed_cases_cover_the_space():
    cases = [c for _, c in correctness.FIXED_CASES]
    assert {c.norm for c in cases} == {"train", "eval", "none"}
    assert {c.residual for c in cases} == {"none", "identity", "tensor"}
    assert {c.relu_before_add for c in cases} == {True, False}
    assert {c.stride for c in cases} == {1, 2} and {c.padding for c in cases} == {"causal", "same"}
    assert max(c.dilation for c in cases) == 64 and max(c.B for c in cases) == 256
    assert max(c.L for c in cases) == 16384 and {2, 7} <= {c.K for c in cases}
    assert max(max(c.C_in, c.C_out) for c in cases) == 512
    assert any(c.L % 16 for c in cases)
    for c in cases:   # small enough for the float64 reference to take milliseconds
        assert c.B * max(c.C_in, c.C_out) * c.L <= 2_100_000, c
