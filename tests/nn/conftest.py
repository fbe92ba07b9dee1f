import pytest


@pytest.fixture(autouse=True)
def _one_thread_each(one_thread):
    """Every module test runs with one intra-op thread (tests/conftest.py: one_thread)."""
    yield
