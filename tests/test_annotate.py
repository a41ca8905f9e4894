"""Tests for ginseng.annotate: equality with a direct nn_annotate call, invariance to batch size and
device count, gene mapping, inputs (in memory, sparse, backed, path), outputs (parquet, CSV, zarr),
Monte Carlo dropout, the truth report, and the errors that leave nothing behind."""

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_counts

from ginseng.annotate import (
    annotate,
    annotate_iter_full,
    annotate_iter_partial,
)
from ginseng.nn import nn_annotate, nn_annotate_init
from ginseng.state import GinsengModelState

N_CELLS, N_GENES, LABELS = 70, 24, np.array(["alpha", "beta", "gamma"])


def make_state(genes, seed=0, **kw):
    params = nn_annotate_init(jax.random.key(seed), len(genes), len(LABELS), 8)
    return GinsengModelState(params, np.asarray(genes, dtype=str), np.arange(len(LABELS)), LABELS, **kw)


@pytest.fixture
def adata():
    return make_counts(n_cells=N_CELLS, n_genes=N_GENES, n_labels=3, seed=3)


@pytest.fixture
def state(adata):
    return make_state(adata.var_names)


def direct_probs(state, x, normalize=None, target_sum=None, attn=False):
    out = nn_annotate(
        state.params, jax.random.key(0), np.asarray(x, np.float32), state.dropout_rate,
        state.normalize if normalize is None else normalize,
        state.target_sum if target_sum is None else target_sum, return_attn=attn, training=False,
    )
    if attn:
        return np.asarray(jax.nn.softmax(out[0], -1)), np.asarray(out[1])
    return np.asarray(jax.nn.softmax(out, -1))


def test_in_place_equals_direct_nn_annotate(adata, state):
    assert annotate(state, adata, silent=True) is None
    p = direct_probs(state, adata.X)
    ct = adata.obs["ginseng_cell_type"]
    assert isinstance(ct.dtype, pd.CategoricalDtype)
    assert list(ct.cat.categories) == list(LABELS)
    np.testing.assert_array_equal(ct.cat.codes.to_numpy(), p.argmax(1))
    np.testing.assert_allclose(adata.obs["ginseng_confidence"].to_numpy(), p.max(1), rtol=1e-5)
    assert "ginseng_entropy" not in adata.obs


def test_sparse_input_and_return_convention(adata, state):
    sparse = adata.copy()
    sparse.X = sp.csr_matrix(adata.X)
    copied, table, probs, attn = annotate(
        state, sparse, copy=True, return_table=True, return_probs=True, return_attn=True, silent=True)
    assert "ginseng_cell_type" not in sparse.obs  # copy=True leaves the input alone
    p, a = direct_probs(state, adata.X, attn=True)
    np.testing.assert_allclose(probs.to_numpy(), p, rtol=1e-5, atol=1e-7)
    assert list(probs.columns) == list(LABELS) and list(probs.index) == list(adata.obs_names)
    np.testing.assert_allclose(attn, a, rtol=1e-5, atol=1e-7)
    assert attn.shape == (N_CELLS, N_GENES)
    assert list(attn.columns) == list(state.genes) and list(attn.index) == list(adata.obs_names)
    assert list(table.columns) == ["barcode", "cell_type", "confidence"]
    assert list(table.barcode) == list(adata.obs_names)
    np.testing.assert_array_equal(table.cell_type.astype(str), LABELS[p.argmax(1)])
    np.testing.assert_array_equal(copied.obs["ginseng_cell_type"].astype(str), LABELS[p.argmax(1)])
    # one request: the object itself, not a tuple
    assert isinstance(annotate(state, sparse, return_probs=True, silent=True), pd.DataFrame)
    assert isinstance(annotate(state, sparse, copy=True, silent=True), anndata.AnnData)


def test_batch_size_and_device_count_do_not_change_results(adata, state):
    ref = annotate(state, adata, batch_size=1024, return_probs=True, silent=True)
    for bs, devs in ((7, None), (1, jax.devices()[:1]), (7, jax.devices()[:1]), (33, jax.devices()[:2]),
                     (9, jax.devices()[::-1])):
        got = annotate(state, adata, batch_size=bs, devices=devs, return_probs=True, silent=True)
        np.testing.assert_array_equal(got.to_numpy().argmax(1), ref.to_numpy().argmax(1))
        np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), rtol=1e-5, atol=1e-7)


