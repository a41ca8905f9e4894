"""The command line: configuration, tasks (prepare, train, annotate), errors, and a real launch.

Tasks run in-process through ``tasks.run`` with a configuration composed by Hydra's compose API,
on a tiny synthetic dataset; one test launches ``python -m ginseng.launch`` as a subprocess from
another working directory with a ``--multirun`` sweep.
"""

import dataclasses
import json
import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
from conftest import make_counts
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from ginseng import tasks
from ginseng.config import (
    ConfigKeyError,
    GinsengConfig,
    compose,
    config_dir,
    to_object,
    to_trainer_settings,
)
from ginseng.data import GinsengDataset
from ginseng.io import load_ginseng_state
from ginseng.train import GinsengTrainerSettings, list_checkpoints

N_CELLS, N_GENES = 300, 60
TINY = ["trainer.epochs=2", "trainer.batch_size=64", "model.hidden_dim=16", "silent=true"]


@pytest.fixture(scope="module")
def tiny_h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.h5ad"
    make_counts(n_cells=N_CELLS, n_genes=N_GENES, seed=3).write_h5ad(path)
    return path


def _raw_compose(overrides):
    # Hydra's own compose API on the packaged configs, as a user's notebook would do it.
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def trained(tiny_h5ad, tmp_path_factory):
    """prepare, then train in the same run directory (which reuses the prepared dataset)."""
    workdir = tmp_path_factory.mktemp("run")
    base = [f"data.path={tiny_h5ad}", "genes.n_top_genes=30", "genes.min_mean=0.0", *TINY]
    prepared = tasks.run(_raw_compose(["task=prepare", *base]), workdir)
    result = tasks.run(_raw_compose(["task=train", *base]), workdir)
    return workdir, prepared, result


def test_prepare_splits_stratified_and_builds_dataset_of_training_cells(trained, tiny_h5ad):
    workdir, prepared, _ = trained
    ds = GinsengDataset(workdir / "dataset.zarr")
    test = pd.read_csv(workdir / "test_cells.csv")
    assert ds.n_cells + len(test) == N_CELLS
    assert ds.n_cells == len(prepared.train_indices)
    assert np.intersect1d(prepared.train_indices, prepared.test_indices).size == 0
    # HVGs of the training cells only, at most n_top_genes.
    assert 0 < ds.n_genes <= 30
    # Every label keeps its share in the test set (20 % +- rounding).
    labels = prepared.adata.obs["cell_type"].astype(str).to_numpy()
    for label in np.unique(labels):
        n = np.sum(labels == label)
        assert np.sum(test["label"] == label) == round(n * 0.2)
    assert set(test["barcode"]) == set(prepared.adata.obs_names[prepared.test_indices])


def test_train_writes_model_metrics_curve_and_test_report(trained):
    workdir, prepared, result = trained
    for name in ("model.h5", "metrics.csv", "training_curve.png", "test_predictions.report.csv",
                 "test_predictions.csv", "test_predictions.confusion.png", "summary.json"):
        assert (workdir / name).stat().st_size > 0, name
    state = load_ginseng_state(workdir / "model.h5")
    ds = GinsengDataset(workdir / "dataset.zarr")
    assert list(state.genes) == list(ds.genes)
    assert sorted(state.label_values) == [f"type_{k}" for k in range(4)]
    for name, leaf in result.state.params.items():
        np.testing.assert_array_equal(np.asarray(state.params[name]["W"]), np.asarray(leaf["W"]))
    metrics = pd.read_csv(workdir / "metrics.csv")
    assert len(metrics) == 2
    assert np.isfinite(metrics.select_dtypes("number").to_numpy()).all()
    predictions = pd.read_csv(workdir / "test_predictions.csv")
    assert len(predictions) == len(prepared.test_indices)
    report = pd.read_csv(workdir / "test_predictions.report.csv").set_index("cell_type")
    per_class = report[report.in_model.astype(str) == "True"]
    assert result.macro_f1 == pytest.approx(per_class["f1"].mean())
    assert report.loc["macro_avg (model labels, 4)", "f1"] == pytest.approx(result.macro_f1)
    assert 0.0 <= result.macro_f1 <= 1.0
    # metrics.csv numbers epochs as the log does; the summary keeps what the end of the run said
    assert metrics["epoch"].tolist() == [1, 2]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["test_macro_f1"] == pytest.approx(result.macro_f1)
    assert summary["test_cells"] == len(prepared.test_indices) and summary["holdout_cells"] > 0


def test_train_refuses_existing_outputs_before_training(trained, tiny_h5ad):
    workdir, _, _ = trained
    before = (workdir / "model.h5").stat().st_mtime_ns
    cfg = compose(["task=train", f"data.path={tiny_h5ad}", *TINY])
    with pytest.raises(FileExistsError, match="model.h5"):
        tasks.run(cfg, workdir)
    assert (workdir / "model.h5").stat().st_mtime_ns == before


