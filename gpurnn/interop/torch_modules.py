"""gpurnn inside PyTorch: ``gpurnn.torch.LSTM``, ``.GRU`` and ``.RNN`` are ``torch.nn.LSTM``,
``GRU`` and ``RNN`` (subclasses: the same constructor, parameters, initialisation, state dict and
call signature ``(input, hx=None)``, ``PackedSequence`` and unbatched input included, and the
same return structures) whose forward and backward run gpurnn's layers.  Switch in one line::

    rnn = gpurnn.torch.LSTM(32, 64, num_layers=2, batch_first=True)   # for torch.nn.LSTM(...)

How: one ``torch.autograd.Function`` runs gpurnn's forward and, in the backward, gpurnn's BPTT.
The parameters are inputs of that Function, so autograd hands their gradients to ``.grad``,
``torch.optim`` and DistributedDataParallel's hooks as for any module.

* No copies of the weights: the gpurnn layer's ``params`` are rebound on every call to views of
  the torch parameters' storage (CPU: ``tensor.numpy()``; CUDA: DLPack to CuPy), so in-place
  optimizer updates are seen and nothing is copied per step.  Inputs pass the same way
  (a non-contiguous input is made contiguous first, as gpurnn needs).
* CUDA tensors run on the gpurnn ``cuda`` backend on PyTorch's current stream (CuPy's
  ``ExternalStream``).
* dtypes: float32, float64, and the 16-bit float16 and bfloat16 (docs/precision.md).  A module
  whose parameters are 16-bit (``.to(torch.bfloat16)``) takes and returns 16-bit tensors and
  gets 16-bit gradients, as torch.nn's; gpurnn computes in float32 and accumulates the weight
  gradients in float32 before autograd casts them.  Under ``torch.autocast`` a float32 module
  runs in the autocast dtype wherever torch.nn's same module would (asked of torch itself, once
  per device, cell and dtype): outputs in 16 bits, gradients of the float32 parameters and
  inputs in float32.
* ``torch.compile``: the call into gpurnn is excluded from compilation (a graph break), so a
  compiled model that contains these layers runs, with gpurnn's kernels, in eager mode there.
* Dropout between layers (training) draws its masks from a gpurnn generator seeded from torch's
  global one when the layer first runs: reproducible under ``torch.manual_seed``, but not the
  masks torch.nn.LSTM would draw.
* ``PackedSequence`` input is unpacked to a padded batch plus lengths (gpurnn runs variable
  lengths in any order, without sorting) and the output repacked in the input's layout.
"""
import contextlib
import weakref

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("gpurnn.torch needs PyTorch, which is not installed: "
                      "pip install 'gpurnn[torch]' (or install torch yourself)") from exc
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import numpy as np

from ..kernels.storage import dtype_name
from ..nn import layers as _layers
from ..nn.validation import bfloat16 as _bfloat16

__all__ = ["RNN", "LSTM", "GRU"]

_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
           torch.bfloat16: "bfloat16"}


# ------------------------------------------------------------------------------ tensors <-> arrays
def _array(t):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``t``'s memory; ``t`` contiguous.  bfloat16
    goes as its bits (NumPy has no bfloat16 of its own), viewed as ml_dtypes' bfloat16."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    bf16 = t.dtype == torch.bfloat16
    if bf16:
        t = t.view(torch.int16)
    if t.is_cuda:
        import cupy

        a = cupy.from_dlpack(t)
    else:
        a = t.numpy()
    return a.view(_bfloat16()) if bf16 else a


def _tensor(a, device):
    """A tensor sharing the memory of gpurnn's array ``a``."""
    bf16 = dtype_name(a.dtype) == "bfloat16"
    if bf16:
        a = a.view(np.int16)
    t = torch.from_dlpack(a) if device.type == "cuda" else torch.from_numpy(a)
    return t.view(torch.bfloat16) if bf16 else t


_AUTOCAST_DTYPES = {}  # (device type, module class, parameter dtype, autocast dtype) -> dtype


def _autocast_dtype(module, device, dtype):
    """The dtype torch.nn's own module of ``module``'s kind computes in under the autocast
    state now active on ``device``, for parameters of ``dtype``: found by running a 1-unit
    module of that kind once (torch's autocast lists differ by device and cell)."""
    cast = torch.get_autocast_dtype(device.type)
    key = (device.type, type(module), dtype, cast)
    if key not in _AUTOCAST_DTYPES:
        torch_class = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
        probe = torch_class(1, 1, device=device, dtype=dtype)
        with torch.no_grad():
            out, _ = probe(torch.zeros(1, 1, 1, device=device, dtype=dtype))
        _AUTOCAST_DTYPES[key] = out.dtype
    return _AUTOCAST_DTYPES[key]


@contextlib.contextmanager
def _on_device(device):
    """For CUDA: make CuPy (and so gpurnn's kernels) use ``device`` and PyTorch's current stream."""
    if device.type != "cuda":
        yield
        return
    import cupy

    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        yield


