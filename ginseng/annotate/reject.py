"""What the model does not know: cells left "Unassigned", and majority voting over clusters.

- :func:`resolve_threshold`: ``min_confidence`` (None, a number, or ``"auto"``) as a number.
  ``"auto"`` reads it from the model: the histogram of its holdout cells' top probability
  (``GinsengModelState.confidence_counts``, written by the trainer), never from the query.
- :func:`reject`: predictions below the threshold become the Unassigned code (one past the
  model's labels), a stage between the forward pass and the sinks.
- :func:`majority_vote`: every cell of a cluster gets the cluster's most frequent label,
  Unassigned included (a cluster mostly of Unassigned cells stays Unassigned).
"""

from __future__ import annotations

import numbers

import numpy as np

from ginseng.state import CONFIDENCE_BINS, GinsengModelState

__all__ = ["AUTO_QUANTILE", "UNASSIGNED", "majority_vote", "reject", "resolve_threshold"]

UNASSIGNED = "Unassigned"
# "auto" leaves at most this fraction of the model's own holdout cells Unassigned (measured
# choice, benchmarks/RESULTS.md section 12).
AUTO_QUANTILE = 0.01


def auto_threshold(counts: np.ndarray, quantile: float = AUTO_QUANTILE) -> float:
    """The largest bin edge below which at most ``quantile`` of the counted cells lie."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    below = np.concatenate([[0], np.cumsum(counts)])  # below[b]: cells in bins < b
    b = int(np.searchsorted(below, quantile * total, side="right")) - 1
    return float(max(b, 0)) / CONFIDENCE_BINS


def resolve_threshold(min_confidence, state: GinsengModelState) -> float | None:
    """``min_confidence`` as a threshold in [0, 1] (None: nothing is left Unassigned)."""
    if min_confidence is None:
        return None
    if isinstance(min_confidence, str):
        if min_confidence != "auto":
            msg = f"min_confidence must be None, a number in [0, 1] or 'auto', got {min_confidence!r}"
            raise ValueError(msg)
        counts = state.confidence_counts
        if counts is None or int(np.sum(counts)) == 0:
            msg = (
                "min_confidence='auto' reads its threshold from the confidences of the model's "
                "holdout cells, which this model does not have (trained before ginseng 0.2, or "
                "built by hand); pass a number instead, e.g. min_confidence=0.5"
            )
            raise ValueError(msg)
        return auto_threshold(counts)
    if (
        isinstance(min_confidence, bool)
        or not isinstance(min_confidence, numbers.Real)
        or not 0.0 <= float(min_confidence) <= 1.0
    ):
        msg = f"min_confidence must be None, a number in [0, 1] or 'auto', got {min_confidence!r}"
        raise ValueError(msg)
    return float(min_confidence)


def check_unassigned(name: str, label_values) -> str:
    """The Unassigned label, refused when it would collide with one of the model's labels."""
    if not isinstance(name, str) or not name:
        msg = f"unassigned_label must be a non-empty string, got {name!r}"
        raise ValueError(msg)
    if name in {str(v) for v in np.asarray(label_values)}:
        msg = (
            f"the model has a label named {name!r}, the name given to rejected cells: it would "
            f"not be possible to tell them apart; pass unassigned_label= another name"
        )
        raise ValueError(msg)
    return name


def reject(out: dict, threshold: float | None, code: int) -> dict:
    """``out`` with ``pred`` set to ``code`` where ``conf`` < ``threshold`` (in place)."""
    if threshold is not None:
        out["pred"] = np.where(np.asarray(out["conf"]) < threshold, code, out["pred"]).astype(np.int32)
    return out


def majority_vote(pred: np.ndarray, clusters: np.ndarray, n_codes: int) -> np.ndarray:
    """Each cell's cluster's most frequent code (the lowest code on a tie). Cells whose cluster
    is missing (code -1) keep their own."""
    pred = np.asarray(pred, np.int64)
    clusters = np.asarray(clusters, np.int64)
    if pred.shape != clusters.shape:
        msg = f"{len(pred)} predictions but {len(clusters)} cluster labels"
        raise ValueError(msg)
    known = clusters >= 0
    n_clusters = int(clusters.max()) + 1 if known.any() else 0
    votes = np.zeros((n_clusters, n_codes), np.int64)
    np.add.at(votes, (clusters[known], pred[known]), 1)
    winner = votes.argmax(axis=1) if n_clusters else np.zeros(0, np.int64)
    return np.where(known, winner[np.where(known, clusters, 0)] if n_clusters else pred, pred).astype(np.int32)
