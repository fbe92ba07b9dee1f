"""What can run here: skip marks with a reason, and the backends that run on CPU tensors."""
import pytest
import torch

from fastres import backends

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (the CPU twin of this test runs)")


def cpu_backends():
    """Backends that run on CPU tensors here; Triton runs there through its interpreter."""
    return [b.name for b in backends.all_backends()
            if b.unavailable_reason() is None and "cpu" in b.devices]


def skip_unless_available(name, device="cpu"):
    backend = backends.get(name)
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"backend {name} unavailable here: {reason}")
    if device not in backend.devices:
        pytest.skip(f"backend {name} does not run on {device} here")
