"""Gene mapping: the model's genes located once in the input's, as an index array.

Missing model genes become zero columns; a partial overlap is warned about, too little overlap
(``min_gene_overlap``) or identifiers of another kind (Ensembl ids vs symbols) refused, with
examples of both sides and the likely cause.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd

from ginseng.io.genes import detect_gene_id_kind as _gene_id_kind

__all__ = ["GeneMap", "input_gene_names", "map_genes"]

_KIND_WORDS = {"ensembl": "Ensembl ids", "symbol": "gene symbols", "mixed": "a mix of Ensembl ids and symbols"}


def input_gene_names(var: pd.DataFrame, var_names, gene_key: str | None) -> np.ndarray:
    if gene_key is None:
        return np.asarray(var_names).astype(str)
    if gene_key not in var.columns:
        msg = (
            f"gene_key {gene_key!r} is not a column of adata.var; "
            f"available columns: {list(map(str, var.columns))}"
        )
        raise ValueError(msg)
    return np.asarray(var[gene_key]).astype(str)


class GeneMap(NamedTuple):
    """``src[k]`` is the input column holding model gene ``dst[k]``; other model genes are zero."""

    src: np.ndarray  # int64, input column positions
    dst: np.ndarray  # int64, model gene positions
    n_model: int
    identity: bool  # input columns are exactly the model genes, in order


def _likely_mismatch_cause(input_genes: np.ndarray, model_genes: np.ndarray, n_found: int) -> str:
    """A sentence on why few model genes match: letter case / species, or version suffixes."""
    def folded(names, fold):
        return {fold(str(g)) for g in names}

    upper = len(folded(model_genes, str.upper) & folded(input_genes, str.upper))
    if upper >= max(2 * n_found, n_found + 10):
        return (
            f"Ignoring letter case, {upper} of them would match: the names differ in case (e.g. a "
            "mouse model, 'Cd4', on human data, 'CD4', or symbols written in another case): "
            "annotate data of the model's species, or map the genes (orthologs) first"
        )
    strip = lambda g: g.split(".")[0]
    unversioned = len(folded(model_genes, strip) & folded(input_genes, strip))
    if unversioned >= max(2 * n_found, n_found + 10):
        return f"Without version suffixes ('.5') {unversioned} of them would match: strip them from the input's names"
    return (
        "Check that the input is of the model's species, and names genes the same way (symbols vs "
        "Ensembl ids; gene_key= chooses a var column)"
    )


def map_genes(input_genes: np.ndarray, model_genes: np.ndarray, *, allow_missing: bool = True,
               gene_key: str | None = None, var_columns=(), min_overlap: float | None = None,
              stacklevel: int = 3) -> GeneMap:
    """Index the model's genes in the input; warn on partial overlap, raise on none (or on less
    than ``min_overlap`` of the model's genes). ``stacklevel``: of the warnings (the user's call)."""
    input_genes = np.asarray(input_genes).astype(str)
    model_genes = np.asarray(model_genes).astype(str)
    n_model = len(model_genes)
    first: dict[str, int] = {}
    for j, g in enumerate(input_genes):  # duplicated input names: the first occurrence is used
        first.setdefault(g, j)
    pos = np.fromiter((first.get(g, -1) for g in model_genes), dtype=np.int64, count=n_model)
    found = pos >= 0
    n_found = int(found.sum())
    where = f"adata.var[{gene_key!r}]" if gene_key is not None else "adata.var_names"
    if len(first) < len(input_genes):
        names, counts = np.unique(input_genes, return_counts=True)
        dup = np.intersect1d(names[counts > 1], model_genes)
        if dup.size:
            msg = (
                f"{dup.size} of the model's genes appear more than once in the input ({where}), "
                f"e.g. {[str(g) for g in dup[:5]]}; the first column of each is used. Make the "
                "names unique (adata.var_names_make_unique()) or pass gene_key= to choose"
            )
            warnings.warn(msg, UserWarning, stacklevel=stacklevel)
    if len(input_genes) and n_model:
        kind_in, kind_model = _gene_id_kind(input_genes), _gene_id_kind(model_genes)
        if {kind_in, kind_model} == {"ensembl", "symbol"}:
            msg = (
                f"the model's genes are {_KIND_WORDS[kind_model]} (e.g. {str(model_genes[0])!r}) but the "
                f"input's genes ({where}) are {_KIND_WORDS[kind_in]} (e.g. {str(input_genes[0])!r}); "
                f"{n_found} of {n_model} model genes match. Pass gene_key= naming a var column with "
                f"{_KIND_WORDS[kind_model]}; var columns: {list(map(str, var_columns))}"
            )
            raise ValueError(msg)
    if n_found == 0:
        msg = (
            f"none of the model's {n_model} genes (e.g. {[str(g) for g in model_genes[:3]]}) are in the input's "
            f"{len(input_genes)} genes ({where}, e.g. {[str(g) for g in input_genes[:3]]}); "
            f"var columns: {list(map(str, var_columns))}"
        )
        raise ValueError(msg)
    if min_overlap is not None and n_found < min_overlap * n_model:
        missing = model_genes[~found]
        msg = (
            f"only {n_found} of the model's {n_model} genes ({100.0 * n_found / n_model:.1f}%) are in "
            f"the input ({where}); at least {100.0 * min_overlap:.0f}% must match "
            f"(min_gene_overlap={min_overlap}). Missing model genes, e.g. "
            f"{[str(g) for g in missing[:5]]}; input genes, e.g. {[str(g) for g in input_genes[:5]]}. "
            f"{_likely_mismatch_cause(input_genes, model_genes, n_found)}. To annotate anyway, lower "
            "min_gene_overlap (annotate.min_gene_overlap on the command line)"
        )
        raise ValueError(msg)
    if n_found < n_model:
        missing = model_genes[~found]
        if not allow_missing:
            msg = (
                f"{len(missing)} of the model's {n_model} genes are missing from the input "
                f"(e.g. {[str(g) for g in missing[:5]]}); use annotate_iter_partial to fill them with zeros"
            )
            raise ValueError(msg)
        msg = (
            f"only {n_found} of the model's {n_model} genes ({100.0 * n_found / n_model:.1f}%) were "
            f"found in the input ({where}); the {n_model - n_found} missing genes "
            f"(e.g. {[str(g) for g in missing[:5]]}) are filled with zeros, which may lower accuracy"
        )
        warnings.warn(msg, UserWarning, stacklevel=stacklevel)
    dst = np.flatnonzero(found).astype(np.int64)
    src = pos[found]
    identity = n_found == n_model and len(input_genes) == n_model and bool(np.all(src == dst))
    return GeneMap(src=src, dst=dst, n_model=n_model, identity=identity)
