"""Triton backend: the fused op as Triton kernels, forward and backward.

Implements docs/spec.md's backend contract. Kernels live one stage per
sibling module; this file only sizes tiles, allocates (through fastres._alloc) and
launches. Triton itself is imported on first use, so a machine without it gets a reason
from unavailable_reason() instead of an ImportError.

Training step of one stage: 6 launches, and the HBM traffic over a B*C*L activation of e
bytes an element (x-hat is float16 in 16-bit training: saved_dtype; benchmarks/NOTES.md
has the byte and launch model of a whole TemporalBlock):
  forward   tap-major weight copy (torch)     once per weight version (operands.py)
            conv_forward_kernel (MODE_STATS)  read x; per-tile (mean, M2), no y; its last
                                              programs finalize: batch mean and variance,
                                              running statistics, num_batches_tracked
            conv_forward_kernel (MODE_NORM)   read x (+ residual); write out and x-hat
  backward  relu_bn_backward_kernel (pass 1)  read grad_out, mask bits, x-hat (with a
                                              residual, write grad_residual unless
                                              deferred); its last programs finalize
                                              grad_beta, grad_gamma, grad_bias
            relu_bn_backward_kernel (pass 2)  read grad_out and bits (or grad_residual),
                                              x-hat; write grad_y
            conv_dgrad_kernel                 read grad_y (+ a block's shortcut gradient,
                                              or grad_out and bits it masks); write grad_x
            conv_wgrad_kernel                 read grad_y, x; split partials, summed by the
                                              last split of each tile into grad_weight
The training forward computes the conv twice instead of writing y and reading it back: y
never travels (4e per element saved) and 16-bit inputs normalize the float32 y. Eval /
no-norm forward is conv_forward_kernel alone: read x (+ residual), write out (+ x-hat or
y when backward needs it). Backward in eval / no-norm is one elementwise pass.
Layer norm over channels (C_out up to tiling.LAYER_NORM_MAX_CHANNELS: one tile holds every
channel of its positions) is conv_forward_kernel (MODE_LAYER) alone, which also writes the
per-position statistics, and one elementwise backward pass (the projection over the
channels in its tile; grad_bias from per-tile sums of grad_y) before dgrad and wgrad.
All reductions are per-tile partials reduced in a fixed order by the last program to
finish (batch_stats.py: a ticket, no float atomics): bitwise reproducible run to run.
"""
from __future__ import annotations

import contextlib

import torch

from ... import _alloc
from ... import conventions
from .._activation import parse_activation
from ...conventions import (HALF_DTYPES, NORM_CODES, NORM_LAYER, NORM_NONE, NORM_TRAIN,
                            mask_bits_shape, stats_dtype, triton_interpreting)


# What this module's kernels do beyond the plain contract (counting batches, adding the
# shortcut gradient in dgrad, mask bits, float16 x-hat, streaming) is stated once, on
# TritonBackend in fastres/backends/__init__.py.


def saved_dtype(dtype: torch.dtype, norm: str, relu_before_add: bool,
                weights_per_channel: int, activation: str = "relu") -> torch.dtype:
    """What forward saves for backward (docs/spec.md, "What backward reads"): as
    conventions.saved_dtype, except x-hat in float16 for 16-bit training.

    Half the bytes of the float32 x-hat (written once, read by both backward passes:
    8 bytes an element of every stage's training step) with eight times bfloat16's
    precision (11-bit significand); |x-hat| <= sqrt(B * L_out) stays far inside float16's
    range. Backward reads it only in batch norm's gradient (its sums and the projection
    of grad_y), where 2**-11 of x-hat is well inside the 1e-2 bound: out is computed from
    the float32 x-hat, and training saves out's mask as bits (saves_mask_bits), because a
    mask recomputed from the rounded x-hat flips wherever |z| is below x-hat's rounding:
    about 1e-4 of the elements, each a whole gradient value, 1e-2 of the gradients
    (rounding x-hat before computing out flips the same masks against the exact ones).
    Not with relu_before_add, whose inner mask backward recomputes from x-hat, and not
    where the weight gradient magnifies grad_y's rounding (weights_per_channel = C_in * K
    <= FLOAT32_WGRAD_MAX_WEIGHTS, see _backward): there a float16 x-hat cost fp16 training
    4 units of its rounding in grad_weight (benchmarks/saved_precision.py), and such
    layers (a network's first) are too small for the bytes to matter.
    Nor with an activation other than ReLU, whose input backward recomputes from x-hat:
    there conventions.saved_dtype's float32.
    """
    if dtype in HALF_DTYPES and norm == NORM_TRAIN and not relu_before_add \
            and weights_per_channel > FLOAT32_WGRAD_MAX_WEIGHTS and activation == "relu":
        return torch.float16
    return conventions.saved_dtype(dtype, norm, relu_before_add, activation)


