"""Highly variable gene selection, streamed over row blocks so that backed AnnData never has
to fit in memory."""

from __future__ import annotations

import numbers
import warnings

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["compute_hvgs"]

_TARGET_SUM = 1e4


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _check_cells(cells, n_obs: int) -> np.ndarray | None:
    """``cells`` as sorted unique int64 row indices in [0, n_obs) (None stays None)."""
    if cells is None:
        return None
    arr = np.asarray(cells)
    if arr.dtype == bool:
        if arr.shape != (n_obs,):
            msg = f"cells as a boolean mask needs {n_obs} entries (one per cell), found shape {arr.shape}"
            raise ValueError(msg)
        return np.flatnonzero(arr).astype(np.int64)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        msg = f"cells must be a 1-d array of integer row indices or a boolean mask, found dtype {arr.dtype} shape {arr.shape}"
        raise ValueError(msg)
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_obs):
        msg = f"cells must be row indices in [0, {n_obs}), found min {arr.min()} max {arr.max()}"
        raise ValueError(msg)
    uniq = np.unique(arr)
    if uniq.size != arr.size:
        msg = f"cells has {arr.size - uniq.size} repeated row indices; each cell can be taken once"
        raise ValueError(msg)
    return uniq


def _row_block(X, start: int, stop: int, cells: np.ndarray | None = None):
    """Rows [start, stop) of ``X``; with ``cells`` (sorted unique row indices), the rows
    ``cells[start:stop]``, read as contiguous input ranges of at most the block's number of rows
    (so a scattered selection of a backed matrix is never read in one huge slice)."""
    if cells is None:
        return X[start:stop]
    want = cells[start:stop]
    span = max(1, stop - start)
    pieces = []
    i = 0
    while i < want.size:
        lo = int(want[i])
        j = int(np.searchsorted(want, lo + span, side="left"))
        hi = int(want[j - 1]) + 1
        blk = X[lo:hi]
        if hasattr(blk, "to_memory"):  # anndata backed sparse slices
            blk = blk.to_memory()
        if j - i != hi - lo:
            blk = blk[want[i:j] - lo]
        pieces.append(blk)
        i = j
    if not pieces:
        return X[0:0]
    if len(pieces) == 1:
        return pieces[0]
    if sp.issparse(pieces[0]):
        return sp.vstack(pieces, format="csr")
    return np.concatenate([np.asarray(p) for p in pieces])


def _layer_names(data) -> list[str]:
    """The names of ``data.layers`` (anndata >= 0.13 also lists ``None``, i.e. X: left out)."""
    return [str(k) for k in data.layers if k is not None]


def _matrix(data: anndata.AnnData, layer: str | None):
    if layer is None:
        if data.X is None:
            msg = "compute_hvgs needs expression values but adata.X is None; pass layer=..."
            raise ValueError(msg)
        return data.X
    if layer not in data.layers:
        msg = (
            f"layer {layer!r} is not in adata.layers; available layers: {_layer_names(data)}"
        )
        raise KeyError(msg)
    return data.layers[layer]


