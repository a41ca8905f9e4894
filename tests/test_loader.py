"""BatchLoader: epoch coverage, balance, determinism, per-process slices, padding, randomness."""

import threading

import numpy as np
import pytest
from conftest import make_counts

import ginseng.data.loader as gdata
import ginseng.data.sampler as gsampler
from ginseng.data import GinsengDataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    adata = make_counts(n_cells=600, n_genes=16, n_labels=4, seed=2)
    path = tmp_path_factory.mktemp("loader") / "ds.zarr"
    ds = GinsengDataset.create(path, adata, "cell_type", chunk_size=32, groups="donor", silent=True)
    ds.make_holdout(0.2, rng=0)
    ds._X_dense = adata.X  # the input, for checking what the loader delivers
    return ds


def _collect(loader, epoch=0, start_batch=0):
    return list(loader.epoch(epoch, start_batch=start_batch))


def test_train_epoch_covers_each_cell_once(ds):
    ld = ds.loader(50, split="train", seed=1)
    assert ld.num_batches == int(np.ceil(len(ds.train_indices) / 50)) and ld.global_batch == 50
    batches = _collect(ld)
    assert len(batches) == ld.num_batches
    seen = np.concatenate([b.index[b.mask] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), ds.train_indices)  # exactly once each
    assert np.intersect1d(seen, ds.holdout_indices).size == 0
    for b in batches:
        assert b.x.dtype == np.float32 and b.y.dtype == np.int32
        assert b.slot.dtype == np.int32 and b.index.dtype == np.int64 and b.mask.dtype == bool
        real = b.index[b.mask]
        np.testing.assert_array_equal(b.x[b.mask], ds._X_dense[real])
        np.testing.assert_array_equal(b.y[b.mask], ds.labels[real])


def test_dtype_none_keeps_the_stored_counts(ds):
    # What the trainer asks for: the store's own integer counts (half the bytes of float32), the
    # same cells and values as the default float32 batches, padding rows included.
    assert ds._X.dtype.numpy_dtype == np.uint16
    kw = {"split": "train", "seed": 4, "pad_multiple": 8}
    as_float = _collect(ds.loader(50, **kw))
    stored = _collect(ds.loader(50, dtype=None, **kw))
    assert len(stored) == len(as_float) and not stored[-1].mask.all()
    for a, b in zip(as_float, stored, strict=True):
        assert a.x.dtype == np.float32 and b.x.dtype == np.uint16
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.x, b.x.astype(np.float32))
    # An explicit dtype is honoured too.
    assert _collect(ds.loader(50, dtype=np.float64, **kw))[0].x.dtype == np.float64


@pytest.mark.parametrize("dtype", [np.float32, None])
@pytest.mark.parametrize(
    "kw",
    [
        {"split": "train", "pad_multiple": 8},  # a padded last batch
        {"split": "holdout", "shuffle": False},  # sparsely needed chunks: only their rows copied
        {"split": "all", "balance": True, "process_index": 1, "process_count": 2},
    ],
)
def test_assembly_threads_change_nothing(ds, monkeypatch, dtype, kw):
    # Small windows: many groups, so the group buffer is rewritten while worker threads run,
    # and a batch gathered from a stale or half-copied buffer would show. Batches consumed and
    # dropped, and batches kept, must all equal the inline assembly's.
    monkeypatch.setattr(gsampler, "_WINDOW_ROWS", 64)
    monkeypatch.setattr(gdata, "_INFLIGHT_BYTES", 1)
    inline = [(b.index.copy(), b.x.copy(), b.y.copy(), b.mask.copy())
              for b in ds.loader(16, seed=3, dtype=dtype, workers=0, **kw).epoch(2)]
    assert len(inline) > 4
    for workers in (1, 3):
        ld = ds.loader(16, seed=3, dtype=dtype, workers=workers, **kw)
        assert ld.workers == workers
        got = [(b.index.copy(), b.x.copy(), b.y.copy(), b.mask.copy()) for b in ld.epoch(2)]
        kept = _collect(ld, 2)
        for (a, b), k in zip(zip(inline, got, strict=True), kept, strict=True):
            for u, v in zip(a, b, strict=True):
                np.testing.assert_array_equal(u, v)
            np.testing.assert_array_equal(k.x, a[1])
            assert k.x.dtype == (np.uint16 if dtype is None else dtype)


