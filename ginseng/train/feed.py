"""What crosses to the devices in training: the counts once (resident) or one buffer per dispatch
(streamed), and for every dispatch only the int32 row numbers of its batches.

Both modes execute the loader's epoch plan (``ginseng.data.sampler``): the same cells in the same
global batches and slots as the host loader yields, so a model trained either way is the same to
every bit. A dispatch runs ``steps_per_dispatch`` batches (``build_multi_step``); its groups
never cross a checkpoint position, and a short group is padded with fully masked batches (rows
-1), which change nothing.

- **resident**: TensorStore decodes the whole store once into one host buffer (storage order),
  which is put on every device once; a batch's rows are stored-row numbers.
- **streamed**: the host decodes whole chunks into one buffer of a fixed capacity (two shuffle
  windows; so the step compiles once per epoch at most), sends it in one transfer, and every
  dispatch group whose chunks it holds draws its rows from it (positions in the buffer); each
  chunk is read about once an epoch. The next buffer is read on a background thread while the
  devices train on this one. Under ``jax.distributed`` every process reads the same
  chunks (the buffer is replicated) and sends only its own slots' rows.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ginseng._core.mesh import DATA_AXIS, replicate
from ginseng._core.threads import background
from ginseng.data import sampler

__all__ = ["HOST_RESIDENT_FRACTION", "RESIDENT_FRACTION", "choose_mode", "dispatch_groups", "make_feed"]

# Device-memory budget of resident data: this fraction of one device's memory (an H200: ~55 of
# 139 GiB; an A100-40GB: 16 GiB), leaving the rest to parameters, activations and XLA.
RESIDENT_FRACTION = 0.4
# Without a reported device memory (CPU devices live in host RAM): this fraction of the RAM,
# counting one copy per local device.
HOST_RESIDENT_FRACTION = 0.25
# A streamed buffer holds the chunks of up to this many shuffle windows (16,384 rows each): a
# dispatch group near a window's end touches two.
BUFFER_WINDOWS = 2
# Whole-chunk reads in flight while decoding (TensorStore decodes them on its own threads).
_INFLIGHT = 32


def supports(dataset) -> bool:
    """Whether the dataset is a store the feeds can read (a GinsengDataset, not a stand-in)."""
    return all(hasattr(dataset, a) for a in ("_X", "_rank", "_order", "chunk_rows", "labels"))


def dispatch_groups(num_batches: int, start: int, k: int, every: int | None) -> list[range]:
    """Batches ``start ..`` in groups of at most ``k``, none crossing a multiple of ``every``."""
    groups, b = [], int(start)
    while b < num_batches:
        end = min(b + k, num_batches)
        if every:
            end = min(end, (b // every + 1) * every)
        groups.append(range(b, end))
        b = end
    return groups


def _budget(mesh) -> tuple[int, str]:
    """(bytes resident data may take on each device, and where that figure comes from)."""
    device = mesh.devices.flat[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        limit = int(stats["bytes_limit"])
        return int(RESIDENT_FRACTION * limit), f"{RESIDENT_FRACTION:.0%} of {limit / 2**30:.1f} GiB of device memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = max(1, len([d for d in mesh.devices.flat if d.process_index == jax.process_index()]))
    return (int(HOST_RESIDENT_FRACTION * ram / local),
            f"{HOST_RESIDENT_FRACTION:.0%} of {ram / 2**30:.1f} GiB of RAM over {local} device(s)")


def choose_mode(dataset, requested: str, mesh) -> tuple[str, str]:
    """(``"resident"`` or ``"streamed"``, the reason, for the log)."""
    need = int(dataset.n_cells) * int(dataset.n_genes) * dataset._X.dtype.numpy_dtype.itemsize
    budget, where = _budget(mesh)
    size = f"{need / 2**30:.2f} GiB ({dataset.n_cells:,} cells x {dataset.n_genes:,} genes)"
    if requested != "auto":
        return requested, f"device_data={requested!r} (the dataset is {size}; budget {budget / 2**30:.2f} GiB)"
    if need <= budget:
        return "resident", f"the dataset, {size}, fits the budget of {budget / 2**30:.2f} GiB ({where})"
    return "streamed", (f"the dataset, {size}, exceeds the resident budget of {budget / 2**30:.2f} GiB "
                        f"({where}): streaming whole chunks per dispatch instead")


def _global_rows(rows: np.ndarray, mesh, global_batch: int):
    """(k, global batch) int32 rows sharded over ``"data"`` on axis 1, from this process's slots."""
    sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, rows.astype(np.int32), (rows.shape[0], global_batch))


