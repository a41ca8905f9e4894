"""The epoch plan: which original cells, in which global batch and slot. Pure numpy.

A plan depends only on (cells of the split, their labels, the stored-row rank of every cell, the
store's chunk size, seed, epoch, shuffle, balance): never on prefetch, workers or the number of
processes. ``BatchLoader`` (``ginseng.data.loader``) only executes it.

With ``shuffle`` the cells' chunks are visited in a random order, consecutive chunks form windows
of ~``_WINDOW_ROWS`` rows and rows are shuffled inside each window; since rows are stored in a
random permutation, batches are as random as iid sampling while every read is a run of whole
chunks. Without ``shuffle``, cells come in storage order. ``balance`` gives every label as many
cells as the largest one (all cells of each label, plus draws with replacement), so no cell is
ever dropped.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["batch_layout", "epoch_plan", "epoch_size"]

# Rows shuffled together by the buffer shuffle (a window of whole chunks). Part of the epoch plan,
# so it is a constant: the plan must not depend on prefetch or process count.
_WINDOW_ROWS = 16384


def epoch_size(cells: np.ndarray, labels: np.ndarray, n_labels: int, balance: bool) -> int:
    """Cells in one epoch: all of them, or with ``balance`` the largest label's count per label."""
    if balance and cells.size:
        counts = np.bincount(labels[cells], minlength=n_labels)
        return int(counts.max()) * int((counts > 0).sum())
    return int(cells.size)


def _balanced(cells: np.ndarray, labels: np.ndarray, n_labels: int, rng) -> np.ndarray:
    """Every label's cells, then draws with replacement up to the largest label's count."""
    own = labels[cells]
    target = int(np.bincount(own, minlength=n_labels).max())
    parts = []
    for k in range(n_labels):
        members = cells[own == k]
        if members.size == 0:
            continue
        extra = rng.choice(members, size=target - members.size, replace=True)
        parts.append(members)
        parts.append(extra)
    return np.concatenate(parts)


def epoch_plan(
    cells: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    rank: np.ndarray,
    chunk_rows: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    balance: bool,
) -> np.ndarray:
    """ORIGINAL cell indices of one epoch in batch order (length :func:`epoch_size`).

    Parameters
    ----------
    cells : int64 array
        Original indices of the split's cells.
    labels : int array
        Label code of every cell of the dataset (original order).
    n_labels : int
        Number of labels.
    rank : int64 array
        Stored row of every original cell (the store's permutation, inverted).
    chunk_rows : int
        Rows per stored chunk: windows are whole chunks.
    seed, epoch : int
        The plan's randomness: ``default_rng([seed, epoch, 0x6E5E9])``.
    shuffle, balance : bool
        Buffer shuffle (else storage order); oversample rare labels.
    """
    rng = np.random.default_rng([int(seed), int(epoch), 0x6E5E9])
    if balance and cells.size:
        cells = _balanced(cells, labels, n_labels, rng)
    stored = rank[cells]
    if not shuffle:
        return cells[np.argsort(stored, kind="stable")]
    # Buffer shuffle: random chunk order, windows of whole chunks, rows shuffled per window.
    chunk = stored // chunk_rows
    n_chunks = math.ceil(rank.size / chunk_rows)
    chunk_perm = rng.permutation(n_chunks)
    chunk_pos = np.empty(n_chunks, dtype=np.int64)
    chunk_pos[chunk_perm] = np.arange(n_chunks)
    window_chunks = max(1, _WINDOW_ROWS // chunk_rows)
    window = chunk_pos[chunk] // window_chunks
    key = rng.random(cells.size)
    return cells[np.lexsort((key, window))]


def batch_layout(plan: np.ndarray, b: int, batch_size: int, local_rows: int, process_index: int):
    """(original index, slot, mask) of one process's rows of global batch ``b``.

    Global batch b holds plan entries [b*batch_size, (b+1)*batch_size) in slots 0.., then padding
    (index -1, mask False) up to the global batch; process p gets slots
    [p*local_rows, (p+1)*local_rows).
    """
    lo = process_index * local_rows
    slot = np.arange(lo, lo + local_rows, dtype=np.int32)
    pos = b * batch_size + slot.astype(np.int64)
    real = (slot < batch_size) & (pos < plan.size)
    index = np.full(local_rows, -1, dtype=np.int64)
    index[real] = plan[pos[real]]
    return index, slot, real
