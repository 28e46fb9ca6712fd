"""Weight interchange with PyTorch modules and ONNX models.

* ``from_torch(module)`` / ``layer.to_torch()``: ``torch.nn.RNN``/``LSTM``/``GRU`` <-> gpurnn
  layers.  Both sides use PyTorch's parameter names and layout, so the weights pass unchanged;
  PyTorch's GRU is gpurnn's ``reset_after=True`` form.
* ``layer.to_onnx(path)`` / ``from_onnx(path)``: a model made of ONNX's own ``RNN``/``LSTM``/``GRU``
  operators, one per layer, that any ONNX runtime runs.  Its graph::

      inputs   X [T, B, I] ([B, T, I] when batch_first);
               with sequence_lens=True: sequence_lens [B] int32;
               with initial_states=True: initial_h [L*D, B, H], initial_c [L*D, B, H] (LSTM)
      per layer l: (Split the initial states ->) <op>(X_l, W_l, R_l, B_l, sequence_lens, h0_l,
               c0_l), the inputs not asked for left out (ONNX's operators then take full
               lengths and zero states) -> Y_l [T, D, B, H] -> Transpose -> [T, B, D, H]
               -> Reshape -> X_{l+1} [T, B, D*H]
      outputs  Y [T, B, D*H] (like gpurnn's output), Y_h [L*D, B, H], Y_c [L*D, B, H] (LSTM)

  By default ``X`` is the one input, so a consumer feeds one array; ``from_onnx`` reads every
  form.

  ONNX orders the gate blocks LSTM i,o,f,c and GRU z,r,h (gpurnn, like PyTorch: i,f,g,o and
  r,z,n), and ``B`` is ``[Wb, Rb]`` concatenated.  GRU forms: PyTorch's (reset after) is
  ``linear_before_reset=1``; the reset-before GRU (gpurnn's default) is ``linear_before_reset=0``,
  whose update is ``h = (1-z)*h~ + z*h_prev`` where gpurnn's has ``h = (1-z)*h_prev + z*h~``: the z
  blocks (weights and both biases) are negated on export and import, since
  ``sigmoid(-a) = 1 - sigmoid(a)``.  Dropout, a training option, is not part of the model.
"""
import os

import numpy as np

from ..engine.drivers import CellSpec
from ..engine.files import write_atomically
from ..nn import layers
from ..nn.export import register_exporter
from ..nn.params import param_suffix

#: torch's ``module.mode`` -> (gpurnn class name, its options)
_FROM_TORCH_MODE = {
    "RNN_TANH": ("RNN", {"nonlinearity": "tanh"}),
    "RNN_RELU": ("RNN", {"nonlinearity": "relu"}),
    "LSTM": ("LSTM", {}),
    "GRU": ("GRU", {"reset_after": True}),
}

#: the dtypes of torch modules from_torch takes, and of ONNX models (ONNX's RNN, LSTM and GRU
#: operators take float16, float and double: no bfloat16)
_TORCH_TYPES = ("float32", "float64", "float16", "bfloat16")
_ONNX_TYPES = ("float32", "float64", "float16")

ONNX_OPSET = 17
_ONNX_IR_VERSION = 8  # the IR version of opset 17, which runtimes of that era load


def _import(name, extra):
    try:
        return __import__(name)
    except ImportError as exc:
        raise ImportError(f"this needs the '{name}' package, which is not installed: "
                          f"pip install 'gpurnn[{extra}]'") from exc


