"""Worker for bench_side_by_side.py: this repository's ginseng, run in the project's interpreter.

Tasks:
  loader  shuffled ``iter_batches`` (split "train") and ``loader()`` epochs from a disk-backed
          GinsengDataset built from the h5ad; cells/s per epoch.
  train   GinsengTrainer from the disk-backed dataset (steady-state epochs: train + holdout eval),
          and, in the same process, the jitted train step alone on one in-memory batch (the compute
          ceiling of this machine for this model).
Prints one JSON object on its last line.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import anndata
import jax
import numpy as np

from ginseng import train as T
from ginseng.data import GinsengDataset


def build(a, name):
    path = Path(a.workdir) / name
    adata = anndata.read_h5ad(a.h5ad, backed="r")
    if a.cells and a.cells < adata.n_obs:
        adata = adata[: a.cells].to_memory()
    t0 = time.perf_counter()
    ds = GinsengDataset.create(path, adata, labels="cell_type", overwrite=True, silent=True)
    return ds, time.perf_counter() - t0


def loader(a):
    ds, create_s = build(a, "ours_ds")
    ds.make_holdout(holdout_fraction=0.2, rng=np.random.default_rng(0))
    n_train = len(ds.train_indices)
    res = {
        "tool": "ginseng (ours)",
        "task": "loader",
        "dataset_cells": int(ds.n_cells),
        "train_cells": n_train,
        "create_s": create_s,
        "chunk_rows": int(ds.chunk_rows),
    }
    rng = np.random.default_rng(0)
    iter_rates = []
    for _ in range(a.repeats):
        n = 0
        t0 = time.perf_counter()
        for x, y in ds.iter_batches(a.batch_size, shuffle=True, rng=rng, split="train"):
            n += len(x)
        iter_rates.append(n / (time.perf_counter() - t0))
    ld = ds.loader(a.batch_size, split="train", shuffle=True, seed=0)
    loader_rates = []
    for e in range(a.repeats):
        n = 0
        t0 = time.perf_counter()
        for b in ld.epoch(e):
            n += int(b.mask.sum())
        loader_rates.append(n / (time.perf_counter() - t0))
    res.update(
        iter_batches_cells_per_s=iter_rates,
        loader_cells_per_s=loader_rates,
        cells_per_s=float(np.median(iter_rates)),
    )
    return res


def ceiling(settings, ds, n_steps):
    """The jitted train step alone, fed the same in-memory device batch every step."""
    mesh = T.make_mesh()
    step = T.step.build_train_step(settings, mesh, total_steps=n_steps + 3)
    params, opt_state = T.step.build_init(settings, mesh, ds.n_genes, ds.n_labels)(jax.random.key(0))
    key = jax.random.key(1)
    bs = settings.batch_size
    idx = np.asarray(ds.train_indices[:bs])
    x = jax.device_put(np.asarray(ds.get_batch(idx), np.float32))
    y = jax.device_put(np.asarray(ds.labels[idx], np.int32))
    slot = jax.device_put(np.arange(bs, dtype=np.int32))
    mask = jax.device_put(np.ones(bs, bool))
    metrics = jax.device_put(np.zeros(2, np.float32))
    for _ in range(3):  # compile + warm up
        params, opt_state, metrics = step(params, opt_state, metrics, key, x, y, slot, mask)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        params, opt_state, metrics = step(params, opt_state, metrics, key, x, y, slot, mask)
    jax.block_until_ready(metrics)
    return n_steps * bs / (time.perf_counter() - t0)


def timed_train(ds, settings, epochs, ceiling_steps, x_dtype=None, loader_kw=None):
    """GinsengTrainer on ``ds`` with per-epoch time stamps, and the step ceiling before and after.

    ``x_dtype`` forces the loader's batch dtype (e.g. float32, what the trainer shipped before it
    sent the stored counts); None leaves the trainer's own choice. ``loader_kw`` adds loader
    arguments (e.g. ``workers``).
    """
    ceil_before = ceiling(settings, ds, ceiling_steps)
    stamps = []
    orig = T.GinsengLogger.update

    def update(self, *args, **kw):  # time stamp at the end of each epoch (train + holdout eval)
        stamps.append(time.perf_counter())
        return orig(self, *args, **kw)

    # Time stamp when the holdout evaluation of each epoch starts: the trainer fetches the epoch's
    # train metrics (so every train step has finished) just before it asks for the holdout batches.
    eval_starts = []
    orig_loader = GinsengDataset.loader

    def loader_(self, *args, **kw):
        if x_dtype is not None:
            kw["dtype"] = x_dtype
        kw.update(loader_kw or {})
        ld = orig_loader(self, *args, **kw)
        if kw.get("split") == "holdout":
            orig_epoch = ld.epoch

            def epoch(*e_args, **e_kw):
                eval_starts.append(time.perf_counter())
                return orig_epoch(*e_args, **e_kw)

            ld.epoch = epoch
        return ld

    T.GinsengLogger.update = update
    GinsengDataset.loader = loader_
    try:
        t0 = time.perf_counter()
        logger, _ = T.GinsengTrainer(ds, settings=settings, epochs=epochs, silent=True)
        wall = time.perf_counter() - t0
    finally:
        T.GinsengLogger.update = orig
        GinsengDataset.loader = orig_loader
    ceil_after = ceiling(settings, ds, ceiling_steps)
    n_train = len(ds.train_indices)
    epoch_s = np.diff([t0] + stamps)
    steady = epoch_s[1:] if len(epoch_s) > 1 else epoch_s
    rate = n_train / float(np.mean(steady))
    # Training steps alone (loader + steps, through the epoch's final fetch), without the holdout
    # evaluation: from the end of the previous epoch to the start of this epoch's evaluation.
    train_s = np.asarray(eval_starts) - np.asarray([t0] + stamps[:-1])
    train_steady = train_s[1:] if len(train_s) > 1 else train_s
    train_rate = n_train / float(np.mean(train_steady))
    ceil = float(np.mean([ceil_before, ceil_after]))
    return {
        "tool": "ginseng (ours)",
        "task": "train",
        "batch_size": settings.batch_size,
        "x_dtype": "stored" if x_dtype is None else np.dtype(x_dtype).name,
        "train_cells": n_train,
        "epochs": epochs,
        "epoch_s": epoch_s.tolist(),
        "wall_s": wall,
        "cells_per_s": rate,
        "train_only_s": train_s.tolist(),
        "train_only_cells_per_s": train_rate,
        "ceiling_cells_per_s": [ceil_before, ceil_after],
        "fraction_of_ceiling": rate / ceil,
        "train_only_fraction_of_ceiling": train_rate / ceil,
        "holdout_accuracy": float(logger.holdout_accuracy[-1]),
        "devices": [str(d) for d in jax.devices()],
    }


def train(a):
    ds, create_s = build(a, "ours_train_ds")
    settings = T.GinsengTrainerSettings(
        batch_size=a.batch_size, hidden_dim=256, balance_train=False
    )
    res = timed_train(ds, settings, a.epochs, a.ceiling_steps)
    res["create_s"] = create_s
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["loader", "train"])
    p.add_argument("--h5ad", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--cells", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ceiling-steps", type=int, default=100)
    a = p.parse_args()
    res = loader(a) if a.task == "loader" else train(a)
    res["python"] = sys.version.split()[0]
    res["jax"] = jax.__version__
    res["loadavg_1m"] = os.getloadavg()[0]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
