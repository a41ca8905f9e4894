"""Model files: a GinsengModelState in HDF5, without pickles.

Every parameter is a dataset under its tree path (``params/features1/W``), strings are UTF-8
datasets, and the scalar settings are attributes. The file records ``format="ginseng.model"`` and
``format_version`` so that a future layout is refused with a message instead of being misread,
and ``sha256``, a digest of everything the model is made of, so that bytes damaged inside a
parameter (which HDF5 itself reads without complaint) are refused instead of silently changing
predictions. Opening a model file never runs code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import jax.numpy as jnp
import numpy as np

from ginseng._core.files import atomic_path
from ginseng._core.h5tree import DamagedError, read_tree, write_tree
from ginseng.state import CONFIDENCE_BINS, GinsengModelState

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "load_ginseng_state", "save_ginseng_state"]

MODEL_FORMAT = "ginseng.model"
MODEL_FORMAT_VERSION = 1


def _labels_for_hdf5(name: str, values) -> np.ndarray:
    """Strings become UTF-8 variable-length; numbers keep their dtype; nothing is pickled."""
    arr = np.asarray(values)
    if arr.dtype.kind == "O":
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.ravel()):
            arr = arr.astype(np.int64)
        elif all(isinstance(v, str) for v in arr.ravel()):
            arr = arr.astype(str)
        else:
            kinds = sorted({type(v).__name__ for v in arr.ravel()})
            msg = f"{name} must hold strings or integers to be saved, found values of types {kinds}"
            raise TypeError(msg)
    if arr.dtype.kind in "US":
        return np.asarray(
            [v.decode("utf-8") if isinstance(v, bytes) else v for v in arr.tolist()], dtype=object
        )
    if arr.dtype.kind not in "biuf":
        msg = f"{name} must hold strings or numbers to be saved, found dtype {arr.dtype}"
        raise TypeError(msg)
    return arr


def _write_array(group: h5py.Group, name: str, arr: np.ndarray) -> None:
    if arr.dtype == object:
        group.create_dataset(name, data=arr, dtype=h5py.string_dtype("utf-8"))
    else:
        group.create_dataset(name, data=arr)


def _flatten_params(tree, prefix: str = "params") -> dict[str, np.ndarray]:
    """{"params/features1/W": array, ...} as host numpy arrays."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten_params(value, f"{prefix}/{key}"))
        else:
            out[f"{prefix}/{key}"] = np.asarray(value)
    return out


def _model_digest(
    params: dict[str, np.ndarray], labels: dict[str, np.ndarray], scalars: dict
) -> str:
    """SHA-256 over the parameters (path, dtype, shape, bytes), the label/gene arrays and the
    settings, in a fixed order: the same model gives the same digest, any changed byte another."""
    h = hashlib.sha256()

    def feed(text: str) -> None:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for name in sorted(params):
        arr = np.ascontiguousarray(params[name])
        feed(f"{name}|{arr.dtype.str}|{arr.shape}")
        h.update(arr.tobytes())
    for name in sorted(labels):
        arr = np.asarray(labels[name])
        if arr.dtype.kind in "OUS":
            feed(f"{name}|str|{arr.shape}")
            for v in arr.ravel().tolist():
                feed(v.decode("utf-8") if isinstance(v, bytes) else str(v))
        else:
            arr = np.ascontiguousarray(arr)
            feed(f"{name}|{arr.dtype.str}|{arr.shape}")
            h.update(arr.tobytes())
    for name in sorted(scalars):
        feed(f"{name}={scalars[name]!r}")
    return h.hexdigest()


