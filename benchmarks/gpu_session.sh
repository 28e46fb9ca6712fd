#!/usr/bin/env bash
# The GPU checks in one device call (docs/gpu.md, "On a GPU session"): install gpurnn in place
# (and the wheels carried in .whl: NumPy 2.4 for numba-cuda 0.30, nvmath-python for capturable
# cuBLAS calls), check that numba-cuda can compile and run a kernel here, probe the non-finite
# guard's CUDA failure (graphs on, off, eager launches), run the test suite on the real GPU, then the gpurnn-vs-cuDNN benchmark (float32 with the defaults, TF32 and strict
# FP32; the fused step kernels at small batch; bfloat16 and float16), the
# char-LM training step against torch.nn, `gpurnn train` on the GPU and the CPU, a cProfile of
# `gpurnn train` on the GPU (benchmarks/profile_train.py), the adding
# problem of length 100 learnt in bfloat16 and float32, and gpurnn.torch against torch.nn.
# Each part has a time limit, so one part that hangs costs its limit, not the session.  Logs and JSON go under ./gpu_out; where $OUT is set (the device
# tool's folder that comes back, at most eight files), they are also packed into
# $OUT/gpu_session.tgz after every part, so a call stopped at its limit still brings back what
# ran.
#
#   [SUITE=paths] [SUITE_LIMIT=seconds] bash benchmarks/gpu_session.sh [all|tests|bench|setup]
#
# ``setup`` installs and checks only (then PYTHONPATH=/tmp/site gives later commands the wheels);
# SUITE: the test files to run (default tests/).
set -u
cd "$(dirname "$0")/.."
out=gpu_out
mkdir -p "$out"
py=${PYTHON:-python3}
what=${1:-all}
case "$what" in all|tests|bench|setup) ;; *) echo "usage: $0 [all|tests|bench|setup], got '$what'" >&2; exit 2;; esac

