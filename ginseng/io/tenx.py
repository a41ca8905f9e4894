"""Readers of 10x Genomics output: the mtx folder (v2 and v3) and the HDF5 file (v2 and v3)."""

from __future__ import annotations

import gzip
import inspect
import os
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from ginseng._core import h5tree as _h5tree
from ginseng.io.genes import make_names_unique

__all__ = ["read_10x_h5", "read_10x_mtx"]

_VAR_NAMES = ("gene_symbols", "gene_ids")


def _check_var_names(var_names: str) -> None:
    if var_names not in _VAR_NAMES:
        msg = f"var_names must be one of {list(_VAR_NAMES)}, got {var_names!r}"
        raise ValueError(msg)


def _build_adata(
    X: sp.csr_matrix,
    barcodes: np.ndarray,
    gene_ids: np.ndarray,
    gene_symbols: np.ndarray,
    feature_types: np.ndarray | None,
    var_names: str,
    make_unique: bool,
    extra_var: dict | None = None,
) -> anndata.AnnData:
    index = gene_symbols if var_names == "gene_symbols" else gene_ids
    index = make_names_unique(index) if make_unique else np.asarray(index, dtype=object)
    var = {
        "gene_ids": np.asarray(gene_ids, dtype=object),
        "gene_symbols": np.asarray(gene_symbols, dtype=object),
    }
    if feature_types is not None:
        var["feature_types"] = np.asarray(feature_types, dtype=object)
    var.update(extra_var or {})
    var_df = pd.DataFrame(var, index=pd.Index(index, dtype=object))
    obs_df = pd.DataFrame(index=pd.Index(np.asarray(barcodes, dtype=object), dtype=object))
    return anndata.AnnData(X=X, obs=obs_df, var=var_df)


# --------------------------------------------------------------------------------------------
# 10x mtx
# --------------------------------------------------------------------------------------------


def _find_file(folder: Path, candidates: tuple[str, ...]) -> Path | None:
    for name in candidates:
        p = folder / name
        if p.is_file():
            return p
    return None


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_tsv(path: Path) -> list[list[str]]:
    with _open_text(path) as fh:
        return [line.rstrip("\n").rstrip("\r").split("\t") for line in fh if line.strip()]


def read_10x_mtx(
    path: str | os.PathLike, var_names: str = "gene_symbols", make_unique: bool = True
) -> anndata.AnnData:
    """Read 10x Genomics mtx format into an AnnData object.

    Both Cell Ranger layouts are read: v2 (``matrix.mtx``, ``genes.tsv`` with columns id and
    symbol, ``barcodes.tsv``) and v3+ (``matrix.mtx.gz``, ``features.tsv.gz`` with columns id,
    symbol and feature type, ``barcodes.tsv.gz``); each file may or may not be gzipped.

    Parameters
    ----------
    path : str
        Path to directory containing matrix.mtx, barcodes.tsv, and genes.tsv/features.tsv.
    var_names : str
        Select 'gene_symbols' or 'gene_ids' as index for var.
    make_unique : bool
        If True, make var_names unique.

    Returns
    -------
    AnnData
        Cells x genes, ``X`` a float32 CSR matrix, ``obs_names`` the barcodes, ``var`` with
        columns ``gene_ids``, ``gene_symbols`` (and ``feature_types`` for v3+).
    """
    _check_var_names(var_names)
    folder = Path(path)
    if not folder.is_dir():
        msg = f"10x mtx directory {str(folder)!r} does not exist or is not a directory"
        raise FileNotFoundError(msg)
    wanted = {
        "matrix": ("matrix.mtx.gz", "matrix.mtx"),
        "barcodes": ("barcodes.tsv.gz", "barcodes.tsv"),
        "features": ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
    }
    found = {key: _find_file(folder, names) for key, names in wanted.items()}
    missing = [f"{key} ({' or '.join(wanted[key])})" for key, p in found.items() if p is None]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        msg = (
            f"10x mtx directory {str(folder)!r} is missing: {', '.join(missing)}; "
            f"it contains {present}"
        )
        raise FileNotFoundError(msg)

    # A sparse array where scipy can say so (>= 1.17; its default changes in 1.20): either way it
    # becomes a CSR matrix below.
    mm_kw = {"spmatrix": False} if "spmatrix" in inspect.signature(scipy.io.mmread).parameters else {}
    try:
        if found["matrix"].name.endswith(".gz"):
            with gzip.open(found["matrix"], "rb") as fh:
                m = scipy.io.mmread(fh, **mm_kw)
        else:
            m = scipy.io.mmread(found["matrix"], **mm_kw)
    except (OSError, ValueError, EOFError) as err:
        msg = f"could not read Matrix Market file {str(found['matrix'])!r}: {err}"
        raise ValueError(msg) from err
    # The file is genes x cells; AnnData wants cells x genes.
    X = sp.csr_matrix(sp.coo_matrix(m).T, dtype=np.float32)

    barcodes = np.asarray([row[0] for row in _read_tsv(found["barcodes"])], dtype=object)
    rows = _read_tsv(found["features"])
    n_cols = {len(r) for r in rows}
    if rows and min(n_cols) < 2:
        msg = (
            f"{str(found['features'])!r} must have at least 2 tab-separated columns (id, symbol), "
            f"found rows with {sorted(n_cols)} columns"
        )
        raise ValueError(msg)
    gene_ids = np.asarray([r[0] for r in rows], dtype=object)
    gene_symbols = np.asarray([r[1] for r in rows], dtype=object)
    feature_types = (
        np.asarray([r[2] for r in rows], dtype=object) if rows and min(n_cols) >= 3 else None
    )

    if X.shape != (len(barcodes), len(gene_ids)):
        msg = (
            f"10x mtx directory {str(folder)!r} is inconsistent: the matrix is "
            f"{X.shape[1]} genes x {X.shape[0]} cells but there are {len(gene_ids)} features "
            f"in {found['features'].name} and {len(barcodes)} barcodes in {found['barcodes'].name}"
        )
        raise ValueError(msg)
    return _build_adata(X, barcodes, gene_ids, gene_symbols, feature_types, var_names, make_unique)