def test_assembly_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    for cpus, expected in ((1, 0), (2, 0), (4, 0), (8, 2), (16, 4), (64, 4)):
        monkeypatch.setattr(gdata.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert gdata._assembly_workers() == expected


def test_holdout_and_all_splits(ds):
    seen = np.concatenate(
        [b.index[b.mask] for b in ds.loader(64, split="holdout", shuffle=False).epoch(0)]
    )
    np.testing.assert_array_equal(np.sort(seen), ds.holdout_indices)
    seen = np.concatenate([b.index[b.mask] for b in ds.loader(64, split="all").epoch(3)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(ds.n_cells))


def test_balance_oversamples(ds):
    ld = ds.loader(40, split="train", balance=True, seed=2)
    train_counts = np.bincount(ds.labels[ds.train_indices], minlength=ds.n_labels)
    assert ld.epoch_size == train_counts.max() * ds.n_labels
    for epoch in (0, 1):
        seen = np.concatenate([b.index[b.mask] for b in ld.epoch(epoch)])
        counts = np.bincount(ds.labels[seen], minlength=ds.n_labels)
        assert np.all(counts == train_counts.max())  # equal per label, by oversampling
        assert set(seen) == set(ds.train_indices)  # every training cell still in play
        assert np.intersect1d(seen, ds.holdout_indices).size == 0


def test_padding_and_global_batch(ds):
    ld = ds.loader(50, split="train", pad_multiple=8, process_count=1)
    assert ld.global_batch == 56
    batches = _collect(ld)
    n_train = len(ds.train_indices)
    for i, b in enumerate(batches):
        n_real = min(50, n_train - i * 50)
        assert b.mask.sum() == n_real and b.mask[:n_real].all()
        np.testing.assert_array_equal(b.slot, np.arange(56))
        assert np.all(b.index[~b.mask] == -1)
        assert np.all(b.x[~b.mask] == 0) and np.all(b.y[~b.mask] == 0)
    # Padding does not change which cells are where.
    plain = _collect(ds.loader(50, split="train"))
    for a, b in zip(plain, batches, strict=True):
        np.testing.assert_array_equal(a.index[a.mask], b.index[b.mask])


@pytest.mark.parametrize("balance", [False, True])
def test_process_slices_concatenate_to_global(ds, balance):
    kw = {"split": "train", "seed": 7, "balance": balance, "pad_multiple": 3}
    whole = ds.loader(45, process_count=1, **kw)
    parts = [ds.loader(45, process_index=p, process_count=3, **kw) for p in range(3)]
    assert whole.global_batch == parts[0].global_batch == 45
    assert parts[0].num_batches == whole.num_batches
    for g, *ps in zip(_collect(whole, 1), *(_collect(p, 1) for p in parts), strict=True):
        for field in ("x", "y", "slot", "mask", "index"):
            np.testing.assert_array_equal(
                getattr(g, field), np.concatenate([getattr(p, field) for p in ps])
            )
        assert all(len(p.index) == 15 for p in ps)


def test_determinism_and_epochs(ds):
    def order(seed, epoch, **kw):
        return np.concatenate([b.index for b in ds.loader(64, seed=seed, **kw).epoch(epoch)])

    np.testing.assert_array_equal(order(1, 0), order(1, 0))
    np.testing.assert_array_equal(order(1, 0, prefetch=1), order(1, 0, prefetch=5))
    assert not np.array_equal(order(1, 0), order(1, 1))
    assert not np.array_equal(order(1, 0), order(2, 0))
    # Resuming mid-epoch gives the same remaining batches.
    ld = ds.loader(64, seed=1)
    full = _collect(ld, 2)
    rest = _collect(ld, 2, start_batch=3)
    assert len(rest) == len(full) - 3
    for a, b in zip(full[3:], rest, strict=True):
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.x, b.x)
    assert _collect(ld, 2, start_batch=ld.num_batches) == []
    # Unshuffled: storage order, identical for every epoch.
    np.testing.assert_array_equal(order(1, 0, shuffle=False), order(5, 4, shuffle=False))


def test_randomness_close_to_iid(tmp_path, monkeypatch):
    # Labels sorted in the input (the worst case for block reads); small windows so that one
    # epoch spans many windows. Batch label mixes must look like iid sampling.
    n, batch = 4000, 64
    adata = make_counts(n_cells=n, n_genes=8, n_labels=5, seed=4)
    adata = adata[np.argsort(adata.obs["cell_type"].to_numpy(), kind="stable")].copy()
    monkeypatch.setattr(gsampler, "_WINDOW_ROWS", 256)
    ds = GinsengDataset.create(tmp_path / "s", adata, "cell_type", chunk_size=32, silent=True)
    glob = np.bincount(ds.labels, minlength=5) / n

    def mean_tv(label_batches):
        return np.mean(
            [0.5 * np.abs(np.bincount(y, minlength=5) / len(y) - glob).sum() for y in label_batches]
        )

    got = mean_tv([b.y[b.mask] for b in ds.loader(batch, split="all", seed=3).epoch(0)])
    rng = np.random.default_rng(0)
    iid = np.mean(
        [
            mean_tv(np.array_split(ds.labels[rng.permutation(n)], np.arange(batch, n, batch)))
            for _ in range(20)
        ]
    )
    assert got < 1.5 * iid, (got, iid)
    # ... whereas reading the sorted rows in order is far from iid (the check has teeth).
    sorted_ds = GinsengDataset.create(
        tmp_path / "u", adata, "cell_type", chunk_size=32, shuffle=False, silent=True
    )
    seq = mean_tv(
        [b.y[b.mask] for b in sorted_ds.loader(batch, split="all", shuffle=False).epoch(0)]
    )
    assert seq > 3 * iid


def test_iter_batches(ds):
    got = list(ds.iter_batches(64, shuffle=True, rng=np.random.default_rng(0), split="train"))
    xs = np.concatenate([x for x, _ in got])
    ys = np.concatenate([y for _, y in got])
    assert xs.shape == (len(ds.train_indices), ds.n_genes) and xs.dtype == np.float32
    assert all(len(y) == 64 for _, y in got[:-1])
    np.testing.assert_array_equal(np.sort(ys), np.sort(ds.labels[ds.train_indices]))
    # shuffle=False: the cells in dataset order, although the store holds them permuted (it
    # used to give storage order, which the caller could not map back to cells).
    got = list(ds.iter_batches(100))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), np.asarray(ds._X_dense))
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), ds.labels)
    assert [len(y) for _, y in got] == [100] * 6
    hold = list(ds.iter_batches(7, split="holdout"))
    np.testing.assert_array_equal(np.concatenate([y for _, y in hold]), ds.labels[np.sort(ds.holdout_indices)])
    np.testing.assert_array_equal(
        np.concatenate([x for x, _ in hold]), np.asarray(ds._X_dense)[np.sort(ds.holdout_indices)]
    )
    # Windows smaller than the split (as on a large store): same batches.
    old = GinsengDataset.ORDERED_WINDOW_BYTES
    try:
        GinsengDataset.ORDERED_WINDOW_BYTES = 3 * 7 * 4 * ds.n_genes  # 3 batches per window
        again = list(ds.iter_batches(7, split="holdout"))
    finally:
        GinsengDataset.ORDERED_WINDOW_BYTES = old
    assert len(again) == len(hold)
    for (xa, ya), (xb, yb) in zip(again, hold, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    bal = np.concatenate(
        [y for _, y in ds.iter_batches(64, shuffle=True, rng=1, split="train", balance_train=True)]
    )
    counts = np.bincount(bal, minlength=ds.n_labels)
    assert np.all(counts == counts.max())


def test_loader_errors(ds):
    with pytest.raises(
        ValueError, match=r"split must be one of \('train', 'holdout', 'all'\), found 'test'"
    ):
        ds.loader(8, split="test")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, found 0"):
        ds.loader(0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        list(ds.iter_batches(-3))
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\), found 2"):
        ds.loader(8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="start_batch must be in"):
        list(ds.loader(8).epoch(0, start_batch=10**6))
    for workers in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"workers must be an integer >= 0 or None, found {workers!r}"):
            ds.loader(8, workers=workers)


