"""Plain-PyTorch blocks as their upstream projects write them, independently of fastres.

The seed BatchNorm TemporalBlock (padded conv + chomp), locuslab/TCN's weight-normed block
and network, and torchvision's BasicBlock / resnet18 layout in 1D. The module and convert
tests load their state_dicts into fastres modules and compare numbers against them.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class Chomp(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return x[:, :, :x.shape[-1] - self.size]


class SeedTemporalBlock(nn.Module):
    """The BatchNorm TCN block: padded conv + chomp, BN, ReLU, dropout, ..., relu(out + res)."""

    def __init__(self, n_in, n_out, kernel_size, dilation=1, dropout=0.0):
        super().__init__()
        pad = (kernel_size - 1) * dilation
        self.conv1 = nn.Conv1d(n_in, n_out, kernel_size, padding=pad, dilation=dilation)
        self.chomp = Chomp(pad)
        self.bn1 = nn.BatchNorm1d(n_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(n_out, n_out, kernel_size, padding=pad, dilation=dilation)
        self.bn2 = nn.BatchNorm1d(n_out)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x):
        h = self.dropout(torch.relu(self.bn1(self.chomp(self.conv1(x)))))
        out = self.bn2(self.chomp(self.conv2(h)))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class LocuslabTemporalBlock(nn.Module):
    """locuslab/TCN's block (layout, forward and init as in its tcn.py)."""

    def __init__(self, n_in, n_out, kernel_size, stride, dilation, padding, dropout=0.2,
                 old_weight_norm=False):
        super().__init__()
        if old_weight_norm:
            wn = torch.nn.utils.weight_norm
        else:
            wn = torch.nn.utils.parametrizations.weight_norm
        with warnings_ignored():
            self.conv1 = wn(nn.Conv1d(n_in, n_out, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation))
            self.chomp1 = Chomp(padding)
            self.relu1 = nn.ReLU()
            self.dropout1 = nn.Dropout(dropout)
            self.conv2 = wn(nn.Conv1d(n_out, n_out, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation))
        self.chomp2 = Chomp(padding)
        self.relu2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.net = nn.Sequential(self.conv1, self.chomp1, self.relu1, self.dropout1,
                                 self.conv2, self.chomp2, self.relu2, self.dropout2)
        self.downsample = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None
        self.relu = nn.ReLU()
        self.conv1.weight.data.normal_(0, 0.01)
        self.conv2.weight.data.normal_(0, 0.01)
        if self.downsample is not None:
            self.downsample.weight.data.normal_(0, 0.01)

    def forward(self, x):
        out = self.net(x)
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class LocuslabTCN(nn.Module):
    def __init__(self, num_inputs, num_channels, kernel_size=2, dropout=0.2, block=None):
        super().__init__()
        block = block or LocuslabTemporalBlock
        layers = []
        for i, c in enumerate(num_channels):
            d = 2 ** i
            layers.append(block(num_inputs if i == 0 else num_channels[i - 1], c, kernel_size,
                                stride=1, dilation=d, padding=(kernel_size - 1) * d,
                                dropout=dropout))
        self.network = nn.Sequential(*layers)

    def forward(self, x):
        return self.network(x)


class SeedTCN(nn.Module):
    def __init__(self, num_inputs, num_channels, kernel_size=2, dropout=0.0):
        super().__init__()
        self.network = nn.Sequential(*[
            SeedTemporalBlock(num_inputs if i == 0 else num_channels[i - 1], c, kernel_size,
                              2 ** i, dropout) for i, c in enumerate(num_channels)])

    def forward(self, x):
        return self.network(x)


class TorchvisionBasicBlock1d(nn.Module):
    """torchvision's BasicBlock with Conv1d / BatchNorm1d (optionally causally padded)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, kernel_size=3, dilation=1,
                 causal=False):
        super().__init__()
        self.pad = ((kernel_size - 1) * dilation, 0) if causal else None
        pad = 0 if causal else (kernel_size - 1) * dilation // 2
        self.conv1 = nn.Conv1d(inplanes, planes, kernel_size, stride, pad, dilation, bias=False)
        self.bn1 = nn.BatchNorm1d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(planes, planes, kernel_size, 1, pad, dilation, bias=False)
        self.bn2 = nn.BatchNorm1d(planes)
        self.downsample = downsample

    def _pad(self, x):
        return x if self.pad is None else F.pad(x, self.pad)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(self._pad(x))))
        out = self.bn2(self.conv2(self._pad(out)))
        return self.relu(out + identity)


def projection(cin, cout, stride):
    return nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))


class TorchvisionResNet1d(nn.Module):
    """torchvision's resnet18 layout in 1D."""

    def __init__(self, in_channels, num_classes, widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm1d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool1d(3, 2, 1)
        c = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = projection(c, w, stride) if (stride != 1 or c != w) else None
            setattr(self, f"layer{i + 1}", nn.Sequential(
                TorchvisionBasicBlock1d(c, w, stride, down), TorchvisionBasicBlock1d(w, w)))
            c = w
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@contextlib.contextmanager
def warnings_ignored():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield



def randomize_bn(model, seed=1):
    """Non-trivial BN affine parameters and running statistics (fresh ones are 1/0)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model
