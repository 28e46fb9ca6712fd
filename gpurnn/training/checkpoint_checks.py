"""Checks that make a checkpoint file data, never code, and never more than it claims to be.

Used by ``checkpoint.py``; each raises ``ValueError`` with what was expected and what
came, which the checkpoint module turns into ``CheckpointError``.

* ``check_archive``: before NumPy reads anything, the file must be a zip of uncompressed
  ``.npy`` entries of plain (non-object) dtypes whose headers declare exactly the bytes they
  hold, inside the file: NumPy allocates an entry's declared size before reading it, so a
  forged header could otherwise ask for terabytes, and a compressed entry could expand without
  bound.  (``np.load(..., allow_pickle=False)`` already refuses pickled objects.)
* ``parse_meta`` / ``check_run_meta``: the ``meta`` entry is a JSON object with the fields
  of a training checkpoint, of the right types.
* ``architecture`` / ``check_architecture``: the model a checkpoint was saved from (cell,
  sizes, options) against the model it is restored into.
"""
import json
import math
import os
import zipfile

import numpy as np

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}
#: model options that do not change the architecture (a run may resume in another dtype)
_NOT_ARCHITECTURE = ("seed", "dtype")


def check_archive(path):
    """Raise ValueError unless ``path`` is a zip of uncompressed ``.npy`` entries, each of a
    plain dtype and exactly the size its header declares, all within the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:1] == b"\x80":
        raise ValueError("it looks like a Python pickle; gpurnn never unpickles a checkpoint")
    if head == b"\x93NUMPY":
        raise ValueError("it is a single .npy array, not a checkpoint archive")
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            if not name.endswith(".npy"):
                raise ValueError(f"entry {name!r} is not a .npy array")
            if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                raise ValueError(f"entry {name!r} is compressed; gpurnn writes uncompressed "
                                 f"archives")
            if info.header_offset + info.file_size > size:
                raise ValueError(f"entry {name!r} claims {info.file_size} bytes, beyond the "
                                 f"end of the {size}-byte file")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in _HEADER_READERS:
                    raise ValueError(f"entry {name!r} has .npy format version {version}, "
                                     f"expected 1.0 or 2.0")
                shape, _, dtype = _HEADER_READERS[version](f)
                header = f.tell()
            if dtype.hasobject:
                raise ValueError(f"entry {name!r} holds Python objects ({dtype}); a checkpoint "
                                 f"holds plain arrays only")
            declared = header + math.prod(shape) * dtype.itemsize
            if declared != info.file_size:
                raise ValueError(f"entry {name!r} declares shape {shape} of {dtype} "
                                 f"({declared} bytes with its header) but holds "
                                 f"{info.file_size} bytes")


def parse_meta(value):
    """The ``meta`` entry (0-d str array holding a JSON object) as a dict."""
    if value.ndim != 0 or value.dtype.kind != "U":
        raise ValueError(f"the meta entry must be a 0-d string, got {value.dtype} of shape "
                         f"{value.shape}")
    try:
        meta = json.loads(str(value))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the meta entry is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"the meta entry must be a JSON object, got {type(meta).__name__}")
    return meta


def _require(mapping, key, types, where):
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"{where}{key} must be {names}, got {value!r}")
    return value


def check_run_meta(meta, arrays):
    """The fields ``load_checkpoint``/``restore`` use, of the right types; every array a float
    array named ``model/...`` or ``optim/...``."""
    if _require(meta, "step", int, "meta ") < 0:
        raise ValueError(f"meta step must be >= 0, got {meta['step']}")
    _require(meta, "rng_state", dict, "meta ")
    _require(meta, "config", dict, "meta ")
    optimizer = _require(meta, "optimizer", dict, "meta ")
    _require(optimizer, "name", str, "meta optimizer ")
    if _require(optimizer, "t", int, "meta optimizer ") < 0:
        raise ValueError(f"meta optimizer t must be >= 0, got {optimizer['t']}")
    _require(optimizer, "hyperparams", dict, "meta optimizer ")
    if "architecture" in meta:
        _require(meta, "architecture", dict, "meta ")
    if "loss_scale" in meta:
        scale = _require(meta, "loss_scale", dict, "meta ")
        if not _require(scale, "scale", float, "meta loss_scale ") > 0:
            raise ValueError(f"meta loss_scale scale must be > 0, got {scale['scale']}")
        for key in ("skipped", "good_steps"):
            if _require(scale, key, int, "meta loss_scale ") < 0:
                raise ValueError(f"meta loss_scale {key} must be >= 0, got {scale[key]}")
    for name, a in arrays.items():
        if not name.startswith(("model/", "optim/")):
            raise ValueError(f"unexpected entry {name!r} (expected model/... and optim/...)")
        if a.dtype.kind != "f":
            raise ValueError(f"entry {name!r} must be a float array, got {a.dtype}")


def architecture(model):
    """A model's architecture: its ``config`` (cell, sizes, head, cell options) without the
    seed and the dtype, JSON-able."""
    config = getattr(model, "config", {})
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in config.items()
            if k not in _NOT_ARCHITECTURE}


def check_architecture(saved, model):
    """Raise ValueError naming every difference between a checkpoint's architecture and
    ``model``'s."""
    mine = architecture(model)
    diff = [f"{k} {saved.get(k)!r} (this model: {mine.get(k)!r})"
            for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
    if diff:
        raise ValueError("the checkpoint is of another model: " + ", ".join(diff))


def check_architecture_matches(arch, weights):
    """Raise ValueError unless a checkpoint's architecture record states the sizes its weights
    have (``weights``: name -> array, by ``Model.params`` names): rebuilding the model from the
    record then allocates no more than the file holds."""
    if not isinstance(arch, dict):
        raise ValueError(f"the architecture record must be a JSON object, got {arch!r}")
    needed = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"]
    tokens = arch.get("vocab_size") is not None
    if tokens:
        needed.append("embedding.weight")
    missing = [k for k in needed if k not in weights or np.ndim(weights[k]) != 2]
    if missing:
        raise ValueError(f"the weights lack the 2-D arrays {missing}")
    layers = sum(1 for k in weights if k.startswith("rnn.weight_hh_l")
                 and k[len("rnn.weight_hh_l"):].isdigit())
    have = {"hidden_size": weights["rnn.weight_hh_l0"].shape[1],
            "output_size": weights["head.weight"].shape[0], "num_layers": layers}
    if tokens:
        have["vocab_size"], have["embed_size"] = weights["embedding.weight"].shape
    else:
        have["input_size"] = weights["rnn.weight_ih_l0"].shape[1]
    diff = [f"{k} {arch.get(k)!r} (the weights: {v})" for k, v in have.items()
            if isinstance(arch.get(k), bool) or arch.get(k) != v]
    if diff:
        raise ValueError("the architecture record disagrees with the weights: " + ", ".join(diff))