def test_early_exit_stops_reader_thread(ds):
    before = threading.active_count()
    for _ in range(3):
        it = ds.loader(16, prefetch=1).epoch(0)
        next(it)
        it.close()
    assert threading.active_count() == before


def test_epoch_plans_batches_as_it_reads_not_all_upfront(ds, monkeypatch):
    # Memory must not grow with the dataset: the loader may plan only a few groups ahead of use.
    monkeypatch.setattr(gsampler, "_WINDOW_ROWS", 64)  # groups of 8 batches of 8 rows
    monkeypatch.setattr(gdata, "_INFLIGHT_BYTES", 1)  # 4 chunk reads in flight
    calls = []
    layout = gdata.BatchLoader._batch_layout

    def counting(self, plan, b):
        calls.append(b)
        return layout(self, plan, b)

    monkeypatch.setattr(gdata.BatchLoader, "_batch_layout", counting)
    ld = ds.loader(8, split="train", seed=3, prefetch=1)
    it = ld.epoch(0)
    first = next(it)
    threading.Event().wait(0.3)  # let the reader run as far ahead as it is allowed to
    assert len(calls) <= 40 < ld.num_batches
    rest = list(it)
    seen = np.concatenate([b.index[b.mask] for b in [first, *rest]])
    np.testing.assert_array_equal(np.sort(seen), ds.train_indices)
    assert sorted(calls) == list(range(ld.num_batches))  # each batch planned exactly once
    for b in rest[:5]:
        np.testing.assert_array_equal(b.x[b.mask], ds._X_dense[b.index[b.mask]])


