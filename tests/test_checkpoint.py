"""Checkpoints, resume, preemption and fault injection.

In-process: what a checkpoint holds, a crash or SIGTERM at a given step then resume, refusals
(other settings, another dataset, an existing checkpoint without resume), and clear errors for
truncated, corrupted and unknown-version files.

Fault injection in subprocesses (tests/_mp_worker.py): training is SIGKILLed at seeded random
steps several times and resumed, and killed in the middle of writing a checkpoint; for one process
and for 2 processes x 2 devices over gloo; and SIGTERM to one of two processes makes both write one
checkpoint at the same step and exit 75. Every resumed run must end with the uninterrupted run's
params bit for bit and the same per-epoch history.
"""

import dataclasses
import os
import select
import signal
import time

import h5py
import jax
import numpy as np
import pandas as pd
import pytest
from _workers import BATCH, HIDDEN, N_CLASSES, N_GENES, kill_all, spawn
from test_train import RUN, MemoryDataset

from ginseng.train import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    PREEMPTED_EXIT_CODE,
    GinsengTrainer,
    GinsengTrainerSettings,
    latest_checkpoint,
    read_checkpoint,
)
from ginseng.train import checkpoint as ckpt


def _identical(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))


def _flat(params) -> dict:
    return {f"{layer}/{name}": v for layer, sub in params.items() for name, v in sub.items()}


def _assert_same_npz(path, params):
    got = np.load(path)
    want = _flat(params)
    assert sorted(got.files) == sorted(want)
    for name, value in want.items():
        assert np.array_equal(got[name], value), f"{name} differs: max |diff| {np.max(np.abs(got[name] - value))}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from conftest import make_counts

    from ginseng.data import GinsengDataset

    path = tmp_path_factory.mktemp("ckpt_store") / "ds.zarr"
    adata = make_counts(n_cells=150, n_genes=N_GENES, n_labels=N_CLASSES, seed=3)
    GinsengDataset.create(path, adata, "cell_type", chunk_size=32, silent=True)
    return path


# ------------------------------------------------------------------------------------------
# in process: contents, interruptions, refusals, damaged files
# ------------------------------------------------------------------------------------------


def _read_exact_csv(path) -> pd.DataFrame:
    """A CSV of floats read back exactly: pandas 3 does so by default (and deprecates asking for
    it); pandas 2 must be asked."""
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    return pd.read_csv(path, **exact)


class Crash(Exception):
    pass


class InterruptingDataset(MemoryDataset):
    """Interrupts training at a given global step: by raising (a crash) or by sending SIGTERM."""

    def __init__(self, at_step, how):
        super().__init__()
        self.at_step, self.how, self.seen = at_step, how, 0

    def loader(self, batch_size, **kwargs):
        inner = super().loader(batch_size, **kwargs)
        if kwargs.get("split") != "train":
            return inner
        outer = self

        class Wrapped:
            num_batches, global_batch = inner.num_batches, inner.global_batch

            def epoch(self, epoch, start_batch=0):
                for b in inner.epoch(epoch, start_batch):
                    if outer.seen == outer.at_step:
                        if outer.how == "crash":
                            raise Crash
                        os.kill(os.getpid(), signal.SIGTERM)
                    outer.seen += 1
                    yield b

        return Wrapped()


