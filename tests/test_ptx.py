"""Every CUDA kernel compiles to PTX for sm_80 and sm_90, in float32 and float64 (and the step
kernels in float16 and bfloat16), on a machine without a GPU; the float32 and 16-bit PTX has no
float64 instruction (a bare ``1.0`` in the math would add them); the 16-bit kernels move 16-bit
values and compute in float32; no kernel takes a float min or max (PTX's drop a NaN); and the
fast launcher packs exactly the parameters each compiled kernel declares."""
import ctypes
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from gpurnn.kernels.cuda import kernel_signature, pack_args
from gpurnn.kernels.fused import fused_signature
from gpurnn.kernels.ptx import all_kernels
from gpurnn.kernels.signatures import STEP_KERNELS, numba_signature
from gpurnn.kernels.updates import UPDATE_KERNELS

NAMES = sorted(all_kernels(np.float32))
HALF_NAMES = sorted(all_kernels("float16"))
CCS = [(8, 0), (9, 0)]
_F64 = re.compile(r"\.f64\b")
_F32_MATH = re.compile(r"\b(fma\.rn|mul\.rn|add\.rn|mul|add|sub)\.f32\b")
_MOVE_16 = re.compile(r"\b(ld|st)\.global\.(u16|b16)\b")
_FLOAT_MIN_MAX = re.compile(r"\b(?:min|max)(?:\.[a-zA-Z]+)*\.f(?:16|32|64)\b")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """{(name, dtype, cc): PTX text}, compiled once for the module in child processes (this
    session runs Numba's CUDA simulator, conftest.py, which has no compiler), one per target,
    side by side: the slowest set-up of the suite, halved on two cores."""
    out_dir = tmp_path_factory.mktemp("ptx")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    children = [subprocess.Popen([sys.executable, "-m", "gpurnn.kernels.ptx", str(out_dir),
                                  f"{major}{minor}"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE) for major, minor in CCS]
    for child in children:
        _, err = child.communicate(timeout=900)
        assert child.returncode == 0, err.decode()[-3000:]
    out = {}
    for path in out_dir.iterdir():
        name, dtype, sm = path.stem.split("-")
        out[name, dtype, (int(sm[3]), int(sm[4]))] = path.read_text()
    assert len(out) == len(NAMES) * 4 + len(HALF_NAMES) * 4
    return out


def _entry_params(text):
    """The ``.param`` declarations of the PTX's one ``.entry``."""
    entries = re.findall(r"\.entry\s+\S+\((.*?)\)", text, flags=re.S)
    assert len(entries) == 1, "one kernel entry per PTX module"
    return re.findall(r"\.param\s+(\.\w+)", entries[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cc", CCS, ids=["sm_80", "sm_90"])
def test_compiles_and_float32_has_no_float64(ptx, name, cc):
    f32, f64 = ptx[name, "float32", cc], ptx[name, "float64", cc]
    target = f".target sm_{cc[0]}{cc[1]}"
    assert target in f32 and target in f64
    assert not _F64.findall(f32), f"float32 {name} has float64 instructions"
    assert _F64.findall(f64), f"float64 {name} has no float64 instruction: wrong dtype bound?"


@pytest.mark.parametrize("name", HALF_NAMES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cc", CCS, ids=["sm_80", "sm_90"])
def test_half_step_kernels_store_16_bits_and_compute_in_float32(ptx, name, dtype, cc):
    text = ptx[name, dtype, cc]
    assert f".target sm_{cc[0]}{cc[1]}" in text
    assert not _F64.findall(text), f"{dtype} {name} has float64 instructions"
    assert _F32_MATH.findall(text), f"{dtype} {name} does no float32 arithmetic"
    assert _MOVE_16.findall(text), f"{dtype} {name} loads or stores no 16-bit value"
    assert not _MOVE_16.findall(ptx[name, "float32", cc]), "float32 kernels move 16-bit values"


@pytest.mark.parametrize("name", NAMES + [n for n in HALF_NAMES if n not in NAMES])
def test_no_float_min_or_max_that_would_drop_a_nan(ptx, name):
    """PTX ``min.f32``/``max.f32`` return the number beside a NaN: a clamp written with them
    turns a NaN pre-activation into a finite gate (it did: the H200 ran NaN inputs to finite
    outputs, which the NaN guard could not see).  ``cell_math``'s clamps compare and select."""
    for (kernel, dtype, cc), text in ptx.items():
        if kernel == name:
            assert not _FLOAT_MIN_MAX.findall(text), f"{dtype} {name} for sm_{cc[0]}{cc[1]}"


def _device_like(a):
    """The attributes of a CuPy array that ``pack_args`` reads, over a NumPy array."""
    return SimpleNamespace(dtype=a.dtype, ndim=a.ndim, flags=a.flags, size=a.size,
                           itemsize=a.itemsize, data=SimpleNamespace(ptr=a.ctypes.data),
                           shape=a.shape, strides=a.strides)


def _args_for(sig, dtype):
    args = []
    for ty in sig:
        if hasattr(ty, "ndim"):
            shape = (3, 5, 7)[:ty.ndim]
            args.append(_device_like(np.zeros(shape, np.dtype(str(ty.dtype)))))
        elif str(ty).startswith("float"):
            args.append(0.5)
        else:
            args.append(4)
    return args


def _fast_launched(name):
    """The dtypes a kernel the fast launcher runs is built for, and its signature of a dtype:
    the step kernels (every dtype), the fused step kernels and the optimisers' updates (float32,
    float64)."""
    if name in STEP_KERNELS:
        return ("float32", "float64", "float16", "bfloat16"), lambda d: kernel_signature(name, d)
    if name in UPDATE_KERNELS:
        return ("float32", "float64"), lambda d: numba_signature(UPDATE_KERNELS[name], d)
    return ("float32", "float64"), lambda d: fused_signature(d, name.endswith("_backward"))


def _ptx_type(packed):
    """The PTX parameter type a packed argument fills: a float scalar its own width, the rest
    (pointers, sizes, int64 scalars) 8 bytes."""
    return {ctypes.c_float: ".f32", ctypes.c_double: ".f64"}.get(type(packed), ".u64")


@pytest.mark.parametrize("name", [n for n in NAMES if n in STEP_KERNELS or n in UPDATE_KERNELS
                                  or n.startswith("fused_")])
def test_fast_launch_packs_the_declared_parameters(ptx, name):
    dtypes, signature = _fast_launched(name)
    for dtype in dtypes:
        sig = signature(dtype)
        packed = pack_args(sig, _args_for(sig, dtype))
        assert [_ptx_type(p) for p in packed] == _entry_params(ptx[name, dtype, (9, 0)])


def test_fast_launch_refuses_mismatched_arrays():
    sig = kernel_signature("rnn_forward_step", "float32")
    args = _args_for(sig, "float32")
    args[2] = _device_like(np.zeros((3, 5), np.float64))
    with pytest.raises(TypeError, match="argument 2: expected a C-contiguous 2-D float32 array, "
                                        "got 2-D float64"):
        pack_args(sig, args)
    args[2] = _device_like(np.zeros((5, 3), np.float32).T)
    with pytest.raises(TypeError, match="C-contiguous: False"):
        pack_args(sig, args)
    with pytest.raises(TypeError, match="takes 12 arguments, got 11"):
        pack_args(sig, args[:-1])


def test_fast_launcher_launches_each_shape_with_its_own_block(monkeypatch):
    """H = 5 and H = 37 at the same B share a grid (one block of units) but not a block (32 and
    64 threads): each launch gets its own shape's block, not the first one cached."""
    import cuda.core

    from gpurnn.kernels import cuda as cuda_kernels

    launched = []
    monkeypatch.setattr(cuda.core, "LaunchConfig", lambda grid, block: (grid, block))
    monkeypatch.setattr(cuda.core, "launch", lambda stream, config, kernel, *args:
                        launched.append(config))
    launcher = object.__new__(cuda_kernels._FastLauncher)  # no compiled kernel needed
    launcher._sig, launcher._shape, launcher._configs = (
        kernel_signature("rnn_forward_step", "float32")[:2], cuda_kernels.step_launch_shape, {})
    launcher._cufunc = SimpleNamespace(kernel=None)
    for H in (5, 37, 5):
        launcher(2, H, stream=None)
    assert launched == [((1, 2), (32, 1)), ((1, 2), (64, 1)), ((1, 2), (32, 1))]