def test_normalize_and_target_sum_overrides(adata):
    st = make_state(adata.var_names, normalize=True, target_sum=1e4)
    off = annotate(st, adata, normalize=False, return_probs=True, silent=True).to_numpy()
    np.testing.assert_allclose(off, direct_probs(st, adata.X, normalize=False), rtol=1e-5, atol=1e-7)
    ts = annotate(st, adata, target_sum=50.0, return_probs=True, silent=True).to_numpy()
    np.testing.assert_allclose(ts, direct_probs(st, adata.X, target_sum=50.0), rtol=1e-5, atol=1e-7)
    assert not np.allclose(off, ts)
    st_off = make_state(adata.var_names, normalize=False)
    on = annotate(st_off, adata, normalize=True, return_probs=True, silent=True).to_numpy()
    np.testing.assert_allclose(on, direct_probs(st_off, adata.X, normalize=True), rtol=1e-5, atol=1e-7)


def test_partial_overlap_warns_and_fills_zeros(adata):
    # model genes: 18 of the input's genes in another order, plus 6 unknown ones
    genes = list(adata.var_names[::-1][:18]) + [f"NOVEL{i}" for i in range(6)]
    st = make_state(genes)
    with pytest.warns(UserWarning, match=r"only 18 of the model's 24 genes \(75\.0%\) were found"):
        probs = annotate(st, adata, return_probs=True, silent=True).to_numpy()
    aligned = np.zeros((N_CELLS, 24), np.float32)
    aligned[:, :18] = adata[:, genes[:18]].X
    np.testing.assert_allclose(probs, direct_probs(st, aligned), rtol=1e-5, atol=1e-7)

    with pytest.warns(UserWarning, match="75.0%"):
        blocks = list(annotate_iter_partial(adata, genes, batch_size=32))
    assert [b.shape for b in blocks] == [(32, 24), (32, 24), (6, 24)]
    np.testing.assert_array_equal(np.concatenate(blocks), aligned)
    with pytest.raises(ValueError, match="6 of the model's 24 genes are missing"):
        list(annotate_iter_full(adata, genes))
    full = np.concatenate(list(annotate_iter_full(adata, list(adata.var_names[::-1]), batch_size=50)))
    np.testing.assert_array_equal(full, adata.X[:, ::-1])


def test_gene_key_and_gene_errors(adata):
    st = make_state(adata.var["symbol"])
    by_symbol = annotate(st, adata, gene_key="symbol", return_probs=True, silent=True).to_numpy()
    np.testing.assert_allclose(by_symbol, direct_probs(st, adata.X), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"gene_key 'nope' is not a column of adata.var; available columns: \['symbol', 'keep'\]"):
        annotate(st, adata, gene_key="nope", silent=True)
    with pytest.raises(ValueError, match="none of the model's 24 genes"):
        annotate(st, adata, silent=True)  # var_names are GENE*, the model has SYM*
    ens = make_state([f"ENSG{i:011d}" for i in range(N_GENES)])
    with pytest.raises(ValueError, match=r"model's genes are Ensembl ids .* input's genes \(adata.var_names\) are gene symbols"):
        annotate(ens, adata, silent=True)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        annotate(st, adata, gene_key="symbol", batch_size=0, silent=True)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1, got 0"):
        annotate(st, adata, gene_key="symbol", n_samples=0, silent=True)
    with pytest.raises(ValueError, match="n_samples=3 needs randomness=True"):
        annotate(st, adata, gene_key="symbol", n_samples=3, silent=True)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        list(annotate_iter_full(adata, adata.var_names, batch_size=0))


