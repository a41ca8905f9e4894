"""Gene identifiers: unique names, and telling Ensembl ids from gene symbols (one pattern)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

__all__ = ["ENSEMBL_RE", "detect_gene_id_kind", "make_names_unique"]

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")


def make_names_unique(names: Iterable[str], join: str = "-") -> np.ndarray:
    """Make names unique the way ``AnnData.var_names_make_unique`` does (it is anndata's own
    ``anndata.utils.make_index_unique``).

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
    from anndata.utils import make_index_unique

    index = pd.Index([str(n) for n in names], dtype=object)
    with warnings.catch_warnings():  # anndata warns that it made names unique: that was asked for
        warnings.simplefilter("ignore")
        return np.asarray(make_index_unique(index, join=join), dtype=object)


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
    n_ensembl = sum(1 for n in names if ENSEMBL_RE.match(n))
    frac = n_ensembl / len(names)
    if frac >= threshold:
        return "ensembl"
    if frac <= 1.0 - threshold:
        return "symbol"
    return "mixed"

