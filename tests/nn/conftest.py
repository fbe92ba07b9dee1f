import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the module tests' shapes are tiny, and on a shared 2-core machine
    two spinning threads per process made the training runs 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
