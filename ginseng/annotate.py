"""Annotate cells with a trained ginseng model: streamed, sharded, written as it goes.

The input (in-memory or backed AnnData, a path to .h5ad / 10x .h5 / 10x mtx folder, or a
:class:`ginseng.data.GinsengDataset`) is read in contiguous row blocks. Its genes are mapped onto
the model's genes once, as an index array (missing genes become zero columns). Every batch has one
fixed shape (the last one is padded and its padding dropped on the host), so the forward pass is
compiled once; it runs jitted over a ``"data"`` mesh of all devices with replicated parameters.
Under ``jax.distributed`` every process reads its own contiguous rows of each global batch and the
results are gathered once per batch. A background thread reads the next block while the devices
compute the current one.

With ``output=`` results go to a table file (parquet or CSV) and, when asked, probabilities and
gene weights go to a zarr store beside it, block by block: memory does not grow with the number of
cells beyond the input's own ``obs``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import types
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import anndata
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from ginseng._core.files import atomic_path, check_writable_target
from ginseng._core.progress import bar_disabled
from ginseng._core.report import Report, from_confusion
from ginseng._core.threads import background
from ginseng.nn import nn_annotate
from ginseng.state import GinsengModelState
from ginseng.utils import _check_cells, _layer_names, _row_block

__all__ = ["annotate", "annotate_iter_full", "annotate_iter_partial"]

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")
_TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# Rows buffered before a parquet row group / CSV chunk is written: large enough that a
# million-cell table has few row groups, small enough to be negligible in memory.
_TABLE_FLUSH_ROWS = 65536


# --------------------------------------------------------------------------------------------
# Genes: map the input's genes onto the model's genes once
# --------------------------------------------------------------------------------------------


def _gene_id_kind(names) -> str:
    """``"ensembl"``, ``"symbol"`` or ``"mixed"`` (ginseng.io's detector when available)."""
    try:
        from ginseng.io import detect_gene_id_kind
    except ImportError:  # io not importable: same rule, locally
        names = [str(n) for n in names]
        frac = sum(1 for n in names if _ENSEMBL_RE.match(n)) / max(len(names), 1)
        return "ensembl" if frac >= 0.9 else "symbol" if frac <= 0.1 else "mixed"
    return detect_gene_id_kind(names)


_KIND_WORDS = {"ensembl": "Ensembl ids", "symbol": "gene symbols", "mixed": "a mix of Ensembl ids and symbols"}


def _input_gene_names(var: pd.DataFrame, var_names, gene_key: str | None) -> np.ndarray:
    if gene_key is None:
        return np.asarray(var_names).astype(str)
    if gene_key not in var.columns:
        msg = (
            f"gene_key {gene_key!r} is not a column of adata.var; "
            f"available columns: {list(map(str, var.columns))}"
        )
        raise ValueError(msg)
    return np.asarray(var[gene_key]).astype(str)


class _GeneMap(NamedTuple):
    """``src[k]`` is the input column holding model gene ``dst[k]``; other model genes are zero."""

    src: np.ndarray  # int64, input column positions
    dst: np.ndarray  # int64, model gene positions
    n_model: int
    identity: bool  # input columns are exactly the model genes, in order


def _likely_mismatch_cause(input_genes: np.ndarray, model_genes: np.ndarray, n_found: int) -> str:
    """A sentence on why few model genes match: letter case / species, or version suffixes."""
    def folded(names, fold):
        return {fold(str(g)) for g in names}

    upper = len(folded(model_genes, str.upper) & folded(input_genes, str.upper))
    if upper >= max(2 * n_found, n_found + 10):
        return (
            f"Ignoring letter case, {upper} of them would match: the names differ in case (e.g. a "
            "mouse model, 'Cd4', on human data, 'CD4', or symbols written in another case): "
            "annotate data of the model's species, or map the genes (orthologs) first"
        )
    strip = lambda g: g.split(".")[0]
    unversioned = len(folded(model_genes, strip) & folded(input_genes, strip))
    if unversioned >= max(2 * n_found, n_found + 10):
        return f"Without version suffixes ('.5') {unversioned} of them would match: strip them from the input's names"
    return (
        "Check that the input is of the model's species, and names genes the same way (symbols vs "
        "Ensembl ids; gene_key= chooses a var column)"
    )


def _map_genes(input_genes: np.ndarray, model_genes: np.ndarray, *, allow_missing: bool = True,
               gene_key: str | None = None, var_columns=(), min_overlap: float | None = None) -> _GeneMap:
    """Index the model's genes in the input; warn on partial overlap, raise on none (or on less
    than ``min_overlap`` of the model's genes)."""
    input_genes = np.asarray(input_genes).astype(str)
    model_genes = np.asarray(model_genes).astype(str)
    n_model = len(model_genes)
    first: dict[str, int] = {}
    for j, g in enumerate(input_genes):  # duplicated input names: the first occurrence is used
        first.setdefault(g, j)
    pos = np.fromiter((first.get(g, -1) for g in model_genes), dtype=np.int64, count=n_model)
    found = pos >= 0
    n_found = int(found.sum())
    where = f"adata.var[{gene_key!r}]" if gene_key is not None else "adata.var_names"
    if len(first) < len(input_genes):
        names, counts = np.unique(input_genes, return_counts=True)
        dup = np.intersect1d(names[counts > 1], model_genes)
        if dup.size:
            msg = (
                f"{dup.size} of the model's genes appear more than once in the input ({where}), "
                f"e.g. {[str(g) for g in dup[:5]]}; the first column of each is used. Make the "
                "names unique (adata.var_names_make_unique()) or pass gene_key= to choose"
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
    if len(input_genes) and n_model:
        kind_in, kind_model = _gene_id_kind(input_genes), _gene_id_kind(model_genes)
        if {kind_in, kind_model} == {"ensembl", "symbol"}:
            msg = (
                f"the model's genes are {_KIND_WORDS[kind_model]} (e.g. {str(model_genes[0])!r}) but the "
                f"input's genes ({where}) are {_KIND_WORDS[kind_in]} (e.g. {str(input_genes[0])!r}); "
                f"{n_found} of {n_model} model genes match. Pass gene_key= naming a var column with "
                f"{_KIND_WORDS[kind_model]}; var columns: {list(map(str, var_columns))}"
            )
            raise ValueError(msg)
    if n_found == 0:
        msg = (
            f"none of the model's {n_model} genes (e.g. {[str(g) for g in model_genes[:3]]}) are in the input's "
            f"{len(input_genes)} genes ({where}, e.g. {[str(g) for g in input_genes[:3]]}); "
            f"var columns: {list(map(str, var_columns))}"
        )
        raise ValueError(msg)
    if min_overlap is not None and n_found < min_overlap * n_model:
        missing = model_genes[~found]
        msg = (
            f"only {n_found} of the model's {n_model} genes ({100.0 * n_found / n_model:.1f}%) are in "
            f"the input ({where}); at least {100.0 * min_overlap:.0f}% must match "
            f"(min_gene_overlap={min_overlap}). Missing model genes, e.g. "
            f"{[str(g) for g in missing[:5]]}; input genes, e.g. {[str(g) for g in input_genes[:5]]}. "
            f"{_likely_mismatch_cause(input_genes, model_genes, n_found)}. To annotate anyway, lower "
            "min_gene_overlap (annotate.min_gene_overlap on the command line)"
        )
        raise ValueError(msg)
    if n_found < n_model:
        missing = model_genes[~found]
        if not allow_missing:
            msg = (
                f"{len(missing)} of the model's {n_model} genes are missing from the input "
                f"(e.g. {[str(g) for g in missing[:5]]}); use annotate_iter_partial to fill them with zeros"
            )
            raise ValueError(msg)
        msg = (
            f"only {n_found} of the model's {n_model} genes ({100.0 * n_found / n_model:.1f}%) were "
            f"found in the input ({where}); the {n_model - n_found} missing genes "
            f"(e.g. {[str(g) for g in missing[:5]]}) are filled with zeros, which may lower accuracy"
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
    dst = np.flatnonzero(found).astype(np.int64)
    src = pos[found]
    identity = n_found == n_model and len(input_genes) == n_model and bool(np.all(src == dst))
    return _GeneMap(src=src, dst=dst, n_model=n_model, identity=identity)


# --------------------------------------------------------------------------------------------
# The block reader: contiguous rows of any input, aligned to the model's genes
# --------------------------------------------------------------------------------------------


class _BlockReader:
    """Read rows ``[a, b)`` of an input as a dense float32 block ``(b - a, n_model_genes)``.

    Only the block is densified: CSR (in memory or backed) is sliced by rows and scattered into
    the model's gene order; dense (in memory or backed) is sliced and its columns selected.
    """

    def __init__(self, source: Any, gmap: _GeneMap, layer: str | None = None):
        self.gmap = gmap
        self.dataset = None
        self.stored = False  # for a dataset: [a, b) are stored rows, not original ones
        self.cells = None  # for an AnnData: [a, b) index these rows (sorted), not the input's
        if _is_ginseng_dataset(source):
            self.dataset = source
            self.n_obs = int(source.n_cells)
            return
        X = source.X if layer is None else source.layers[layer]
        if X is None:
            msg = "adata.X is None; annotate needs counts in adata.X (or pass layer=)"
            raise ValueError(msg)
        if sp.issparse(X) and not sp.isspmatrix_csr(X) and not isinstance(X, sp.csr_array):
            # Row blocks of a CSC (or COO) matrix are slow to cut: convert once (in memory anyway).
            X = sp.csr_matrix(X)
        self.X = X
        self.n_obs = int(source.n_obs)
        # Backed CSR in HDF5: read the three arrays directly (less than half the time of
        # anndata's row slicing, which matters when the reader shares the cores with compute).
        self._h5 = None
        group = getattr(X, "group", None)
        if isinstance(group, h5py.Group) and getattr(X, "format", None) == "csr":
            self._h5 = (group["data"], group["indices"], group["indptr"])
        # Column lookup for the sparse scatter: input column -> model position (-1: unused).
        self.colmap = np.full(int(source.n_vars), -1, dtype=np.int64)
        self.colmap[gmap.src] = gmap.dst

    def read(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        n = b - a
        g = self.gmap
        if out is None:
            out = np.zeros((n, g.n_model), dtype=np.float32)
        else:
            out[:n] = 0.0
        if n == 0:
            return out[:0]
        if self.dataset is not None:
            rows = np.arange(a, b, dtype=np.int64)
            if self.stored:
                block = np.asarray(self.dataset._read_stored(rows), dtype=np.float32)
            else:
                block = np.asarray(self.dataset.get_batch(rows), dtype=np.float32)
            self._place_dense(block, out, n)
            return out[:n]
        if self.cells is not None:
            blk = _row_block(self.X, a, b, self.cells)
        elif self._h5 is not None:
            data, indices, indptr = self._h5
            ptr = indptr[a : b + 1].astype(np.int64)
            s0, s1 = int(ptr[0]), int(ptr[-1])
            blk = sp.csr_matrix((data[s0:s1], indices[s0:s1], ptr - s0), shape=(n, len(self.colmap)))
        else:
            blk = self.X[a:b]
        if sp.issparse(blk):
            blk = sp.csr_matrix(blk)
            if blk.dtype != np.float32:  # integer counts: toarray needs a matching out dtype
                blk = blk.astype(np.float32)
            if not g.identity:
                # Re-index columns into the model's gene order (dropping unused genes) and let
                # scipy's C loop densify; it adds duplicates, as a sum of entries should.
                cols = self.colmap[blk.indices]
                keep = cols >= 0
                if keep.all():
                    blk = sp.csr_matrix((blk.data, cols, blk.indptr), shape=(n, g.n_model))
                else:
                    kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
                    blk = sp.csr_matrix((blk.data[keep], cols[keep], kept[blk.indptr]), shape=(n, g.n_model))
            blk.toarray(out=out[:n])  # out is zeroed above: toarray accumulates into it
        else:
            self._place_dense(np.asarray(blk), out, n)
        return out[:n]

    def _place_dense(self, block: np.ndarray, out: np.ndarray, n: int) -> None:
        g = self.gmap
        if g.identity:
            out[:n] = block
        else:
            out[:n, g.dst] = block[:, g.src]


def _is_ginseng_dataset(obj) -> bool:
    try:
        from ginseng.data import GinsengDataset
    except ImportError:
        return False
    return isinstance(obj, GinsengDataset)


def _iter_aligned(adata, gene_names, gene_key, batch_size, allow_missing) -> Iterator[Array]:
    if int(batch_size) < 1:
        msg = f"batch_size must be >= 1, got {batch_size}"
        raise ValueError(msg)
    genes = _input_gene_names(adata.var, adata.var_names, gene_key)
    gmap = _map_genes(genes, gene_names, allow_missing=allow_missing, gene_key=gene_key,
                      var_columns=adata.var.columns)
    reader = _BlockReader(adata, gmap)
    for a in range(0, reader.n_obs, int(batch_size)):
        yield jnp.asarray(reader.read(a, min(a + int(batch_size), reader.n_obs)))


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
# The forward pass
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _build_forward(
    mesh: Mesh,
    *,
    dropout_rate: float,
    normalize: bool,
    target_sum: float | None,
    randomness: bool,
    n_samples: int,
    want_probs: bool,
    want_attn: bool,
):
    """Jitted ``(params, seed, x, index) -> dict`` over the ``"data"`` axis of ``mesh``.

    ``index`` holds every row's global cell index: with ``randomness`` each cell's dropout key is
    ``fold_in(key(seed), index)`` (and pass ``s`` of ``n_samples`` folds in ``s``), so the result
    does not depend on batch size, padding or device count. Cached, so that annotating several
    inputs with the same settings compiles once.
    """
    def one_pass(params, base_key, x, index, s):
        if randomness:
            def per_cell(i, xi):
                k = jax.random.fold_in(base_key, i)
                if n_samples > 1:
                    k = jax.random.fold_in(k, s)
                return nn_annotate(params, k, xi, dropout_rate, normalize, target_sum,
                                   return_attn=want_attn, training=True)

            out = jax.vmap(per_cell)(index.astype(jnp.uint32), x)
        else:
            out = nn_annotate(params, base_key, x, dropout_rate, normalize, target_sum,
                              return_attn=want_attn, training=False)
        logits, attn = out if want_attn else (out, None)
        return jax.nn.softmax(logits, axis=-1), attn

    def forward(params, seed, x, index):
        # The seed is an argument, not a constant: a new seed does not recompile.
        base_key = jax.random.key(seed)
        probs, attn = one_pass(params, base_key, x, index, 0)
        if n_samples > 1:
            def body(s, carry):
                p_sum, a_sum = carry
                p, a = one_pass(params, base_key, x, index, s)
                return p_sum + p, (a_sum + a) if want_attn else a_sum

            probs, attn = jax.lax.fori_loop(1, n_samples, body, (probs, attn))
            probs = probs / n_samples
            attn = attn / n_samples if want_attn else None
        out = {
            "pred": jnp.argmax(probs, axis=-1).astype(jnp.int32),
            "conf": jnp.max(probs, axis=-1),
        }
        if n_samples > 1:
            out["entropy"] = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=-1)
        if want_probs:
            out["probs"] = probs
        if want_attn:
            out["attn"] = attn
        return out

    data = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    # Params are replicated and NOT donated: the caller's model stays usable.
    return jax.jit(forward, in_shardings=(repl, repl, data, data), out_shardings=data), data, repl


def _replicate(params, sharding: NamedSharding):
    """Put host params on every device of ``sharding`` (works across processes too)."""
    def put(leaf):
        arr = np.asarray(leaf)
        return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

    return jax.tree_util.tree_map(put, params)


# --------------------------------------------------------------------------------------------
# Sinks: where per-batch results go
# --------------------------------------------------------------------------------------------


class _TableWriter:
    """Append (barcode, cell_type, confidence[, entropy]) rows to a parquet or CSV file."""

    def __init__(self, path: Path, fmt: str, with_entropy: bool):
        self.path, self.fmt, self.with_entropy = path, fmt, with_entropy
        self.buf: list[pd.DataFrame] = []
        self.n_buf = 0
        self._pq_writer = None
        self._fh = None
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            fields = [("barcode", pa.string()), ("cell_type", pa.string()), ("confidence", pa.float32())]
            if with_entropy:
                fields.append(("entropy", pa.float32()))
            self._schema = pa.schema(fields)
            self._pa = pa
            self._pq_writer = pq.ParquetWriter(str(path), self._schema)
        else:
            self._fh = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
            cols = ["barcode", "cell_type", "confidence"] + (["entropy"] if with_entropy else [])
            self._fh.write(",".join(cols) + "\n")

    def append(self, df: pd.DataFrame) -> None:
        self.buf.append(df)
        self.n_buf += len(df)
        if self.n_buf >= _TABLE_FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        df = pd.concat(self.buf, ignore_index=True)
        self.buf, self.n_buf = [], 0
        if self._pq_writer is not None:
            table = self._pa.Table.from_pandas(df, schema=self._schema, preserve_index=False)
            self._pq_writer.write_table(table)
        else:
            df.to_csv(self._fh, header=False, index=False)

    def close(self) -> None:
        self.flush()
        if self._pq_writer is not None:
            self._pq_writer.close()
        if self._fh is not None:
            self._fh.close()


def _is_annotation_store(path: Path) -> bool:
    """Whether ``path`` is a store that annotate wrote (only those may be replaced)."""
    from ginseng.data.format import read_attrs as _read_ginseng_attrs

    return _read_ginseng_attrs(Path(path), "ginseng.annotation") is not None


def _open_zarr_arrays(path: Path, n_cells: int, chunk_rows: int, label_values, genes,
                      want_probs: bool, want_attn: bool):
    import zarr

    root = zarr.open_group(str(path), mode="w")
    root.attrs.update({
        "format": "ginseng.annotation",
        "format_version": 1,
        "label_values": [str(v) for v in label_values],
        "genes": [str(g) for g in genes],
    })
    arrays = {}
    rows = max(1, min(chunk_rows, max(n_cells, 1)))
    if want_probs:
        arrays["probs"] = root.create_array(
            "probs", shape=(n_cells, len(label_values)), chunks=(rows, len(label_values)), dtype="float32")
    if want_attn:
        arrays["attn"] = root.create_array(
            "attn", shape=(n_cells, len(genes)), chunks=(rows, len(genes)), dtype="float32")
    return arrays


# --------------------------------------------------------------------------------------------
# Truth report
# --------------------------------------------------------------------------------------------


def _write_report(report: Report, confusion: np.ndarray, truth_labels, model_labels,
                  csv_path: Path, png_path: Path, overwrite: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = report.to_frame()
    with atomic_path(csv_path, overwrite=overwrite, what="report") as tmp:
        out.to_csv(tmp, index=False)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(model_labels), 1.5 + 0.4 * len(truth_labels)))
    rows = confusion.sum(axis=1, keepdims=True)
    frac = np.where(rows > 0, confusion / np.maximum(rows, 1), 0.0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(model_labels)), [str(m) for m in model_labels], rotation=90, fontsize=7)
    ax.set_yticks(range(len(truth_labels)), [str(t) for t in truth_labels], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(
        f"ginseng annotation (macro-F1 on the model's {report.n_model_labels} labels "
        f"{report.macro_f1:.3f}); row-normalized counts",
        fontsize=8,
    )
    for i in range(confusion.shape[0]):
        for j in range(confusion.shape[1]):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.tight_layout()
    with atomic_path(png_path, overwrite=overwrite, what="confusion-matrix plot") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# annotate
# --------------------------------------------------------------------------------------------


def _load_model(model_state) -> GinsengModelState:
    if isinstance(model_state, GinsengModelState):
        return model_state
    if isinstance(model_state, (str, os.PathLike)):
        from ginseng.io import load_ginseng_state  # io pulls in the file readers: load on use

        return load_ginseng_state(model_state)
    msg = f"model_state must be a GinsengModelState or a path to a model file, got {type(model_state).__name__}"
    raise TypeError(msg)


class _H5adStream:
    """A backed .h5ad read with h5py alone: counts streamed, barcodes read block by block.

    anndata's backed mode still loads all of ``obs`` (for a million cells, ~100 MB of Python
    strings plus an index hash table), which makes memory grow with the number of cells. When
    nothing but the counts, the genes and the barcodes is needed, this reads just those.
    """

    def __init__(self, path: Path):
        from anndata.io import read_elem

        self.file = h5py.File(path, "r")
        self._finalizer = weakref.finalize(self, self.file.close)
        try:
            X = self.file["X"]
            if isinstance(X, h5py.Group):
                if X.attrs.get("encoding-type") != "csr_matrix":
                    msg = f"X is {X.attrs.get('encoding-type')!r}, not CSR"
                    raise ValueError(msg)
                self.X = types.SimpleNamespace(group=X, format="csr")
                self.n_obs, self.n_vars = (int(v) for v in X.attrs["shape"])
            else:
                self.X = X
                self.n_obs, self.n_vars = (int(v) for v in X.shape)
            self.var = read_elem(self.file["var"])
            self.var_names = self.var.index
            obs = self.file["obs"]
            self._barcodes = obs[obs.attrs["_index"]]
            if self._barcodes.shape != (self.n_obs,) or self.var.shape[0] != self.n_vars:
                msg = "obs / var do not match X"
                raise ValueError(msg)
        except Exception:
            self.close()
            raise

    def barcodes(self, a: int, b: int) -> np.ndarray:
        ds = self._barcodes
        vals = ds.asstr()[a:b] if h5py.check_string_dtype(ds.dtype) else ds[a:b]
        return np.asarray(vals).astype(str)

    def close(self) -> None:
        self._finalizer()


def _open_input(adata, backed: bool, light: bool = False):
    """Return (source, kind) with kind in {"adata", "backed", "path", "h5ad", "dataset"}.

    ``light``: a backed .h5ad path may be opened as an :class:`_H5adStream` (kind "h5ad") when the
    caller needs no obs column and no AnnData back.
    """
    if isinstance(adata, anndata.AnnData):
        return adata, ("backed" if adata.isbacked else "adata")
    if _is_ginseng_dataset(adata):
        return adata, "dataset"
    if isinstance(adata, (str, os.PathLike)):
        from ginseng.io import read_adata

        path = Path(adata)
        if light and backed and path.suffix.lower() == ".h5ad" and path.is_file():
            with contextlib.suppress(Exception):  # any other layout: anndata reads it
                return _H5adStream(path), "h5ad"
        return read_adata(path, backed=backed), "path"
    msg = f"adata must be an AnnData, a GinsengDataset or a path, got {type(adata).__name__}"
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
        warnings.warn(msg, UserWarning, stacklevel=3)


def _close_opened(source, kind: str) -> None:
    """Close a file that annotate opened itself (never an AnnData or dataset the caller passed)."""
    with contextlib.suppress(Exception):
        if kind == "h5ad":
            source.close()
        elif kind == "path" and getattr(source, "isbacked", False):
            source.file.close()


def _output_format(output: Path) -> str:
    fmt = _TABLE_FORMATS.get(output.suffix.lower())
    if fmt is None:
        msg = (
            f"output {str(output)!r} has extension {output.suffix or '(none)'!r}; expected one of "
            f"{sorted(_TABLE_FORMATS)} (parquet or CSV)"
        )
        raise ValueError(msg)
    return fmt


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
    # ---- validate everything before reading or writing anything ----
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
    batch_size, n_samples = int(batch_size), int(n_samples)
    if min_gene_overlap is not None and not (
        isinstance(min_gene_overlap, (int, float)) and not isinstance(min_gene_overlap, bool)
        and 0.0 <= float(min_gene_overlap) <= 1.0
    ):
        msg = f"min_gene_overlap must be a fraction in [0, 1] or None, got {min_gene_overlap!r}"
        raise ValueError(msg)
    if n_samples > 1 and not randomness:
        msg = f"n_samples={n_samples} needs randomness=True: without dropout every pass is identical"
        raise ValueError(msg)
    out_path = None if output is None else Path(output)
    zarr_path = None
    report_paths = None
    if out_path is not None:
        fmt = _output_format(out_path)
        check_writable_target(out_path, overwrite, "output")
        if return_probs or return_attn:
            zarr_path = out_path.with_suffix(".zarr")
            check_writable_target(zarr_path, overwrite, "output store", "dir", _is_annotation_store)
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

    state = _load_model(model_state)
    source, kind = _open_input(
        adata, backed, light=truth_key is None and not copy and layer is None and cells is None
    )
    try:
        model_genes = np.asarray(state.genes).astype(str)
        label_values = np.asarray(state.label_values)
        label_str = [str(v) for v in label_values]

        if layer is not None:
            if kind == "dataset":
                msg = f"layer={layer!r} does not apply to a GinsengDataset (it stores one count matrix)"
                raise ValueError(msg)
            if layer not in source.layers:
                msg = f"layer {layer!r} not found in adata.layers; available: {_layer_names(source)}"
                raise ValueError(msg)
        if kind == "dataset":
            input_genes = np.asarray(source.genes).astype(str)
            if gene_key is not None:
                msg = f"gene_key={gene_key!r} does not apply to a GinsengDataset (its genes are fixed)"
                raise ValueError(msg)
            gmap = _map_genes(input_genes, model_genes, var_columns=(), min_overlap=min_gene_overlap)
            n_cells = int(source.n_cells)
            barcodes_of = lambda a, b: np.arange(a, b).astype(str)
        else:
            input_genes = _input_gene_names(source.var, source.var_names, gene_key)
            gmap = _map_genes(input_genes, model_genes, gene_key=gene_key, var_columns=source.var.columns,
                              min_overlap=min_gene_overlap)
            n_cells = int(source.n_obs)
            if kind == "h5ad":
                barcodes_of = source.barcodes
            else:
                obs_names = source.obs_names
                barcodes_of = lambda a, b: np.asarray(obs_names[a:b]).astype(str)
        n_obs = n_cells
        if cells is not None:
            if kind == "dataset":
                msg = "cells= applies to an AnnData input; a GinsengDataset is annotated whole"
                raise ValueError(msg)
            cells = _check_cells(cells, n_obs)
            n_cells = int(cells.size)
            all_barcodes = barcodes_of

            def barcodes_of(a: int, b: int) -> np.ndarray:
                rows = cells[a:b]
                if rows.size == 0:
                    return np.zeros(0, dtype=str)
                return np.asarray(all_barcodes(int(rows[0]), int(rows[-1]) + 1))[rows - rows[0]]

        truth_of = None
        truth_labels: list[str] = []
        if truth_key is not None:
            if kind == "dataset":
                if truth_key != "labels":
                    msg = f"for a GinsengDataset truth_key must be 'labels' (its label column), got {truth_key!r}"
                    raise ValueError(msg)
                t_codes = np.asarray(source.labels)
                truth_labels = [str(v) for v in source.label_values]
            else:
                if truth_key not in source.obs.columns:
                    msg = (
                        f"truth_key {truth_key!r} is not a column of adata.obs; "
                        f"available columns: {list(map(str, source.obs.columns))}"
                    )
                    raise ValueError(msg)
                truth = np.asarray(source.obs[truth_key])
                if cells is not None:  # only the labels of the cells annotated are reported
                    truth = truth[cells]
                cat = pd.Categorical(truth.astype(str))
                t_codes = cat.codes.astype(np.int64)
                truth_labels = [str(c) for c in cat.categories]
            truth_of = lambda rows: t_codes[rows]

        # ---- devices, batch shape, forward ----
        # The trainer's mesh: devices ordered by process, so this process's rows of a global
        # batch are the one contiguous block make_array_from_process_local_data expects.
        from ginseng._core.mesh import layout as _layout
        from ginseng._core.mesh import make_mesh

        mesh = make_mesh(devices)
        layout = _layout(mesh)
        n_dev = mesh.devices.size
        n_proc = layout.process_count
        proc = layout.process_index
        multi = n_proc > 1
        global_batch = -(-batch_size // n_dev) * n_dev
        local_rows = global_batch // n_proc
        norm = state.normalize if normalize is None else bool(normalize)
        tsum = state.target_sum if target_sum is None else float(target_sum)
        want_probs_out = bool(return_probs)
        fwd, data_sh, repl_sh = _build_forward(
            mesh, dropout_rate=float(state.dropout_rate), normalize=norm, target_sum=tsum,
            randomness=bool(randomness), n_samples=n_samples, want_probs=want_probs_out,
            want_attn=bool(return_attn),
        )
        seed_arr = _replicate(np.uint32(int(seed) % 2**32), repl_sh)
        params = _replicate(state.params, repl_sh)
        reader = _BlockReader(source, gmap, layer)
        reader.cells = cells
        # A GinsengDataset stores its rows in a random permutation, so original rows [a, b) are
        # spread over as many chunks as rows. Read it in storage order (each chunk once) and put
        # every result at its original index; cells are keyed by original index, so Monte Carlo
        # draws are the same either way. A streamed table is written at the end from per-cell
        # columns kept in memory (12 bytes a cell); per-cell probability or attention stores
        # (output= with return_probs/return_attn) still stream in original order.
        stored_order = None
        if kind == "dataset" and (out_path is None or not (return_probs or return_attn)):
            stored_order = np.asarray(source._order, dtype=np.int64)
            reader.stored = True
        if norm and kind != "dataset" and n_cells:
            _warn_if_not_counts(reader.read(0, min(n_cells, 256)), layer)
        n_batches = -(-n_cells // global_batch)
        is_writer = proc == 0

        # ---- where results go ----
        in_memory = out_path is None
        collect = in_memory or stored_order is not None  # per-cell results kept in res
        force_table = kind in ("path", "h5ad", "dataset")
        want_table = bool(return_table) or force_table
        res: dict[str, np.ndarray] = {}
        if collect:
            res["pred"] = np.empty(n_cells, np.int32)
            res["conf"] = np.empty(n_cells, np.float32)
            if n_samples > 1:
                res["entropy"] = np.empty(n_cells, np.float32)
        if in_memory:
            if return_probs:
                res["probs"] = np.empty((n_cells, len(label_values)), np.float32)
            if return_attn:
                res["attn"] = np.empty((n_cells, len(model_genes)), np.float32)
        confusion = np.zeros((len(truth_labels), len(label_values)), np.int64) if truth_of else None

        # A fixed ring of input buffers instead of a new 8 MB array per batch: memory stays flat
        # (no heap fragmentation across threads). A slot is rewritten only after its batch has been
        # consumed: at most depth (queue) + 1 (being read) + 2 (dispatched, pending) batches are live.
        depth = 2
        ring = [np.zeros((local_rows, gmap.n_model), np.float32) for _ in range(depth + 4)]

        def produce(i: int):
            # Rows of this process in global batch i: [g0 + proc*local_rows, ... + local_rows).
            g0 = i * global_batch
            a = min(g0 + proc * local_rows, n_cells)
            b = min(a + local_rows, n_cells)
            x = ring[i % len(ring)]
            reader.read(a, b, out=x)
            x[b - a :] = 0.0  # padding rows
            index = np.arange(g0 + proc * local_rows, g0 + (proc + 1) * local_rows, dtype=np.int64)
            if stored_order is not None:  # key every cell by its original index
                index[: b - a] = stored_order[a:b]
            return i, x, index.astype(np.int32)

        def to_global(arr: np.ndarray):
            if multi:
                return jax.make_array_from_process_local_data(data_sh, arr, (global_batch,) + arr.shape[1:])
            return jax.device_put(arr, data_sh)

        def fetch(out):
            if multi:
                from jax.experimental import multihost_utils

                return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(out, tiled=True).items()}
            return jax.device_get(out)

        with contextlib.ExitStack() as stack:
            table_writer = None
            zarr_arrays: dict = {}
            if out_path is not None and is_writer:
                tmp_table = stack.enter_context(atomic_path(out_path, overwrite=overwrite, what="output"))
                table_writer = _TableWriter(tmp_table, fmt, with_entropy=n_samples > 1)
                stack.callback(table_writer.close)  # runs before the rename (LIFO)
                if zarr_path is not None:
                    tmp_zarr = stack.enter_context(atomic_path(
                            zarr_path, overwrite=overwrite, what="output store", kind="dir",
                            replaceable=_is_annotation_store,
                        ))
                    zarr_arrays = _open_zarr_arrays(tmp_zarr, n_cells, global_batch, label_str, model_genes,
                                                    bool(return_probs), bool(return_attn))

            bar = tqdm(total=n_cells, unit="cells", desc="annotate", disable=bar_disabled(silent or not is_writer, n_cells))
            stack.callback(bar.close)

            def consume(i: int, out_dev) -> None:
                out = fetch(out_dev)
                a = i * global_batch
                b = min(a + global_batch, n_cells)
                n = b - a
                out = {k: v[:n] for k, v in out.items()}  # drop the padding rows
                rows = slice(a, b) if stored_order is None else stored_order[a:b]
                if confusion is not None:
                    np.add.at(confusion, (truth_of(rows), out["pred"]), 1)
                if collect:
                    for k, v in out.items():
                        if k in res:
                            res[k][rows] = v
                elif is_writer:
                    append_table(a, b, out)
                    for k, arr in zarr_arrays.items():
                        arr[a:b] = out[k]
                bar.update(n)

            def append_table(a: int, b: int, out: dict) -> None:
                cols = {
                    "barcode": barcodes_of(a, b),
                    "cell_type": np.asarray(label_str, dtype=object)[out["pred"]],
                    "confidence": out["conf"].astype(np.float32),
                }
                if n_samples > 1:
                    cols["entropy"] = out["entropy"].astype(np.float32)
                table_writer.append(pd.DataFrame(cols))

            prefetch = background(
                lambda: map(produce, range(n_batches)), depth=depth, name="ginseng-annotate"
            )
            stack.callback(prefetch.close)
            pending = None
            for i, x, index in prefetch:
                # Dispatch batch i before fetching batch i-1, so the devices never wait on the host.
                out_dev = fwd(params, seed_arr, to_global(x), to_global(index))
                if pending is not None:
                    consume(*pending)
                pending = (i, out_dev)
            if pending is not None:
                consume(*pending)
            if table_writer is not None and collect:  # results gathered in storage order
                for a in range(0, n_cells, global_batch):
                    b = min(a + global_batch, n_cells)
                    append_table(a, b, {k: v[a:b] for k, v in res.items()})

            if confusion is not None and is_writer:
                report = from_confusion(confusion, truth_labels, label_str, label_str)
                if not silent:
                    with pd.option_context("display.max_rows", None, "display.width", 120):
                        print(report.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
                    print("\n".join(report.lines()))
                if report_paths is not None:
                    _write_report(report, confusion, truth_labels, label_str, *report_paths, overwrite)
                    if not silent:
                        print(f"Wrote {report_paths[0]} and {report_paths[1]}")

        if not in_memory:
            if kind == "h5ad":
                source.close()
            return None

        # ---- in-memory results ----
        cell_type = pd.Categorical.from_codes(res["pred"], categories=pd.Index(label_values))
        barcodes = barcodes_of(0, n_cells)
        if kind == "h5ad":
            source.close()
        obs_cols = {"ginseng_cell_type": cell_type, "ginseng_confidence": res["conf"]}
        if n_samples > 1:
            obs_cols["ginseng_entropy"] = res["entropy"]
        if cells is not None:  # obs gets a value per row: missing for the rows not annotated
            codes = np.full(n_obs, -1, np.int32)
            codes[cells] = res["pred"]
            full = {"ginseng_cell_type": pd.Categorical.from_codes(codes, categories=pd.Index(label_values))}
            for k, v in obs_cols.items():
                if k != "ginseng_cell_type":
                    full[k] = np.full(n_obs, np.nan, np.float32)
                    full[k][cells] = v
            obs_cols = full
        results: list = []
        if kind in ("adata", "backed", "path"):
            target = source
            if copy and kind != "path":  # an AnnData read from a path is already ours to return
                target = source.copy() if kind == "adata" else source
            if copy and target.isbacked:
                target = target.to_memory()
            for k, v in obs_cols.items():
                target.obs[k] = v
            if copy:
                results.append(target)
        if want_table:
            table = pd.DataFrame({"barcode": barcodes, "cell_type": cell_type, "confidence": res["conf"]})
            if n_samples > 1:
                table["entropy"] = res["entropy"]
            results.append(table)
        if return_probs:
            results.append(pd.DataFrame(res["probs"], index=pd.Index(barcodes, name="barcode"),
                                        columns=pd.Index(label_values)))
        if return_attn:  # labelled like the probabilities: barcodes x the model's genes
            results.append(pd.DataFrame(res["attn"], index=pd.Index(barcodes, name="barcode"),
                                        columns=pd.Index(model_genes, name="gene")))
        if not results:
            return None
        return results[0] if len(results) == 1 else tuple(results)
    except BaseException:
        _close_opened(source, kind)
        raise
