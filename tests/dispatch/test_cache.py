"""The one cache: malformed files never break a call or a command, concurrent writers keep
each other's choices, and only final choices are stored."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastres
from fastres import dispatch
from fastres.dispatch.cache import SCHEMA

ENTRY = {"level": "op", "name": "eager", "reason": "measured", "source": "measured",
         "times_s": {"eager": 1e-4}, "final": True}

MALFORMED = {
    "not json": "this is not json {",
    "truncated": json.dumps({"schema": SCHEMA, "entries": {"k": ENTRY}})[:40],
    "a list": json.dumps([1, 2, 3]),
    "entries not an object": json.dumps({"schema": SCHEMA, "entries": [ENTRY]}),
    "old schema": json.dumps({"schema": 3, "entries": {"k": {"backend": "cpp"}}}),
    "entries of the wrong shape": json.dumps({"schema": SCHEMA, "entries": {
        "a": 5, "b": {"name": 3}, "c": {**ENTRY, "times_s": "fast"}, "d": {**ENTRY, "x": 1}}}),
    "empty file": "",
    "binary": "\x00\x01\x02",
}


def _write_malformed(folder, text):
    store = dispatch.cache()
    path = store.file_for("cpu")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_cache_file_is_ignored_with_one_warning(kind, fresh_dispatch, fresh_seed):
    path = _write_malformed(fresh_dispatch, MALFORMED[kind])
    x = torch.randn(2, 4, 40)
    w = torch.randn(4, 4, 3)
    with pytest.warns(RuntimeWarning, match="dispatch cache") as warned:
        out = fastres.conv_bn_relu(x, w, norm=None)
        fastres.conv_bn_relu(x, w, norm=None, dilation=2)  # a second signature: no new warning
    assert len([w for w in warned if "dispatch cache" in str(w.message)]) == 1
    assert torch.isfinite(out).all()
    with open(path) as f:  # whatever was stored since is valid again, or the file is as it was
        text = f.read()
    if text != MALFORMED[kind]:
        assert json.loads(text)["schema"] == SCHEMA


def test_every_cli_verb_handles_a_malformed_cache(fresh_dispatch, capsys):
    from fastres import cli

    def run(*args):
        code = cli.main(list(args))
        out = capsys.readouterr()
        return code, out.out
    for kind, text in MALFORMED.items():
        _write_malformed(fresh_dispatch, text)
        code, out = run("dispatch")
        assert code == 0, kind
        assert ("malformed entries ignored" if kind == "entries of the wrong shape"
                else "ignored by fastres") in out, kind
    # the slower verbs, once, on a truncated file (check forces every backend: it never
    # consults the cache, and must not trip over it either)
    _write_malformed(fresh_dispatch, MALFORMED["truncated"])
    code, out = run("check", "--backend", "eager", "--seed", "1")
    assert code == 0 and "passed" in out
    with pytest.warns(RuntimeWarning, match="dispatch cache"):
        code, out = run("bench", "--quick", "--only", "block", "--reuse-dispatch-cache",
                        "--no-progress", "--out", str(fresh_dispatch / "bench"))
    assert code == 0 and "choices came from the cache" in out
    code, out = run("dispatch", "--clear")
    assert code == 0 and "cleared 1 file" in out
    assert not list(fresh_dispatch.glob("dispatch-*.json"))


def test_four_processes_storing_at_once_keep_every_choice(fresh_dispatch):
    script = textwrap.dedent("""
        import sys, torch
        from fastres import dispatch
        from fastres.dispatch.choice import Choice
        torch.set_num_threads(1)
        worker = int(sys.argv[1])
        store = dispatch.cache()
        for i in range(25):
            store.store(f"op|worker{worker}|{i}", "cpu", Choice("op", "eager", "measured",
                        "measured", {"eager": 1e-4 * i}, final=True))
    """)
    env = {**os.environ, "FASTRES_DISPATCH_CACHE": str(fresh_dispatch)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)], env=env)
             for w in range(4)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    (path,) = fresh_dispatch.glob("dispatch-cpu-*.json")
    entries = json.loads(path.read_text())["entries"]
    assert set(entries) == {f"op|worker{w}|{i}" for w in range(4) for i in range(25)}


def test_a_provisional_choice_stays_in_memory(fresh_dispatch):
    store = dispatch.cache()
    choice = dispatch.Choice("op", "cpp", "measured", "measured", {"cpp": 1.0, "eager": 1.1},
                             final=False)
    store.store("op|provisional", "cpu", choice)
    assert not list(fresh_dispatch.glob("dispatch-*.json"))
    store.store("op|final", "cpu", dispatch.Choice("op", "eager", "measured", final=True))
    (path,) = fresh_dispatch.glob("dispatch-cpu-*.json")
    assert set(json.loads(path.read_text())["entries"]) == {"op|final"}


def test_dispatch_verb_says_why_the_winner_won(fresh_dispatch):
    store = dispatch.cache()
    store.store("cpu|float32|B8|Cin64|Cout64|L1024|K3|s1|d4|p8,0|eval|bias1|res1|rba0|grad0",
                "cpu", dispatch.Choice("op", "eager", "measured", "measured",
                                       {"eager": 100e-6, "cpp": 97e-6}, 0.02, 0.05, "eager",
                                       provenance={"measured_utc": "2026-12-06T00:00:00Z"}))
    env = {**os.environ, "FASTRES_DISPATCH_CACHE": str(fresh_dispatch)}
    out = subprocess.run([sys.executable, "-m", "fastres", "dispatch"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "float32 B8 64->64 L1024 K3 d4 s1 pad 8,0 eval +res" in out.stdout
    assert "cpp took 3% less time than eager, short of the 5% a fused path must save" \
        in out.stdout
