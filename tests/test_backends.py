"""Backend selection happens in one place and says why a backend cannot run."""
import pytest
import torch

import fastres
from fastres import backends


def test_reference_always_available():
    assert "reference" in fastres.available_backends()
    assert set(fastres.available_backends()) <= set(backends.names())


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown fastres backend 'nope'"):
        with fastres.use_backend("nope"):
            pass


def test_unavailable_backend_names_why(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "ghost", "fastres.backends._does_not_exist")
    with pytest.raises(RuntimeError, match="'ghost' is not available: cannot import"):
        with fastres.use_backend("ghost"):
            pass


def test_use_backend_is_scoped():
    assert backends.forced_backend() is None
    with fastres.use_backend("reference"):
        assert backends.forced_backend() == "reference"
        assert backends.select(torch.device("cpu"), torch.float32).NAME == "reference"
    assert backends.forced_backend() is None


def test_default_on_cpu_is_never_the_interpreter():
    # Triton may run on CPU through TRITON_INTERPRET for tests, but never by default.
    chosen = backends.select(torch.device("cpu"), torch.float32).NAME
    assert chosen in ("cpp", "reference")


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "reference")
    assert backends.select(torch.device("cpu"), torch.float32).NAME == "reference"
    monkeypatch.setenv("FASTRES_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown fastres backend"):
        backends.select(torch.device("cpu"), torch.float32)
