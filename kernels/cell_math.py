"""The gate math of every cell, written once, for one dtype at a time.

Each ``*_elem`` function is the whole work of one time step for one element ``(b, j)``
(batch row ``b``, hidden unit ``j``): load, gate math, store, and the length mask.  The CPU
backend loops over ``(b, j)`` and calls them compiled (``kernels/cpu.py``); the CUDA backend
runs one thread per ``(b, j)`` and calls the same functions compiled for the GPU, or their
pure-Python source under Numba's CUDA simulator (``kernels/cuda.py``).  So the two backends
cannot drift apart.

Conventions shared by every element function:

* ``H`` is the hidden size; gate ``k`` of unit ``j`` lives at column ``k*H + j`` of a gate row.
* ``lengths[b]`` is the number of valid steps of sequence ``b``; a step ``t >= lengths[b]`` is
  padding: the state is carried unchanged, the output is zero, and no gradient is produced.
* Pre-activations are ``xg_t + hg + b_hh``: ``xg_t`` already holds ``x W_ih^T + b_ih`` (one big
  GEMM over all steps), ``hg`` holds the recurrent product ``h W_hh^T`` of this step.
* Backward: ``dh_carry`` holds the part of ``dL/dh`` that does not go through ``W_hh`` (the
  direct paths, and everything on padded steps); ``dh_rec`` holds the part that came through
  ``W_hh`` (``dgates_{t+1} @ W_hh``, a GEMM).  Each backward element reads both, and writes the
  new ``dh_carry`` in place: ``dL/dh_prev = dh_carry + dgates_t @ W_hh``.
* Derivatives use the saved post-activation values: ``s*(1-s)``, ``1-t*t``.

Every float constant is bound to the dtype (``one = dtype(1)``) so a float32 kernel has no
float64 instruction in it (a bare ``1.0`` is float64 in Numba); a CI test greps the PTX for that.
"""
import math

import numba
import numpy as np


