#!/usr/bin/env bash
# GPU evidence in one command, from the repo root on a GPU machine (at most 9 minutes):
#
#     FASTRES_COMMIT=<sha> bash benchmarks/gpu_evidence.sh "$OUT" [gpu_evidence.py options]
#
# Builds fastres._C in place for the visible GPU's architecture (MAX_JOBS=16; a build that
# fails or passes 4 minutes is recorded and the run goes on without the extension), then runs
# benchmarks/gpu_evidence.py with PYTHONPATH=$PWD and a deadline of this script's start plus
# 9 minutes. Writes build.log and <device>-<date>-evidence.{json,md,png} into OUT.
# FASTRES_COMMIT names the commit where the tree has no .git. See benchmarks/README.md.
set -u
out="${1:?usage: bash benchmarks/gpu_evidence.sh OUT_DIR}"
mkdir -p "$out"
start=$(date +%s)
py=$(command -v python || command -v python3)
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
echo "building fastres._C for sm_${arch:-unknown} (log: $out/build.log)"
TORCH_CUDA_ARCH_LIST="${arch:-9.0}" MAX_JOBS=16 timeout 240 \
    "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1
status=$?
built=$(date +%s)
echo "build finished in $((built - start)) s with exit status $status"
PYTHONPATH=$PWD "$py" benchmarks/gpu_evidence.py --out "$out" --deadline $((start + 540)) \
    --build-log "$out/build.log" --build-status "$status" --build-seconds $((built - start)) \
    "${@:2}"