# ------------------------------------------------------------------------------ the Function
class _Engine:
    """The gpurnn layer that runs a module on one (device, dtype), and its free workspace sets.

    A gpurnn layer keeps a forward's activations in a workspace set that the next forward of
    the same shape reuses.  Here each forward whose backward may come gets its own set
    (``forward_with_tape``), returned to ``free`` only when its autograd graph is gone, so
    several forwards may precede their backwards (and ``retain_graph`` backwards may repeat)."""

    def __init__(self, layer):
        self.layer = layer
        self.free = []
        self.bound = {}  # parameter name -> (data pointer, dtype, shape) its array views

    def take(self):
        return self.free.pop() if self.free else {}


class _Activations:
    """One training forward's tape (and so its workspace set), alive as long as its autograd
    node; the set returns to the engine's free sets after."""

    def __init__(self, engine, tape):
        self.tape = tape
        weakref.finalize(self, engine.free.append, tape.workspaces)


def _bind(engine, names, params):
    """Point the gpurnn layer's ``params`` at the torch parameters' memory (no copy).  A
    contiguous parameter whose memory the layer already views (``engine.bound``) is left as it
    is: the view stays valid as long as the tensor keeps its memory (the view holds it), and
    making it again costs microseconds per parameter and call."""
    for name, p in zip(names, params):
        key = (p.data_ptr(), p.dtype, p.shape) if p.is_contiguous() else None
        if key is None or engine.bound.get(name) != key:
            engine.layer.params[name] = _array(p)
            engine.bound[name] = key


_N_ARGS = 7  # engine, names, lengths, dropout, x, h0, c0; then the parameters


class _RNNFunction(torch.autograd.Function):
    """(x [T,B,I], h0, c0 [L*D,B,H] or None, *params) -> out [T,B,D*H], h_n (, c_n)."""

    @staticmethod
    def forward(ctx, engine, names, lengths, dropout, x, h0, c0, *params):
        layer = engine.layer
        keep = any(ctx.needs_input_grad) or dropout > 0  # gpurnn drops out in training forwards
        workspaces = engine.take()
        with _on_device(x.device):
            _bind(engine, names, params)
            layer.dropout = dropout
            layer.train(keep)
            state = None
            if h0 is not None:
                state = (_array(h0), _array(c0)) if c0 is not None else _array(h0)
            out, final, tape = layer.forward_with_tape(_array(x), state, lengths, workspaces)
        if any(ctx.needs_input_grad):
            ctx.activations = _Activations(engine, tape)
            ctx.engine, ctx.names = engine, names
            ctx.save_for_backward(x, h0, c0, *params)  # in-place changes before backward: error
            ctx.set_materialize_grads(False)
        else:
            engine.free.append(workspaces)
        finals = final if isinstance(final, tuple) else (final,)
        return (_tensor(out, x.device),) + tuple(_tensor(f, x.device) for f in finals)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *dfinals):
        # Unpacking checks every saved tensor's version: a parameter changed in place since the
        # forward raises here, as the tape's weights are views of its memory.
        x, h0, c0, *_ = ctx.saved_tensors
        layer, acts = ctx.engine.layer, ctx.activations
        with _on_device(x.device):  # the tape holds the forward's weights: nothing to bind
            xp = layer.backend.xp
            tape = acts.tape
            dout = xp.zeros(tape.out_shape, layer.dtype) if dout is None else _array(dout)
            dstate = None
            if any(d is not None for d in dfinals):
                shape = layer.state_shape(tape.batch)
                parts = tuple(xp.zeros(shape, layer.dtype) if d is None else _array(d)
                              for d in dfinals)
                dstate = parts if len(parts) == 2 else parts[0]
            # The weight gradients go to arrays of this backward's own, handed to autograd as
            # they are (no copy): the next backward writes into new ones.
            layer.grads = {n: xp.empty(g.shape, g.dtype) for n, g in layer.grads.items()}
            dx, dstate0 = layer.backward_through(tape, dout, dstate)
            need = ctx.needs_input_grad
            dstates = dstate0 if isinstance(dstate0, tuple) else (dstate0, None)
            grads = [None] * 4
            grads.append(_tensor(dx, x.device) if need[4] else None)
            grads += [_tensor(d, x.device) if d is not None and need[5 + i] else None
                      for i, d in enumerate(dstates)]
            grads += [_tensor(layer.grads[n], x.device) if need[_N_ARGS + i] else None
                      for i, n in enumerate(ctx.names)]
        return tuple(grads)


