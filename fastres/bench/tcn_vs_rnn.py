"""tcn-vs-rnn suite: is a (fused) TCN faster than an LSTM / GRU, and from which length on?

Models, at matched parameter counts (the RNNs' hidden size is chosen to come closest to
the TCN's count), each with a per-step linear read-out, on a sequence-to-sequence MSE task:
    tcn-fastres   TemporalConvNet on fastres' fused conv -> BN -> ReLU (+res) stages
    tcn-plain     the same network in plain PyTorch (nn.Conv1d, nn.BatchNorm1d, F.relu)
    lstm, gru     nn.LSTM / nn.GRU, 2 layers, batch_first (cuDNN on GPU)

Per sequence length L (B sequences per batch):
    train   one optimizer step: forward, loss, backward, Adam step   -> sequences/s
    infer   eval-mode forward under no_grad                          -> sequences/s
and, for B = 1 and B = 64 independent streams, independent of L:
    stream  latency of producing every stream's output for one new time step, on their own
            model (STREAM_CONFIGS: the issue's 8 blocks of 64 channels, K=3, at the default
            and full sizes), again at matched parameter counts:
              tcn-stream     fastres.stream: one step from the carried ring buffers, x_t a
                             contiguous (B, F) tensor
              tcn-stream-strided   the same step fed x[:, :, t], a slice of a (B, F, T)
                             sequence (what a loop over a recorded sequence passes)
              tcn-stream-bf16w     tcn-stream with bf16 folded weights
                             (weight_dtype=torch.bfloat16: half the bytes a step reads)
              tcn-onnx       the stream's export_onnx step run by onnxruntime, the state fed
                             back (what a deployment outside Python runs)
              pytorch-tcn    pytorch-tcn's TCN of the same shape (8 x 64, K=3, batch norm)
                             in its buffered inference mode (tcn(x_t, inference=True)); one
                             stream only (its buffers hold batch size 1)
              tcn-recompute  the TCN re-run on the last receptive_field inputs, keeping the
                             last output (what any TCN can do without a state)
              lstm, gru      nn.LSTM / nn.GRU stepped one step from their carried state
              lstm-cell, gru-cell   the same weights as nn.LSTMCell / nn.GRUCell stacks
              lstmcell-matched  one nn.LSTMCell (and the read-out) whose hidden size matches
                             the TCN's parameter count on its own (about the same
                             multiply-adds per step as the TCN)

The crossover length is where the TCN's time per batch drops below the RNN's and stays
below up to the longest length measured (interpolated in log-log between the two swept
lengths around it).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fastres

from . import timing
from .task import Settings, Task

NAME = "tcn-vs-rnn"
TITLE = "TCN (fastres, plain) vs LSTM / GRU over sequence length"
PLOT_PANELS = 3
IMPLS = ["tcn-fastres", "tcn-plain", "lstm", "gru"]
STREAM_IMPLS = ["tcn-stream", "tcn-stream-strided", "tcn-stream-bf16w", "tcn-onnx",
                "pytorch-tcn", "tcn-recompute", "lstm", "lstm-cell", "lstmcell-matched", "gru",
                "gru-cell"]


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: Sequence[int]
    batch: int
    features: int             # input features per time step (also the output features)
    channels: int             # TCN channels per level
    levels: int               # TCN blocks; block i has dilation 2**i
    kernel_size: int
    rnn_layers: int = 2

    @property
    def receptive_field(self) -> int:
        """Inputs one TCN output depends on: 2 convs per block, dilations 1, 2, ..., 2**(levels-1)."""
        return 1 + 2 * (self.kernel_size - 1) * (2 ** self.levels - 1)


CONFIGS = {
    ("quick", "cpu"): Config(lengths=(32, 128), batch=4, features=4, channels=8, levels=3,
                             kernel_size=3),
    ("default", "cpu"): Config(lengths=(64, 256, 1024), batch=8, features=8, channels=32,
                               levels=6, kernel_size=3),
    ("quick", "cuda"): Config(lengths=(64, 256), batch=8, features=8, channels=16, levels=3,
                              kernel_size=3),
    ("default", "cuda"): Config(lengths=(64, 256, 1024, 4096, 16384), batch=32, features=16,
                                channels=64, levels=8, kernel_size=3),
    ("full", "cpu"): Config(lengths=tuple(2 ** i for i in range(6, 15)), batch=16, features=8,
                            channels=32, levels=8, kernel_size=3),
    ("full", "cuda"): Config(lengths=tuple(2 ** i for i in range(6, 15)), batch=32, features=16,
                             channels=64, levels=8, kernel_size=3),
}

# The streaming rows' model (lengths unused; batch = the number of streams, STREAM_BATCHES).
_ISSUE_TCN = Config(lengths=(), batch=1, features=8, channels=64, levels=8, kernel_size=3)
STREAM_CONFIGS = {
    "quick": Config(lengths=(), batch=1, features=4, channels=8, levels=3, kernel_size=3),
    "default": _ISSUE_TCN,
    "full": _ISSUE_TCN,
}
STREAM_BATCHES = {"quick": (1, 4), "default": (1, 64), "full": (1, 64)}


# --------------------------------------------------------------------------- models


def make_tcn(num_inputs: int, channels: Sequence[int], kernel_size: int):
    """(fused TCN, the same TCN in plain PyTorch with identical weights)."""
    fused = fastres.TemporalConvNet(num_inputs, list(channels), kernel_size=kernel_size,
                                    dropout=0.0)
    return fused, fastres.unfuse(copy.deepcopy(fused))


class SeqModel(nn.Module):
    """A backbone plus a per-step linear read-out. TCNs take (B, F, L), RNNs (B, L, F)."""

    def __init__(self, backbone: nn.Module, hidden: int, features: int, recurrent: bool):
        super().__init__()
        self.backbone, self.recurrent = backbone, recurrent
        self.head = nn.Linear(hidden, features) if recurrent else nn.Conv1d(hidden, features, 1)

    def forward(self, x):
        if self.recurrent:
            return self.head(self.backbone(x)[0])
        return self.head(self.backbone(x))

    def step(self, x_t, state):
        """One time step of a recurrent model: x_t (B, 1, F) -> (y_t, new state)."""
        out, state = self.backbone(x_t, state)
        return self.head(out), state


class CellStack(nn.Module):
    """A multi-layer nn.LSTM / nn.GRU as a stack of nn.LSTMCell / nn.GRUCell sharing its
    weights: one step costs one cell call per layer, without nn.LSTM's sequence machinery."""

    def __init__(self, rnn: nn.RNNBase, head: nn.Linear):
        super().__init__()
        cell = nn.LSTMCell if isinstance(rnn, nn.LSTM) else nn.GRUCell
        self.cells = nn.ModuleList()
        for layer in range(rnn.num_layers):
            c = cell(rnn.input_size if layer == 0 else rnn.hidden_size, rnn.hidden_size)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                setattr(c, name, getattr(rnn, f"{name}_l{layer}"))
            self.cells.append(c)
        self.head = head

    def step(self, x_t: Tensor, state):
        """x_t (B, F) -> (y_t (B, F), new state); state None starts from zeros."""
        state = list(state) if state is not None else [None] * len(self.cells)
        for layer, cell in enumerate(self.cells):
            state[layer] = cell(x_t, state[layer])
            x_t = state[layer][0] if isinstance(state[layer], tuple) else state[layer]
        return self.head(x_t), state


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rnn_params(kind: str, features: int, hidden: int, layers: int) -> int:
    gates = 4 if kind == "lstm" else 3
    total = gates * hidden * (features + hidden + 2)
    total += (layers - 1) * gates * hidden * (2 * hidden + 2)
    return total + hidden * features + features   # read-out


