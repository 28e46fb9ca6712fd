"""The gate math of every cell, written once per dtype, as functions of scalars.

Every function here takes and returns scalars (no arrays) and is jitted with
``numba.njit(inline="always")``.  The CPU step kernels (``kernels/cpu.py``) call them inside
loops over a row of hidden units, which LLVM vectorises because the math is straight-line and
branch-free; the CUDA kernels (``kernels/cuda.py``, ``kernels/persistent.py``) call them once per
thread; under Numba's CUDA simulator the simulated threads call the same compiled functions.
So the CPU and CUDA paths cannot drift apart.

Names: ``a*`` are pre-activations (``x W_ih^T + b_ih + h W_hh^T + b_hh`` of one gate), ``d*``
gradients of the loss; the forward functions return the post-activation gates the backward
needs, the backward functions the pre-activation gradients (flushed, below).  Derivatives use the saved
post-activation values (``s*(1-s)``, ``1-t*t``); the LSTM's backward recomputes ``tanh(c)``
from the saved cell state.

Numerics:

* float32 ``tanh``: a rational minimax form (Eigen's ``generic_fast_tanh_float`` coefficients),
  odd polynomial of degree 13 over even of degree 6, argument clamped to +-9 where float32 tanh
  is +-1; at most 6 ulp from the exact value over the whole float32 range
  (``tests/test_cell_math.py``).
* float32 ``sigmoid``: ``1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)`` below, both computed,
  with ``e = exp(-|x|)``, so ``exp`` never overflows and the result keeps its relative accuracy
  in both tails (``0.5 + 0.5 tanh(x/2)`` loses it below about -3: ``1 + tanh`` cancels).
  ``exp`` is Cephes' ``expf`` polynomial on a range-reduced argument, scaled by ``2^n`` built
  from its bits in two halves, so subnormal results are right too: at most 3 ulp over the whole
  float32 range (tested).
* Both are branch-free: clamps are ``at_least``/``at_most``, the sigmoid's two tails a select,
  and no libm call, so a row of them compiles to packed SIMD instructions.  A NaN stays NaN on
  every target: the clamps are Numba's ``min``/``max`` on the CPU (one ``vminps``/``vmaxps``,
  which keep a NaN there) and a compare and a select on the GPU, where numba-cuda lowers
  ``min``/``max`` to PTX ``min.f32``/``max.f32``, which return the number beside a NaN
  (``tests/test_ptx.py`` holds every kernel free of them).
* float64 keeps libm's ``tanh`` and ``exp`` (at most 1 ulp): a rational or polynomial form
  accurate to float64 needs far higher degrees, and the float64 kernels are the reference of the
  gradient checks, not the fast path.  Its sigmoid is the same select form, so it never
  overflows either.
* The backward functions flush every gradient they return to zero where its magnitude is below
  the dtype's smallest normal number (``flush``; a NaN stays NaN), as a GPU's flush-to-zero mode
  does.  A vanishing gradient otherwise sinks into the subnormal range, and x86 arithmetic on
  subnormal operands is far slower: a float32 training step at T=400, B=32, H=64, I=1, with
  the loss on the last step only, took 149 ms with them and 40 ms flushed for the LSTM, 98 and
  30 ms for the GRU (one thread, Intel Sapphire Rapids, medians of 3 alternating runs; the
  weight-gradient GEMM ``[256, 12800] @ [12800, 64]`` alone: 5.7 ms on values near 1, 936 ms
  near 1e-40).  What
  is flushed is below 1.2e-38 (float32) or 2.2e-308 (float64): no gradient that moves a weight.
* Every float constant is bound to the dtype (``one = dtype(1)``): a bare ``1.0`` is float64 in
  Numba and would put float64 instructions into float32 code (``tests/test_ptx.py`` greps the
  float32 PTX for them).
"""
import functools
import math
from types import SimpleNamespace

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


def at_least(x, low):
    """``max(x, low)``, a NaN ``x`` staying NaN on every target (module docstring): Numba's
    ``max`` on the CPU, this body (a compare and a select) on CUDA: the overloads below."""
    return low if low > x else x


def at_most(x, high):
    """``min(x, high)``, and a NaN ``x`` stays NaN: as ``at_least``."""
    return high if high < x else x


def nan_as(n, low):
    """``n``, or ``low`` where ``n`` is NaN, for an ``n`` never below ``low`` otherwise: on the
    CPU Numba's ``max(low, n)``, which returns its first argument beside a NaN (one
    ``vmaxps``); on the GPU a NaN test and a select (kept free of PTX ``max.f32``,
    ``tests/test_ptx.py``)."""
    return n if n == n else low


