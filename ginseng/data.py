"""GinsengDataset: cell counts in a zarr v3 store, read through TensorStore, and its batch loader.

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
import os
import shutil
import threading
import uuid
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tensorstore as ts
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec

from ginseng._core.files import atomic_path
from ginseng._core.progress import bar_disabled
from ginseng._core.threads import background
from ginseng.utils import _check_cells, _layer_names, _row_block

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Batch", "BatchLoader", "GinsengDataset"]

FORMAT_NAME = "ginseng.dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "holdout", "all")
GROUP_MODES = ("fraction", "loo")

# Chosen by measurement (40k x 2,000 NB counts, ~17-27 % non-zero, 2 cores): blosc-lz4 with
# bit-shuffle stores uint16 counts at ~13 % of their raw size and decodes at ~600k cells/s with
# concurrent whole-chunk reads; zstd is ~2x slower to decode for a similar size, no codec is 8x
# larger on disk. For shuffled epochs of 200k x 2,000 (loader, 2 busy cores) 1-4 MB row chunks
# beat 0.5 MB ones by ~1.3x; 2 MB keeps single-row reads (get_batch) cheap enough.
_TARGET_CHUNK_BYTES = 2 << 20
_MIN_CHUNK_ROWS = 16
_MAX_CHUNK_ROWS = 8192
# Rows shuffled together by the loader's buffer shuffle (a window of whole chunks). Part of the
# epoch plan, so it is a constant: the plan must not depend on prefetch or process count.
_WINDOW_ROWS = 16384
# Memory used to permute rows while writing: stored rows are written a run of this size at a time.
_WRITE_BUFFER_BYTES = 512 << 20
_READ_BLOCK_BYTES = 64 << 20
# An on-disk input bigger than this many write buffers is bucket-sorted through a spill store
# (two passes over the data) instead of being streamed once per buffer. Measured on a page-cached
# 1M x 2,000 backed .h5ad (benchmarks/RESULTS.md, section 7): 8 buffers, streaming 37 s and the
# spill 43 s; 62 buffers, streaming 132 s and the spill 40 s. An input too big for the page cache
# makes every extra pass a read from disk, so past a few buffers the spill is the safe choice.
_SPILL_MIN_RUNS = 8
# Decoded bytes of whole-chunk reads the loader keeps in flight (bounded memory, enough overlap).
_INFLIGHT_BYTES = 64 << 20
# Threads that copy decoded chunks and gather batch rows (see _assembly_workers).
_MAX_ASSEMBLY_WORKERS = 4
# Every chunk of every array is written, even an all-zero one (zarr skips those by default), so a
# missing chunk file always means damage: stores carrying this attribute are read with
# TensorStore's fill_missing_data_reads=False and their small arrays are checked on open,
# instead of a deleted chunk silently reading as zeros.
_ALL_CHUNKS_ATTR = "all_chunks_stored"
_ARRAY_CONFIG = {"write_empty_chunks": True}



class _Flag:
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

def _codec() -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def _is_anndata(obj) -> bool:
    return hasattr(obj, "obs") and hasattr(obj, "var") and hasattr(obj, "X")


def _describe(values, limit=20) -> str:
    values = [str(v) for v in values]
    more = "" if len(values) <= limit else f", ... ({len(values)} in all)"
    return "[" + ", ".join(repr(v) for v in values[:limit]) + more + "]"


def _read_ginseng_attrs(path: Path, fmt: str = FORMAT_NAME) -> dict | None:
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


def _check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        msg = f"batch_size must be an integer >= 1, found {batch_size!r}"
        raise ValueError(msg)
    return int(batch_size)


def _as_seed(rng) -> int:
    """An int seed from ``rng`` (None -> 0, int, or np.random.Generator: one draw from it)."""
    if rng is None:
        return 0
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**63 - 1))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return int(rng)
    msg = f"rng must be None, an int seed or a numpy.random.Generator, found {type(rng).__name__}"
    raise TypeError(msg)


def _as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(_as_seed(rng))


def _is_sparse_dataset(X) -> bool:
    """A backed (on-disk) sparse matrix of anndata: read by rows without densifying."""
    return getattr(X, "format", None) in ("csr", "csc") and not isinstance(X, np.ndarray)


def _encode_labels(values, what: str) -> tuple[np.ndarray, np.ndarray]:
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


class _Source:
    """Row-block access to the input counts (dense, sparse, or backed AnnData), columns selected."""

    def __init__(self, X, columns: np.ndarray | None, cells: np.ndarray | None = None):
        self.X = X
        self.columns = columns
        self.cells = cells  # sorted input rows to keep (None: all)
        self.n_rows = int(X.shape[0]) if cells is None else len(cells)
        self.n_cols = int(X.shape[1]) if columns is None else len(columns)

    def block(self, start: int, stop: int):
        """Rows [start, stop) (of the kept cells) as a dense ndarray or a scipy CSR matrix."""
        blk = _row_block(self.X, start, stop, self.cells)
        if hasattr(blk, "to_memory"):  # anndata backed sparse slices
            blk = blk.to_memory()
        if sp.issparse(blk):
            blk = sp.csr_matrix(blk)
            if self.columns is not None:
                blk = blk[:, self.columns]
            return blk
        blk = np.asarray(blk)
        if self.columns is not None:
            blk = blk[:, self.columns]
        return blk

    @property
    def in_memory(self) -> bool:
        """True for a numpy array or scipy sparse matrix (rows can be gathered cheaply)."""
        return isinstance(self.X, np.ndarray) or sp.issparse(self.X)

    def rows(self, idx: np.ndarray):
        """The rows ``idx`` (any order) of an in-memory input, columns selected."""
        if self.cells is not None:
            idx = self.cells[idx]
        if sp.issparse(self.X):
            blk = self.X[idx]
            return blk if self.columns is None else blk[:, self.columns]
        if self.columns is None:
            return self.X[idx]
        return self.X[np.ix_(idx, self.columns)]

    def block_rows(self, itemsize: int = 4) -> int:
        # A dense input is read with all its columns before the gene mask drops some.
        cols = self.n_cols if sp.issparse(self.X) or _is_sparse_dataset(self.X) else int(self.X.shape[1])
        return max(1, min(self.n_rows, _READ_BLOCK_BYTES // max(1, cols * itemsize)))

    def blocks(self, desc: str, silent: bool):
        step = self.block_rows()
        starts = range(0, self.n_rows, step)
        for start in tqdm(starts, desc=desc, disable=bar_disabled(silent, len(starts)), unit="block"):
            yield start, self.block(start, min(self.n_rows, start + step))


def _scan_values(source: _Source, silent: bool) -> tuple[float, bool]:
    """Validate counts block by block; return (max value, all integer)."""
    vmax = 0.0
    integer = True
    for start, blk in source.blocks("checking counts", silent):
        vals = blk.data if sp.issparse(blk) else blk
        if vals.size == 0:
            continue
        if vals.dtype.kind == "f":
            bad = ~np.isfinite(vals)
            if bad.any():
                n_bad = int(bad.sum())
                msg = (
                    f"counts must be finite, found {n_bad} NaN/inf values "
                    f"(first in the row block starting at cell {start})"
                )
                raise ValueError(msg)
        vmin = vals.min()
        if vmin < 0:
            msg = f"counts must be non-negative, found {vmin} (in the row block starting at cell {start})"
            raise ValueError(msg)
        vmax = max(vmax, float(vals.max()))
        if integer and vals.dtype.kind == "f" and not np.all(np.floor(vals) == vals):
            integer = False
    return vmax, integer


def _auto_chunk_rows(n_genes: int, itemsize: int) -> int:
    rows = _TARGET_CHUNK_BYTES / max(1, n_genes * itemsize)
    rows = 2 ** round(math.log2(max(rows, 1)))
    return int(min(_MAX_CHUNK_ROWS, max(_MIN_CHUNK_ROWS, rows)))


def _write_str_array(group, name: str, values) -> None:
    values = np.asarray([str(v) for v in values], dtype=object)
    arr = group.create_array(
        name, shape=values.shape, dtype=str, chunks=(max(1, len(values)),), config=_ARRAY_CONFIG
    )
    arr[:] = values


def _write_label_values(group, values: np.ndarray) -> None:
    """Integer labels as int64 (they come back as integers), others as strings."""
    if values.dtype.kind in "iu":
        group.create_array(
            "label_values", data=values.astype(np.int64), chunks=(max(1, len(values)),),
            config=_ARRAY_CONFIG,
        )
    else:
        _write_str_array(group, "label_values", values)


def _read_label_values(arr) -> np.ndarray:
    if np.dtype(arr.dtype).kind in "iu":
        return np.asarray(arr[:], dtype=np.int64)
    return _read_str_array(arr)


def _read_str_array(arr) -> np.ndarray:
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


class GinsengDataset:
    """A zarr-based dataset for efficient cell-level access.

    Parameters
    ----------
    path : str | Path
        An existing ginseng dataset (made by :meth:`create`). Opened read-only.

    Attributes
    ----------
    path : Path
        Path to the ginseng dataset zarr store.
    store : zarr.storage.LocalStore
        The read-only local zarr store.
    root : zarr.Group
        Zarr group holding the dataset.
    """

    def __init__(self, path):
        self.path = Path(path)
        attrs = _read_ginseng_attrs(self.path)
        if attrs is None:
            msg = f"{str(self.path)!r} is not a ginseng dataset (no zarr group with format {FORMAT_NAME!r})"
            raise ValueError(msg)
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            msg = (
                f"{str(self.path)!r} is a ginseng dataset of format_version {version!r}; this ginseng "
                f"reads version {FORMAT_VERSION}. Re-create the dataset with this version of ginseng."
            )
            raise ValueError(msg)
        if attrs.get("complete") is not True:
            msg = f"{str(self.path)!r} is an incomplete ginseng dataset (its creation did not finish); re-create it"
            raise ValueError(msg)
        self._open()

    # ------------------------------------------------------------------ opening
    def _damaged(self, what: str, err: BaseException) -> ValueError:
        """The error for a store whose files are missing or corrupted, naming the store."""
        msg = (
            f"ginseng dataset {str(self.path)!r} is damaged: {what} failed ({type(err).__name__}: "
            f"{err}). A chunk or metadata file is missing or corrupted; re-create the dataset."
        )
        return ValueError(msg)

    def _open(self) -> None:
        """Open the arrays and read the metadata; any failure names the store."""
        try:
            self._reopen_readonly()
            self._load_metadata()
        except ValueError as err:
            if str(self.path) in str(err) and "damaged" in str(err):
                raise
            raise self._damaged("reading its metadata", err) from err
        except Exception as err:  # zarr, numcodecs and TensorStore raise many kinds
            raise self._damaged("reading its metadata", err) from err

    def _reopen_readonly(self) -> None:
        """Helper to reopen store in read-only mode."""
        self.store = zarr.storage.LocalStore(self.path, read_only=True)
        self.root = zarr.open_group(self.store, mode="r")
        # TensorStore reads the counts: asynchronous, many chunks decoded concurrently.
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(self.path.resolve() / "X")},
        }
        if self.root.attrs.get(_ALL_CHUNKS_ATTR) is True:
            # Every chunk was written: a missing one is an error, not a block of zeros.
            spec["fill_missing_data_reads"] = False
        self._X = ts.open(spec, read=True, open=True).result()

    def _check_arrays(self, names: list[str]) -> None:
        """Refuse a store whose arrays disagree with its attributes or lack chunk files."""
        root = self.root
        problems = []
        if tuple(self._X.shape) != (self.n_cells, self.n_genes):
            problems.append(
                f"X has shape {tuple(self._X.shape)}, expected ({self.n_cells}, {self.n_genes})"
            )
        if self.attrs.get(_ALL_CHUNKS_ATTR) is True:
            for name in names:
                arr = root[name]
                if arr.nchunks_initialized != arr.nchunks:
                    problems.append(
                        f"array {name!r} has {arr.nchunks_initialized} of its {arr.nchunks} chunk files"
                    )
        if problems:
            msg = (
                f"ginseng dataset {str(self.path)!r} is damaged: "
                + "; ".join(problems)
                + ". Re-create the dataset."
            )
            raise ValueError(msg)

    def _load_metadata(self) -> None:
        """Load metadata from zarr store."""
        root = self.root
        attrs = dict(root.attrs)
        self.attrs = attrs
        self.n_cells = int(attrs["n_cells"])
        self.n_genes = int(attrs["n_genes"])
        arrays = ["order", "labels", "label_values", "genes"]
        if "group_codes" in root:
            arrays += ["group_codes", "group_values"]
        if attrs.get("split"):
            arrays += [f"{attrs['split']}/train", f"{attrs['split']}/holdout"]
        self._check_arrays(arrays)
        self.chunk_rows = int(attrs["chunk_rows"])
        self.uuid = str(attrs["uuid"])
        self.identity = f"{self.uuid}:{self.n_cells}x{self.n_genes}"
        self.genes = _read_str_array(root["genes"])
        self.label_values = _read_label_values(root["label_values"])
        self.n_labels = len(self.label_values)
        self.label_keys = np.arange(self.n_labels)
        self.labels = np.asarray(root["labels"][:], dtype=np.int32)
        self._order = np.asarray(root["order"][:], dtype=np.int64)
        self._rank = np.empty_like(self._order)
        self._rank[self._order] = np.arange(self.n_cells, dtype=np.int64)
        if "group_codes" in root:
            values = _read_str_array(root["group_values"])
            self.groups = values[np.asarray(root["group_codes"][:])]
        else:
            self.groups = None
        lengths = {
            "labels": (len(self.labels), self.n_cells),
            "order": (len(self._order), self.n_cells),
            "genes": (len(self.genes), self.n_genes),
        }
        wrong = [f"{k} has {n} entries, expected {e}" for k, (n, e) in lengths.items() if n != e]
        if self.labels.size and not 0 <= self.labels.min() <= self.labels.max() < self.n_labels:
            wrong.append(f"labels hold codes outside [0, {self.n_labels})")
        if wrong:
            msg = f"ginseng dataset {str(self.path)!r} is damaged: " + "; ".join(wrong)
            raise ValueError(msg)
        self.label_indices = {
            k: np.flatnonzero(self.labels == k).astype(np.int64) for k in range(self.n_labels)
        }
        split = attrs.get("split")
        if split:
            self.train_indices = np.asarray(root[f"{split}/train"][:], dtype=np.int64)
            self.holdout_indices = np.asarray(root[f"{split}/holdout"][:], dtype=np.int64)
        else:
            self.train_indices = np.arange(self.n_cells, dtype=np.int64)
            self.holdout_indices = np.zeros(0, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"GinsengDataset({str(self.path)!r}, n_cells={self.n_cells}, n_genes={self.n_genes}, "
            f"n_labels={self.n_labels}, train={len(self.train_indices)}, holdout={len(self.holdout_indices)})"
        )

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path,
        adata,
        labels,
        chunk_size=None,
        groups=None,
        gene_key=None,
        gene_mask=None,
        layer=None,
        *,
        genes=None,
        cells=None,
        shuffle=True,
        seed=0,
        overwrite=False,
        silent=False,
    ) -> GinsengDataset:
        """Autodetect array type and create a dataset.

        Parameters
        ----------
        path : str | Path
            Path to store the new dataset (a directory). Built in a temporary directory beside it
            and renamed into place when complete.
        adata : AnnData | np.ndarray | scipy.sparse matrix
            Counts (cells x genes). AnnData may be in memory or backed; it is read in row blocks.
        labels : np.ndarray | str
            One label per cell, or a column of ``adata.obs``.
        chunk_size : int | tuple[int, int], optional
            Rows per chunk, or (rows, genes). Default: ~1 MB of counts per chunk, all genes.
        groups : np.ndarray | str, optional
            One group per cell (e.g. donor), or a column of ``adata.obs``; used by group-level holdout.
        gene_key : str, optional
            Column of ``adata.var`` with gene names (default: ``adata.var_names``).
        gene_mask : np.ndarray | str, optional
            Boolean mask of genes to keep, or the name of a boolean column of ``adata.var``.
        layer : str, optional
            Read counts from ``adata.layers[layer]`` instead of ``adata.X``.
        genes : array-like, optional
            Gene names (for array input, or to override); length n_genes before or after the mask.
        cells : array-like of int or bool, optional
            Keep only these input rows (row indices or a boolean mask), e.g. the training cells
            of a backed file, read block by block without loading the rest. ``labels`` and
            ``groups`` still give one value per input row. The rows are taken in input order
            (indices are sorted): dataset index i is the i-th kept row.
        shuffle : bool
            Store rows in a seeded random permutation (fast shuffled epochs). Indices stay original.
        seed : int
            Seed of that permutation.
        overwrite : bool
            Replace an existing ginseng dataset at ``path``. A path that is not a ginseng dataset
            is never replaced.
        silent : bool
            No progress bars.

        Returns
        -------
        GinsengDataset
            Instance of the created dataset.
        """
        path = Path(path)
        if path.exists() or path.is_symlink():
            if not overwrite:
                msg = (
                    f"dataset path {str(path)!r} already exists; pass overwrite=True to replace it"
                )
                raise FileExistsError(msg)
            if _read_ginseng_attrs(path) is None:
                msg = (
                    f"{str(path)!r} exists and is not a ginseng dataset; refusing to replace it even "
                    "with overwrite=True. Choose another path or remove it yourself."
                )
                raise FileExistsError(msg)

        is_ad = _is_anndata(adata)
        if is_ad:
            n_cells, n_vars = adata.n_obs, adata.n_vars
            if layer is not None:
                if layer not in adata.layers:
                    msg = f"layer {layer!r} not found in adata.layers; available: {_describe(_layer_names(adata))}"
                    raise ValueError(msg)
                X = adata.layers[layer]
            else:
                X = adata.X
            if X is None:
                msg = "adata.X is empty; pass layer= to read counts from adata.layers"
                raise ValueError(msg)
        else:
            if isinstance(adata, (str, os.PathLike)):
                msg = (
                    f"adata must be an AnnData, a scipy sparse matrix or a dense array; found the "
                    f"path {str(adata)!r}: read it first (ginseng.io.read_adata(path, backed=True) "
                    "streams an .h5ad)"
                )
                raise TypeError(msg)
            if layer is not None or gene_key is not None:
                msg = "layer= and gene_key= need an AnnData input; found a plain array"
                raise ValueError(msg)
            if sp.issparse(adata) and adata.format not in ("csr", "csc"):
                adata = sp.csr_matrix(adata)  # COO, DOK, LIL...: rows cannot be cut from them
            if not (sp.issparse(adata) or isinstance(adata, np.ndarray)):
                adata = np.asarray(adata)
            X = adata
            if X.ndim != 2:
                msg = f"counts must be a 2-d (cells x genes) matrix, found shape {X.shape}"
                raise ValueError(msg)
            n_cells, n_vars = X.shape

        cells = _check_cells(cells, n_cells)

        def obs_column(value, what):
            if isinstance(value, str):
                if not is_ad:
                    msg = f"{what}={value!r} names an obs column, but the input is not an AnnData"
                    raise ValueError(msg)
                if value not in adata.obs.columns:
                    msg = f"{what} column {value!r} not found in adata.obs; columns: {_describe(adata.obs.columns)}"
                    raise ValueError(msg)
                arr = adata.obs[value].to_numpy()
            else:
                arr = np.asarray(value)
                if arr.ndim != 1 or arr.shape[0] != n_cells:
                    msg = f"{what} has {arr.shape[0] if arr.ndim else 0} entries but the data has {n_cells} cells"
                    raise ValueError(msg)
            return arr if cells is None else arr[cells]

        label_codes, label_values = _encode_labels(obs_column(labels, "labels"), "labels")
        if len(label_values) < 2:
            msg = f"a classifier needs at least 2 labels, found {len(label_values)}: {_describe(label_values)}"
            raise ValueError(msg)
        group_codes = group_values = None
        if groups is not None:
            group_codes, group_values = _encode_labels(obs_column(groups, "groups"), "groups")

        # Genes and the gene mask.
        if isinstance(gene_mask, str):
            if not is_ad or gene_mask not in adata.var.columns:
                found = (
                    _describe(adata.var.columns) if is_ad else "(no var: input is not an AnnData)"
                )
                msg = f"gene_mask column {gene_mask!r} not found in adata.var; columns: {found}"
                raise ValueError(msg)
            col = adata.var[gene_mask]
            if pd.api.types.is_bool_dtype(col.dtype) and col.isna().any():
                msg = f"gene_mask column {gene_mask!r} has {int(col.isna().sum())} missing values"
                raise ValueError(msg)
            if not pd.api.types.is_bool_dtype(col.dtype):
                msg = f"gene_mask column {gene_mask!r} must be boolean, found dtype {col.dtype}"
                raise ValueError(msg)
            gene_mask = col.to_numpy(dtype=bool)  # also pandas' nullable 'boolean'

        columns = None
        if gene_mask is not None:
            mask = np.asarray(gene_mask)
            if mask.dtype != bool or mask.ndim != 1:
                msg = f"gene_mask must be a 1-d boolean array, found dtype {mask.dtype} shape {mask.shape}"
                raise ValueError(msg)
            if mask.shape[0] != n_vars:
                msg = f"gene_mask has {mask.shape[0]} entries but the data has {n_vars} genes"
                raise ValueError(msg)
            if not mask.any():
                msg = f"gene_mask selects 0 of {n_vars} genes"
                raise ValueError(msg)
            columns = np.flatnonzero(mask)
        n_genes = n_vars if columns is None else len(columns)
        if genes is not None:
            gene_names = np.asarray(genes).astype(str)
            if gene_names.shape[0] == n_vars and columns is not None:
                gene_names = gene_names[columns]
            elif gene_names.shape[0] != n_genes:
                msg = f"genes has {gene_names.shape[0]} entries; expected {n_genes} (or {n_vars} before the mask)"
                raise ValueError(msg)
        elif is_ad:
            if gene_key is not None:
                if gene_key not in adata.var.columns:
                    msg = f"gene_key column {gene_key!r} not found in adata.var; columns: {_describe(adata.var.columns)}"
                    raise ValueError(msg)
                gene_names = adata.var[gene_key].astype(str).to_numpy()
            else:
                gene_names = np.asarray(adata.var_names).astype(str)
            if columns is not None:
                gene_names = gene_names[columns]
        else:
            gene_names = np.asarray([f"gene_{j}" for j in range(n_genes)])
        uniq, counts = np.unique(gene_names, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1]
            source = (
                "genes" if genes is not None
                else f"adata.var[{gene_key!r}]" if gene_key is not None
                else "adata.var_names"
            )
            msg = (
                f"gene names must be unique (a model maps genes by name), but {source} has "
                f"{int(dup.size)} duplicated name(s) among the {n_genes} genes kept: "
                f"{_describe(dup)}; make them unique first (adata.var_names_make_unique(), or "
                "read_10x_* with make_unique=True) or choose another gene_key"
            )
            raise ValueError(msg)

        # Chunks.
        if chunk_size is None:
            chunk_rows, chunk_cols = None, n_genes
        elif isinstance(chunk_size, (int, np.integer)):
            chunk_rows, chunk_cols = int(chunk_size), n_genes
        else:
            try:
                chunk_rows, chunk_cols = (int(c) if c is not None else None for c in chunk_size)
            except (TypeError, ValueError):
                msg = f"chunk_size must be an int or a (rows, genes) tuple, found {chunk_size!r}"
                raise ValueError(msg) from None
            chunk_cols = n_genes if chunk_cols is None else min(chunk_cols, n_genes)
        if (chunk_rows is not None and chunk_rows < 1) or chunk_cols < 1:
            msg = f"chunk_size must be positive, found {chunk_size!r}"
            raise ValueError(msg)

        source = _Source(X, columns, cells)
        if cells is not None:
            n_cells = len(cells)
        vmax, integer = _scan_values(source, silent)
        if not integer:
            warnings.warn(
                "counts contain non-integer values (normalized data?); storing float32. ginseng "
                "expects raw counts: normalization is part of the model.",
                UserWarning,
                stacklevel=2,
            )
            dtype = np.dtype(np.float32)
        elif vmax < 2**16:
            dtype = np.dtype(np.uint16)
        elif vmax < 2**32:
            dtype = np.dtype(np.uint32)
        else:
            dtype = np.dtype(np.float32)
        if chunk_rows is None:
            chunk_rows = _auto_chunk_rows(chunk_cols, dtype.itemsize)
        chunk_rows = min(chunk_rows, max(1, n_cells))

        order = (
            np.random.default_rng(seed).permutation(n_cells) if shuffle else np.arange(n_cells)
        ).astype(np.int64)

        with atomic_path(
            path,
            overwrite=overwrite,
            what="dataset",
            kind="dir",
            replaceable=lambda p: _read_ginseng_attrs(p) is not None,
        ) as tmp:
            root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w")
            root.attrs.update(
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "complete": False,
                    "uuid": uuid.uuid4().hex,
                    "n_cells": int(n_cells),
                    "n_genes": int(n_genes),
                    "chunk_rows": int(chunk_rows),
                    "dtype": dtype.name,
                    "shuffled": bool(shuffle),
                    "seed": int(seed),
                    "split": None,
                    _ALL_CHUNKS_ATTR: True,
                }
            )
            xa = root.create_array(
                "X",
                shape=(n_cells, n_genes),
                chunks=(chunk_rows, chunk_cols),
                dtype=dtype,
                compressors=_codec(),
                fill_value=0,
                config=_ARRAY_CONFIG,
            )
            cls._write_permuted(xa, source, order, dtype, chunk_rows, silent, tmp / ".spill")
            shutil.rmtree(tmp / ".spill", ignore_errors=True)
            one_chunk = {"chunks": (max(1, n_cells),), "config": _ARRAY_CONFIG}
            root.create_array("order", data=order, **one_chunk)
            root.create_array("labels", data=label_codes, **one_chunk)
            _write_label_values(root, label_values)
            _write_str_array(root, "genes", gene_names)
            if group_codes is not None:
                root.create_array("group_codes", data=group_codes, **one_chunk)
                _write_str_array(root, "group_values", group_values)
            # Written last: a store without it is refused on open.
            root.attrs["complete"] = True
        return cls(path)

    @staticmethod
    def _write_permuted(
        xa, source: _Source, order, dtype, chunk_rows: int, silent: bool, spill_dir: Path
    ) -> None:
        """Write stored row s = input row order[s] with memory bounded by a buffer of stored rows.

        The stored rows are written a run at a time (whole chunks, ~``_WRITE_BUFFER_BYTES``).
        Where one run holds every row, the input is streamed once into it. Otherwise:

        - an input held in memory (array or scipy sparse) is gathered run by run;
        - an input on disk (backed AnnData) of up to ``_SPILL_MIN_RUNS`` runs is streamed once
          per run, each pass keeping the rows of that run;
        - a bigger input on disk is bucket-sorted through a spill store in
          ``spill_dir``: one streaming pass puts every row in its run's bucket (a contiguous
          stretch of the spill, written whole chunk by whole chunk), then each bucket is read back
          in pieces into the buffer, in stored order, and written as its run. Two passes over
          the data whatever its size, instead of one pass over the input per run.
        """
        n_cells, n_genes = xa.shape
        if n_cells == 0:
            return
        run = (
            max(1, _WRITE_BUFFER_BYTES // max(1, n_genes * dtype.itemsize) // chunk_rows)
            * chunk_rows
        )
        n_runs = math.ceil(n_cells / run)

        def dense(rows):
            rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
            return rows.astype(dtype, copy=False)

        if n_runs == 1 or (not source.in_memory and n_runs <= _SPILL_MIN_RUNS):
            rank = np.empty_like(order)
            rank[order] = np.arange(n_cells, dtype=np.int64)
            for r, s0 in enumerate(range(0, n_cells, run)):
                s1 = min(n_cells, s0 + run)
                buf = np.zeros((s1 - s0, n_genes), dtype=dtype)
                desc = "writing counts" if n_runs == 1 else f"writing counts ({r + 1}/{n_runs})"
                for start, blk in source.blocks(desc, silent):
                    dest = rank[start : start + blk.shape[0]]
                    sel = np.flatnonzero((dest >= s0) & (dest < s1))
                    if sel.size:
                        buf[dest[sel] - s0] = dense(blk[sel])
                xa[s0:s1] = buf
                del buf
            return

        if source.in_memory:
            for s0 in tqdm(
                range(0, n_cells, run), desc="writing counts", disable=bar_disabled(silent, -(-n_cells // run)), unit="run"
            ):
                s1 = min(n_cells, s0 + run)
                xa[s0:s1] = dense(source.rows(order[s0:s1]))
            return

        # Bucket sort through the spill. Input row i goes to bucket rank[i] // run; within a bucket
        # rows keep input order, so spill row p holds input row by_bucket[p] and is stored at
        # rank[by_bucket[p]].
        rank = np.empty_like(order)
        rank[order] = np.arange(n_cells, dtype=np.int64)
        bucket = rank // run
        by_bucket = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[by_bucket], np.arange(n_runs + 1))
        spill = zarr.create_array(
            zarr.storage.LocalStore(spill_dir),
            shape=(n_cells, n_genes),
            chunks=(chunk_rows, n_genes),
            dtype=dtype,
            compressors=_codec(),
            fill_value=0,
        )
        fill = bounds[:-1].copy()  # next spill row of each bucket
        pending: list[list[np.ndarray]] = [[] for _ in range(n_runs)]
        n_pending = np.zeros(n_runs, dtype=np.int64)

        def flush(b: int, final: bool) -> None:
            rows = np.concatenate(pending[b]) if len(pending[b]) > 1 else pending[b][0]
            n = rows.shape[0] if final else (rows.shape[0] // chunk_rows) * chunk_rows
            if n:
                spill[fill[b] : fill[b] + n] = rows[:n]
                fill[b] += n
            pending[b] = [rows[n:]] if n < rows.shape[0] else []
            n_pending[b] = rows.shape[0] - n

        for start, blk in source.blocks("writing counts (1/2: bucket)", silent):
            b_of = bucket[start : start + blk.shape[0]]
            sorted_rows = np.argsort(b_of, kind="stable")
            cuts = np.searchsorted(b_of[sorted_rows], np.arange(n_runs + 1))
            for b in np.flatnonzero(np.diff(cuts)):
                rows = dense(blk[sorted_rows[cuts[b] : cuts[b + 1]]])
                pending[b].append(rows)
                n_pending[b] += rows.shape[0]
                if n_pending[b] >= chunk_rows:
                    flush(b, final=False)
        for b in np.flatnonzero(n_pending):
            flush(b, final=True)
        if not np.array_equal(fill, bounds[1:]):
            msg = "internal: the spill buckets were not filled exactly"
            raise RuntimeError(msg)
        piece = max(1, _READ_BLOCK_BYTES // max(1, n_genes * dtype.itemsize) // chunk_rows) * chunk_rows
        for b in tqdm(range(n_runs), desc="writing counts (2/2: permute)", disable=bar_disabled(silent, n_runs), unit="run"):
            s0, s1 = b * run, min(n_cells, (b + 1) * run)
            p0, p1 = bounds[b], bounds[b + 1]
            buf = np.empty((s1 - s0, n_genes), dtype=dtype)
            for q0 in range(p0, p1, piece):  # the bucket in pieces: memory ~ one buffer
                q1 = min(p1, q0 + piece)
                buf[rank[by_bucket[q0:q1]] - s0] = spill[q0:q1]
            xa[s0:s1] = buf
            del buf

    @classmethod
    def _create_from_numpy(
        cls, path, X, labels, chunk_size=None, groups=None, genes=None, column_mask=None, **kwargs
    ):
        """Create cached dataset from a dense numpy array (see :meth:`create`)."""
        return cls.create(
            path,
            np.asarray(X),
            labels,
            chunk_size,
            groups,
            gene_mask=column_mask,
            genes=genes,
            **kwargs,
        )

    @classmethod
    def _create_from_sparse(
        cls,
        path,
        adata,
        labels,
        chunk_size=None,
        groups=None,
        genes=None,
        column_mask=None,
        **kwargs,
    ):
        """Create cached dataset from a sparse count matrix or an AnnData holding one (see :meth:`create`)."""
        return cls.create(
            path, adata, labels, chunk_size, groups, gene_mask=column_mask, genes=genes, **kwargs
        )

    # ------------------------------------------------------------------ splits
    @property
    def has_holdout(self) -> _Flag:
        """Whether the dataset has a train/holdout split.

        A property, as in ginseng 0.1 (``if ds.has_holdout:``); the value can also be called,
        ``ds.has_holdout()``, as the seed API lists it among the methods.
        """
        return _Flag(bool(self.attrs.get("split")))

    @property
    def n_groups(self) -> int:
        """Number of distinct groups (0 when the dataset was created without groups)."""
        return 0 if self.groups is None else len(np.unique(self.groups))

    def _split_indices(self, split: str) -> np.ndarray:
        if split == "train":
            return self.train_indices
        if split == "holdout":
            return self.holdout_indices
        if split == "all":
            return np.arange(self.n_cells, dtype=np.int64)
        msg = f"split must be one of {SPLITS}, found {split!r}"
        raise ValueError(msg)

    def make_holdout(
        self, holdout_fraction=0.2, rng=None, group_level=False, group_mode="fraction"
    ) -> None:
        """Create and persist a train/holdout split.

        Parameters
        ----------
        holdout_fraction : float
            In (0, 1). Per label, int(smallest label count * holdout_fraction) cells are held out
            (the same number for every label). With ``group_level``, the fraction of groups held out.
        rng : np.random.Generator | int, optional
            Randomness (None means seed 0): the same seed gives the same split, always.
        group_level : bool
            Hold out whole groups, so that no group has cells in both train and holdout.
        group_mode : str
            'fraction': round(n_groups * holdout_fraction) groups (at least 1, fewer than all);
            'loo': one group.
        """
        if group_mode not in GROUP_MODES:
            msg = f"group_mode must be one of {GROUP_MODES}, found {group_mode!r}"
            raise ValueError(msg)
        f = float(holdout_fraction)
        if not (0.0 < f < 1.0):
            msg = f"holdout_fraction must be in (0, 1), found {holdout_fraction!r}"
            raise ValueError(msg)
        gen = _as_generator(rng)
        if group_level:
            if self.groups is None:
                msg = "group_level=True needs groups, but this dataset was created without groups"
                raise ValueError(msg)
            uniq = np.unique(self.groups)
            if len(uniq) < 2:
                msg = f"group_level=True needs at least 2 groups, found {len(uniq)}: {_describe(uniq)}"
                raise ValueError(msg)
            n_hold = (
                1 if group_mode == "loo" else int(min(len(uniq) - 1, max(1, round(len(uniq) * f))))
            )
            held = gen.choice(uniq, size=n_hold, replace=False)
            is_hold = np.isin(self.groups, held)
            holdout = np.flatnonzero(is_hold)
            # Whole groups rarely hold every label; the run can go on, but the user should know
            # which labels the holdout cannot score, or which the model will never see.
            in_hold = np.bincount(self.labels[is_hold], minlength=self.n_labels) > 0
            in_train = np.bincount(self.labels[~is_hold], minlength=self.n_labels) > 0
            for where, present in (("holdout", in_hold), ("training", in_train)):
                absent = self.label_values[~present]
                if absent.size:
                    msg = (
                        f"the group-level holdout (held-out groups {_describe(sorted(held))}) leaves "
                        f"{absent.size} of {self.n_labels} labels with no {where} cells: "
                        f"{_describe(absent)}"
                    )
                    warnings.warn(msg, UserWarning, stacklevel=2)
        else:
            counts = np.bincount(self.labels, minlength=self.n_labels)
            smallest = int(np.argmin(counts))
            n_hold = int(counts[smallest] * f)
            if n_hold == 0:
                msg = (
                    f"holdout_fraction={f} leaves no holdout cells: the smallest label "
                    f"{str(self.label_values[smallest])!r} has {counts[smallest]} cells and "
                    f"int({counts[smallest]} * {f}) = 0; use a larger fraction (>= {1 / counts[smallest]:.3g})"
                )
                raise ValueError(msg)
            holdout = np.concatenate(
                [
                    gen.choice(self.label_indices[k], size=n_hold, replace=False)
                    for k in range(self.n_labels)
                ]
            )
            is_hold = np.zeros(self.n_cells, dtype=bool)
            is_hold[holdout] = True
        holdout = np.flatnonzero(is_hold).astype(np.int64)
        train = np.flatnonzero(~is_hold).astype(np.int64)
        if train.size == 0:
            msg = "the holdout split leaves no training cells"
            raise ValueError(msg)
        self._persist_split(
            train,
            holdout,
            {"holdout_fraction": f, "group_level": bool(group_level), "group_mode": group_mode},
        )

    def _persist_split(self, train: np.ndarray, holdout: np.ndarray, params: dict) -> None:
        root = zarr.open_group(zarr.storage.LocalStore(self.path), mode="r+")
        old = root.attrs.get("split")
        # The same split as the one on disk now (every run with the same seed and settings):
        # nothing to write, so runs sharing a dataset do not rewrite it under each other. Compared
        # with the store, not with what this object read when it was opened.
        if (
            old
            and old in root
            and root.attrs.get("split_params") == params
            and np.array_equal(np.asarray(root[f"{old}/train"][:]), train)
            and np.array_equal(np.asarray(root[f"{old}/holdout"][:]), holdout)
        ):
            self._open()
            return
        # New arrays first, then flip the attribute that names the live split, then drop the old:
        # a crash at any point leaves a store whose live split is complete.
        name = f"split_{uuid.uuid4().hex[:12]}"
        grp = root.create_group(name)
        cfg = _ARRAY_CONFIG
        grp.create_array("train", data=train, chunks=(max(1, len(train)),), config=cfg)
        grp.create_array("holdout", data=holdout, chunks=(max(1, len(holdout)),), config=cfg)
        root.attrs.update({"split": name, "split_params": params})
        if old and old in root:
            del root[old]
        self._open()

    # ------------------------------------------------------------------ reading
    def _read_stored(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows (sorted unique int64) in their stored dtype, read concurrently."""
        if rows.size == 0:
            return np.zeros((0, self.n_genes), dtype=self._X.dtype.numpy_dtype)
        try:
            return self._X.oindex[rows].read().result()
        except ValueError as err:  # TensorStore: a missing or undecodable chunk
            raise self._damaged("reading counts", err) from err

    def get_batch(self, indices) -> np.ndarray:
        """Retrieve a batch of count data for given cell indices.

        Parameters
        ----------
        indices : np.ndarray
            ORIGINAL cell indices, any order, repeats allowed.

        Returns
        -------
        np.ndarray
            float32 (len(indices), n_genes).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.n_cells or idx.max() >= self.n_cells):
            msg = f"cell indices must be in [0, {self.n_cells}), found min {idx.min()} max {idx.max()}"
            raise IndexError(msg)
        idx = np.where(idx < 0, idx + self.n_cells, idx)
        stored = self._rank[idx]
        uniq, inv = np.unique(stored, return_inverse=True)
        data = self._read_stored(uniq)
        return data[inv.reshape(-1)].astype(np.float32)

    # Rows of float32 per window of an ordered pass over a randomly stored dataset.
    ORDERED_WINDOW_BYTES = 256 * 2**20

    def _iter_in_order(self, batch_size, split):
        batch_size = _check_batch_size(batch_size)
        cells = np.sort(np.asarray(self._split_indices(split), dtype=np.int64))
        per_window = max(1, self.ORDERED_WINDOW_BYTES // (4 * max(1, self.n_genes)) // batch_size)
        window = per_window * batch_size
        labels = np.asarray(self.labels)
        for w0 in range(0, len(cells), window):
            idx = cells[w0 : w0 + window]
            x = self.get_batch(idx)
            y = labels[idx].astype(np.int32)
            for b0 in range(0, len(idx), batch_size):
                yield x[b0 : b0 + batch_size], y[b0 : b0 + batch_size]

    def __len__(self, split: str = "all") -> int:
        """Return the number of samples in ``split`` ("all", "train", or "holdout")."""
        return len(self._split_indices(split))

    def __getitem__(self, idx, split: str = "all"):
        """(expression float32 [n_genes], label int) of position ``idx`` within ``split``."""
        if isinstance(idx, tuple):
            idx, split = idx
        ind = self._split_indices(split)
        i = int(ind[idx])
        return self.get_batch([i])[0], int(self.labels[i])

    def loader(
        self,
        batch_size,
        *,
        split="train",
        shuffle=True,
        balance=False,
        seed=0,
        pad_multiple=1,
        process_index=0,
        process_count=1,
        prefetch=2,
        dtype=np.float32,
        workers=None,
    ) -> BatchLoader:
        """A :class:`BatchLoader` over ``split`` (see its docstring)."""
        return BatchLoader(
            self,
            batch_size,
            split=split,
            shuffle=shuffle,
            balance=balance,
            seed=seed,
            pad_multiple=pad_multiple,
            process_index=process_index,
            process_count=process_count,
            prefetch=prefetch,
            dtype=dtype,
            workers=workers,
        )

    def iter_batches(self, batch_size, shuffle=False, rng=None, split="all", balance_train=False):
        """Iterate through the dataset in batches.

        Parameters
        ----------
        batch_size : int
            Number of samples per batch (the last batch may be smaller).
        shuffle : bool
            Random order (chunk-window buffer shuffle over a randomly stored dataset). Otherwise
            the cells of ``split`` in dataset (original) order, as in the input the dataset was
            created from. On a store written in random order (``create(shuffle=True)``, the
            default) that order is read in windows of at most ~256 MB of rows, each of which
            touches every chunk: a full ordered pass decodes the store about once per window,
            so prefer ``shuffle=True`` (or :meth:`loader`) where order does not matter.
        rng : np.random.Generator | int, optional
            Randomness used if shuffling (and for balancing).
        split : str
            "all", "train", or "holdout".
        balance_train : bool
            Every label contributes the same number of cells (rare labels oversampled).

        Yields
        ------
        tuple[np.ndarray, np.ndarray]
            x float32 (rows, n_genes), y int32 (rows,).
        """
        if not shuffle and not balance_train:
            yield from self._iter_in_order(batch_size, split)
            return
        ld = self.loader(
            batch_size, split=split, shuffle=shuffle, balance=balance_train, seed=_as_seed(rng)
        )
        for b in ld.epoch(0):
            if b.mask.all():
                yield b.x, b.y
            else:
                yield b.x[b.mask], b.y[b.mask]


class _Done:
    """A finished result with the ``result()`` of a future (work done inline, without a pool)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _take_rows(arr: np.ndarray, sel: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.take(arr, sel, axis=0, out=out)


def _assembly_workers() -> int:
    """Threads assembling batches: a quarter of the CPUs this process may use, at most 4.

    The CPUs it may use (``sched_getaffinity``: a SLURM job's binding), not the machine's; the
    rest are left to TensorStore's decoding, the training loop and JAX. 0 below 8 CPUs: then
    the loader thread assembles inline.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return min(_MAX_ASSEMBLY_WORKERS, n // 4) if n >= 8 else 0


class BatchLoader:
    """Batches of one split, deterministic given (seed, epoch), independent of process count.

    An epoch's plan (which original cells, in which global batch and slot) depends only on
    (dataset, split, seed, epoch, shuffle, balance, batch_size). With ``shuffle``, the cells'
    chunks are visited in a random order, consecutive chunks form windows of ~16k rows and rows
    are shuffled inside each window; since rows are stored in a random permutation, batches are
    as random as iid sampling while every read is a run of whole chunks. Without ``shuffle``,
    cells come in storage order. ``balance`` gives every label as many cells as the largest one
    (all cells of each label, plus draws with replacement), so no cell is ever dropped.

    Global batch b holds epoch cells [b*batch_size, (b+1)*batch_size) in slots 0.., then padding
    up to ``global_batch``; process p gets slots [p*local_rows, (p+1)*local_rows) and reads only
    those rows, on a background thread that runs ``prefetch`` batches ahead.

    ``workers`` threads copy and gather rows (default: from the CPUs this process may use, see
    ``_assembly_workers``; 0 or 1 assembles on the loader thread). They change nothing in the
    batches, only how fast they come.

    ``dtype`` is the dtype of ``Batch.x``: float32 by default; ``None`` keeps the store's own
    (uint16 or uint32 counts), which is what the trainer asks for: half the bytes of float32 to
    copy to the device, and no conversion on the host (the step converts, exactly).
    """

    def __init__(
        self,
        dataset,
        batch_size,
        *,
        split="train",
        shuffle=True,
        balance=False,
        seed=0,
        pad_multiple=1,
        process_index=0,
        process_count=1,
        prefetch=2,
        dtype=np.float32,
        workers=None,
    ):
        _check_batch_size(batch_size)
        if split not in SPLITS:
            msg = f"split must be one of {SPLITS}, found {split!r}"
            raise ValueError(msg)
        if pad_multiple < 1 or process_count < 1:
            msg = f"pad_multiple and process_count must be >= 1, found {pad_multiple} and {process_count}"
            raise ValueError(msg)
        if not 0 <= process_index < process_count:
            msg = f"process_index must be in [0, {process_count}), found {process_index}"
            raise ValueError(msg)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.split = split
        self.shuffle = bool(shuffle)
        self.balance = bool(balance)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.prefetch = max(1, int(prefetch))
        self.dtype = np.dtype(dataset._X.dtype.numpy_dtype if dtype is None else dtype)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            msg = f"workers must be an integer >= 0 or None, found {workers!r}"
            raise ValueError(msg)
        self.workers = _assembly_workers() if workers is None else int(workers)
        unit = int(pad_multiple) * self.process_count
        self.global_batch = math.ceil(self.batch_size / unit) * unit
        self.local_rows = self.global_batch // self.process_count
        self._indices = np.asarray(dataset._split_indices(split), dtype=np.int64)
        if self.balance and self._indices.size:
            counts = np.bincount(dataset.labels[self._indices], minlength=dataset.n_labels)
            self.epoch_size = int(counts.max()) * int((counts > 0).sum())
        else:
            self.epoch_size = int(self._indices.size)
        self.num_batches = math.ceil(self.epoch_size / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int) -> np.ndarray:
        """ORIGINAL cell indices of the whole epoch in batch order (length ``epoch_size``)."""
        ds = self.dataset
        rng = np.random.default_rng([self.seed, int(epoch), 0x6E5E9])
        cells = self._indices
        if self.balance and cells.size:
            labels = ds.labels[cells]
            target = int(np.bincount(labels, minlength=ds.n_labels).max())
            parts = []
            for k in range(ds.n_labels):
                members = cells[labels == k]
                if members.size == 0:
                    continue
                extra = rng.choice(members, size=target - members.size, replace=True)
                parts.append(members)
                parts.append(extra)
            cells = np.concatenate(parts)
        stored = ds._rank[cells]
        if not self.shuffle:
            return cells[np.argsort(stored, kind="stable")]
        # Buffer shuffle: random chunk order, windows of whole chunks, rows shuffled per window.
        chunk = stored // ds.chunk_rows
        n_chunks = math.ceil(ds.n_cells / ds.chunk_rows)
        chunk_perm = rng.permutation(n_chunks)
        chunk_pos = np.empty(n_chunks, dtype=np.int64)
        chunk_pos[chunk_perm] = np.arange(n_chunks)
        window_chunks = max(1, _WINDOW_ROWS // ds.chunk_rows)
        window = chunk_pos[chunk] // window_chunks
        key = rng.random(cells.size)
        return cells[np.lexsort((key, window))]

    def _batch_layout(self, plan: np.ndarray, b: int):
        """(original index, slot, mask) of this process's rows of global batch b."""
        lo = self.process_index * self.local_rows
        slot = np.arange(lo, lo + self.local_rows, dtype=np.int32)
        pos = b * self.batch_size + slot.astype(np.int64)
        real = (slot < self.batch_size) & (pos < plan.size)
        index = np.full(self.local_rows, -1, dtype=np.int64)
        index[real] = plan[pos[real]]
        return index, slot, real

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield this process's :class:`Batch` for global batches start_batch .. num_batches-1."""
        if not 0 <= start_batch <= self.num_batches:
            msg = f"start_batch must be in [0, {self.num_batches}], found {start_batch}"
            raise ValueError(msg)
        plan = self.plan(epoch)
        ds = self.dataset
        # Batches are read in groups of ~one window of rows: one concurrent TensorStore read each.
        group = max(1, _WINDOW_ROWS // self.batch_size)
        groups = [
            range(g, min(self.num_batches, g + group))
            for g in range(start_batch, self.num_batches, group)
        ]
        n_cells, R = ds.n_cells, ds.chunk_rows
        max_inflight = max(
            4, _INFLIGHT_BYTES // max(1, R * ds.n_genes * ds._X.dtype.numpy_dtype.itemsize)
        )

        def group_info(g):
            """A group's batch layouts, the sorted stored rows this process needs, their chunks."""
            layouts = [self._batch_layout(plan, b) for b in g]
            rows = np.unique(np.concatenate([ds._rank[ix[m]] for ix, _, m in layouts]))
            return layouts, rows, np.unique(rows // R)

        def work():
            # Whole-chunk reads (TensorStore decodes them concurrently on its own threads), kept
            # _INFLIGHT_BYTES ahead of use across group boundaries: reading overlaps assembling
            # and the consumer's step. Group layouts are built as the reads reach them, never for
            # the whole epoch at once, so memory stays bounded whatever the dataset size.
            inflight: deque = deque()
            pending_chunks: deque = deque()  # chunk ids planned, not yet read
            infos: deque = deque()  # group infos planned, not yet assembled
            group_iter = iter(groups)

            def plan_next_group() -> bool:
                g = next(group_iter, None)
                if g is None:
                    return False
                info = group_info(g)
                infos.append(info)
                pending_chunks.extend(int(c) for c in info[2])
                return True

            def refill():
                while len(inflight) < max_inflight:
                    if not pending_chunks and not plan_next_group():
                        return
                    if pending_chunks:
                        c = pending_chunks.popleft()
                        inflight.append(ds._X[c * R : min(n_cells, (c + 1) * R)].read())

            whole_buf = None
            # Copies into the group buffer and gathers of batch rows run on `workers` threads
            # (numpy releases the GIL while copying); inline on small machines.
            pool = (
                ThreadPoolExecutor(self.workers, thread_name_prefix="ginseng-assemble")
                if self.workers > 1
                else None
            )
            window = 2 * self.workers if pool is not None else 1  # batch gathers in flight
            local_shape = (self.local_rows, ds.n_genes)
            scratch = threading.local()  # per thread: gathered stored rows to convert

            def run(fn, *args):
                return pool.submit(fn, *args) if pool is not None else _Done(fn(*args))

            def gather(buf, pos, rows, index, x):
                at = pos[np.searchsorted(rows, ds._rank[index])]
                if x.dtype == buf.dtype:
                    return np.take(buf, at, axis=0, out=x)
                tmp = getattr(scratch, "rows", None)
                if tmp is None or tmp.shape != x.shape or tmp.dtype != buf.dtype:
                    tmp = scratch.rows = np.empty(x.shape, dtype=buf.dtype)
                np.copyto(x, np.take(buf, at, axis=0, out=tmp))
                return x

            try:
                for _ in groups:
                    if not infos:
                        plan_next_group()
                    layouts, rows, chunks = infos.popleft()
                    # A mostly-needed chunk is copied whole (a memcpy); a sparsely-needed one
                    # contributes only its rows, so the buffer stays near the rows needed.
                    bounds = np.searchsorted(rows, np.stack([chunks * R, (chunks + 1) * R]))
                    pos = np.empty(rows.size, dtype=np.int64)
                    spans = []
                    base = 0
                    for c, lo, hi in zip(chunks, bounds[0], bounds[1], strict=True):
                        size = min(n_cells, (c + 1) * R) - c * R
                        whole = 2 * (hi - lo) >= size
                        pos[lo:hi] = base + (rows[lo:hi] - c * R if whole else np.arange(hi - lo))
                        spans.append((c, lo, hi, base, whole))
                        base += size if whole else hi - lo
                    # One buffer for the whole epoch, grown when a group needs more: a fresh
                    # 64 MB allocation per group cost as much in page faults as decoding it.
                    # (Every gather of the previous group has finished before it is rewritten.)
                    if whole_buf is None or whole_buf.shape[0] < base:
                        whole_buf = np.empty((base, ds.n_genes), dtype=ds._X.dtype.numpy_dtype)
                    buf = whole_buf[:base]
                    copies = []
                    for c, lo, hi, start, whole in spans:
                        refill()
                        try:
                            arr = inflight.popleft().result()
                        except ValueError as err:  # a missing or undecodable chunk
                            raise ds._damaged("reading counts", err) from err
                        if whole:
                            copies.append(run(np.copyto, buf[start : start + arr.shape[0]], arr))
                        else:
                            dst = buf[start : start + hi - lo]
                            copies.append(run(_take_rows, arr, rows[lo:hi] - c * R, dst))
                    refill()
                    for f in copies:
                        f.result()
                    pending: deque = deque()
                    for index, slot, mask in layouts:
                        if mask.all():
                            out = np.empty(local_shape, dtype=self.dtype)
                            x = run(gather, buf, pos, rows, index, out)
                            y = ds.labels[index]
                        else:
                            out = np.zeros(local_shape, dtype=self.dtype)
                            y = np.zeros(self.local_rows, dtype=np.int32)
                            if mask.any():
                                real = index[mask]
                                out[mask] = buf[pos[np.searchsorted(rows, ds._rank[real])]]
                                y[mask] = ds.labels[real]
                            x = _Done(out)
                        pending.append((x, y, slot, mask, index))
                        while len(pending) > window:
                            x, y, slot, mask, index = pending.popleft()
                            yield Batch(x.result(), y, slot, mask, index)
                    while pending:
                        x, y, slot, mask, index = pending.popleft()
                        yield Batch(x.result(), y, slot, mask, index)
            finally:
                inflight.clear()  # closed early: drop the reads still in flight
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)

        yield from background(work, depth=self.prefetch, name="ginseng-loader")