# ---------------------------------------------------------------------------------- PyTorch
def from_torch(module, device="cpu"):
    """A gpurnn layer with the configuration and a copy of the weights of ``module``, a
    ``torch.nn.RNN``, ``LSTM`` or ``GRU`` (a GRU becomes ``GRU(reset_after=True)``).  Its dtype is
    the module's parameters' (float32, float64, float16 or bfloat16; a 16-bit layer keeps the
    weights as float32 masters, docs/precision.md); ``device`` is gpurnn's."""
    torch = _import("torch", "torch")
    if not isinstance(module, torch.nn.RNNBase) or module.mode not in _FROM_TORCH_MODE:
        raise TypeError("from_torch expects a torch.nn.RNN, LSTM or GRU, got "
                        f"{type(module).__module__}.{type(module).__name__}")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"from_torch: LSTM with proj_size={module.proj_size} has no gpurnn "
                         "equivalent (gpurnn's LSTM has no projection); use proj_size=0")
    dtype = str(module.weight_ih_l0.dtype).replace("torch.", "")
    if dtype not in _TORCH_TYPES:
        raise ValueError(f"from_torch: the module's parameters must be one of {_TORCH_TYPES}, "
                         f"got {dtype}")
    cls, opts = _FROM_TORCH_MODE[module.mode]
    layer = getattr(layers, cls)(module.input_size, module.hidden_size,
                                 num_layers=module.num_layers, bias=module.bias,
                                 batch_first=module.batch_first, dropout=float(module.dropout),
                                 bidirectional=module.bidirectional, device=device, dtype=dtype,
                                 **opts)
    layer.load_state_dict(module.state_dict())
    return layer


def to_torch(layer):
    """A ``torch.nn.RNN``/``LSTM``/``GRU`` (CPU, the layer's dtype) with this layer's
    configuration and a copy of its weights.  PyTorch has only the reset-after GRU: a
    reset-before GRU (``reset_after=False``) raises ValueError."""
    torch = _import("torch", "torch")
    cell = layer.cell
    if cell.mode == "gru" and not cell.reset_after:
        raise ValueError("to_torch: this GRU is the seed's form (reset_after=False, reset applied "
                         "before the recurrent product), which PyTorch has no module for; "
                         "torch.nn.GRU is the reset_after=True form")
    kwargs = dict(num_layers=layer.num_layers, bias=layer.bias, batch_first=layer.batch_first,
                  dropout=layer.dropout, bidirectional=layer.bidirectional,
                  dtype=getattr(torch, layer.dtype.name))
    if cell.mode == "rnn":
        kwargs["nonlinearity"] = layer.nonlinearity
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell.mode]
    module = cls(layer.input_size, layer.hidden_size, **kwargs)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    return module


# ---------------------------------------------------------------------------------- ONNX
def _onnx_op(cell):
    return {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}[cell.mode]


def _onnx_blocks(cell):
    """(gpurnn block of each ONNX gate block, sign of each gpurnn block).

    ONNX block k holds ``sign[perm[k]] * gpurnn block perm[k]``; the signs are -1 for the z
    block of the reset-before GRU (see the module docstring), else +1.
    """
    if cell.mode == "lstm":
        return (0, 3, 1, 2), (1, 1, 1, 1)  # ONNX i, o, f, c  <-  gpurnn i, f, g, o
    if cell.mode == "gru":
        return (1, 0, 2), ((1, 1, 1) if cell.reset_after else (1, -1, 1))  # z, r, h  <-  r, z, n
    return (0,), (1,)


def _to_onnx_order(a, cell, H):
    """a [G*H, ...] (or [G*H]) in gpurnn's order -> the same in ONNX's order."""
    perm, sign = _onnx_blocks(cell)
    return np.concatenate([sign[j] * a[j * H:(j + 1) * H] for j in perm])


def _from_onnx_order(a, cell, H):
    """The inverse of ``_to_onnx_order`` (the signs are their own inverse)."""
    perm, sign = _onnx_blocks(cell)
    where = {j: k for k, j in enumerate(perm)}
    return np.concatenate([sign[j] * a[where[j] * H:(where[j] + 1) * H]
                           for j in range(len(perm))])


def _onnx_weights(layer, state):
    """{initializer name: array} of the recurrent nodes: W_l [D, G*H, in], R_l [D, G*H, H],
    B_l [D, 2*G*H], from a state dict in gpurnn's layout."""
    H, cell = layer.hidden_size, layer.cell
    out = {}
    for l in range(layer.num_layers):
        sfx = [param_suffix(l, d) for d in range(layer.num_directions)]
        out[f"W_l{l}"] = np.stack([_to_onnx_order(state[f"weight_ih{s}"], cell, H) for s in sfx])
        out[f"R_l{l}"] = np.stack([_to_onnx_order(state[f"weight_hh{s}"], cell, H) for s in sfx])
        if layer.bias:
            out[f"B_l{l}"] = np.stack([
                np.concatenate([_to_onnx_order(state[f"bias_ih{s}"], cell, H),
                                _to_onnx_order(state[f"bias_hh{s}"], cell, H)]) for s in sfx])
    return out