@overload(at_least, target="cpu", inline="always")
def _at_least_cpu(x, low):
    return lambda x, low: max(x, low)


@overload(at_least, target="cuda")
def _at_least_cuda(x, low):
    return at_least  # its body: a compare and a select


@overload(at_most, target="cpu", inline="always")
def _at_most_cpu(x, high):
    return lambda x, high: min(x, high)


@overload(at_most, target="cuda")
def _at_most_cuda(x, high):
    return at_most


@overload(nan_as, target="cpu", inline="always")
def _nan_as_cpu(n, low):
    return lambda n, low: max(low, n)


@overload(nan_as, target="cuda")
def _nan_as_cuda(n, low):
    return nan_as


@functools.lru_cache(maxsize=None)
def make_cell_math(dtype):
    """The jitted scalar functions of every cell for ``dtype`` (float32 or float64)."""
    dtype = np.dtype(dtype).type
    one, zero = dtype(1), dtype(0)
    tanh = _make_tanh(dtype)
    sigmoid = _make_sigmoid(dtype)

    tiny = dtype(np.finfo(dtype).tiny)  # the smallest normal number

    @numba.njit(inline="always")
    def flush(x):
        """``x``, or zero where ``|x|`` is below the smallest normal number (NaN stays NaN)."""
        return zero if abs(x) < tiny else x

    @numba.njit(inline="always")
    def relu_or_tanh(a, relu):
        return at_least(a, zero) if relu else tanh(a)

    # ---------------------------------------------------------------- RNN (tanh or ReLU)
    @numba.njit(inline="always")
    def rnn_forward(a, relu):
        """h = act(a)."""
        return relu_or_tanh(a, relu)

    @numba.njit(inline="always")
    def rnn_backward(dh, h, relu):
        """da from dL/dh and the saved output h."""
        if relu:
            return flush(dh) if h > zero else zero
        return flush(dh * (one - h * h))

    # ---------------------------------------------------------------- LSTM (gates i, f, g, o)
    @numba.njit(inline="always")
    def lstm_forward(ai, af, ag, ao, c_prev):
        """(i, f, g, o, c, h): c = f*c_prev + i*g, h = o*tanh(c)."""
        i = sigmoid(ai)
        f = sigmoid(af)
        g = tanh(ag)
        o = sigmoid(ao)
        c = f * c_prev + i * g
        return i, f, g, o, c, o * tanh(c)

    @numba.njit(inline="always")
    def lstm_backward(dh, dc, i, f, g, o, c, c_prev):
        """(dai, daf, dag, dao, dc_prev, h) from dL/dh, dL/dc of this step and the saved
        values; ``tanh(c)`` is recomputed from the saved ``c`` (the same function of the same
        value as the forward's), and with it ``h = o*tanh(c)``, the state the step made, which
        the backward rebuilds instead of the forward keeping it."""
        tanh_c = tanh(c)
        dct = dc + dh * o * (one - tanh_c * tanh_c)  # dL/dc_t: through h = o*tanh(c), and on
        return (flush(dct * g * i * (one - i)),     # dai = dct * g * s'(ai)
                flush(dct * c_prev * f * (one - f)),  # daf = dct * c_prev * s'(af)
                flush(dct * i * (one - g * g)),     # dag = dct * i * tanh'(ag)
                flush(dh * tanh_c * o * (one - o)),  # dao = dh * tanh(c) * s'(ao)
                flush(dct * f),                     # dL/dc_prev
                o * tanh_c)                         # h, rebuilt

    # ------------------------------------------ GRU, reset after the product (cuDNN/PyTorch)
    @numba.njit(inline="always")
    def gru_reset_after_forward(ar, az, xn, hn, h_prev):
        """(r, z, n, h): r = s(ar), z = s(az), n = tanh(xn + r*hn), h = (1-z)*n + z*h_prev,
        where xn = W_in x + b_in and hn = W_hn h_prev + b_hn."""
        r = sigmoid(ar)
        z = sigmoid(az)
        n = tanh(xn + r * hn)
        return r, z, n, (one - z) * n + z * h_prev

    @numba.njit(inline="always")
    def gru_reset_after_backward(dh, r, z, n, hn, h_prev):
        """(dar, daz, dxn, dhn, dh_prev): dxn = dL/dxn; dhn = r*dxn, the n block's gradient on
        the recurrent path; dh_prev the part of dL/dh_prev that does not go through W_hh."""
        dxn = flush(dh * (one - z) * (one - n * n))
        return (flush(dxn * hn * r * (one - r)), flush(dh * (h_prev - n) * z * (one - z)), dxn,
                flush(dxn * r), flush(dh * z))

    # -------------------------------- GRU, reset before the product (gpurnn's reset_after=False)
    # r = s(ar), z = s(az), n = tanh(an) with an = W_in x + b_in + W_hn (r*h_prev) + b_hn,
    # h = (1-z)*h_prev + z*n: two recurrent products per step, so two functions each way.
    @numba.njit(inline="always")
    def gru_reset_before_gates(ar, az, h_prev):
        """(r, z, r*h_prev); r*h_prev is the input of the candidate's product."""
        r = sigmoid(ar)
        return r, sigmoid(az), r * h_prev

    @numba.njit(inline="always")
    def gru_reset_before_candidate(an, z, h_prev):
        """(n, h)."""
        n = tanh(an)
        return n, (one - z) * h_prev + z * n

    @numba.njit(inline="always")
    def gru_reset_before_candidate_backward(dh, z, n, h_prev):
        """(daz, dan, dh_prev): dh_prev the direct part of dL/dh_prev, (1-z)*dh."""
        return (flush(dh * (n - h_prev) * z * (one - z)), flush(dh * z * (one - n * n)),
                flush(dh * (one - z)))

    @numba.njit(inline="always")
    def gru_reset_before_gates_backward(drh, r, h_prev):
        """(dar, dh_prev) from drh = dL/d(r*h_prev); dh_prev the part through r*h_prev."""
        return flush(drh * h_prev * r * (one - r)), flush(drh * r)

    # ----------------------------------------------------------- dropout between layers
    bits = 24 if dtype == np.float32 else 53  # a uniform draw with the dtype's mantissa
    drop_shift = np.uint64(64 - bits)
    unit = dtype(2.0 ** -bits)

    @numba.njit(inline="always")
    def dropout(seed, position, p, scale):
        """``scale``, or zero with probability ``p``: draw number ``position`` of the stream
        ``seed`` starts (``splitmix64``), its top bits a uniform ``u`` in [0, 1), dropped
        where ``u < p``."""
        u = dtype(splitmix64(seed, position) >> drop_shift) * unit
        return scale if u >= p else zero

    return SimpleNamespace(
        dtype=dtype, zero=zero, tanh=tanh, sigmoid=sigmoid, flush=flush, dropout=dropout,
        rnn_forward=rnn_forward, rnn_backward=rnn_backward,
        lstm_forward=lstm_forward, lstm_backward=lstm_backward,
        gru_reset_after_forward=gru_reset_after_forward,
        gru_reset_after_backward=gru_reset_after_backward,
        gru_reset_before_gates=gru_reset_before_gates,
        gru_reset_before_candidate=gru_reset_before_candidate,
        gru_reset_before_candidate_backward=gru_reset_before_candidate_backward,
        gru_reset_before_gates_backward=gru_reset_before_gates_backward,
    )


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment, 2^64 / golden ratio
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))
_ONE64 = np.uint64(1)


