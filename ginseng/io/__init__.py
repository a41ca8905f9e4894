"""Readers for single-cell count files (h5ad, 10x h5, 10x mtx) and ginseng model files.

The rooms: ``tenx`` (10x h5 and mtx), ``model`` (model files in HDF5, no pickles), ``genes``
(unique names, Ensembl ids vs symbols); :func:`read_adata` picks the reader for a path.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata

from ginseng.io.genes import detect_gene_id_kind, make_names_unique
from ginseng.io.model import (
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    load_ginseng_state,
    save_ginseng_state,
)
from ginseng.io.tenx import read_10x_h5, read_10x_mtx

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

_SUPPORTED_INPUTS = "an AnnData '.h5ad' file, a 10x Genomics '.h5' file, or a 10x mtx directory"


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

