"""The device mesh shared by training and annotation, and moving arrays on and off it.

One axis, ``"data"``, spans every device of every process, ordered by process: process ``p``'s
rows of a global batch are then one contiguous block, which is what
``jax.make_array_from_process_local_data`` expects.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, PyTree

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device of every process).

    Devices are ordered by process, so process ``p``'s rows of a global batch are one contiguous
    block, which is what ``jax.make_array_from_process_local_data`` expects.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        msg = "devices must list at least one device, got an empty list"
        raise ValueError(msg)
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the mesh."""

    process_index: int  # position of this process among the mesh's processes
    process_count: int
    local_devices: int  # mesh devices owned by this process


def layout(mesh: Mesh) -> Layout:
    """This process's :class:`Layout` in ``mesh``; refuses a mesh it owns no device of."""
    devs = list(mesh.devices.flat)
    procs = sorted({d.process_index for d in devs})
    me = jax.process_index()
    if me not in procs:
        msg = f"this process ({me}) owns none of the {len(devs)} devices given to the trainer"
        raise ValueError(msg)
    per_proc = {p: sum(d.process_index == p for d in devs) for p in procs}
    if len(set(per_proc.values())) != 1:
        msg = f"every process must bring the same number of devices, got {per_proc} (process: devices)"
        raise ValueError(msg)
    return Layout(procs.index(me), len(procs), per_proc[me])


def all_sum(mesh: Mesh):
    """``(single, all_sum)``: the sum over the ``"data"`` axis used inside the sharded steps.

    On a one-device mesh the sum is the identity, and it is left out: XLA still emits an
    all-reduce for a ``psum`` over one device, and on the CPU backend those 14 no-op all-reduces of
    the gradients cost ~15-20 % of the step (``benchmarks/bench_step_variants.py``). The result is
    the same bit for bit. ``single`` also turns off shard_map's replication check, which cannot see
    that a value summed over one device is replicated.
    """
    single = mesh.size == 1
    if single:
        return True, lambda tree: tree
    return False, functools.partial(jax.lax.psum, axis_name=DATA_AXIS)


def to_host(tree: PyTree) -> PyTree:
    """Copy a replicated pytree to host numpy (each process holds a full copy)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place host values on every device of the mesh (every process passes the same values)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)), tree
    )


def global_rows(arr: np.ndarray, mesh: Mesh, n_rows: int) -> Array:
    """The global array of ``n_rows`` rows sharded over ``"data"``, of which ``arr`` holds this
    process's contiguous block (all of it on one process)."""
    arr = np.asarray(arr)
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.make_array_from_process_local_data(sharding, arr, (n_rows, *arr.shape[1:]))


def global_arrays(batch, mesh: Mesh, n_rows: int) -> tuple[Array, Array, Array, Array]:
    """Assemble the global (x, y, slot, mask) arrays from this process's rows of the batch.

    ``x`` keeps its dtype (the loader's: the store's integer counts for the trainer), so that no
    more bytes than stored cross to the devices; the steps convert to float32.
    """
    return (
        global_rows(batch.x, mesh, n_rows),
        global_rows(np.asarray(batch.y, np.int32), mesh, n_rows),
        global_rows(np.asarray(batch.slot, np.int32), mesh, n_rows),
        global_rows(np.asarray(batch.mask, bool), mesh, n_rows),
    )