def test_overwrite_retrains_in_a_finished_run_directory(trained, tiny_h5ad, tmp_path):
    # It used to rebuild the dataset, then find the old checkpoint (written for the old store)
    # and refuse to go on, leaving the directory half old, half new.
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    assert list_checkpoints(workdir / "checkpoints")
    old_model = (workdir / "model.h5").read_bytes()
    base = [f"data.path={tiny_h5ad}", "genes.n_top_genes=30", "genes.min_mean=0.0", *TINY]
    result = tasks.run(_raw_compose(["task=train", "overwrite=true", "trainer.seed=7", *base]), workdir)
    assert result.macro_f1 is not None
    assert (workdir / "model.h5").read_bytes() != old_model
    assert len(pd.read_csv(workdir / "metrics.csv")) == len(result.logger.epoch)
    assert list_checkpoints(workdir / "checkpoints")  # the new run's


def test_prepare_refuses_store_built_with_other_settings(trained, tiny_h5ad):
    workdir, _, _ = trained
    cfg = compose(["task=train", f"data.path={tiny_h5ad}", "genes.n_top_genes=20", *TINY])
    for name in ("model.h5", "metrics.csv", "training_curve.png", "test_predictions.report.csv",
                 "test_predictions.csv", "test_predictions.confusion.png", "summary.json"):
        (workdir / name).rename(workdir / f"{name}.keep")
    try:
        with pytest.raises(ValueError, match=r"genes.n_top_genes: store 30 != config 20"):
            tasks.run(cfg, workdir)
    finally:
        for name in ("model.h5", "metrics.csv", "training_curve.png", "test_predictions.report.csv",
                     "test_predictions.csv"):
            (workdir / f"{name}.keep").rename(workdir / name)


def test_annotate_task_writes_table(trained, tiny_h5ad, tmp_path):
    workdir, _, _ = trained
    out = tmp_path / "cells.csv"
    cfg = compose(
        ["task=annotate", f"annotate.model={workdir / 'model.h5'}", f"annotate.input={tiny_h5ad}",
         f"annotate.output={out}", "silent=true"]
    )
    assert tasks.run(cfg, tmp_path) == out
    table = pd.read_csv(out)
    assert len(table) == N_CELLS
    assert {"barcode", "cell_type", "confidence"} <= set(table.columns)
    assert set(table["cell_type"]) <= {f"type_{k}" for k in range(4)} | {"Unassigned"}
    assert ((table["confidence"] > 0) & (table["confidence"] <= 1)).all()
    # An existing output is refused without annotate.overwrite.
    with pytest.raises(FileExistsError, match="cells.csv"):
        tasks.run(cfg, tmp_path)


def test_annotate_task_min_confidence_and_over_clustering(trained, tiny_h5ad, tmp_path):
    from ginseng.annotate.reject import auto_threshold
    from ginseng.io import save_ginseng_state

    workdir, _, _ = trained
    model = workdir / "model.h5"
    state = load_ginseng_state(model)
    base = ["task=annotate", f"annotate.model={model}", f"annotate.input={tiny_h5ad}", "silent=true"]

    def table(name, *extra):
        tasks.run(compose([*base, f"annotate.output={tmp_path / name}", *extra]), tmp_path)
        return pd.read_csv(tmp_path / name)

    auto = table("auto.csv")  # the default: the threshold saved in the model
    none = table("none.csv", "annotate.min_confidence=null")
    assert "Unassigned" not in set(none.cell_type)
    low = none.confidence.to_numpy() < auto_threshold(state.confidence_counts)
    assert ((auto.cell_type == "Unassigned").to_numpy() == low).all()
    fixed = table("fixed.csv", "annotate.min_confidence=0.9")
    assert ((fixed.cell_type == "Unassigned").to_numpy() == (none.confidence.to_numpy() < 0.9)).all()
    voted = table("voted.csv", "annotate.over_clustering=donor")
    donors = anndata.read_h5ad(tiny_h5ad).obs["donor"].to_numpy()
    for d in np.unique(donors):
        assert voted.majority_voting[donors == d].nunique() == 1
    with pytest.raises(ValueError, match="annotate.min_confidence must be a number in"):
        to_object(compose([*base, "annotate.min_confidence=high"]))
    # a model saved without the trainer's confidences: a warning, and no cell left Unassigned
    old = dataclasses.replace(state, confidence_counts=None)
    save_ginseng_state(old, tmp_path / "old.h5")
    with pytest.warns(UserWarning, match="no saved holdout confidences"):
        tasks.run(compose([*base[:1], f"annotate.model={tmp_path / 'old.h5'}", *base[2:],
                           f"annotate.output={tmp_path / 'old.csv'}"]), tmp_path)
    assert "Unassigned" not in set(pd.read_csv(tmp_path / "old.csv").cell_type)