def unavailable_reason():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    if not torch.cuda.is_available() and not triton_interpreting():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None


def layer_norm_refusal(c_out: int):
    """None where the kernels fuse layer norm over c_out channels, else why not: one
    program's tile must hold every channel of its positions (conv_forward.py, MODE_LAYER),
    at most tiling.LAYER_NORM_MAX_CHANNELS."""
    from . import tiling
    if c_out > tiling.LAYER_NORM_MAX_CHANNELS:
        return (f"fuses layer norm only where a tile holds every channel of its positions: "
                f"C_out {c_out} > {tiling.LAYER_NORM_MAX_CHANNELS} "
                "(tiling.LAYER_NORM_MAX_CHANNELS)")
    return None


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(x, weight, bias, gamma, beta, running_mean, running_var, residual, **kwargs):
    with _on_device(x):
        return _forward(x, weight, bias, gamma, beta, running_mean, running_var, residual,
                        **kwargs)


def backward(grad_out, x, weight, gamma, beta, saved, out, var, **kwargs):
    with _on_device(x):
        return _backward(grad_out, x, weight, gamma, beta, saved, out, var, **kwargs)


def saves_mask_bits(has_residual: bool, save_for_backward: bool, norm: str,
                    activation: str = "relu") -> bool:
    """Whether forward saves the final ReLU's mask as bits: with a residual (else backward
    would read out) and in training (else it would recompute the mask from x-hat, which
    is float16 in 16-bit training: saved_dtype). Otherwise backward reads out, or
    recomputes the mask from a float32 x-hat. Never for another activation, whose
    derivative backward takes at its input, recomputed from x-hat and the residual."""
    return save_for_backward and (has_residual or norm == NORM_TRAIN) \
        and activation == "relu"


def stream_forward(*args, **kwargs) -> None:
    """fastres.stream's kernel: one launch advances a whole causal stack by a step or a
    chunk (stream_step.py states its arguments)."""
    from . import operands, stream_step  # operands: the interpreter's fixes (patch_interpreter)
    operands.patch_interpreter()
    stream_step.stream_forward(*args, **kwargs)


def _gemm_config(config, M, N, dtype, tuning_key, run, device, tma, all_rows=False):
    """The tiles of one conv GEMM: the heuristic, or the measured choice (tuning.py).
    Without TMA (masked-pointer operands) the small tiles of tiling.pointer_config.
    `all_rows`: block_m must stay config's (layer norm's tile holds every channel; the
    tuning candidates keep block_m too)."""
    from . import tiling, tuning
    if not tma:
        return tiling.pointer_config(config, all_rows)
    if not tuning.enabled():
        return config
    return tuning.choose(tuning_key, tiling.candidate_configs(config, M, N, dtype), run,
                         device)


