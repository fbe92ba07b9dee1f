"""One fused op per file."""
from .conv_bn_relu import Plan, conv_bn_relu, execute, plan

__all__ = ["Plan", "conv_bn_relu", "execute", "plan"]
