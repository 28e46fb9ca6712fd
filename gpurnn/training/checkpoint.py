"""Checkpoints: save and resume a training run exactly.

Format (``.npz``, read with ``allow_pickle=False``): a NumPy zip archive of plain arrays

* ``meta``          0-d str: JSON ``{"format": "gpurnn-checkpoint", "version": 1, "step": int,
                    "rng_state": <numpy Generator bit_generator.state>, "config": {...},
                    "optimizer": {"name", "t", "hyperparams"}, and for float16 runs
                    "loss_scale": {"scale", "skipped", "good_steps"}}``
* ``model/<name>``  every model parameter (``Model.params`` names)
* ``optim/<slot>/<name>``  the optimiser's per-parameter buffers (Adam ``m``, ``v``; momentum
                    ``velocity``)
* ``sha256``        0-d str: SHA-256 over every other entry (name, dtype, shape, bytes, in
                    sorted name order).  A file that is truncated or altered is refused.

Writes are atomic (``engine.files.write_atomically``): the archive goes to a temporary file in
the same directory, is flushed and fsynced, then renamed over the target (``os.replace``); a
save killed at any point leaves the previous checkpoint as it was.
"""
import hashlib
import json
import zipfile

import numpy as np

from ..engine.files import write_atomically
from . import checkpoint_checks as checks
from .nonfinite import require_finite

FORMAT = "gpurnn-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated, corrupted, or of another format."""


def _digest(arrays):
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode() + b"\0" + a.dtype.str.encode() + b"\0" + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_arrays(path, arrays, meta):
    """Write ``arrays`` (name -> NumPy array) and ``meta`` (JSON-able dict) to ``path``
    atomically, with the format version and the checksum."""
    payload = {name: np.asarray(a) for name, a in arrays.items()}
    for name, a in payload.items():
        if a.dtype.kind == "O":
            raise TypeError(f"checkpoint entry {name} must be a plain array, got dtype object")
    payload["meta"] = np.array(json.dumps({"format": FORMAT, "version": VERSION, **meta}))
    payload["sha256"] = np.array(_digest(payload))
    write_atomically(path, lambda f: np.savez(f, **payload))


def load_arrays(path):
    """(arrays, meta) of a checkpoint; CheckpointError when it is damaged or not one."""
    try:
        checks.check_archive(path)  # before NumPy allocates what the headers declare
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError,
            NotImplementedError, RuntimeError) as exc:  # zipfile: unknown version, encrypted
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupted?): "
                              f"{exc}") from exc
    if "meta" not in arrays or "sha256" not in arrays:
        raise CheckpointError(f"{path} is not a gpurnn checkpoint (no meta/sha256 entries)")
    stored = str(arrays.pop("sha256"))
    if _digest(arrays) != stored:
        raise CheckpointError(f"{path} fails its SHA-256 check: the file was altered or damaged")
    try:
        meta = checks.parse_meta(arrays.pop("meta"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('version')!r}; this gpurnn "
                              f"reads version {VERSION}")
    return arrays, meta


def save_checkpoint(path, model, optimizer, step, rng, config=None, scaler=None):
    """Save a run: the model's weights, the optimiser's state, the step, and the state of the
    data generator ``rng`` (a ``numpy.random.Generator``) and of the loss ``scaler`` (a
    ``loss_scale.LossScaler``, float16 runs); ``config`` any JSON-able dict."""
    arrays = {f"model/{name}": a for name, a in model.state_dict().items()}
    opt = optimizer.state_dict()
    arrays.update({f"optim/{name}": a for name, a in opt["buffers"].items()})
    require_finite(arrays, path)
    meta = {"step": int(step), "rng_state": rng.bit_generator.state, "config": config or {},
            "architecture": checks.architecture(model),
            "optimizer": {"name": type(optimizer).__name__, "t": opt["t"],
                          "hyperparams": opt["hyperparams"]}}
    if scaler is not None:
        meta["loss_scale"] = scaler.state_dict()
    save_arrays(path, arrays, meta)


def load_checkpoint(path):
    """{"step", "rng_state", "config", "optimizer", "model": {name: array},
    "optim_buffers": {slot/name: array}} of a checkpoint."""
    arrays, meta = load_arrays(path)
    try:
        checks.check_run_meta(meta, arrays)
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a usable training checkpoint: {exc}") from exc
    meta["model"] = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    meta["optim_buffers"] = {k[len("optim/"):]: v for k, v in arrays.items()
                             if k.startswith("optim/")}
    return meta


def restore(checkpoint, model, optimizer, rng, scaler=None):
    """Put a loaded checkpoint's state into ``model``, ``optimizer``, ``rng`` and the loss
    ``scaler`` (when both have one: a run resumed in another dtype starts its scaling afresh);
    returns the step to continue from."""
    if "architecture" in checkpoint:
        try:
            checks.check_architecture(checkpoint["architecture"], model)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
    name = checkpoint["optimizer"]["name"]
    if name != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint has optimiser {name}, the run has "
                              f"{type(optimizer).__name__}")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict({"t": checkpoint["optimizer"]["t"],
                               "hyperparams": checkpoint["optimizer"]["hyperparams"],
                               "buffers": checkpoint["optim_buffers"]})
    state = checkpoint["rng_state"]
    if state.get("bit_generator") != type(rng.bit_generator).__name__:
        raise CheckpointError(f"checkpoint's generator is {state.get('bit_generator')}, the run "
                              f"uses {type(rng.bit_generator).__name__}")
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint's generator state is not usable: {exc!r}") from exc
    if scaler is not None and "loss_scale" in checkpoint:
        scaler.load_state_dict(checkpoint["loss_scale"])
    return int(checkpoint["step"])
