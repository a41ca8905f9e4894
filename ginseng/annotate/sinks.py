"""Sinks: where per-batch results go.

- :class:`Collected`: per-cell columns in memory (returned to the caller, or written at the end
  when the input was read in storage order).
- :class:`FileOutput`: a table file (parquet or CSV) and, when asked, a zarr store of
  probabilities / gene weights, written block by block under temporary names and renamed into
  place at the end.
- :class:`Confusion`: the truth report (per-class table, macro-F1, confusion matrix plot).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd

from ginseng._core.files import atomic_path
from ginseng._core.report import Report, from_confusion

__all__ = ["Collected", "Confusion", "FileOutput", "TableWriter", "is_annotation_store", "write_report"]

_TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# Rows buffered before a parquet row group / CSV chunk is written: large enough that a
# million-cell table has few row groups, small enough to be negligible in memory.
_TABLE_FLUSH_ROWS = 65536


def output_format(output: Path) -> str:
    """``"parquet"`` or ``"csv"`` from the output's extension; refuses any other."""
    fmt = _TABLE_FORMATS.get(output.suffix.lower())
    if fmt is None:
        msg = (
            f"output {str(output)!r} has extension {output.suffix or '(none)'!r}; expected one of "
            f"{sorted(_TABLE_FORMATS)} (parquet or CSV)"
        )
        raise ValueError(msg)
    return fmt


class TableWriter:
    """Append (barcode, cell_type, confidence[, entropy][, majority_voting]) rows to a parquet or
    CSV file."""

    def __init__(self, path: Path, fmt: str, with_entropy: bool, with_vote: bool = False):
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
            if with_vote:
                fields.append(("majority_voting", pa.string()))
            self._schema = pa.schema(fields)
            self._pa = pa
            self._pq_writer = pq.ParquetWriter(str(path), self._schema)
        else:
            self._fh = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
            cols = (["barcode", "cell_type", "confidence"] + (["entropy"] if with_entropy else [])
                    + (["majority_voting"] if with_vote else []))
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


def is_annotation_store(path: Path) -> bool:
    """Whether ``path`` is a store that annotate wrote (only those may be replaced)."""
    from ginseng.data.format import read_attrs as _read_ginseng_attrs

    return _read_ginseng_attrs(Path(path), "ginseng.annotation") is not None


def open_zarr_arrays(path: Path, n_cells: int, chunk_rows: int, label_values, genes,
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


def write_report(report: Report, confusion: np.ndarray, truth_labels, model_labels,
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


class Collected:
    """Per-cell results kept in memory, put at their positions (or original indices)."""

    def __init__(self, n_cells: int, n_samples: int, probs_shape=None, attn_shape=None):
        self.res: dict[str, np.ndarray] = {
            "pred": np.empty(n_cells, np.int32),
            "conf": np.empty(n_cells, np.float32),
        }
        if n_samples > 1:
            self.res["entropy"] = np.empty(n_cells, np.float32)
        if probs_shape is not None:
            self.res["probs"] = np.empty(probs_shape, np.float32)
        if attn_shape is not None:
            self.res["attn"] = np.empty(attn_shape, np.float32)

    def put(self, rows, out: dict) -> None:
        for k, v in out.items():
            if k in self.res:
                self.res[k][rows] = v


class FileOutput:
    """The table file and the probs/attn store of ``annotate(output=...)`` (process 0 only)."""

    def __init__(self, stack: contextlib.ExitStack, out_path: Path, zarr_path: Path | None, *, overwrite: bool,
                 n_cells: int, chunk_rows: int, label_str: list[str], model_labels: list[str],
                 model_genes, n_samples: int,
                 want_probs: bool, want_attn: bool, with_vote: bool = False):
        self.label_str = np.asarray(label_str, dtype=object)  # the model's labels (+ Unassigned)
        self.with_entropy, self.with_vote = n_samples > 1, with_vote
        tmp_table = stack.enter_context(atomic_path(out_path, overwrite=overwrite, what="output"))
        self.table = TableWriter(tmp_table, output_format(out_path), with_entropy=self.with_entropy,
                                 with_vote=with_vote)
        stack.callback(self.table.close)  # runs before the rename (LIFO)
        self.arrays: dict = {}
        if zarr_path is not None:
            tmp_zarr = stack.enter_context(atomic_path(
                zarr_path, overwrite=overwrite, what="output store", kind="dir",
                replaceable=is_annotation_store,
            ))
            self.arrays = open_zarr_arrays(tmp_zarr, n_cells, chunk_rows, model_labels, model_genes,
                                           want_probs, want_attn)

    def append(self, barcodes: np.ndarray, a: int, b: int, out: dict) -> None:
        """Rows [a, b) of the table (and of the stores, when ``out`` has their arrays)."""
        cols = {
            "barcode": barcodes,
            "cell_type": self.label_str[out["pred"]],
            "confidence": out["conf"].astype(np.float32),
        }
        if self.with_entropy:
            cols["entropy"] = out["entropy"].astype(np.float32)
        if self.with_vote:
            cols["majority_voting"] = self.label_str[out["vote"]]
        self.table.append(pd.DataFrame(cols))
        self.append_arrays(a, b, out)

    def append_arrays(self, a: int, b: int, out: dict) -> None:
        """Rows [a, b) of the probs / attn stores (those ``out`` has)."""
        for k, arr in self.arrays.items():
            if k in out:
                arr[a:b] = out[k]

    def append_collected(self, source, res: dict, block: int) -> None:
        """The whole table from results collected in memory, ``block`` rows at a time."""
        n_cells = len(res["pred"])
        for a in range(0, n_cells, block):
            b = min(a + block, n_cells)
            self.append(source.barcodes(a, b), a, b, {k: v[a:b] for k, v in res.items()})


class Confusion:
    """Counts of (true label, predicted label), reported and written at the end."""

    def __init__(self, truth_codes: np.ndarray, truth_labels: list[str], label_str: list[str],
                 model_labels: list[str] | None = None):
        """``label_str``: what a prediction code names (the model's labels, then Unassigned when
        cells may be rejected); ``model_labels``: the labels the model can predict."""
        self.truth_codes, self.truth_labels, self.label_str = truth_codes, truth_labels, label_str
        self.model_labels = label_str if model_labels is None else model_labels
        self.counts = np.zeros((len(truth_labels), len(label_str)), np.int64)

    def add(self, rows, pred: np.ndarray) -> None:
        np.add.at(self.counts, (self.truth_codes[rows], pred), 1)

    def finish(self, report_paths, overwrite: bool, silent: bool) -> None:
        report = from_confusion(self.counts, self.truth_labels, self.label_str, self.model_labels)
        if not silent:
            with pd.option_context("display.max_rows", None, "display.width", 120):
                print(report.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            print("\n".join(report.lines()))
        if report_paths is not None:
            write_report(report, self.counts, self.truth_labels, self.label_str, *report_paths, overwrite)
            if not silent:
                print(f"Wrote {report_paths[0]} and {report_paths[1]}")