def test_annotate_task_needs_model_and_input(tmp_path):
    with pytest.raises(ValueError, match=r"missing: annotate.model, annotate.input"):
        tasks.run(compose(["task=annotate"]), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("trainer.epoch=3", r"Did you mean 'trainer.epochs'\?.*Valid keys: .*trainer.batch_size"),
        ("trainr.epochs=3", r"'trainr' is not a key of the top level.*Valid keys: annotate, data"),
        ("+model.depth=3", r"'depth' is not a key of model.*model.hidden_dim"),
    ],
)
def test_misspelled_override_lists_valid_keys(override, pattern):
    with pytest.raises(ConfigKeyError, match=pattern):
        compose([override])


def test_values_are_validated_with_names_and_numbers():
    with pytest.raises(ValueError, match=r"trainer.batch_size must be an integer >= 1, got 0"):
        to_object(compose(["trainer.batch_size=0"]))
    with pytest.raises(ValueError, match=r"data.test_fraction must be in \[0, 1\), got 1.5"):
        to_object(compose(["data.test_fraction=1.5"]))
    with pytest.raises(ValueError, match=r"optim.lr_schedule must be 'constant' or 'cosine', got 'linear'"):
        to_object(compose(["optim.lr_schedule=linear"]))
    with pytest.raises(ValueError, match=r"trainer.device_data must be 'auto' or 'resident' or 'streamed', got 'gpu'"):
        to_object(compose(["trainer.device_data=gpu"]))
    with pytest.raises(ValueError, match=r"trainer.steps_per_dispatch must be an integer >= 1, got 0"):
        to_object(compose(["trainer.steps_per_dispatch=0"]))


def test_config_maps_to_trainer_settings(tmp_path):
    cfg = to_object(compose(["model.hidden_dim=64", "optim.lr=0.01", "trainer.batch_size=32",
                             "trainer.balance_train=false", "optim.lr_schedule=cosine",
                             "trainer.device_data=streamed", "trainer.steps_per_dispatch=3"]))
    assert isinstance(cfg, GinsengConfig)
    s = to_trainer_settings(cfg, tmp_path)
    assert (s.device_data, s.steps_per_dispatch) == ("streamed", 3)
    assert (s.hidden_dim, s.lr, s.batch_size, s.balance_train) == (64, 0.01, 32, False)
    assert s.lr_schedule == "cosine"
    assert s.betas == (0.9, 0.999)
    if hasattr(s, "checkpoint_dir"):  # checkpoints go into the run directory by default
        assert s.checkpoint_dir == str(tmp_path / "checkpoints")


def test_run_dir_shared_through_environment(monkeypatch):
    monkeypatch.setenv("GINSENG_RUN_DIR", "/shared/run-7")
    cfg = compose([], return_hydra_config=True)
    assert cfg.hydra.run.dir == "/shared/run-7"
    assert cfg.hydra.sweep.dir == "/shared/run-7"
    monkeypatch.delenv("GINSENG_RUN_DIR")
    assert compose([], return_hydra_config=True).hydra.run.dir.startswith("outputs/")


def test_distributed_group_selects_mode():
    assert isinstance(compose(["distributed=local"]), DictConfig)
    assert to_object(compose(["distributed=local"])).distributed.mode.value == "local"
    assert to_object(compose(["distributed=slurm"])).distributed.mode.value == "slurm"
    assert to_object(compose([])).distributed.mode.value == "none"


def test_stratified_split_keeps_one_training_cell_per_label():
    labels = np.array(["a"] * 10 + ["b"] * 3 + ["c"])
    train, test = tasks.stratified_split(labels, 0.5, seed=0)
    assert np.sum(labels[test] == "a") == 5
    assert np.sum(labels[test] == "c") == 0  # a single cell stays for training
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    again = tasks.stratified_split(labels, 0.5, seed=0)
    np.testing.assert_array_equal(test, again[1])


