"""CUDA backend: the CUDA kernels of the compiled extension fastres._C (csrc/cuda).

Calls fastres._ext, the extension's Python interface (docs/spec.md, "Backend contract").
"""
import json
import os

import torch

from .._ext import backward, compiled_with_cuda, forward, load_error  # noqa: F401


def _why_no_cuda_kernels() -> str:
    """What setup.py recorded (fastres/_build_info.json) about leaving the CUDA kernels out."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            reason = json.load(f).get("cuda_reason")
    except (OSError, ValueError):
        reason = None
    return reason or "no GPU, no nvcc or no CUDA torch at build time"


def unavailable_reason():
    reason = load_error()
    if reason is not None:
        return reason
    if not compiled_with_cuda():
        return f"fastres._C was built without CUDA kernels ({_why_no_cuda_kernels()})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None
