"""One process of a two-process ``tasks.run`` (started by tests/test_distributed.py).

Usage: python _mp_tasks_worker.py PROCESS_ID PORT DIR [--late]

Trains on DIR/in.h5ad in the shared run directory DIR/run. With --late, process 1 starts the
task ~7 s after process 0 (a slow node), or 1 s after process 0 has built the dataset store: the
case in which it used to take the "reuse the store" branch on its own and skip process 0's
barrier.
"""

import os
import sys
import time
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv) -> int:
    pid, port, d = int(argv[0]), argv[1], Path(argv[2])
    from ginseng import distributed, tasks
    from ginseng.config import compose

    distributed.initialize(
        "local", coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
        initialization_timeout=60,
    )
    import jax

    jax.devices()  # the backends start together (a collective of its own)
    workdir = d / "run"
    if pid == 1 and "--late" in argv:
        # Before the fix, process 0 built the store alone within ~2 s; now it waits for process
        # 1 first, so the store never appears and process 1 goes on after the cap.
        deadline = time.monotonic() + 6.0
        while not (workdir / "dataset.zarr").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
    result = tasks.run(
        compose([
            f"data.path={d / 'in.h5ad'}", "genes.select=all", "trainer.epochs=1",
            "model.hidden_dim=4", "trainer.batch_size=16", "silent=true", "data.test_fraction=0.2",
        ]),
        workdir,
    )
    print(f"[{pid}] finished, model {result.files['model'].name}", flush=True)
    distributed.barrier("tasks-worker-done")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