def save_ginseng_state(
    state: GinsengModelState, filename: str | os.PathLike, overwrite: bool = False
) -> None:
    """Save a Ginseng model state to disk.

    The file is HDF5 with no pickle (see the module docstring). It is written to a temporary
    file beside ``filename`` and renamed into place when complete, so an interrupted save never
    leaves a half-written model.

    Parameters
    ----------
    state : GinsengModelState
        Model state containing parameters, genes, labels, and metadata.
    filename : str | Path
        Path where the model state will be stored.
    overwrite : bool
        Replace an existing file. Without it an existing ``filename`` raises FileExistsError.
    """
    from ginseng import __version__

    genes = _labels_for_hdf5("genes", state.genes)
    label_keys = _labels_for_hdf5("label_keys", state.label_keys)
    label_values = _labels_for_hdf5("label_values", state.label_values)
    counts = None
    if state.confidence_counts is not None:
        counts = np.asarray(state.confidence_counts)
        if counts.shape != (CONFIDENCE_BINS,) or counts.dtype.kind not in "iu" or (counts < 0).any():
            msg = (f"confidence_counts must be {CONFIDENCE_BINS} integer counts >= 0, got an array "
                   f"of shape {counts.shape} and dtype {counts.dtype}")
            raise ValueError(msg)
        counts = counts.astype(np.int64)
    # The HDF5 file is closed (inner context) before atomic_path renames it into place.
    with (
        atomic_path(filename, overwrite=overwrite, what="model file") as tmp,
        h5py.File(tmp, "w") as f,
    ):
        f.attrs["format"] = MODEL_FORMAT
        f.attrs["format_version"] = MODEL_FORMAT_VERSION
        f.attrs["ginseng_version"] = str(__version__)
        f.attrs["normalize"] = bool(state.normalize)
        # HDF5 attributes cannot hold None; an empty attribute stands for it.
        f.attrs["target_sum"] = (
            h5py.Empty("f8") if state.target_sum is None else float(state.target_sum)
        )
        f.attrs["dropout_rate"] = float(state.dropout_rate)
        f.attrs["training"] = bool(state.training)
        write_tree(f.create_group("params"), state.params, "params", checksum=False)
        _write_array(f, "genes", genes)
        _write_array(f, "label_keys", label_keys)
        _write_array(f, "label_values", label_values)
        if counts is not None:
            f.create_dataset("confidence_counts", data=counts)
        # Digest of what was written, read back the way load_ginseng_state reads it.
        f.attrs["sha256"] = _file_digest(f)


