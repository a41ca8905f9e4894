"""Trainer tests: settings validation, the logger, the sharded step (1 device vs 4 devices, partial
batches, padding), and whole training runs (reproducible bit for bit; 1 device vs 4 devices)."""

import dataclasses
from collections import namedtuple

import jax
import numpy as np
import pandas as pd
import pytest

from ginseng._core.mesh import global_arrays, make_mesh, replicate, to_host
from ginseng.train import GinsengLogger, GinsengModelState, GinsengTrainer, GinsengTrainerSettings
from ginseng.train.step import build_eval_step, build_init, build_train_step

Batch = namedtuple("Batch", "x y slot mask index")

N_GENES, N_CLASSES = 24, 3


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _identical(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be an integer >= 1, got 2.5"),
        ({"rate": 1.0}, r"rate must be a number >= 0.0 and < 1.0 or None, got 1.0"),
        ({"dropout_rate": -0.1}, r"dropout_rate .* got -0.1"),
        ({"lr": 0.0}, r"lr must be a number > 0.0, got 0.0"),
        ({"lr": float("nan")}, r"lr must be .* got nan"),
        ({"lr_schedule": "linear"}, r"lr_schedule must be 'constant' or 'cosine', got 'linear'"),
        ({"holdout_fraction": 1.0}, r"holdout_fraction .* got 1.0"),
        ({"group_mode": "random"}, r"group_mode must be 'fraction' or 'loo', got 'random'"),
        ({"lower": 5, "upper": 5}, r"upper must be > lower, got lower=5, upper=5"),
        ({"lower": 2}, r"lower=2 needs upper"),
        ({"betas": (0.9, 1.0)}, r"betas must be a pair of numbers in \[0, 1\)"),
        ({"hidden_dim": 0}, r"hidden_dim must be an integer >= 1, got 0"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"target_sum": 0}, r"target_sum .* got 0"),
        ({"checkpoint_every": 0}, r"checkpoint_every must be an integer >= 1 or None, got 0"),
    ],
)
def test_settings_refuse_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GinsengTrainerSettings(**kwargs)


def test_settings_accept_defaults_and_lists():
    s = GinsengTrainerSettings(betas=[0.8, 0.99], target_sum=None, rate=0.1, lower=1, upper=4)
    assert s.betas == (0.8, 0.99)
    assert GinsengTrainerSettings().batch_size == 128


# ------------------------------------------------------------------------------------------
# logger
# ------------------------------------------------------------------------------------------


def test_logger_history_csv_and_plot(tmp_path, capsys):
    log = GinsengLogger()
    log.update(0, 1.5, 1.2, 0.5)
    log.update(1, 1.0, 0.9, 0.75)
    log.report()
    assert "epoch 2" in capsys.readouterr().out
    log.report(silent=True)
    assert capsys.readouterr().out == ""
    df = log.to_dataframe()
    assert list(df.columns) == ["epoch", "train_loss", "holdout_loss", "holdout_accuracy"]
    assert df["holdout_accuracy"].tolist() == [0.5, 0.75]
    csv = log.save_csv(tmp_path / "metrics.csv")
    pd.testing.assert_frame_equal(pd.read_csv(csv), df)
    with pytest.raises(FileExistsError, match="metrics.csv"):
        log.save_csv(tmp_path / "metrics.csv")
    png = log.plot(tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError):
        log.plot(tmp_path / "curve.png")
    log.plot(tmp_path / "curve.png", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "metrics.csv"]


# ------------------------------------------------------------------------------------------
# the sharded step, on in-memory batches
# ------------------------------------------------------------------------------------------


