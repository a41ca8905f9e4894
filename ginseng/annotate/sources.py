"""Sources: one class per input kind, each reading contiguous row blocks aligned to the model.

- :class:`AnnDataSource`: an AnnData in memory or backed (also one read from a path); CSR (in
  memory or backed) is sliced by rows and scattered into the model's gene order, dense is sliced
  and its columns selected. Only the block is ever densified.
- :class:`H5adSource`: a backed .h5ad read with h5py alone (counts, genes and barcodes), when
  nothing else of the file is needed: anndata's backed mode still loads all of ``obs``.
- :class:`DatasetSource`: a GinsengDataset, read in storage order when that is allowed (each
  chunk once), its results put back at every cell's original index.

Every source has ``n_cells`` (the cells annotated), ``genes``, ``read(a, b, out)`` of annotated
positions ``[a, b)``, ``barcodes(a, b)``, ``truth(key)``, ``stored_order`` (None, or the original
index of every position) and ``close()`` (closes only what annotate opened itself).
"""

from __future__ import annotations

import contextlib
import os
import types
import weakref
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ginseng.annotate.genes import GeneMap, input_gene_names, map_genes
from ginseng.utils import _check_cells, _layer_names, _row_block

__all__ = ["AnnDataSource", "DatasetSource", "H5adSource", "open_source"]


def _is_ginseng_dataset(obj) -> bool:
    try:
        from ginseng.data import GinsengDataset
    except ImportError:
        return False
    return isinstance(obj, GinsengDataset)


def _place_dense(gmap: GeneMap, block: np.ndarray, out: np.ndarray, n: int) -> None:
    if gmap.identity:
        out[:n] = block
    else:
        out[:n, gmap.dst] = block[:, gmap.src]