def _gene_moments(X, n_cells: int, n_genes: int, chunk_size: int, cells: np.ndarray | None = None):
    """One pass over row blocks: sums and sums of squares of the per-cell normalized counts
    (total ``1e4`` per cell) and of ``expm1(X)``, and whether every value is an integer.

    Both moment sets are kept so that one pass serves raw counts (normalized here) as well as
    data that was already normalized and log1p-transformed (undone with expm1, as in Seurat).
    """
    s_counts = np.zeros(n_genes)
    ss_counts = np.zeros(n_genes)
    s_log = np.zeros(n_genes)
    ss_log = np.zeros(n_genes)
    integer = True
    if not (sp.issparse(X) or getattr(X, "format", None) in ("csr", "csc")):
        # Dense blocks become float64 (and a few temporaries of that size): keep one ~256 MB.
        chunk_size = max(1, min(chunk_size, (256 << 20) // max(1, 8 * n_genes)))
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        block = _row_block(X, start, stop, cells)
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float64)
            values = block.data
        else:
            block = np.asarray(block, dtype=np.float64)
            values = block
        n_bad = int(np.count_nonzero(~np.isfinite(values)))
        n_neg = int(np.count_nonzero(values < 0))
        if n_bad or n_neg:
            msg = (
                "compute_hvgs expects non-negative finite expression values; found "
                f"{n_neg} negative and {n_bad} NaN/infinite values in rows {start}..{stop - 1}"
            )
            raise ValueError(msg)
        integer = integer and bool(np.all(values == np.floor(values)))

        totals = np.asarray(block.sum(axis=1)).ravel()
        # Empty cells contribute zeros rather than a division by zero.
        scale = np.divide(_TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        if sp.issparse(block):
            normed = sp.diags(scale) @ block
            s_counts += np.asarray(normed.sum(axis=0)).ravel()
            ss_counts += np.asarray(normed.multiply(normed).sum(axis=0)).ravel()
            expd = block.copy()
            # expm1(0) == 0, so sparsity is kept. On raw counts (> ~709) expm1 overflows to inf:
            # harmless, those moments are used only for log1p data, so say nothing about it.
            with np.errstate(over="ignore"):
                expd.data = np.expm1(expd.data)
            s_log += np.asarray(expd.sum(axis=0)).ravel()
            with np.errstate(over="ignore", invalid="ignore"):
                ss_log += np.asarray(expd.multiply(expd).sum(axis=0)).ravel()
        else:
            normed = block * scale[:, None]
            s_counts += normed.sum(axis=0)
            ss_counts += np.einsum("ij,ij->j", normed, normed)
            with np.errstate(over="ignore"):
                expd = np.expm1(block)
            s_log += expd.sum(axis=0)
            with np.errstate(over="ignore", invalid="ignore"):
                ss_log += np.einsum("ij,ij->j", expd, expd)
    return (s_counts, ss_counts), (s_log, ss_log), integer


def _seurat_dispersion(sums, sumsq, n_cells: int, n_bins: int):
    """Log mean and normalized dispersion per gene, the Seurat (v2) way."""
    mean = sums / n_cells
    var = np.maximum((sumsq - n_cells * mean**2) / (n_cells - 1), 0.0)
    mean = np.where(mean == 0, 1e-12, mean)
    disp = var / mean
    with np.errstate(divide="ignore"):
        log_disp = np.log(np.where(disp == 0, np.nan, disp))
    log_mean = np.log1p(mean)

    # Equal-width bins of log mean; within a bin, z-score the log dispersion. A bin holding one
    # gene has no spread: that gene gets z = 1 (as in Seurat/scanpy) rather than NaN.
    bins = pd.cut(log_mean, bins=n_bins)
    frame = pd.DataFrame({"bin": bins, "disp": log_disp})
    grouped = frame.groupby("bin", observed=True)["disp"]
    # Copies: they are written below, and pandas (3, or 2 with copy-on-write) hands out
    # read-only views.
    bin_mean = grouped.transform("mean").to_numpy(dtype=np.float64, copy=True)
    bin_std = grouped.transform("std").to_numpy(dtype=np.float64, copy=True)
    single = np.isnan(bin_std) & ~np.isnan(log_disp)
    bin_std[single] = bin_mean[single]
    bin_mean[single] = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_disp = (log_disp - bin_mean) / bin_std
    return log_mean, norm_disp


def compute_hvgs(
    data: anndata.AnnData,
    n_top_genes: int = 2000,
    min_mean: float = 0.0125,
    max_mean: float = float("inf"),
    n_bins: int = 20,
    copy: bool = False,
    *,
    layer: str | None = None,
    chunk_size: int = 10000,
    cells=None,
) -> None | anndata.AnnData:
    """Select highly variable genes.

    Seurat-flavour dispersion selection. Each cell is normalized to a total of 1e4 (the
    log1p-normalized scale that ``min_mean`` / ``max_mean`` refer to); per gene, the mean and
    the dispersion (variance / mean) are computed in one streamed pass over row blocks of
    ``chunk_size`` cells, so memory is bounded by a block for in-memory dense or sparse data and
    for backed AnnData alike. Genes are binned by ``log1p(mean)`` into ``n_bins`` equal-width
    bins, the log dispersion is z-scored within each bin, genes with ``min_mean < log1p(mean) <
    max_mean`` are kept, and the ``n_top_genes`` with the highest normalized dispersion are
    marked.

    Raw counts are expected. Data with non-integer values is taken to be log1p-normalized
    already (it is then ``expm1``-ed, not re-normalized) and a warning says so.

    Parameters
    ----------
    data : AnnData
        AnnData object with gene names stored in `var` (in memory or backed).
    n_top_genes : int
        Number of top highly variable genes to select.
    min_mean : float
        Lower bound on mean gene expression (``log1p`` of the mean normalized count) for selecting
        highly variable genes.
    max_mean : float
        Upper bound on mean gene expression for selecting highly variable genes. The default
        (no upper bound) keeps highly expressed markers such as LYZ and S100A4 in PBMCs; with
        scanpy's 3 they are dropped, and pbmc3k macro-F1 measured lower (benchmarks/RESULTS.md).
    n_bins : int
        Select genes across this many gene expression bins.
    copy : bool
        If True, return a copy of the AnnData (a backed AnnData is copied into memory).
    layer : str, optional
        Read values from ``data.layers[layer]`` instead of ``data.X``.
    chunk_size : int
        Number of cells read at a time.
    cells : array-like of int or bool, optional
        Compute the selection on these cells only (row indices, or a boolean mask over the
        rows), e.g. the training cells of a backed file, without loading them into memory.

    Returns
    -------
    None
        Marks highly variable genes in `var` in-place (boolean column ``ginseng_genes``). Or if
        copy=True, then returns a copy of the AnnData.

    Warns
    -----
    UserWarning
        When fewer than ``n_top_genes`` genes pass the mean filter (all that pass are marked),
        and when the values are not integers.
    """
    if not isinstance(data, anndata.AnnData):
        msg = f"compute_hvgs expects an AnnData, got {type(data).__name__}"
        raise TypeError(msg)
    n_top_genes = _check_int("n_top_genes", n_top_genes, 1)
    n_bins = _check_int("n_bins", n_bins, 1)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    if not min_mean < max_mean:
        msg = (
            f"min_mean must be smaller than max_mean, got min_mean={min_mean}, max_mean={max_mean}"
        )
        raise ValueError(msg)
    n_cells, n_genes = data.shape
    cells = _check_cells(cells, n_cells)
    if cells is not None:
        n_cells = int(cells.size)
    if n_cells < 2 or n_genes < 1:
        msg = (
            f"compute_hvgs needs at least 2 cells and 1 gene, got {n_cells} cells x {n_genes} genes"
        )
        raise ValueError(msg)

    X = _matrix(data, layer)
    counts_moments, log_moments, integer = _gene_moments(X, n_cells, n_genes, chunk_size, cells)
    if not integer:
        where = f"layers[{layer!r}]" if layer is not None else "X"
        msg = (
            f"compute_hvgs: adata.{where} has non-integer values, so it is treated as "
            "log1p-normalized data (expm1 is applied instead of normalizing counts); pass raw "
            "counts (for example with layer=) for the intended selection"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
    sums, sumsq = counts_moments if integer else log_moments
    log_mean, norm_disp = _seurat_dispersion(sums, sumsq, n_cells, n_bins)

    passing = (log_mean > min_mean) & (log_mean < max_mean) & np.isfinite(norm_disp)
    n_pass = int(passing.sum())
    if n_pass == 0:
        msg = (
            f"no gene passes the mean filter {min_mean} < log1p(mean) < {max_mean} with a finite "
            f"dispersion; the genes' log1p(mean) ranges from {log_mean.min():.4g} to "
            f"{log_mean.max():.4g}"
        )
        raise ValueError(msg)
    if n_pass < n_top_genes:
        msg = (
            f"compute_hvgs: only {n_pass} of {n_genes} genes pass the mean filter "
            f"{min_mean} < log1p(mean) < {max_mean}; marking those {n_pass} instead of "
            f"n_top_genes={n_top_genes}"
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
    candidates = np.flatnonzero(passing)
    # Stable sort on the negated score: ties go to the earlier gene, so the result is
    # deterministic and independent of chunking.
    order = candidates[np.argsort(-norm_disp[candidates], kind="stable")]
    mask = np.zeros(n_genes, dtype=bool)
    mask[order[:n_top_genes]] = True

    out = data
    if copy:
        out = data.to_memory() if data.isbacked else data.copy()
    out.var["ginseng_genes"] = mask
    return out if copy else None
