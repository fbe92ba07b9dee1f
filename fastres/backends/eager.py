"""Eager: no fused kernel. The op composed from PyTorch's own kernels under autograd.

fastres.conv_bn_relu takes this path (fastres/reference.py's composition of F.conv1d,
F.batch_norm and relu, which calls oneDNN on CPU and cuDNN on CUDA) where dispatch
finds no fused kernel faster, so the default never makes a user slower than plain
PyTorch. It has no forward/backward of its own: the custom op is never called for it.
"""
import torch

NAME = "eager"
DEVICES = ("cpu", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def unavailable_reason():
    return None