def _group_cells(loader, plan: np.ndarray, g: range, k: int, process_index: int, local_rows: int) -> np.ndarray:
    """(k, local_rows) original cell indices of the group's batches (-1: padding, and every row
    of the padding batches after the group's last)."""
    out = np.full((k, local_rows), -1, np.int64)
    for j, b in enumerate(g):
        index, _, mask = sampler.batch_layout(plan, b, loader.batch_size, local_rows, process_index)
        out[j] = np.where(mask, index, -1)
    return out


def _read_chunks(ds, chunks: np.ndarray, out: np.ndarray) -> None:
    """Decode whole chunks into ``out`` (chunk j at rows j*R ..), ``_INFLIGHT`` reads at a time:
    TensorStore decodes them concurrently on its own threads while earlier ones are copied."""
    R, n = int(ds.chunk_rows), int(ds.n_cells)
    reads: collections.deque = collections.deque()
    todo = iter(enumerate(chunks))
    for item in itertools.islice(todo, _INFLIGHT):
        reads.append((item, ds._X[item[1] * R : min(n, (item[1] + 1) * R)].read()))
    while reads:
        (j, _c), fut = reads.popleft()
        nxt = next(todo, None)
        if nxt is not None:
            reads.append((nxt, ds._X[nxt[1] * R : min(n, (nxt[1] + 1) * R)].read()))
        try:
            arr = fut.result()
        except ValueError as err:
            raise ds._damaged("reading counts", err) from err
        out[j * R : j * R + arr.shape[0]] = arr


class ResidentFeed:
    """The whole store on every device; per group, the stored rows of its batches."""

    mode = "resident"

    def __init__(self, dataset, mesh, layout):
        self.mesh, self.layout, self.rank = mesh, layout, dataset._rank
        host = np.empty((dataset.n_cells, dataset.n_genes), dtype=dataset._X.dtype.numpy_dtype)
        _read_chunks(dataset, np.arange(math.ceil(dataset.n_cells / dataset.chunk_rows)), host)
        self.nbytes = host.nbytes
        self.X = replicate(host, mesh)
        del host
        self.labels = replicate(np.asarray(dataset.labels, np.int32)[dataset._order], mesh)

    def groups(self, loader, epoch: int, groups: list[range], k: int) -> Iterator[tuple]:
        plan = loader.plan(epoch)
        lay = self.layout
        for g in groups:
            cells = _group_cells(loader, plan, g, k, lay.process_index, loader.local_rows)
            rows = np.where(cells >= 0, self.rank[np.maximum(cells, 0)], -1)
            yield self.X, self.labels, _global_rows(rows, self.mesh, loader.global_batch)