def _forward(x, weight, bias, gamma, beta, running_mean, running_var, residual, *, stride,
             dilation, pad_left, pad_right, norm, eps, momentum_factor, relu_before_add,
             save_for_backward, num_batches_tracked=None, activation="relu"):
    from . import batch_stats, conv_forward, operands, tiling, tuning
    from .tiling import cdiv, dot_precision, dot_upcast

    B, C_in, L = x.shape
    C_out, _, K = weight.shape
    L_out = (L + pad_left + pad_right - dilation * (K - 1) - 1) // stride + 1
    shape = (B, C_out, L_out)
    sdt = stats_dtype(x.dtype)
    train = norm == NORM_TRAIN
    layer = norm == NORM_LAYER
    refusal = layer_norm_refusal(C_out) if layer else None
    if refusal is not None:  # (supports() keeps the dispatcher from such calls)
        raise ValueError(f"the Triton backend {refusal}")
    saves = conventions.saves_for_backward(save_for_backward, norm, relu_before_add,
                                           activation)
    saved_as = saved_dtype(x.dtype, norm, relu_before_add, C_in * K, activation)
    act = parse_activation(activation)

    out = _alloc.empty(shape, dtype=x.dtype, device=x.device)
    saved = _alloc.empty(shape if saves else (0,), device=x.device, dtype=saved_as)
    save_mask = saves_mask_bits(residual is not None, save_for_backward, norm, activation)
    mask_bits = _alloc.empty(mask_bits_shape(*shape) if save_mask else (0,),
                             dtype=torch.uint8, device=x.device)
    use = lambda t: out if t is None or t.numel() == 0 else t  # noqa: E731  (never read)
    taps = operands.tap_major_weight(weight)
    tma = operands.descriptor_ok(x, stride)

    def conv(cfg, mode, mean, var, save, scratch=(None,) * 6, finalize=False):
        x_src, w_src = x, taps
        if tma:
            x_src = operands.descriptor(x, (1, cfg.block_k, cfg.block_n))
            w_src = operands.weight_tile_descriptor(taps, cfg.block_m, cfg.block_k)
        grid = (B * cdiv(L_out, cfg.block_n), cdiv(C_out, cfg.block_m))
        conv_forward.conv_forward_kernel[grid](
            x_src, w_src, use(bias), use(saved), out, use(residual), use(mask_bits),
            use(mean), use(var),
            use(gamma), use(beta), *map(use, scratch), use(running_mean), use(running_var),
            float(momentum_factor), use(num_batches_tracked),
            C_in, C_out, L, L_out, K, stride, dilation, pad_left, float(eps), taps.shape[2],
            taps.shape[1], MODE=mode.value, HAS_BIAS=bias is not None, SAVE_Y=save,
            HAS_RES=residual is not None, RELU_BEFORE_ADD=bool(relu_before_add),
            DOT_PRECISION=dot_precision(x.dtype, x.device), DOT_UPCAST=dot_upcast(x.dtype),
            TMA=tma, BLOCK_CO=cfg.block_m, BLOCK_CI=cfg.block_k, BLOCK_L=cfg.block_n,
            SAVE_MASK=save_mask and mode.value != conv_forward.MODE_STATS.value,
            FINALIZE=finalize, UPDATE_RUNNING=running_mean is not None,
            COUNT_BATCH=num_batches_tracked is not None, GROUP=tiling.FINALIZE_GROUP,
            FIN_BLOCK_T=max(1, 2048 // cfg.block_m), ACT=act.code,
            act_param=act.kernel_param, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def stats_scratch(cfg, finalize):
        """The statistics pass's partials (n_tiles, C_out) (mean, M2), and with `finalize`
        its group rows (mean, M2, count) and ticket counters."""
        n_tiles = B * cdiv(L_out, cfg.block_n)
        part = [_alloc.empty((n_tiles, C_out), dtype=sdt, device=x.device) for _ in range(2)]
        if not finalize:
            return part + [None] * 4
        n_groups = cdiv(n_tiles, tiling.FINALIZE_GROUP)
        groups = [_alloc.empty((n_groups, C_out), dtype=sdt, device=x.device)
                  for _ in range(3)]
        tickets = batch_stats.counters(
            x.device, batch_stats.n_ticket_counters(n_tiles, cdiv(C_out, cfg.block_m)))
        return part + groups + [tickets]

    mode = {NORM_NONE: conv_forward.MODE_NONE, NORM_LAYER: conv_forward.MODE_LAYER}.get(
        norm, conv_forward.MODE_NORM)
    # Layer norm's per-position statistics, (B, L_out), which its one pass writes.
    layer_stats = [_alloc.empty((B, L_out) if layer else (0,), dtype=sdt, device=x.device)
                   for _ in range(2)]
    if train:  # tuning times the statistics pass without its finalize: no side effects
        run = lambda c: conv(c, conv_forward.MODE_STATS, None, None, False,  # noqa: E731
                             stats_scratch(c, False))
    elif layer:  # (out, saved and the statistics are written whole by every run)
        run = lambda c: conv(c, mode, *layer_stats, saves)  # noqa: E731
    else:  # (out and saved are written whole by every run)
        run = lambda c: conv(c, mode, running_mean, running_var, saves)  # noqa: E731
    heuristic = (tiling.layer_norm_forward_config if layer else tiling.forward_config)(
        C_in, C_out, L_out, x.dtype)
    cfg = _gemm_config(heuristic, C_out, L_out, x.dtype,
                       tuning.key("fwd" + norm, C_in, C_out, K, L_out, x.dtype, stride, tma),
                       run, x.device, tma, all_rows=layer)

    if layer:
        run(cfg)
        return out, saved, mask_bits, *layer_stats
    if not train:
        run(cfg)
        empty_stats = _alloc.empty((0,), dtype=sdt, device=x.device)
        return out, saved, mask_bits, empty_stats, _alloc.empty((0,), dtype=sdt,
                                                                device=x.device)

    # Training: the statistics pass, whose last programs finalize (batch statistics,
    # running statistics and the batch counter, once), then the conv again, normalized
    # with the batch statistics (y never stored: see conv_forward.py).
    batch_mean = _alloc.empty((C_out,), dtype=sdt, device=x.device)
    batch_var = _alloc.empty((C_out,), dtype=sdt, device=x.device)
    conv(cfg, conv_forward.MODE_STATS, batch_mean, batch_var, False, stats_scratch(cfg, True),
         finalize=True)
    conv(cfg, conv_forward.MODE_NORM, batch_mean, batch_var, saves)
    return out, saved, mask_bits, batch_mean, batch_var


# Largest C_in * K whose weight gradient runs in float32 in 16-bit training (see _backward).
FLOAT32_WGRAD_MAX_WEIGHTS = 4


def _backward(grad_out, x, weight, gamma, beta, saved, out, var, *, has_bias, has_residual,
              stride, dilation, pad_left, pad_right, norm, eps, relu_before_add,
              need_grad_x=True, grad_x_addend=None, grad_x_addend_bits=None,
              defer_grad_residual=False, mask_bits=None, activation="relu", residual=None):
    from . import batch_stats, bn_backward, conv_dgrad, conv_wgrad, operands, tiling, tuning
    from .tiling import (cdiv, dot_precision, dot_upcast, elementwise_tiles,
                         layer_norm_backward_tiles, wgrad_splits)

    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    B, C_in, L = x.shape
    C_out, _, K = weight.shape
    L_out = grad_out.shape[2]
    dev, dtype = x.device, x.dtype
    sdt = stats_dtype(dtype)
    layer = norm == NORM_LAYER
    refusal = layer_norm_refusal(C_out) if layer else None
    if refusal is not None:  # (supports() keeps the dispatcher from such calls)
        raise ValueError(f"the Triton backend {refusal}")
    norm = NORM_CODES[norm]
    precision, upcast = dot_precision(dtype, dev), dot_upcast(dtype)
    act = parse_activation(activation)
    if has_residual and not act.is_relu and residual is None:
        raise ValueError(f"the backward of activation {activation!r} after a residual add "
                         "needs the residual (its derivative is taken at the sum)")
    read_residual = has_residual and not act.is_relu

    # --- ReLU masks, residual gradient, batch-norm sums and grad_y (elementwise passes;
    # layer norm's tile holds every channel of its positions).
    block_c, block_l = (layer_norm_backward_tiles if layer else elementwise_tiles)(C_out,
                                                                                   L_out)
    n_lblocks = cdiv(L_out, block_l)
    grid = (B * n_lblocks, cdiv(C_out, block_c))
    n_tiles = B * n_lblocks
    part = _alloc.empty((n_tiles, 3, C_out), dtype=sdt, device=dev)
    # The final mask as forward saved it in bits (saves_mask_bits), rather than out.
    read_bits = mask_bits is not None and mask_bits.numel() > 0
    # Deferred, grad_residual (grad_out under the final mask) is never written: whoever
    # adds it (stage 1's dgrad, ops.ResidualGradLink) reads grad_out and the bits instead.
    if defer_grad_residual and not (has_residual and read_bits):
        raise ValueError("defer_grad_residual needs a residual and the mask bits forward "
                         "saved for it")
    write_res = has_residual and not defer_grad_residual
    grad_res = _alloc.empty(grad_out.shape, dtype=dtype, device=dev) if write_res else None
    # Training batch norm makes each output channel's weight gradient orthogonal to its
    # weight. With C_in * K <= FLOAT32_WGRAD_MAX_WEIGHTS that leaves it one or a few
    # directions, and the rounding of a 16-bit grad_y, which has no such constraint, shows
    # in it magnified: up to 9x bf16's rounding at C_in * K = 2 (1.7e-2 relative over 1000
    # draws; 5.8e-3 at 3, 3.8e-3 at 4). There grad_y stays float32 and the weight gradient
    # runs in float32 (a GEMM with a reduction of C_in * K, cheap in any precision); the
    # data gradient reads a 16-bit copy.
    float32_wgrad = dtype in HALF_DTYPES and norm == NORM_CODES[NORM_TRAIN] \
        and C_in * K <= FLOAT32_WGRAD_MAX_WEIGHTS
    grad_y = _alloc.empty(grad_out.shape, dtype=torch.float32 if float32_wgrad else dtype,
                          device=dev)
    grad_gamma = grad_beta = grad_bias = None
    if norm != 0:
        grad_beta = _alloc.empty((C_out,), dtype=beta.dtype, device=dev)
        grad_gamma = _alloc.empty((C_out,), dtype=gamma.dtype, device=dev)
    if has_bias:
        grad_bias = _alloc.empty((C_out,), dtype=dtype, device=dev)
    use = lambda t: grad_y if t is None or t.numel() == 0 else t  # noqa: E731

    reduce = norm != 0 or has_bias
    n_groups = cdiv(n_tiles, tiling.FINALIZE_GROUP)
    groups = _alloc.empty((n_groups, 3, C_out), dtype=sdt, device=dev) if reduce else None
    tickets = batch_stats.counters(dev, batch_stats.n_ticket_counters(n_tiles, grid[1]))

    # Without bits or a residual, out = relu(x-hat * gamma + beta) from a float32 x-hat:
    # the kernel recomputes its sign exactly (bn_backward.py) instead of reading out.
    mask_from_xhat = norm != 0 and not has_residual and not read_bits \
        and saved.dtype == torch.float32 and act.is_relu

    def elementwise(write_g, read_g, reduce, write_grad_y):
        bn_backward.relu_bn_backward_kernel[grid](
            grad_out, out, use(mask_bits), use(saved), use(var), use(gamma), use(beta),
            use(grad_beta), use(grad_gamma), use(grad_bias), use(grad_res), grad_y, part,
            use(groups), tickets, C_out, L_out, float(B * L_out), float(eps),
            NORM=norm, RELU_BEFORE_ADD=bool(relu_before_add), WRITE_G=write_g, READ_G=read_g,
            REDUCE=reduce, WRITE_GRAD_Y=write_grad_y, MASK_FROM_XHAT=mask_from_xhat,
            MASK_BITS=read_bits,
            HAS_BIAS=has_bias,
            GROUP=tiling.FINALIZE_GROUP, FIN_BLOCK_T=min(64, max(1, 2048 // block_c)),
            BLOCK_C=block_c, BLOCK_L=block_l,
            ACT=act.code, act_param=act.kernel_param,
            res_ptr=residual.contiguous() if read_residual else grad_out,
            HAS_RES=read_residual)

    # Training: grad_y needs the full sums of g and g * xhat, which pass 1's last programs
    # finalize; pass 2 writes grad_y. Eval, layer norm and no-norm: one pass.
    elementwise(write_res, False, reduce, norm != 2)
    if norm == 2:
        elementwise(False, write_res, False, True)

    grad_y_w, x_w = grad_y, x   # the weight gradient's operands
    if float32_wgrad:
        x_w, grad_y = x.float(), grad_y.to(dtype)

    # --- conv data gradient (a whole conv: skipped where x needs no gradient).
    tma = operands.descriptor_ok(grad_y, stride) and operands.descriptor_ok(x, stride)
    grad_x = None
    if need_grad_x:
        taps = operands.tap_major_weight(weight)
        grad_x = _alloc.empty(x.shape, dtype=dtype, device=dev)
        addend = None if grad_x_addend is None else grad_x_addend.contiguous()
        addend_bits = grad_x_addend_bits if addend is not None else None

        def dgrad(cfg):
            gy_src, w_src = grad_y, taps
            if tma:
                gy_src = operands.descriptor(grad_y, (1, cfg.block_k, cfg.block_n))
                w_src = operands.weight_tile_descriptor(taps, cfg.block_k, cfg.block_m)
            conv_dgrad.conv_dgrad_kernel[(B * cdiv(L, cfg.block_n), cdiv(C_in, cfg.block_m))](
                gy_src, w_src, grad_x, grad_x if addend is None else addend,
                grad_x if addend_bits is None else addend_bits, C_in, C_out, L,
                L_out, K, stride, dilation, pad_left, taps.shape[2], taps.shape[1],
                DOT_PRECISION=precision, DOT_UPCAST=upcast, TMA=tma, BLOCK_CI=cfg.block_m,
                BLOCK_CO=cfg.block_k, BLOCK_T=cfg.block_n, HAS_ADDEND=addend is not None,
                ADDEND_BITS=addend_bits is not None,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        cfg = _gemm_config(tiling.dgrad_config(C_in, C_out, L, dtype), C_in, L, dtype,
                           tuning.key("dgrad", C_in, C_out, K, L, dtype, stride, tma), dgrad, dev,
                           tma)
        dgrad(cfg)

    # --- conv weight gradient: split the (b, l-block) reduction; the last split of each
    # tile sums them (conv_wgrad.py).
    def wgrad(cfg):
        block_co, block_ci, block_l = cfg.block_m, cfg.block_n, cfg.block_k
        n_lblocks = cdiv(L_out, block_l)
        tile_programs = cdiv(C_out, block_co) * cdiv(C_in, block_ci)
        n_splits, pairs_per_split = wgrad_splits(B * n_lblocks, tile_programs * K)
        wpart = _alloc.empty((n_splits, K * C_out * C_in), dtype=sdt, device=dev)
        gy_src, x_src = grad_y_w, x_w
        if tma_w:
            gy_src = operands.descriptor(grad_y_w, (1, block_co, block_l))
            x_src = operands.descriptor(x_w, (1, block_ci, block_l))
        conv_wgrad.conv_wgrad_kernel[(tile_programs, K, n_splits)](
            gy_src, x_src, wpart, grad_weight, batch_stats.counters(dev, tile_programs * K),
            C_in, C_out, L, L_out, K, stride, dilation, pad_left,
            n_lblocks, B * n_lblocks, pairs_per_split, DOT_PRECISION=precision_w,
            DOT_UPCAST=dot_upcast(w_dtype), TMA=tma_w, BLOCK_CO=block_co, BLOCK_CI=block_ci,
            BLOCK_L=block_l, FIN_ROWS=min(block_co, max(1, 2048 // block_ci)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    grad_weight = _alloc.empty(weight.shape, dtype=weight.dtype, device=dev)
    w_dtype = grad_y_w.dtype
    # float32_wgrad exists for accuracy: its float32 dot is IEEE, not TF32.
    precision_w = "ieee" if float32_wgrad else precision
    tma_w = operands.descriptor_ok(grad_y_w, stride) and operands.descriptor_ok(x_w, stride)
    cfg = _gemm_config(tiling.wgrad_config(C_in, C_out, L_out, w_dtype), C_out, C_in,
                       w_dtype, tuning.key("wgrad", C_in, C_out, K, L_out, w_dtype, stride,
                                           tma_w), wgrad, dev, tma_w)
    wgrad(cfg)

    return grad_x, grad_weight, grad_bias, grad_gamma, grad_beta, grad_res