@pytest.mark.parametrize(("at_step", "how"), [(5, "crash"), (8, "crash"), (11, "sigterm"), (7, "sigterm")])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, at_step, how):
    # 72 train cells / batch 10 = 8 steps an epoch; checkpoints every 3 steps and at epoch ends.
    # SIGTERM at step 7 is read at the epoch's end (the stop lag is 2 steps): checkpoint at the
    # start of epoch 2.
    settings = dataclasses.replace(RUN, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=3)
    log_ref, ref = GinsengTrainer(MemoryDataset(), RUN, epochs=2, silent=True)
    if how == "crash":
        with pytest.raises(Crash):
            GinsengTrainer(InterruptingDataset(at_step, how), settings, epochs=2, silent=True)
    else:
        with pytest.raises(SystemExit) as exc:
            GinsengTrainer(InterruptingDataset(at_step, how), settings, epochs=2, silent=True)
        assert exc.value.code == PREEMPTED_EXIT_CODE == 75
        rec = read_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
        # The signal came before step `at_step`; the stop is read 2 steps later (or at the epoch end).
        assert rec["global_step"] == min(at_step + 3, 8 * (at_step // 8 + 1))
    assert latest_checkpoint(tmp_path / "ckpt") is not None
    log, resumed = GinsengTrainer(MemoryDataset(), settings, epochs=2, silent=True, resume=True)
    assert _identical(ref.params, resumed.params)
    assert log.to_dataframe().equals(log_ref.to_dataframe())


class SignalBeforeTraining(MemoryDataset):
    def make_holdout(self, *args, **kwargs):
        super().make_holdout(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)  # before the first step is even compiled


def test_signal_during_start_up_still_checkpoints_and_exits_75(tmp_path, capsys):
    settings = dataclasses.replace(RUN, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(SystemExit) as exc:
        GinsengTrainer(SignalBeforeTraining(), settings, epochs=2, silent=False)
    assert exc.value.code == PREEMPTED_EXIT_CODE
    rec = read_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
    assert (rec["epoch"], rec["step_in_epoch"], rec["global_step"]) == (0, 3, 3)  # read 2 steps late
    out = capsys.readouterr().out
    assert f"SIGUSR1: checkpoint written to '{latest_checkpoint(tmp_path / 'ckpt')}' at epoch 1, step 3; exiting with code 75" in out
    # Without a checkpoint_dir the signals keep their default meaning (nothing to resume from).
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_checkpoint_holds_the_whole_training_state(store, tmp_path):
    from ginseng.data import GinsengDataset

    settings = dataclasses.replace(RUN, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=4)
    log, state = GinsengTrainer(store, settings, epochs=1, silent=True)
    rec = read_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
    ds = GinsengDataset(store)
    n = rec["batches_per_epoch"]
    assert n == ds.loader(BATCH, split="train", balance=True).num_batches > 4
    # Written at the end of epoch 1: continue in epoch index 1 at its step 0.
    assert (rec["epoch"], rec["step_in_epoch"], rec["global_step"]) == (1, 0, n)
    assert int(rec["opt_state"].step) == n
    assert _identical(rec["params"], state.params)
    assert _identical(rec["opt_state"].m, jax.tree.map(np.zeros_like, state.params)) is False
    assert jax.tree.structure(rec["opt_state"].v) == jax.tree.structure(state.params)
    want_key = jax.random.key_data(jax.random.split(jax.random.key(settings.seed))[1])
    np.testing.assert_array_equal(rec["train_key"], np.asarray(want_key))
    assert rec["rng_impl"] and rec["device_count"] == len(jax.devices())
    np.testing.assert_array_equal(rec["metrics"], [0.0, 0.0])
    pd.testing.assert_frame_equal(
        pd.DataFrame({k: v for k, v in rec["logger"].items()})[list(log.to_dataframe().columns)],
        log.to_dataframe().astype(np.float64).assign(epoch=lambda d: d.epoch - 1),  # stored 0-based
    )
    assert rec["dataset_identity"] == ds.identity
    expected = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ckpt.RESUME_FREE}
    expected["betas"] = list(expected["betas"])
    assert rec["settings"] == expected
    # Mid-epoch: a crash after 6 steps leaves the step-4 checkpoint with that epoch's running loss.
    crash_dir = tmp_path / "crash"
    with pytest.raises(Crash):
        GinsengTrainer(InterruptingDataset(6, "crash"), dataclasses.replace(settings, checkpoint_dir=str(crash_dir)), epochs=1, silent=True)
    mid = read_checkpoint(latest_checkpoint(crash_dir))
    assert (mid["epoch"], mid["step_in_epoch"], mid["global_step"]) == (0, 4, 4)
    assert mid["metrics"][1] == 40.0 and mid["metrics"][0] > 0  # 4 full batches of 10 cells
    assert list(mid["logger"]["epoch"]) == []


def test_resume_refuses_other_settings_and_missing_dir(tmp_path):
    settings = dataclasses.replace(RUN, checkpoint_dir=str(tmp_path / "ckpt"), lr_schedule="cosine")
    GinsengTrainer(MemoryDataset(), settings, epochs=1, silent=True)
    other = dataclasses.replace(settings, lr=2e-3)
    with pytest.raises(ValueError, match=r"other settings: lr: checkpoint 0.001, now 0.002"):
        GinsengTrainer(MemoryDataset(), other, epochs=2, silent=True, resume=True)
    with pytest.raises(ValueError, match="resume=True needs settings.checkpoint_dir"):
        GinsengTrainer(MemoryDataset(), RUN, epochs=1, silent=True, resume=True)
    # A new run never overwrites another run's checkpoint.
    before = latest_checkpoint(tmp_path / "ckpt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a checkpoint \(checkpoint-000000008\.h5\); pass resume=True"):
        GinsengTrainer(MemoryDataset(), settings, epochs=1, silent=True)
    assert latest_checkpoint(tmp_path / "ckpt").read_bytes() == before
    # The cosine schedule spans the run: a resumed run cannot change its length.
    with pytest.raises(
        ValueError, match=r"a run of 1 epochs \(8 steps\), this run has 2 epochs \(16 steps\).*epochs=1"
    ):
        GinsengTrainer(MemoryDataset(), settings, epochs=2, silent=True, resume=True)
    assert latest_checkpoint(tmp_path / "ckpt").read_bytes() == before
    # checkpoint_dir / checkpoint_every may change between a run and its resumption.
    moved = dataclasses.replace(settings, checkpoint_every=5)
    log, _ = GinsengTrainer(MemoryDataset(), moved, epochs=1, silent=True, resume=True)
    assert log.epoch == [0]
    # With a constant rate a finished run can be extended; resuming it with as many epochs
    # just returns it.
    flat = dataclasses.replace(RUN, checkpoint_dir=str(tmp_path / "flat"))
    assert flat.lr_schedule == "constant"  # the default
    GinsengTrainer(MemoryDataset(), flat, epochs=1, silent=True)
    log, _ = GinsengTrainer(MemoryDataset(), flat, epochs=2, silent=True, resume=True)
    assert log.epoch == [0, 1]
    log, _ = GinsengTrainer(MemoryDataset(), flat, epochs=2, silent=True, resume=True)
    assert log.epoch == [0, 1]


def test_checkpoint_from_before_lr_schedules_resumes_at_a_constant_rate(tmp_path):
    import json

    import h5py

    settings = dataclasses.replace(RUN, checkpoint_dir=str(tmp_path / "ckpt"))
    GinsengTrainer(MemoryDataset(), settings, epochs=1, silent=True)
    with h5py.File(latest_checkpoint(tmp_path / "ckpt"), "r+") as f:  # as written before lr_schedule existed
        del f.attrs["total_steps"]
        old = json.loads(f.attrs["settings"])
        del old["lr_schedule"]
        f.attrs["settings"] = json.dumps(old, sort_keys=True)
    log, _ = GinsengTrainer(MemoryDataset(), settings, epochs=2, silent=True, resume=True)
    assert log.epoch == [0, 1]


def test_resume_refuses_another_dataset(store, tmp_path):
    from conftest import make_counts

    from ginseng.data import GinsengDataset

    settings = dataclasses.replace(RUN, checkpoint_dir=str(tmp_path / "ckpt"))
    GinsengTrainer(store, settings, epochs=1, silent=True)
    adata = make_counts(n_cells=150, n_genes=N_GENES, n_labels=N_CLASSES, seed=3)
    other = GinsengDataset.create(tmp_path / "other.zarr", adata, "cell_type", chunk_size=32, silent=True)
    with pytest.raises(ValueError, match="was written for dataset .* not for this dataset"):
        GinsengTrainer(other, settings, epochs=2, silent=True, resume=True)


@pytest.fixture
def one_checkpoint(tmp_path):
    settings = dataclasses.replace(RUN, checkpoint_dir=str(tmp_path / "ckpt"))
    GinsengTrainer(MemoryDataset(), settings, epochs=1, silent=True)
    return settings, latest_checkpoint(tmp_path / "ckpt")


def _resume(settings):
    return GinsengTrainer(MemoryDataset(), settings, epochs=2, silent=True, resume=True)


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(one_checkpoint):
    settings, path = one_checkpoint
    data = path.read_bytes()
    for cut in (len(data) // 2, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"checkpoint '{path}' is (not a readable HDF5 file|corrupted or incomplete)"):
            _resume(settings)
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' is not a readable HDF5 file"):
        _resume(settings)


def test_corrupted_checkpoint_bytes_are_detected(one_checkpoint):
    settings, path = one_checkpoint
    with h5py.File(path, "r") as f:
        offset = f["params/head/W"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:  # flip one byte inside the head weights
        fh.seek(offset + 5)
        b = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' is corrupted or incomplete"):
        _resume(settings)


def test_checkpoint_with_missing_part_or_disagreeing_parts(one_checkpoint):
    settings, path = one_checkpoint
    with h5py.File(path, "r+") as f:
        del f["opt_state/v"]
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' is corrupted or incomplete: KeyError"):
        _resume(settings)
    GinsengTrainer(MemoryDataset(), dataclasses.replace(settings, checkpoint_dir=str(path.parent / "b")), epochs=1, silent=True)
    other = latest_checkpoint(path.parent / "b")
    with h5py.File(other, "r+") as f:
        f.attrs["global_step"] = 99
    with pytest.raises(ValueError, match=rf"'{other}' is corrupted or incomplete: its parts disagree"):
        read_checkpoint(other)


def test_unknown_version_and_other_format_are_refused(one_checkpoint):
    settings, path = one_checkpoint
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = CHECKPOINT_VERSION + 1
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' has format version 2; this ginseng reads version 1"):
        _resume(settings)
    with h5py.File(path, "r+") as f:
        f.attrs["format"] = "ginseng.model"
    with pytest.raises(ValueError, match=rf"'{path}' is not a ginseng checkpoint \(format 'ginseng.model', expected '{CHECKPOINT_FORMAT}'\)"):
        _resume(settings)


# ------------------------------------------------------------------------------------------
# fault injection in subprocesses
# ------------------------------------------------------------------------------------------


_JAX_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    # The workers of this module compile the same few programs: a persistent compilation cache
    # shared by them cuts each start from ~20 s to ~6 s here (the cached programs are the same,
    # so the results stay bit-identical to a fresh compile).
    _JAX_CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    _JAX_CACHE.clear()


def _spawn(store, out, ckpt, *, epochs, nproc=1, devices_per_process=4, extra=()):
    return spawn(
        store, out, epochs=epochs, nproc=nproc, devices_per_process=devices_per_process,
        extra=("--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--resume", *extra),
        jax_cache=_JAX_CACHE.get("dir"),
    )


class Lines:
    """Reads a subprocess's output line by line with a deadline (never blocks forever).

    Reads the raw pipe (os.read), not the buffered text wrapper, so that select() sees every byte;
    what it read is kept on ``proc.head`` for `_finish`.
    """

    def __init__(self, proc):
        self.proc, self.buf = proc, b""
        proc.head = getattr(proc, "head", "")

    def until(self, predicate, timeout=120.0):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode() + "\n"
                self.proc.head += line
                if predicate(line):
                    return line
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for the worker:\n" + self.proc.head[-3000:]
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"worker ended ({self.proc.poll()}) early:\n" + self.proc.head[-3000:]
                self.buf += chunk

    def close(self):
        self.proc.head += self.buf.decode()
        self.buf = b""


def _finish(procs, timeout=240):
    texts = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        texts.append(getattr(p, "head", "") + text)
    return [p.returncode for p in procs], texts


SP_EPOCHS = 3


@pytest.fixture(scope="module")
def sp_reference(store, tmp_path_factory):
    """The uninterrupted single-process run (4 devices, same settings and checkpointing)."""
    d = tmp_path_factory.mktemp("sp_ref")
    settings = GinsengTrainerSettings(
        hidden_dim=HIDDEN, batch_size=BATCH, rate=0.1, lam_max=0.3, lower=0, upper=4,
        checkpoint_dir=str(d / "ckpt"), checkpoint_every=2,
    )
    log, state = GinsengTrainer(store, settings, epochs=SP_EPOCHS, silent=True)
    return log, state


def _kill_at_random_step(store, out, ckpt, rng):
    (proc,) = _spawn(store, out, ckpt, epochs=SP_EPOCHS, extra=("--progress", "--step-delay", "0.02"))
    try:
        lines = Lines(proc)
        for _ in range(int(rng.integers(2, 14))):
            lines.until(lambda s: s.startswith("step"))
        time.sleep(float(rng.uniform(0.0, 0.03)))  # anywhere in a step, a save, or the sleep
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        kill_all([proc])
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"


def _kill_mid_save(store, out, ckpt):
    """Kill the run while its second checkpoint is half-written; return the first one's position."""
    (proc,) = _spawn(store, out, ckpt, epochs=SP_EPOCHS, extra=("--progress", "--slow-save", "30"))
    try:
        lines = Lines(proc)
        last_step = None

        def watch(line):
            nonlocal last_step
            if line.startswith("step"):
                last_step = line.split()[1:]
            return line.startswith("saving 1")

        lines.until(watch)
        first = (int(last_step[0]), int(last_step[1]) + 1)
        # The first save completes; the second pauses half-written: kill it there.
        lines.until(lambda s: s.startswith("saving 2"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        kill_all([proc])
    assert proc.returncode == -signal.SIGKILL
    return first


def test_sigkill_at_random_steps_and_mid_save_then_resume_is_bit_identical(store, tmp_path, sp_reference):
    log_ref, ref = sp_reference
    ckpt, out = tmp_path / "ckpt", tmp_path / "run.npz"
    rng = np.random.default_rng(20240611)
    steps = []
    for _ in range(3):
        _kill_at_random_step(store, out, ckpt, rng)
        steps.append(read_checkpoint(latest_checkpoint(ckpt))["global_step"] if latest_checkpoint(ckpt) else 0)
    assert steps == sorted(steps) and steps[-1] > 0, steps  # progress was kept across kills

    first = _kill_mid_save(store, out, ckpt)
    temps = list(ckpt.glob(".checkpoint*.tmp-*"))
    assert len(temps) == 1, sorted(p.name for p in ckpt.iterdir())  # older ones were cleaned up
    # The half-written file is refused with its name; the previous checkpoint is intact.
    with pytest.raises(ValueError, match=rf"checkpoint '{temps[0]}' is (corrupted or incomplete|not a readable HDF5)"):
        read_checkpoint(temps[0])
    rec = read_checkpoint(latest_checkpoint(ckpt))
    assert (rec["epoch"], rec["step_in_epoch"]) == first or (rec["epoch"], rec["step_in_epoch"]) == (first[0] + 1, 0)
    assert rec["global_step"] > steps[-1]

    codes, texts = _finish(_spawn(store, out, ckpt, epochs=SP_EPOCHS))
    assert codes == [0], texts[0][-3000:]
    _assert_same_npz(out, ref.params)
    pd.testing.assert_frame_equal(_read_exact_csv(f"{out}.csv"), log_ref.to_dataframe(), check_exact=True)
    assert not list(ckpt.glob(".checkpoint*.tmp-*"))  # the resumed run removed the stale temporary


def test_stop_requests_are_summed_over_all_devices():
    # The flag of one device (as if one process of several got SIGTERM) reaches every device.
    from test_train import SETTINGS, _batches, _pad

    from ginseng._core.mesh import global_arrays, make_mesh, replicate, to_host
    from ginseng.train.step import build_init, build_train_step

    mesh = make_mesh(jax.devices())
    params, opt = build_init(SETTINGS, mesh, 24, 3)(jax.random.key(0))
    key = jax.random.wrap_key_data(replicate(jax.random.key_data(jax.random.key(5)), mesh))
    step = build_train_step(SETTINGS, mesh, 10, stop_flag=True)
    plain = build_train_step(SETTINGS, mesh, 10)
    (x, y), = _batches(8, 1)
    arrays = global_arrays(_pad(x, y, 8), mesh, 8)
    for flags, want in (([0, 0, 0, 0], 0), ([0, 0, 1, 0], 1), ([1, 1, 1, 1], 4)):
        p, o = jax.tree.map(lambda a: a.copy(), (params, opt))
        m = replicate(np.zeros(2, np.float32), mesh)
        flag = global_arrays(_pad(np.zeros((4, 24), np.float32), np.asarray(flags, np.int32), 4), mesh, 4)[1]
        p, o, m, count = step(p, o, m, key, *arrays, flag)
        assert count.sharding.is_fully_replicated
        assert [int(s.data) for s in count.addressable_shards] == [want] * 4
    # The flag changes nothing else: the same params as the step without it.
    p2, _, _ = plain(*jax.tree.map(lambda a: a.copy(), (params, opt)), replicate(np.zeros(2, np.float32), mesh), key, *arrays)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(to_host(p)), jax.tree.leaves(to_host(p2))))


# 2 processes x 2 devices -----------------------------------------------------------------

MP_EPOCHS = 2


@pytest.fixture(scope="module")
def mp_reference(store, tmp_path_factory):
    """The uninterrupted 2 x 2 run (same settings and checkpointing): params npz and history csv."""
    d = tmp_path_factory.mktemp("mp_ref")
    procs = _spawn(store, d / "ref.npz", d / "ckpt", epochs=MP_EPOCHS, nproc=2, devices_per_process=2)
    try:
        codes, texts = _finish(procs)
    finally:
        kill_all(procs)
    assert codes == [0, 0], "\n".join(t[-2000:] for t in texts)
    return np.load(d / "ref.npz"), _read_exact_csv(f"{d / 'ref.npz'}.csv")


def _mp_resume_and_compare(store, out, ckpt, mp_reference):
    procs = _spawn(store, out, ckpt, epochs=MP_EPOCHS, nproc=2, devices_per_process=2)
    try:
        codes, texts = _finish(procs)
    finally:
        kill_all(procs)
    assert codes == [0, 0], "\n".join(t[-2000:] for t in texts)
    ref_params, ref_log = mp_reference
    got = np.load(out)
    assert sorted(got.files) == sorted(ref_params.files)
    for name in ref_params.files:
        assert np.array_equal(got[name], ref_params[name]), name
    pd.testing.assert_frame_equal(_read_exact_csv(f"{out}.csv"), ref_log, check_exact=True)


def _wait_steps(procs, n):
    lines = Lines(procs[0])
    for _ in range(n):
        lines.until(lambda s: s.startswith("step"))
    lines.close()


@pytest.mark.slow
def test_two_processes_sigkill_both_then_resume_is_bit_identical(store, tmp_path, mp_reference):
    ckpt, out = tmp_path / "ckpt", tmp_path / "run.npz"
    procs = _spawn(store, out, ckpt, epochs=MP_EPOCHS, nproc=2, devices_per_process=2,
                   extra=("--progress", "--step-delay", "0.03"))
    try:
        _wait_steps(procs, 9)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=20)
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
    assert read_checkpoint(latest_checkpoint(ckpt))["global_step"] >= 2
    _mp_resume_and_compare(store, out, ckpt, mp_reference)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_sigterm_to_one_process_stops_both_at_one_step(store, tmp_path, mp_reference, victim):
    ckpt, out = tmp_path / "ckpt", tmp_path / "run.npz"
    # 0.25 s a step: after the 5th of 28 steps the run has >5 s left, so the signal lands before
    # it ends even when a loaded machine delays this process (0.03 s failed once under load).
    procs = _spawn(store, out, ckpt, epochs=MP_EPOCHS, nproc=2, devices_per_process=2,
                   extra=("--progress", "--step-delay", "0.25"))
    try:
        _wait_steps(procs, 5)
        procs[victim].send_signal(signal.SIGTERM)
        codes, texts = _finish(procs, timeout=120)
    finally:
        kill_all(procs)
    assert codes == [PREEMPTED_EXIT_CODE] * 2, "\n".join(t[-2000:] for t in texts)
    # Both processes consumed the same batches, and the checkpoint sits right after the last one.
    last = [[ln.split() for ln in t.splitlines() if ln.startswith("step")][-1] for t in texts]
    assert last[0] == last[1], last
    rec = read_checkpoint(latest_checkpoint(ckpt))
    epoch, batch = int(last[0][1]), int(last[0][2])
    assert (rec["epoch"], rec["step_in_epoch"]) in {(epoch, batch + 1), (epoch + 1, 0)}
    _mp_resume_and_compare(store, out, ckpt, mp_reference)
