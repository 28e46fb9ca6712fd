"""The parameters of every step kernel, declared once: name, dtype role and rank.

A step kernel runs one time step of one cell over a ``[B, H]`` grid of (batch row, hidden
unit).  Its CPU version (``kernels/cpu.py``) and its CUDA version (``kernels/cuda.py``) take
the same parameters, in the order of its table here; each is written as a named function
under ``@step_kernel(TABLE)``, which checks that the function's parameters are the table's.
The tables give the Numba signature (``numba_signature``) for eager CUDA compilation, for the
fast launcher's argument packing, for the PTX tests and for inspecting the compiled CPU code.

Roles: ``STORED`` arrays of the layer's dtype, which the GEMMs read or which the layer returns
(states ``h``, outputs, saved gates, pre-activation gradients); ``FLOAT`` arrays of the dtype
the kernels compute in (GEMM outputs, biases, the LSTM cell state, carried gradients): the same
dtype for float32 and float64 layers, float32 under 16-bit ``STORED`` arrays
(``kernels/storage.py``).  All C-contiguous.  ``LENGTHS`` the int32 array of valid steps per
sequence, ``COUNTER`` an int32 array the kernel counts in (the persistent kernels' barrier),
``INT`` an int64 scalar, ``REAL`` a scalar of the compute dtype (the dropout mask's
probability and scale below; the optimisers' updates, ``kernels/updates.py``).  Shapes: ``G`` gate blocks of ``H`` units along the last axis (gate
``k`` of unit ``j`` at column ``k*H + j``), ``S`` saved blocks.
"""
import inspect
from dataclasses import dataclass

import numba
import numpy as np

from .storage import compute_dtype, kernel_dtype

STORED, FLOAT, LENGTHS, COUNTER, INT, REAL = "stored", "float", "lengths", "counter", "int", "real"


@dataclass(frozen=True)
class Param:
    name: str
    role: str  # STORED, FLOAT, LENGTHS, COUNTER, INT or REAL
    rank: int = 0


def _int(name):
    return Param(name, INT)


def _float(name, rank):
    return Param(name, FLOAT, rank)


def _stored(name, rank):
    return Param(name, STORED, rank)


def _real(name):
    return Param(name, REAL)


_GRID = (_int("B"), _int("H"))
# lengths [B] int32 and the step t: step t of sequence b is padding when t >= lengths[b]
_MASK = (Param("lengths", LENGTHS, 1), _int("t"))

# ------------------------------------------------------------------------------------ RNN
RNN_FORWARD_STEP = _GRID + (
    _stored("y", 2),      # [B, H] output of step t (zero where padding)
    _stored("h_new", 2),  # [B, H] state after step t
    _float("xg", 2),      # [B, H] x_t W_ih^T
    _float("hg", 2),      # [B, H] h_prev W_hh^T
    _float("b_ih", 1), _float("b_hh", 1),  # [H]
    _stored("h_prev", 2),  # [B, H]
) + _MASK + (_int("relu"),)

RNN_BACKWARD_STEP = _GRID + (
    _stored("dg", 2),       # [B, H] out: pre-activation gradient
    _float("dh_carry", 2),  # [B, H] in/out: dL/dh not through W_hh (see kernels/cpu.py)
    _stored("dy", 2),       # [B, H] gradient of the output of step t
    _float("dh_rec", 2),    # [B, H] dg_{t+1} @ W_hh
    _stored("h", 2),        # [B, H] state after step t
) + _MASK + (_int("relu"),)

# ------------------------------------------------------------------------- LSTM (G=4, S=4)
LSTM_FORWARD_STEP = _GRID + (
    _stored("y", 2), _stored("h_new", 2),  # [B, H]
    _float("c_new", 2),    # [B, H] out: c of step t, the value the next step reads
    _stored("c_saved", 2),  # [B, H] out: c of step t as the backward reads it (may be c_new)
    _stored("gates", 2),  # [B, 4H] out: saved i, f, g, o
    _float("xg", 2), _float("hg", 2),  # [B, 4H]
    _float("b_ih", 1), _float("b_hh", 1),  # [4H]
    _stored("h_prev", 2),
    _float("c_prev", 2),   # [B, H]
) + _MASK + (_int("save"),)  # 1: store the gates (training); 0: inference, nothing reads them

LSTM_BACKWARD_STEP = _GRID + (
    _stored("dg", 2),       # [B, 4H] out
    _float("dh_carry", 2),  # [B, H] in/out
    _float("dc", 2),        # [B, H] in/out: dL/dc_t in, dL/dc_{t-1} out
    _stored("dy", 2), _float("dh_rec", 2),  # [B, H]
    _stored("gates", 2),    # [B, 4H] saved by the forward
    _stored("c", 2),        # [B, H] c of step t, saved by the forward (c_saved)
    _stored("c_prev", 2),   # [B, H] c of the step before, the same
    _stored("h", 2),        # [B, H] out: h of step t rebuilt, o*tanh(c) (h0 where padding)
    _stored("h0", 2),       # [B, H] the initial state, which padding steps carry
) + _MASK

# ------------------------------------------------- GRU, reset after the product (G=3, S=4)
GRU_RESET_AFTER_FORWARD_STEP = _GRID + (
    _stored("y", 2), _stored("h_new", 2),  # [B, H]
    _stored("gates", 2),  # [B, 4H] out: saved r, z, n, W_hn h_prev + b_hn
    _float("xg", 2), _float("hg", 2),  # [B, 3H]
    _float("b_ih", 1), _float("b_hh", 1),  # [3H]
    _stored("h_prev", 2),  # [B, H]
) + _MASK + (_int("save"),)  # as the LSTM's

