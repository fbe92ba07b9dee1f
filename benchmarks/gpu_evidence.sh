#!/usr/bin/env bash
# GPU evidence in one command of at most 10 minutes, from a copy of the repo on a GPU machine
# (no network, no .git needed):
#
#     FASTRES_COMMIT=<sha> bash benchmarks/gpu_evidence.sh OUT_DIR [gpu_evidence.py options]
#     bash benchmarks/gpu_evidence.sh --smoke OUT_DIR [options]     # CPU smoke run (CI)
#
# Finds a Python that has torch (FASTRES_PYTHON, else python3, else python), builds fastres._C
# in place for the visible GPU's architecture (MAX_JOBS = the core count; a build that fails
# or passes 4 minutes is recorded and the run goes on without the extension), then runs
# benchmarks/gpu_evidence.py with PYTHONPATH=<repo> and a deadline of this script's start
# plus 9 minutes. Every section runs in its own processes with a hard timeout (see the
# script). Writes build.log, <device>-<date>-evidence.{json,md,png} and sections/ into
# OUT_DIR. FASTRES_COMMIT names the commit where the tree has no .git.
# --smoke: no build (the extension as installed), CUDA hidden, Triton interpreted, tiny shapes.
set -u
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
out="${1:?usage: bash benchmarks/gpu_evidence.sh [--smoke] OUT_DIR [options]}"
shift
start=$(date +%s)
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

py=""
for candidate in ${FASTRES_PYTHON:-} python3 python; do
    if command -v "$candidate" > /dev/null 2>&1 \
            && "$candidate" -c "import torch" > /dev/null 2>&1; then
        py=$(command -v "$candidate")
        break
    fi
done
if [ -z "$py" ]; then
    echo "FAILED: no Python with torch found (tried ${FASTRES_PYTHON:-} python3 python)" \
        | tee "$out/no-python.txt"
    exit 2
fi
commit=${FASTRES_COMMIT:-$(git rev-parse HEAD 2> /dev/null || echo unknown)}
echo "python: $py ($("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))"
echo "commit: $commit"

if [ $smoke = 1 ]; then
    CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
        exec "$py" benchmarks/gpu_evidence.py --smoke --out "$out" --commit "$commit" "$@"
fi

arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2> /dev/null)
echo "building fastres._C for sm_${arch:-unknown} (log: $out/build.log)"
TORCH_CUDA_ARCH_LIST="${arch:-9.0}" MAX_JOBS=$(nproc) timeout -k 10 240 \
    "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1
status=$?
built=$(date +%s)
if [ $status = 0 ]; then
    echo "build finished in $((built - start)) s"
else
    echo "BUILD FAILED (exit status $status after $((built - start)) s): the run goes on" \
         "without the extension (no cuda backend); tail of $out/build.log:"
    tail -5 "$out/build.log"
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" benchmarks/gpu_evidence.py --out "$out" \
    --deadline $((start + 540)) --commit "$commit" --build-log "$out/build.log" \
    --build-status "$status" --build-seconds $((built - start)) "$@"