class AnnDataSource:
    """An AnnData (in memory, backed, or read from a path by annotate: ``opened``)."""

    stored_order = None

    def __init__(self, adata, kind: str = "adata"):
        self.adata = adata
        self.kind = kind  # "adata", "backed" or "path"
        self.n_obs = int(adata.n_obs)
        self.cells = None  # annotated rows (sorted), None: all
        self.n_cells = self.n_obs
        self.gmap = None

    # ---- set-up ----
    def check_layer(self, layer: str | None) -> None:
        if layer is not None and layer not in self.adata.layers:
            msg = f"layer {layer!r} not found in adata.layers; available: {_layer_names(self.adata)}"
            raise ValueError(msg)

    def map_genes(self, model_genes, gene_key, min_overlap) -> GeneMap:
        a = self.adata
        genes = input_gene_names(a.var, a.var_names, gene_key)
        return map_genes(genes, model_genes, gene_key=gene_key, var_columns=a.var.columns, min_overlap=min_overlap,
                         stacklevel=6)

    def select(self, cells) -> None:
        """Annotate only ``cells`` (row indices or a mask) of the input."""
        if cells is not None:
            self.cells = _check_cells(cells, self.n_obs)
            self.n_cells = int(self.cells.size)

    def open_reader(self, gmap: GeneMap, layer: str | None) -> None:
        """Prepare reading: the count matrix, the column lookup of the sparse scatter."""
        source = self.adata
        X = source.X if layer is None else source.layers[layer]
        if X is None:
            msg = "adata.X is None; annotate needs counts in adata.X (or pass layer=)"
            raise ValueError(msg)
        if sp.issparse(X) and not sp.isspmatrix_csr(X) and not isinstance(X, sp.csr_array):
            # Row blocks of a CSC (or COO) matrix are slow to cut: convert once (in memory anyway).
            X = sp.csr_matrix(X)
        self.X, self.gmap = X, gmap
        # Backed CSR in HDF5: read the three arrays directly (less than half the time of
        # anndata's row slicing, which matters when the reader shares the cores with compute).
        self._h5 = None
        group = getattr(X, "group", None)
        if isinstance(group, h5py.Group) and getattr(X, "format", None) == "csr":
            self._h5 = (group["data"], group["indices"], group["indptr"])
        # Column lookup for the sparse scatter: input column -> model position (-1: unused).
        self.colmap = np.full(int(source.n_vars), -1, dtype=np.int64)
        self.colmap[gmap.src] = gmap.dst

    # ---- reading ----
    def _rows(self, a: int, b: int):
        if self.cells is not None:
            return _row_block(self.X, a, b, self.cells)
        if self._h5 is not None:
            data, indices, indptr = self._h5
            ptr = indptr[a : b + 1].astype(np.int64)
            s0, s1 = int(ptr[0]), int(ptr[-1])
            return sp.csr_matrix((data[s0:s1], indices[s0:s1], ptr - s0), shape=(b - a, len(self.colmap)))
        return self.X[a:b]

    def read(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Positions [a, b) as a dense float32 block (b - a, n_model_genes)."""
        n, g = b - a, self.gmap
        if out is None:
            out = np.zeros((n, g.n_model), dtype=np.float32)
        else:
            out[:n] = 0.0
        if n == 0:
            return out[:0]
        blk = self._rows(a, b)
        if not sp.issparse(blk):
            _place_dense(g, np.asarray(blk), out, n)
            return out[:n]
        blk = self._mapped(blk)
        blk.toarray(out=out[:n])  # out is zeroed above: toarray accumulates into it
        return out[:n]

    def _mapped(self, blk) -> sp.csr_matrix:
        """A sparse block as float32 CSR over the model's genes in model order (unused input
        genes dropped); scipy's C loops then densify it, adding duplicates as a sum should."""
        g, n = self.gmap, blk.shape[0]
        blk = sp.csr_matrix(blk)
        if blk.dtype != np.float32:  # integer counts: toarray needs a matching out dtype
            blk = blk.astype(np.float32)
        if g.identity:
            return blk
        cols = self.colmap[blk.indices]
        keep = cols >= 0
        if keep.all():
            return sp.csr_matrix((blk.data, cols, blk.indptr), shape=(n, g.n_model))
        kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        return sp.csr_matrix((blk.data[keep], cols[keep], kept[blk.indptr]), shape=(n, g.n_model))

    def read_compact(self, a: int, b: int):
        """Positions [a, b) as their non-zero model-gene entries ``(rows, cols, vals)`` (rows
        counted from a, in row order), for the devices to densify; None for a dense input."""
        if b <= a:
            return None
        blk = self._rows(a, b)
        if not sp.issparse(blk):
            return None
        blk = self._mapped(blk)
        rows = np.repeat(np.arange(b - a, dtype=np.int32), np.diff(blk.indptr))
        return rows, blk.indices.astype(np.int32), blk.data

    def _input_barcodes(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self.adata.obs_names[a:b]).astype(str)

    def barcodes(self, a: int, b: int) -> np.ndarray:
        """Barcodes of positions [a, b)."""
        if self.cells is None:
            return self._input_barcodes(a, b)
        rows = self.cells[a:b]
        if rows.size == 0:
            return np.zeros(0, dtype=str)
        return np.asarray(self._input_barcodes(int(rows[0]), int(rows[-1]) + 1))[rows - rows[0]]

    def _obs_column(self, key: str, what: str) -> np.ndarray:
        """An obs column's values, refused by name (``what``: the argument) when it is absent."""
        obs = self.adata.obs
        if key not in obs.columns:
            msg = f"{what} {key!r} is not a column of adata.obs; available columns: {list(map(str, obs.columns))}"
            raise ValueError(msg)
        return np.asarray(obs[key])

    def truth(self, truth_key: str) -> tuple[np.ndarray, list[str]]:
        """(code of every annotated cell, the true labels) from an obs column."""
        truth = self._obs_column(truth_key, "truth_key")
        if self.cells is not None:  # only the labels of the cells annotated are reported
            truth = truth[self.cells]
        cat = pd.Categorical(truth.astype(str))
        return cat.codes.astype(np.int64), [str(c) for c in cat.categories]

    def clusters(self, over_clustering) -> np.ndarray:
        """The cluster code of every annotated cell (-1: missing) from an obs column, or from an
        array of one cluster label per row of the input."""
        if isinstance(over_clustering, str):
            values = self._obs_column(over_clustering, "over_clustering")
        else:
            values = np.asarray(over_clustering)
            if values.ndim != 1 or len(values) != self.n_obs:
                msg = (
                    f"over_clustering must be an obs column name or one cluster label per cell "
                    f"({self.n_obs} values), got an array of shape {values.shape}"
                )
                raise ValueError(msg)
        if self.cells is not None:
            values = values[self.cells]
        return pd.Categorical(values).codes.astype(np.int64)

    def close(self) -> None:
        """Close a file that annotate opened itself (never an AnnData the caller passed)."""
        if self.kind == "path" and getattr(self.adata, "isbacked", False):
            with contextlib.suppress(Exception):
                self.adata.file.close()


class _H5adStream:
    """A backed .h5ad read with h5py alone: counts streamed, barcodes read block by block.

    anndata's backed mode still loads all of ``obs`` (for a million cells, ~100 MB of Python
    strings plus an index hash table), which makes memory grow with the number of cells. When
    nothing but the counts, the genes and the barcodes is needed, this reads just those.
    """

    def __init__(self, path: Path):
        from anndata.io import read_elem

        self.file = h5py.File(path, "r")
        self._finalizer = weakref.finalize(self, self.file.close)
        try:
            X = self.file["X"]
            if isinstance(X, h5py.Group):
                if X.attrs.get("encoding-type") != "csr_matrix":
                    msg = f"X is {X.attrs.get('encoding-type')!r}, not CSR"
                    raise ValueError(msg)
                self.X = types.SimpleNamespace(group=X, format="csr")
                self.n_obs, self.n_vars = (int(v) for v in X.attrs["shape"])
            else:
                self.X = X
                self.n_obs, self.n_vars = (int(v) for v in X.shape)
            self.var = read_elem(self.file["var"])
            self.var_names = self.var.index
            obs = self.file["obs"]
            self._barcodes = obs[obs.attrs["_index"]]
            if self._barcodes.shape != (self.n_obs,) or self.var.shape[0] != self.n_vars:
                msg = "obs / var do not match X"
                raise ValueError(msg)
        except Exception:
            self.close()
            raise

    def barcodes(self, a: int, b: int) -> np.ndarray:
        ds = self._barcodes
        vals = ds.asstr()[a:b] if h5py.check_string_dtype(ds.dtype) else ds[a:b]
        return np.asarray(vals).astype(str)

    def close(self) -> None:
        self._finalizer()



