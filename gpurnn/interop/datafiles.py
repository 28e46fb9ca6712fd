"""The user's data files: ``read_data(path)`` reads a ``.npz`` or a ``.csv`` into arrays for
``Model.fit``/``evaluate``/``predict`` and ``gpurnn train/evaluate/predict --data``;
``write_predictions`` writes ``gpurnn predict``'s output.  The formats (docs/training.md):

``.npz`` (``numpy.savez``): arrays ``x`` ([N, T, I] float features or [N, T] int tokens),
``y`` (per step [N, T, K] / [N, T], or per sequence [N, K] / [N]), optional ``lengths`` [N],
and optional validation arrays ``x_val``, ``y_val``, ``lengths_val``.  No other names; read
with ``allow_pickle=False``.

``.csv``, the long format, one row per time step, a header row naming the columns:

* ``sequence``: the sequence a row belongs to (any text); a sequence's rows are consecutive,
  in time order, and sequences may have different lengths;
* ``y`` (or ``y_1``, ``y_2``, ... for several outputs; every column named ``y`` or ``y_...``):
  the targets, either on every row (per step) or only on each sequence's last row, the others
  left empty (per sequence).  Integers in a single ``y`` column are class labels, anything
  else regression values.  Without target columns the file holds inputs only (predict);
* every other column: a float feature.

A file that cannot be used raises ``DataError`` (a ValueError) with one line saying what is
wrong and where.
"""
import csv
import os
import zipfile

import numpy as np

from ..engine.files import write_atomically

#: The arrays a data .npz may hold.
NPZ_NAMES = ("x", "y", "lengths", "x_val", "y_val", "lengths_val")
ID_COLUMN = "sequence"


class DataError(ValueError):
    """A data file that cannot be used: unreadable, or holding the wrong arrays."""


def read_data(path):
    """{name: array} of a ``.npz`` or ``.csv`` data file (the module docstring): ``x`` always,
    ``y`` and ``lengths`` when present (a CSV of sequences of different lengths gives
    ``lengths``; ``sequence``: its sequence ids), the ``*_val`` arrays of a ``.npz``."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return _read_npz(path)
    if ext == ".csv":
        try:
            return _read_csv(path)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a readable CSV text file: {exc}") from exc
    raise DataError(f"{path}: the data file must be a .npz or a .csv, got {ext or 'no suffix'!r}")


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            unknown = [n for n in names if n not in NPZ_NAMES]
            if unknown:
                raise DataError(f"{path}: unexpected array(s) {unknown}: a data file holds "
                                f"{', '.join(NPZ_NAMES)} (x required)")
            data = {n: npz[n] for n in names}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DataError(f"{path}: not a readable .npz of plain arrays: {exc}") from exc
    if "x" not in data:
        raise DataError(f"{path}: no array 'x' (it holds {sorted(data) or 'nothing'}); expected "
                        f"x [N, T, I] float or [N, T] int tokens, y, optional lengths")
    for a, b in (("x_val", "y_val"), ("y_val", "x_val"), ("lengths_val", "x_val")):
        if a in data and b not in data:
            raise DataError(f"{path}: has {a} but no {b}")
    return data


def _number(text, path, line, column):
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}, line {line}, column {column!r}: {text!r} is not a number") \
            from None
    if not np.isfinite(value):
        raise DataError(f"{path}, line {line}, column {column!r}: {text!r} (NaN and Inf are "
                        f"not data)")
    return value


def _is_target(name):
    return name == "y" or name.startswith("y_")


def _read_csv(path):
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise DataError(f"{path}: the file is empty (expected a header row)")
        header = [h.strip() for h in header]
        if ID_COLUMN not in header:
            raise DataError(f"{path}: no {ID_COLUMN!r} column in the header {header}")
        if len(set(header)) != len(header):
            raise DataError(f"{path}: repeated column names in the header {header}")
        ids_at = header.index(ID_COLUMN)
        y_at = [i for i, h in enumerate(header) if _is_target(h)]
        x_at = [i for i, h in enumerate(header) if i != ids_at and i not in y_at]
        if not x_at:
            raise DataError(f"{path}: no feature columns (every column but {ID_COLUMN!r} and "
                            f"the targets y, y_... is a feature)")
        ids, features, targets, seen = [], [], [], set()
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}, line {line}: {len(row)} fields, the header has "
                                f"{len(header)}")
            key = row[ids_at]
            if not ids or key != ids[-1]:
                if key in seen:
                    raise DataError(f"{path}, line {line}: sequence {key!r} continues after "
                                    f"other sequences: keep each sequence's rows together")
                seen.add(key)
                ids.append(key)
                features.append([])
                targets.append([])
            features[-1].append([_number(row[i], path, line, header[i]) for i in x_at])
            targets[-1].append((line, [row[i].strip() for i in y_at]))
    if not ids:
        raise DataError(f"{path}: no data rows after the header")
    lengths = np.array([len(s) for s in features], dtype=np.int64)
    x = np.zeros((len(ids), int(lengths.max()), len(x_at)))  # [N, T, I]
    for n, seq in enumerate(features):
        x[n, :len(seq)] = seq
    data = {"x": x, "sequence": np.array(ids)}
    if not np.all(lengths == lengths[0]):
        data["lengths"] = lengths
    if y_at:
        data["y"] = _csv_targets(targets, [header[i] for i in y_at], x.shape[1], path)
    return data


def _csv_targets(targets, names, T, path):
    """The y of the CSV: per step (every row filled) or per sequence (each sequence's last row
    filled, the others empty).  ``targets``: per sequence, (line, cells) per row."""
    filled = []
    for seq in targets:
        marks = []
        for line, cells in seq:
            full, blank = all(c != "" for c in cells), all(c == "" for c in cells)
            if not (full or blank):
                raise DataError(f"{path}, line {line}: the targets {names} are partly empty")
            marks.append(full)
        filled.append(marks)
    per_step = any(any(marks[:-1]) for marks in filled)  # a target before a last row
    for seq, marks in zip(targets, filled):
        for i, ((line, _), full) in enumerate(zip(seq, marks)):
            wanted = per_step or i == len(seq) - 1
            if full != wanted:
                raise DataError(f"{path}, line {line}: {'no' if wanted else 'a'} target here; "
                                f"targets go on every row (per step) or only on each "
                                f"sequence's last row (per sequence)")
    rows = [seq if per_step else seq[-1:] for seq in targets]
    texts = [c for seq in rows for _, cells in seq for c in cells]
    integers = len(names) == 1 and all(_is_int(t) for t in texts)
    values = [[[int(c) if integers else _number(c, path, line, n) for c, n in zip(cells, names)]
               for line, cells in seq] for seq in rows]
    dtype = np.int64 if integers else np.float64
    if not per_step:
        y = np.array([seq[-1] for seq in values], dtype=dtype)  # [N, K]
        return y[:, 0] if integers else y  # [N] labels or [N, K]
    y = np.zeros((len(values), T, len(names)), dtype=dtype)  # [N, T, K]
    for n, seq in enumerate(values):
        y[n, :len(seq)] = seq
    return y[:, :, 0] if integers else y  # [N, T] labels or [N, T, K]


def _is_int(text):
    try:
        int(text)
    except ValueError:
        return False
    return True


def write_predictions(path, arrays):
    """Write ``arrays`` (name -> NumPy array) as a ``.npz`` at ``path``, atomically: a failed
    write leaves no partial file (``engine.files.write_atomically``)."""
    write_atomically(path, lambda f: np.savez(f, **arrays))
