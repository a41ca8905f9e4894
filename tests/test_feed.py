"""Training from device data (issue 14): the resident and streamed feeds give the same model to
every bit, several steps per dispatch change nothing measurable, padding steps are no-ops, the
device count does not matter, and the mode chosen is said with its reason."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import make_counts

from ginseng.data import GinsengDataset, sampler
from ginseng.train import GinsengTrainer, GinsengTrainerSettings
from ginseng.train import feed as F
from ginseng.train.step import build_init, build_multi_step

SETTINGS = GinsengTrainerSettings(hidden_dim=16, batch_size=24, rate=0.1, lam_max=0.3, lower=0, upper=5,
                                  seed=4, holdout_fraction=0.2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("feed") / "ds.zarr"
    adata = make_counts(n_cells=300, n_genes=30, n_labels=4, seed=7)
    GinsengDataset.create(path, adata, "cell_type", chunk_size=16, silent=True)
    return path


@pytest.fixture
def small_windows(monkeypatch):
    # Windows of 4 chunks: an epoch spans several windows, and a dispatch group several buffers.
    monkeypatch.setattr(sampler, "_WINDOW_ROWS", 64)


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _train(store, epochs=2, devices=None, **kw):
    log, state = GinsengTrainer(GinsengDataset(store), dataclasses.replace(SETTINGS, **kw), epochs=epochs,
                                silent=True, devices=devices)
    return log, state


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True))


def test_resident_and_streamed_train_the_same_model_to_every_bit(store, small_windows):
    log_r, res = _train(store, device_data="resident", steps_per_dispatch=4)
    log_s, st = _train(store, device_data="streamed", steps_per_dispatch=4)
    assert _same(res, st)
    assert log_r.to_dataframe().equals(log_s.to_dataframe())  # holdout evaluated the same way
    np.testing.assert_array_equal(res.confidence_counts, st.confidence_counts)


def test_steps_per_dispatch_change_no_bit_and_the_host_loader_agrees(store, small_windows, monkeypatch):
    _, one = _train(store, steps_per_dispatch=1, epochs=1)
    _, eight = _train(store, steps_per_dispatch=8, epochs=1)
    _, five = _train(store, steps_per_dispatch=5, epochs=1)  # 10 batches: groups 5+5, then 5+5
    # every step is the same program whatever the grouping: identical to every bit
    assert _same(one, eight) and _same(one, five)
    # the host loader batch by batch (the path of a dataset the feeds cannot read): another
    # program (the batch arrives as an array, not gathered on the device), within 1e-5
    monkeypatch.setattr(F, "supports", lambda ds: False)
    _, host = _train(store, epochs=1)
    assert np.max(np.abs(_flat(one.params) - _flat(host.params))) <= 1e-5


def test_one_device_equals_four(store):
    _, four = _train(store)
    _, one = _train(store, devices=jax.devices()[:1])
    assert np.max(np.abs(_flat(four.params) - _flat(one.params))) <= 1e-3


def test_a_fully_masked_step_changes_nothing(store):
    """Padding batches (rows all -1) leave params, Adam's moments and step, and the metrics as
    they were: a dispatch of [batch, padding, padding] equals a dispatch of [batch]."""
    ds = GinsengDataset(store)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    from ginseng._core.mesh import layout, replicate

    feed = F.ResidentFeed(ds, mesh, layout(mesh))
    step = build_multi_step(SETTINGS, mesh, 10)
    init = build_init(SETTINGS, mesh, ds.n_genes, ds.n_labels)
    key = jax.random.wrap_key_data(replicate(np.asarray(jax.random.key_data(jax.random.key(3))), mesh))
    rows = np.arange(24, dtype=np.int32)[None]
    outs = []
    for k in (1, 3):
        params, opt = init(jax.random.key(0))
        r = np.full((k, 24), -1, np.int32)
        r[0] = rows
        out = step(params, opt, replicate(np.zeros(2, np.float32), mesh), key, feed.X, feed.labels,
                   F._global_rows(r, mesh, 24))
        outs.append(jax.tree.map(np.asarray, out))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(outs[1][1].step) == 1


def test_dispatch_groups_stop_at_checkpoints():
    assert F.dispatch_groups(10, 0, 4, None) == [range(4), range(4, 8), range(8, 10)]
    assert F.dispatch_groups(10, 3, 4, 5) == [range(3, 5), range(5, 9), range(9, 10)]
    assert F.dispatch_groups(10, 10, 4, None) == []
    groups = F.dispatch_groups(97, 0, 8, 7)
    assert [b for g in groups for b in g] == list(range(97))
    assert all(len(g) <= 8 and (g.start // 7 == (g.stop - 1) // 7) for g in groups)


def test_auto_says_why_it_streams(store, monkeypatch, capsys):
    ds = GinsengDataset(store)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    assert F.choose_mode(ds, "auto", mesh)[0] == "resident"
    monkeypatch.setattr(F, "HOST_RESIDENT_FRACTION", 1e-9)
    monkeypatch.setattr(F, "RESIDENT_FRACTION", 1e-9)
    mode, why = F.choose_mode(ds, "auto", mesh)
    assert mode == "streamed" and "exceeds the resident budget" in why and "300 cells x 30 genes" in why
    GinsengTrainer(ds, dataclasses.replace(SETTINGS, steps_per_dispatch=3), epochs=1)
    assert "[ginseng] device data: streamed; the dataset" in capsys.readouterr().out


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"GinsengTrainerSettings.device_data must be 'auto' or 'resident' or 'streamed', got 'gpu'"):
        GinsengTrainerSettings(device_data="gpu")
    with pytest.raises(ValueError, match=r"GinsengTrainerSettings.steps_per_dispatch must be an integer >= 1, got 0"):
        GinsengTrainerSettings(steps_per_dispatch=0)


@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_crash_and_resume_is_bit_identical(store, small_windows, monkeypatch, tmp_path, mode):
    """A run killed mid-epoch and resumed from its checkpoint ends with the uninterrupted run's
    model, though its dispatches are grouped differently (cut at every checkpoint position)."""
    from ginseng.train import loop

    _, ref = _train(store, device_data=mode, steps_per_dispatch=4)
    settings = {"device_data": mode, "steps_per_dispatch": 4, "checkpoint_dir": str(tmp_path / "ck"), "checkpoint_every": 3}
    real, calls = loop._dispatch, []

    def crashing(*args, **kwargs):
        calls.append(1)
        # 11 batches an epoch: epoch 0 in 4 dispatches (0-2, 3-5, 6-8, 9-10), epoch 1's 0-2 and
        # 3-5 checkpointed at step 11 + 6 = 17; the 7th dispatch crashes mid-epoch
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_dispatch", crashing)
    with pytest.raises(KeyboardInterrupt):
        _train(store, **settings)
    monkeypatch.setattr(loop, "_dispatch", real)
    from ginseng.train import latest_checkpoint, read_checkpoint

    assert read_checkpoint(latest_checkpoint(tmp_path / "ck"))["global_step"] == 17
    _log, resumed = GinsengTrainer(GinsengDataset(store), dataclasses.replace(SETTINGS, **settings), epochs=2,
                                  silent=True, resume=True)
    assert _same(ref, resumed)
