"""Multi-process training on one machine: 2 processes x 2 CPU devices over jax.distributed (gloo),
compared with the 1-device run; and a killed peer makes the survivor exit, never hang."""

import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from _workers import BATCH, HIDDEN, N_CLASSES, N_GENES, kill_all, spawn

from ginseng import distributed
from ginseng.train import GinsengTrainer, GinsengTrainerSettings


def _start(store, out, epochs, nproc=2, devices_per_process=2, extra=()):
    return spawn(store, out, epochs=epochs, nproc=nproc, devices_per_process=devices_per_process,
                 extra=extra)


@pytest.fixture
def store(tmp_path):
    from conftest import make_counts

    from ginseng.data import GinsengDataset

    adata = make_counts(n_cells=150, n_genes=N_GENES, n_labels=N_CLASSES, seed=3)
    GinsengDataset.create(tmp_path / "ds.zarr", adata, "cell_type", chunk_size=32, silent=True)
    return tmp_path / "ds.zarr"


SETTINGS = GinsengTrainerSettings(
    hidden_dim=HIDDEN, batch_size=BATCH, rate=0.1, lam_max=0.3, lower=0, upper=4
)


@pytest.mark.parametrize("epochs", [2])
def test_two_processes_two_devices_match_one_device(store, tmp_path, epochs):
    out = tmp_path / "mp.npz"
    procs = _start(store, out, epochs)
    try:
        logs = []
        for p in procs:
            text, _ = p.communicate(timeout=240)
            logs.append(text)
            assert p.returncode == 0, f"worker exited {p.returncode}:\n{text[-3000:]}"
    finally:
        kill_all(procs, timeout=10)
    assert Path(f"{out}.0.started").read_text().split() == ["4", "2"]  # 4 global, 2 local devices
    assert not any("epoch" in text for text in logs[1:])  # only process 0 may print
    mp = np.load(out)
    log1, ref = GinsengTrainer(store, SETTINGS, epochs=epochs, silent=True, devices=jax.devices()[:1])
    diff = max(
        float(np.max(np.abs(mp[f"{layer}/{name}"] - value)))
        for layer, sub in ref.params.items()
        for name, value in sub.items()
    )
    assert diff <= 1e-3
    mp_log = pd.read_csv(str(out) + ".csv")
    np.testing.assert_allclose(mp_log["train_loss"], log1.train_loss, rtol=1e-3)
    np.testing.assert_allclose(mp_log["holdout_accuracy"], log1.holdout_accuracy, atol=0.02)


@pytest.mark.parametrize("victim", [1, 0])  # a worker, and the coordinator itself
def test_killed_peer_makes_survivor_exit_with_a_message(store, tmp_path, victim):
    survivor = 1 - victim
    out = tmp_path / "killed.npz"
    procs = _start(store, out, epochs=100_000)
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{out}.{i}.started").exists() for i in range(2)):
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.2)
        time.sleep(3.0)  # let training get under way (compile, first steps)
        assert all(p.poll() is None for p in procs), "a worker ended before the kill"
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        text, _ = procs[survivor].communicate(timeout=90)
        waited = time.monotonic() - killed_at
    finally:
        kill_all(procs, timeout=10)
    assert procs[survivor].returncode != 0
    assert waited < 60, f"survivor took {waited:.0f} s to exit"
    # JAX's coordination service terminates the survivor and says why.
    assert "another task died" in text or "detected fatal errors" in text, text[-3000:]


@pytest.mark.parametrize("failing", [0, 1])
def test_exception_in_one_process_ends_every_process(store, tmp_path, failing):
    # A Python exception (not a kill) on one process: JAX's atexit shutdown used to wait 300 s
    # in its shutdown barrier, heart-beating, so the others sat in their barrier that long.
    out = tmp_path / "raised.npz"
    procs = _start(store, out, epochs=1, extra=("--raise-in", str(failing)))
    t0 = time.monotonic()
    try:
        texts = [p.communicate(timeout=120)[0] for p in procs]
        waited = time.monotonic() - t0
    finally:
        kill_all(procs, timeout=10)
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    assert "injected failure in process" in texts[failing], texts[failing][-3000:]
    assert f"ginseng: process {failing} of 2 failed" in texts[failing], texts[failing][-3000:]
    assert waited < 90, f"the processes took {waited:.0f} s to exit (start-up and training included)"


def test_late_process_follows_process_0s_decision_to_build_the_store(tmp_path):
    # Process 1 starts tasks.run only after process 0 has built the store: it used to see the
    # store, take the "reuse" branch alone and skip process 0's barrier (both then failed with a
    # barrier-name mismatch).
    import subprocess
    import sys

    from _workers import free_port
    from conftest import make_counts

    make_counts(n_cells=80, n_genes=20, n_labels=3, seed=0).write_h5ad(tmp_path / "in.h5ad")
    worker = Path(__file__).resolve().parent / "_mp_tasks_worker.py"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(p), port, str(tmp_path), "--late"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in range(2)
    ]
    try:
        texts = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        kill_all(procs, timeout=10)
    for i, (p, text) in enumerate(zip(procs, texts, strict=True)):
        assert p.returncode == 0, text[-3000:]
        assert f"[{i}] finished, model model.h5" in text
    assert (tmp_path / "run" / "model.h5").is_file()


def test_initialize_none_is_single_process():
    assert distributed.initialize("none") is False
    assert distributed.is_main_process()
    assert distributed.process_count() == 1
    distributed.barrier("noop")  # no-op for one process
    gathered = distributed.process_allgather(np.arange(3))
    assert gathered.shape == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "mpi"}, r"mode must be one of \('none', 'local', 'slurm', 'auto'\), got 'mpi'"),
        ({"mode": "local"}, r"needs the number of processes .*found num_processes=None"),
        ({"mode": "local", "num_processes": 2, "process_id": 2}, r"0 <= process_id < num_processes, got num_processes=2, process_id=2"),
    ],
)
def test_initialize_refuses_bad_arguments(kwargs, match, monkeypatch):
    for name in ("GINSENG_PROCESS_ID", "GINSENG_NUM_PROCESSES", "GINSENG_COORDINATOR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_auto_mode_detection(monkeypatch):
    for name in ("GINSENG_NUM_PROCESSES", "GINSENG_COORDINATOR", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed._detect_mode() == "none"
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed._detect_mode() == "slurm"
    monkeypatch.setenv("GINSENG_NUM_PROCESSES", "2")
    assert distributed._detect_mode() == "local"


def test_two_processes_streamed_equals_resident_to_every_bit(store, tmp_path):
    """Under jax.distributed every process reads the same streamed buffers and sends its own
    slots' rows: the model is the resident mode's, to every bit."""
    params = {}
    for mode in ("resident", "streamed"):
        out = tmp_path / f"{mode}.npz"
        procs = _start(store, out, 1, extra=("--device-data", mode, "--steps-per-dispatch", "3"))
        try:
            for p in procs:
                text, _ = p.communicate(timeout=240)
                assert p.returncode == 0, f"worker exited {p.returncode}:\n{text[-3000:]}"
        finally:
            kill_all(procs, timeout=10)
        params[mode] = dict(np.load(out))
    assert params["resident"].keys() == params["streamed"].keys()
    for k, v in params["resident"].items():
        np.testing.assert_array_equal(v, params["streamed"][k])
