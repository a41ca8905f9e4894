"""Readers for single-cell count files (h5ad, 10x h5, 10x mtx) and ginseng model files.

Model files are HDF5 with no pickle: every parameter is a dataset under its tree path
(``params/features1/W``), strings are UTF-8 datasets, and the scalar settings are attributes.
The file records ``format="ginseng.model"`` and ``format_version`` so that a future layout is
refused with a message instead of being misread, and ``sha256``, a digest of everything the
model is made of, so that bytes damaged inside a parameter (which HDF5 itself reads without
complaint) are refused instead of silently changing predictions. Opening a model file never
runs code.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import anndata
import h5py
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from ginseng._core import h5tree as _h5tree
from ginseng._core.files import atomic_path
from ginseng._core.h5tree import DamagedError, read_tree, write_tree
from ginseng.state import GinsengModelState

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "detect_gene_id_kind",
    "load_ginseng_state",
    "make_names_unique",
    "read_10x_h5",
    "read_10x_mtx",
    "read_adata",
    "save_ginseng_state",
]

MODEL_FORMAT = "ginseng.model"
MODEL_FORMAT_VERSION = 1

_VAR_NAMES = ("gene_symbols", "gene_ids")
_SUPPORTED_INPUTS = "an AnnData '.h5ad' file, a 10x Genomics '.h5' file, or a 10x mtx directory"
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")


# --------------------------------------------------------------------------------------------
# Gene names
# --------------------------------------------------------------------------------------------


def make_names_unique(names: Iterable[str], join: str = "-") -> np.ndarray:
    """Make names unique the way ``AnnData.var_names_make_unique`` does.

    The first occurrence of a name is kept; later ones get ``-1``, ``-2``, ... appended, skipping
    any suffix that would collide with a name already present.

    Parameters
    ----------
    names : Iterable[str]
        Names, possibly with duplicates.
    join : str
        Separator between a name and its counter.

    Returns
    -------
    np.ndarray
        Unique names (object dtype), same order and length as ``names``.
    """
    names = [str(n) for n in names]
    out = list(names)
    taken = set(names)
    counters: dict[str, int] = {}
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name not in seen:
            seen.add(name)
            continue
        k = counters.get(name, 0)
        while True:
            k += 1
            candidate = f"{name}{join}{k}"
            if candidate not in taken:
                break
        counters[name] = k
        taken.add(candidate)
        out[i] = candidate
    return np.asarray(out, dtype=object)


def detect_gene_id_kind(names: Iterable[str], threshold: float = 0.9) -> str:
    """Tell whether gene identifiers are Ensembl ids, gene symbols, or a mix.

    Ensembl gene ids look like ``ENSG00000141510``, ``ENSMUSG00000059552`` or, with a version,
    ``ENSG00000141510.17`` (``ENS`` + species letters + ``G`` + digits).

    Parameters
    ----------
    names : Iterable[str]
        Gene identifiers (for example ``adata.var_names`` or ``state.genes``).
    threshold : float
        Fraction of names that must be of one kind for that kind to be reported.

    Returns
    -------
    str
        ``"ensembl"``, ``"symbol"`` or ``"mixed"``.

    Raises
    ------
    ValueError
        When ``names`` is empty.
    """
    names = [str(n) for n in names]
    if not names:
        msg = "cannot detect the kind of gene identifiers: no names were given"
        raise ValueError(msg)
    n_ensembl = sum(1 for n in names if _ENSEMBL_RE.match(n))
    frac = n_ensembl / len(names)
    if frac >= threshold:
        return "ensembl"
    if frac <= 1.0 - threshold:
        return "symbol"
    return "mixed"


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


# --------------------------------------------------------------------------------------------
# Any input
# --------------------------------------------------------------------------------------------


def read_adata(path: str | os.PathLike, backed: bool = False) -> anndata.AnnData:
    """Read an AnnData object from various supported file formats.

    Parameters
    ----------
    path : str | Path
        Path to the input count data stored in 10x .h5 format, AnnData .h5ad format, or in a 10x
        matrix market format folder.
    backed : bool
        If True and the input is an `.h5ad` file, open the file in backed mode (read-only).
        Ignored for the 10x formats, which are always read into memory.

    Returns
    -------
    AnnData
        The loaded AnnData object containing gene expression data.
    """
    path = Path(path)
    if path.is_dir():
        return read_10x_mtx(path)
    if not path.exists():
        msg = f"input {str(path)!r} does not exist; expected {_SUPPORTED_INPUTS}"
        raise FileNotFoundError(msg)
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        try:
            return anndata.read_h5ad(path, backed="r" if backed else None)
        except (OSError, KeyError) as err:
            msg = f"could not read h5ad file {str(path)!r} (truncated or corrupted?): {err}"
            raise ValueError(msg) from err
    if suffix == ".h5":
        return read_10x_h5(path)
    msg = f"cannot read {str(path)!r}: unsupported file type {suffix or '(no extension)'!r}; expected {_SUPPORTED_INPUTS}"
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------


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
