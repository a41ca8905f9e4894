"""GinsengDataset: creation round trips, metadata, holdout splits, and bad input."""

import json

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import make_counts

from ginseng.data import FORMAT_NAME, GinsengDataset


def _dense(a):
    return a.toarray() if sp.issparse(a) else np.asarray(a)


@pytest.mark.parametrize(
    ("kind", "spill"),
    [("numpy", True), ("csr", True), ("csc", True), ("backed_sparse", True),
     ("backed_dense", True), ("backed_sparse", False), ("backed_dense", False)],
)
def test_multi_run_write_round_trip_and_input_passes(tmp_path, monkeypatch, kind, spill):
    """A dataset bigger than the write buffer: stored row s is input row order[s], for in-memory
    and on-disk inputs, with a gene mask. A backed input past _SPILL_MIN_RUNS buffers is streamed
    exactly twice (the value check and the bucket pass), not once per buffer-full; below it, once
    per buffer."""
    import ginseng.data.create as gd

    monkeypatch.setattr(gd, "_SPILL_MIN_RUNS", 2 if spill else 100)

    adata = make_counts(n_cells=300, n_genes=40, sparse=True)
    X = _dense(adata.X)
    mask = np.arange(40) % 3 != 0
    # 26 kept genes x 2 bytes: a 2,000-byte buffer holds 38 rows -> runs of 35 rows (5 chunks of 7)
    monkeypatch.setattr(gd, "_WRITE_BUFFER_BYTES", 2000)
    monkeypatch.setattr(gd, "_READ_BLOCK_BYTES", 26 * 4 * 50)  # 50-row input blocks
    src = {"numpy": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}.get(kind)
    if kind.startswith("backed"):
        if kind == "backed_dense":
            adata.X = X
        adata.write_h5ad(tmp_path / "in.h5ad")
        src = anndata.read_h5ad(tmp_path / "in.h5ad", backed="r")
    reads = []
    block = gd._Source.block
    monkeypatch.setattr(gd._Source, "block", lambda self, a, b: reads.append(a) or block(self, a, b))
    ds = GinsengDataset.create(
        tmp_path / "ds.zarr", src, adata.obs["cell_type"].to_numpy(), chunk_size=7,
        gene_mask=mask, seed=5, silent=True,
    )
    if kind.startswith("backed"):
        src.file.close()
        # 300 rows in 50-row blocks (a dense input is read with all 40 columns: 32-row blocks):
        # one pass for the value check, then one for the bucket pass, or one per run of 35
        # stored rows (9 runs) without the spill
        step = 32 if kind == "backed_dense" else 50
        assert sorted(reads) == sorted(list(range(0, 300, step)) * (2 if spill else 10))
    order = np.asarray(ds.root["order"][:])
    assert not np.array_equal(order, np.arange(300))
    np.testing.assert_array_equal(np.asarray(ds.root["X"][:]), X[order][:, mask])
    np.testing.assert_array_equal(ds.get_batch(np.arange(300)), X[:, mask])
    assert sorted(p.name for p in (tmp_path / "ds.zarr").iterdir()) == [
        "X", "genes", "label_values", "labels", "order", "zarr.json"
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # the same with a selection of cells (every third row, and the last)
    cells = np.r_[np.arange(0, 299, 3), 299]
    ds = GinsengDataset.create(
        tmp_path / "sel.zarr", src if not kind.startswith("backed") else anndata.read_h5ad(tmp_path / "in.h5ad", backed="r"),
        adata.obs["cell_type"].to_numpy(), chunk_size=7, gene_mask=mask, cells=cells, seed=5, silent=True,
    )
    np.testing.assert_array_equal(ds.get_batch(np.arange(len(cells))), X[cells][:, mask])


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("kind", ["dense", "sparse", "backed", "layer", "numpy", "csr"])
def test_round_trip(tmp_path, kind, shuffle):
    adata = make_counts(n_cells=150, n_genes=40, sparse=kind in ("sparse", "backed"))
    X = _dense(adata.X)
    labels = "cell_type"
    src = adata
    if kind == "backed":
        adata.write_h5ad(tmp_path / "in.h5ad")
        src = anndata.read_h5ad(tmp_path / "in.h5ad", backed="r")
    elif kind == "layer":
        adata.layers["counts"] = adata.X.copy()
        adata.X = np.zeros_like(adata.X)
        src = adata
    elif kind in ("numpy", "csr"):
        src = X if kind == "numpy" else sp.csr_matrix(X)
        labels = adata.obs["cell_type"].to_numpy()
    ds = GinsengDataset.create(
        tmp_path / "ds.zarr",
        src,
        labels,
        chunk_size=16,
        layer="counts" if kind == "layer" else None,
        shuffle=shuffle,
        seed=3,
        silent=True,
    )
    if kind == "backed":
        src.file.close()
    assert (ds.n_cells, ds.n_genes, ds.n_labels, ds.chunk_rows) == (150, 40, 4, 16)
    assert ds.root["X"].dtype == np.uint16
    idx = np.array([149, 0, 7, 7, 63, 16, 15])
    np.testing.assert_array_equal(ds.get_batch(idx), X[idx])
    assert ds.get_batch(idx).dtype == np.float32
    np.testing.assert_array_equal(ds.get_batch(np.arange(150)), X)
    # Labels come back in original order, encoded by sorted label values.
    np.testing.assert_array_equal(
        ds.label_values[ds.labels], adata.obs["cell_type"].astype(str).to_numpy()
    )
    np.testing.assert_array_equal(ds.label_values, ["type_0", "type_1", "type_2", "type_3"])
    np.testing.assert_array_equal(ds.label_keys, np.arange(4))
    if kind in ("numpy", "csr"):
        np.testing.assert_array_equal(ds.genes, [f"gene_{j}" for j in range(40)])
    else:
        np.testing.assert_array_equal(ds.genes, adata.var_names.to_numpy())
    x, y = ds[10]
    np.testing.assert_array_equal(x, X[10])
    assert y == ds.labels[10]
    # A shuffled store really stores rows permuted (so chunks hold random cells).
    order = ds.root["order"][:]
    assert (not np.array_equal(order, np.arange(150))) == shuffle


def test_gene_mask_and_gene_key(tmp_path, small_adata):
    X = small_adata.X
    keep = small_adata.var["keep"].to_numpy()
    ds = GinsengDataset.create(
        tmp_path / "a", small_adata, "cell_type", gene_mask="keep", gene_key="symbol", silent=True
    )
    assert ds.n_genes == keep.sum()
    np.testing.assert_array_equal(ds.genes, small_adata.var["symbol"].to_numpy()[keep])
    idx = np.array([3, 1, 399])
    np.testing.assert_array_equal(ds.get_batch(idx), X[idx][:, keep])
    ds2 = GinsengDataset.create(
        tmp_path / "b", small_adata, "cell_type", gene_mask=keep, chunk_size=(50, 7), silent=True
    )
    assert ds2.root["X"].chunks == (50, 7)
    np.testing.assert_array_equal(ds2.get_batch(idx), X[idx][:, keep])
    np.testing.assert_array_equal(ds2.genes, small_adata.var_names.to_numpy()[keep])


def test_metadata_groups_and_reopen(tmp_path, small_adata):
    ds = GinsengDataset.create(
        tmp_path / "d", small_adata, "cell_type", groups="donor", silent=True
    )
    np.testing.assert_array_equal(ds.groups, small_adata.obs["donor"].astype(str).to_numpy())
    for k, ind in ds.label_indices.items():
        assert np.all(ds.labels[ind] == k)
    assert sum(len(v) for v in ds.label_indices.values()) == ds.n_cells
    assert not ds.has_holdout()
    np.testing.assert_array_equal(ds.train_indices, np.arange(400))
    assert ds.holdout_indices.size == 0
    assert len(ds) == 400 and ds.__len__("holdout") == 0
    again = GinsengDataset(tmp_path / "d")
    assert again.identity == ds.identity
    other = GinsengDataset.create(tmp_path / "e", small_adata, "cell_type", silent=True)
    assert other.identity != ds.identity
    assert again.groups is not None and other.groups is None
    attrs = json.loads((tmp_path / "d" / "zarr.json").read_text())["attributes"]
    assert (
        attrs["format"] == FORMAT_NAME
        and attrs["format_version"] == 1
        and attrs["complete"] is True
    )


def test_dtypes_and_float_warning(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 10)
    big = rng.integers(0, 100, (20, 5)).astype(np.float64)
    big[0, 0] = 70000
    ds = GinsengDataset.create(tmp_path / "big", big, labels, silent=True)
    assert ds.root["X"].dtype == np.uint32
    np.testing.assert_array_equal(ds.get_batch(np.arange(20)), big.astype(np.float32))
    norm = rng.random((20, 5)).astype(np.float32)
    with pytest.warns(UserWarning, match="non-integer"):
        ds = GinsengDataset.create(tmp_path / "norm", norm, labels, silent=True)
    assert ds.root["X"].dtype == np.float32
    np.testing.assert_array_equal(ds.get_batch(np.arange(20)), norm)


# ---------------------------------------------------------------------------- holdout
def test_make_holdout_per_label(tmp_path, small_adata):
    ds = GinsengDataset.create(tmp_path / "d", small_adata, "cell_type", silent=True)
    counts = np.bincount(ds.labels)
    ds.make_holdout(0.2, rng=np.random.default_rng(5))
    n_hold = int(counts.min() * 0.2)
    np.testing.assert_array_equal(
        np.bincount(ds.labels[ds.holdout_indices], minlength=4), [n_hold] * 4
    )
    assert np.intersect1d(ds.train_indices, ds.holdout_indices).size == 0
    np.testing.assert_array_equal(
        np.sort(np.concatenate([ds.train_indices, ds.holdout_indices])), np.arange(400)
    )
    assert ds.has_holdout()
    # Persisted; deterministic for a seed (int or Generator), different for another seed.
    again = GinsengDataset(tmp_path / "d")
    assert again.has_holdout()
    np.testing.assert_array_equal(again.holdout_indices, ds.holdout_indices)
    np.testing.assert_array_equal(again.train_indices, ds.train_indices)
    first = ds.holdout_indices.copy()
    live = ds.attrs["split"]
    ds.make_holdout(0.2, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(ds.holdout_indices, first)
    # The same split again leaves the store untouched (the live split keeps its name): runs
    # sharing a dataset (a sweep over model settings) do not rewrite it under each other.
    assert GinsengDataset(tmp_path / "d").attrs["split"] == live
    # ... compared with the store, not with this object's copy: another run's split in between
    # (a second object on the same store) is replaced, and both objects agree with the store.
    other = GinsengDataset(tmp_path / "d")
    other.make_holdout(0.2, rng=9)
    ds.make_holdout(0.2, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(GinsengDataset(tmp_path / "d").holdout_indices, first)
    np.testing.assert_array_equal(ds.holdout_indices, first)
    ds.make_holdout(0.2, rng=6)
    assert not np.array_equal(ds.holdout_indices, first)
    # Only the live split is kept in the store.
    assert sum(1 for k in ds.root.group_keys() if k.startswith("split_")) == 1


@pytest.mark.parametrize("mode,n_groups_held", [("fraction", 2), ("loo", 1)])
def test_make_holdout_groups_no_leak(tmp_path, small_adata, mode, n_groups_held):
    ds = GinsengDataset.create(
        tmp_path / "d", small_adata, "cell_type", groups="donor", silent=True
    )
    ds.make_holdout(0.4, rng=1, group_level=True, group_mode=mode)
    held = set(ds.groups[ds.holdout_indices])
    assert len(held) == n_groups_held  # round(5 * 0.4) = 2
    assert held.isdisjoint(set(ds.groups[ds.train_indices]))
    assert len(ds.train_indices) + len(ds.holdout_indices) == 400
    again = GinsengDataset(tmp_path / "d")
    np.testing.assert_array_equal(again.holdout_indices, ds.holdout_indices)


def test_make_holdout_group_fraction_bounds(tmp_path, small_adata):
    ds = GinsengDataset.create(
        tmp_path / "d", small_adata, "cell_type", groups="donor", silent=True
    )
    ds.make_holdout(0.01, rng=0, group_level=True)  # round(0.05) = 0 -> at least one group
    assert len(set(ds.groups[ds.holdout_indices])) == 1
    ds.make_holdout(0.99, rng=0, group_level=True)  # round(4.95) = 5 -> fewer than all
    assert len(set(ds.groups[ds.holdout_indices])) == 4


def test_make_holdout_errors(tmp_path, small_adata):
    ds = GinsengDataset.create(tmp_path / "d", small_adata, "cell_type", silent=True)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"holdout_fraction must be in \(0, 1\)"):
            ds.make_holdout(bad)
    with pytest.raises(ValueError, match="smallest label 'type_.' has [0-9]+ cells"):
        ds.make_holdout(0.001)
    with pytest.raises(ValueError, match="group_mode must be one of .*'loo'.*found 'bogus'"):
        ds.make_holdout(0.2, group_level=True, group_mode="bogus")
    with pytest.raises(ValueError, match="without groups"):
        ds.make_holdout(0.2, group_level=True)
    assert not ds.has_holdout()


# ---------------------------------------------------------------------------- bad input
def test_bad_input_nothing_written(tmp_path, small_adata):
    p = tmp_path / "d"
    cases = [
        ({"labels": np.zeros(10)}, ValueError, "labels has 10 entries but the data has 400 cells"),
        (
            {"labels": "celltype"},
            ValueError,
            "labels column 'celltype' not found in adata.obs; columns: .*'cell_type'",
        ),
        ({"groups": "donr"}, ValueError, "groups column 'donr' not found.*'donor'"),
        (
            {"gene_key": "sym"},
            ValueError,
            "gene_key column 'sym' not found in adata.var; columns: .*'symbol'",
        ),
        ({"gene_mask": "kep"}, ValueError, "gene_mask column 'kep' not found.*'keep'"),
        ({"gene_mask": "symbol"}, ValueError, "must be boolean"),
        (
            {"gene_mask": np.ones(5, bool)},
            ValueError,
            "gene_mask has 5 entries but the data has 120 genes",
        ),
        ({"gene_mask": np.zeros(120, bool)}, ValueError, "gene_mask selects 0 of 120 genes"),
        ({"labels": np.array(["x"] * 400)}, ValueError, "at least 2 labels, found 1"),
        ({"layer": "raw"}, ValueError, "layer 'raw' not found"),
    ]
    for kwargs, exc, match in cases:
        kwargs = {"labels": "cell_type", **kwargs}
        with pytest.raises(exc, match=match):
            GinsengDataset.create(p, small_adata, silent=True, **kwargs)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "value,match", [(-1.0, "non-negative, found -1"), (np.nan, "finite"), (np.inf, "finite")]
)
@pytest.mark.parametrize("sparse", [False, True])
def test_bad_counts(tmp_path, value, match, sparse):
    adata = make_counts(n_cells=50, n_genes=10, sparse=sparse)
    if sparse:
        adata.X.data[3] = value
    else:
        adata.X[7, 2] = value
    with pytest.raises(ValueError, match=match):
        GinsengDataset.create(tmp_path / "d", adata, "cell_type", silent=True)
    assert list(tmp_path.iterdir()) == []


def test_existing_paths(tmp_path, small_adata):
    p = tmp_path / "d"
    ds = GinsengDataset.create(p, small_adata, "cell_type", silent=True)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        GinsengDataset.create(p, small_adata, "cell_type", silent=True)
    ds2 = GinsengDataset.create(p, small_adata, "donor", overwrite=True, silent=True)
    assert ds2.n_labels == 5 and ds2.identity != ds.identity
    # A user's directory that is not a ginseng dataset is never deleted, even with overwrite.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a ginseng dataset; refusing"):
        GinsengDataset.create(mine, small_adata, "cell_type", overwrite=True, silent=True)
    assert (mine / "precious.txt").read_text() == "keep me"
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a ginseng dataset"):
        GinsengDataset.create(f, small_adata, "cell_type", overwrite=True, silent=True)
    assert f.read_text() == "x"


def test_open_refuses(tmp_path, small_adata):
    with pytest.raises(ValueError, match="is not a ginseng dataset"):
        GinsengDataset(tmp_path)
    with pytest.raises(ValueError, match="is not a ginseng dataset"):
        GinsengDataset(tmp_path / "missing")
    p = tmp_path / "d"
    GinsengDataset.create(p, small_adata, "cell_type", silent=True)
    meta = p / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = 99
    meta.write_text(json.dumps(doc))
    before = sorted(x.name for x in p.rglob("*"))
    with pytest.raises(ValueError, match="format_version 99; this ginseng reads version 1"):
        GinsengDataset(p)
    doc["attributes"]["format_version"] = 1
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="incomplete"):
        GinsengDataset(p)
    assert sorted(x.name for x in p.rglob("*")) == before