def test_backed_and_path_inputs_equal_in_memory(adata, state, tmp_path):
    ref = annotate(state, adata.copy(), return_table=True, silent=True)
    path = tmp_path / "x.h5ad"
    sparse = adata.copy()
    sparse.X = sp.csr_matrix(adata.X)
    sparse.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    got = annotate(state, backed, batch_size=16, return_table=True, silent=True)
    pd.testing.assert_frame_equal(got, ref, rtol=1e-5)
    assert list(backed.obs["ginseng_cell_type"].astype(str)) == list(ref.cell_type.astype(str))
    # a path has no object to modify: the table is returned
    for bk in (True, False):
        pd.testing.assert_frame_equal(annotate(state, path, backed=bk, silent=True), ref, rtol=1e-5)
    ad2, tab = annotate(state, str(path), copy=True, silent=True)
    pd.testing.assert_frame_equal(tab, ref, rtol=1e-5)
    assert list(ad2.obs["ginseng_cell_type"].astype(str)) == list(ref.cell_type.astype(str))
    # dense backed X as well
    adata.write_h5ad(tmp_path / "dense.h5ad")
    got = annotate(state, tmp_path / "dense.h5ad", backed=True, batch_size=9, silent=True)
    pd.testing.assert_frame_equal(got, ref, rtol=1e-5)


