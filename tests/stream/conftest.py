"""fastres.stream tests run with one intra-op thread."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread_each(one_thread):
    """One intra-op thread (tests/conftest.py: one_thread); test_threads_split_the_work sets
    two itself."""
    yield
