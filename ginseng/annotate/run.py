"""annotate as stages: check the arguments, open the source, map genes, build the forward pass,
stream the batches into the sinks, then hand the results back (or rename the files into place).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from ginseng._core.files import check_writable_target
from ginseng._core.mesh import replicate
from ginseng._core.progress import bar_disabled
from ginseng.annotate.forward import BatchStream, build_forward, build_forward_compact
from ginseng.annotate.genes import input_gene_names, map_genes
from ginseng.annotate.reject import (
    UNASSIGNED,
    check_unassigned,
    majority_vote,
    reject,
    resolve_threshold,
)
from ginseng.annotate.sinks import (
    Collected,
    Confusion,
    FileOutput,
    is_annotation_store,
    output_format,
)
from ginseng.annotate.sources import AnnDataSource, open_source
from ginseng.state import GinsengModelState

__all__ = ["annotate", "annotate_iter_full", "annotate_iter_partial"]


# --------------------------------------------------------------------------------------------
# The seed API's iterators
# --------------------------------------------------------------------------------------------


def _iter_aligned(adata, gene_names, gene_key, batch_size, allow_missing) -> Iterator[Array]:
    if int(batch_size) < 1:
        msg = f"batch_size must be >= 1, got {batch_size}"
        raise ValueError(msg)
    genes = input_gene_names(adata.var, adata.var_names, gene_key)
    gmap = map_genes(genes, gene_names, allow_missing=allow_missing, gene_key=gene_key,
                     var_columns=adata.var.columns, stacklevel=4)
    source = AnnDataSource(adata)
    source.open_reader(gmap, None)
    for a in range(0, source.n_obs, int(batch_size)):
        yield jnp.asarray(source.read(a, min(a + int(batch_size), source.n_obs)))


def annotate_iter_full(
    adata: anndata.AnnData, gene_names: list[str], gene_key: str | None = None, batch_size: int = 256
) -> Iterator[Float[Array, "batch genes"]]:
    """Iterator over AnnData returning jax arrays when all genes are present.

    Parameters
    ----------
    adata : AnnData
        AnnData object (in memory or backed).
    gene_names : list[str]
        Genes ordered as in training.
    gene_key : str | None
        Column in .var where gene names are stored.
    batch_size : int
        Number of cells per batch.

    Yields
    ------
    jax.numpy.ndarray
        Array of shape (batch_size, len(gene_names)) (the last batch may be shorter), columns in the
        order of ``gene_names``.

    Raises
    ------
    ValueError
        When a gene of ``gene_names`` is missing from the input, ``gene_key`` is not a var column,
        or ``batch_size`` < 1.
    """
    yield from _iter_aligned(adata, gene_names, gene_key, batch_size, allow_missing=False)


def annotate_iter_partial(
    adata: anndata.AnnData, gene_names: list[str], gene_key: str | None = None, batch_size: int = 256
) -> Iterator[Float[Array, "batch genes"]]:
    """Iterator over AnnData when genes are missing which were used during training.

    Parameters
    ----------
    adata : AnnData
        AnnData object (in memory or backed).
    gene_names : list[str]
        Genes ordered as in training. Missing genes are filled with zeros.
    gene_key : str | None
        Column in .var where gene names are stored.
    batch_size : int
        Number of barcodes per batch.

    Yields
    ------
    jax.numpy.ndarray
        Array of shape (batch_size, len(gene_names)) (the last batch may be shorter).

    Warns
    -----
    UserWarning
        With the percentage of ``gene_names`` found, when some are missing.
    """
    yield from _iter_aligned(adata, gene_names, gene_key, batch_size, allow_missing=True)



# --------------------------------------------------------------------------------------------
# Stage 1: arguments and targets, checked before anything is read or written
# --------------------------------------------------------------------------------------------


def _check_values(normalize, randomness, copy, target_sum, batch_size, n_samples, min_gene_overlap):
    """(batch_size, n_samples) as ints, after checking every plain argument."""
    for name, value in (("normalize", normalize), ("randomness", randomness), ("copy", copy)):
        if not (isinstance(value, (bool, np.bool_)) or (value is None and name == "normalize")):
            expected = "True, False or None" if name == "normalize" else "True or False"
            msg = f"{name} must be {expected}, got {value!r}"
            raise ValueError(msg)
    if target_sum is not None and (
        isinstance(target_sum, (bool, np.bool_))
        or not isinstance(target_sum, (int, float, np.integer, np.floating))
        or not np.isfinite(target_sum)
        or target_sum <= 0
    ):
        msg = f"target_sum must be a finite number > 0 or None (the model's), got {target_sum!r}"
        raise ValueError(msg)
    if isinstance(batch_size, (bool, np.bool_)) or isinstance(n_samples, (bool, np.bool_)):
        msg = f"batch_size and n_samples must be integers, got {batch_size!r} and {n_samples!r}"
        raise ValueError(msg)  # noqa: TRY004 - every bad batch_size is a ValueError, as the seed's
    if int(batch_size) != batch_size or int(batch_size) < 1:
        msg = f"batch_size must be an integer >= 1, got {batch_size!r}"
        raise ValueError(msg)
    if int(n_samples) != n_samples or int(n_samples) < 1:
        msg = f"n_samples must be an integer >= 1, got {n_samples!r}"
        raise ValueError(msg)
    if min_gene_overlap is not None and not (
        isinstance(min_gene_overlap, (int, float)) and not isinstance(min_gene_overlap, bool)
        and 0.0 <= float(min_gene_overlap) <= 1.0
    ):
        msg = f"min_gene_overlap must be a fraction in [0, 1] or None, got {min_gene_overlap!r}"
        raise ValueError(msg)
    if int(n_samples) > 1 and not randomness:
        msg = f"n_samples={n_samples} needs randomness=True: without dropout every pass is identical"
        raise ValueError(msg)
    return int(batch_size), int(n_samples)


@dataclass
class _Targets:
    """The files annotate will write (None: that output was not asked for)."""

    output: Path | None
    store: Path | None
    reports: tuple[Path, Path] | None


def _targets(output, overwrite: bool, want_arrays: bool, truth_key, report_dir) -> _Targets:
    out_path = None if output is None else Path(output)
    zarr_path = report_paths = None
    if out_path is not None:
        output_format(out_path)
        check_writable_target(out_path, overwrite, "output")
        if want_arrays:
            zarr_path = out_path.with_suffix(".zarr")
            check_writable_target(zarr_path, overwrite, "output store", "dir", is_annotation_store)
    if truth_key is not None:
        if report_dir is not None:
            rdir = Path(report_dir)
            if not rdir.is_dir():
                msg = f"report_dir {str(rdir)!r} does not exist or is not a directory"
                raise FileNotFoundError(msg)
            stem = out_path.stem if out_path is not None else "annotations"
            report_paths = (rdir / f"{stem}.report.csv", rdir / f"{stem}.confusion.png")
        elif out_path is not None:
            report_paths = (out_path.with_name(out_path.stem + ".report.csv"),
                            out_path.with_name(out_path.stem + ".confusion.png"))
        for p in report_paths or ():
            check_writable_target(p, overwrite, "report")
    return _Targets(out_path, zarr_path, report_paths)


def _load_model(model_state) -> GinsengModelState:
    if isinstance(model_state, GinsengModelState):
        return model_state
    if isinstance(model_state, (str, os.PathLike)):
        from ginseng.io import load_ginseng_state  # io pulls in the file readers: load on use

        return load_ginseng_state(model_state)
    msg = f"model_state must be a GinsengModelState or a path to a model file, got {type(model_state).__name__}"
    raise TypeError(msg)



def _warn_if_not_counts(block: np.ndarray, layer: str | None) -> None:
    """Warn when the first cells hold non-integer values although the model normalizes counts."""
    if block.size and not np.all(np.mod(block, 1) == 0):
        where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        msg = (
            f"the input's values ({where}) are not integers (normalized data?), but the model "
            "normalizes raw counts itself; pass layer= naming raw counts if the file has them "
            "(predictions on normalized values are usually worse)"
        )
        warnings.warn(msg, UserWarning, stacklevel=4)


@dataclass
class _Options:
    """annotate's arguments, checked."""

    gene_key: str | None
    normalize: bool | None
    target_sum: float | None
    randomness: bool
    batch_size: int
    copy: bool
    return_probs: bool
    return_attn: bool
    return_table: bool
    seed: int
    overwrite: bool
    n_samples: int
    min_gene_overlap: float | None
    truth_key: str | None
    layer: str | None
    cells: object
    devices: object
    silent: bool
    min_confidence: float | None = None  # resolved: cells below it are Unassigned
    over_clustering: object = None
    unassigned: str = UNASSIGNED

    def labels_out(self, state: GinsengModelState) -> list:
        """What a prediction code names: the model's labels, then Unassigned when cells may be
        rejected (its code is the number of model labels)."""
        labels = list(np.asarray(state.label_values))
        if self.min_confidence is not None:
            labels.append(self.unassigned)
        return labels