class H5adSource(AnnDataSource):
    """A backed .h5ad path read with h5py alone (:class:`_H5adStream`)."""

    def __init__(self, stream: _H5adStream):
        super().__init__(stream, kind="h5ad")

    def _input_barcodes(self, a: int, b: int) -> np.ndarray:
        return self.adata.barcodes(a, b)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.adata.close()


class DatasetSource:
    """A GinsengDataset; positions are original cells, or stored rows with ``in_storage_order``."""

    kind = "dataset"

    def __init__(self, dataset):
        self.dataset = dataset
        self.n_obs = self.n_cells = int(dataset.n_cells)
        self.stored_order = None
        self.gmap = None

    def check_layer(self, layer: str | None) -> None:
        if layer is not None:
            msg = f"layer={layer!r} does not apply to a GinsengDataset (it stores one count matrix)"
            raise ValueError(msg)

    def map_genes(self, model_genes, gene_key, min_overlap) -> GeneMap:
        if gene_key is not None:
            msg = f"gene_key={gene_key!r} does not apply to a GinsengDataset (its genes are fixed)"
            raise ValueError(msg)
        genes = np.asarray(self.dataset.genes).astype(str)
        return map_genes(genes, model_genes, var_columns=(), min_overlap=min_overlap, stacklevel=6)

    def select(self, cells) -> None:
        if cells is not None:
            msg = "cells= applies to an AnnData input; a GinsengDataset is annotated whole"
            raise ValueError(msg)

    def open_reader(self, gmap: GeneMap, layer: str | None) -> None:
        self.gmap = gmap

    def in_storage_order(self) -> None:
        """Read stored rows in order (each chunk once); ``stored_order`` maps them back.

        A GinsengDataset stores its rows in a random permutation, so original rows [a, b) are
        spread over as many chunks as rows.
        """
        self.stored_order = np.asarray(self.dataset._order, dtype=np.int64)

    def read(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        n = b - a
        if out is None:
            out = np.zeros((n, self.gmap.n_model), dtype=np.float32)
        else:
            out[:n] = 0.0
        if n == 0:
            return out[:0]
        rows = np.arange(a, b, dtype=np.int64)
        if self.stored_order is not None:
            block = np.asarray(self.dataset._read_stored(rows), dtype=np.float32)
        else:
            block = np.asarray(self.dataset.get_batch(rows), dtype=np.float32)
        _place_dense(self.gmap, block, out, n)
        return out[:n]

    def barcodes(self, a: int, b: int) -> np.ndarray:
        return np.arange(a, b).astype(str)

    def truth(self, truth_key: str) -> tuple[np.ndarray, list[str]]:
        if truth_key != "labels":
            msg = f"for a GinsengDataset truth_key must be 'labels' (its label column), got {truth_key!r}"
            raise ValueError(msg)
        return np.asarray(self.dataset.labels), [str(v) for v in self.dataset.label_values]

    def clusters(self, over_clustering) -> np.ndarray:
        if isinstance(over_clustering, str):
            msg = (
                f"over_clustering={over_clustering!r} names an obs column, and a GinsengDataset "
                "has no obs: pass one cluster label per cell (an array) instead"
            )
            raise ValueError(msg)  # noqa: TRY004 - a bad value, as for an AnnData
        values = np.asarray(over_clustering)
        if values.ndim != 1 or len(values) != self.n_cells:
            msg = (f"over_clustering must hold one cluster label per cell ({self.n_cells} values), "
                   f"got an array of shape {values.shape}")
            raise ValueError(msg)
        return pd.Categorical(values).codes.astype(np.int64)

    def close(self) -> None:
        """The caller's dataset stays open."""


def open_source(adata, backed: bool, light: bool = False):
    """The source of an input: an AnnData, a GinsengDataset or a path.

    ``light``: a backed .h5ad path may be read with h5py alone (:class:`H5adSource`) when the
    caller needs no obs column and no AnnData back.
    """
    if isinstance(adata, anndata.AnnData):
        return AnnDataSource(adata, "backed" if adata.isbacked else "adata")
    if _is_ginseng_dataset(adata):
        return DatasetSource(adata)
    if isinstance(adata, (str, os.PathLike)):
        from ginseng.io import read_adata

        path = Path(adata)
        if light and backed and path.suffix.lower() == ".h5ad" and path.is_file():
            with contextlib.suppress(Exception):  # any other layout: anndata reads it
                return H5adSource(_H5adStream(path))
        return AnnDataSource(read_adata(path, backed=backed), "path")
    msg = f"adata must be an AnnData, a GinsengDataset or a path, got {type(adata).__name__}"
    raise TypeError(msg)
