"""fastres: fused Conv1d + BatchNorm + ReLU + residual for TCNs and 1D ResNets."""
from .backends import available_backends, use_backend
from .monitor import GradientMonitor
from .ops import conv_bn_relu
from .nn import (BasicBlock, ResNet1d, TemporalBlock, TemporalConvNet, convert,
                 receptive_field, unfuse)
from .stream import Stream, StreamError, stream
from .tuning import DispatchReport, autotune, explain
from ._version import __version__

__all__ = ["DispatchReport", "GradientMonitor", "autotune", "available_backends", "conv_bn_relu",
           "explain", "use_backend", "__version__",
           # drop-in modules (fastres.nn)
           "BasicBlock", "ResNet1d", "TemporalBlock", "TemporalConvNet", "convert",
           "receptive_field", "unfuse",
           # streaming inference (fastres/stream/)
           "Stream", "StreamError", "stream"]
