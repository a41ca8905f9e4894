"""Preemption: SIGTERM/SIGUSR1 make every process checkpoint at the same step and exit.

A stop request travels with a dispatch (a step read batch by batch sums one flag per device in its
gradient all-reduce; a dispatch of ``steps_per_dispatch`` steps sums them once), and each sum is
read ``STOP_LAG`` dispatches later, so reading it never stalls the device queue; the checkpoint
is therefore written at most ``STOP_LAG`` dispatches (or one epoch end) after the signal. Every
process reads the same sums at the same step, so all of them stop together.
"""

from __future__ import annotations

import collections
import signal
import threading

import jax
import numpy as np

from ginseng._core.mesh import global_rows, to_host

__all__ = ["PREEMPTED_EXIT_CODE", "STOP_LAG", "StopSignal", "StopWatch", "exit_preempted"]

# Exit status after SIGTERM/SIGUSR1 made the trainer write a checkpoint and stop (75 = EX_TEMPFAIL,
# "try again later"): a SLURM script can requeue the job on this code and resume with resume=True.
PREEMPTED_EXIT_CODE = 75
STOP_LAG = 2


class StopSignal:
    """Records SIGTERM/SIGUSR1 so that the loop can checkpoint at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, active: bool):
        self.received: int | None = None
        self._old: dict = {}
        self.active = active and threading.current_thread() is threading.main_thread()

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self):
        if self.active:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class StopWatch:
    """This process's stop flag for each step, and the all-reduced counts read ``STOP_LAG`` late."""

    def __init__(self, signal_: StopSignal, mesh, local_devices: int):
        self.signal = signal_
        # One entry per local device, built once (never donated): [not asked, asked].
        self._flags = [
            global_rows(np.full(local_devices, v, np.int32), mesh, mesh.devices.size) for v in (0, 1)
        ]
        self._pending: collections.deque = collections.deque()

    def flag(self):
        """The flag array to pass to the next step."""
        return self._flags[self.signal.received is not None]

    def record(self, stop_count) -> bool:
        """Keep a step's all-reduced count; True once a count ``STOP_LAG`` steps old says stop."""
        self._pending.append(stop_count)
        if len(self._pending) > STOP_LAG:
            return int(to_host(self._pending.popleft())) > 0
        return False

    def drain(self) -> bool:
        """At an epoch's end (the device is idle): whether any count not yet read says stop."""
        stop = any(int(to_host(c)) > 0 for c in self._pending)
        self._pending.clear()
        return stop


def exit_preempted(written, epoch: int, batch: int, received: int | None, verbose: bool):
    """After the preemption checkpoint: wait for every process, say so, exit with code 75."""
    if jax.process_count() > 1:
        from ginseng import distributed

        distributed.barrier("ginseng_preempted")  # nobody exits before the file is in place
    if verbose:
        why = signal.Signals(received).name if received is not None else "another process's signal"
        print(
            f"[ginseng] {why}: checkpoint written to {str(written)!r} at "
            f"epoch {epoch + 1}, step {batch}; exiting with code {PREEMPTED_EXIT_CODE} "
            "(resume=True continues)",
            flush=True,
        )
    raise SystemExit(PREEMPTED_EXIT_CODE)
