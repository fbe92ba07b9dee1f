"""Every example runs at its --smoke size and shows its table and its figure.

ucr_classification reads UCR/UEA .ts files. CI does not install aeon (the package whose
bundled data it reads by default: ~450 MB with numba, llvmlite, pandas and scikit-learn,
and numba pins numpy below the version here), so its smoke run reads a small dataset
written here in the same .ts format through --data-dir: the reader, the model, the
training, the timing and the plot all run. Without aeon and without --data-dir the script
must say how to install it (checked in-process, as is its .ts reader).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _start(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.Popen([sys.executable] + args, cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _write_ts(path, x, labels):
    """A classification .ts file as sktime/aeon write them."""
    _, channels, length = x.shape
    lines = ["# written by tests/test_examples.py", "@problemName Tiny", "@timeStamps false",
             "@missing false", f"@univariate {'true' if channels == 1 else 'false'}",
             f"@dimensions {channels}", "@equalLength true", f"@seriesLength {length}",
             f"@classLabel true {' '.join(sorted(set(labels)))}", "@data"]
    for series, label in zip(x, labels):
        lines.append(":".join(",".join(f"{v:.5f}" for v in c) for c in series) + f":{label}")
    path.write_text("\n".join(lines) + "\n")


def _tiny_dataset(folder, seed=0):
    """Two classes (a rising or a falling ramp, in noise), 2 channels, 40 steps."""
    rng = np.random.default_rng(seed)
    for split, n in (("TRAIN", 12), ("TEST", 10)):
        labels = ["up" if i % 2 else "down" for i in range(n)]
        ramp = np.linspace(-1, 1, 40)
        x = rng.normal(size=(n, 2, 40)) * 0.3
        x += np.array([ramp if label == "up" else -ramp for label in labels])[:, None, :]
        _write_ts(folder / f"Tiny_{split}.ts", x, labels)


SMOKE = {
    "degradation": ["plain", "residual", "test acc", "grad norm first/last conv"],
    "sine_forecast": ["TCN (fastres)", "baseline: repeat the last value", "receptive field",
                      "plain twin"],
    "tcn_vs_rnn": ["TCN (fastres)", "TCN (plain)", "LSTM", "GRU", "final test MSE"],
    "ucr_classification": ["Tiny", "fastres", "plain / fastres", "test acc", "2x40",
                           "2 classes"],
}


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every example's --smoke run, all started at once: {name: (returncode, stdout,
    stderr, output folder)}. Each process uses one thread; together they overlap their
    start-up (importing torch) on a 2-core machine."""
    root = tmp_path_factory.mktemp("examples")
    _tiny_dataset(root)
    extra = {"ucr_classification": ["--dataset", "Tiny", "--data-dir", str(root)]}
    running = {}
    for name in SMOKE:
        out = root / name
        args = [os.path.join(EXAMPLES, f"{name}.py"), "--smoke", "--out", str(out)]
        running[name] = (_start(args + extra.get(name, []), root), out)
    runs = {}
    for name, (process, out) in running.items():
        stdout, stderr = process.communicate(timeout=300)
        runs[name] = (process.returncode, stdout, stderr, out)
    return runs


@pytest.mark.parametrize("name", list(SMOKE))
def test_example_smoke(name, smoke_runs):
    returncode, stdout, stderr, out = smoke_runs[name]
    assert returncode == 0, stderr[-3000:]
    png, table = out / f"{name}.png", out / f"{name}.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = table.read_text()
    for word in SMOKE[name]:
        assert word in stdout and word in text, word
    assert "commit" in text and "torch" in text  # where the numbers came from


@pytest.fixture
def ucr(monkeypatch):
    """The example as a module, for its data functions (its folder goes on sys.path)."""
    monkeypatch.syspath_prepend(EXAMPLES)
    import ucr_classification
    return ucr_classification


def test_ucr_classification_says_how_to_get_the_data(ucr, monkeypatch):
    monkeypatch.setitem(sys.modules, "aeon", None)  # as if aeon were not installed
    with pytest.raises(SystemExit, match=r'pip install "fastres\[examples\]"'):
        ucr.load("GunPoint")


def test_ucr_classification_reads_ts_and_refuses_unequal_lengths(ucr, tmp_path):
    _tiny_dataset(tmp_path)
    (x_train, y_train), (x_test, y_test), classes = ucr.load("Tiny", str(tmp_path))
    assert tuple(x_train.shape) == (12, 2, 40) and tuple(x_test.shape) == (10, 2, 40)
    assert classes == ["down", "up"] and y_train.tolist() == [0, 1] * 6
    assert y_test.tolist() == [0, 1] * 5
    train = tmp_path / "Tiny_TRAIN.ts"
    lines = train.read_text().splitlines()
    lines[-1] = lines[-1].split(",", 1)[1]  # drop one value of the last series
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="unequal shapes"):
        ucr.load("Tiny", str(tmp_path))
