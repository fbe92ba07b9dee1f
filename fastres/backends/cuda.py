"""CUDA backend: the CUDA kernels of the compiled extension fastres._C (csrc/cuda).

Used for CUDA tensors when Triton is unavailable (the dispatcher prefers Triton). Direct
convolutions in float32 FMA: float32 inputs are computed in strict float32 whatever
cudnn.allow_tf32 says (within both of SPEC.md's bounds).

Calls fastres._ext, the extension's Python interface; the contract is the one
fastres/backends/reference.py documents.
"""
import torch

from .._ext import backward, compiled_with_cuda, forward, load_error  # noqa: F401

NAME = "cuda"
DEVICES = ("cuda",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason():
    reason = load_error()
    if reason is not None:
        return reason
    if not compiled_with_cuda():
        return "fastres._C was built without CUDA kernels (no nvcc or no CUDA torch at build time)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None
