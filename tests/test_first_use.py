"""What a biologist hits on first use: each test fails without its fix."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
from conftest import make_counts

from ginseng import tasks
from ginseng._core.progress import bar_disabled
from ginseng.annotate import annotate
from ginseng.config import compose, describe_keys
from ginseng.nn import nn_annotate_init
from ginseng.state import GinsengModelState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(genes, labels=("a", "b", "c")):
    import jax

    params = nn_annotate_init(jax.random.key(0), len(genes), len(labels), 8)
    return GinsengModelState(params, np.asarray(genes, str), np.arange(len(labels)), np.asarray(labels))


def test_parquet_output_needs_no_extra():
    # The README's own example writes parquet: pyarrow must come with a plain install.
    reqs = importlib.metadata.requires("ginseng") or []
    core = [r for r in reqs if "extra ==" not in r]
    assert any(re.match(r"pyarrow\b", r) for r in core), core


@pytest.mark.parametrize(
    ("rename", "cause"),
    [
        (str.lower, "Ignoring letter case, 60 of them would match"),
        (lambda g: g + "_x", "Check that the input is of the model's species"),
    ],
    ids=["case", "other"],
)
def test_near_total_gene_mismatch_is_refused_with_the_cause(rename, cause):
    adata = make_counts(n_cells=20, n_genes=60, seed=1)
    state = _model(adata.var_names)
    query = adata.copy()
    query.var_names = [rename(g) for g in query.var_names[:57]] + list(query.var_names[57:])
    with pytest.raises(ValueError, match=r"only 3 of the model's 60 genes \(5\.0%\) are in the input") as err:
        annotate(state, query, silent=True)
    text = str(err.value)
    assert cause in text and "min_gene_overlap" in text and "annotate.min_gene_overlap" in text
    assert "input genes, e.g." in text and "Missing model genes, e.g." in text
    # Lowering the minimum annotates anyway (with the partial-overlap warning).
    with pytest.warns(UserWarning, match="only 3 of the model's 60 genes"):
        table = annotate(state, query, min_gene_overlap=0.0, return_table=True, silent=True)
    assert len(table) == 20
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="min_gene_overlap must be a fraction in"):
            annotate(state, adata, min_gene_overlap=bad, silent=True)


def test_progress_bars_stay_quiet_off_a_terminal_and_for_one_step():
    assert bar_disabled(True, 100) is True
    assert bar_disabled(False, 1) is True and bar_disabled(False, 0) is True
    assert bar_disabled(False, 100) is None  # tqdm: shown on a terminal only


def test_creating_a_dataset_prints_no_bar_when_output_is_not_a_terminal(tmp_path, capfd):
    from ginseng.data import GinsengDataset

    GinsengDataset.create(tmp_path / "d.zarr", make_counts(n_cells=50, n_genes=20), "cell_type")
    _, err = capfd.readouterr()
    assert "block/s" not in err and "it/s" not in err and "%|" not in err


def test_help_lists_every_key_with_its_documentation():
    text = describe_keys()
    for key in ("data.labels_file", "trainer.epochs", "trainer.keep_checkpoints", "annotate.min_gene_overlap"):
        assert f"  {key}=" in text, key
    assert "Labels with fewer cells than this" in text  # the field's own docstring
    proc = subprocess.run([sys.executable, "-m", "ginseng.launch", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and "  trainer.batch_size=128" in proc.stdout


def test_a_value_of_the_wrong_type_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ginseng.launch", "trainer.epochs=three"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "Error: trainer.epochs=three: Value 'three' of type 'str' could not be converted to Integer"
    ]
    assert not (tmp_path / "outputs").exists()


def test_an_input_error_leaves_no_empty_run_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GINSENG_RUN_DIR", "HYDRA_FULL_ERROR")}
    proc = subprocess.run([sys.executable, "-m", "ginseng.launch", "data.path=nowhere.h5ad"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, check=False, env=env)
    assert proc.returncode == 1 and "Error: data.path 'nowhere.h5ad' does not exist" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_local_launcher_is_installed_as_a_module():
    from ginseng.local import script_path

    assert script_path().is_file()
    proc = subprocess.run([sys.executable, "-m", "ginseng.local"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode != 0 and "usage:" in proc.stderr and "N DEVICES_PER_PROCESS" in proc.stderr


def _tenx_like(tmp_path, n_cells=90):
    """An h5ad without obs columns, as a 10x file reads, and its labels as a separate CSV."""
    adata = make_counts(n_cells=n_cells, n_genes=40, n_labels=3, seed=2)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    bare = anndata.AnnData(adata.X, obs=pd.DataFrame(index=adata.obs_names), var=adata.var[[]])
    path = tmp_path / "bare.h5ad"
    bare.write_h5ad(path)
    return path, adata.obs_names.to_numpy(str), labels


TINY = ["genes.select=all", "trainer.epochs=1", "trainer.batch_size=32", "model.hidden_dim=8", "silent=true"]


def test_cli_trains_from_input_without_obs_columns_given_a_labels_file(tmp_path):
    path, barcodes, labels = _tenx_like(tmp_path)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"barcode": barcodes[::-1], "label": labels[::-1]}).to_csv(csv, index=False)  # any order
    result = tasks.run(compose(["task=train", f"data.path={path}", f"data.labels_file={csv}", *TINY]), tmp_path / "run")
    assert sorted(result.state.label_values) == ["type_0", "type_1", "type_2"]
    # Barcodes that do not match are an error naming both sides, before anything is built.
    pd.DataFrame({"barcode": [*barcodes[:-1], "AAAC-9"], "label": labels}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"1 of its 90 barcodes are not cells of the input, e.g. \['AAAC-9'\]; "
                                         r"1 of the input's 90 cells have no row"):
        tasks.run(compose(["task=train", f"data.path={path}", f"data.labels_file={csv}", *TINY]), tmp_path / "bad")
    assert not (tmp_path / "bad" / "dataset.zarr").exists()


def test_small_labels_are_kept_down_to_the_holdout_minimum_and_the_rest_is_in_the_summary(tmp_path, capsys):
    adata = make_counts(n_cells=200, n_genes=40, n_labels=3, seed=4)
    cell_type = adata.obs["cell_type"].astype(str).to_numpy().copy()
    cell_type[:7] = "rare7"  # 7 cells: kept (one holdout cell remains after the test split)
    cell_type[7:11] = "rare4"  # 4 cells: too few, left out
    adata.obs["cell_type"] = pd.Categorical(cell_type)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    assert tasks.effective_min_cells(tasks.to_object(compose([]))) == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tasks.run(compose(["task=train", f"data.path={path}", *TINY[:-1]]), tmp_path / "run")
    assert "rare7" in set(result.state.label_values) and "rare4" not in set(result.state.label_values)
    assert any("leaving out 1 of 5 labels with fewer than 6 cells" in str(w.message) for w in caught)
    out = capsys.readouterr().out
    summary_text = out[out.index("== ginseng: summary =="):]
    assert "LEFT OUT of training, fewer than 6 cells (the model cannot predict them): rare4 (4 cells)" in summary_text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["labels_left_out"] == {"rare4": 4} and summary["min_cells"] == 6
    assert summary["test_macro_f1"] == pytest.approx(result.macro_f1)


def test_cli_warnings_are_one_line_without_ginseng_source(tmp_path):
    adata = make_counts(n_cells=120, n_genes=40, n_labels=3, seed=4)
    cell_type = adata.obs["cell_type"].astype(str).to_numpy().copy()
    cell_type[:3] = "rare"
    adata.obs["cell_type"] = pd.Categorical(cell_type)
    adata.write_h5ad(tmp_path / "in.h5ad")
    proc = subprocess.run(
        [sys.executable, "-m", "ginseng.launch", f"data.path={tmp_path / 'in.h5ad'}", "hydra.run.dir=run", *TINY],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "leaving out" in ln]
    assert len(lines) == 1 and lines[0].startswith("Warning: leaving out 1 of 4 labels")
    assert "warnings.warn" not in proc.stderr and "tasks.py" not in proc.stderr
