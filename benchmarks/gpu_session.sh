#!/usr/bin/env bash
# The GPU checks in one device call (docs/gpu.md, "On a GPU session"): install gpurnn in place,
# check that numba-cuda can compile and run a kernel here, run the test suite on the real GPU
# with the default launch mode, with "eager" and with the persistent kernels forced on, then the
# gpurnn-vs-cuDNN benchmark (float32, then bfloat16 and float16 at two shapes), a char-LM
# training step against torch.nn, `gpurnn train` on the GPU and the CPU, and gpurnn.torch
# against gpurnn's layers and torch.nn.  Logs and
# JSON go under $OUT (the device tool's folder that comes back), else ./gpu_out.
#
#   bash benchmarks/gpu_session.sh [all|tests|bench]
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python3}
what=${1:-all}
case "$what" in all|tests|bench) ;; *) echo "usage: $0 [all|tests|bench], got '$what'" >&2; exit 2;; esac

if ! $py -m pip install --no-deps --no-build-isolation -q -e . > "$out/install.txt" 2>&1; then
    echo "pip install -e . failed:"; tail -n 20 "$out/install.txt"; exit 1
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt"
reason=$(NUMBA_ENABLE_CUDASIM=0 $py -c "import gpurnn; print(gpurnn.cuda_unavailable_reason() or '')" 2>&1)
if [ -n "$reason" ]; then
    echo "gpurnn cannot use this GPU, nothing run: $reason" | tee "$out/unavailable.txt"; exit 3
fi
# pytest-xdist where installed: the suite in parallel over the machine's cores
parallel=$($py -c "import xdist; print('-n 8')" 2>/dev/null)

run_tests() {  # $1: log name; the environment of the call picks the mode
    $py -m pytest -q -p no:cacheprovider $parallel tests/ > "$out/pytest_$1.txt" 2>&1
    echo "pytest $1: rc=$? $(tail -n 1 "$out/pytest_$1.txt")"
}
if [ "$what" != bench ]; then
    run_tests default
    GPURNN_CUDA_LAUNCH=eager run_tests eager
    GPURNN_PERSISTENT=1 run_tests persistent
fi
if [ "$what" != tests ]; then
    $py benchmarks/gpu_compare.py --json "$out/gpu_compare.json" > "$out/gpu_compare.txt" 2>&1
    echo "gpu_compare: rc=$?"
    tail -n 45 "$out/gpu_compare.txt"
    for dtype in bfloat16 float16; do  # 16-bit against torch.nn in the same dtype
        $py benchmarks/gpu_compare.py --dtype $dtype --shapes 100,64,512 100,256,1024 \
            --variants default --no-launch-cost --no-tf32-check \
            --json "$out/gpu_compare_$dtype.json" > "$out/gpu_compare_$dtype.txt" 2>&1
        echo "gpu_compare $dtype: rc=$?"
        tail -n 12 "$out/gpu_compare_$dtype.txt"
    done
    # the README's GPU-sized example against torch.nn, and the default task on both devices
    $py benchmarks/train_compare.py --device cuda --task charlm --layers 2 --hidden 1024 \
        --batch 256 --steps 20 --json "$out/train_compare.json" > "$out/train_compare.txt" 2>&1
    echo "train_compare: rc=$? $(tail -n 1 "$out/train_compare.txt")"
    for device in cuda cpu; do
        $py -m gpurnn train --device $device --quiet --out "$out/train_$device" \
            > "$out/train_$device.txt" 2>&1
        echo "gpurnn train --device $device: rc=$? $(grep '^done' "$out/train_$device.txt")"
    done
    $py benchmarks/torch_modules_compare.py --json "$out/torch_modules.json" \
        > "$out/torch_modules.txt" 2>&1
    echo "torch_modules_compare: rc=$?"
    cat "$out/torch_modules.txt"
fi
