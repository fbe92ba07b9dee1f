"""CUDA backend: the CUDA kernels of the compiled extension fastres._C (csrc/cuda).

Calls fastres._ext, the extension's Python interface (docs/spec.md, "Backend contract").
"""
import torch

from .._ext import backward, compiled_with_cuda, forward, load_error  # noqa: F401


def unavailable_reason():
    reason = load_error()
    if reason is not None:
        return reason
    if not compiled_with_cuda():
        return "fastres._C was built without CUDA kernels (no nvcc or no CUDA torch at build time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None