@numba.njit(inline="always")
def splitmix64(seed, position):
    """Output number ``position`` (from 0) of SplitMix64 seeded with ``seed`` (Steele, Lea and
    Flood 2014; Vigna's ``splitmix64.c``), computed on its own: the generator's state after
    ``position + 1`` steps is ``seed + (position + 1) * GOLDEN``, and an output is a mix of its
    state alone.  So any element of a dropout mask is a function of (seed, position) and the
    CPU loop, the CUDA kernel and the simulator draw the same masks.  uint64 arithmetic wraps
    (the simulator's NumPy scalars warn of it, the tests silence that)."""
    s30, s27, s31 = _SHIFTS
    z = numba.uint64(seed) + (numba.uint64(position) + _ONE64) * _GOLDEN
    z = (z ^ (z >> s30)) * _MIX1
    z = (z ^ (z >> s27)) * _MIX2
    return z ^ (z >> s31)


def _make_tanh(dtype):
    """``tanh`` for ``dtype``: libm's for float64, the rational form for float32."""
    if dtype == np.float64:
        @numba.njit(inline="always")
        def tanh64(x):
            return math.tanh(x)

        return tanh64
    f = np.float32
    one = f(1)
    # Beyond 9, float32 tanh is 1 (1 - tanh(9) < 2^-25); the form gives exactly 1 there, with
    # or without fused multiply-adds (Eigen's clamp at 7.905 leaves 1 - 4 ulp with them).
    clamp = f(9.0)
    a1, a3, a5, a7 = f(4.89352455891786e-03), f(6.37261928875436e-04), f(1.48572235717979e-05), \
        f(5.12229709037114e-08)
    a9, a11, a13 = f(-8.60467152213735e-11), f(2.00018790482477e-13), f(-2.76076847742355e-16)
    b0, b2, b4, b6 = f(4.89352518554385e-03), f(2.26843463243900e-03), f(1.18534705686654e-04), \
        f(1.19825839466702e-06)

    @numba.njit(inline="always")
    def tanh32(x):
        c = at_most(at_least(x, -clamp), clamp)
        x2 = c * c
        p = (((((a13 * x2 + a11) * x2 + a9) * x2 + a7) * x2 + a5) * x2 + a3) * x2 + a1
        q = ((b6 * x2 + b4) * x2 + b2) * x2 + b0
        # c * (p/q), not (c*p)/q: c*p underflows into the subnormals for |x| < 2.4e-36 and
        # lost up to 100 ulp there; p/q is near 1.  Clamped: between 7.9 and 9 the form
        # overshoots 1 by an ulp or two.
        return at_most(at_least(c * (p / q), -one), one)

    return tanh32


