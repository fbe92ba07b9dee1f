"""fastres: fused Conv1d + BatchNorm + ReLU + residual for TCNs and 1D ResNets."""
from .backends import available_backends, use_backend
from .ops import conv_bn_relu
from .nn import (BasicBlock, ResNet1d, TemporalBlock, TemporalConvNet, convert,
                 receptive_field, unfuse)
from .reference import conv_bn_relu_reference
from .stream import Stream, StreamError, stream

__version__ = "0.1.0"

__all__ = ["available_backends", "conv_bn_relu", "conv_bn_relu_reference", "use_backend",
           "__version__",
           # drop-in modules (fastres.nn)
           "BasicBlock", "ResNet1d", "TemporalBlock", "TemporalConvNet", "convert",
           "receptive_field", "unfuse",
           # streaming inference (fastres/stream.py)
           "Stream", "StreamError", "stream"]
