"""Cells the model does not know: min_confidence ("Unassigned"), the "auto" threshold the trainer
saves, majority voting over clusters, and how both reach tables, files, reports and the CLI."""

import warnings

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
from conftest import make_counts

from ginseng.annotate import annotate
from ginseng.annotate.reject import AUTO_QUANTILE, auto_threshold, majority_vote
from ginseng.data import GinsengDataset
from ginseng.io import load_ginseng_state, save_ginseng_state
from ginseng.nn import nn_annotate_init
from ginseng.state import CONFIDENCE_BINS, GinsengModelState
from ginseng.train import GinsengTrainer, GinsengTrainerSettings

LABELS = np.array(["type_0", "type_1", "type_2"])  # make_counts' cell types


def make_state(genes, labels=LABELS, seed=0, **kw):
    params = nn_annotate_init(jax.random.key(seed), len(genes), len(labels), 8)
    return GinsengModelState(params, np.asarray(genes, dtype=str), np.arange(len(labels)), np.asarray(labels), **kw)


@pytest.fixture
def adata():
    ad = make_counts(n_cells=90, n_genes=24, n_labels=3, seed=3)
    ad.obs["cluster"] = pd.Categorical(np.arange(90) // 30)  # three clusters of 30 cells
    return ad


@pytest.fixture
def state(adata):
    return make_state(adata.var_names)


def plain(state, adata, **kw):
    return annotate(state, adata, return_table=True, silent=True, **kw)


def test_cells_below_the_threshold_and_only_those_are_unassigned(adata, state):
    ref = plain(state, adata)
    t = float(np.median(ref.confidence))
    got = plain(state, adata, min_confidence=t)
    low = ref.confidence.to_numpy() < t
    assert 0 < low.sum() < len(low)
    assert (got.cell_type[low] == "Unassigned").all()
    assert (got.cell_type[~low].astype(str) == ref.cell_type[~low].astype(str)).all()
    np.testing.assert_array_equal(got.confidence, ref.confidence)  # the confidence is untouched
    assert list(got.cell_type.cat.categories) == [*LABELS, "Unassigned"]
    # in place, as the obs column; 0 rejects nothing, 1 rejects every cell below certainty
    annotate(state, adata, min_confidence=t, silent=True)
    assert (adata.obs["ginseng_cell_type"].astype(str).to_numpy() == got.cell_type.astype(str).to_numpy()).all()
    assert (plain(state, adata, min_confidence=0.0).cell_type.astype(str) == ref.cell_type.astype(str)).all()
    assert (plain(state, adata, min_confidence=1.0).cell_type == "Unassigned").all()


def test_output_files_carry_unassigned_and_the_vote(adata, state, tmp_path):
    t = float(np.median(plain(state, adata).confidence))
    mem, probs = annotate(state, adata, min_confidence=t, over_clustering="cluster", return_table=True,
                          return_probs=True, batch_size=16, silent=True)
    for name in ("a.parquet", "b.csv"):
        annotate(state, adata, min_confidence=t, over_clustering="cluster", return_probs=True,
                 output=tmp_path / name, batch_size=16, silent=True)
        table = pd.read_parquet(tmp_path / name) if name.endswith("parquet") else pd.read_csv(tmp_path / name)
        assert list(table.columns) == ["barcode", "cell_type", "confidence", "majority_voting"]
        assert (table.cell_type.to_numpy() == mem.cell_type.astype(str).to_numpy()).all()
        assert (table.majority_voting.to_numpy() == mem.majority_voting.astype(str).to_numpy()).all()
    import zarr

    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["probs"][:], probs.to_numpy())


def test_majority_vote_overrules_a_clusters_minority():
    # cluster 0: 3 x code 1, 2 x code 0 -> all 1; cluster 1: a tie of 0 and 2 -> the lower code 0;
    # the cell without a cluster (-1) keeps its own
    pred = np.array([1, 0, 1, 0, 1, 2, 0, 2])
    clusters = np.array([0, 0, 0, 0, 0, 1, 1, -1])
    np.testing.assert_array_equal(majority_vote(pred, clusters, 3), [1, 1, 1, 1, 1, 0, 0, 2])
    with pytest.raises(ValueError, match="8 predictions but 2 cluster labels"):
        majority_vote(pred, clusters[:2], 3)


