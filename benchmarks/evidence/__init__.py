"""The sections of benchmarks/gpu_evidence.py: every GPU claim of fastres in one run.

    context.py       the run: device, smoke or GPU sizes, the global deadline, section budgets,
                     and the shared timing helpers (device time and host time per call)
    results.py       the section records and the writer of <prefix>.json / .md after each section
    environment.py   1. environment          2. measured ceilings
    correctness.py   3. fastres check        4. parity at realistic shapes, bitwise repeat
    speed.py         5. timings              8. launch overhead (CUDA graphs)
    profiling.py     6. where the time goes (torch.profiler)
    triton_meta.py   7. Triton metadata and SASS instruction mix of the kernels fastres launched
    memory_stream.py 9. peak memory          10. streaming step latency
    goals.py         the summary: each goal, measured value, met or missed
    plot.py          the PNG

Every section is one function `run(ctx, section)` that fills its Section record (results.py)
and may raise SectionSkipped / SectionUnavailable; gpu_evidence.py runs them in order, each
in processes of its own under a time budget and a hard timeout, and records any other
exception, a crash or a hang in the JSON instead of stopping. Sections that only judge
correctness (check, parity) take `ctx.shard` and run every n-th item, so that several
processes share them; their totals come from correctness.SUMMARIZE once the shards merge.
"""
