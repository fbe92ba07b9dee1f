"""Drop-in modules built on the fused op: same constructors, state_dict keys and numbers
as the plain PyTorch blocks they replace, one file per family."""
from .convert import ConversionReport, convert, unfuse
from .resnet import BasicBlock, PlainBasicBlock, PlainResNet1d, ResNet1d
from .sequential import ConvBNReLUSequential
from .tcn_block import PlainTCNBlock, TCNBlock
from .temporal import (Chomp1d, PlainTemporalBlock, PlainWeightNormTemporalBlock, TemporalBlock,
                       TemporalConvNet, receptive_field)

__all__ = ["BasicBlock", "Chomp1d", "ConversionReport", "ConvBNReLUSequential",
           "PlainBasicBlock", "PlainResNet1d", "PlainTCNBlock", "PlainTemporalBlock",
           "PlainWeightNormTemporalBlock", "ResNet1d", "TCNBlock", "TemporalBlock",
           "TemporalConvNet", "convert", "receptive_field", "unfuse"]
