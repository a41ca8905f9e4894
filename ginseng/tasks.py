"""What ``python -m ginseng.launch`` does, as plain functions of a configuration and a run directory.

:func:`run` dispatches on ``cfg.task``:

- ``prepare``: read the input, set a stratified test set aside, select genes on the training
  cells, build the :class:`~ginseng.data.GinsengDataset`.
- ``train``: prepare if needed, train, evaluate on the test cells (macro-F1 and a per-class
  table), write ``model.h5``, ``metrics.csv`` and ``training_curve.png``.
- ``annotate``: apply a model to new cells and write a table.

Under ``jax.distributed`` every process calls the same function; only process 0 writes files and
prints, the others wait at barriers.
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig

from ginseng._core.files import atomic_path, check_writable_target
from ginseng._core.report import Report, from_labels
from ginseng.config import GeneSelection, GinsengConfig, Task, to_object, to_trainer_settings

__all__ = [
    "PreparedData",
    "TrainResult",
    "classification_report",
    "run",
    "run_annotate",
    "run_prepare",
    "run_train",
    "stratified_split",
]


@dataclass
class PreparedData:
    """What ``task=prepare`` produced.

    Attributes
    ----------
    dataset : GinsengDataset
        The dataset of the training cells (its own holdout is made by the trainer).
    adata : AnnData
        The whole input (backed or in memory).
    train_indices, test_indices : np.ndarray
        Rows of ``adata`` used for training and set aside for the final evaluation.
    """

    dataset: Any
    adata: Any
    train_indices: np.ndarray
    test_indices: np.ndarray


@dataclass
class TrainResult:
    """What ``task=train`` produced: the trainer's outputs, the test metrics and the files."""

    logger: Any
    state: Any
    macro_f1: float | None
    report: pd.DataFrame | None
    files: dict[str, Path] = field(default_factory=dict)


def run(cfg: DictConfig | GinsengConfig, workdir: str | os.PathLike):
    """Run the task of ``cfg`` with ``workdir`` as the run directory.

    Parameters
    ----------
    cfg : DictConfig | GinsengConfig
        A composed configuration (``ginseng.config.compose``) or the dataclass itself.
    workdir : path
        Directory for every output of the run (created if missing).

    Returns
    -------
    PreparedData | TrainResult | Path
        For ``prepare``, ``train`` and ``annotate`` (the output table's path).
    """
    conf = to_object(cfg)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if conf.task == Task.prepare:
        return run_prepare(conf, workdir)
    if conf.task == Task.train:
        return run_train(conf, workdir)
    if conf.task == Task.annotate:
        return run_annotate(conf, workdir)
    msg = f"task must be one of {[t.value for t in Task]}, got {conf.task!r}"
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# helpers


def _is_main() -> bool:
    from ginseng import distributed

    return distributed.is_main_process()


def _process_count() -> int:
    from ginseng import distributed

    return distributed.process_count()


def _barrier(name: str) -> None:
    from ginseng import distributed

    if distributed.process_count() > 1:
        distributed.barrier(name)


def _say(conf: GinsengConfig, text: str) -> None:
    if not conf.silent and _is_main():
        print(text, flush=True)