def _to_jnp(tree: dict) -> dict:
    return {k: _to_jnp(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}


_DIGEST_ATTRS = ("format_version", "normalize", "target_sum", "dropout_rate", "training")


def _file_digest(f: h5py.File, params: dict | None = None) -> str:
    """The model digest of an open model file (``params``: already read, to avoid a re-read)."""
    if params is None:
        params = read_tree(f["params"], "params")
    labels = {k: _read_labels(f[k]) for k in ("genes", "label_keys", "label_values")}
    if "confidence_counts" in f:  # optional: absent from older files, whose digest stays theirs
        labels["confidence_counts"] = np.asarray(f["confidence_counts"][()])
    scalars = {}
    for a in _DIGEST_ATTRS:
        v = f.attrs[a]
        scalars[a] = None if isinstance(v, h5py.Empty) else (v.item() if hasattr(v, "item") else v)
    return _model_digest(_flatten_params(params), labels, scalars)


def _read_labels(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr()[()], dtype=str)
    return np.asarray(ds[()])


def _check_consistency(path: Path, state: GinsengModelState) -> None:
    """Catch a file whose parts disagree (edited or mixed up) before it mislabels cells."""
    problems = []
    if len(state.label_keys) != len(state.label_values):
        problems.append(
            f"{len(state.label_keys)} label_keys but {len(state.label_values)} label_values"
        )
    expected = {"features1": (state.n_genes, None), "head": (state.n_genes, state.n_classes)}
    for layer, (rows, cols) in expected.items():
        W = (
            state.params.get(layer, {}).get("W")
            if isinstance(state.params.get(layer), dict)
            else None
        )
        if W is None or W.ndim != 2:
            continue
        if W.shape[0] != rows or (cols is not None and W.shape[1] != cols):
            want = f"({rows}, {cols if cols is not None else '*'})"
            problems.append(f"params/{layer}/W has shape {tuple(W.shape)}, expected {want}")
    if problems:
        msg = (
            f"model file {str(path)!r} is inconsistent ({state.n_genes} genes, "
            f"{state.n_classes} labels): " + "; ".join(problems)
        )
        raise ValueError(msg)


def load_ginseng_state(filename: str | os.PathLike) -> GinsengModelState:
    """Load a Ginseng model state.

    Parameters
    ----------
    filename : str | Path
        Path to the HDF5 file containing the saved model state.

    Returns
    -------
    GinsengModelState
        Reconstructed model state; ``params`` are nested dicts of ``jax.numpy`` arrays.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the file is not HDF5, is truncated or corrupted, is not a ginseng model, has an
        unknown format version, or lacks a part of the model. The message names the file.
    """
    from ginseng import __version__

    path = Path(filename)
    if not path.is_file():
        msg = f"model file {str(path)!r} does not exist"
        raise FileNotFoundError(msg)
    if not h5py.is_hdf5(path):
        msg = f"model file {str(path)!r} is not an HDF5 file (expected a ginseng model saved by save_ginseng_state)"
        raise ValueError(msg)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        msg = f"model file {str(path)!r} cannot be opened as HDF5; it is truncated or corrupted: {err}"
        raise ValueError(msg) from err
    try:
        with f:
            fmt = f.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt != MODEL_FORMAT:
                msg = f"{str(path)!r} is not a ginseng model file: expected attribute format={MODEL_FORMAT!r}, found {fmt!r}"
                raise ValueError(msg)
            version = f.attrs.get("format_version")
            if isinstance(version, bytes):
                version = version.decode(errors="replace")
            elif isinstance(version, np.generic):
                version = version.item()
            is_int = isinstance(version, int) and not isinstance(version, bool)
            if not is_int or int(version) != MODEL_FORMAT_VERSION:
                msg = (
                    f"model file {str(path)!r} has format_version "
                    f"{int(version) if is_int else repr(version)}, "
                    f"but this ginseng ({__version__}) reads format_version {MODEL_FORMAT_VERSION}; "
                    f"the file was written by ginseng {f.attrs.get('ginseng_version', 'unknown')!s}: "
                    "load it with that version (or a newer ginseng that supports it) and re-save it"
                )
                raise ValueError(msg)
            missing = [k for k in ("params", "genes", "label_keys", "label_values") if k not in f]
            missing += [
                a
                for a in ("normalize", "target_sum", "dropout_rate", "training")
                if a not in f.attrs
            ]
            if missing:
                msg = f"model file {str(path)!r} is incomplete: missing {missing}"
                raise ValueError(msg)
            if not isinstance(f["params"], h5py.Group) or len(f["params"]) == 0:
                msg = f"model file {str(path)!r} is incomplete: 'params' holds no parameters"
                raise ValueError(msg)
            params = read_tree(f["params"], "params")
            stored = f.attrs.get("sha256")
            stored = stored.decode() if isinstance(stored, bytes) else stored
            computed = _file_digest(f, params) if stored is not None else None
            target_sum = f.attrs["target_sum"]
            state = GinsengModelState(
                params=_to_jnp(params),
                genes=_read_labels(f["genes"]),
                label_keys=_read_labels(f["label_keys"]),
                label_values=_read_labels(f["label_values"]),
                normalize=bool(f.attrs["normalize"]),
                target_sum=None if isinstance(target_sum, h5py.Empty) else float(target_sum),
                dropout_rate=float(f.attrs["dropout_rate"]),
                training=bool(f.attrs["training"]),
                confidence_counts=(np.asarray(f["confidence_counts"][()], np.int64)
                                   if "confidence_counts" in f else None),
            )
    except (OSError, KeyError, RuntimeError, DamagedError) as err:
        msg = f"model file {str(path)!r} could not be read; it is truncated or corrupted: {err}"
        raise ValueError(msg) from None
    _check_consistency(path, state)
    # Files without a digest (written before it was added) load unchecked.
    if stored is not None and stored != computed:
        msg = (
            f"model file {str(path)!r} is corrupted: its content does not match the checksum "
            f"written when it was saved (sha256 stored {stored[:12]}..., found {computed[:12]}...); "
            "re-save or re-train the model"
        )
        raise ValueError(msg)
    return state

