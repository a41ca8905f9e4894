"""Start and stop the training worker processes (tests/_mp_worker.py) that the multi-process tests
use: on loopback only, always killed by the caller's ``finally``."""

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "_mp_worker.py"
N_GENES, N_CLASSES, HIDDEN, BATCH = 24, 3, 8, 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(store, out, *, epochs, nproc=2, devices_per_process=2, extra=(), jax_cache=None):
    """Start ``nproc`` workers training on ``store`` (coordinator on 127.0.0.1:<free port>)."""
    env = dict(os.environ)
    if jax_cache:
        # A persistent compilation cache shared by the workers: the same programs are compiled
        # once, and cached programs give bit-identical results.
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--process-id", str(p), "--num-processes", str(nproc),
             "--port", str(port), "--store", str(store), "--out", str(out), "--epochs", str(epochs),
             "--batch-size", str(BATCH), "--hidden", str(HIDDEN), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for p in range(nproc)
    ]


def kill_all(procs, timeout=20):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.communicate(timeout=timeout)
        except (subprocess.TimeoutExpired, ValueError):
            pass
