"""One training process, started by tests/test_distributed.py and tests/test_checkpoint.py.

Usage: python _mp_worker.py --store STORE --out OUT [--process-id P --num-processes N --port PORT]
       [--epochs E --batch-size B --hidden H] [--checkpoint-dir DIR --checkpoint-every K --resume]
       [--progress] [--step-delay S] [--slow-save S] [--raise-in P]

The caller sets XLA_FLAGS (devices per process) and JAX_PLATFORMS=cpu. With --num-processes 1 the
process trains alone on its local devices (no jax.distributed). Process 0 writes the trained params
to OUT (.npz) and the per-epoch metrics to OUT + ".csv"; every process writes OUT.<id>.started once
connected, so the caller knows when training is under way.

Fault-injection hooks (test only, nothing in ginseng itself): --progress makes every process print
"step EPOCH BATCH" before each training step, --step-delay sleeps that long per step so that a
kill lands at a chosen step, and --slow-save makes every checkpoint save print "saving N" and,
from the second save on, sleep half-way through writing the file (after the params, before the
optimizer state), so that a kill lands mid-write while a complete checkpoint exists. --raise-in P
makes process P raise an exception after training while the others go on to a barrier.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

import ginseng.train.checkpoint as C
from ginseng import distributed
from ginseng.train import GinsengTrainer, GinsengTrainerSettings


def _args(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--slow-save", type=float, default=0.0)
    ap.add_argument("--raise-in", type=int, default=None)
    ap.add_argument("--device-data", default="auto")
    ap.add_argument("--steps-per-dispatch", type=int, default=8)
    return ap.parse_args(argv)


def settings_for(args) -> GinsengTrainerSettings:
    return GinsengTrainerSettings(
        hidden_dim=args.hidden, batch_size=args.batch_size, rate=0.1, lam_max=0.3, lower=0, upper=4,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        device_data=args.device_data, steps_per_dispatch=args.steps_per_dispatch,
    )


def _hook_feeds(progress: bool, delay: float) -> None:
    """Print "step <epoch> <batch>" (and sleep) for every training batch as its dispatch is sent."""
    from ginseng.train import feed as F

    for cls in (F.ResidentFeed, F.StreamedFeed):
        def groups(self, loader, epoch, groups, k, _original=cls.groups):
            for g, item in zip(groups, _original(self, loader, epoch, groups, k), strict=True):
                if loader.split == "train":
                    for b in g:
                        if progress:
                            print(f"step {epoch} {b}", flush=True)
                        if delay:
                            time.sleep(delay)
                yield item

        cls.groups = groups


def _slow_saves(seconds: float) -> None:
    original = C.write_tree
    saves = []

    def write_tree(group, tree):
        original(group, tree)
        if group.name == "/params":
            saves.append(1)
            group.file.flush()  # the partial file is on disk when the kill comes
            print(f"saving {len(saves)}", flush=True)
            if len(saves) > 1:  # the first save completes: there is a checkpoint to keep
                time.sleep(seconds)

    C.write_tree = write_tree


def main(argv) -> int:
    args = _args(argv)
    if args.num_processes > 1:
        distributed.initialize(
            "local", coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
            process_id=args.process_id, initialization_timeout=60,
        )
    pid = args.process_id
    Path(f"{args.out}.{pid}.started").write_text(f"{jax.device_count()} {jax.local_device_count()}\n")
    if args.slow_save:
        _slow_saves(args.slow_save)
    store = args.store
    if args.progress or args.step_delay:
        _hook_feeds(args.progress, args.step_delay)
    log, state = GinsengTrainer(
        store, settings_for(args), epochs=args.epochs, silent=True, resume=args.resume
    )
    if args.raise_in == pid:  # e.g. a process-0-only write failing (disk full) after training
        msg = f"injected failure in process {pid} after training"
        raise OSError(msg)
    if distributed.is_main_process():
        flat = {
            f"{layer}/{name}": value
            for layer, sub in state.params.items()
            for name, value in sub.items()
        }
        np.savez(args.out, **flat)
        log.save_csv(args.out + ".csv", overwrite=True)
    distributed.barrier("ginseng_worker_done")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
