"""The one classification report: per-class precision / recall / F1 and an honest macro-F1.

Built from a (true label x predicted label) confusion matrix, which annotation accumulates batch
by batch with flat memory at any number of cells (scikit-learn's metrics need every label in
memory at once; tests check these figures against scikit-learn's).

A cross-dataset query often holds cell types the model never learned. No prediction can be right
for those cells, so a macro-F1 that counts them as F1 = 0 measures the query's composition, not
the model. The headline figure is therefore the macro-F1 over the model's labels present in the
truth, on the cells whose true label the model knows; the figure over every true label is
reported beside it under its own name, with the labels the model lacks and their cell counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

COLUMNS = ["cell_type", "in_model", "support", "predicted", "precision", "recall", "f1"]


@dataclass
class Report:
    """What `from_confusion` computes; ``table`` has one row per label (``COLUMNS``)."""

    table: pd.DataFrame
    macro_f1: float  # over the model's labels present in the truth, on cells the model can know
    n_known_cells: int
    n_model_labels: int  # model labels among the true labels
    macro_f1_all: float  # over every true label; labels the model lacks count as F1 = 0
    n_true_labels: int
    absent: dict = field(default_factory=dict)  # true label the model lacks -> cells

    def lines(self) -> list[str]:
        """The headline as printed after annotation (and in the training run's summary)."""
        out = [
            (
                f"macro-F1 on the model's {self.n_model_labels} labels: {self.macro_f1:.4f} "
                f"({self.n_known_cells:,} cells)"
            )
        ]
        if self.absent:
            listed = ", ".join(f"{k} {v:,}" for k, v in self.absent.items())
            out.append(
                f"{len(self.absent)} labels are not in the model ({sum(self.absent.values()):,} cells, "
                f"which no prediction can get right): {listed}"
            )
            out.append(
                f"macro-F1 over all {self.n_true_labels} true labels, counting those {len(self.absent)} "
                f"as 0: {self.macro_f1_all:.4f}"
            )
        return out

    def to_frame(self) -> pd.DataFrame:
        """The per-class table with the two macro averages as named rows (the report file)."""
        known = self.table[self.table.in_model & (self.table.support > 0)]
        summary = pd.DataFrame(
            [
                {"cell_type": f"macro_avg (model labels, {self.n_model_labels})", "in_model": None,
                 "support": self.n_known_cells, "predicted": int(known.predicted.sum()),
                 "precision": known.precision.mean(), "recall": known.recall.mean(), "f1": self.macro_f1},
                {"cell_type": f"macro_avg (all true labels, {self.n_true_labels})", "in_model": None,
                 "support": int(self.table.support.sum()), "predicted": int(self.table.predicted.sum()),
                 "precision": np.nan, "recall": np.nan, "f1": self.macro_f1_all},
            ]
        )
        return pd.concat([self.table, summary], ignore_index=True)


def from_confusion(confusion: np.ndarray, truth_labels, predicted_labels, model_labels) -> Report:
    """The report of a confusion matrix ``confusion[i, j]`` = cells of true label
    ``truth_labels[i]`` predicted as ``predicted_labels[j]``; ``model_labels`` are the labels the
    model can predict. Precision, recall and F1 are computed on the cells whose true label is a
    model label (F1 is NaN for a label the model lacks); a ratio with a zero denominator is 0."""
    truth_labels = [str(t) for t in truth_labels]
    predicted_labels = [str(p) for p in predicted_labels]
    model_set = {str(m) for m in model_labels}
    confusion = np.asarray(confusion, dtype=np.int64)
    classes = truth_labels + [p for p in predicted_labels if p not in set(truth_labels)]
    idx = {c: i for i, c in enumerate(classes)}
    full = np.zeros((len(classes), len(classes)), np.int64)
    full[np.ix_([idx[t] for t in truth_labels], [idx[p] for p in predicted_labels])] = confusion
    in_model = np.array([c in model_set for c in classes], bool)
    known = full[in_model]  # rows: cells whose true label the model knows
    tp = np.diag(full)[in_model].astype(np.float64)
    predicted_known = known.sum(axis=0)[in_model]
    support = full.sum(axis=1)
    precision = np.full(len(classes), np.nan)
    recall = np.full(len(classes), np.nan)
    f1 = np.full(len(classes), np.nan)
    s = support[in_model]
    precision[in_model] = np.where(predicted_known > 0, tp / np.maximum(predicted_known, 1), 0.0)
    recall[in_model] = np.where(s > 0, tp / np.maximum(s, 1), 0.0)
    denom = precision[in_model] + recall[in_model]
    f1[in_model] = np.where(denom > 0, 2 * precision[in_model] * recall[in_model] / np.where(denom > 0, denom, 1), 0.0)
    table = pd.DataFrame(
        {"cell_type": classes, "in_model": in_model, "support": support, "predicted": full.sum(axis=0),
         "precision": precision, "recall": recall, "f1": f1}
    )[COLUMNS]
    true_rows = support > 0
    scored = in_model & true_rows
    macro = float(f1[scored].mean()) if scored.any() else float("nan")
    macro_all = float(np.where(in_model, f1, 0.0)[true_rows].mean()) if true_rows.any() else float("nan")
    absent = {c: int(n) for c, n, m in zip(classes, support, in_model, strict=True) if n > 0 and not m}
    return Report(table, macro, int(support[scored].sum()), int(scored.sum()), macro_all, int(true_rows.sum()), absent)


def from_labels(truth, predicted, model_labels=None) -> Report:
    """The report of two label arrays (``model_labels`` default: every true and predicted label)."""
    truth = np.asarray(pd.Series(truth).astype(str))
    predicted = np.asarray(pd.Series(predicted).astype(str))
    if truth.shape != predicted.shape:
        msg = f"truth has {truth.shape[0]} labels but predicted has {predicted.shape[0]}"
        raise ValueError(msg)
    t_labels, t_codes = np.unique(truth, return_inverse=True)
    p_labels, p_codes = np.unique(predicted, return_inverse=True)
    confusion = np.zeros((len(t_labels), len(p_labels)), np.int64)
    np.add.at(confusion, (t_codes, p_codes), 1)
    if model_labels is None:
        model_labels = np.union1d(t_labels, p_labels)
    return from_confusion(confusion, t_labels, p_labels, model_labels)