def matched_hidden(kind: str, target: int, features: int, layers: int) -> int:
    """The RNN hidden size whose parameter count comes closest to `target`."""
    return min(range(1, 4097), key=lambda h: abs(_rnn_params(kind, features, h, layers) - target))


def build_models(config: Config, device: torch.device, dtype: torch.dtype):
    """name -> SeqModel, plus a description (parameter counts, hidden sizes, TCN origin)."""
    torch.manual_seed(0)
    channels = [config.channels] * config.levels
    fused, plain = make_tcn(config.features, channels, config.kernel_size)
    models = {"tcn-fastres": SeqModel(fused, config.channels, config.features, recurrent=False)}
    models["tcn-plain"] = SeqModel(plain, config.channels, config.features, recurrent=False)
    models["tcn-plain"].head.load_state_dict(models["tcn-fastres"].head.state_dict())
    target = param_count(models["tcn-fastres"])
    hidden = {}
    for kind, cls in (("lstm", nn.LSTM), ("gru", nn.GRU)):
        hidden[kind] = matched_hidden(kind, target, config.features, config.rnn_layers)
        rnn = cls(config.features, hidden[kind], num_layers=config.rnn_layers, batch_first=True)
        models[kind] = SeqModel(rnn, hidden[kind], config.features, recurrent=True)
    for model in models.values():
        model.to(device=device, dtype=dtype)
    info = {"params": {name: param_count(m) for name, m in models.items()},
            "rnn_hidden": hidden, "receptive_field": config.receptive_field,
            "config": dataclasses.asdict(config)}
    return models, info