def make_cell_math(dtype):
    """Return a namespace of the jitted element functions for ``dtype`` (float32 or float64)."""
    dtype = np.dtype(dtype).type
    one = dtype(1.0)
    zero = dtype(0.0)

    tanh = _make_tanh(dtype)

    @numba.njit(inline="always")
    def sigmoid(x):
        # Never calls exp on a positive argument, so it cannot overflow.
        if x >= zero:
            return one / (one + math.exp(-x))
        e = math.exp(x)
        return e / (one + e)

    @numba.njit(inline="always")
    def activation(x, relu):
        if relu:
            return max(x, zero)
        return tanh(x)

    @numba.njit(inline="always")
    def activation_grad(y, relu):
        """Derivative of the activation, from its output ``y``."""
        if relu:
            return one if y > zero else zero
        return one - y * y

    # ---------------------------------------------------------------- RNN (tanh or ReLU)
    @numba.njit
    def rnn_forward_elem(b, j, H, y_t, h_new, xg_t, hg, b_hh, h_prev, lengths, t, relu):
        # y_t, h_new [B, H]; xg_t, hg [B, H]; b_hh [H]; h_prev [B, H]; lengths [B]
        if t < lengths[b]:
            h = activation(xg_t[b, j] + hg[b, j] + b_hh[j], relu)
            h_new[b, j] = h
            y_t[b, j] = h
        else:
            h_new[b, j] = h_prev[b, j]
            y_t[b, j] = zero

    @numba.njit
    def rnn_backward_elem(b, j, H, dg_t, dh_carry, dy_t, dh_rec, h_new, lengths, t, relu):
        # dg_t [B, H]; dh_carry [B, H] (in place); dy_t, dh_rec, h_new [B, H]; lengths [B]
        dh = dh_carry[b, j] + dh_rec[b, j]
        if t < lengths[b]:
            dg_t[b, j] = (dh + dy_t[b, j]) * activation_grad(h_new[b, j], relu)
            dh_carry[b, j] = zero
        else:
            dg_t[b, j] = zero
            dh_carry[b, j] = dh

    # ---------------------------------------------------------------- LSTM (gates i, f, g, o)
    @numba.njit
    def lstm_forward_elem(b, j, H, y_t, h_new, c_new, gates_t, xg_t, hg, b_hh, h_prev, c_prev,
                          lengths, t):
        # y_t, h_new, c_new [B, H]; gates_t [B, 4H] (saved i, f, g, o); xg_t, hg [B, 4H];
        # b_hh [4H]; h_prev, c_prev [B, H]; lengths [B]
        if t < lengths[b]:
            i = sigmoid(xg_t[b, j] + hg[b, j] + b_hh[j])
            f = sigmoid(xg_t[b, H + j] + hg[b, H + j] + b_hh[H + j])
            g = tanh(xg_t[b, 2 * H + j] + hg[b, 2 * H + j] + b_hh[2 * H + j])
            o = sigmoid(xg_t[b, 3 * H + j] + hg[b, 3 * H + j] + b_hh[3 * H + j])
            c = f * c_prev[b, j] + i * g
            h = o * tanh(c)
            gates_t[b, j] = i
            gates_t[b, H + j] = f
            gates_t[b, 2 * H + j] = g
            gates_t[b, 3 * H + j] = o
            c_new[b, j] = c
            h_new[b, j] = h
            y_t[b, j] = h
        else:
            c_new[b, j] = c_prev[b, j]
            h_new[b, j] = h_prev[b, j]
            y_t[b, j] = zero

    @numba.njit
    def lstm_backward_elem(b, j, H, dg_t, dh_carry, dc, dy_t, dh_rec, gates_t, c_new, c_prev,
                           lengths, t):
        # dg_t [B, 4H]; dh_carry, dc [B, H] (in place: dL/dc_t in, dL/dc_{t-1} out);
        # dy_t, dh_rec [B, H]; gates_t [B, 4H]; c_new, c_prev [B, H]; lengths [B]
        dh = dh_carry[b, j] + dh_rec[b, j]
        if t < lengths[b]:
            dh += dy_t[b, j]
            i = gates_t[b, j]
            f = gates_t[b, H + j]
            g = gates_t[b, 2 * H + j]
            o = gates_t[b, 3 * H + j]
            tc = tanh(c_new[b, j])
            dct = dc[b, j] + dh * o * (one - tc * tc)
            dg_t[b, j] = dct * g * i * (one - i)
            dg_t[b, H + j] = dct * c_prev[b, j] * f * (one - f)
            dg_t[b, 2 * H + j] = dct * i * (one - g * g)
            dg_t[b, 3 * H + j] = dh * tc * o * (one - o)
            dc[b, j] = dct * f
            dh_carry[b, j] = zero
        else:
            for k in range(4):
                dg_t[b, k * H + j] = zero
            dh_carry[b, j] = dh

    # ------------------------------------------ GRU, reset after the product (cuDNN/PyTorch)
    # r = s(xr + hr), z = s(xz + hz), n = tanh(xn + r*hn), h = (1-z)*n + z*h_prev,
    # with hn = W_hn h_prev + b_hn saved as the fourth gate block for the backward.
    @numba.njit
    def gru_forward_elem(b, j, H, y_t, h_new, gates_t, xg_t, hg, b_hh, h_prev, lengths, t):
        # y_t, h_new [B, H]; gates_t [B, 4H] (saved r, z, n, hn); xg_t, hg [B, 3H]; b_hh [3H];
        # h_prev [B, H]; lengths [B]
        if t < lengths[b]:
            r = sigmoid(xg_t[b, j] + hg[b, j] + b_hh[j])
            z = sigmoid(xg_t[b, H + j] + hg[b, H + j] + b_hh[H + j])
            hn = hg[b, 2 * H + j] + b_hh[2 * H + j]
            n = tanh(xg_t[b, 2 * H + j] + r * hn)
            h = (one - z) * n + z * h_prev[b, j]
            gates_t[b, j] = r
            gates_t[b, H + j] = z
            gates_t[b, 2 * H + j] = n
            gates_t[b, 3 * H + j] = hn
            h_new[b, j] = h
            y_t[b, j] = h
        else:
            h_new[b, j] = h_prev[b, j]
            y_t[b, j] = zero

    @numba.njit
    def gru_backward_elem(b, j, H, dgx_t, dgh_t, dh_carry, dy_t, dh_rec, gates_t, h_prev,
                          lengths, t):
        # dgx_t, dgh_t [B, 3H] (input-path and recurrent-path pre-activation gradients, which
        # differ in the n block: dgh_n = r * dgx_n); dh_carry [B, H] (in place);
        # dy_t, dh_rec [B, H]; gates_t [B, 4H]; h_prev [B, H]; lengths [B]
        dh = dh_carry[b, j] + dh_rec[b, j]
        if t < lengths[b]:
            dh += dy_t[b, j]
            r = gates_t[b, j]
            z = gates_t[b, H + j]
            n = gates_t[b, 2 * H + j]
            hn = gates_t[b, 3 * H + j]
            dan = dh * (one - z) * (one - n * n)
            dar = dan * hn * r * (one - r)
            daz = dh * (h_prev[b, j] - n) * z * (one - z)
            dgx_t[b, j] = dar
            dgx_t[b, H + j] = daz
            dgx_t[b, 2 * H + j] = dan
            dgh_t[b, j] = dar
            dgh_t[b, H + j] = daz
            dgh_t[b, 2 * H + j] = dan * r
            dh_carry[b, j] = dh * z
        else:
            for k in range(3):
                dgx_t[b, k * H + j] = zero
                dgh_t[b, k * H + j] = zero
            dh_carry[b, j] = dh

    # ------------------------------------------- GRU, the seed's form (reset before the product)
    # r = s(ar), z = s(az), n = tanh(xn + W_hn (r*h_prev) + b_hn), h = (1-z)*h_prev + z*n.
    # Two recurrent GEMMs per step: [r, z] from h_prev, then the candidate from r*h_prev, so the
    # step is two kernels: reset (r, z, r*h) and candidate (n, h).  Saved gate blocks: r, z, n, r*h.
    @numba.njit
    def gru_seed_reset_elem(b, j, H, rh, gates_t, xg_t, hg_rz, b_hh, h_prev, lengths, t):
        # rh [B, H] (r * h_prev, input of the candidate GEMM); gates_t [B, 4H]; xg_t [B, 3H];
        # hg_rz [B, 2H]; b_hh [3H]; h_prev [B, H]; lengths [B]
        r = sigmoid(xg_t[b, j] + hg_rz[b, j] + b_hh[j])
        z = sigmoid(xg_t[b, H + j] + hg_rz[b, H + j] + b_hh[H + j])
        gates_t[b, j] = r
        gates_t[b, H + j] = z
        x = r * h_prev[b, j]
        gates_t[b, 3 * H + j] = x
        rh[b, j] = x

    @numba.njit
    def gru_seed_candidate_elem(b, j, H, y_t, h_new, gates_t, xg_t, hg_n, b_hh, h_prev,
                                lengths, t):
        # y_t, h_new [B, H]; gates_t [B, 4H]; xg_t [B, 3H]; hg_n [B, H] (W_hn (r*h_prev));
        # b_hh [3H]; h_prev [B, H]; lengths [B]
        if t < lengths[b]:
            z = gates_t[b, H + j]
            n = tanh(xg_t[b, 2 * H + j] + hg_n[b, j] + b_hh[2 * H + j])
            h = (one - z) * h_prev[b, j] + z * n
            gates_t[b, 2 * H + j] = n
            h_new[b, j] = h
            y_t[b, j] = h
        else:
            h_new[b, j] = h_prev[b, j]
            y_t[b, j] = zero

    @numba.njit
    def gru_seed_candidate_backward_elem(b, j, H, dg_t, dh_carry, dy_t, dh_rec, gates_t, h_prev,
                                         lengths, t):
        # dg_t [B, 3H] (writes the z and n blocks); dh_carry [B, H] (in place);
        # dy_t, dh_rec [B, H]; gates_t [B, 4H]; h_prev [B, H]; lengths [B]
        dh = dh_carry[b, j] + dh_rec[b, j]
        if t < lengths[b]:
            dh += dy_t[b, j]
            z = gates_t[b, H + j]
            n = gates_t[b, 2 * H + j]
            dg_t[b, H + j] = dh * (n - h_prev[b, j]) * z * (one - z)
            dg_t[b, 2 * H + j] = dh * z * (one - n * n)
            dh_carry[b, j] = dh * (one - z)
        else:
            dg_t[b, H + j] = zero
            dg_t[b, 2 * H + j] = zero
            dh_carry[b, j] = dh

    @numba.njit
    def gru_seed_reset_backward_elem(b, j, H, dg_t, dh_carry, drh, gates_t, h_prev, lengths, t):
        # dg_t [B, 3H] (writes the r block); dh_carry [B, H] (in place);
        # drh [B, H] (dL/d(r*h_prev) = dg_n @ W_hn); gates_t [B, 4H]; h_prev [B, H]; lengths [B]
        if t < lengths[b]:
            r = gates_t[b, j]
            dg_t[b, j] = drh[b, j] * h_prev[b, j] * r * (one - r)
            dh_carry[b, j] += drh[b, j] * r
        else:
            dg_t[b, j] = zero

    return _Namespace(
        rnn_forward_elem=rnn_forward_elem,
        rnn_backward_elem=rnn_backward_elem,
        lstm_forward_elem=lstm_forward_elem,
        lstm_backward_elem=lstm_backward_elem,
        gru_forward_elem=gru_forward_elem,
        gru_backward_elem=gru_backward_elem,
        gru_seed_reset_elem=gru_seed_reset_elem,
        gru_seed_candidate_elem=gru_seed_candidate_elem,
        gru_seed_candidate_backward_elem=gru_seed_candidate_backward_elem,
        gru_seed_reset_backward_elem=gru_seed_reset_backward_elem,
    )


