"""One fused op per file."""
from .conv_bn_relu import Plan, ResidualGradLink, conv_bn_relu, execute, plan

__all__ = ["Plan", "ResidualGradLink", "conv_bn_relu", "execute", "plan"]