class StreamedFeed:
    """Buffers of whole chunks (up to ``BUFFER_WINDOWS`` shuffle windows), each shared by the
    dispatch groups whose chunks it holds, read ahead on a thread. The epoch's row layout is
    planned up front (8 bytes per cell of the epoch) to size the buffers."""

    mode = "streamed"

    def __init__(self, dataset, mesh, layout, prefetch: int = 2):
        self.ds, self.mesh, self.layout, self.prefetch = dataset, mesh, layout, prefetch
        self.labels_by_row = np.asarray(dataset.labels, np.int32)[dataset._order]
        self.R = int(dataset.chunk_rows)
        self.nbytes = 0  # the largest buffer sent so far

    def _chunks(self, loader, plan, g: range, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(stored rows of every slot of the group's global batches, the chunks they touch)."""
        cells = _group_cells(loader, plan, g, k, 0, loader.global_batch)
        rows = np.where(cells >= 0, self.ds._rank[np.maximum(cells, 0)], -1)
        return rows, np.unique(rows[rows >= 0] // self.R)

    def _spans(self, touched: list[np.ndarray]) -> list[np.ndarray]:
        """The chunks of each buffer: consecutive groups share one while the union of what they
        touch fits ``BUFFER_WINDOWS`` shuffle windows, so that each chunk is read about once."""
        cap = BUFFER_WINDOWS * max(1, sampler._WINDOW_ROWS // self.R)
        spans, current = [], np.zeros(0, np.int64)
        for chunks in touched:
            union = np.union1d(current, chunks)
            if current.size and union.size > cap:
                spans.append(current)
                union = chunks
            current = union
        spans.append(current)
        return spans

    def _buffer(self, chunks: np.ndarray, capacity: int):
        # Rows past the chunks are never drawn (no row number points there): left unwritten.
        buf = np.empty((capacity, self.ds.n_genes), dtype=self.ds._X.dtype.numpy_dtype)
        _read_chunks(self.ds, chunks, buf)
        labels = np.zeros(capacity, np.int32)
        R, n = self.R, int(self.ds.n_cells)
        for j, c in enumerate(chunks):
            size = min(n, (c + 1) * R) - c * R
            labels[j * R : j * R + size] = self.labels_by_row[c * R : c * R + size]
        return buf, labels

    def _prepared(self, loader, plan, groups, k) -> Iterator[tuple]:
        layouts = [self._chunks(loader, plan, g, k) for g in groups]
        touched = [t for _, t in layouts]
        spans = self._spans(touched)
        # One shape per epoch (the largest buffer, in whole windows): the step compiles rarely.
        per_window = max(1, sampler._WINDOW_ROWS // self.R)
        capacity = max(1, math.ceil(max(s.size for s in spans) / per_window)) * per_window * self.R
        lo = self.layout.process_index * loader.local_rows
        spans_left = iter(spans)
        chunks, X, labels = np.zeros(0, np.int64), None, None
        for rows, needed in layouts:
            if X is None or not np.isin(needed, chunks).all():
                chunks = next(spans_left)
                buf, lab = self._buffer(chunks, capacity)
                self.nbytes = max(self.nbytes, buf.nbytes)
                X, labels = replicate(buf, self.mesh), replicate(lab, self.mesh)
                del buf, lab
            real = rows >= 0
            pos = np.full(rows.shape, -1, np.int64)
            c = rows[real] // self.R
            pos[real] = np.searchsorted(chunks, c) * self.R + (rows[real] - c * self.R)
            yield X, labels, _global_rows(pos[:, lo : lo + loader.local_rows], self.mesh, loader.global_batch)

    def groups(self, loader, epoch: int, groups: list[range], k: int) -> Iterator[tuple]:
        plan = loader.plan(epoch)
        yield from background(lambda: self._prepared(loader, plan, groups, k), depth=self.prefetch,
                              name="ginseng-stream")


def make_feed(dataset, requested: str, mesh, layout, verbose: bool):
    """The feed of ``dataset`` (None for a dataset the feeds cannot read: the trainer then uses
    the host loader batch by batch); the mode chosen is printed with its reason."""
    if not supports(dataset):
        return None
    mode, why = choose_mode(dataset, requested, mesh)
    if verbose:
        print(f"[ginseng] device data: {mode}; {why}", flush=True)
    return ResidentFeed(dataset, mesh, layout) if mode == "resident" else StreamedFeed(dataset, mesh, layout)