# --------------------------------------------------------------------------------------------
# Stage 2: the source, its genes and cells; the forward pass
# --------------------------------------------------------------------------------------------


def _prepare_source(source, state: GinsengModelState, o: _Options):
    """Check the source against the options; its gene map; the truth sink (or None); the
    cluster code of every cell (None without over_clustering)."""
    source.check_layer(o.layer)
    gmap = source.map_genes(np.asarray(state.genes).astype(str), o.gene_key, o.min_gene_overlap)
    source.select(o.cells)
    confusion = None
    if o.truth_key is not None:
        codes, truth_labels = source.truth(o.truth_key)
        confusion = Confusion(codes, truth_labels, [str(v) for v in o.labels_out(state)],
                              [str(v) for v in np.asarray(state.label_values)])
    clusters = None if o.over_clustering is None else source.clusters(o.over_clustering)
    source.open_reader(gmap, o.layer)
    return gmap, confusion, clusters


def _forward(stream: BatchStream, state: GinsengModelState, o: _Options):
    """(jitted forward, its data sharding, replicated params, replicated seed)."""
    norm = state.normalize if o.normalize is None else bool(o.normalize)
    tsum = state.target_sum if o.target_sum is None else float(o.target_sum)
    settings = {
        "dropout_rate": float(state.dropout_rate), "normalize": norm, "target_sum": tsum,
        "randomness": bool(o.randomness), "n_samples": o.n_samples, "want_probs": bool(o.return_probs),
        "want_attn": bool(o.return_attn),
    }
    fwd, data_sh, _ = build_forward(stream.mesh, **settings)
    compact = build_forward_compact(stream.mesh, len(state.genes), **settings)
    seed = replicate(np.uint32(int(o.seed) % 2**32), stream.mesh)
    return (fwd, compact), data_sh, replicate(state.params, stream.mesh), seed, norm