def test_classification_report_macro_f1():
    truth = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    report, macro = tasks.classification_report(truth, pred)
    f1 = dict(zip(report["cell_type"], report["f1"], strict=True))
    assert f1["a"] == pytest.approx(0.5)  # precision 1/2, recall 1/2
    assert f1["b"] == pytest.approx(0.8)  # precision 2/3, recall 1
    assert f1["c"] == 0.0
    assert macro == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_launch_module_multirun_from_another_directory(tiny_h5ad, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    sweep = tmp_path / "sweep"
    env = {**os.environ, "GINSENG_RUN_DIR": str(sweep)}
    cmd = [sys.executable, "-m", "ginseng.launch", "--multirun", "model.hidden_dim=8,16",
           f"data.path={tiny_h5ad}", "genes.select=all", "trainer.epochs=1"]
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, hidden in ((0, 8), (1, 16)):
        state = load_ginseng_state(sweep / str(job) / "model.h5")
        assert state.params["attn1"]["W"].shape == (N_GENES, hidden)
        assert (sweep / str(job) / "metrics.csv").exists()
        log = (sweep / str(job) / "launch.log").read_text()  # what was printed is in the log
        assert "[ginseng] epoch 1 | train loss" in log and "test cells (60, never trained on): macro-F1 on the model's" in log
    assert not (cwd / "outputs").exists()

    # A misspelled key on the command line: exit code 2 and the valid keys, nothing run.
    bad = subprocess.run([sys.executable, "-m", "ginseng.launch", "trainer.epoch=1"],
                         check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Did you mean 'trainer.epochs'?" in bad.stderr
    assert "trainer.batch_size" in bad.stderr


def test_processes_of_one_run_share_a_run_dir(monkeypatch):
    from ginseng import launch

    for var in ("GINSENG_RUN_DIR", "SLURM_JOB_ID", "SLURM_NTASKS", "GINSENG_NUM_PROCESSES"):
        monkeypatch.delenv(var, raising=False)
    # Under srun, every task of the job (and the job after a requeue) gets the same directory.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    launch._share_run_dir()
    assert os.environ["GINSENG_RUN_DIR"] == os.path.join("outputs", "slurm-4242")
    # Processes started by hand without a shared directory are stopped before they diverge.
    for var in ("GINSENG_RUN_DIR", "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("GINSENG_NUM_PROCESSES", "2")
    with pytest.raises(SystemExit, match="GINSENG_RUN_DIR is not set"):
        launch._share_run_dir()


@pytest.mark.parametrize("layer", [None, "counts"])
def test_backed_run_streams_and_equals_the_in_memory_run(tiny_h5ad, tmp_path, monkeypatch, layer):
    """data.backed=true builds the same dataset and model and the same test predictions as the
    in-memory run, without ever loading the training or test cells as an AnnData of their own."""
    path = tiny_h5ad
    if layer is not None:  # counts in a layer, something else in X
        import anndata

        adata = anndata.read_h5ad(tiny_h5ad)
        adata.layers["counts"] = adata.X.copy()
        adata.X = adata.X * 0.5
        path = tmp_path / "layered.h5ad"
        adata.write_h5ad(path)
    base = [f"data.path={path}", "genes.n_top_genes=30", "genes.min_mean=0.0", *TINY]
    if layer is not None:
        base.append(f"data.layer={layer}")
    runs = {}
    for backed in (False, True):
        workdir = tmp_path / f"backed_{backed}"
        workdir.mkdir()
        if backed:
            monkeypatch.setattr(tasks, "_subset", lambda *a, **k: pytest.fail("cells loaded into memory"))
        tasks.run(_raw_compose(["task=train", f"data.backed={str(backed).lower()}", *base]), workdir)
        runs[backed] = workdir
    a, b = (GinsengDataset(runs[k] / "dataset.zarr") for k in (False, True))
    assert list(a.genes) == list(b.genes) and a.n_cells == b.n_cells
    np.testing.assert_array_equal(a.get_batch(np.arange(a.n_cells)), b.get_batch(np.arange(b.n_cells)))
    np.testing.assert_array_equal(a.label_values[a.labels], b.label_values[b.labels])
    sa, sb = (load_ginseng_state(runs[k] / "model.h5") for k in (False, True))
    for name in sa.params:
        np.testing.assert_array_equal(np.asarray(sa.params[name]["W"]), np.asarray(sb.params[name]["W"]))
    pa, pb = (pd.read_csv(runs[k] / "test_predictions.csv") for k in (False, True))
    pd.testing.assert_frame_equal(pa, pb)
    assert (runs[True] / "test_predictions.report.csv").read_text() == (runs[False] / "test_predictions.report.csv").read_text()


def test_training_values_are_checked_by_the_trainers_rules_naming_the_cli_key():
    # One place checks training values (ginseng.train.settings); the CLI runs it on its keys, so
    # a value the trainer would refuse is refused at compose time, naming what the user typed.
    with pytest.raises(ValueError, match=r"trainer.upper must be > lower, got lower=5, upper=5"):
        to_object(compose(["trainer.lower=5", "trainer.upper=5"]))
    with pytest.raises(ValueError, match=r"model.dropout_rate must be a number >= 0.0 and < 1.0, got 1.0"):
        to_object(compose(["model.dropout_rate=1.0"]))
    with pytest.raises(ValueError, match=r"optim.betas must be a pair of numbers in \[0, 1\)"):
        to_object(compose(["optim.betas=[0.9,1.0]"]))
    with pytest.raises(ValueError, match=r"GinsengTrainerSettings.upper must be > lower"):
        GinsengTrainerSettings(lower=5, upper=5)