# ------------------------------------------------------------------------------------------
# the epoch plan alone (ginseng.data.sampler): pure numpy, no store
# ------------------------------------------------------------------------------------------


def _plan_inputs(n=1000, n_labels=3, chunk_rows=16, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(n_labels, n, p=[0.7, 0.2, 0.1]).astype(np.int32)
    rank = rng.permutation(n).astype(np.int64)  # stored row of each original cell
    cells = np.sort(rng.choice(n, 800, replace=False)).astype(np.int64)
    return cells, labels, n_labels, rank, chunk_rows


def test_plan_is_a_permutation_of_the_split_and_depends_only_on_seed_and_epoch():
    from ginseng.data import sampler

    cells, labels, k, rank, chunk = _plan_inputs()
    plan = sampler.epoch_plan(cells, labels, k, rank, chunk, seed=3, epoch=1, shuffle=True, balance=False)
    assert np.array_equal(np.sort(plan), cells)
    again = sampler.epoch_plan(cells, labels, k, rank, chunk, seed=3, epoch=1, shuffle=True, balance=False)
    assert np.array_equal(plan, again)
    other = sampler.epoch_plan(cells, labels, k, rank, chunk, seed=3, epoch=2, shuffle=True, balance=False)
    assert not np.array_equal(plan, other)
    ordered = sampler.epoch_plan(cells, labels, k, rank, chunk, seed=3, epoch=1, shuffle=False, balance=False)
    assert np.all(np.diff(rank[ordered]) > 0)  # storage order


def test_plan_windows_are_whole_chunks():
    # Shuffled rows of one window come from a set of whole chunks: with windows of 4 chunks, the
    # first 4 * chunk_rows planned cells (all cells of the split) touch at most 4 chunks.
    from ginseng.data import sampler

    n, chunk = 4096, 64
    rank = np.random.default_rng(1).permutation(n).astype(np.int64)
    cells = np.arange(n, dtype=np.int64)
    labels = np.zeros(n, np.int32)
    old = sampler._WINDOW_ROWS
    try:
        sampler._WINDOW_ROWS = 4 * chunk
        plan = sampler.epoch_plan(cells, labels, 1, rank, chunk, seed=0, epoch=0, shuffle=True, balance=False)
    finally:
        sampler._WINDOW_ROWS = old
    for w in range(0, n, 4 * chunk):
        assert len(np.unique(rank[plan[w : w + 4 * chunk]] // chunk)) == 4


def test_balanced_plan_gives_every_label_the_largest_count_and_keeps_every_cell():
    from ginseng.data import sampler

    cells, labels, k, rank, chunk = _plan_inputs()
    plan = sampler.epoch_plan(cells, labels, k, rank, chunk, seed=0, epoch=0, shuffle=True, balance=True)
    counts = np.bincount(labels[cells], minlength=k)
    assert len(plan) == sampler.epoch_size(cells, labels, k, True) == counts.max() * k
    assert np.all(np.bincount(labels[plan], minlength=k) == counts.max())
    assert set(cells) <= set(plan)


def test_process_slices_of_a_plan_cover_each_batch_once():
    from ginseng.data import sampler

    plan = np.arange(100, 137, dtype=np.int64)  # 37 cells, batch 10 -> 4 batches, the last partial
    for b in range(4):
        parts = [sampler.batch_layout(plan, b, 10, 6, p) for p in range(2)]  # global batch 12
        index = np.concatenate([ix for ix, _, _ in parts])
        mask = np.concatenate([m for _, _, m in parts])
        slots = np.concatenate([s for _, s, _ in parts])
        assert np.array_equal(slots, np.arange(12))
        assert np.array_equal(index[mask], plan[b * 10 : b * 10 + 10])
        assert np.all(index[~mask] == -1)
