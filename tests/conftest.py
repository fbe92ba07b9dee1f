import os
import random
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. The variable is read when the
# kernels are decorated, so it must be set before fastres.backends.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Dispatch choices are measured as usual but not stored in ~/.cache (tests that check the
# persistent cache point it at a temporary folder).
os.environ.setdefault("FASTRES_DISPATCH_CACHE", "0")

# Parity tests draw fresh inputs every run; FASTRES_TEST_SEED repeats a run's draws.
SESSION_SEED = int(os.environ.get("FASTRES_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"fastres: parity inputs drawn with FASTRES_TEST_SEED={SESSION_SEED}"


@pytest.fixture
def fresh_seed(request):
    """A seed for this test's random inputs: new every session, stable within one."""
    return (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the shapes are tiny, and on a shared 2-core machine
    two spinning threads per process made training runs 15x slower. tests/nn and
    tests/stream use it for every test; other files through pytestmark."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