# --------------------------------------------------------------------------------------------
# Stage 3: stream the batches into the sinks
# --------------------------------------------------------------------------------------------


def _stream(source, state, o: _Options, targets: _Targets, sinks: tuple, stream: BatchStream, fwd_parts):
    """Run every batch; the collected results (None when everything went to files)."""
    fwd, data_sh, params, seed = fwd_parts
    confusion, clusters = sinks
    label_values, n_cells = np.asarray(state.label_values), source.n_cells
    labels_out = [str(v) for v in o.labels_out(state)]
    in_memory = targets.output is None
    collected = None
    # Per-cell results kept in memory: to return them, to write a table read in storage order
    # in original order, or to vote once every cell is predicted.
    if in_memory or source.stored_order is not None or clusters is not None:
        collected = Collected(
            n_cells, o.n_samples,
            probs_shape=(n_cells, len(label_values)) if in_memory and o.return_probs else None,
            attn_shape=(n_cells, len(state.genes)) if in_memory and o.return_attn else None,
        )
    with contextlib.ExitStack() as stack:
        files = None
        if targets.output is not None and stream.is_writer:
            files = FileOutput(
                stack, targets.output, targets.store, overwrite=o.overwrite, n_cells=n_cells,
                chunk_rows=stream.global_batch, label_str=labels_out,
                model_labels=[str(v) for v in label_values],
                model_genes=np.asarray(state.genes).astype(str), n_samples=o.n_samples,
                want_probs=bool(o.return_probs), want_attn=bool(o.return_attn),
                with_vote=clusters is not None,
            )
        bar = tqdm(total=n_cells, unit="cells", desc="annotate",
                   disable=bar_disabled(o.silent or not stream.is_writer, n_cells))
        stack.callback(bar.close)

        def consume(a: int, b: int, out: dict) -> None:
            rows = slice(a, b) if source.stored_order is None else source.stored_order[a:b]
            reject(out, o.min_confidence, len(label_values))
            if confusion is not None:
                confusion.add(rows, out["pred"])
            if collected is not None:
                collected.put(rows, out)
                if files is not None:  # the stores stream; the table is written at the end
                    files.append_arrays(a, b, out)
            elif files is not None:
                files.append(source.barcodes(a, b), a, b, out)
            bar.update(b - a)

        stream.run(source, fwd, data_sh, params, seed, consume)
        if clusters is not None:
            collected.res["vote"] = majority_vote(collected.res["pred"], clusters, len(labels_out))
        if files is not None and collected is not None:  # the table, from the collected columns
            files.append_collected(source, collected.res, stream.global_batch)
        if confusion is not None and stream.is_writer:
            confusion.finish(targets.reports, o.overwrite, o.silent)
    return None if collected is None else collected.res