def test_model_from_path_and_unreadable_model(adata, state, tmp_path):
    io = pytest.importorskip("ginseng.io")
    io.save_ginseng_state(state, tmp_path / "m.h5")
    ref = annotate(state, adata, return_table=True, silent=True)
    pd.testing.assert_frame_equal(annotate(tmp_path / "m.h5", adata, return_table=True, silent=True), ref)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.h5"):
        annotate(bad, adata, output=tmp_path / "o.csv", silent=True)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        annotate(tmp_path / "missing.h5", adata, silent=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5", "m.h5"]


@pytest.mark.parametrize("ext", [".parquet", ".csv"])
def test_output_file_equals_in_memory(adata, state, tmp_path, ext):
    zarr = pytest.importorskip("zarr")
    table, probs, attn = annotate(state, adata.copy(), return_table=True, return_probs=True,
                                  return_attn=True, silent=True)
    out = tmp_path / f"res{ext}"
    assert annotate(state, adata, output=out, batch_size=16, return_probs=True, return_attn=True,
                    silent=True) is None
    assert "ginseng_cell_type" not in adata.obs
    got = pd.read_parquet(out) if ext == ".parquet" else pd.read_csv(out)
    assert list(got.columns) == ["barcode", "cell_type", "confidence"]
    assert list(got.barcode) == list(table.barcode)
    assert list(got.cell_type) == list(table.cell_type.astype(str))
    np.testing.assert_allclose(got.confidence, table.confidence, rtol=1e-6)
    store = zarr.open_group(str(tmp_path / "res.zarr"), mode="r")
    # batch 16 here vs 1024 in memory: same values up to float rounding of the matmul blocking
    np.testing.assert_allclose(store["probs"][:], probs.to_numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(store["attn"][:], attn, rtol=1e-5, atol=1e-7)
    assert store.attrs["label_values"] == list(LABELS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"res{ext}", "res.zarr"])


def test_overwrite_replaces_an_earlier_probs_store_but_never_the_input_dataset(adata, state, tmp_path):
    data = pytest.importorskip("ginseng.data")
    out = tmp_path / "res.csv"
    annotate(state, adata, output=out, return_probs=True, silent=True)
    annotate(state, adata, output=out, return_probs=True, overwrite=True, silent=True)  # ours: replaced
    # The side store's name comes from the output's stem; here it is the input dataset itself.
    ds = data.GinsengDataset.create(tmp_path / "cells.zarr", adata, labels="cell_type", silent=True)
    with pytest.raises(FileExistsError, match="cells.zarr' is a directory ginseng did not write; refusing"):
        annotate(state, ds, output=tmp_path / "cells.csv", return_probs=True, overwrite=True, silent=True)
    assert not (tmp_path / "cells.csv").exists()
    assert data.GinsengDataset(tmp_path / "cells.zarr").n_cells == N_CELLS


def test_output_refusals_leave_nothing(adata, state, tmp_path):
    out = tmp_path / "res.csv"
    out.write_text("precious")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        annotate(state, adata, output=out, silent=True)
    assert out.read_text() == "precious"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        annotate(state, adata, output=tmp_path / "nodir" / "res.csv", silent=True)
    with pytest.raises(ValueError, match=r"extension '.txt'; expected one of"):
        annotate(state, adata, output=tmp_path / "res.txt", silent=True)
    with pytest.raises(ValueError, match="none of the model's"):
        annotate(make_state([f"X{i}" for i in range(5)]), adata, output=tmp_path / "r2.csv", silent=True)
    assert [p.name for p in tmp_path.iterdir()] == ["res.csv"]
    annotate(state, adata, output=out, overwrite=True, silent=True)
    assert len(pd.read_csv(out)) == N_CELLS


def test_randomness_reproducible_and_batch_invariant(adata, state):
    det = annotate(state, adata, return_probs=True, silent=True).to_numpy()
    a = annotate(state, adata, randomness=True, seed=5, return_probs=True, silent=True).to_numpy()
    b = annotate(state, adata, randomness=True, seed=5, batch_size=7, devices=jax.devices()[:1],
                 return_probs=True, silent=True).to_numpy()
    c = annotate(state, adata, randomness=True, seed=6, return_probs=True, silent=True).to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(a, det, atol=1e-4)
    assert not np.allclose(a, c, atol=1e-4)
    # Monte Carlo: mean of n passes, with its predictive entropy
    table, probs = annotate(state, adata, randomness=True, n_samples=4, seed=5, return_table=True,
                            return_probs=True, silent=True)
    p = probs.to_numpy()
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(table.entropy, -(p * np.log(p)).sum(1), rtol=1e-4)
    np.testing.assert_allclose(table.confidence, p.max(1), rtol=1e-6)
    assert not np.allclose(p, a, atol=1e-4)
    annotate(state, adata, randomness=True, n_samples=4, seed=5, silent=True)
    np.testing.assert_allclose(adata.obs["ginseng_entropy"], table.entropy, rtol=1e-6)


def test_classification_report_by_hand():
    from ginseng._core.report import from_confusion

    # truth x model counts; "delta" is a truth label the model does not have
    conf = np.array([[3, 1, 0], [0, 2, 2], [1, 0, 0], [0, 0, 0]])
    truth = ["alpha", "beta", "delta", "gamma"]
    rep = from_confusion(conf[:3], truth[:3], list(LABELS), list(LABELS))
    table = rep.table.set_index("cell_type")
    # On the cells the model can know (alpha, beta): alpha tp 3, predicted 3 (of those cells),
    # support 4; beta tp 2, predicted 3, support 4. delta: 1 cell, no score (not in the model).
    def row(c, cols=("precision", "recall", "f1")):
        return table.loc[c, list(cols)].to_numpy(float)

    np.testing.assert_allclose(row("alpha"), [1.0, 0.75, 6 / 7])
    np.testing.assert_allclose(row("beta"), [2 / 3, 0.5, 4 / 7])
    assert np.isnan(row("delta")).all() and table.loc["delta", "support"] == 1
    assert not table.loc["delta", "in_model"]
    assert table.loc["gamma", "support"] == 0 and table.loc["gamma", "predicted"] == 2
    assert table.loc["alpha", "predicted"] == 4  # every cell predicted as alpha, delta's included
    assert rep.macro_f1 == pytest.approx((6 / 7 + 4 / 7) / 2)
    assert (rep.n_model_labels, rep.n_known_cells, rep.absent) == (2, 8, {"delta": 1})
    assert rep.macro_f1_all == pytest.approx((6 / 7 + 4 / 7 + 0) / 3)
    lines = rep.lines()
    assert lines[0] == "macro-F1 on the model's 2 labels: 0.7143 (8 cells)"
    assert "1 labels are not in the model (1 cells" in lines[1] and "delta 1" in lines[1]
    assert lines[2] == "macro-F1 over all 3 true labels, counting those 1 as 0: 0.4762"


def test_classification_report_matches_scikit_learn():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    from ginseng._core.report import from_labels

    rng = np.random.default_rng(4)
    model = ["a", "b", "c", "d"]
    truth = rng.choice(["a", "b", "c", "e", "f"], 500)  # e, f: types the model never learned
    pred = np.where(rng.random(500) < 0.7, truth, rng.choice(model, 500))
    pred = np.where(np.isin(pred, model), pred, "d")
    rep = from_labels(truth, pred, model)
    known = np.isin(truth, model)
    labels = sorted(set(truth[known]))
    p, r, f, _ = precision_recall_fscore_support(truth[known], pred[known], labels=labels, zero_division=0)
    table = rep.table.set_index("cell_type").loc[labels]
    np.testing.assert_allclose(table[["precision", "recall", "f1"]].to_numpy(float), np.c_[p, r, f])
    assert rep.macro_f1 == pytest.approx(f1_score(truth[known], pred[known], labels=labels, average="macro"))
    assert rep.n_known_cells == known.sum() and set(rep.absent) == {"e", "f"}


def test_truth_report_end_to_end(adata, state, tmp_path, capsys):
    truth = np.array(["alpha", "beta", "gamma", "omega"])[np.arange(N_CELLS) % 4]
    adata.obs["truth"] = truth
    out = tmp_path / "res.parquet"
    annotate(state, adata, output=out, truth_key="truth", batch_size=16)
    assert "macro-F1" in capsys.readouterr().out
    pred = pd.read_parquet(out).cell_type.to_numpy()
    rep = pd.read_csv(tmp_path / "res.report.csv").set_index("cell_type")
    assert (tmp_path / "res.confusion.png").stat().st_size > 0
    # omega is not a model label: scores are over the cells whose true label the model knows.
    known = truth != "omega"
    f1s = []
    for c in ["alpha", "beta", "gamma"]:
        tp = np.sum((truth == c) & (pred == c))
        prec = tp / max(np.sum(pred[known] == c), 1)
        rec = tp / np.sum(truth == c)
        f1 = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
        f1s.append(f1)
        assert rep.loc[c, "precision"] == pytest.approx(prec)
        assert rep.loc[c, "recall"] == pytest.approx(rec)
        assert rep.loc[c, "f1"] == pytest.approx(f1)
    assert np.isnan(rep.loc["omega", "f1"]) and rep.loc["omega", "support"] == np.sum(~known)
    assert rep.loc["macro_avg (model labels, 3)", "f1"] == pytest.approx(np.mean(f1s))
    assert rep.loc["macro_avg (all true labels, 4)", "f1"] == pytest.approx(np.sum(f1s) / 4)
    # report_dir, in memory; a missing truth column is an error naming the columns
    annotate(state, adata, truth_key="truth", report_dir=tmp_path, silent=True)
    assert (tmp_path / "annotations.report.csv").exists() and (tmp_path / "annotations.confusion.png").exists()
    with pytest.raises(FileExistsError):
        annotate(state, adata, truth_key="truth", report_dir=tmp_path, silent=True)
    with pytest.raises(ValueError, match=r"truth_key 'nope' is not a column of adata.obs; available columns: \['cell_type', 'donor'"):
        annotate(state, adata, truth_key="nope", silent=True)


def test_ginseng_dataset_input(adata, state, tmp_path):
    data = pytest.importorskip("ginseng.data")
    ds = data.GinsengDataset.create(tmp_path / "ds", adata, labels="cell_type", silent=True)
    ref = annotate(state, adata, return_probs=True, silent=True).to_numpy()
    table, probs = annotate(state, ds, return_probs=True, batch_size=16, silent=True)
    np.testing.assert_allclose(probs.to_numpy(), ref, rtol=1e-5, atol=1e-7)
    assert list(table.barcode) == [str(i) for i in range(N_CELLS)]
    annotate(state, ds, truth_key="labels", report_dir=tmp_path, silent=True)
    rep = pd.read_csv(tmp_path / "annotations.report.csv").set_index("cell_type")
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    t0 = min(truth)
    assert rep.loc[t0, "support"] == np.sum(truth == t0)
    # The dataset's labels are not the model's: counted, not scored (no prediction can be right).
    assert t0 not in set(LABELS) and np.isnan(rep.loc[t0, "recall"]) and not rep.loc[t0, "in_model"]


def test_ginseng_dataset_read_in_storage_order_results_in_original_order(adata, state, tmp_path, monkeypatch):
    """A shuffled dataset is read stored chunk by stored chunk (not a chunk per cell), and every
    output (in memory, the streamed table, Monte Carlo draws keyed by cell) is in original order
    and equal to annotating the AnnData."""
    data = pytest.importorskip("ginseng.data")
    ds = data.GinsengDataset.create(tmp_path / "ds", adata, labels="cell_type", chunk_size=8, silent=True)
    assert not np.array_equal(ds._order, np.arange(N_CELLS))
    reads = []
    real = data.GinsengDataset._read_stored
    monkeypatch.setattr(data.GinsengDataset, "_read_stored", lambda self, rows: reads.append(rows) or real(self, rows))
    monkeypatch.setattr(data.GinsengDataset, "get_batch", lambda *a: pytest.fail("read by original index"))
    ref_table, ref_probs = annotate(state, adata, return_table=True, return_probs=True, randomness=True,
                                    n_samples=3, seed=7, silent=True)
    table, probs = annotate(state, ds, return_probs=True, randomness=True, n_samples=3, seed=7,
                            batch_size=16, silent=True)
    # storage order: each read is a contiguous run of stored rows
    assert all(np.array_equal(r, np.arange(r[0], r[0] + len(r))) for r in reads if len(r))
    assert sum(len(r) for r in reads) == N_CELLS
    np.testing.assert_allclose(probs.to_numpy(), ref_probs.to_numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(table.cell_type.astype(str), ref_table.cell_type.astype(str))
    np.testing.assert_allclose(table.confidence, ref_table.confidence, rtol=1e-5)
    np.testing.assert_allclose(table.entropy, ref_table.entropy, rtol=1e-5, atol=1e-6)
    annotate(state, ds, output=tmp_path / "out.csv", randomness=True, n_samples=3, seed=7,
             batch_size=16, silent=True)
    written = pd.read_csv(tmp_path / "out.csv")
    assert list(written.barcode) == list(range(N_CELLS))
    np.testing.assert_array_equal(written.cell_type.astype(str), ref_table.cell_type.astype(str))
    np.testing.assert_allclose(written.confidence, ref_table.confidence, rtol=1e-5)


_MP_WORKER = r'''
import sys
import numpy as np
from ginseng import distributed
from ginseng.annotate import annotate

pid, nproc, port, model, data, out = sys.argv[1:7]
distributed.initialize("local", coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc),
                       process_id=int(pid), initialization_timeout=60)
annotate(model, data, backed=True, output=out, batch_size=13, return_probs=True, silent=True)
table, probs = annotate(model, data, batch_size=13, return_probs=True, randomness=True, seed=4,
                        silent=True)
np.save(f"{out}.{pid}.npy", probs.to_numpy())
distributed.barrier("annotate_test_done")
distributed.shutdown()
'''


@pytest.mark.slow
def test_two_processes_equal_one(adata, state, tmp_path):
    """Two processes x 2 devices (jax.distributed, gloo) give the single-process results."""
    import os
    import socket
    import subprocess
    import sys

    io = pytest.importorskip("ginseng.io")
    io.save_ginseng_state(state, tmp_path / "m.h5")
    sparse = adata.copy()
    sparse.X = sp.csr_matrix(adata.X)
    sparse.write_h5ad(tmp_path / "x.h5ad")
    (tmp_path / "worker.py").write_text(_MP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = tmp_path / "res.parquet"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(i), "2", str(port),
                               str(tmp_path / "m.h5"), str(tmp_path / "x.h5ad"), str(out)], env=env)
             for i in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    zarr = pytest.importorskip("zarr")
    ref_table, ref_probs = annotate(state, adata, return_table=True, return_probs=True, silent=True)
    got = pd.read_parquet(out)
    assert list(got.barcode) == list(ref_table.barcode)
    assert list(got.cell_type) == list(ref_table.cell_type.astype(str))
    probs = zarr.open_group(str(tmp_path / "res.zarr"), mode="r")["probs"][:]
    np.testing.assert_allclose(probs, ref_probs.to_numpy(), rtol=1e-5, atol=1e-7)
    mc = annotate(state, adata, return_probs=True, randomness=True, seed=4, silent=True).to_numpy()
    for i in range(2):  # every process gets every cell, equal to one process with 4 devices
        np.testing.assert_allclose(np.load(f"{out}.{i}.npy"), mc, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("copy", [False, True])
def test_failed_annotate_closes_the_file_it_opened(adata, tmp_path, copy):
    # A backed .h5ad opened by annotate stayed open after an error, as long as the traceback
    # lived (in a notebook: until the next error): the file could not be reopened for writing.
    import h5py

    path = tmp_path / "q.h5ad"
    adata.write_h5ad(path)
    other = make_state([f"other{i}" for i in range(4)])
    with pytest.raises(ValueError, match="none of the model's 4 genes") as err:
        annotate(other, str(path), backed=True, copy=copy, silent=True)
    assert err.value.__traceback__ is not None  # the frames are still alive here
    with h5py.File(path, "r+"):
        pass


def test_duplicated_input_gene_names_warn_and_use_the_first_column(adata, state):
    dup = adata.copy()
    names_ = dup.var_names.to_numpy().copy()
    names_[7] = names_[3]
    dup.var_names = names_
    with pytest.warns(UserWarning, match=rf"1 of the model's genes appear more than once in the input \(adata.var_names\), e.g. \['{names_[3]}'\]; the first column of each is used"):
        got = annotate(state, dup, return_probs=True, silent=True)
    assert got.shape == (N_CELLS, len(LABELS))


def test_layer_reads_counts_from_a_layer_and_normalized_x_gets_a_warning(adata, state):
    import warnings

    ref = annotate(state, adata, return_probs=True, silent=True).to_numpy()
    mixed = adata.copy()
    mixed.layers["counts"] = mixed.X.copy()
    mixed.X = np.log1p(np.asarray(mixed.X.todense() if sp.issparse(mixed.X) else mixed.X) / 7.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raw counts in the layer: no warning
        got = annotate(state, mixed, layer="counts", return_probs=True, silent=True).to_numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    with pytest.warns(UserWarning, match=r"the input's values \(adata.X\) are not integers .* pass layer="):
        annotate(state, mixed, return_probs=True, silent=True)
    with pytest.raises(ValueError, match=r"layer 'raw' not found in adata.layers; available: \['counts'\]"):
        annotate(state, mixed, layer="raw", silent=True)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"target_sum": 0}, r"target_sum must be a finite number > 0 or None \(the model's\), got 0"),
        ({"target_sum": -1.0}, r"target_sum must be a finite number > 0 or None"),
        ({"target_sum": float("nan")}, r"target_sum must be a finite number > 0 or None"),
        ({"normalize": "no"}, r"normalize must be True, False or None, got 'no'"),
        ({"batch_size": True}, r"batch_size and n_samples must be integers, got True"),
        ({"randomness": 1}, r"randomness must be True or False, got 1"),
    ],
)
def test_override_values_are_validated(adata, state, kwargs, pattern):
    # They used to run silently: target_sum=0 gave every cell one label, -1 NaN confidences.
    with pytest.raises(ValueError, match=pattern):
        annotate(state, adata, silent=True, **kwargs)
    assert "ginseng_cell_type" not in adata.obs


