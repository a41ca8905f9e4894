"""GinsengDataset.create as stages: resolve the counts, the obs columns, the genes, the layout
(chunks, dtype, permutation), then write the store under a temporary name and rename it into place.

The counts are read in row blocks (``_Source``) whatever the input (dense, sparse, backed AnnData),
so memory stays bounded; the permutation is written a run of stored rows at a time (see
:func:`write_permuted`).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from tqdm.auto import tqdm

from ginseng._core.files import atomic_path
from ginseng._core.progress import bar_disabled
from ginseng.data.format import (
    ALL_CHUNKS_ATTR,
    ARRAY_CONFIG,
    FORMAT_NAME,
    FORMAT_VERSION,
    auto_chunk_rows,
    codec,
    describe,
    encode_labels,
    is_sparse_dataset,
    read_attrs,
    write_label_values,
    write_str_array,
)
from ginseng.utils import _check_cells, _layer_names, _row_block

__all__ = ["create_dataset", "write_permuted"]

# Memory used to permute rows while writing: stored rows are written a run of this size at a time.
_WRITE_BUFFER_BYTES = 512 << 20
_READ_BLOCK_BYTES = 64 << 20
# An on-disk input bigger than this many write buffers is bucket-sorted through a spill store
# (two passes over the data) instead of being streamed once per buffer. Measured on a page-cached
# 1M x 2,000 backed .h5ad (benchmarks/RESULTS.md, section 7): 8 buffers, streaming 37 s and the
# spill 43 s; 62 buffers, streaming 132 s and the spill 40 s. An input too big for the page cache
# makes every extra pass a read from disk, so past a few buffers the spill is the safe choice.
_SPILL_MIN_RUNS = 8


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
        cols = self.n_cols if sp.issparse(self.X) or is_sparse_dataset(self.X) else int(self.X.shape[1])
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


# --------------------------------------------------------------------------------------------
# Stage 1: the counts
# --------------------------------------------------------------------------------------------


def _is_anndata(obj) -> bool:
    return hasattr(obj, "obs") and hasattr(obj, "var") and hasattr(obj, "X")


class _Input(NamedTuple):
    """The input resolved: its count matrix and shape; ``adata`` is None for a plain matrix."""

    X: Any
    n_cells: int
    n_vars: int
    adata: Any


def _resolve_counts(adata, layer, gene_key) -> _Input:
    if _is_anndata(adata):
        if layer is not None:
            if layer not in adata.layers:
                msg = f"layer {layer!r} not found in adata.layers; available: {describe(_layer_names(adata))}"
                raise ValueError(msg)
            X = adata.layers[layer]
        else:
            X = adata.X
        if X is None:
            msg = "adata.X is empty; pass layer= to read counts from adata.layers"
            raise ValueError(msg)
        return _Input(X, adata.n_obs, adata.n_vars, adata)
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
    X = adata
    if sp.issparse(X) and X.format not in ("csr", "csc"):
        X = sp.csr_matrix(X)  # COO, DOK, LIL...: rows cannot be cut from them
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        X = np.asarray(X)
    if X.ndim != 2:
        msg = f"counts must be a 2-d (cells x genes) matrix, found shape {X.shape}"
        raise ValueError(msg)
    return _Input(X, X.shape[0], X.shape[1], None)


# --------------------------------------------------------------------------------------------
# Stage 2: labels and groups
# --------------------------------------------------------------------------------------------


def _obs_column(inp: _Input, value, what: str, cells):
    if isinstance(value, str):
        if inp.adata is None:
            msg = f"{what}={value!r} names an obs column, but the input is not an AnnData"
            raise ValueError(msg)
        if value not in inp.adata.obs.columns:
            msg = f"{what} column {value!r} not found in adata.obs; columns: {describe(inp.adata.obs.columns)}"
            raise ValueError(msg)
        arr = inp.adata.obs[value].to_numpy()
    else:
        arr = np.asarray(value)
        if arr.ndim != 1 or arr.shape[0] != inp.n_cells:
            msg = f"{what} has {arr.shape[0] if arr.ndim else 0} entries but the data has {inp.n_cells} cells"
            raise ValueError(msg)
    return arr if cells is None else arr[cells]


def _resolve_obs(inp: _Input, labels, groups, cells):
    """(label codes, label values, group codes, group values) of the kept cells."""
    label_codes, label_values = encode_labels(_obs_column(inp, labels, "labels", cells), "labels")
    if len(label_values) < 2:
        msg = f"a classifier needs at least 2 labels, found {len(label_values)}: {describe(label_values)}"
        raise ValueError(msg)
    group_codes = group_values = None
    if groups is not None:
        group_codes, group_values = encode_labels(_obs_column(inp, groups, "groups", cells), "groups")
    return label_codes, label_values, group_codes, group_values


# --------------------------------------------------------------------------------------------
# Stage 3: genes
# --------------------------------------------------------------------------------------------


def _mask_column(inp: _Input, name: str) -> np.ndarray:
    adata = inp.adata
    if adata is None or name not in adata.var.columns:
        found = describe(adata.var.columns) if adata is not None else "(no var: input is not an AnnData)"
        msg = f"gene_mask column {name!r} not found in adata.var; columns: {found}"
        raise ValueError(msg)
    col = adata.var[name]
    if pd.api.types.is_bool_dtype(col.dtype) and col.isna().any():
        msg = f"gene_mask column {name!r} has {int(col.isna().sum())} missing values"
        raise ValueError(msg)
    if not pd.api.types.is_bool_dtype(col.dtype):
        msg = f"gene_mask column {name!r} must be boolean, found dtype {col.dtype}"
        raise ValueError(msg)
    return col.to_numpy(dtype=bool)  # also pandas' nullable 'boolean'


def _gene_columns(inp: _Input, gene_mask) -> np.ndarray | None:
    """The input columns kept (None: all)."""
    if isinstance(gene_mask, str):
        gene_mask = _mask_column(inp, gene_mask)
    if gene_mask is None:
        return None
    mask = np.asarray(gene_mask)
    if mask.dtype != bool or mask.ndim != 1:
        msg = f"gene_mask must be a 1-d boolean array, found dtype {mask.dtype} shape {mask.shape}"
        raise ValueError(msg)
    if mask.shape[0] != inp.n_vars:
        msg = f"gene_mask has {mask.shape[0]} entries but the data has {inp.n_vars} genes"
        raise ValueError(msg)
    if not mask.any():
        msg = f"gene_mask selects 0 of {inp.n_vars} genes"
        raise ValueError(msg)
    return np.flatnonzero(mask)


def _gene_names(inp: _Input, genes, gene_key, columns) -> np.ndarray:
    n_vars = inp.n_vars
    n_genes = n_vars if columns is None else len(columns)
    if genes is not None:
        names = np.asarray(genes).astype(str)
        if names.shape[0] == n_vars and columns is not None:
            names = names[columns]
        elif names.shape[0] != n_genes:
            msg = f"genes has {names.shape[0]} entries; expected {n_genes} (or {n_vars} before the mask)"
            raise ValueError(msg)
    elif inp.adata is not None:
        var = inp.adata.var
        if gene_key is not None:
            if gene_key not in var.columns:
                msg = f"gene_key column {gene_key!r} not found in adata.var; columns: {describe(var.columns)}"
                raise ValueError(msg)
            names = var[gene_key].astype(str).to_numpy()
        else:
            names = np.asarray(inp.adata.var_names).astype(str)
        if columns is not None:
            names = names[columns]
    else:
        names = np.asarray([f"gene_{j}" for j in range(n_genes)])
    _refuse_duplicates(names, genes, gene_key)
    return names


def _refuse_duplicates(names: np.ndarray, genes, gene_key) -> None:
    uniq, counts = np.unique(names, return_counts=True)
    if not (counts > 1).any():
        return
    dup = uniq[counts > 1]
    source = (
        "genes" if genes is not None
        else f"adata.var[{gene_key!r}]" if gene_key is not None
        else "adata.var_names"
    )
    msg = (
        f"gene names must be unique (a model maps genes by name), but {source} has "
        f"{int(dup.size)} duplicated name(s) among the {len(names)} genes kept: "
        f"{describe(dup)}; make them unique first (adata.var_names_make_unique(), or "
        "read_10x_* with make_unique=True) or choose another gene_key"
    )
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# Stage 4: layout (chunks, dtype)
# --------------------------------------------------------------------------------------------


def _chunking(chunk_size, n_genes: int) -> tuple[int | None, int]:
    """(chunk rows or None for the default, chunk columns)."""
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
    return chunk_rows, chunk_cols


def _count_dtype(source: _Source, silent: bool) -> np.dtype:
    """The smallest dtype that stores the counts exactly (float32 for non-integer values)."""
    vmax, integer = _scan_values(source, silent)
    if not integer:
        warnings.warn(
            "counts contain non-integer values (normalized data?); storing float32. ginseng "
            "expects raw counts: normalization is part of the model.",
            UserWarning,
            stacklevel=4,
        )
        return np.dtype(np.float32)
    if vmax < 2**16:
        return np.dtype(np.uint16)
    if vmax < 2**32:
        return np.dtype(np.uint32)
    return np.dtype(np.float32)


# --------------------------------------------------------------------------------------------
# Stage 5: write
# --------------------------------------------------------------------------------------------


def _write_store(write_counts, tmp: Path, source: _Source, obs, gene_names, layout: dict) -> None:
    """Every array and attribute of the store, into ``tmp``; ``complete`` is written last."""
    label_codes, label_values, group_codes, group_values = obs
    n_cells, n_genes = source.n_rows, source.n_cols
    dtype, chunk_rows, order = layout["dtype"], layout["chunk_rows"], layout["order"]
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
            "shuffled": bool(layout["shuffle"]),
            "seed": int(layout["seed"]),
            "split": None,
            ALL_CHUNKS_ATTR: True,
        }
    )
    xa = root.create_array(
        "X", shape=(n_cells, n_genes), chunks=(chunk_rows, layout["chunk_cols"]), dtype=dtype,
        compressors=codec(), fill_value=0, config=ARRAY_CONFIG,
    )
    write_counts(xa, source, order, dtype, chunk_rows, layout["silent"], tmp / ".spill")
    shutil.rmtree(tmp / ".spill", ignore_errors=True)
    one_chunk = {"chunks": (max(1, n_cells),), "config": ARRAY_CONFIG}
    root.create_array("order", data=order, **one_chunk)
    root.create_array("labels", data=label_codes, **one_chunk)
    write_label_values(root, label_values)
    write_str_array(root, "genes", gene_names)
    if group_codes is not None:
        root.create_array("group_codes", data=group_codes, **one_chunk)
        write_str_array(root, "group_values", group_values)
    # Written last: a store without it is refused on open.
    root.attrs["complete"] = True


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        msg = f"dataset path {str(path)!r} already exists; pass overwrite=True to replace it"
        raise FileExistsError(msg)
    if read_attrs(path) is None:
        msg = (
            f"{str(path)!r} exists and is not a ginseng dataset; refusing to replace it even "
            "with overwrite=True. Choose another path or remove it yourself."
        )
        raise FileExistsError(msg)


def create_dataset(cls, path, adata, labels, chunk_size=None, groups=None, gene_key=None,
                   gene_mask=None, layer=None, *, genes=None, cells=None, shuffle=True, seed=0,
                   overwrite=False, silent=False):
    """``GinsengDataset.create`` (see its docstring); ``cls`` opens the finished store."""
    path = Path(path)
    _refuse_existing(path, overwrite)
    inp = _resolve_counts(adata, layer, gene_key)
    cells = _check_cells(cells, inp.n_cells)
    obs = _resolve_obs(inp, labels, groups, cells)
    columns = _gene_columns(inp, gene_mask)
    gene_names = _gene_names(inp, genes, gene_key, columns)
    chunk_rows, chunk_cols = _chunking(chunk_size, len(gene_names))
    source = _Source(inp.X, columns, cells)
    n_cells = source.n_rows
    dtype = _count_dtype(source, silent)
    if chunk_rows is None:
        chunk_rows = auto_chunk_rows(chunk_cols, dtype.itemsize)
    order = np.random.default_rng(seed).permutation(n_cells) if shuffle else np.arange(n_cells)
    layout = {
        "dtype": dtype, "chunk_rows": min(chunk_rows, max(1, n_cells)), "chunk_cols": chunk_cols,
        "order": order.astype(np.int64), "shuffle": shuffle, "seed": seed, "silent": silent,
    }
    with atomic_path(
        path, overwrite=overwrite, what="dataset", kind="dir",
        replaceable=lambda p: read_attrs(p) is not None,
    ) as tmp:
        _write_store(cls._write_permuted, tmp, source, obs, gene_names, layout)
    return cls(path)


# --------------------------------------------------------------------------------------------
# Writing the permuted counts
# --------------------------------------------------------------------------------------------


def _dense(rows, dtype):
    rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
    return rows.astype(dtype, copy=False)


def _rank(order: np.ndarray) -> np.ndarray:
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size, dtype=np.int64)
    return rank


def write_permuted(xa, source: _Source, order, dtype, chunk_rows: int, silent: bool, spill_dir: Path) -> None:
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
    run = max(1, _WRITE_BUFFER_BYTES // max(1, n_genes * dtype.itemsize) // chunk_rows) * chunk_rows
    n_runs = math.ceil(n_cells / run)
    if n_runs == 1 or (not source.in_memory and n_runs <= _SPILL_MIN_RUNS):
        _write_streamed(xa, source, order, dtype, run, silent)
    elif source.in_memory:
        for s0 in tqdm(
            range(0, n_cells, run), desc="writing counts", disable=bar_disabled(silent, -(-n_cells // run)), unit="run"
        ):
            s1 = min(n_cells, s0 + run)
            xa[s0:s1] = _dense(source.rows(order[s0:s1]), dtype)
    else:
        _write_spilled(xa, source, order, dtype, chunk_rows, run, silent, spill_dir)


def _write_streamed(xa, source: _Source, order, dtype, run: int, silent: bool) -> None:
    """One streaming pass over the input per run of stored rows, keeping that run's rows."""
    n_cells, n_genes = xa.shape
    n_runs = math.ceil(n_cells / run)
    rank = _rank(order)
    for r, s0 in enumerate(range(0, n_cells, run)):
        s1 = min(n_cells, s0 + run)
        buf = np.zeros((s1 - s0, n_genes), dtype=dtype)
        desc = "writing counts" if n_runs == 1 else f"writing counts ({r + 1}/{n_runs})"
        for start, blk in source.blocks(desc, silent):
            dest = rank[start : start + blk.shape[0]]
            sel = np.flatnonzero((dest >= s0) & (dest < s1))
            if sel.size:
                buf[dest[sel] - s0] = _dense(blk[sel], dtype)
        xa[s0:s1] = buf
        del buf