def test_vote_through_annotate_and_a_cluster_of_unassigned_stays_unassigned(adata, state):
    ref = plain(state, adata)
    t = float(np.quantile(ref.confidence, 0.3))
    low = ref.confidence.to_numpy() < t
    # cluster 0: every rejected cell; clusters 1 and 2: the others, split in two
    rest = np.flatnonzero(~low)
    clusters = np.zeros(len(low), int)
    clusters[rest[: len(rest) // 2]], clusters[rest[len(rest) // 2:]] = 1, 2
    adata.obs["c"] = clusters.astype(str)
    got = plain(state, adata, min_confidence=t, over_clustering="c")
    assert (got.majority_voting[low] == "Unassigned").all()
    for c in (1, 2):
        members = clusters == c
        expected = ref.cell_type[members].astype(str).value_counts()
        expected = expected[expected == expected.max()].index
        winner = next(str(v) for v in LABELS if str(v) in set(expected))  # a tie: the model's first
        assert (got.majority_voting[members] == winner).all()
    assert (got.cell_type.astype(str) == np.where(low, "Unassigned", ref.cell_type.astype(str))).all()
    # the same vote from an array of cluster labels, in obs, and for a cells= subset
    arr = plain(state, adata, min_confidence=t, over_clustering=clusters)
    assert (arr.majority_voting.astype(str) == got.majority_voting.astype(str)).all()
    annotate(state, adata, min_confidence=t, over_clustering="c", silent=True)
    assert (adata.obs["ginseng_majority_voting"].astype(str).to_numpy() == got.majority_voting.astype(str).to_numpy()).all()
    sub = annotate(state, adata, cells=np.arange(0, 90, 2), over_clustering="c", return_table=True, silent=True)
    assert len(sub) == 45


def test_a_dataset_input_votes_like_its_anndata(adata, state, tmp_path):
    ds = GinsengDataset.create(tmp_path / "d.zarr", adata, labels="cell_type", silent=True)
    # a dataset's cells are the input's rows, in their original order (read in storage order)
    clusters = adata.obs["cluster"].to_numpy()
    t = float(np.median(plain(state, adata).confidence))
    a = plain(state, adata, min_confidence=t, over_clustering="cluster")
    d = annotate(state, ds, min_confidence=t, over_clustering=clusters, silent=True)
    assert (d.majority_voting.astype(str).to_numpy() == a.majority_voting.astype(str).to_numpy()).all()
    assert (d.cell_type.astype(str).to_numpy() == a.cell_type.astype(str).to_numpy()).all()
    assert (d.cell_type == "Unassigned").any()
    with pytest.raises(ValueError, match="a GinsengDataset has no obs"):
        annotate(state, ds, over_clustering="cluster", silent=True)


def test_report_counts_unassigned_on_its_own_row(adata, state, tmp_path):
    t = float(np.median(plain(state, adata).confidence))
    table = plain(state, adata, min_confidence=t)
    annotate(state, adata, min_confidence=t, truth_key="cell_type", report_dir=tmp_path, silent=True)
    report = pd.read_csv(tmp_path / "annotations.report.csv").set_index("cell_type")
    row = report.loc["Unassigned"]
    assert row.predicted == (table.cell_type == "Unassigned").sum() and row.support == 0
    assert not row.in_model
    # recall of each model label counts its rejected cells as missed
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    for label in LABELS:
        cells = truth == label
        assert cells.any()
        if cells.any():
            expected = (table.cell_type.astype(str).to_numpy()[cells] == label).mean()
            assert report.loc[label].recall == pytest.approx(expected)


def test_bad_values_and_a_colliding_label(adata, state):
    for bad in (1.5, -0.1, "high", True, [0.5]):
        with pytest.raises(ValueError, match="min_confidence must be None, a number in"):
            annotate(state, adata, min_confidence=bad, silent=True)
    with pytest.raises(ValueError, match="does not have"):
        annotate(state, adata, min_confidence="auto", silent=True)
    with pytest.raises(ValueError, match="over_clustering 'nope' is not a column of adata.obs"):
        annotate(state, adata, over_clustering="nope", silent=True)
    with pytest.raises(ValueError, match=r"one cluster label per cell \(90 values\)"):
        annotate(state, adata, over_clustering=np.zeros(5), silent=True)
    clash = make_state(adata.var_names, labels=np.array(["alpha", "Unassigned", "gamma"]))
    with pytest.raises(ValueError, match="has a label named 'Unassigned'"):
        annotate(clash, adata, min_confidence=0.5, silent=True)
    assert "ginseng_cell_type" not in adata.obs  # nothing was written by the refused calls
    got = annotate(clash, adata, min_confidence=1.0, unassigned_label="rejected", return_table=True, silent=True)
    assert set(got.cell_type) == {"rejected"}


def test_auto_threshold_from_a_histogram():
    counts = np.zeros(CONFIDENCE_BINS, np.int64)
    counts[[2048, 3000, 4095]] = [5, 95, 900]  # 1,000 cells: 0.5 % at bin 2048
    t = auto_threshold(counts)
    assert t == 3000 / CONFIDENCE_BINS  # 5 cells (<= 1 %) lie below it; below bin 4095 lie 10 %
    assert auto_threshold(counts, 0.004) == 2048 / CONFIDENCE_BINS
    assert auto_threshold(counts, 0.2) == 4095 / CONFIDENCE_BINS
    counts[:] = 0
    counts[100] = 7
    assert auto_threshold(counts) == 100 / CONFIDENCE_BINS  # rejects none of its own cells


def test_trainer_saves_the_reference_confidences(tmp_path):
    ad = make_counts(n_cells=200, n_genes=30, n_labels=3, seed=5)
    ds = GinsengDataset.create(tmp_path / "d.zarr", ad, labels="cell_type", silent=True)
    settings = GinsengTrainerSettings(batch_size=32, holdout_fraction=0.2, seed=2, hidden_dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, st = GinsengTrainer(ds, settings, epochs=2, silent=True)
    ref = ds.holdout_indices  # (without holdout cells: the training cells, test_train checks)
    assert int(st.confidence_counts.sum()) == len(ref)
    # the histogram of what annotate gives those cells
    sub = anndata.AnnData(ds.get_batch(np.sort(ref)).astype(np.float32))
    sub.var_names = np.asarray(ds.genes).astype(str)
    conf = annotate(st, sub, return_table=True, silent=True).confidence.to_numpy()
    bins = np.minimum(np.floor(conf * CONFIDENCE_BINS).astype(int), CONFIDENCE_BINS - 1)
    np.testing.assert_array_equal(st.confidence_counts, np.bincount(bins, minlength=CONFIDENCE_BINS))
    # it travels through the model file (and is covered by its checksum); "auto" then works
    save_ginseng_state(st, tmp_path / "m.h5")
    back = load_ginseng_state(tmp_path / "m.h5")
    np.testing.assert_array_equal(back.confidence_counts, st.confidence_counts)
    t = auto_threshold(back.confidence_counts)
    assert (conf < t).mean() <= AUTO_QUANTILE
    got = annotate(back, sub, min_confidence="auto", return_table=True, silent=True)
    assert ((got.cell_type == "Unassigned").to_numpy() == (conf < t)).all()
    import h5py

    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f["confidence_counts"][0] += 1
    with pytest.raises(ValueError, match="does not match the checksum"):
        load_ginseng_state(tmp_path / "m.h5")


def test_model_files_without_counts_still_load(tmp_path, state):
    save_ginseng_state(state, tmp_path / "m.h5")
    assert load_ginseng_state(tmp_path / "m.h5").confidence_counts is None
    bad = GinsengModelState(state.params, state.genes, state.label_keys, state.label_values,
                            confidence_counts=np.ones(10))
    with pytest.raises(ValueError, match=f"confidence_counts must be {CONFIDENCE_BINS} integer counts"):
        save_ginseng_state(bad, tmp_path / "bad.h5")
    assert not (tmp_path / "bad.h5").exists()