def test_get_batch_index_errors(tmp_path, small_adata):
    ds = GinsengDataset.create(tmp_path / "d", small_adata, "cell_type", silent=True)
    with pytest.raises(IndexError, match=r"\[0, 400\)"):
        ds.get_batch([400])
    with pytest.raises(ValueError, match="split must be one of"):
        len(ds.__len__("test"))


@pytest.mark.parametrize("kind", ["numpy", "csr", "backed"])
def test_create_from_selected_cells(tmp_path, kind):
    """cells= keeps those input rows (labels and groups given per input row), nothing else read
    into the dataset; a bad selection is refused and nothing written."""
    adata = make_counts(n_cells=120, n_genes=30, sparse=True)
    adata.obs["donor"] = np.repeat(["d1", "d2", "d3"], 40)
    X = _dense(adata.X)
    cells = np.sort(np.random.default_rng(1).choice(120, 50, replace=False))
    src = {"numpy": X, "csr": sp.csr_matrix(X)}.get(kind)
    labels, groups = adata.obs["cell_type"].to_numpy(), adata.obs["donor"].to_numpy()
    if kind == "backed":
        adata.write_h5ad(tmp_path / "in.h5ad")
        src, labels, groups = anndata.read_h5ad(tmp_path / "in.h5ad", backed="r"), "cell_type", "donor"
    ds = GinsengDataset.create(tmp_path / "ds.zarr", src, labels, groups=groups, cells=cells,
                               chunk_size=8, silent=True)
    assert ds.n_cells == 50
    np.testing.assert_array_equal(ds.get_batch(np.arange(50)), X[cells])
    np.testing.assert_array_equal(ds.label_values[ds.labels], adata.obs["cell_type"].to_numpy()[cells])
    np.testing.assert_array_equal(ds.groups, adata.obs["donor"].to_numpy()[cells])
    with pytest.raises(ValueError, match=r"cells must be row indices in \[0, 120\)"):
        GinsengDataset.create(tmp_path / "bad.zarr", src, labels, cells=[5, 120], silent=True)
    assert not (tmp_path / "bad.zarr").exists()
    if kind == "backed":
        src.file.close()


def test_has_holdout_is_a_property_that_can_also_be_called_and_n_groups(tmp_path, small_adata):
    # ginseng 0.1 has `if ds.has_holdout:`; a bound method there would always be true.
    ds = GinsengDataset.create(tmp_path / "g.zarr", small_adata, "cell_type", groups="donor", silent=True)
    assert not ds.has_holdout and not ds.has_holdout() and ds.has_holdout == False
    ds.make_holdout(0.2, rng=np.random.default_rng(0))
    assert ds.has_holdout and ds.has_holdout() and ds.has_holdout == True
    assert ds.n_groups == small_adata.obs["donor"].nunique() == 5
    plain = GinsengDataset.create(tmp_path / "p.zarr", small_adata, "cell_type", silent=True)
    assert plain.n_groups == 0