# --------------------------------------------------------------------------------------------
# Stage 4: results in memory
# --------------------------------------------------------------------------------------------


def _obs_columns(source, res: dict, labels_out: list, n_samples: int, cells) -> dict:
    categories = pd.Index(labels_out)
    obs_cols = {"ginseng_cell_type": pd.Categorical.from_codes(res["pred"], categories=categories),
                "ginseng_confidence": res["conf"]}
    if n_samples > 1:
        obs_cols["ginseng_entropy"] = res["entropy"]
    if "vote" in res:
        obs_cols["ginseng_majority_voting"] = pd.Categorical.from_codes(res["vote"], categories=categories)
    if cells is None:
        return obs_cols
    # obs gets a value per row: missing for the rows not annotated
    full = {}
    for k, v in obs_cols.items():
        if isinstance(v, pd.Categorical):
            codes = np.full(source.n_obs, -1, np.int32)
            codes[cells] = v.codes
            full[k] = pd.Categorical.from_codes(codes, categories=categories)
        else:
            full[k] = np.full(source.n_obs, np.nan, np.float32)
            full[k][cells] = v
    return full


def _results(source, res: dict, state: GinsengModelState, o: _Options):
    """The requested items, in the documented order (see ``annotate``'s Returns)."""
    label_values = np.asarray(state.label_values)
    labels_out = o.labels_out(state)
    cell_type = pd.Categorical.from_codes(res["pred"], categories=pd.Index(labels_out))
    barcodes = source.barcodes(0, source.n_cells)
    if source.kind == "h5ad":
        source.close()
    results: list = []
    if source.kind in ("adata", "backed", "path"):
        obs_cols = _obs_columns(source, res, labels_out, o.n_samples, source.cells)
        target = source.adata
        if o.copy and source.kind != "path":  # an AnnData read from a path is already ours to return
            target = target.copy() if source.kind == "adata" else target
        if o.copy and target.isbacked:
            target = target.to_memory()
        for k, v in obs_cols.items():
            target.obs[k] = v
        if o.copy:
            results.append(target)
    if o.return_table or source.kind in ("path", "h5ad", "dataset"):
        table = pd.DataFrame({"barcode": barcodes, "cell_type": cell_type, "confidence": res["conf"]})
        if o.n_samples > 1:
            table["entropy"] = res["entropy"]
        if "vote" in res:
            table["majority_voting"] = pd.Categorical.from_codes(res["vote"], categories=pd.Index(labels_out))
        results.append(table)
    index = pd.Index(barcodes, name="barcode")
    if o.return_probs:
        results.append(pd.DataFrame(res["probs"], index=index, columns=pd.Index(label_values)))
    if o.return_attn:  # labelled like the probabilities: barcodes x the model's genes
        results.append(pd.DataFrame(res["attn"], index=index,
                                    columns=pd.Index(np.asarray(state.genes).astype(str), name="gene")))
    if not results:
        return None
    return results[0] if len(results) == 1 else tuple(results)