# ------------------------------------------------------------------------------ the modules
class _GpurnnMixin:
    """What the three modules share: everything but torch's constructor and parameters."""

    _gpurnn_class = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.dropout >= 1:
            raise ValueError(f"gpurnn.torch.{type(self).__name__}: dropout must be in [0, 1), "
                             f"got {self.dropout}")
        self._engines = {}

    def __getstate__(self):  # pickling / deepcopy: gpurnn layers are rebuilt on the next call
        state = dict(super().__getstate__())
        state["_engines"] = {}
        return state

    def _gpurnn_options(self):
        return {}

    def _engine(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._engines:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
            layer = self._gpurnn_class(
                self.input_size, self.hidden_size, num_layers=self.num_layers, bias=self.bias,
                bidirectional=self.bidirectional, device="cuda" if device.type == "cuda" else "cpu",
                dtype=_DTYPES[dtype], seed=seed, **self._gpurnn_options())
            self._engines[key] = _Engine(layer)
        return self._engines[key]

    def forward(self, input, hx=None):
        """torch's signature and results: ``output, h_n`` (RNN, GRU) or ``output, (h_n, c_n)``."""
        lstm = self._gpurnn_class is _layers.LSTM
        name = type(self).__name__
        lengths = None
        if isinstance(input, PackedSequence):
            x, lengths_t = pad_packed_sequence(input)  # [T, B, I], lengths in the batch's order
            lengths = lengths_t.numpy()
            batched = True
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                raise ValueError(f"{name}: input must be a 2-D (unbatched) or 3-D tensor or a "
                                 f"PackedSequence, got {_describe(input)}")
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
        h0 = c0 = None
        if hx is not None:
            if lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {_describe(hx)}")
                h0, c0 = hx
            else:
                if not isinstance(hx, torch.Tensor):
                    raise TypeError(f"{name}: hx must be a tensor, got {_describe(hx)}")
                h0 = hx
            for part in (h0, c0) if lstm else (h0,):
                if part.dim() != (3 if batched else 2):
                    raise ValueError(f"{name}: for {'batched 3-D' if batched else 'unbatched 2-D'}"
                                     f" input, hx must be {3 if batched else 2}-D, got "
                                     f"{part.dim()}-D")
            if not batched:
                h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if lstm else None)
        out, *finals = self._run(x, h0, c0, lengths)
        if isinstance(input, PackedSequence):
            out = _repack(out, input, lengths_t)
        elif not batched:
            out, finals = out.squeeze(1), [f.squeeze(1) for f in finals]
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (tuple(finals) if lstm else finals[0])

    @torch.compiler.disable
    def _run(self, x, h0, c0, lengths):
        """x [T, B, I] time-major -> out [T, B, D*H], h_n (, c_n) through gpurnn."""
        names = tuple(self._flat_weights_names)
        params = [getattr(self, n) for n in names]
        dtype = params[0].dtype
        if dtype not in _DTYPES:
            raise TypeError(f"{type(self).__name__}: gpurnn runs {', '.join(_DTYPES.values())}; "
                            f"the parameters are {dtype}")
        run = dtype
        if torch.is_autocast_enabled(x.device.type) and dtype == torch.float32:
            run = _autocast_dtype(self, x.device, dtype)
            x, h0, c0 = (t.to(run) if t is not None and t.is_floating_point() else t
                         for t in (x, h0, c0))
        for what, t in (("input", x), ("h_0", h0), ("c_0", c0)):
            if t is not None and (t.dtype != run or t.device != params[0].device):
                raise TypeError(f"{type(self).__name__}: {what} must be {run} on "
                                f"{params[0].device} like the parameters, got {t.dtype} on "
                                f"{t.device}")
        engine = self._engine(x.device, run)
        dropout = float(self.dropout) if self.training and self.num_layers > 1 else 0.0
        return _RNNFunction.apply(engine, names, lengths, dropout, x, h0, c0, *params)


def _describe(a):
    if isinstance(a, torch.Tensor):
        return f"a {a.dim()}-D tensor"
    return type(a).__name__


def _repack(out, like, lengths):
    """out [T, B, D*H] padded, in the batch's original order -> a PackedSequence laid out as
    ``like`` (same batch_sizes and indices)."""
    if like.sorted_indices is not None:
        order = like.sorted_indices
        out = out.index_select(1, order)
        lengths = lengths[order.cpu()]
    data = pack_padded_sequence(out, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class RNN(_GpurnnMixin, torch.nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) running gpurnn's kernels."""

    _gpurnn_class = _layers.RNN

    def _gpurnn_options(self):
        return {"nonlinearity": self.nonlinearity}


class LSTM(_GpurnnMixin, torch.nn.LSTM):
    """``torch.nn.LSTM`` running gpurnn's kernels (``proj_size`` must be 0: gpurnn's LSTM has
    no projection)."""

    _gpurnn_class = _layers.LSTM

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.proj_size:
            raise ValueError(f"gpurnn.torch.LSTM: proj_size={self.proj_size} is not supported "
                             "(gpurnn's LSTM has no projection); use proj_size=0")


class GRU(_GpurnnMixin, torch.nn.GRU):
    """``torch.nn.GRU`` running gpurnn's reset-after GRU, which is PyTorch's cell exactly."""

    _gpurnn_class = _layers.GRU

    def _gpurnn_options(self):
        return {"reset_after": True}
