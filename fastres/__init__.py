"""fastres: fused Conv1d + BatchNorm + ReLU + residual for TCNs and 1D ResNets."""
from ._copies import forget_weights
from .backends import available_backends
from .dispatch import use_backend
from .monitor import GradientMonitor
from .ops import conv_bn_relu
from .nn import (BasicBlock, ResNet1d, TemporalBlock, TemporalConvNet, convert,
                 receptive_field, unfuse)
from .stream import Stream, StreamError, stream
from .tuning import DispatchReport, autotune, explain
from . import dispatch as _dispatch, parity as _parity
from ._version import __version__

# The dispatcher trusts a backend with a call signature once the parity harness's probe of
# that geometry passed (fastres/dispatch/op.py).
_dispatch.op.checker = _parity.probe

__all__ = ["DispatchReport", "GradientMonitor", "autotune", "available_backends", "conv_bn_relu",
           "explain", "forget_weights", "use_backend", "__version__",
           # drop-in modules (fastres.nn)
           "BasicBlock", "ResNet1d", "TemporalBlock", "TemporalConvNet", "convert",
           "receptive_field", "unfuse",
           # streaming inference (fastres/stream/)
           "Stream", "StreamError", "stream"]