GRU_RESET_AFTER_BACKWARD_STEP = _GRID + (
    _stored("dgx", 2),  # [B, 3H] out: pre-activation gradients, input path
    _stored("dgh", 2),  # [B, 3H] out: recurrent path (n block: r * dgx_n)
    _float("dh_carry", 2), _stored("dy", 2), _float("dh_rec", 2),  # [B, H]
    _stored("gates", 2),  # [B, 4H]
    _stored("h_prev", 2),  # [B, H]
) + _MASK

# ------------------------------------------------ GRU, reset before the product (G=3, S=4)
GRU_RESET_BEFORE_GATES_STEP = _GRID + (
    _stored("gates", 2),  # [B, 4H] out: r, z and r*h_prev (blocks 0, 1, 3)
    _float("xg", 2),      # [B, 3H]
    _float("hg_rz", 2),   # [B, 2H] h_prev W_hrz^T
    _float("b_ih", 1), _float("b_hh", 1),  # [3H]
    _stored("h_prev", 2),  # [B, H]
)  # every row, padding or not: the candidate step applies the mask

GRU_RESET_BEFORE_CANDIDATE_STEP = _GRID + (
    _stored("y", 2), _stored("h_new", 2),  # [B, H]
    _stored("gates", 2),  # [B, 4H] in: z; out: n (block 2)
    _float("xg", 2),      # [B, 3H]
    _float("hg_n", 2),    # [B, H] (r*h_prev) W_hn^T
    _float("b_ih", 1), _float("b_hh", 1),  # [3H]
    _stored("h_prev", 2),  # [B, H]
) + _MASK

GRU_RESET_BEFORE_CANDIDATE_BACKWARD_STEP = _GRID + (
    _stored("dg", 2),  # [B, 3H] out: z and n blocks
    _float("dh_carry", 2), _stored("dy", 2), _float("dh_rec", 2),  # [B, H]
    _stored("gates", 2),  # [B, 4H]
    _stored("h_prev", 2),  # [B, H]
) + _MASK

GRU_RESET_BEFORE_GATES_BACKWARD_STEP = _GRID + (
    _stored("dg", 2),       # [B, 3H] out: r block
    _float("dh_carry", 2),  # [B, H] in/out
    _float("drh", 2),       # [B, H] dL/d(r*h_prev) = dg_n @ W_hn
    _stored("gates", 2),    # [B, 4H]
    _stored("h_prev", 2),   # [B, H]
) + _MASK

# ------------------------------------------------------------------ dropout between layers
DROPOUT_MASK = _GRID + (
    _stored("mask", 2),  # [B, H] out: scale where kept, else 0 (any 2-D array: rows, columns)
    _int("seed"),        # the layer's dropout seed
    _int("offset"),      # draws made before: element (b, j) is draw offset + b*H + j
    _real("p"),          # the probability of a zero
    _real("scale"),      # 1 / (1 - p)
)

#: Every step kernel's name and parameters (the dropout mask's too: the same [B, H] grid).
STEP_KERNELS = {
    "dropout_mask": DROPOUT_MASK,
    "rnn_forward_step": RNN_FORWARD_STEP,
    "rnn_backward_step": RNN_BACKWARD_STEP,
    "lstm_forward_step": LSTM_FORWARD_STEP,
    "lstm_backward_step": LSTM_BACKWARD_STEP,
    "gru_reset_after_forward_step": GRU_RESET_AFTER_FORWARD_STEP,
    "gru_reset_after_backward_step": GRU_RESET_AFTER_BACKWARD_STEP,
    "gru_reset_before_gates_step": GRU_RESET_BEFORE_GATES_STEP,
    "gru_reset_before_candidate_step": GRU_RESET_BEFORE_CANDIDATE_STEP,
    "gru_reset_before_candidate_backward_step": GRU_RESET_BEFORE_CANDIDATE_BACKWARD_STEP,
    "gru_reset_before_gates_backward_step": GRU_RESET_BEFORE_GATES_BACKWARD_STEP,
}


def numba_type(param, dtype):
    """The Numba type of one parameter for kernels of layers of ``dtype``."""
    if param.role == INT:
        return numba.int64
    if param.role == REAL:
        return numba.from_dtype(compute_dtype(dtype))
    element = {LENGTHS: np.dtype(np.int32), COUNTER: np.dtype(np.int32),
               STORED: kernel_dtype(dtype), FLOAT: compute_dtype(dtype)}[param.role]
    return numba.types.Array(numba.from_dtype(element), param.rank, "C")


def numba_signature(params, dtype):
    """The Numba argument types of a kernel with parameters ``params``, for ``dtype``."""
    return tuple(numba_type(p, dtype) for p in params)


def step_kernel(params):
    """Declare a function's parameters by a table: checks that its parameter names are the
    table's, in order, and records the table as ``fn.params``."""
    names = tuple(p.name for p in params)

    def declare(fn):
        got = tuple(inspect.signature(fn).parameters)
        if got != names:
            raise TypeError(f"{fn.__name__} takes {got}, its declared parameters are {names}")
        fn.params = params
        return fn

    return declare