# --------------------------------------------------------------------------- tasks


def config_for(settings: Settings) -> Config:
    key = (settings.size, settings.device.type)
    return CONFIGS.get(key, CONFIGS[("default", settings.device.type)])


def unavailable_reason(settings: Settings) -> Optional[str]:
    return None


def _inputs(model_name, shape_tcn, dtype, device, count):
    """`count` (input, target) pairs in the model's layout (TCN (B, F, L), RNN (B, L, F))."""
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(count):
        x = torch.randn(shape_tcn, generator=g)
        t = torch.randn(shape_tcn, generator=g)
        if not model_name.startswith("tcn"):
            x, t = x.transpose(1, 2).contiguous(), t.transpose(1, 2).contiguous()
        pairs.append((x.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)))
    return timing.Rotating(pairs)


def _train_call(model, inputs):
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        x, target = inputs()
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        return loss
    return step


def _infer_call(model, inputs):
    model.eval()

    def forward():
        x, _ = inputs()
        with torch.no_grad():
            return model(x)
    return forward


def _stream_call(models, impl, config, streams, device, dtype):
    """One new time step for `streams` independent streams (see the module docstring)."""
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(streams, config.features, generator=g).to(device=device, dtype=dtype)
    if impl in ("tcn-stream", "tcn-stream-strided", "tcn-stream-bf16w", "tcn-onnx"):
        model = models["tcn-fastres"].eval()
        weight_dtype = torch.bfloat16 if impl == "tcn-stream-bf16w" else None
        step = fastres.stream(nn.Sequential(model.backbone, model.head), batch_size=streams,
                              weight_dtype=weight_dtype)
        if impl == "tcn-onnx":
            return _onnx_call(step, x_t)
        if impl in ("tcn-stream", "tcn-stream-bf16w"):
            return lambda: step.step(x_t)
        # x[:, :, t] of a (B, F, T) sequence, t advancing (each step reads another column).
        sequence = torch.randn(streams, config.features, 64, generator=g).to(device=device,
                                                                             dtype=dtype)
        columns = itertools.cycle([sequence[:, :, t] for t in range(sequence.shape[2])])
        return lambda: step.step(next(columns))
    if impl == "pytorch-tcn":
        return _pytorch_tcn_call(config, x_t, device, dtype)
    if impl == "tcn-recompute":
        model = models["tcn-fastres"].eval()
        window = torch.randn(streams, config.features, config.receptive_field,
                             generator=g).to(device=device, dtype=dtype)

        def recompute():
            with torch.no_grad():
                return model(window)[:, :, -1]
        return recompute
    if impl == "lstmcell-matched":
        target = param_count(models["tcn-fastres"])
        hidden = matched_hidden("lstm", target, config.features, 1)
        torch.manual_seed(3)
        rnn = nn.LSTM(config.features, hidden, num_layers=1, batch_first=True)
        cells = CellStack(rnn, nn.Linear(hidden, config.features)).to(device=device,
                                                                     dtype=dtype).eval()
        step, x = cells.step, x_t
    else:
        rnn = models[impl.replace("-cell", "")].eval()
        if impl.endswith("-cell"):
            cells = CellStack(rnn.backbone, rnn.head)
            step, x = cells.step, x_t
        else:
            step, x = rnn.step, x_t[:, None, :]
    with torch.no_grad():
        _, state = step(x, None)
    carried = [state]

    def rnn_step():
        with torch.no_grad():
            y, carried[0] = step(x, carried[0])
        return y
    return rnn_step


