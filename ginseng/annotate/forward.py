"""The forward pass over the mesh, and streaming a source's batches through it.

Every batch has one fixed shape (the last one is padded and its padding dropped on the host), so
the forward pass is compiled once; it runs jitted over the ``"data"`` mesh of all devices with
replicated parameters. Under ``jax.distributed`` every process reads its own contiguous rows of
each global batch and the results are gathered once per batch. A background thread reads the next
block while the devices compute the current one, and batch i is dispatched before batch i - 1 is
fetched, so the devices never wait on the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ginseng._core.mesh import layout, make_mesh
from ginseng._core.threads import background
from ginseng.nn import nn_annotate

__all__ = ["BatchStream", "build_forward"]


@functools.lru_cache(maxsize=32)
def build_forward(
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
    forward = _forward_fn(dropout_rate, normalize, target_sum, randomness, n_samples, want_probs, want_attn)
    data = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    # Params are replicated and NOT donated: the caller's model stays usable.
    return jax.jit(forward, in_shardings=(repl, repl, data, data), out_shardings=data), data, repl


@functools.lru_cache(maxsize=32)
def build_forward_compact(mesh: Mesh, n_genes: int, **settings):
    """Jitted ``(params, seed, rows, cols, vals, index) -> dict``: :func:`build_forward`'s pass on
    batches sent as their non-zero entries and densified on the devices.

    ``rows``, ``cols``, ``vals`` are sharded over ``"data"``, each device's segment holding the
    entries of its own rows of the batch (``rows`` counted from its first row; padding entries
    add 0 at (0, 0)). The dense batch goes through an optimization barrier into the same forward
    function, so that the results are those of the dense path to every bit.
    """
    forward = _forward_fn(**settings)
    data = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())

    def densify(r, c, v, index):
        local = index.shape[0]
        return jnp.zeros((local, n_genes), jnp.float32).at[r, c].add(v, mode="drop")

    spread = jax.shard_map(densify, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P("data"))

    def compact_forward(params, seed, r, c, v, index):
        x = jax.lax.optimization_barrier(spread(r, c, v, index))
        return forward(params, seed, x, index)

    return jax.jit(compact_forward, in_shardings=(repl, repl, data, data, data, data), out_shardings=data)


def _forward_fn(dropout_rate: float, normalize: bool, target_sum: float | None, randomness: bool,
                n_samples: int, want_probs: bool, want_attn: bool):
    """The forward pass as a function of (params, seed, x, index), for jit to compile."""

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

    return forward



class BatchStream:
    """The global batches of a source over the mesh of ``devices``: read, dispatched, fetched.

    The mesh is the trainer's (devices ordered by process), so this process's rows of a global
    batch are the one contiguous block ``make_array_from_process_local_data`` expects.
    """

    def __init__(self, devices, batch_size: int, n_cells: int, n_model_genes: int):
        self.mesh = make_mesh(devices)
        lay = layout(self.mesh)
        n_dev = self.mesh.devices.size
        self.n_proc, self.proc = lay.process_count, lay.process_index
        self.global_batch = -(-batch_size // n_dev) * n_dev
        self.local_rows = self.global_batch // self.n_proc
        self.n_cells = n_cells
        self.n_batches = -(-n_cells // self.global_batch)
        self.is_writer = self.proc == 0
        # A fixed ring of input buffers instead of a new 8 MB array per batch: memory stays flat
        # (no heap fragmentation across threads). A slot is rewritten only after its batch has
        # been consumed: at most depth (queue) + 1 (being read) + 2 (dispatched, pending) live.
        self.depth = 2
        self.local_devices = lay.local_devices
        self.ring = [np.zeros((self.local_rows, n_model_genes), np.float32) for _ in range(self.depth + 4)]

    def _compact(self, entries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One process's entries split into equal per-device segments (rows counted from each
        device's first row), padded with zeros to a power of two: few shapes, few compiles."""
        r, c, v = entries
        n_dev = self.local_devices
        per = self.local_rows // n_dev
        dev = r // per
        counts = np.bincount(dev, minlength=n_dev)
        cap = max(1024, 1 << int(np.ceil(np.log2(max(1, int(counts.max()))))))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = dev.astype(np.int64) * cap + (np.arange(r.size) - starts[dev])
        out = [np.zeros(n_dev * cap, t) for t in (np.int32, np.int32, np.float32)]
        out[0][pos], out[1][pos], out[2][pos] = r - dev * per, c, v
        return tuple(out)

    def _produce(self, source, compact: bool, i: int):
        # Rows of this process in global batch i: [g0 + proc*local_rows, ... + local_rows).
        g0, rows = i * self.global_batch, self.local_rows
        a = min(g0 + self.proc * rows, self.n_cells)
        b = min(a + rows, self.n_cells)
        x = None
        if compact:
            entries = source.read_compact(a, b) if hasattr(source, "read_compact") else None
            x = None if entries is None else self._compact(entries)
        if x is None:
            x = self.ring[i % len(self.ring)]
            source.read(a, b, out=x)
            x[b - a :] = 0.0  # padding rows
        index = np.arange(g0 + self.proc * rows, g0 + (self.proc + 1) * rows, dtype=np.int64)
        if source.stored_order is not None:  # key every cell by its original index
            index[: b - a] = source.stored_order[a:b]
        return i, x, index.astype(np.int32)

    def _to_global(self, arr: np.ndarray, sharding):
        if self.n_proc > 1:
            return jax.make_array_from_process_local_data(sharding, arr, (self.global_batch, *arr.shape[1:]))
        return jax.device_put(arr, sharding)

    def _fetch(self, out) -> dict:
        if self.n_proc > 1:
            from jax.experimental import multihost_utils

            return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(out, tiled=True).items()}
        return jax.device_get(out)

    def run(self, source, fwd, data_sharding, params, seed, consume) -> None:
        """``consume(a, b, out)`` for every batch's cells [a, b), in order, padding dropped.

        ``fwd``: the dense forward, or (dense, compact) to send sparse batches as entries."""
        fwd, fwd_compact = fwd if isinstance(fwd, tuple) else (fwd, None)
        # Sparse inputs travel as their kept entries and are densified on the devices (one
        # process: every process would need the same segment sizes).
        compact = self.n_proc == 1 and fwd_compact is not None
        prefetch = background(
            lambda: map(functools.partial(self._produce, source, compact), range(self.n_batches)),
            depth=self.depth, name="ginseng-annotate",
        )
        try:
            pending = None
            for i, x, index in prefetch:
                # Dispatch batch i before fetching batch i-1, so the devices never wait on the host.
                idx = self._to_global(index, data_sharding)
                if isinstance(x, tuple):
                    out_dev = fwd_compact(params, seed, *(self._to_global(part, data_sharding) for part in x), idx)
                else:
                    out_dev = fwd(params, seed, self._to_global(x, data_sharding), idx)
                if pending is not None:
                    self._consume(consume, *pending)
                pending = (i, out_dev)
            if pending is not None:
                self._consume(consume, *pending)
        finally:
            prefetch.close()

    def _consume(self, consume, i: int, out_dev) -> None:
        out = self._fetch(out_dev)
        a = i * self.global_batch
        b = min(a + self.global_batch, self.n_cells)
        consume(a, b, {k: v[: b - a] for k, v in out.items()})
