"""Worker for bench_side_by_side.py: reference ginseng 0.1.4, run in benchmarks/.venvs/ref.

Prints one JSON object on its last line. Not importable from the project's environment (it imports
the reference package, which has the same name as ours: that is why it runs in its own venv).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import anndata
import numpy as np


def loader(a):
    from ginseng.data import GinsengDataset

    work = Path(a.workdir) / "ref_ds"
    if work.exists():
        # The reference refuses an existing path; this is our own scratch folder.
        shutil.rmtree(work)
    adata = anndata.read_h5ad(a.h5ad)
    if a.cells and a.cells < adata.n_obs:
        adata = adata[: a.cells].copy()
    t0 = time.perf_counter()
    ds = GinsengDataset.create(work, adata, labels="cell_type")
    create_s = time.perf_counter() - t0
    ds.make_holdout(holdout_fraction=0.2, rng=np.random.default_rng(0))
    rng = np.random.default_rng(0)
    it = ds.iter_batches(a.batch_size, shuffle=True, rng=rng, split="train", balance_train=False)
    n = 0
    t0 = time.perf_counter()
    for x, y in it:
        x = np.asarray(x, dtype=np.float32)
        n += len(x)
        if time.perf_counter() - t0 > a.seconds:
            break
    dt = time.perf_counter() - t0
    return {
        "tool": "ginseng 0.1.4",
        "task": "loader",
        "cells": n,
        "seconds": dt,
        "cells_per_s": n / dt,
        "full_epoch": n >= len(ds.train_indices),
        "dataset_cells": int(ds.n_cells),
        "create_s": create_s,
    }


def ceiling(n_genes, n_classes, batch_size, n_steps=50):
    """The reference's jitted train step (as its GinsengTrainer builds it) alone on one in-memory
    batch: the compute ceiling of the reference's model code on this machine."""
    import jax
    import jax.numpy as jnp

    from ginseng.nn import nn_annotate_init, nn_annotate_loss
    from ginseng.opt import opt_adam_update, opt_init_adam
    from ginseng.train import GinsengTrainerSettings

    s = GinsengTrainerSettings(batch_size=batch_size, hidden_dim=256, balance_train=False)

    @jax.jit
    def step(params, opt_state, key, x, y):
        loss, grads = jax.value_and_grad(nn_annotate_loss)(
            params,
            key,
            x,
            y,
            dropout_rate=s.dropout_rate,
            normalize=s.normalize,
            target_sum=s.target_sum,
            training=True,
        )
        params, opt_state = opt_adam_update(
            grads, params, opt_state, lr=s.lr, eps=s.eps, betas=s.betas, weight_decay=s.weight_decay
        )
        return params, opt_state, loss

    key = jax.random.key(0)
    params = nn_annotate_init(key, n_genes=n_genes, n_classes=n_classes, hidden_dim=256)
    opt_state = opt_init_adam(params)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.poisson(0.5, (batch_size, n_genes)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, n_classes, batch_size).astype(np.int32))
    for _ in range(3):
        params, opt_state, loss = step(params, opt_state, key, x, y)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, sub, x, y)
    loss.block_until_ready()
    return n_steps * batch_size / (time.perf_counter() - t0)


def train(a):
    from ginseng import train as T
    from ginseng.data import GinsengDataset

    work = Path(a.workdir) / "ref_train_ds"
    if work.exists():
        shutil.rmtree(work)
    adata = anndata.read_h5ad(a.h5ad)
    if a.cells and a.cells < adata.n_obs:
        adata = adata[: a.cells].copy()
    GinsengDataset.create(work, adata, labels="cell_type")
    stamps = []
    orig = T.GinsengLogger.update

    def update(self, *args, **kw):  # time stamp at the end of each epoch (train + holdout eval)
        stamps.append(time.perf_counter())
        return orig(self, *args, **kw)

    T.GinsengLogger.update = update
    settings = T.GinsengTrainerSettings(
        batch_size=a.batch_size, hidden_dim=256, balance_train=False
    )
    t0 = time.perf_counter()
    logger, _ = T.GinsengTrainer(str(work), settings=settings, epochs=a.epochs, silent=True)
    wall = time.perf_counter() - t0
    ds = GinsengDataset(work)
    n_train = len(ds.train_indices)
    ceil = ceiling(ds.n_genes, ds.n_labels, a.batch_size)
    epoch_s = np.diff([t0] + stamps)
    steady = epoch_s[1:] if len(epoch_s) > 1 else epoch_s
    return {
        "tool": "ginseng 0.1.4",
        "task": "train",
        "train_cells": n_train,
        "epochs": a.epochs,
        "epoch_s": epoch_s.tolist(),
        "wall_s": wall,
        "cells_per_s": n_train / float(np.mean(steady)),
        "ceiling_cells_per_s": ceil,
        "holdout_accuracy": float(logger.holdout_accuracy[-1]),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["loader", "train"])
    p.add_argument("--h5ad", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--cells", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    res = loader(a) if a.task == "loader" else train(a)
    res["python"] = sys.version.split()[0]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