def _onnx_call(stream: "fastres.Stream", x_t: Tensor):
    """onnxruntime running the stream's exported step, its state fed back each call."""
    import os
    import tempfile
    import warnings

    import onnxruntime
    if x_t.device.type != "cpu" or x_t.dtype != torch.float32:
        raise RuntimeError("the ONNX step is timed on CPU in float32 only")
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(folder, "step.onnx")
        stream.export_onnx(path, chunk=1)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(path, options,
                                               providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = dict(zip(names, [x_t.numpy()] + [t.numpy() for t in stream.onnx_state()]))

    def onnx_step():
        outputs = session.run(None, feed)
        feed.update(zip(names[1:], outputs[1:]))
        return outputs[0]
    return onnx_step


def _pytorch_tcn_call(config, x_t: Tensor, device, dtype):
    """pytorch-tcn's TCN of the stream model's shape in its streaming inference mode."""
    from pytorch_tcn import TCN
    if x_t.shape[0] != 1:
        raise RuntimeError("pytorch-tcn's streaming inference takes one stream (its buffers "
                           "hold batch size 1)")
    torch.manual_seed(4)
    tcn = TCN(config.features, [config.channels] * config.levels,
              kernel_size=config.kernel_size, dilations=[2 ** i for i in range(config.levels)],
              dropout=0.0, causal=True, use_norm="batch_norm")
    model = nn.ModuleDict({"tcn": tcn, "head": nn.Conv1d(config.channels, config.features, 1)})
    model.to(device=device, dtype=dtype).eval()
    x = x_t[:, :, None]

    def buffered_step():
        with torch.no_grad():
            return model["head"](model["tcn"](x, inference=True))[:, :, 0]
    return buffered_step


def tasks(settings: Settings) -> List[Task]:
    config, device = config_for(settings), settings.device
    # Lengths up to 16384 make single RNN steps slow: fewer, longer rounds are enough.
    slow = dataclasses.replace(timing.TIMING[settings.size],
                               min_rounds=min(3, timing.TIMING[settings.size].min_rounds),
                               max_time_s=timing.TIMING[settings.size].max_time_s * 2)
    result = []
    for dtype in settings.dtypes:
        dname = str(dtype).replace("torch.", "")
        for length in config.lengths:
            shape = (config.batch, config.features, length)
            nbytes = 2 * config.batch * config.features * length * dtype.itemsize
            for mode in ("train", "infer"):
                def make(impl, mode=mode, shape=shape, dtype=dtype, nbytes=nbytes):
                    models, _ = build_models(config, device, dtype)
                    inputs = _inputs(impl, shape, dtype, device,
                                     timing.rotation_count(nbytes, device))
                    call = _train_call if mode == "train" else _infer_call
                    return call(models[impl], inputs)
                result.append(Task(
                    suite=NAME, name=f"L{length}-{dname}-{mode}",
                    case={"mode": mode, "L": length, "B": config.batch, "dtype": dname},
                    impls=list(IMPLS), make=make, baseline="lstm", items=config.batch,
                    timing=slow))

        stream_config = STREAM_CONFIGS[settings.size]
        # Re-running the receptive field for 64 streams takes about 0.5 s a call on a CPU, so
        # the time cap would stop these groups after a few rounds: ask for more.
        stream_timing = dataclasses.replace(slow, min_rounds=max(slow.min_rounds, 7)) \
            if settings.size != "quick" else slow
        for streams in STREAM_BATCHES[settings.size]:
            def make_stream(impl, dtype=dtype, streams=streams):
                models, _ = build_models(stream_config, device, dtype)
                return _stream_call(models, impl, stream_config, streams, device, dtype)
            result.append(Task(
                suite=NAME, name=f"stream-B{streams}-{dname}",
                case={"mode": "stream", "L": None, "B": streams, "dtype": dname,
                      "channels": stream_config.channels, "levels": stream_config.levels,
                      "tcn_window": stream_config.receptive_field},
                # (pytorch-tcn's streaming buffers hold one stream: it has no row of several)
                impls=[i for i in STREAM_IMPLS if streams == 1 or i != "pytorch-tcn"],
                make=make_stream, baseline="lstm", items=streams,
                timing=stream_timing))
    return result


# --------------------------------------------------------------------------- summary


def _curve(rows, impl, mode, dtype):
    points = sorted((r["case"]["L"], r["median_s"]) for r in rows
                    if r["impl"] == impl and r["case"]["mode"] == mode
                    and r["case"]["dtype"] == dtype and r["status"] == "ok")
    return points


def crossover(tcn_points, rnn_points) -> Dict[str, object]:
    """Where the TCN's time drops below the RNN's for good (see the module docstring)."""
    rnn = dict(rnn_points)
    ratios = [(L, t / rnn[L]) for L, t in tcn_points if L in rnn]
    if not ratios:
        return {"length": None, "first_faster_length": None, "note": "no common lengths"}
    if ratios[-1][1] >= 1:
        return {"length": None, "first_faster_length": None,
                "note": f"RNN faster or equal at the longest length ({ratios[-1][0]})"}
    first = len(ratios) - 1
    while first > 0 and ratios[first - 1][1] < 1:
        first -= 1
    if first == 0:
        return {"length": ratios[0][0], "first_faster_length": ratios[0][0],
                "note": f"TCN faster at every length measured (from {ratios[0][0]})"}
    (l0, r0), (l1, r1) = ratios[first - 1], ratios[first]
    # log(ratio) is close to linear in log(L) between two sweep points.
    frac = math.log(r0) / (math.log(r0) - math.log(r1))
    length = math.exp(math.log(l0) + frac * (math.log(l1) - math.log(l0)))
    return {"length": round(length), "first_faster_length": l1,
            "note": f"TCN faster from L~{round(length)} (measured: slower at {l0}, faster at {l1})"}


def summarize(rows, settings: Settings) -> Dict[str, object]:
    config = config_for(settings)
    _, info = build_models(config, torch.device("cpu"), torch.float32)
    summary = dict(info)
    summary["crossover"] = {}
    for dtype in {r["case"]["dtype"] for r in rows}:
        for mode in ("train", "infer"):
            for tcn in ("tcn-fastres", "tcn-plain"):
                for rnn in ("lstm", "gru"):
                    key = f"{dtype}/{mode}/{tcn}/{rnn}"
                    summary["crossover"][key] = crossover(_curve(rows, tcn, mode, dtype),
                                                          _curve(rows, rnn, mode, dtype))
    _, stream_info = build_models(STREAM_CONFIGS[settings.size], torch.device("cpu"),
                                  torch.float32)
    summary["stream_model"] = {key: stream_info[key] for key in
                               ("params", "rnn_hidden", "receptive_field", "config")}
    stream_config = STREAM_CONFIGS[settings.size]
    summary["stream_model"]["lstmcell_matched_hidden"] = matched_hidden(
        "lstm", stream_info["params"]["tcn-fastres"], stream_config.features, 1)
    summary["stream_latency_s"] = {_stream_key(r): r["median_s"] for r in rows
                                   if r["case"]["mode"] == "stream" and r["status"] == "ok"}
    return summary


def _stream_key(row) -> str:
    return f"{row['case']['dtype']}/B{row['case']['B']}/{row['impl']}"


def stream_ratios(latency: Dict[str, float], prefix: str) -> Dict[str, float]:
    """How many times faster tcn-stream is per step than each other candidate (prefix:
    "dtype/B<streams>/")."""
    mine = latency.get(prefix + "tcn-stream")
    if not mine:
        return {}
    return {key[len(prefix):]: value / mine for key, value in latency.items()
            if key.startswith(prefix) and not key.endswith("/tcn-stream")}


def summary_lines(summary) -> List[str]:
    from .formatting import fmt_seconds
    if not summary:
        return []
    params = ", ".join(f"{k} {v:,}" for k, v in summary["params"].items())
    lines = [f"parameters: {params} (RNN hidden {summary['rnn_hidden']}); TCN receptive field "
             f"{summary['receptive_field']} steps"]
    for key, value in sorted(summary["crossover"].items()):
        if key.split("/")[2] == "tcn-fastres":
            lines.append(f"crossover {key}: {value['note']}")
    latency = summary.get("stream_latency_s", {})
    if latency:
        model = summary["stream_model"]
        config = model["config"]
        lines.append(f"streaming model: TCN of {config['levels']} blocks x {config['channels']} "
                     f"channels, K={config['kernel_size']}, receptive field "
                     f"{model['receptive_field']}; parameters "
                     + ", ".join(f"{k} {v:,}" for k, v in model["params"].items()))
        for prefix in sorted({key.rsplit("/", 1)[0] + "/" for key in latency}):
            ratios = stream_ratios(latency, prefix)
            mine = latency.get(prefix + "tcn-stream")
            if mine:
                lines.append(f"per step, {prefix[:-1]}: tcn-stream {fmt_seconds(mine)}; "
                             + ", ".join(f"{ratio:.1f}x faster than {impl}"
                                         for impl, ratio in ratios.items()))
    return lines


def table(rows, summary):
    from .formatting import fmt_num, fmt_pct, fmt_seconds, fmt_x
    headers = ["case", "model", "median", "spread", "vs lstm", "seq/s (steps/s for stream)"]
    cells = []
    for row in rows:
        if row["status"] != "ok":
            cells.append([row["task"], row["impl"], "error: " + (row["error"] or "")[:60],
                          "", "", ""])
            continue
        cells.append([row["task"], row["impl"], fmt_seconds(row["median_s"]),
                      fmt_pct(row["spread"]), fmt_x(row["speedup"]),
                      fmt_num(row["items_per_s"], 4)])
    return headers, cells


def plot(axes, rows, summary):
    """Time per batch vs sequence length, one line per model, log-log, for training and
    inference; then the per-step latency of the streaming candidates."""
    for ax, mode, title in zip(axes, ("train", "infer"),
                               ("train step (fwd + bwd + Adam)", "inference (eval forward)")):
        for dtype in sorted({r["case"]["dtype"] for r in rows}):
            for impl in IMPLS:
                points = _curve(rows, impl, mode, dtype)
                if not points:
                    continue
                label = impl if dtype == "float32" else f"{impl} {dtype}"
                style = "-" if impl.startswith("tcn") else "--"
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o",
                        label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("seconds per batch")
        batch = summary.get("config", {}).get("batch") if summary else None
        ax.set_title(f"tcn-vs-rnn: {title}, batch {batch}, matched parameters", fontsize=9)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=7)
    _plot_stream(axes[2], [r for r in rows if r["case"]["mode"] == "stream"], summary)


def _plot_stream(ax, rows, summary):
    """Per-step latency, one group of bars per number of streams, log scale."""
    from .formatting import bar_chart
    model = (summary or {}).get("stream_model", {})
    config = model.get("config", {})
    bar_chart(ax, rows, value="median_s", log=True,
              title=f"streaming: seconds per step of all B streams (TCN of {config.get('levels')} "
                    f"blocks x {config.get('channels')} channels, receptive field "
                    f"{model.get('receptive_field')}; RNNs at matched parameters)")
    ax.set_xlabel("seconds per step (log scale)")
    for patch_group in ax.containers:
        ax.bar_label(patch_group, labels=[f"{w * 1e6:.3g} us" if w < 1e-3 else
                                          f"{w * 1e3:.3g} ms" for w in patch_group.datavalues],
                     fontsize=6, padding=2)
