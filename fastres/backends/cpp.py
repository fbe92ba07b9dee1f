"""C++ backend: the CPU kernels of the compiled extension fastres._C (csrc/cpu).

Calls fastres._ext, the extension's Python interface; the contract is the one
fastres/backends/reference.py documents.
"""
import torch

from .._ext import backward, forward, load_error  # noqa: F401 (the backend interface)

NAME = "cpp"
DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def unavailable_reason():
    return load_error()