def _state_from_onnx_weights(layer, weights):
    """The inverse of ``_onnx_weights``: gpurnn's state dict."""
    H, G, cell = layer.hidden_size, layer.cell.gates, layer.cell
    state = {}
    for l in range(layer.num_layers):
        for d in range(layer.num_directions):
            s = param_suffix(l, d)
            state[f"weight_ih{s}"] = _from_onnx_order(weights[f"W_l{l}"][d], cell, H)
            state[f"weight_hh{s}"] = _from_onnx_order(weights[f"R_l{l}"][d], cell, H)
            if layer.bias:
                b = weights[f"B_l{l}"][d]  # [2*G*H] = [Wb, Rb]
                state[f"bias_ih{s}"] = _from_onnx_order(b[:G * H], cell, H)
                state[f"bias_hh{s}"] = _from_onnx_order(b[G * H:], cell, H)
    return state


def _onnx_inputs(layer, sequence_lens, initial_states):
    """The names of the graph's inputs, in order."""
    states = ["initial_h", "initial_c"] if layer.cell.has_cell_state else ["initial_h"]
    return ["X"] + (["sequence_lens"] if sequence_lens else []) + \
        (states if initial_states else [])


def _onnx_graph(layer, sequence_lens, initial_states):
    """The graph's nodes and its constant (non-weight) initializers, named deterministically:
    ``from_onnx`` rebuilds them to recognise a model written by ``to_onnx``.  A recurrent
    node's optional inputs not fed are empty names, trailing ones left out."""
    from onnx import helper

    L, D, H = layer.num_layers, layer.num_directions, layer.hidden_size
    lstm = layer.cell.has_cell_state
    attrs = dict(hidden_size=H, direction="bidirectional" if layer.bidirectional else "forward")
    if layer.cell.mode == "gru":
        attrs["linear_before_reset"] = int(layer.cell.reset_after)
    if layer.cell.mode == "rnn":
        attrs["activations"] = [layer.nonlinearity.capitalize()] * D
    consts = {"merge_directions": np.array([0, 0, -1])}
    states = (["initial_h", "initial_c"] if lstm else ["initial_h"]) if initial_states else []
    if states:
        consts["split_states"] = np.full(L, D, np.int64)
    nodes = []
    x = "X"
    if layer.batch_first:
        nodes.append(helper.make_node("Transpose", ["X"], ["X_time_major"], perm=[1, 0, 2],
                                      name="to_time_major"))
        x = "X_time_major"
    for s in states:
        nodes.append(helper.make_node("Split", [s, "split_states"],
                                      [f"{s}_l{l}" for l in range(L)], axis=0, name=f"split_{s}"))
    finals = ["Y_h", "Y_c"] if lstm else ["Y_h"]
    for l in range(L):
        ins = [x, f"W_l{l}", f"R_l{l}", f"B_l{l}" if layer.bias else "",
               "sequence_lens" if sequence_lens else ""]
        ins += [f"{s}_l{l}" for s in states]
        while ins[-1] == "":
            ins.pop()
        outs = [f"Y_l{l}"] + [f"{f}_l{l}" for f in finals]  # Y_l [T, D, B, H], finals [D, B, H]
        nodes.append(helper.make_node(_onnx_op(layer.cell), ins, outs, name=f"layer{l}", **attrs))
        nodes.append(helper.make_node("Transpose", [f"Y_l{l}"], [f"Y_l{l}_tbdh"],
                                      perm=[0, 2, 1, 3], name=f"layer{l}_transpose"))
        if l < L - 1:
            x = f"X_l{l + 1}"
        else:
            x = "Y_time_major" if layer.batch_first else "Y"
        nodes.append(helper.make_node("Reshape", [f"Y_l{l}_tbdh", "merge_directions"], [x],
                                      name=f"layer{l}_merge_directions"))
    if layer.batch_first:
        nodes.append(helper.make_node("Transpose", ["Y_time_major"], ["Y"], perm=[1, 0, 2],
                                      name="to_batch_first"))
    for f in finals:
        nodes.append(helper.make_node("Concat", [f"{f}_l{l}" for l in range(L)], [f], axis=0,
                                      name=f"concat_{f}"))
    return nodes, consts