def _batches(n_real, n_steps, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        x = rng.poisson(2.0, (n_real, N_GENES)).astype(np.float32)
        y = rng.integers(0, N_CLASSES, n_real).astype(np.int32)
        out.append((x, y))
    return out


def _pad(x, y, global_rows, junk=False):
    n = len(y)
    xp = np.full((global_rows, N_GENES), 7.0 if junk else 0.0, np.float32)
    yp = np.full(global_rows, N_CLASSES - 1 if junk else 0, np.int32)
    xp[:n], yp[:n] = x, y
    mask = np.arange(global_rows) < n
    return Batch(xp, yp, np.arange(global_rows, dtype=np.int32), mask, np.where(mask, 0, -1))


def _run_steps(settings, devices, batches, total_steps=None, junk=False):
    mesh = make_mesh(devices)
    n_dev = len(devices)
    params, opt = build_init(settings, mesh, N_GENES, N_CLASSES)(jax.random.key(0))
    key = jax.random.wrap_key_data(replicate(jax.random.key_data(jax.random.key(5)), mesh))
    step = build_train_step(settings, mesh, total_steps=total_steps or max(1, len(batches)))
    metrics = replicate(np.zeros(2, np.float32), mesh)
    for x, y in batches:
        rows = -(-len(y) // n_dev) * n_dev
        batch = _pad(x, y, rows, junk)
        params, opt, metrics = step(params, opt, metrics, key, *global_arrays(batch, mesh, rows))
    return to_host(params), to_host(opt), to_host(metrics)


SETTINGS = GinsengTrainerSettings(hidden_dim=8, rate=0.1, lam_max=0.3, lower=0, upper=4)


def test_one_step_one_device_equals_four_devices_partial_batch():
    # 10 real rows: 4 devices pad to 12, with two masked rows on the last device.
    batches = _batches(10, 1)
    p1, o1, m1 = _run_steps(SETTINGS, jax.devices()[:1], batches)
    p4, o4, m4 = _run_steps(SETTINGS, jax.devices(), batches)
    assert len(jax.devices()) == 4
    assert _max_diff(p1, p4) <= 1e-5
    # Adam hides a gradient scale; its first moment (0.1 * grad after one step) does not.
    assert _max_diff(o1.m, o4.m) <= 1e-6
    assert _max_diff(o1.m, jax.tree.map(np.zeros_like, o1.m)) > 1e-4
    assert int(o1.step) == int(o4.step) == 1
    np.testing.assert_allclose(m1, m4, rtol=1e-6)
    assert m1[1] == 10.0  # padding rows are not counted
    assert _max_diff(p1, _run_steps(SETTINGS, jax.devices()[:1], _batches(10, 1, seed=1))[0]) > 1e-4


def test_one_device_step_has_no_all_reduce_and_four_devices_do():
    # A psum over one device is the identity, but XLA would still emit (slow, on CPU) all-reduces.
    def hlo(devices):
        mesh = make_mesh(devices)
        params, opt = build_init(SETTINGS, mesh, N_GENES, N_CLASSES)(jax.random.key(0))
        key = jax.random.wrap_key_data(replicate(jax.random.key_data(jax.random.key(5)), mesh))
        x, y = _batches(8, 1)[0]
        args = global_arrays(_pad(x, y, 8), mesh, 8)
        metrics = replicate(np.zeros(2, np.float32), mesh)
        step = build_train_step(SETTINGS, mesh, total_steps=1)
        return step.lower(params, opt, metrics, key, *args).compile().as_text()

    assert "all-reduce" not in hlo(jax.devices()[:1])
    assert "all-reduce" in hlo(jax.devices())


def test_cosine_schedule_spans_the_given_steps():
    import dataclasses

    batches = _batches(8, 3)
    flat = dataclasses.replace(SETTINGS, lr_schedule="constant")
    cos = dataclasses.replace(SETTINGS, lr_schedule="cosine")
    one = jax.devices()[:1]
    # Step 0 of a cosine schedule runs at the full rate: the same first step as a constant rate.
    assert _identical(_run_steps(flat, one, batches[:1])[0], _run_steps(cos, one, batches[:1])[0])
    # Over 3 steps a 1000-step schedule barely decays (rates 1, 0.99999, 0.99996 x lr); a 3-step
    # one does (1, 0.75, 0.25 x lr): its parameters end far further from the constant-rate ones.
    p_flat = _run_steps(flat, one, batches)[0]
    p_long = _run_steps(cos, one, batches, 1000)[0]
    p_short = _run_steps(cos, one, batches, 3)[0]
    assert 0 < _max_diff(p_long, p_flat) < 0.01 * _max_diff(p_short, p_flat)


def test_step_on_stored_integer_counts_equals_float32_bit_for_bit():
    # The trainer ships counts as stored (uint16) and converts on the device; the host used to
    # convert to float32 first. Both must give the same model, on 1 and on 4 devices, padded rows
    # included (10 real rows on 4 devices: 2 padding rows).
    batches = _batches(10, 2)

    def run(devices, dtype):
        mesh = make_mesh(devices)
        params, opt = build_init(SETTINGS, mesh, N_GENES, N_CLASSES)(jax.random.key(0))
        key = jax.random.wrap_key_data(replicate(jax.random.key_data(jax.random.key(5)), mesh))
        step = build_train_step(SETTINGS, mesh, total_steps=len(batches))
        ev = build_eval_step(SETTINGS, mesh)
        metrics = replicate(np.zeros(2, np.float32), mesh)
        rows = -(-10 // len(devices)) * len(devices)
        for x, y in batches:
            b = _pad(x, y, rows)
            arrays = global_arrays(b._replace(x=b.x.astype(dtype)), mesh, rows)
            assert arrays[0].dtype == dtype
            params, opt, metrics = step(params, opt, metrics, key, *arrays)
        evm = ev(params, replicate(np.zeros(3, np.float32), mesh), arrays[0], arrays[1], arrays[3])
        return to_host(params), to_host(metrics), to_host(evm)

    for devices in (jax.devices()[:1], jax.devices()):
        as_float = run(devices, np.float32)
        as_uint16 = run(devices, np.uint16)
        assert _identical(as_float, as_uint16)


def test_steps_are_bit_identical_run_after_run():
    batches = _batches(9, 3)
    a = _run_steps(SETTINGS, jax.devices(), batches)
    b = _run_steps(SETTINGS, jax.devices(), batches)
    assert _identical(a[0], b[0]) and _identical(a[1], b[1])


def test_padding_rows_do_not_change_the_step():
    batches = _batches(6, 2)  # 4 devices: 8 rows, 2 of them padding
    clean = _run_steps(SETTINGS, jax.devices(), batches, junk=False)
    junk = _run_steps(SETTINGS, jax.devices(), batches, junk=True)
    assert _identical(clean[0], junk[0])
    np.testing.assert_array_equal(clean[2], junk[2])


def test_eval_step_counts_only_real_cells_and_is_deterministic():
    mesh = make_mesh(jax.devices())
    params, _ = build_init(SETTINGS, mesh, N_GENES, N_CLASSES)(jax.random.key(0))
    ev = build_eval_step(SETTINGS, mesh)
    (x, y), = _batches(7, 1)
    batch = _pad(x, y, 8, junk=True)
    arrays = global_arrays(batch, mesh, 8)
    m1 = to_host(ev(params, replicate(np.zeros(3, np.float32), mesh), arrays[0], arrays[1], arrays[3]))
    m2 = to_host(ev(params, replicate(np.zeros(3, np.float32), mesh), arrays[0], arrays[1], arrays[3]))
    np.testing.assert_array_equal(m1, m2)
    assert m1[2] == 7.0 and 0.0 <= m1[1] <= 7.0 and np.isfinite(m1[0])
    # One device, no padding: the same sums.
    mesh1 = make_mesh(jax.devices()[:1])
    params1, _ = build_init(SETTINGS, mesh1, N_GENES, N_CLASSES)(jax.random.key(0))
    b1 = _pad(x, y, 7)
    a1 = global_arrays(b1, mesh1, 7)
    m3 = to_host(build_eval_step(SETTINGS, mesh1)(params1, replicate(np.zeros(3, np.float32), mesh1), a1[0], a1[1], a1[3]))
    np.testing.assert_allclose(m1, m3, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# whole runs
# ------------------------------------------------------------------------------------------


class MemoryLoader:
    """The BatchLoader contract of ginseng.data, in memory (order from (seed, epoch) only)."""

    def __init__(self, ds, indices, batch_size, shuffle, seed, pad_multiple, process_index, process_count):
        self.ds, self.indices, self.shuffle, self.seed = ds, np.asarray(indices), shuffle, seed
        unit = pad_multiple * process_count
        self.batch_size = batch_size
        self.global_batch = -(-batch_size // unit) * unit
        self.local_rows = self.global_batch // process_count
        self.p = process_index
        self.num_batches = -(-len(self.indices) // batch_size)

    def epoch(self, epoch, start_batch=0):
        order = self.indices
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        for b in range(start_batch, self.num_batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            gidx = np.full(self.global_batch, -1, np.int64)
            gidx[: len(idx)] = idx
            lo, hi = self.p * self.local_rows, (self.p + 1) * self.local_rows
            li = gidx[lo:hi]
            mask = li >= 0
            x = np.where(mask[:, None], self.ds.X[np.maximum(li, 0)], 0.0).astype(np.float32)
            y = np.where(mask, self.ds.labels[np.maximum(li, 0)], 0).astype(np.int32)
            yield Batch(x, y, np.arange(lo, hi, dtype=np.int32), mask, li)


class MemoryDataset:
    def __init__(self, n_cells=90, seed=0, holdout=True):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, N_CLASSES, n_cells).astype(np.int32)
        prog = rng.gamma(1.0, 1.0, (N_CLASSES, N_GENES)) * 3
        self.X = rng.poisson(prog[self.labels]).astype(np.float32)
        self.n_genes, self.n_labels = N_GENES, N_CLASSES
        self.genes = np.array([f"G{i}" for i in range(N_GENES)])
        self.label_keys = np.arange(N_CLASSES)
        self.label_values = np.array(["a", "b", "c"])
        self.train_indices = np.arange(n_cells)
        self.holdout_indices = np.arange(0)
        self._holdout = holdout
        self.holdout_calls = []

    def make_holdout(self, holdout_fraction=0.2, rng=None, group_level=False, group_mode="fraction"):
        self.holdout_calls.append(int(rng.integers(1 << 30)))
        if self._holdout:
            perm = np.random.default_rng(0).permutation(len(self.labels))
            k = int(len(perm) * holdout_fraction)
            self.holdout_indices, self.train_indices = np.sort(perm[:k]), np.sort(perm[k:])

    def loader(self, batch_size, *, split="train", shuffle=True, balance=False, seed=0,
               pad_multiple=1, process_index=0, process_count=1, prefetch=2, dtype=np.float32):
        # Yields float32 whatever ``dtype`` asks for: the trainer must take either.
        idx = self.train_indices if split == "train" else self.holdout_indices
        return MemoryLoader(self, idx, batch_size, shuffle, seed, pad_multiple, process_index, process_count)


RUN = dataclasses.replace(SETTINGS, batch_size=10)  # same compiled step as SETTINGS


def test_trainer_two_epochs_one_device_vs_four_and_run_after_run():
    # 72 training cells, batch 10: the last batch has 2 cells; on 4 devices every batch is padded.
    ds = MemoryDataset()
    log1, s1 = GinsengTrainer(ds, RUN, epochs=2, silent=True, devices=jax.devices()[:1])
    log4, s4 = GinsengTrainer(ds, RUN, epochs=2, silent=True)
    log4b, s4b = GinsengTrainer(ds, RUN, epochs=2, silent=True)
    assert _max_diff(s1.params, s4.params) <= 1e-3
    assert _identical(s4.params, s4b.params)
    assert log4.to_dataframe().equals(log4b.to_dataframe())
    np.testing.assert_allclose(log1.train_loss, log4.train_loss, rtol=1e-3)
    assert len(set(ds.holdout_calls)) == 1  # make_holdout got the same seeded rng every run
    assert isinstance(s4, GinsengModelState)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(s4.params))
    assert s4.params["head"]["W"].shape == (N_GENES, N_CLASSES)
    assert list(s4.label_values) == ["a", "b", "c"] and s4.n_genes == N_GENES
    assert s4.dropout_rate == RUN.dropout_rate and s4.target_sum == RUN.target_sum
    assert log4.epoch == [0, 1]
    assert all(np.isfinite(log4.train_loss)) and all(0 <= a <= 1 for a in log4.holdout_accuracy)


def test_trainer_learns_and_other_seed_differs():
    ds = MemoryDataset(n_cells=120)
    s = GinsengTrainerSettings(hidden_dim=8, batch_size=16, lr=1e-2, dropout_rate=0.0)
    log, st = GinsengTrainer(ds, s, epochs=6, silent=True)
    assert log.train_loss[-1] < log.train_loss[0]
    assert log.holdout_accuracy[-1] > 0.6
    _, other = GinsengTrainer(ds, dataclasses.replace(s, seed=2), epochs=1, silent=True)
    assert _max_diff(st.params, other.params) > 1e-3


def test_trainer_without_holdout_logs_nan_and_warns():
    ds = MemoryDataset(holdout=False)
    with pytest.warns(UserWarning, match="no holdout cells"):
        log, st = GinsengTrainer(ds, RUN, epochs=1, silent=True)
    assert np.isnan(log.holdout_loss[0]) and np.isnan(log.holdout_accuracy[0])
    # min_confidence="auto" then reads the training cells' confidences
    assert int(st.confidence_counts.sum()) == len(ds.train_indices) == 90
    assert np.isfinite(log.train_loss[0])


def test_trainer_prints_only_when_not_silent(capsys):
    GinsengTrainer(MemoryDataset(), RUN, epochs=1, silent=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    GinsengTrainer(MemoryDataset(), RUN, epochs=1, silent=False)
    assert "epoch 1 | train loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ValueError, r"epochs must be an integer >= 1, got 0"),
        ({"settings": {"batch_size": 4}}, TypeError, r"settings must be a GinsengTrainerSettings, got dict"),
        ({"devices": []}, ValueError, r"at least one device"),
    ],
)
def test_trainer_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GinsengTrainer(MemoryDataset(), **kwargs)


def test_trainer_refuses_non_dataset():
    with pytest.raises(TypeError, match="GinsengDataset or the path to one, got int"):
        GinsengTrainer(3)


# ------------------------------------------------------------------------------------------
# on a real GinsengDataset (zarr store read through TensorStore)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    from conftest import make_counts

    from ginseng.data import GinsengDataset

    adata = make_counts(n_cells=150, n_genes=N_GENES, n_labels=N_CLASSES, seed=3)
    GinsengDataset.create(tmp_path / "ds.zarr", adata, "cell_type", chunk_size=32, silent=True)
    return tmp_path / "ds.zarr"


def test_trainer_on_dataset_path_one_vs_four_devices(store):
    # 150 cells, holdout 3 labels x int(min_count*0.2); batch 10 with balance: a partial last batch.
    log1, s1 = GinsengTrainer(str(store), RUN, epochs=2, silent=True, devices=jax.devices()[:1])
    log4, s4 = GinsengTrainer(store, RUN, epochs=2, silent=True)
    log4b, s4b = GinsengTrainer(store, RUN, epochs=2, silent=True)
    assert _max_diff(s1.params, s4.params) <= 1e-3
    assert _identical(s4.params, s4b.params)
    assert log4.to_dataframe().equals(log4b.to_dataframe())
    np.testing.assert_allclose(log1.holdout_loss, log4.holdout_loss, rtol=1e-3)
    from ginseng.data import GinsengDataset

    ds = GinsengDataset(store)
    assert ds.has_holdout() and len(ds.holdout_indices) > 0
    assert list(s4.genes) == list(ds.genes)
    assert list(s4.label_values) == ["type_0", "type_1", "type_2"]
    assert np.all(np.isfinite(log4.holdout_loss))


def test_large_gene_counts_warn_what_the_model_costs():
    # genes.select=all on pbmc3k (13,714 genes) made a 1.5 GB model file without a word.
    from jax.sharding import Mesh

    from ginseng.nn import nn_annotate_init
    from ginseng.train.step import build_init, n_params

    params = nn_annotate_init(jax.random.key(0), 50, 7, 9)
    assert n_params(50, 7, 9) == sum(x.size for x in jax.tree.leaves(params))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.warns(UserWarning, match=r"the model has 383 M parameters for 13714 genes .* 1.5 GB as float32"):
        build_init(GinsengTrainerSettings(), mesh, 13714, 9)  # builds the function, allocates nothing
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_init(GinsengTrainerSettings(), mesh, 2000, 9)


def test_integer_labels_come_back_as_integers(tmp_path):
    """Integer labels (e.g. cluster ids) stay integers through dataset, model file and annotate,
    so predictions compare equal to the user's labels (as strings they never would)."""
    import anndata

    from ginseng.annotate import annotate
    from ginseng.data import GinsengDataset
    from ginseng.io import load_ginseng_state, save_ginseng_state

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240) * 10 + 5  # 5, 15, 25: numeric order, not string order
    X = rng.poisson(1.0, (240, 12)).astype(np.float32)
    X[np.arange(240), y // 10] += 30
    ds = GinsengDataset.create(tmp_path / "ds", X, y, silent=True)
    assert ds.label_values.dtype == np.int64 and list(ds.label_values) == [5, 15, 25]
    np.testing.assert_array_equal(GinsengDataset(tmp_path / "ds").label_values[ds.labels], y)
    s = GinsengTrainerSettings(hidden_dim=8, batch_size=16, lr=1e-2, dropout_rate=0.0)
    _, state = GinsengTrainer(ds, s, epochs=4, silent=True)
    save_ginseng_state(state, tmp_path / "m.h5")
    state = load_ginseng_state(tmp_path / "m.h5")
    assert list(state.label_values) == [5, 15, 25]
    adata = anndata.AnnData(X)
    adata.var_names = ds.genes
    pred = annotate(state, adata, copy=True, silent=True).obs["ginseng_cell_type"]
    assert pred.cat.categories.dtype.kind == "i"
    assert np.mean(pred.to_numpy() == y) > 0.9
