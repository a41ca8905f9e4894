"""Real single-cell data shipped with ginseng (see PROVENANCE.md beside this file)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["pbmc3k", "pbmc3k_path"]

_HERE = Path(__file__).resolve().parent


def pbmc3k_path() -> Path:
    """Path of the embedded pbmc3k h5ad (2,638 cells x 13,714 genes, raw counts, 9 labels)."""
    return _HERE / "pbmc3k.h5ad"


def pbmc3k():
    """The embedded pbmc3k dataset as an AnnData (raw counts in X, labels in obs['cell_type'])."""
    import anndata

    return anndata.read_h5ad(pbmc3k_path())
