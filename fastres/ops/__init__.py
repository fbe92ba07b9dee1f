"""One fused op per file."""
from .conv_bn_relu import conv_bn_relu

__all__ = ["conv_bn_relu"]