def _node_signature(node):
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (node.op_type, list(node.input), list(node.output), attrs)


def to_onnx(layer, path, sequence_lens=False, initial_states=False):
    """Write ``layer`` as an ONNX model (see the module docstring) to ``path``, atomically
    (``engine.files.write_atomically``: fsynced, then renamed over ``path``).  Its inputs:
    ``X``, and ``sequence_lens`` and the initial states when asked for."""
    onnx = _import("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    if layer.dtype.name not in _ONNX_TYPES:
        raise ValueError(f"to_onnx: ONNX's {_onnx_op(layer.cell)} operator takes float16, "
                         f"float32 or float64, not {layer.dtype.name}: export a layer of one of "
                         f"those with this one's weights (load_state_dict(layer.state_dict()))")
    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
            "float16": TensorProto.FLOAT16}[layer.dtype.name]
    L, D, H, I = layer.num_layers, layer.num_directions, layer.hidden_size, layer.input_size
    nodes, consts = _onnx_graph(layer, sequence_lens, initial_states)
    # a 16-bit layer's weights are float32 masters: the model holds them as the GEMMs see them
    weights = {name: a.astype(layer.dtype)
               for name, a in _onnx_weights(layer, layer.state_dict()).items()}
    initializers = [numpy_helper.from_array(np.ascontiguousarray(a), name)
                    for name, a in {**weights, **consts}.items()]
    x_shape = ["batch", "time", I] if layer.batch_first else ["time", "batch", I]
    y_shape = ["batch", "time", D * H] if layer.batch_first else ["time", "batch", D * H]
    state_shape = [L * D, "batch", H]
    types = {"X": (elem, x_shape), "sequence_lens": (TensorProto.INT32, ["batch"]),
             "initial_h": (elem, state_shape), "initial_c": (elem, state_shape)}
    inputs = [helper.make_tensor_value_info(name, *types[name])
              for name in _onnx_inputs(layer, sequence_lens, initial_states)]
    outputs = [helper.make_tensor_value_info("Y", elem, y_shape),
               helper.make_tensor_value_info("Y_h", elem, state_shape)]
    if layer.cell.has_cell_state:
        outputs.append(helper.make_tensor_value_info("Y_c", elem, state_shape))
    graph = helper.make_graph(nodes, f"gpurnn_{type(layer).__name__}", inputs, outputs,
                              initializer=initializers)
    model = helper.make_model(graph, producer_name="gpurnn",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = _ONNX_IR_VERSION
    model.doc_string = repr(layer)
    onnx.checker.check_model(model)

    data = model.SerializeToString()
    write_atomically(path, lambda f: f.write(data))


def from_onnx(path, device="cpu"):
    """Read back a model written by ``to_onnx`` (any of its forms) as a gpurnn layer on
    ``device``.  Any other graph raises ValueError (this reads gpurnn's own structure, not
    arbitrary ONNX models)."""
    onnx = _import("onnx", "onnx")
    from onnx import numpy_helper

    try:
        model = onnx.load(os.fspath(path))
    except OSError:
        raise
    except Exception as exc:  # protobuf's DecodeError and kin: the bytes are not a model
        raise ValueError(f"{os.fspath(path)!r} is not a readable ONNX model: {exc}") from exc
    graph = model.graph
    where = f"{os.fspath(path)!r} is not a model written by gpurnn's to_onnx"
    recurrent = [n for n in graph.node if n.op_type in ("RNN", "LSTM", "GRU")]
    if not recurrent or len({n.op_type for n in recurrent}) != 1:
        raise ValueError(f"{where}: expected one or more RNN, LSTM or GRU nodes of one kind, "
                         f"got {[n.op_type for n in graph.node]}")
    try:
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    except (KeyError, ValueError, TypeError) as exc:  # unknown data type, size mismatch, ...
        raise ValueError(f"{where}: an initializer cannot be read: {exc!r}") from exc
    first = _node_signature(recurrent[0])
    op, ins, attrs = first[0], first[1], first[3]
    if len(ins) < 3 or ins[1] not in inits or inits[ins[1]].ndim != 3:
        raise ValueError(f"{where}: the first {op} node's W is not a 3-D initializer")
    W = inits[ins[1]]  # [D, G*H, I]
    dtype = W.dtype.name
    if dtype not in _ONNX_TYPES:
        raise ValueError(f"{where}: weights must be one of {_ONNX_TYPES}, got {dtype}")
    kwargs = dict(num_layers=len(recurrent), bias=len(ins) > 3 and ins[3] != "",
                  batch_first=any(n.op_type == "Transpose" and list(n.input) == ["X"]
                                  for n in graph.node),
                  bidirectional=attrs.get("direction") == b"bidirectional", device=device,
                  dtype=dtype)
    if op == "GRU":
        kwargs["reset_after"] = bool(attrs.get("linear_before_reset", 0))
    if op == "RNN":
        acts = attrs.get("activations", [b"Tanh"])
        kwargs["nonlinearity"] = acts[0].decode().lower() if isinstance(acts, list) and acts \
            and isinstance(acts[0], bytes) else None
        if kwargs["nonlinearity"] not in ("tanh", "relu"):
            raise ValueError(f"{where}: RNN activation must be Tanh or Relu, got {acts}")
    if "hidden_size" not in attrs:
        raise ValueError(f"{where}: the {op} node has no hidden_size attribute")
    gates = CellSpec(op.lower()).gates
    if not isinstance(attrs["hidden_size"], int) or attrs["hidden_size"] * gates != W.shape[1]:
        # checked before the layer allocates hidden_size-sized weights
        raise ValueError(f"{where}: hidden_size {attrs['hidden_size']!r} does not match W of "
                         f"shape {W.shape} ({gates} gate blocks)")
    cls = {"RNN": layers.RNN, "LSTM": layers.LSTM, "GRU": layers.GRU}[op]
    layer = cls(int(W.shape[2]), int(attrs["hidden_size"]), **kwargs)

    # Recognise the structure: the graph must be exactly the one to_onnx writes for this layer,
    # in the form its inputs name.
    fed = [i.name for i in graph.input]
    sequence_lens, initial_states = "sequence_lens" in fed, "initial_h" in fed
    if fed != _onnx_inputs(layer, sequence_lens, initial_states):
        raise ValueError(f"{where}: its inputs are {fed}, expected "
                         f"{_onnx_inputs(layer, sequence_lens, initial_states)}")
    nodes, consts = _onnx_graph(layer, sequence_lens, initial_states)
    expected = [_node_signature(n) for n in nodes]
    found = [_node_signature(n) for n in graph.node]
    if expected != found:
        diff = next((i for i, (e, f) in enumerate(zip(expected, found)) if e != f),
                    min(len(expected), len(found)))
        raise ValueError(f"{where}: its graph differs at node {diff}: expected "
                         f"{expected[diff] if diff < len(expected) else 'no node'}, got "
                         f"{found[diff] if diff < len(found) else 'no node'}")
    for name, value in consts.items():
        if name not in inits or not np.array_equal(inits[name], value):
            raise ValueError(f"{where}: initializer {name!r} must be {value.tolist()}")
    shapes = {name: a.shape for name, a in _onnx_weights(layer, layer.state_dict()).items()}
    for name, shape in shapes.items():
        if name not in inits or inits[name].shape != shape or inits[name].dtype != W.dtype:
            got = (inits[name].shape, inits[name].dtype.name) if name in inits else "nothing"
            raise ValueError(f"{where}: initializer {name!r} must be {dtype} of shape {shape}, "
                             f"got {got}")
    layer.load_state_dict(_state_from_onnx_weights(layer, inits))
    return layer


register_exporter("torch", to_torch)
register_exporter("onnx", to_onnx)
