"""The store format of a GinsengDataset: its attributes, codec, chunking and small arrays.

Layout of a store (a zarr v3 group; format "ginseng.dataset", version 1)::

    X              counts, (n_cells, n_genes), uint16 | uint32 | float32, row chunks, blosc-lz4.
                   Rows are STORED in a seeded random permutation (``shuffle=True``), so that any
                   contiguous chunk holds random cells and a shuffled epoch can read whole chunks.
    order          int64 [n_cells]: stored row -> original row (input row of ``create``)
    labels         int32 [n_cells], original row order; label k <-> label_values[k]
    label_values   str [n_labels], sorted unique original labels (int64 for integer labels)
    genes          str [n_genes]
    group_codes    int32 [n_cells] and group_values str [n_groups] (only when groups were given)
    split_<id>/train, split_<id>/holdout   int64 original row indices; attr "split" names the live one
    attrs          format, format_version, uuid, n_cells, n_genes, chunk_rows, ..., complete (last)

Every public index is an ORIGINAL row position. The mapping to stored rows stays internal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from zarr.codecs import BloscCodec

FORMAT_NAME = "ginseng.dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "holdout", "all")
GROUP_MODES = ("fraction", "loo")

# concurrent whole-chunk reads; zstd is ~2x slower to decode for a similar size, no codec is 8x
# larger on disk. For shuffled epochs of 200k x 2,000 (loader, 2 busy cores) 1-4 MB row chunks
# beat 0.5 MB ones by ~1.3x; 2 MB keeps single-row reads (get_batch) cheap enough.
TARGET_CHUNK_BYTES = 2 << 20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 8192
# Every chunk of every array is written, even an all-zero one (zarr skips those by default), so a
# missing chunk file always means damage: stores carrying this attribute are read with
# TensorStore's fill_missing_data_reads=False and their small arrays are checked on open,
# instead of a deleted chunk silently reading as zeros.
ALL_CHUNKS_ATTR = "all_chunks_stored"
ARRAY_CONFIG = {"write_empty_chunks": True}


class Flag:
    """A truth value that is also callable: ``if flag:`` and ``if flag():`` mean the same."""

    __slots__ = ("value",)

    def __init__(self, value: bool):
        self.value = bool(value)

    def __bool__(self) -> bool:
        return self.value

    def __call__(self) -> bool:
        return self.value

    def __eq__(self, other) -> bool:
        return self.value == bool(other)

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


def codec() -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")



def describe(values, limit=20) -> str:
    values = [str(v) for v in values]
    more = "" if len(values) <= limit else f", ... ({len(values)} in all)"
    return "[" + ", ".join(repr(v) for v in values[:limit]) + more + "]"


def read_attrs(path: Path, fmt: str = FORMAT_NAME) -> dict | None:
    """The root attributes of a ginseng store of format ``fmt`` at ``path``, or None."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        with open(meta) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != fmt:
        return None
    return attrs


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        msg = f"batch_size must be an integer >= 1, found {batch_size!r}"
        raise ValueError(msg)
    return int(batch_size)


def as_seed(rng) -> int:
    """An int seed from ``rng`` (None -> 0, int, or np.random.Generator: one draw from it)."""
    if rng is None:
        return 0
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**63 - 1))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return int(rng)
    msg = f"rng must be None, an int seed or a numpy.random.Generator, found {type(rng).__name__}"
    raise TypeError(msg)


def as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(as_seed(rng))


def is_sparse_dataset(X) -> bool:
    """A backed (on-disk) sparse matrix of anndata: read by rows without densifying."""
    return getattr(X, "format", None) in ("csr", "csc") and not isinstance(X, np.ndarray)


def encode_labels(values, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes int32, sorted unique values) for a label-like array; refuses missing values.

    Integer labels stay integers (int64, sorted numerically); anything else becomes str.
    """
    if isinstance(values, pd.Series):
        values = values.to_numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        msg = f"{what} must be one-dimensional, found shape {arr.shape}"
        raise ValueError(msg)
    missing = pd.isna(arr)
    if missing.any():
        msg = f"{what} has {int(missing.sum())} missing values (NaN/None); every cell needs one"
        raise ValueError(msg)
    if arr.dtype.kind not in "biuf":
        arr = arr.astype(str)
    uniq, codes = np.unique(arr, return_inverse=True)
    if arr.dtype.kind in "iu":
        return codes.astype(np.int32).ravel(), uniq.astype(np.int64)
    return codes.astype(np.int32).ravel(), np.asarray([str(u) for u in uniq], dtype=object)


def auto_chunk_rows(n_genes: int, itemsize: int) -> int:
    rows = TARGET_CHUNK_BYTES / max(1, n_genes * itemsize)
    rows = 2 ** round(math.log2(max(rows, 1)))
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows)))


def write_str_array(group, name: str, values) -> None:
    values = np.asarray([str(v) for v in values], dtype=object)
    arr = group.create_array(
        name, shape=values.shape, dtype=str, chunks=(max(1, len(values)),), config=ARRAY_CONFIG
    )
    arr[:] = values


def write_label_values(group, values: np.ndarray) -> None:
    """Integer labels as int64 (they come back as integers), others as strings."""
    if values.dtype.kind in "iu":
        group.create_array(
            "label_values", data=values.astype(np.int64), chunks=(max(1, len(values)),),
            config=ARRAY_CONFIG,
        )
    else:
        write_str_array(group, "label_values", values)


def read_label_values(arr) -> np.ndarray:
    if np.dtype(arr.dtype).kind in "iu":
        return np.asarray(arr[:], dtype=np.int64)
    return read_str_array(arr)


def read_str_array(arr) -> np.ndarray:
    # zarr returns numpy's variable-width StringDType; the public API promises a plain str array.
    return np.asarray(arr[:].tolist(), dtype=str)


class Batch(NamedTuple):
    """One process's rows of a global batch.

    x ([local_rows, n_genes]: float32, or the store's own dtype with ``dtype=None``), y (int32
    [local_rows]), slot (int32: the row's position in the GLOBAL batch), mask (bool: False for
    padding), index (int64: original cell index, -1 for padding).
    """

    x: np.ndarray
    y: np.ndarray
    slot: np.ndarray
    mask: np.ndarray
    index: np.ndarray