class _Buckets:
    """The spill store, one contiguous bucket of rows per run, filled whole chunk by whole chunk.

    Input row i goes to bucket rank[i] // run; within a bucket rows keep input order, so spill row
    p holds input row by_bucket[p] and is stored at rank[by_bucket[p]].
    """

    def __init__(self, spill, rank, run: int, n_runs: int, chunk_rows: int):
        self.spill, self.chunk_rows, self.n_runs = spill, chunk_rows, n_runs
        self.bucket = rank // run
        self.by_bucket = np.argsort(self.bucket, kind="stable")
        self.bounds = np.searchsorted(self.bucket[self.by_bucket], np.arange(n_runs + 1))
        self.fill = self.bounds[:-1].copy()  # next spill row of each bucket
        self.pending: list[list[np.ndarray]] = [[] for _ in range(n_runs)]
        self.n_pending = np.zeros(n_runs, dtype=np.int64)

    def flush(self, b: int, final: bool) -> None:
        pending = self.pending[b]
        rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
        n = rows.shape[0] if final else (rows.shape[0] // self.chunk_rows) * self.chunk_rows
        if n:
            self.spill[self.fill[b] : self.fill[b] + n] = rows[:n]
            self.fill[b] += n
        self.pending[b] = [rows[n:]] if n < rows.shape[0] else []
        self.n_pending[b] = rows.shape[0] - n

    def add(self, start: int, blk, dtype) -> None:
        """Rows [start, start + len(blk)) of the input, each to its bucket."""
        b_of = self.bucket[start : start + blk.shape[0]]
        sorted_rows = np.argsort(b_of, kind="stable")
        cuts = np.searchsorted(b_of[sorted_rows], np.arange(self.n_runs + 1))
        for b in np.flatnonzero(np.diff(cuts)):
            rows = _dense(blk[sorted_rows[cuts[b] : cuts[b + 1]]], dtype)
            self.pending[b].append(rows)
            self.n_pending[b] += rows.shape[0]
            if self.n_pending[b] >= self.chunk_rows:
                self.flush(b, final=False)

    def finish(self) -> None:
        for b in np.flatnonzero(self.n_pending):
            self.flush(b, final=True)
        if not np.array_equal(self.fill, self.bounds[1:]):
            msg = "internal: the spill buckets were not filled exactly"
            raise RuntimeError(msg)


def _write_spilled(xa, source: _Source, order, dtype, chunk_rows: int, run: int, silent: bool,
                   spill_dir: Path) -> None:
    """Bucket sort through a spill store: two passes over the data whatever its size."""
    n_cells, n_genes = xa.shape
    n_runs = math.ceil(n_cells / run)
    rank = _rank(order)
    spill = zarr.create_array(
        zarr.storage.LocalStore(spill_dir), shape=(n_cells, n_genes), chunks=(chunk_rows, n_genes),
        dtype=dtype, compressors=codec(), fill_value=0,
    )
    buckets = _Buckets(spill, rank, run, n_runs, chunk_rows)
    for start, blk in source.blocks("writing counts (1/2: bucket)", silent):
        buckets.add(start, blk, dtype)
    buckets.finish()
    bounds, by_bucket = buckets.bounds, buckets.by_bucket
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