def _annotate(state: GinsengModelState, source, o: _Options, targets: _Targets):
    gmap, confusion, clusters = _prepare_source(source, state, o)
    stream = BatchStream(o.devices, o.batch_size, source.n_cells, gmap.n_model)
    fwd, data_sh, params, seed, norm = _forward(stream, state, o)
    # A GinsengDataset is read in storage order and every result put at its original index;
    # cells are keyed by original index, so Monte Carlo draws are the same either way. A streamed
    # table is then written at the end from per-cell columns kept in memory (12 bytes a cell);
    # per-cell probability or attention stores still stream in original order.
    if source.kind == "dataset" and (targets.output is None or not (o.return_probs or o.return_attn)):
        source.in_storage_order()
    if norm and source.kind != "dataset" and source.n_cells:
        _warn_if_not_counts(source.read(0, min(source.n_cells, 256)), o.layer)
    res = _stream(source, state, o, targets, (confusion, clusters), stream, (fwd, data_sh, params, seed))
    if targets.output is not None:
        if source.kind == "h5ad":
            source.close()
        return None
    return _results(source, res, state, o)


# --------------------------------------------------------------------------------------------
# annotate
# --------------------------------------------------------------------------------------------


def annotate(
    model_state: GinsengModelState | str | os.PathLike,
    adata: anndata.AnnData | str | os.PathLike,
    gene_key: str | None = None,
    backed: bool = False,
    normalize: bool | None = None,
    target_sum: float | None = None,
    randomness: bool = False,
    batch_size: int = 1024,
    copy: bool = False,
    return_probs: bool = False,
    return_attn: bool = False,
    return_table: bool = False,
    seed: int = 123,
    *,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    n_samples: int = 1,
    min_gene_overlap: float | None = 0.5,
    truth_key: str | None = None,
    report_dir: str | os.PathLike | None = None,
    layer: str | None = None,
    cells=None,
    devices=None,
    silent: bool = False,
    min_confidence: float | str | None = None,
    over_clustering=None,
    unassigned_label: str = UNASSIGNED,
):
    """Annotate single-cell sequencing data using a trained ginseng model.

    Parameters
    ----------
    model_state : GinsengModelState | str | Path
        Model state containing parameters, genes, labels, and metadata, or a model file written by
        ``ginseng.io.save_ginseng_state``.
    adata : AnnData | str | Path | GinsengDataset
        AnnData object (in memory or backed) or path to count data stored in 10x .h5 format,
        AnnData .h5ad format, or in a 10x matrix market format folder, or a ``GinsengDataset``.
        It is read in contiguous row blocks; the whole matrix is never densified.
    gene_key : str | None
        Column in .var where gene names are stored (default: ``var_names``).
    backed : bool
        If True and adata is a path to an .h5ad file, read it in on-disk/backed mode: memory then
        does not grow with the number of cells. Ignored for other inputs.
    normalize : bool | None
        Override normalize in model_state (True or False; None keeps the model's). This may be
        useful if you do not have access to raw counts. Be aware that differences in normalization
        between training and inference will likely change performance.
    target_sum : float | None
        Override target_sum in model_state (None keeps the model's).
    randomness : bool
        If True, dropout remains active during inference (Monte Carlo dropout). Each cell's key is
        ``fold_in(key(seed), cell index)``, so results do not depend on batch size or devices.
    batch_size : int
        Cells per forward pass (rounded up to a multiple of the number of devices). Every batch
        has this shape (the last is padded), so the forward pass compiles once.
    copy : bool
        If True, return a copy of the AnnData object with the results, else modify in place.
    return_probs : bool
        If True, return a (cells x classes) table of softmax probabilities (columns: the model's
        label values, index: barcodes). With ``output``, written to ``<stem>.zarr/probs`` instead.
    return_attn : bool
        If True, return the gene-level weights of every cell, a (cells x model genes) float32
        DataFrame, indexed by barcode, one column per model gene (large: not recommended for
        large datasets without ``output``). With ``output``, written to
        ``<stem>.zarr/attn`` block by block.
    return_table : bool
        If True, return a table with columns 'barcode', 'cell_type', 'confidence' (and 'entropy'
        when ``n_samples > 1``).
    seed : int
        Random seed for reproducibility (used with ``randomness``).
    output : str | Path | None
        Write results to this file as they are produced: ``.parquet``/``.pq`` or ``.csv`` table of
        barcode, cell_type, confidence (+ entropy), plus ``<output stem>.zarr`` with arrays
        ``probs`` / ``attn`` when ``return_probs`` / ``return_attn``. Everything is written under
        temporary names and renamed into place at the end. The function then returns None and no
        (cells x classes) or (cells x genes) array is held in memory (``copy`` and
        ``return_table`` do not apply; the input is not modified).
    overwrite : bool
        Replace existing output (and report) files; otherwise they are refused.
    n_samples : int
        Number of stochastic passes (requires ``randomness=True`` when > 1). Probabilities are
        averaged; the predictive entropy of the mean goes to ``obs["ginseng_entropy"]`` / the
        'entropy' column.
    min_gene_overlap : float | None
        Refuse (ValueError) when fewer than this fraction of the model's genes are found in the
        input (default 0.5): with most genes missing nearly every cell gets one label. The error
        shows examples of both sides and the likely cause (letter case, species, ids vs symbols).
        None or 0 accepts any overlap (a warning still names the missing genes).
    truth_key : str | None
        An obs column with true labels (for a GinsengDataset: ``"labels"``). Prints per-class
        precision / recall / F1 and macro-F1 (mean F1 over true classes) and writes
        ``<output stem>.report.csv`` / ``<output stem>.confusion.png`` beside ``output`` (or
        into ``report_dir``; stem ``annotations`` without an output). The headline macro-F1 is over
        the model's labels, on the cells whose true label the model knows; true labels the model
        lacks are listed with their cell counts, and the macro-F1 over all true labels (counting
        those as 0) is reported beside it under its own name.
    report_dir : str | Path | None
        Folder for the truth report (must exist).
    layer : str | None
        Read counts from ``adata.layers[layer]`` instead of ``X`` (files often keep raw counts in
        a layer and normalized values in ``X``). When the model normalizes (the default) and the
        first cells' values are not integers, a warning says that raw counts were expected.
    cells : array-like of int or bool, optional
        Annotate only these rows of an AnnData input (row indices or a boolean mask), e.g. the
        test cells of a backed file, read block by block. Tables, probabilities and reports cover
        these cells in row order; obs columns written into an AnnData are missing (NaN) for the
        other rows.
    devices : list of jax.Device | None
        Devices to shard batches over (default: all devices, all processes). Under
        ``jax.distributed`` every process must call ``annotate`` with the same arguments; each
        reads its own contiguous rows of every global batch, results are gathered after each
        batch, process 0 alone writes files, and without ``output`` every process gets all
        results.
    silent : bool
        Disable the progress bar and the printed report.
    min_confidence : float | "auto" | None
        Cells whose confidence (top probability; with ``n_samples > 1`` the top averaged
        probability) is below this get the label ``unassigned_label`` instead of a model label
        (CellTypist's ``p_thres``). ``"auto"`` reads the threshold from the model: the largest one
        that leaves at most 1 % of the model's own holdout cells (its training cells when it had
        none) Unassigned, from the confidences the trainer saved in the model; it never looks
        at the query. None (default) assigns every cell a model label. The confidence itself,
        probabilities and attention are unchanged. The truth report counts Unassigned cells on
        their own row (they lower the recall of their true label).
    over_clustering : str | array-like | None
        An obs column of cluster labels (or one label per input row; for a GinsengDataset one
        per cell): every cell also gets its cluster's most frequent predicted label, Unassigned
        included, in ``obs["ginseng_majority_voting"]`` and a ``majority_voting`` table column
        (a tie goes to the label listed first in the model; cells with a missing cluster keep
        their own). The per-cell labels are kept. With ``output`` the per-cell columns are
        held in memory (12 bytes a cell) and the table written once all cells are predicted.
    unassigned_label : str
        The label of rejected cells (default ``"Unassigned"``); refused (ValueError) when the
        model has a label of that name, since the two could not be told apart.

    Returns
    -------
    None | AnnData | pd.DataFrame | np.ndarray | tuple
        With ``output``: None. Otherwise the requested items in this fixed order, as a single
        object when one is requested and as a tuple when several are:
        ``(adata_copy if copy, table if return_table, probs if return_probs, attn if return_attn)``;
        None when nothing is requested (``adata`` modified in place: ``obs["ginseng_cell_type"]``
        (categorical of the model's labels), ``obs["ginseng_confidence"]`` (top probability) and,
        with ``n_samples > 1``, ``obs["ginseng_entropy"]``). A path or a GinsengDataset has no
        object to modify, so for those the table is always returned (``return_table`` is implied;
        with ``copy=True`` a path also gives the AnnData read from it, with the obs columns).
        A backed AnnData gets the columns in its in-memory ``obs`` (the file is not modified).

    Raises
    ------
    ValueError
        Bad ``batch_size`` / ``n_samples``, no gene overlap, gene identifiers of different kinds
        (Ensembl ids vs symbols), unknown ``gene_key`` / ``truth_key`` column, unknown output
        extension, unreadable model file.
    FileExistsError
        An output or report file exists and ``overwrite`` is False.
    FileNotFoundError
        The output or report directory does not exist, or the model file is missing.
    """
    batch_size, n_samples = _check_values(
        normalize, randomness, copy, target_sum, batch_size, n_samples, min_gene_overlap
    )
    targets = _targets(output, overwrite, bool(return_probs or return_attn), truth_key, report_dir)
    options = _Options(
        gene_key=gene_key, normalize=normalize, target_sum=target_sum, randomness=randomness,
        batch_size=batch_size, copy=copy, return_probs=return_probs, return_attn=return_attn,
        return_table=return_table, seed=seed, overwrite=overwrite, n_samples=n_samples,
        min_gene_overlap=min_gene_overlap, truth_key=truth_key, layer=layer, cells=cells,
        devices=devices, silent=silent,
    )
    state = _load_model(model_state)
    options.min_confidence = resolve_threshold(min_confidence, state)
    options.over_clustering = over_clustering
    options.unassigned = check_unassigned(unassigned_label, state.label_values)
    source = open_source(
        adata, backed, light=truth_key is None and not copy and layer is None and cells is None
        and over_clustering is None,
    )
    try:
        return _annotate(state, source, options, targets)
    except BaseException:
        source.close()
        raise
