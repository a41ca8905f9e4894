"""Multi-process set-up: one call before training, then the same code runs on every process.

Every process of a run executes the same program. :func:`initialize` connects the processes
through ``jax.distributed`` (SLURM and Open MPI are detected by JAX itself; ``mode="local"`` takes a
coordinator on this machine and the process id/count from arguments or the environment), after which
``jax.devices()`` lists the devices of every process and :func:`ginseng.train.GinsengTrainer` trains
on all of them without further changes.

On CPU, processes exchange data through gloo collectives; this is how multi-process training is
tested on one machine. If a peer process dies, JAX's coordination service notices its missing
heartbeats and terminates the survivors with a message; ``mode="local"`` uses short heartbeat
timeouts so that this happens within seconds rather than minutes. A process that fails with a
Python exception (rather than being killed) prints its traceback and exits at once (see
:func:`initialize`, ``exit_on_error``), so that its peers, waiting for it in a collective, are
stopped the same way instead of waiting for JAX's shutdown barrier (5 minutes).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = [
    "MODES",
    "barrier",
    "initialize",
    "is_initialized",
    "is_main_process",
    "process_allgather",
    "process_count",
    "process_index",
    "shutdown",
]

MODES = ("none", "local", "slurm", "auto")

# Environment variables read by mode="local" (set by launch/ scripts).
ENV_PROCESS_ID = "GINSENG_PROCESS_ID"
ENV_NUM_PROCESSES = "GINSENG_NUM_PROCESSES"
ENV_COORDINATOR = "GINSENG_COORDINATOR"

# Short enough that a dead peer is noticed well within a minute on one machine; JAX's default (100 s)
# suits clusters, where a slow node should not kill a job.
LOCAL_HEARTBEAT_TIMEOUT_S = 10
# How long a process that is shutting down waits for the others in JAX's shutdown barrier (JAX's
# default, 300 s, would keep a failed process, and so its peers, alive for 5 minutes).
LOCAL_SHUTDOWN_TIMEOUT_S = 30

_initialized = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        msg = f"environment variable {name} must be an integer, got {value!r}"
        raise ValueError(msg) from None


def _detect_mode() -> str:
    if os.environ.get(ENV_NUM_PROCESSES) or os.environ.get(ENV_COORDINATOR):
        return "local"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "slurm"  # JAX's auto-detection covers Open MPI the same way as SLURM
    return "none"


def initialize(
    mode: str = "none",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int | None = None,
    shutdown_timeout_seconds: int | None = None,
    exit_on_error: bool = True,
) -> bool:
    """Connect this process to the other processes of a multi-process run.

    Parameters
    ----------
    mode : {"none", "local", "slurm", "auto"}
        ``"none"``: a single process using all its local devices (nothing to do). ``"local"``: a
        coordinator on this machine; ``coordinator_address``, ``num_processes`` and ``process_id``
        come from the arguments or from the environment variables ``GINSENG_COORDINATOR``
        (``host:port``, default ``127.0.0.1:12355``), ``GINSENG_NUM_PROCESSES`` and
        ``GINSENG_PROCESS_ID``. ``"slurm"``: JAX detects SLURM (or Open MPI) itself; explicit
        arguments override. ``"auto"``: ``"local"`` when the GINSENG_ variables are set, ``"slurm"``
        inside a SLURM/Open MPI job with more than one task, else ``"none"``.
    coordinator_address : str, optional
        ``host:port`` of process 0's coordination service.
    num_processes : int, optional
        Number of processes in the run.
    process_id : int, optional
        This process's id, ``0 .. num_processes - 1``.
    local_device_ids : int | Sequence[int], optional
        Restrict this process to these local devices (e.g. one GPU per process).
    initialization_timeout : int
        Seconds to wait for all processes to connect.
    heartbeat_timeout_seconds : int, optional
        Seconds without a heartbeat after which a process is considered dead and the others are
        terminated. Default: 10 for ``"local"``, JAX's default (100) otherwise.
    shutdown_timeout_seconds : int, optional
        Seconds a process waits for the others at shutdown. Default: 30 for ``"local"``, JAX's
        default (300) otherwise.
    exit_on_error : bool
        Install a ``sys.excepthook`` that, for an exception nobody caught, prints the traceback
        and ends the process at once with exit status 1 (``os._exit``). Without it the failed
        process keeps its heartbeats going while JAX's atexit shutdown waits for peers that are
        themselves waiting for it in a collective: the whole run would hang for the shutdown
        timeout. (``mpi4py -m`` does the same with ``MPI_Abort``.)

    Returns
    -------
    bool
        True if ``jax.distributed`` was initialized (by this call or before), False for a single
        process.
    """
    global _initialized
    if mode not in MODES:
        msg = f"distributed mode must be one of {MODES}, got {mode!r}"
        raise ValueError(msg)
    if mode == "auto":
        mode = _detect_mode()
    if mode == "none":
        return _initialized
    if _initialized:
        return True

    kwargs: dict = {"initialization_timeout": int(initialization_timeout)}
    if mode == "local":
        coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or "127.0.0.1:12355"
        num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
        process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
        if num_processes is None or process_id is None:
            msg = (
                "distributed mode 'local' needs the number of processes and this process's id: pass "
                f"num_processes= and process_id= or set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} "
                f"(found num_processes={num_processes}, process_id={process_id})"
            )
            raise ValueError(msg)
        if num_processes < 1 or not 0 <= process_id < num_processes:
            msg = (
                f"distributed mode 'local' needs num_processes >= 1 and 0 <= process_id < "
                f"num_processes, got num_processes={num_processes}, process_id={process_id}"
            )
            raise ValueError(msg)
        if heartbeat_timeout_seconds is None:
            heartbeat_timeout_seconds = LOCAL_HEARTBEAT_TIMEOUT_S
        if shutdown_timeout_seconds is None:
            shutdown_timeout_seconds = LOCAL_SHUTDOWN_TIMEOUT_S
    for name, value in (
        ("coordinator_address", coordinator_address),
        ("num_processes", num_processes),
        ("process_id", process_id),
        ("local_device_ids", local_device_ids),
        ("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
        ("shutdown_timeout_seconds", shutdown_timeout_seconds),
    ):
        if value is not None:
            kwargs[name] = value
    # Only affects the CPU backend; harmless on GPU. Must be set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    if exit_on_error:
        _install_exit_on_error()
    return True


def _install_exit_on_error() -> None:
    previous = sys.excepthook
    if getattr(previous, "_ginseng_exit_on_error", False):
        return

    def hook(kind, value, tb):
        try:
            previous(kind, value, tb)  # the usual traceback
            if _initialized and not issubclass(kind, KeyboardInterrupt):
                n, i = jax.process_count(), jax.process_index()
                print(
                    f"ginseng: process {i} of {n} failed ({kind.__name__}); exiting now so that "
                    "the other processes stop too",
                    file=sys.stderr,
                )
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130 if issubclass(kind, KeyboardInterrupt) else 1)

    hook._ginseng_exit_on_error = True
    sys.excepthook = hook


def is_initialized() -> bool:
    """Whether :func:`initialize` connected this process to others."""
    return _initialized


def process_index() -> int:
    """This process's index (0 for a single process)."""
    return jax.process_index()


def process_count() -> int:
    """Number of processes in the run (1 for a single process)."""
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0, the only process that prints and writes files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_allgather(x, tiled: bool = False) -> np.ndarray:
    """Gather a host value from every process (stacked on a new leading axis unless ``tiled``)."""
    if jax.process_count() == 1:
        x = np.asarray(x)
        return x if tiled else x[None]
    return np.asarray(multihost_utils.process_allgather(x, tiled=tiled))


def shutdown() -> None:
    """Disconnect from the other processes (call at the end of a multi-process run)."""
    global _initialized
    if _initialized:
        jax.distributed.shutdown()
        _initialized = False
