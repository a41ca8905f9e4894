"""One process of a multi-process training run, started by tests/test_distributed.py.

Usage: python _mp_worker.py PROCESS_ID NUM_PROCESSES PORT STORE OUT EPOCHS BATCH_SIZE HIDDEN

The caller sets XLA_FLAGS (devices per process) and JAX_PLATFORMS=cpu. Process 0 writes the
trained params to OUT (.npz) and the per-epoch metrics to OUT + ".csv"; every process writes
OUT.<id>.started once connected, so the caller knows when training is under way.
"""

import sys
from pathlib import Path

import jax
import numpy as np

from ginseng import distributed
from ginseng.train import GinsengTrainer, GinsengTrainerSettings


def main() -> int:
    pid, nproc, port, store, out, epochs, batch_size, hidden = sys.argv[1:9]
    distributed.initialize(
        "local", coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc),
        process_id=int(pid), initialization_timeout=60,
    )
    Path(f"{out}.{pid}.started").write_text(f"{jax.device_count()} {jax.local_device_count()}\n")
    settings = GinsengTrainerSettings(
        hidden_dim=int(hidden), batch_size=int(batch_size), rate=0.1, lam_max=0.3, lower=0, upper=4
    )
    log, state = GinsengTrainer(store, settings, epochs=int(epochs), silent=True)
    if distributed.is_main_process():
        flat = {
            f"{layer}/{name}": value
            for layer, sub in state.params.items()
            for name, value in sub.items()
        }
        np.savez(out, **flat)
        log.save_csv(out + ".csv", overwrite=True)
    distributed.barrier("ginseng_worker_done")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
