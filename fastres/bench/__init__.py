"""Benchmark suites behind `fastres bench`.

    op          one conv -> BN -> ReLU (+add) stage: fastres backends vs eager vs torch.compile
    block       TemporalBlock / BasicBlock: fastres vs plain PyTorch (fastres.unfuse) vs compiled
    model       TemporalConvNet / ResNet1d: the same comparison on whole models
    tcn-vs-rnn  TCN (fastres and plain) vs nn.LSTM / nn.GRU over sequence length

runner.py holds the common loop, timing.py how things are timed, report.py the outputs.
"""
from .runner import SUITES, Settings, Task, run  # noqa: F401