def test_cells_annotates_those_rows_of_the_input(adata, state, tmp_path):
    """cells= gives the results of annotating adata[cells], for a backed file too, and in place
    leaves the other rows missing."""
    cells = np.array([3, 4, 10, 11, 12, 40, 69])
    sub = adata[cells].copy()
    ref_table, ref_probs = annotate(state, sub, return_table=True, return_probs=True, silent=True)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    for src in (adata.copy(), anndata.read_h5ad(path, backed="r")):
        table, probs = annotate(state, src, return_table=True, return_probs=True, cells=cells,
                                batch_size=3, silent=True)
        pd.testing.assert_frame_equal(table, ref_table)
        pd.testing.assert_frame_equal(probs, ref_probs)
    annotate(state, str(path), backed=True, cells=cells, output=tmp_path / "out.csv",
             truth_key="cell_type", batch_size=4, silent=True)
    written = pd.read_csv(tmp_path / "out.csv", dtype={"barcode": str})
    np.testing.assert_array_equal(written.barcode, sub.obs_names)
    np.testing.assert_array_equal(written.cell_type, ref_table.cell_type.astype(str))
    rep = pd.read_csv(tmp_path / "out.report.csv").set_index("cell_type")
    truth = sub.obs["cell_type"].astype(str)
    for t in truth.unique():
        assert rep.loc[t, "support"] == np.sum(truth == t)
    # a label found only outside the selection is not in the report
    marked = adata.copy()
    marked.obs["cell_type"] = marked.obs["cell_type"].astype(str)
    marked.obs.iloc[0, marked.obs.columns.get_loc("cell_type")] = "elsewhere"
    annotate(state, marked, cells=cells, truth_key="cell_type", report_dir=tmp_path, silent=True)
    rep = pd.read_csv(tmp_path / "annotations.report.csv")
    assert "elsewhere" not in set(rep["cell_type"].astype(str))
    assert set(truth) <= set(rep["cell_type"].astype(str))
    inplace = adata.copy()
    annotate(state, inplace, cells=cells, silent=True)
    col = inplace.obs["ginseng_cell_type"]
    assert col.isna().sum() == N_CELLS - len(cells)
    np.testing.assert_array_equal(col.to_numpy()[cells].astype(str), ref_table.cell_type.astype(str))
    assert np.isnan(inplace.obs["ginseng_confidence"].to_numpy()).sum() == N_CELLS - len(cells)
    ds = pytest.importorskip("ginseng.data").GinsengDataset.create(tmp_path / "ds", adata, "cell_type", silent=True)
    with pytest.raises(ValueError, match="cells= applies to an AnnData input"):
        annotate(state, ds, cells=cells, silent=True)