def _resolve(path: str | os.PathLike, workdir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else workdir / p


def _input_path(conf: GinsengConfig) -> Path:
    if conf.data.path is None:
        from ginseng.datasets import pbmc3k_path

        return pbmc3k_path()
    return Path(conf.data.path).expanduser()


def _read_input(conf: GinsengConfig):
    from ginseng.io import read_adata

    path = _input_path(conf)
    if not path.exists():
        msg = f"data.path {str(path)!r} does not exist (expected an .h5ad, 10x .h5 or mtx folder)"
        raise FileNotFoundError(msg)
    adata = read_adata(path, backed=conf.data.backed)
    for what, file, key in (
        ("data.labels_file", conf.data.labels_file, conf.data.labels),
        ("data.groups_file", conf.data.groups_file, conf.data.groups),
    ):
        if file is not None:
            _attach_column(adata, _resolve_input(file), key, what)
    for what, key in (("data.labels", conf.data.labels), ("data.groups", conf.data.groups)):
        if key is not None and key not in adata.obs.columns:
            msg = (
                f"{what}={key!r} is not a column of obs in {str(path)!r}; "
                f"obs has: {', '.join(map(str, adata.obs.columns)) or '(no columns)'}"
            )
            raise KeyError(msg)
    # Checked here, before gene selection adds columns of its own and before any work is done.
    if conf.data.gene_key is not None and conf.data.gene_key not in adata.var.columns:
        msg = (
            f"data.gene_key={conf.data.gene_key!r} is not a column of var in {str(path)!r}; "
            f"var has: {', '.join(map(str, adata.var.columns)) or '(no columns)'}"
        )
        raise KeyError(msg)
    from ginseng.utils import _layer_names

    if conf.data.layer is not None and conf.data.layer not in adata.layers:
        msg = (
            f"data.layer={conf.data.layer!r} is not a layer of {str(path)!r}; "
            f"layers: {', '.join(_layer_names(adata)) or '(none: the counts are in X)'}"
        )
        raise KeyError(msg)
    return path, adata


def _resolve_input(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        msg = f"{str(p)!r} does not exist (expected a CSV of barcode,value)"
        raise FileNotFoundError(msg)
    return p


def _attach_column(adata, path: Path, key: str | None, what: str) -> None:
    """Set ``adata.obs[key]`` from a two-column CSV (barcode, value); every barcode must match."""
    if key is None:
        msg = f"{what} needs the obs column name to fill: set data.groups=<name> with data.groups_file"
        raise ValueError(msg)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if table.shape[1] != 2:
        msg = f"{what} {str(path)!r} must have 2 columns (barcode, value); found {list(table.columns)}"
        raise ValueError(msg)
    barcodes, values = table.iloc[:, 0].to_numpy(str), table.iloc[:, 1].to_numpy(str)
    dup = pd.Index(barcodes)[pd.Index(barcodes).duplicated()]
    cells = pd.Index(adata.obs_names.astype(str))
    unknown = np.setdiff1d(barcodes, cells.to_numpy())
    missing = cells.difference(pd.Index(barcodes))
    if len(dup) or len(unknown) or len(missing):
        parts = []
        if len(unknown):
            parts.append(f"{len(unknown)} of its {len(barcodes)} barcodes are not cells of the input, e.g. {unknown[:3].tolist()}")
        if len(missing):
            parts.append(f"{len(missing)} of the input's {len(cells)} cells have no row, e.g. {missing[:3].tolist()}")
        if len(dup):
            parts.append(f"{len(dup)} barcodes appear twice, e.g. {dup[:3].tolist()}")
        msg = (
            f"{what} {str(path)!r} does not match the input's barcodes (obs_names, e.g. "
            f"{cells[:3].tolist()}): " + "; ".join(parts)
        )
        raise ValueError(msg)
    adata.obs[key] = pd.Categorical(pd.Series(values, index=barcodes).reindex(cells).to_numpy())


def stratified_split(labels, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split cells into training and test cells with the same label proportions.

    Per label, ``round(count * fraction)`` cells go to the test set, but at least one cell of
    every label stays for training.

    Parameters
    ----------
    labels : array-like
        One label per cell.
    fraction : float
        Fraction of the cells of each label for the test set, in [0, 1).
    seed : int
        Seed of the draw.

    Returns
    -------
    train_indices, test_indices : np.ndarray
        Sorted int64 row indices.
    """
    if not 0 <= fraction < 1:
        msg = f"test fraction must be in [0, 1), got {fraction}"
        raise ValueError(msg)
    labels = np.asarray(pd.Series(labels).astype(str))
    rng = np.random.default_rng(seed)
    test = []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        n_test = min(round(len(idx) * fraction), len(idx) - 1)
        if n_test > 0:
            test.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


def _label_counts(labels) -> pd.Series:
    return pd.Series(pd.Series(labels).astype(str)).value_counts(sort=False)


def effective_min_cells(conf: GinsengConfig) -> int:
    """``data.min_cells``, or when it is null the fewest cells a label can have and still keep
    one holdout cell: after ``data.test_fraction`` of it is set aside (``stratified_split``), the
    trainer holds out floor(training cells x ``trainer.holdout_fraction``) of every label. At the
    defaults (0.2, 0.2) that is 6 cells. Group-level holdouts hold out whole groups: 2 cells
    (one to train on, one to test)."""
    if conf.data.min_cells is not None:
        return int(conf.data.min_cells)
    if conf.trainer.group_level:
        return 2
    f, t = conf.trainer.holdout_fraction, conf.data.test_fraction
    n = 2
    while int((n - min(round(n * t), n - 1)) * f) < 1:
        n += 1
    return n


def _cells_of_large_labels(conf: GinsengConfig, labels) -> np.ndarray:
    """Rows whose label has at least ``effective_min_cells`` cells; the others are named in a
    warning (and again in the end summary)."""
    import warnings

    min_cells = effective_min_cells(conf)
    counts = _label_counts(labels)
    small = counts[counts < min_cells].sort_values()
    as_str = np.asarray(pd.Series(labels).astype(str))
    keep = ~np.isin(as_str, small.index.to_numpy())
    if len(small):
        listed = ", ".join(f"{k!r} ({v})" for k, v in small.items())
        msg = (
            f"leaving out {len(small)} of {len(counts)} labels with fewer than {min_cells} cells "
            f"({int((~keep).sum())} cells; the model will not know them): {listed}. Fewer cells "
            f"leave no holdout cell at trainer.holdout_fraction={conf.trainer.holdout_fraction}; "
            "data.min_cells sets the minimum"
        )
        if _is_main():
            warnings.warn(msg, UserWarning, stacklevel=3)
    if keep.sum() == 0 or len(counts) - len(small) < 2:
        msg = (
            f"data.min_cells={min_cells} leaves {len(counts) - len(small)} label(s) "
            f"of {len(counts)} in data.labels={conf.data.labels!r}; at least 2 are needed "
            f"(label counts: {dict(counts.sort_values(ascending=False).head(20))})"
        )
        raise ValueError(msg)
    return np.flatnonzero(keep).astype(np.int64)


def _check_holdout_possible(conf: GinsengConfig, train_labels) -> None:
    """Refuse, before anything is built, a per-label holdout that would hold out no cell.

    The trainer holds out floor(smallest training label x trainer.holdout_fraction) cells of
    every label (GinsengDataset.make_holdout); this is the same rule, in the CLI's own keys.
    """
    if conf.trainer.group_level:
        return
    counts = _label_counts(train_labels)
    smallest, n = counts.idxmin(), int(counts.min())
    f = conf.trainer.holdout_fraction
    if int(n * f) == 0:
        need = int(np.ceil(1 / f)) if f > 0 else None
        msg = (
            f"trainer.holdout_fraction={f} holds out no cell of each label: the smallest label "
            f"{smallest!r} has {n} training cells (after data.test_fraction="
            f"{conf.data.test_fraction} of them are set aside), and floor({n} x {f}) = 0. Raise "
            f"data.min_cells (labels need about {need} training cells at this fraction) or "
            f"trainer.holdout_fraction (to >= {1 / n:.3g})"
        )
        raise ValueError(msg)


def _subset(adata, rows: np.ndarray, layer: str | None = None):
    """Rows of ``adata`` as an in-memory AnnData (counts from ``layer`` into X when given)."""
    import anndata

    view = adata[rows]
    X = view.layers[layer] if layer is not None else view.X
    if hasattr(X, "to_memory"):  # backed sparse dataset
        X = X.to_memory()
    return anndata.AnnData(X=X, obs=view.obs.copy(), var=view.var.copy())


def _prepare_record(conf: GinsengConfig, path: Path) -> dict:
    return {
        "input": str(path),
        "data": {k: v for k, v in asdict(conf.data).items() if k not in ("path", "backed")},
        "genes": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(conf.genes).items()},
    }


def _write_text(path: Path, text: str, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)


def _write_csv(df: pd.DataFrame, path: Path, overwrite: bool, index: bool = False) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        df.to_csv(tmp, index=index)


# --------------------------------------------------------------------------------------------
# prepare


def _reuse_store(conf: GinsengConfig, store: Path, record_path: Path, record: dict, path: Path,
                 n_train: int):
    """The existing dataset at ``store``, refused unless built from the same settings and cells."""
    from ginseng.data import GinsengDataset

    dataset = GinsengDataset(store)  # refuses (naming the path) anything that is not a dataset
    if record_path.exists():
        old = yaml.safe_load(record_path.read_text())
        if old != record:
            diff = [
                f"{sec}.{k}: store {old.get(sec, {}).get(k)!r} != config {v!r}"
                for sec in ("data", "genes")
                for k, v in record[sec].items()
                if old.get(sec, {}).get(k) != v
            ]
            if old.get("input") != record["input"]:
                diff.insert(0, f"input: store {old.get('input')!r} != config {record['input']!r}")
            msg = (
                f"the dataset {str(store)!r} was built with other settings ({'; '.join(diff)}); "
                "pass overwrite=true to rebuild it or set data.store to a new path"
            )
            raise ValueError(msg)
    if dataset.n_cells != n_train:
        msg = (
            f"the dataset {str(store)!r} has {dataset.n_cells} cells but the training split of "
            f"{str(path)!r} has {n_train}; pass overwrite=true to rebuild it"
        )
        raise ValueError(msg)
    _say(conf, f"Using the dataset {store} ({dataset.n_cells} cells x {dataset.n_genes} genes)")
    return dataset


def _select_genes(conf: GinsengConfig, train, layer, cells) -> np.ndarray | None:
    """The gene mask of ``genes.select`` (HVGs of the training cells), or None for all genes."""
    if conf.genes.select != GeneSelection.hvg:
        return None
    from ginseng.utils import compute_hvgs

    compute_hvgs(
        train,
        n_top_genes=min(conf.genes.n_top_genes, train.n_vars),
        min_mean=conf.genes.min_mean,
        max_mean=conf.genes.max_mean,
        n_bins=conf.genes.n_bins,
        layer=layer,
        cells=cells,
    )
    gene_mask = train.var["ginseng_genes"].to_numpy(bool)
    _say(conf, f"Selected {int(gene_mask.sum())} highly variable genes of the training cells")
    return gene_mask


def _build_store(conf: GinsengConfig, workdir: Path, store: Path, adata, split, labels, record: dict,
                 reuse: bool):
    """Process 0: select genes, write the dataset, ``test_cells.csv`` and ``prepare.yaml``."""
    from ginseng.data import GinsengDataset
    from ginseng.data.format import read_attrs

    path, train_idx, test_idx = split
    check_writable_target(store, conf.overwrite, "dataset store", "dir", lambda p: read_attrs(p) is not None)
    for name in ("test_cells.csv", "prepare.yaml"):
        check_writable_target(workdir / name, overwrite=conf.overwrite or reuse, what=name)
    _say(
        conf,
        f"Input {path}: {adata.n_obs} cells x {adata.n_vars} genes; "
        f"{len(train_idx)} for training, {len(test_idx)} set aside for testing",
    )
    # In memory: the training cells as their own AnnData. Backed: the file itself, read block
    # by block for the training rows only (memory bounded by a block, whatever the size).
    if adata.isbacked:
        train, cells, layer = adata, train_idx, conf.data.layer
    else:
        train, cells, layer = _subset(adata, train_idx, conf.data.layer), None, None
    dataset = GinsengDataset.create(
        store, train, labels=conf.data.labels, chunk_size=conf.data.chunk_size,
        groups=conf.data.groups, gene_key=conf.data.gene_key,
        gene_mask=_select_genes(conf, train, layer, cells), layer=layer, cells=cells, shuffle=True,
        seed=conf.data.seed, overwrite=conf.overwrite, silent=conf.silent,
    )
    test_table = pd.DataFrame(
        {
            "index": test_idx,
            "barcode": np.asarray(adata.obs_names[test_idx], dtype=str),
            "label": np.asarray(labels[test_idx]).astype(str),
        }
    )
    _write_csv(test_table, workdir / "test_cells.csv", overwrite=conf.overwrite or reuse)
    _write_text(workdir / "prepare.yaml", yaml.safe_dump(record), overwrite=conf.overwrite or reuse)
    _say(conf, f"Wrote the dataset {store} ({dataset.n_cells} cells x {dataset.n_genes} genes)")
    return dataset


def run_prepare(conf: GinsengConfig, workdir: str | os.PathLike, reuse: bool = False) -> PreparedData:
    """Build the training dataset: test split, gene selection on training cells, the store.

    Writes, into ``workdir``: the dataset store (``data.store``), ``test_cells.csv`` (the cells
    set aside, never trained on) and ``prepare.yaml`` (the settings that built the store).

    Parameters
    ----------
    conf : GinsengConfig
        The configuration (``data`` and ``genes`` sections).
    workdir : path
        The run directory.
    reuse : bool
        If the store exists and was built from the same settings, open it instead of failing
        (``task=train`` after ``task=prepare`` in the same run directory, or a resumed run).
    """
    from ginseng.data import GinsengDataset

    conf = to_object(conf)
    workdir = Path(workdir)
    store = _resolve(conf.data.store, workdir)
    record_path = workdir / "prepare.yaml"
    path, adata = _read_input(conf)
    labels = adata.obs[conf.data.labels].to_numpy()
    kept = _cells_of_large_labels(conf, labels)
    tr, te = stratified_split(labels[kept], conf.data.test_fraction, conf.data.seed)
    train_idx, test_idx = kept[tr], kept[te]
    _check_holdout_possible(conf, labels[train_idx])
    record = _prepare_record(conf, path)

    reuse_store = reuse and store.exists() and not conf.overwrite
    if _process_count() > 1:
        # Process 0 decides for everyone: a process arriving late would otherwise see the store
        # process 0 has just built, take the reuse branch and skip the barrier below.
        from ginseng import distributed

        reuse_store = bool(distributed.process_allgather(np.int32(reuse_store))[0])
    if reuse_store:
        dataset = _reuse_store(conf, store, record_path, record, path, len(train_idx))
        return PreparedData(dataset, adata, train_idx, test_idx)
    if _is_main():
        dataset = _build_store(conf, workdir, store, adata, (path, train_idx, test_idx), labels, record, reuse)
    _barrier("ginseng-prepare")
    if not _is_main():
        dataset = GinsengDataset(store)
    return PreparedData(dataset, adata, train_idx, test_idx)


# --------------------------------------------------------------------------------------------
# train


def classification_report(truth, predicted, model_labels=None) -> tuple[pd.DataFrame, float]:
    """Per-class precision, recall, F1 and support, and the macro-F1 (ginseng's one report).

    The macro-F1 is over the model's labels present in the truth, on the cells whose true label
    the model knows (``model_labels``; default: every true and predicted label), the figure
    annotate prints first. Labels the model lacks have NaN scores in the table.

    Returns
    -------
    report : pd.DataFrame
        Columns ``cell_type, in_model, support, predicted, precision, recall, f1``.
    macro_f1 : float
    """
    rep = from_labels(truth, predicted, model_labels)
    return rep.table, rep.macro_f1


def _call_supported(fn, *args, **kwargs):
    """Call ``fn`` with the keyword arguments its signature has (newer ones may be absent)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _evaluate_test(conf: GinsengConfig, prepared: PreparedData, state, output: Path) -> Report | None:
    """Annotate the test cells into ``output``; on process 0 return the report and macro-F1.

    Every process takes part (annotate shards the cells over all devices of all processes);
    process 0 writes the table (barcode, cell_type, confidence) and, beside it, annotate's
    per-class report and confusion matrix.
    """
    from ginseng.annotate import annotate

    # In memory: the test cells as their own AnnData. Backed: the file itself, test rows only.
    if prepared.adata.isbacked:
        test, cells, layer = prepared.adata, prepared.test_indices, conf.data.layer
    else:
        test, cells, layer = _subset(prepared.adata, prepared.test_indices, conf.data.layer), None, None
    annotate(
        state,
        test,
        gene_key=conf.data.gene_key,
        batch_size=conf.annotate.batch_size,
        output=str(output),
        overwrite=conf.overwrite,
        truth_key=conf.data.labels,
        layer=layer,
        cells=cells,
        silent=True,
    )
    _barrier("ginseng-test-annotated")
    if not _is_main():
        return None
    # keep_default_na=False: a cell type or barcode spelled "NA" or "None" stays a string
    table = pd.read_csv(output, dtype={"barcode": str, "cell_type": str}, keep_default_na=False)
    barcodes = np.asarray(prepared.adata.obs_names[prepared.test_indices], dtype=str)
    if len(table) != len(barcodes) or not np.array_equal(table["barcode"].to_numpy(str), barcodes):
        msg = (
            f"the annotation table {str(output)!r} has {len(table)} rows that do not match the "
            f"{len(barcodes)} test cells in order"
        )
        raise RuntimeError(msg)
    truth = np.asarray(prepared.adata.obs[conf.data.labels].to_numpy()[prepared.test_indices]).astype(str)
    return from_labels(truth, table["cell_type"].to_numpy(str), [str(v) for v in state.label_values])


def _train_files(workdir: Path) -> dict[str, Path]:
    """Every file ``task=train`` writes: one naming scheme, the report and plot beside the table."""
    return {
        "model": workdir / "model.h5",
        "metrics": workdir / "metrics.csv",
        "curve": workdir / "training_curve.png",
        "predictions": workdir / "test_predictions.csv",
        "report": workdir / "test_predictions.report.csv",
        "confusion": workdir / "test_predictions.confusion.png",
        "summary": workdir / "summary.json",
    }


def _left_out_labels(prepared: PreparedData, conf: GinsengConfig) -> dict[str, int]:
    """Labels of the input that the model does not have (too few cells), with their cell counts."""
    counts = _label_counts(prepared.adata.obs[conf.data.labels].to_numpy())
    known = {str(v) for v in prepared.dataset.label_values}
    return {str(k): int(v) for k, v in counts.sort_values().items() if str(k) not in known}


def _summarize(conf, prepared: PreparedData, logger, report: Report | None, files: dict) -> dict:
    """The end-of-run summary: printed last (nothing in it scrolls away) and kept as summary.json."""
    import json

    left_out = _left_out_labels(prepared, conf)
    summary = {
        "training_cells": len(prepared.dataset.train_indices),
        "labels": len(prepared.dataset.label_values),
        "holdout_cells": logger.holdout_cells,
        "final_holdout_accuracy": logger.holdout_accuracy[-1] if logger.holdout_accuracy else None,
        "test_cells": len(prepared.test_indices),
        "test_macro_f1": None if report is None else report.macro_f1,
        "labels_left_out": left_out,
        "min_cells": effective_min_cells(conf),
        "files": {k: str(v) for k, v in files.items() if v.exists() or k == "summary"},
    }
    lines = ["", "== ginseng: summary =="]
    lines.append(f"trained on {summary['training_cells']:,} cells of {summary['labels']} labels")
    if logger.holdout_cells:
        lines.append(
            f"per-epoch holdout: {logger.holdout_cells:,} cells, final accuracy "
            f"{summary['final_holdout_accuracy']:.4f} (a small check; the test cells are the measure)"
        )
    if report is not None:
        lines.append(f"test cells ({summary['test_cells']:,}, never trained on): " + "; ".join(report.lines()))
    if left_out:
        listed = ", ".join(f"{k} ({v} cells)" for k, v in left_out.items())
        lines.append(
            f"LEFT OUT of training, fewer than {summary['min_cells']} cells (the model cannot predict "
            f"them): {listed}"
        )
    lines.append("wrote: " + ", ".join(str(Path(v)) for v in summary["files"].values()))
    with atomic_path(files["summary"], overwrite=True, what="summary") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    _say(conf, "\n".join(lines))
    return summary


def run_train(conf: GinsengConfig, workdir: str | os.PathLike) -> TrainResult:
    """Prepare (or reuse) the dataset, train, evaluate on the test cells, write the outputs.

    Writes into ``workdir`` (process 0 only): ``model.h5``, ``metrics.csv`` (per-epoch train
    loss, holdout loss and accuracy, epochs numbered from 1), ``training_curve.png``, and when
    there are test cells ``test_predictions.csv`` (barcode, cell_type, confidence) with
    ``test_predictions.report.csv`` (per-class precision, recall, F1; the macro-F1 printed) and
    ``test_predictions.confusion.png`` beside it; last ``summary.json`` (what the end summary
    prints: sizes, test macro-F1, labels left out, files). Checkpoints go to
    ``<workdir>/checkpoints`` unless configured otherwise.
    """
    from ginseng.io import save_ginseng_state
    from ginseng.train import GinsengTrainer

    conf = to_object(conf)
    workdir = Path(workdir)
    files = _train_files(workdir)
    if _is_main():  # refuse before hours of training, not after
        for name, path in files.items():
            if name != "summary":  # rewritten by every run in the directory
                check_writable_target(path, overwrite=conf.overwrite, what=f"{name} file")

    prepared = run_prepare(conf, workdir, reuse=True)
    settings = to_trainer_settings(conf, workdir)
    if conf.overwrite and settings.checkpoint_dir is not None:
        # overwrite=true asks for a new run over the old one's outputs: its checkpoints (written
        # for the dataset that was just rebuilt) are replaced too, not resumed.
        from ginseng.train.checkpoint import remove_checkpoints

        if _is_main() and (removed := remove_checkpoints(settings.checkpoint_dir)):
            names = ", ".join(p.name for p in removed)
            _say(conf, f"overwrite=true: removed the previous run's checkpoints in {settings.checkpoint_dir}: {names}")
        _barrier("ginseng-overwrite-checkpoint")
    logger, state = _call_supported(
        GinsengTrainer,
        prepared.dataset,
        settings,
        epochs=conf.trainer.epochs,
        silent=conf.silent,
        resume=conf.trainer.resume and conf.trainer.checkpoint and not conf.overwrite,
    )

    report = None
    if _is_main():
        save_ginseng_state(state, files["model"], overwrite=conf.overwrite)
        logger.save_csv(files["metrics"], overwrite=conf.overwrite)
        logger.plot(files["curve"], overwrite=conf.overwrite)
    if len(prepared.test_indices):
        report = _evaluate_test(conf, prepared, state, files["predictions"])
        if report is not None:
            buf = io.StringIO()
            buf.write(f"Test cells ({len(prepared.test_indices)}, never trained on):\n")
            buf.write(report.table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
            _say(conf, buf.getvalue())
    if _is_main():
        _summarize(conf, prepared, logger, report, files)
    _barrier("ginseng-train-outputs")
    macro_f1 = None if report is None else report.macro_f1
    return TrainResult(logger, state, macro_f1, None if report is None else report.table, files)


# --------------------------------------------------------------------------------------------
# annotate


def _has_confidence_reference(model: Path) -> bool:
    """Whether a model file holds the trainer's holdout confidences (``min_confidence="auto"``);
    a file that is not a readable model answers True, so that annotate names its problem."""
    import h5py

    try:
        with h5py.File(model, "r") as f:
            return "confidence_counts" in f or f.attrs.get("format") is None
    except OSError:
        return True


def run_annotate(conf: GinsengConfig, workdir: str | os.PathLike) -> Path:
    """Annotate ``annotate.input`` with ``annotate.model`` into a table file.

    The table (barcode, cell type, confidence) goes to ``annotate.output`` (parquet or CSV by
    extension), default ``annotations.csv`` in ``workdir``; a relative path is taken inside
    ``workdir``. With ``annotate.truth_key``, ``<output stem>.report.csv`` and
    ``<output stem>.confusion.png`` go beside it.

    Returns
    -------
    Path
        The output table.
    """
    from ginseng.annotate import annotate

    conf = to_object(conf)
    a = conf.annotate
    workdir = Path(workdir)
    missing = [k for k in ("model", "input") if getattr(a, k) is None]
    if missing:
        msg = (
            "task=annotate needs annotate.model=<model.h5> and annotate.input=<.h5ad | 10x .h5 | "
            f"mtx folder>; missing: {', '.join('annotate.' + k for k in missing)}"
        )
        raise ValueError(msg)
    for what, p in (("annotate.model", a.model), ("annotate.input", a.input)):
        if not Path(p).expanduser().exists():
            msg = f"{what} {p!r} does not exist"
            raise FileNotFoundError(msg)
    # Like every other path the run writes, a relative output goes into the run directory.
    output = _resolve(a.output, workdir) if a.output is not None else workdir / "annotations.csv"
    if _is_main():
        check_writable_target(output, overwrite=a.overwrite, what="annotate.output")
    min_confidence = a.min_confidence
    if min_confidence == "auto" and not _has_confidence_reference(Path(a.model).expanduser()):
        if _is_main():
            warnings.warn(
                f"annotate.min_confidence=auto: the model {a.model!r} has no saved holdout "
                "confidences (trained before ginseng 0.2), so no cell is left Unassigned; "
                "retrain it, or pass annotate.min_confidence=<number in [0, 1]>",
                UserWarning, stacklevel=2,
            )
        min_confidence = None
    _call_supported(
        annotate,
        str(Path(a.model).expanduser()),
        str(Path(a.input).expanduser()),
        gene_key=a.gene_key,
        layer=a.layer,
        backed=a.backed,
        randomness=a.randomness,
        batch_size=a.batch_size,
        return_probs=a.return_probs,
        return_attn=a.return_attn,
        seed=a.seed,
        output=str(output),
        overwrite=a.overwrite,
        n_samples=a.n_samples,
        min_gene_overlap=a.min_gene_overlap,
        truth_key=a.truth_key,
        min_confidence=min_confidence,
        over_clustering=a.over_clustering,
        silent=conf.silent,
    )
    _say(conf, f"Wrote {output}")
    return output
