"""The float32 CPU step kernels compile to packed SIMD arithmetic, so that a later change cannot
silently fall back to scalar code (about 4-10x slower here).

The compiled LLVM IR of each kernel, for the signature the time loops call it with (checked in
test_cpu_threads.py), must hold packed float multiplications of at least 4 lanes: ``<4 x
float>`` (SSE), ``<8 x float>`` (AVX2, and AVX-512 CPUs where LLVM prefers 256-bit vectors),
``<16 x float>`` (AVX-512).  Only the gate math multiplies: the pre-activation sums, copies and
fills around it do not, so a packed ``fmul`` means the math loop itself was vectorised."""
import re

import numba
import numpy as np
import pytest

from gpurnn.engine.backend import CPUBackend
from gpurnn.kernels.signatures import STEP_KERNELS, numba_signature

_PACKED_FMUL = re.compile(r"= fmul (?:[a-z]+ )*<(\d+) x float>")


def packed_fmul_lanes(llvm_ir):
    """Lane counts of the packed float32 multiplications in ``llvm_ir``, 4 lanes or more."""
    return sorted({int(n) for n in _PACKED_FMUL.findall(llvm_ir) if int(n) >= 4})


def _llvm_ir(dispatcher, signature):
    """Optimised LLVM IR of ``dispatcher`` for ``signature``, compiled afresh with the same
    options (Numba cannot show the IR of code it loaded from its cache)."""
    options = {k: v for k, v in dispatcher.targetoptions.items() if k != "nopython"}
    fresh = numba.njit(**options)(dispatcher.py_func)
    fresh.compile(signature)
    return fresh.inspect_llvm(signature)


@pytest.mark.parametrize("name", sorted(n for n in STEP_KERNELS if n != "dropout_mask"))
def test_float32_step_kernel_is_vectorised(name):
    """The gate math's kernels (the dropout mask's is an integer hash: whether it vectorises
    depends on the CPU's 64-bit multiplies)."""
    kernel = CPUBackend().kernels(np.float32)[name]
    lanes = packed_fmul_lanes(_llvm_ir(kernel, numba_signature(STEP_KERNELS[name], np.float32)))
    assert lanes, f"{name}: no packed float32 multiplication, the gate math runs scalar"


def test_detector_sees_a_scalar_loop():
    """The check fails on a scalar loop: the same loop compiled with Numba's default error
    model, whose zero check before every float division keeps it scalar."""
    def loop(out, x):
        for j in range(x.shape[0]):
            out[j] = x[j] * x[j] / (x[j] + np.float32(1))

    sig = (numba.float32[::1], numba.float32[::1])
    assert packed_fmul_lanes(_llvm_ir(numba.njit(error_model="python")(loop), sig)) == []
    assert packed_fmul_lanes(_llvm_ir(numba.njit(error_model="numpy")(loop), sig))