def _write_10x_h5(path, X, genes, barcodes):
    import h5py

    csc = sp.csc_matrix(X.T.astype(np.int32))  # genes x cells, as Cell Ranger writes it
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices.astype(np.int64), csc.indptr.astype(np.int64)
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        ft = g.create_group("features")
        ft["id"] = np.array([f"ENSG{j:011d}" for j in range(len(genes))], dtype="S")
        ft["name"] = np.array(genes, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        ft["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")


def test_every_input_kind_gives_the_same_bits(tmp_path, monkeypatch):
    """One set of cells as a dense AnnData, a sparse one, a backed h5ad path, a 10x h5 and a
    GinsengDataset: the same predictions and probabilities to every bit, whether the batch was
    sent dense or as its non-zero entries densified on the devices (sparse inputs)."""
    from ginseng.annotate.forward import BatchStream
    from ginseng.data import GinsengDataset

    ad = make_counts(n_cells=150, n_genes=40, n_labels=3, seed=11, sparse=True)
    state = make_state(list(ad.var_names[::-1][:30]))  # 30 of the 40 genes, in another order
    dense = ad.copy()
    dense.X = ad.X.toarray()
    ad.write_h5ad(tmp_path / "x.h5ad")
    _write_10x_h5(tmp_path / "x.h5", ad.X.toarray(), list(ad.var_names), list(ad.obs_names))
    ds = GinsengDataset.create(tmp_path / "x.zarr", dense, labels="cell_type", chunk_size=16, silent=True)
    compact_calls = []
    real = BatchStream._compact
    monkeypatch.setattr(BatchStream, "_compact", lambda self, e: compact_calls.append(1) or real(self, e))

    def run(x, **kw):
        table, probs = annotate(state, x, return_table=True, return_probs=True, batch_size=13, silent=True, **kw)
        return table.cell_type.astype(str).to_numpy(), probs.to_numpy(), table.confidence.to_numpy()

    ref = run(dense)
    assert not compact_calls  # a dense input goes dense
    for x, kw in ((ad, {}), (str(tmp_path / "x.h5ad"), {"backed": True}), (str(tmp_path / "x.h5"), {}), (ds, {})):
        got = run(x, **kw)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_array_equal(a, b)
    assert compact_calls  # the sparse inputs were sent as entries
