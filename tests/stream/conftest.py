"""fastres.stream tests run with one intra-op thread."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (as tests/nn): on a busy 2-core machine a second thread makes
    every tiny op wait milliseconds for a core. test_threads_split_the_work uses two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
