"""C++ backend: the CPU kernels of the compiled extension fastres._C (csrc/cpu).

Calls fastres._ext, the extension's Python interface (docs/spec.md, "Backend contract").
"""
from .._ext import backward, forward, load_error  # noqa: F401 (the backend interface)


def unavailable_reason():
    return load_error()