def _make_sigmoid(dtype):
    """``sigmoid`` for ``dtype``: ``1/(1+e)`` or ``e/(1+e)`` by the sign of ``x``, with
    ``e = exp(-|x|)`` (libm's for float64, ``_exp_nonpositive32`` for float32)."""
    one = dtype(1)
    zero = dtype(0)
    exp_nonpositive = _exp_nonpositive32 if dtype == np.float32 else _exp64

    @numba.njit(inline="always")
    def sigmoid(x):
        e = exp_nonpositive(-abs(x))
        s = one / (one + e)
        return s if x >= zero else e * s

    return sigmoid


@numba.njit(inline="always")
def _exp64(a):
    return math.exp(a)


@intrinsic
def _pow2_32(typingctx, n):
    """2**n as float32 for an integer-valued float32 ``n`` in [-126, 127], from its bits:
    exponent field ``n + 127``, mantissa zero."""
    if n != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        exponent = builder.add(builder.fptosi(args[0], i32), i32(127))
        return builder.bitcast(builder.shl(exponent, i32(23)), ir.FloatType())

    return types.float32(types.float32), codegen


_F = np.float32
_EXP_LOW = _F(-110.0)  # exp of anything lower is 0 in float32 (below half the least subnormal)
_LOG2E = _F(1.44269504088896341)
_ROUND = _F(12582912.0)  # 1.5 * 2**23: (t + _ROUND) - _ROUND is t rounded to an integer
_LN2_HIGH, _LN2_LOW = _F(0.693359375), _F(-2.12194440e-4)  # ln 2 in two parts (Cephes)
_EXP_P = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3), _F(4.1665795894e-2),
          _F(1.6666665459e-1), _F(5.0000001201e-1))
_N_LOW = _F(-160.0)  # n in place of a NaN (any number would do: the result is NaN by e)
_ONE32, _HALF32 = _F(1.0), _F(0.5)


@numba.njit(inline="always")
def _exp_nonpositive32(a):
    """exp(a) in float32 for a <= 0 (or NaN), branch-free (Cephes ``expf``).

    ``a = n ln2 + r`` with integer ``n`` and ``|r| <= ln2/2``; ``exp(r)`` by a degree-6
    polynomial; ``2^n`` applied as ``2^n1 * 2^(n - n1)`` (n1 about n/2), so that each factor is
    a normal float32 and only the last product rounds into the subnormals."""
    p0, p1, p2, p3, p4, p5 = _EXP_P
    a = at_least(a, _EXP_LOW)
    n = (a * _LOG2E + _ROUND) - _ROUND
    r = a - n * _LN2_HIGH - n * _LN2_LOW
    e = (((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * r * r + r + _ONE32
    n = nan_as(n, _N_LOW)  # a NaN n (of a NaN a) made a number: its conversion is defined
    n_half = (n * _HALF32 + _ROUND) - _ROUND
    return e * _pow2_32(n_half) * _pow2_32(n - n_half)