def _make_tanh(dtype):
    """``tanh`` for ``dtype``.

    float64: libm's.  float32: a rational minimax form (Eigen's ``generic_fast_tanh_float``
    coefficients), odd polynomial of degree 13 over even of degree 6, with the argument clamped
    to +-7.905 where float32 tanh is +-1 to the last bit.  Measured on 2.2 million points over
    [-12, 12] and log-spaced down to 1e-8: at most 5.7 ulp (3.4e-7 relative) from the exact
    value, against 2.1 ulp for libm's ``tanhf``, and 4.8 against 19 ns an element on these
    machines' CPUs, where the scalar ``tanhf`` call was most of an LSTM step's pointwise time.
    Branch-free but for the clamp, and a NaN stays NaN.
    """
    if dtype == np.float64:
        @numba.njit(inline="always")
        def tanh64(x):
            return math.tanh(x)

        return tanh64
    f = np.float32
    clamp = f(7.90531110763549805)
    a1, a3, a5, a7 = f(4.89352455891786e-03), f(6.37261928875436e-04), f(1.48572235717979e-05), \
        f(5.12229709037114e-08)
    a9, a11, a13 = f(-8.60467152213735e-11), f(2.00018790482477e-13), f(-2.76076847742355e-16)
    b0, b2, b4, b6 = f(4.89352518554385e-03), f(2.26843463243900e-03), f(1.18534705686654e-04), \
        f(1.19825839466702e-06)

    @numba.njit(inline="always")
    def tanh32(x):
        c = x
        if x > clamp:
            c = clamp
        elif x < -clamp:
            c = -clamp
        x2 = c * c
        p = ((((((a13 * x2 + a11) * x2 + a9) * x2 + a7) * x2 + a5) * x2 + a3) * x2 + a1) * c
        q = ((b6 * x2 + b4) * x2 + b2) * x2 + b0
        return p / q

    return tanh32


