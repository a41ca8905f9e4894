"""compute_hvgs: streamed Seurat-flavour selection, equal across backing, chunking and layout."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_counts

from ginseng.utils import compute_hvgs

N_TOP = 50


@pytest.fixture(scope="module")
def adata():
    # Enough genes that normalized means fall inside the default (0.0125, 3) log-mean window.
    return make_counts(n_cells=300, n_genes=1500, seed=4)


def dense_reference(X, n_top, min_mean=0.0125, max_mean=np.inf, n_bins=20):
    """Direct in-memory computation (normalize_total 1e4 -> Seurat dispersions), for comparison."""
    X = np.asarray(X, dtype=np.float64)
    totals = X.sum(1, keepdims=True)
    Xn = np.divide(X * 1e4, totals, out=np.zeros_like(X), where=totals > 0)
    mean = Xn.mean(0)
    var = Xn.var(0, ddof=1)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    log_disp, log_mean = np.log(disp), np.log1p(mean)
    edges = np.linspace(log_mean.min(), log_mean.max(), n_bins + 1)
    which = np.clip(np.searchsorted(edges, log_mean, side="left") - 1, 0, n_bins - 1)
    z = np.full_like(log_disp, np.nan)
    for b in np.unique(which):
        sel = (which == b) & np.isfinite(log_disp)
        if sel.sum() == 1:
            z[sel] = 1.0
        elif sel.sum() > 1:
            z[sel] = (log_disp[sel] - log_disp[sel].mean()) / log_disp[sel].std(ddof=1)
    ok = (log_mean > min_mean) & (log_mean < max_mean) & np.isfinite(z)
    idx = np.flatnonzero(ok)
    top = idx[np.argsort(-z[idx], kind="stable")[:n_top]]
    mask = np.zeros(X.shape[1], bool)
    mask[top] = True
    return mask


def test_marks_exactly_n_top_and_matches_dense_reference(adata):
    a = adata.copy()
    assert compute_hvgs(a, n_top_genes=N_TOP) is None
    mask = a.var["ginseng_genes"].to_numpy()
    assert mask.dtype == bool and mask.sum() == N_TOP
    ref = dense_reference(adata.X, N_TOP)
    # Bin edges may differ by a hair from pandas' cut; the selections must all but coincide.
    assert (mask & ref).sum() >= N_TOP - 2


def test_selects_the_planted_variable_genes():
    # Ten planted genes, spread over the range of means, are on (at twice their mean) in half
    # the cells and off in the rest; every other gene is Poisson noise. Each mean bin then holds
    # noise genes of the same mean, and only the planted genes are over-dispersed.
    rng = np.random.default_rng(0)
    n_cells, n_genes = 400, 600
    lam = np.geomspace(2.0, 10.0, n_genes)  # evenly spread log means: ~60 genes a bin
    X = rng.poisson(lam, size=(n_cells, n_genes)).astype(np.float32)
    planted = np.arange(5, n_genes, 60)
    on = rng.random(n_cells) < 0.5
    X[:, planted] = np.where(on[:, None], rng.poisson(2 * lam[planted], (n_cells, 10)), 0)
    a = anndata.AnnData(X)
    compute_hvgs(a, n_top_genes=10, max_mean=10, n_bins=10)
    np.testing.assert_array_equal(np.flatnonzero(a.var["ginseng_genes"]), planted)


def test_chunked_sparse_backed_all_equal(adata, tmp_path):
    base = adata.copy()
    compute_hvgs(base, n_top_genes=N_TOP)
    expected = base.var["ginseng_genes"].to_numpy()

    chunked = adata.copy()
    compute_hvgs(chunked, n_top_genes=N_TOP, chunk_size=37)
    np.testing.assert_array_equal(chunked.var["ginseng_genes"].to_numpy(), expected)

    sparse = anndata.AnnData(sp.csr_matrix(adata.X), var=adata.var.copy())
    compute_hvgs(sparse, n_top_genes=N_TOP, chunk_size=64)
    np.testing.assert_array_equal(sparse.var["ginseng_genes"].to_numpy(), expected)

    for name, obj in (("dense", adata), ("sparse", sparse)):
        path = tmp_path / f"{name}.h5ad"
        obj.write_h5ad(path)
        backed = anndata.read_h5ad(path, backed="r")
        compute_hvgs(backed, n_top_genes=N_TOP, chunk_size=50)
        np.testing.assert_array_equal(backed.var["ginseng_genes"].to_numpy(), expected)
        copied = compute_hvgs(backed, n_top_genes=N_TOP, copy=True)
        assert not copied.isbacked
        np.testing.assert_array_equal(copied.var["ginseng_genes"].to_numpy(), expected)
        backed.file.close()


def test_copy_leaves_input_alone(adata):
    a = adata.copy()
    out = compute_hvgs(a, n_top_genes=N_TOP, copy=True)
    assert "ginseng_genes" not in a.var
    assert out.var["ginseng_genes"].sum() == N_TOP
    assert out is not a


def test_layer(adata):
    a = anndata.AnnData(np.zeros(adata.shape, np.float32), var=adata.var.copy())
    a.layers["counts"] = adata.X.copy()
    compute_hvgs(a, n_top_genes=N_TOP, layer="counts")
    b = adata.copy()
    compute_hvgs(b, n_top_genes=N_TOP)
    np.testing.assert_array_equal(a.var["ginseng_genes"], b.var["ginseng_genes"])
    with pytest.raises(
        KeyError, match=r"layer 'raw' is not in adata.layers; available layers: \['counts'\]"
    ):
        compute_hvgs(a, layer="raw")


def test_fewer_pass_warns_and_marks_what_passes(adata):
    a = adata.copy()
    with pytest.warns(
        UserWarning, match=r"only \d+ of 1500 genes pass .*instead of n_top_genes=5000"
    ):
        compute_hvgs(a, n_top_genes=5000)
    assert 0 < a.var["ginseng_genes"].sum() < 1500


def test_log_normalized_input_warns(adata):
    X = np.asarray(adata.X, dtype=np.float64)
    logn = np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    a = anndata.AnnData(logn)
    with pytest.warns(
        UserWarning, match="non-integer values, so it is treated as log1p-normalized"
    ):
        compute_hvgs(a, n_top_genes=N_TOP)
    b = adata.copy()
    compute_hvgs(b, n_top_genes=N_TOP)
    # expm1 of log1p-normalized data recovers the normalized counts: nearly the same selection.
    assert (
        a.var["ginseng_genes"].to_numpy() & b.var["ginseng_genes"].to_numpy()
    ).sum() >= N_TOP - 2


def test_bad_arguments(adata):
    a = adata.copy()
    with pytest.raises(ValueError, match="n_top_genes must be an integer >= 1, got 0"):
        compute_hvgs(a, n_top_genes=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got -5"):
        compute_hvgs(a, chunk_size=-5)
    with pytest.raises(ValueError, match="min_mean must be smaller than max_mean"):
        compute_hvgs(a, min_mean=3, max_mean=1)
    with pytest.raises(ValueError, match=r"no gene passes the mean filter 10 < log1p\(mean\) < 20"):
        compute_hvgs(a, min_mean=10, max_mean=20)
    with pytest.raises(TypeError, match="expects an AnnData, got ndarray"):
        compute_hvgs(np.asarray(a.X))
    neg = anndata.AnnData(np.asarray(a.X) - 1, var=pd.DataFrame(index=a.var_names))
    with pytest.raises(
        ValueError, match=r"found \d+ negative and 0 NaN/infinite values in rows 0\.\.9"
    ):
        compute_hvgs(neg, chunk_size=10)
    assert "ginseng_genes" not in a.var


def test_pbmc3k_backed(pbmc3k_path):
    backed = anndata.read_h5ad(pbmc3k_path, backed="r")
    compute_hvgs(backed, n_top_genes=2000, chunk_size=1000)
    mask = backed.var["ginseng_genes"].to_numpy()
    assert mask.sum() == 2000
    # Well-known PBMC marker genes are among the most variable, the highly expressed LYZ and
    # S100A4 included (no upper mean bound by default); scanpy's max_mean=3 drops them.
    marked = set(backed.var_names[mask])
    assert {"CD79A", "GNLY", "PPBP", "FCER1A", "LYZ", "S100A4"} <= marked
    compute_hvgs(backed, n_top_genes=2000, max_mean=3.0, chunk_size=1000)
    assert "LYZ" not in set(backed.var_names[backed.var["ginseng_genes"].to_numpy()])
    backed.file.close()


def test_cells_select_rows_without_copying_them(adata, tmp_path):
    """compute_hvgs(cells=...) on the whole (backed) matrix equals compute_hvgs on the subset."""
    rng = np.random.default_rng(0)
    for cells in (np.sort(rng.choice(300, 240, replace=False)), np.sort(rng.choice(300, 12, replace=False)),
                  rng.random(300) < 0.5):
        rows = np.flatnonzero(cells) if cells.dtype == bool else cells
        sub = adata[rows].copy()
        compute_hvgs(sub, n_top_genes=N_TOP)
        expected = sub.var["ginseng_genes"].to_numpy()
        whole = adata.copy()
        compute_hvgs(whole, n_top_genes=N_TOP, cells=cells, chunk_size=7)
        np.testing.assert_array_equal(whole.var["ginseng_genes"].to_numpy(), expected)
        path = tmp_path / "sparse.h5ad"
        anndata.AnnData(sp.csr_matrix(adata.X), var=adata.var.copy()).write_h5ad(path)
        backed = anndata.read_h5ad(path, backed="r")
        compute_hvgs(backed, n_top_genes=N_TOP, cells=cells, chunk_size=5)
        np.testing.assert_array_equal(backed.var["ginseng_genes"].to_numpy(), expected)
        backed.file.close()
    with pytest.raises(ValueError, match=r"cells must be row indices in \[0, 300\), found min 0 max 300"):
        compute_hvgs(adata.copy(), cells=[0, 300])
    with pytest.raises(ValueError, match="cells has 1 repeated row indices"):
        compute_hvgs(adata.copy(), cells=[3, 3, 4])
    with pytest.raises(ValueError, match="boolean mask needs 300 entries"):
        compute_hvgs(adata.copy(), cells=np.ones(5, bool))
    with pytest.raises(ValueError, match="integer row indices or a boolean mask, found dtype <U1"):
        compute_hvgs(adata.copy(), cells=np.array(["a", "b"]))
