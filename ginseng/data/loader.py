"""BatchLoader: executes an epoch plan (``ginseng.data.sampler``) against a GinsengDataset.

Per epoch, batches are read in groups of ~one window of rows. Whole-chunk reads (TensorStore
decodes them concurrently on its own threads) are kept ``_INFLIGHT_BYTES`` ahead of use across
group boundaries, so reading overlaps assembling and the consumer's step. A group's chunks are
copied into one buffer, then each batch's rows are gathered from it, on ``workers`` threads
(numpy releases the GIL while copying) or inline on small machines. Everything runs on a
background thread ``prefetch`` batches ahead of the consumer.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ginseng._core.threads import background
from ginseng.data import sampler
from ginseng.data.format import SPLITS, Batch, check_batch_size

__all__ = ["BatchLoader"]

# Decoded bytes of whole-chunk reads the loader keeps in flight (bounded memory, enough overlap).
_INFLIGHT_BYTES = 64 << 20
# Threads that copy decoded chunks and gather batch rows (see _assembly_workers).
_MAX_ASSEMBLY_WORKERS = 4


class _Done:
    """A finished result with the ``result()`` of a future (work done inline, without a pool)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _take_rows(arr: np.ndarray, sel: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.take(arr, sel, axis=0, out=out)


def _assembly_workers() -> int:
    """Threads assembling batches: a quarter of the CPUs this process may use, at most 4.

    The CPUs it may use (``sched_getaffinity``: a SLURM job's binding), not the machine's; the
    rest are left to TensorStore's decoding, the training loop and JAX. 0 below 8 CPUs: then
    the loader thread assembles inline.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return min(_MAX_ASSEMBLY_WORKERS, n // 4) if n >= 8 else 0


class BatchLoader:
    """Batches of one split, deterministic given (seed, epoch), independent of process count.

    An epoch's plan (which original cells, in which global batch and slot) depends only on
    (dataset, split, seed, epoch, shuffle, balance, batch_size): see ``ginseng.data.sampler``.
    With ``shuffle``, the cells' chunks are visited in a random order, consecutive chunks form
    windows of ~16k rows and rows are shuffled inside each window; since rows are stored in a
    random permutation, batches are as random as iid sampling while every read is a run of whole
    chunks. Without ``shuffle``, cells come in storage order. ``balance`` gives every label as
    many cells as the largest one (all cells of each label, plus draws with replacement), so no
    cell is ever dropped.

    Global batch b holds epoch cells [b*batch_size, (b+1)*batch_size) in slots 0.., then padding
    up to ``global_batch``; process p gets slots [p*local_rows, (p+1)*local_rows) and reads only
    those rows, on a background thread that runs ``prefetch`` batches ahead.

    ``workers`` threads copy and gather rows (default: from the CPUs this process may use, see
    ``_assembly_workers``; 0 or 1 assembles on the loader thread). They change nothing in the
    batches, only how fast they come.

    ``dtype`` is the dtype of ``Batch.x``: float32 by default; ``None`` keeps the store's own
    (uint16 or uint32 counts), which is what the trainer asks for: half the bytes of float32 to
    copy to the device, and no conversion on the host (the step converts, exactly).
    """

    def __init__(
        self,
        dataset,
        batch_size,
        *,
        split="train",
        shuffle=True,
        balance=False,
        seed=0,
        pad_multiple=1,
        process_index=0,
        process_count=1,
        prefetch=2,
        dtype=np.float32,
        workers=None,
    ):
        check_batch_size(batch_size)
        if split not in SPLITS:
            msg = f"split must be one of {SPLITS}, found {split!r}"
            raise ValueError(msg)
        if pad_multiple < 1 or process_count < 1:
            msg = f"pad_multiple and process_count must be >= 1, found {pad_multiple} and {process_count}"
            raise ValueError(msg)
        if not 0 <= process_index < process_count:
            msg = f"process_index must be in [0, {process_count}), found {process_index}"
            raise ValueError(msg)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            msg = f"workers must be an integer >= 0 or None, found {workers!r}"
            raise ValueError(msg)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.split = split
        self.shuffle = bool(shuffle)
        self.balance = bool(balance)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.prefetch = max(1, int(prefetch))
        self.dtype = np.dtype(dataset._X.dtype.numpy_dtype if dtype is None else dtype)
        self.workers = _assembly_workers() if workers is None else int(workers)
        unit = int(pad_multiple) * self.process_count
        self.global_batch = math.ceil(self.batch_size / unit) * unit
        self.local_rows = self.global_batch // self.process_count
        self._indices = np.asarray(dataset._split_indices(split), dtype=np.int64)
        self.epoch_size = sampler.epoch_size(self._indices, dataset.labels, dataset.n_labels, self.balance)
        self.num_batches = math.ceil(self.epoch_size / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int) -> np.ndarray:
        """ORIGINAL cell indices of the whole epoch in batch order (length ``epoch_size``)."""
        ds = self.dataset
        return sampler.epoch_plan(
            self._indices, ds.labels, ds.n_labels, ds._rank, ds.chunk_rows,
            seed=self.seed, epoch=epoch, shuffle=self.shuffle, balance=self.balance,
        )

    def _batch_layout(self, plan: np.ndarray, b: int):
        """(original index, slot, mask) of this process's rows of global batch b."""
        return sampler.batch_layout(plan, b, self.batch_size, self.local_rows, self.process_index)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield this process's :class:`Batch` for global batches start_batch .. num_batches-1."""
        if not 0 <= start_batch <= self.num_batches:
            msg = f"start_batch must be in [0, {self.num_batches}], found {start_batch}"
            raise ValueError(msg)
        plan = self.plan(epoch)
        # Batches are read in groups of ~one window of rows: one concurrent TensorStore read each.
        group = max(1, sampler._WINDOW_ROWS // self.batch_size)
        groups = [
            range(g, min(self.num_batches, g + group))
            for g in range(start_batch, self.num_batches, group)
        ]
        yield from background(
            lambda: _EpochReader(self, plan, groups).batches(), depth=self.prefetch, name="ginseng-loader"
        )


class _EpochReader:
    """One epoch's reads and assembly, run on the loader's background thread.

    Group layouts are built as the reads reach them, never for the whole epoch at once, so memory
    stays bounded whatever the dataset size.
    """

    def __init__(self, loader: BatchLoader, plan: np.ndarray, groups: list[range]):
        ds = loader.dataset
        self.loader, self.ds, self.plan = loader, ds, plan
        self.n_groups = len(groups)
        self.group_iter = iter(groups)
        self.R = ds.chunk_rows
        self.max_inflight = max(
            4, _INFLIGHT_BYTES // max(1, self.R * ds.n_genes * ds._X.dtype.numpy_dtype.itemsize)
        )
        self.inflight: deque = deque()  # chunk reads under way, in order
        self.pending_chunks: deque = deque()  # chunk ids planned, not yet read
        self.infos: deque = deque()  # group infos planned, not yet assembled
        self.whole_buf = None
        self.pool = None
        self.scratch = threading.local()  # per thread: gathered stored rows to convert

    # ---- reads ----
    def _group_info(self, g: range):
        """A group's batch layouts, the sorted stored rows this process needs, their chunks."""
        layouts = [self.loader._batch_layout(self.plan, b) for b in g]
        rank = self.ds._rank
        rows = np.unique(np.concatenate([rank[ix[m]] for ix, _, m in layouts]))
        return layouts, rows, np.unique(rows // self.R)

    def _plan_next_group(self) -> bool:
        g = next(self.group_iter, None)
        if g is None:
            return False
        info = self._group_info(g)
        self.infos.append(info)
        self.pending_chunks.extend(int(c) for c in info[2])
        return True

    def _refill(self) -> None:
        R, n_cells = self.R, self.ds.n_cells
        while len(self.inflight) < self.max_inflight:
            if not self.pending_chunks and not self._plan_next_group():
                return
            if self.pending_chunks:
                c = self.pending_chunks.popleft()
                self.inflight.append(self.ds._X[c * R : min(n_cells, (c + 1) * R)].read())

    def _next_chunk(self) -> np.ndarray:
        self._refill()
        try:
            return self.inflight.popleft().result()
        except ValueError as err:  # a missing or undecodable chunk
            raise self.ds._damaged("reading counts", err) from err

    # ---- assembly ----
    def _run(self, fn, *args):
        return self.pool.submit(fn, *args) if self.pool is not None else _Done(fn(*args))

    def _spans(self, rows: np.ndarray, chunks: np.ndarray):
        """Where each needed chunk goes in the group buffer, and each needed row's position.

        A mostly-needed chunk is copied whole (a memcpy); a sparsely-needed one contributes only
        its rows, so the buffer stays near the rows needed.
        """
        R, n_cells = self.R, self.ds.n_cells
        bounds = np.searchsorted(rows, np.stack([chunks * R, (chunks + 1) * R]))
        pos = np.empty(rows.size, dtype=np.int64)
        spans = []
        base = 0
        for c, lo, hi in zip(chunks, bounds[0], bounds[1], strict=True):
            size = min(n_cells, (c + 1) * R) - c * R
            whole = 2 * (hi - lo) >= size
            pos[lo:hi] = base + (rows[lo:hi] - c * R if whole else np.arange(hi - lo))
            spans.append((c, lo, hi, base, whole))
            base += size if whole else hi - lo
        return spans, pos, base

    def _fill_buffer(self, rows: np.ndarray, chunks: np.ndarray):
        """The group's rows in one buffer (decoded chunks copied in); their positions in it."""
        spans, pos, size = self._spans(rows, chunks)
        # One buffer for the whole epoch, grown when a group needs more: a fresh 64 MB allocation
        # per group cost as much in page faults as decoding it. (Every gather of the previous
        # group has finished before it is rewritten.)
        if self.whole_buf is None or self.whole_buf.shape[0] < size:
            self.whole_buf = np.empty((size, self.ds.n_genes), dtype=self.ds._X.dtype.numpy_dtype)
        buf = self.whole_buf[:size]
        copies = []
        for c, lo, hi, start, whole in spans:
            arr = self._next_chunk()
            if whole:
                copies.append(self._run(np.copyto, buf[start : start + arr.shape[0]], arr))
            else:
                dst = buf[start : start + hi - lo]
                copies.append(self._run(_take_rows, arr, rows[lo:hi] - c * self.R, dst))
        self._refill()
        for f in copies:
            f.result()
        return buf, pos

    def _gather(self, buf, pos, rows, index, x):
        at = pos[np.searchsorted(rows, self.ds._rank[index])]
        if x.dtype == buf.dtype:
            return np.take(buf, at, axis=0, out=x)
        tmp = getattr(self.scratch, "rows", None)
        if tmp is None or tmp.shape != x.shape or tmp.dtype != buf.dtype:
            tmp = self.scratch.rows = np.empty(x.shape, dtype=buf.dtype)
        np.copyto(x, np.take(buf, at, axis=0, out=tmp))
        return x

    def _batch(self, buf, pos, rows, index, mask):
        """(x future, y) of one batch; padded batches are assembled inline."""
        ld, labels = self.loader, self.ds.labels
        shape = (ld.local_rows, self.ds.n_genes)
        if mask.all():
            return self._run(self._gather, buf, pos, rows, index, np.empty(shape, dtype=ld.dtype)), labels[index]
        out = np.zeros(shape, dtype=ld.dtype)
        y = np.zeros(ld.local_rows, dtype=np.int32)
        if mask.any():
            real = index[mask]
            out[mask] = buf[pos[np.searchsorted(rows, self.ds._rank[real])]]
            y[mask] = labels[real]
        return _Done(out), y

    def _group_batches(self) -> Iterator[Batch]:
        if not self.infos:
            self._plan_next_group()
        layouts, rows, chunks = self.infos.popleft()
        buf, pos = self._fill_buffer(rows, chunks)
        window = 2 * self.loader.workers if self.pool is not None else 1  # gathers in flight
        pending: deque = deque()
        for index, slot, mask in layouts:
            x, y = self._batch(buf, pos, rows, index, mask)
            pending.append((x, y, slot, mask, index))
            while len(pending) > window:
                x, y, slot, mask, index = pending.popleft()
                yield Batch(x.result(), y, slot, mask, index)
        while pending:
            x, y, slot, mask, index = pending.popleft()
            yield Batch(x.result(), y, slot, mask, index)

    def batches(self) -> Iterator[Batch]:
        """Every batch of the epoch's groups, in order."""
        workers = self.loader.workers
        if workers > 1:
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="ginseng-assemble")
        try:
            for _ in range(self.n_groups):
                yield from self._group_batches()
        finally:
            self.inflight.clear()  # closed early: drop the reads still in flight
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