class _Namespace(dict):
    __getattr__ = dict.__getitem__


#: Name of every step kernel, and the element function it runs.
STEP_KERNELS = {
    "rnn_forward_step": "rnn_forward_elem",
    "rnn_backward_step": "rnn_backward_elem",
    "lstm_forward_step": "lstm_forward_elem",
    "lstm_backward_step": "lstm_backward_elem",
    "gru_forward_step": "gru_forward_elem",
    "gru_backward_step": "gru_backward_elem",
    "gru_seed_reset_step": "gru_seed_reset_elem",
    "gru_seed_candidate_step": "gru_seed_candidate_elem",
    "gru_seed_candidate_backward_step": "gru_seed_candidate_backward_elem",
    "gru_seed_reset_backward_step": "gru_seed_reset_backward_elem",
}


def kernel_params(elem):
    """Array and scalar parameters of an element function, after ``(b, j, H)``."""
    code = elem.py_func.__code__
    return list(code.co_varnames[3:code.co_argcount])


def param_type(name, dtype):
    """The Numba type of a step-kernel parameter, by the naming convention above.

    Used for eager (fixed-signature) compilation and for compiling every kernel to PTX.
    """
    if name == "lengths":
        return numba.int32[::1]
    if name in ("t", "relu"):
        return numba.int64
    scalar = numba.from_dtype(np.dtype(dtype))
    if name == "b_hh":
        return scalar[::1]
    return scalar[:, ::1]
