"""Nested dicts of arrays <-> HDF5 groups: the one writer and reader for model files and checkpoints.

Reading never holds an h5py iterator open while it reads an item. h5py's ``group.items()`` is a
generator that keeps h5py's global lock while suspended at ``yield``; if reading an item raises
(a damaged dataset), the suspended generator stays alive in the traceback and is finalized later
by the garbage collector on whatever thread runs it. That thread cannot release a lock the main
thread owns, so the lock stays taken and the next h5py object freed on another thread (zarr's
and TensorStore's pools free them) blocks forever: the process froze after a damaged checkpoint.
Listing the names first (a generator that runs to completion) and then reading each by name
keeps every acquisition paired with its release.
"""

from __future__ import annotations

from collections.abc import Mapping

import h5py
import numpy as np


class DamagedError(ValueError):
    """A part of an HDF5 file could not be read; the message names the dataset or attribute."""


def _describe(err: BaseException) -> str:
    text = str(err)
    if "filter returned failure" in text:
        text += " (its checksum does not match: the stored bytes changed)"
    return f"{type(err).__name__}: {text}"


def names(group: h5py.Group, where: str = "") -> list[str]:
    """The member names of ``group``, read completely before anything else is touched."""
    try:
        return list(group.keys())
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        msg = f"group {where or '/'!r} cannot be listed: {_describe(err)}"
        raise DamagedError(msg) from None


def read_dataset(group: h5py.Group, name: str, where: str = "") -> np.ndarray:
    """``group[name][()]`` as numpy; a damaged dataset raises `DamagedError` naming its path."""
    path = f"{where}/{name}" if where else name
    try:
        item = group[name]
        if not isinstance(item, h5py.Dataset):
            msg = f"{path!r} is a group, expected a dataset"
            raise DamagedError(msg)
        return np.asarray(item[()])
    except DamagedError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:
        msg = f"dataset {path!r} cannot be read: {_describe(err)}"
        raise DamagedError(msg) from None


def read_attr(obj, name: str, where: str = ""):
    """An attribute of a file, group or dataset; missing or damaged raises `DamagedError`."""
    try:
        return obj.attrs[name]
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:
        owner = where or "/"
        msg = f"attribute {name!r} of {owner!r} cannot be read: {_describe(err)}"
        raise DamagedError(msg) from None


def read_tree(group: h5py.Group, where: str = "") -> dict:
    """The nested dict of numpy arrays stored under ``group`` (inverse of `write_tree`)."""
    where = where or group.name.lstrip("/")
    out = {}
    for name in names(group, where):
        path = f"{where}/{name}" if where else name
        try:
            is_group = isinstance(group[name], h5py.Group)
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            msg = f"{path!r} cannot be opened: {_describe(err)}"
            raise DamagedError(msg) from None
        out[name] = read_tree(group[name], path) if is_group else read_dataset(group, name, where)
    return out


def write_tree(group: h5py.Group, tree: Mapping, where: str = "", *, checksum: bool = True) -> None:
    """Write nested dicts of arrays under ``group``, one dataset per leaf.

    With ``checksum``, non-empty arrays get Fletcher-32 checksums: a flipped bit is an error on
    reading, never a silently different state. Model files pass False: they keep their contiguous
    layout and are verified by the SHA-256 digest over their whole content instead. Keys must be
    non-empty strings without '/' (HDF5 path separators).
    """
    where = where or group.name.lstrip("/") or "/"
    if not isinstance(tree, Mapping):
        msg = f"expected nested dicts of arrays; found {type(tree).__name__} at {where!r}"
        raise TypeError(msg)
    for key, value in tree.items():
        if not isinstance(key, str) or "/" in key or not key:
            msg = f"keys must be non-empty strings without '/', found {key!r} at {where!r}"
            raise TypeError(msg)
        if isinstance(value, Mapping):
            write_tree(group.create_group(key), value, f"{where}/{key}", checksum=checksum)
        else:
            value = np.asarray(value)
            checked = {"fletcher32": True} if checksum and value.ndim and value.size else {}
            group.create_dataset(key, data=value, **checked)
