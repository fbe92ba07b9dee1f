import pytest
import torch

from fastres import dispatch, machine


@pytest.fixture
def fresh_dispatch(monkeypatch, tmp_path):
    """Measured dispatch with an empty, private persistent cache, on one thread (two
    spinning threads per process on a loaded 2-core machine make tiny calls take 100 ms),
    on a machine the measurement takes as quiet (a choice measured under load is not
    stored, and the test machine is often loaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("FASTRES_DISPATCH", raising=False)
    monkeypatch.delenv("FASTRES_BACKEND", raising=False)
    monkeypatch.setenv("FASTRES_DISPATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(machine, "load_per_core", lambda: 0.5)
    dispatch.forget()
    yield tmp_path
    dispatch.forget()
    torch.set_num_threads(threads)