if ls .whl/*.whl > /dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if ! $py -c "from nvmath.bindings import cublas; cublas.destroy(cublas.create())" 2> /dev/null \
        && ls .whl/extra/*.whl > /dev/null 2>&1; then  # a newer cuda-pathfinder for nvmath
        $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
            --upgrade .whl/extra/*.whl || exit 1
    fi
fi
if ! $py -m pip install --no-deps --no-build-isolation -q -e . > "$out/install.txt" 2>&1; then
    echo "pip install -e . failed:"; tail -n 20 "$out/install.txt"; exit 1
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt"
$py -c "
import numpy, numba, numba_cuda, cupy, torch
try:
    from nvmath.bindings import cublas
    cublas.destroy(cublas.create())
    import nvmath
    nv = nvmath.__version__
except Exception as exc:
    nv = f'unusable ({type(exc).__name__}: {exc})'
print(f'numpy {numpy.__version__} numba {numba.__version__} numba-cuda {numba_cuda.__version__} '
      f'cupy {cupy.__version__} torch {torch.__version__} cudnn {torch.backends.cudnn.version()} '
      f'nvmath-python {nv}')" 2>&1 | tee "$out/versions.txt"
reason=$(NUMBA_ENABLE_CUDASIM=0 $py -W ignore -c "import gpurnn; print(gpurnn.cuda_unavailable_reason() or '')" 2> "$out/reason_stderr.txt") \
    || reason="gpurnn failed to import: $(tail -n 3 "$out/reason_stderr.txt")"
if [ -n "$reason" ]; then
    echo "gpurnn cannot use this GPU, nothing run: $reason" | tee "$out/unavailable.txt"; exit 3
fi
[ "$what" = setup ] && exit 0

part() {  # part SECONDS LOG COMMAND...: run with a time limit, log under $out, say how it ended
    local limit=$1 log=$2
    shift 2
    timeout "$limit" "$@" > "$out/$log" 2>&1
    local rc=$?
    [ $rc = 124 ] && echo "$log: stopped at its limit of $limit s"
    if [ -n "${OUT:-}" ]; then  # logs and JSON only (no checkpoints)
        (cd "$out" && find . -type f \( -name '*.txt' -o -name '*.json' -o -name '*.csv' \) \
            -size -4M -print0 | tar czf "$OUT/gpu_session.tgz" --null -T -)
    fi
    return $rc
}

if [ "$what" != bench ]; then
    # pytest-xdist where installed: the suite in parallel over the machine's cores
    parallel=$($py -c "import xdist; print('-n 12')" 2>/dev/null)
    # -v: each result on its own line as it comes (a run stopped at its limit still names
    # what failed); --tb=short: the tracebacks at the end
    # alone (``tests``) the suite gets most of a call; beside the benchmarks, 150 s (on the
    # H200 at 1411d64 it had not finished by then)
    limit=$([ "$what" = tests ] && echo "${SUITE_LIMIT:-420}" || echo 150)
    # The guard test that failed on the H200 (a NaN step that is a fresh process's first
    # capture) and the tests that pin it, each setting in a fresh process first: graphs on
    # (the default), graphs off, and Numba's own launches (no graphs either), so that one call
    # says whether the capture path is where the wrong loss comes from.
    for setting in "" GPURNN_CUDA_GRAPHS=0 GPURNN_CUDA_LAUNCH=eager; do
        name=probe_${setting:-default}
        part 60 "$name.txt" env $setting $py -m pytest -q --tb=line -p no:cacheprovider -W ignore \
            tests/test_nonfinite.py::test_guard_on_the_cuda_path \
            "tests/test_cuda_simulator.py::test_a_fresh_backends_capturing_step_sees_its_own_input" \
            "tests/test_cuda_simulator.py::test_a_fresh_backends_capturing_step_computes_the_cpus_loss"
        echo "guard probe ${setting:-default}: rc=$? $(tail -n 1 "$out/$name.txt")"
    done
    part "$limit" pytest.txt $py -m pytest -v --tb=short -rf -p no:cacheprovider -W ignore \
        $parallel ${SUITE:-tests/}
    echo "pytest: rc=$? $(tail -n 1 "$out/pytest.txt")"
    grep -E "(FAILED|ERROR) tests/" "$out/pytest.txt" | sed 's/.*\(FAILED\|ERROR\)/\1/' \
        | sort -u | head -n 20
fi
if [ "$what" != tests ]; then
    # the defaults, TF32 and strict FP32 on both sides, at every shape of the issue
    part 180 gpu_compare.txt $py benchmarks/gpu_compare.py --variants default,default+fp32 \
        --warmup 3 --repeat 10 --json "$out/gpu_compare.json"
    echo "gpu_compare: rc=$?"
    grep -E "^(host|GEMM|variant|---|default)" "$out/gpu_compare.txt" | tail -n 28
    # the fused step kernels (one launch a step, graphs on and off) against the default
    # (graphs of the per-step loop) at small batch, where the dispatch rule has them off until
    # measured (gpurnn/engine/dispatch.py)
    part 60 gpu_compare_fused.txt $py benchmarks/gpu_compare.py \
        --variants fast+fused+graphs,fast+fused --shapes 1000,4,256 1000,1,128 --warmup 3 \
        --repeat 10 --no-launch-cost --no-tf32-check --json "$out/gpu_compare_fused.json"
    echo "gpu_compare fast+fused at small batch: rc=$?"
    tail -n 14 "$out/gpu_compare_fused.txt"
    # where the host time of a training step on the GPU goes (the table's top rows)
    part 40 profile_train_cuda.txt $py benchmarks/profile_train.py --device cuda --steps 300 \
        --top 40
    echo "profile_train --device cuda: rc=$?"
    grep -E "ms per step" "$out/profile_train_cuda.txt"
    for dtype in bfloat16 float16; do  # 16-bit against torch.nn in the same dtype
        part 60 gpu_compare_$dtype.txt $py benchmarks/gpu_compare.py --dtype $dtype \
            --shapes 100,64,512 100,256,1024 --variants default --warmup 3 --repeat 10 \
            --no-launch-cost --no-tf32-check --json "$out/gpu_compare_$dtype.json"
        echo "gpu_compare $dtype: rc=$?"
        tail -n 6 "$out/gpu_compare_$dtype.txt"
    done
    for device in cuda cpu; do
        part 40 train_$device.txt $py -m gpurnn train --device $device --quiet \
            --out "$out/train_$device"
        echo "gpurnn train --device $device: rc=$? $(grep '^done' "$out/train_$device.txt")"
    done
    # issue 15's learning check: the adding problem of length 100 in bfloat16 and float32
    for dtype in bfloat16 float32; do
        part 60 train_adding100_$dtype.txt $py -m gpurnn train --device cuda --quiet \
            --task adding --seq-len 100 --cell lstm --hidden 64 --lr 1e-2 --steps 3000 \
            --eval-every 100 --stop-at 0.01 --dtype $dtype --out "$out/train_adding100_$dtype"
        echo "adding 100 $dtype: rc=$? $(grep -E '^done|test mse' "$out/train_adding100_$dtype.txt" | tr '\n' ' ')"
    done
    part 45 torch_modules.txt $py benchmarks/torch_modules_compare.py \
        --json "$out/torch_modules.json"
    echo "torch_modules_compare: rc=$?"
    grep -E "ratio|Error" "$out/torch_modules.txt"
    # the README's GPU-sized example against torch.nn
    part 45 train_compare.txt $py benchmarks/train_compare.py --device cuda --task charlm \
        --layers 2 --hidden 1024 --batch 256 --steps 20 --json "$out/train_compare.json"
    echo "train_compare: rc=$? $(tail -n 1 "$out/train_compare.txt")"
fi