# --------------------------------------------------------------------------------------------
# 10x h5
# --------------------------------------------------------------------------------------------


def _strings(ds: h5py.Dataset) -> np.ndarray:
    values = ds[()]
    return np.asarray(
        [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object
    )


def _csc_group_to_csr(group: h5py.Group, path: Path) -> sp.csr_matrix:
    for key in ("data", "indices", "indptr", "shape"):
        if key not in group:
            msg = f"10x h5 file {str(path)!r}: group {group.name!r} has no {key!r} dataset"
            raise ValueError(msg)
    n_genes, n_cells = (int(v) for v in group["shape"][()])
    # Stored as CSC genes x cells; the same three arrays are CSR cells x genes.
    return sp.csr_matrix(
        (
            group["data"][()].astype(np.float32, copy=False),
            group["indices"][()],
            group["indptr"][()],
        ),
        shape=(n_cells, n_genes),
    )


def read_10x_h5(
    path: str | os.PathLike,
    genome: str | None = None,
    var_names: str = "gene_symbols",
    make_unique: bool = True,
) -> anndata.AnnData:
    """Read 10x Genomics h5 format into an AnnData object.

    Both Cell Ranger layouts are read: v2 (one group per genome holding ``data``, ``indices``,
    ``indptr``, ``shape``, ``barcodes``, ``gene_names``, ``genes``) and v3+ (a ``matrix`` group
    with ``features/{id,name,feature_type,genome}``).

    Parameters
    ----------
    path : str
        Path to 10x Genomics .h5 file.
    genome : str, optional
        Genome to extract (if file contains multiple genomes). If None, will use the first genome
        available (v2); for v3+ files None keeps every feature, and a name keeps the features
        of that genome.
    var_names : str
        Select 'gene_symbols' or 'gene_ids' as index for var.
    make_unique : bool
        If True, make var_names unique.

    Returns
    -------
    AnnData
        Cells x genes, ``X`` a float32 CSR matrix, ``obs_names`` the barcodes, ``var`` with
        columns ``gene_ids``, ``gene_symbols`` (and ``feature_types``, ``genome`` for v3+).
    """
    _check_var_names(var_names)
    path = Path(path)
    if not path.is_file():
        msg = f"10x h5 file {str(path)!r} does not exist"
        raise FileNotFoundError(msg)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        msg = f"{str(path)!r} is not a readable HDF5 file (truncated or corrupted?): {err}"
        raise ValueError(msg) from err
    try:
        with f:
            if isinstance(f.get("matrix"), h5py.Group) and "features" in f["matrix"]:
                return _read_10x_h5_v3(f, path, genome, var_names, make_unique)
            return _read_10x_h5_v2(f, path, genome, var_names, make_unique)
    except (OSError, KeyError) as err:
        msg = f"could not read 10x h5 file {str(path)!r} (truncated or corrupted?): {err}"
        raise ValueError(msg) from err


def _read_10x_h5_v2(f, path, genome, var_names, make_unique):
    # Names first, then each member by name: never an h5py iterator suspended across a read.
    genomes = [
        k for k in _h5tree.names(f) if isinstance(f[k], h5py.Group) and "indptr" in f[k] and "data" in f[k]
    ]
    if not genomes:
        msg = (
            f"{str(path)!r} is not a 10x Genomics h5 file: expected a 'matrix' group (Cell Ranger "
            f"v3+) or a genome group with data/indices/indptr/shape (v2); found keys {list(f.keys())}"
        )
        raise ValueError(msg)
    if genome is None:
        genome = genomes[0]
    elif genome not in genomes:
        msg = f"genome {genome!r} is not in 10x h5 file {str(path)!r}; available genomes: {genomes}"
        raise ValueError(msg)
    g = f[genome]
    X = _csc_group_to_csr(g, path)
    return _build_adata(
        X,
        _strings(g["barcodes"]),
        _strings(g["genes"]),
        _strings(g["gene_names"]),
        None,
        var_names,
        make_unique,
    )


def _read_10x_h5_v3(f, path, genome, var_names, make_unique):
    g = f["matrix"]
    feats = g["features"]
    X = _csc_group_to_csr(g, path)
    gene_ids = _strings(feats["id"])
    gene_symbols = _strings(feats["name"])
    feature_types = _strings(feats["feature_type"]) if "feature_type" in feats else None
    genomes_col = _strings(feats["genome"]) if "genome" in feats else None
    if genome is not None:
        available = list(dict.fromkeys(genomes_col.tolist())) if genomes_col is not None else []
        if genome not in available:
            msg = f"genome {genome!r} is not in 10x h5 file {str(path)!r}; available genomes: {available}"
            raise ValueError(msg)
        keep = np.flatnonzero(genomes_col == genome)
        X = X[:, keep]
        gene_ids, gene_symbols, genomes_col = gene_ids[keep], gene_symbols[keep], genomes_col[keep]
        if feature_types is not None:
            feature_types = feature_types[keep]
    extra = {"genome": genomes_col} if genomes_col is not None else None
    return _build_adata(
        X,
        _strings(g["barcodes"]),
        gene_ids,
        gene_symbols,
        feature_types,
        var_names,
        make_unique,
        extra,
    )

