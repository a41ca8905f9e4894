"""Device data (issue 14): training and loading with the data on the device, in one process.

    python benchmarks/bench_device_data.py --cells 200000 --train-cells 50000 --workdir /tmp/dd

On the first device JAX sees (a GPU when there is one, else the CPU), per phase:

1. data      ``synth.py`` writes ``--cells`` x 2,000 counts to an h5ad; a GinsengDataset store is
             built from it opened backed (and a second one of the first ``--train-cells`` cells
             for the training phase, whose epochs take minutes on a CPU);
2. loading   one shuffled epoch of the training split at ``--batch``, every batch ending as a
             dense float32 array on the device, per path: ``host`` (BatchLoader gathers on the
             host, one transfer per batch), ``streamed`` (whole chunks per dispatch of
             ``--k`` batches, drawn on the device), ``resident`` (the store decoded once, then only
             row numbers: the decode is timed apart); and annbatch 0.3.1 with its zarrs codec
             pipeline (benchmarks/.venvs/annb, ``setup_envs.sh``) on the same h5ad and batch,
             densified to float32, in the same run;
3. training  the train step alone on a device-resident batch (the ceiling), then GinsengTrainer
             from the small store per ``device_data`` mode: one steady-state epoch (including its
             holdout evaluation) = time(epochs=2) - time(epochs=1), both after a warm-up call.

Results go to ``--json``; a table is printed. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ginseng._core.mesh import layout, make_mesh
from ginseng.data import GinsengDataset
from ginseng.train import GinsengTrainer, GinsengTrainerSettings
from ginseng.train import feed as F
from ginseng.train import step as S


def build(cells: int, workdir: Path, name: str) -> tuple[Path, Path]:
    import anndata

    h5ad, store = workdir / f"{name}.h5ad", workdir / f"{name}.zarr"
    if not h5ad.exists():
        subprocess.run([sys.executable, str(HERE / "synth.py"), "--cells", str(cells), "--out", str(h5ad)],
                       check=True)
    if not store.exists():
        GinsengDataset.create(store, anndata.read_h5ad(h5ad, backed="r"), "cell_type", silent=True)
    return h5ad, store


@jax.jit
def _dense(X, rows):
    """Every batch of a group as dense float32 on the device (what a step consumes)."""
    return jnp.where((rows >= 0)[..., None], jnp.take(X, jnp.maximum(rows, 0), axis=0, mode="clip"), 0).astype(
        jnp.float32)


def loading(store: Path, batch: int, k: int) -> dict:
    ds = GinsengDataset(store)
    ds.make_holdout(holdout_fraction=0.2, rng=np.random.default_rng(0))
    mesh = make_mesh(jax.devices()[:1])
    lay = layout(mesh)
    loader = ds.loader(batch, split="train", shuffle=True, dtype=None)
    out = {"train_cells": int(loader.epoch_size)}
    t0 = time.perf_counter()
    last = None
    for b in loader.epoch(0):
        last = jnp.asarray(b.x).astype(jnp.float32)
    jax.block_until_ready(last)
    out["host"] = loader.epoch_size / (time.perf_counter() - t0)
    groups = F.dispatch_groups(loader.num_batches, 0, k, None)
    for mode in ("streamed", "resident"):
        t0 = time.perf_counter()
        feed = F.ResidentFeed(ds, mesh, lay) if mode == "resident" else F.StreamedFeed(ds, mesh, lay)
        if mode == "resident":
            jax.block_until_ready(feed.X)
            out["resident_decode_s"] = time.perf_counter() - t0
        for epoch in (0, 1):  # epoch 0 compiles
            t0 = time.perf_counter()
            for X, _, rows in feed.groups(loader, epoch, groups, k):
                last = _dense(X, rows)
            jax.block_until_ready(last)
            out[mode] = loader.epoch_size / (time.perf_counter() - t0)
        out[f"{mode}_bytes"] = int(feed.nbytes)
    return out


def annbatch(h5ad: Path, workdir: Path, batch: int) -> dict | None:
    py = HERE / ".venvs" / "annb" / "bin" / "python"
    if not py.exists():
        return None
    res = subprocess.run([str(py), str(HERE / "_side_annbatch.py"), "--h5ad", str(h5ad), "--workdir", str(workdir),
                          "--batch-size", str(batch), "--seconds", "60"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def ceiling(settings: GinsengTrainerSettings, n_genes: int, n_classes: int, seconds: float = 6.0) -> float:
    mesh = make_mesh(jax.devices()[:1])
    step = S.build_train_step(settings, mesh, total_steps=1)
    params, opt = S.build_init(settings, mesh, n_genes, n_classes)(jax.random.key(0))
    rng = np.random.default_rng(0)
    b = settings.batch_size
    x = jax.device_put(rng.negative_binomial(2, 0.6, (b, n_genes)).astype(np.uint16))
    args = (jax.device_put(rng.integers(0, n_classes, b).astype(np.int32)), jax.device_put(np.arange(b, dtype=np.int32)),
            jax.device_put(np.ones(b, bool)))
    metrics, key = jax.device_put(np.zeros(2, np.float32)), jax.random.key(1)
    for _ in range(3):
        params, opt, metrics = step(params, opt, metrics, key, x, *args)
    jax.block_until_ready(metrics)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        params, opt, metrics = step(params, opt, metrics, key, x, *args)
        n += 1
        if n % 10 == 0:
            jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    return n * b / (time.perf_counter() - t0)


def training(store: Path, batch: int, k: int) -> dict:
    """Per mode: a steady-state epoch with its holdout evaluation (time(epochs=2) -
    time(epochs=1)), and the train steps alone (the second epoch's ``_train_epoch``, timed until
    its metrics are on the host)."""
    from ginseng.train import loop

    base = GinsengTrainerSettings(batch_size=batch, steps_per_dispatch=k)
    ds = GinsengDataset(store)
    out = {"ceiling": ceiling(base, ds.n_genes, ds.n_labels)}
    devices = jax.devices()[:1]
    epoch_times = []
    real = loop._train_epoch

    def timed(run, state, logger, epoch, first):
        t0 = time.perf_counter()
        state = real(run, state, logger, epoch, first)
        jax.block_until_ready(state.metrics)
        epoch_times.append(time.perf_counter() - t0)
        return state

    loop._train_epoch = timed
    try:
        for mode in ("resident", "streamed"):
            s = dataclasses.replace(base, device_data=mode)
            GinsengTrainer(store, s, epochs=1, silent=True, devices=devices)  # compile, warm up
            t = {}
            for epochs in (1, 2):
                epoch_times.clear()
                t0 = time.perf_counter()
                GinsengTrainer(store, s, epochs=epochs, silent=True, devices=devices)
                t[epochs] = time.perf_counter() - t0
            train_cells = len(GinsengDataset(store).train_indices)
            out[mode] = train_cells / (t[2] - t[1])
            out[f"{mode}_of_ceiling"] = out[mode] / out["ceiling"]
            out[f"{mode}_steps_only"] = train_cells / epoch_times[-1]
            out[f"{mode}_steps_only_of_ceiling"] = out[f"{mode}_steps_only"] / out["ceiling"]
    finally:
        loop._train_epoch = real
    out["ceiling_after"] = ceiling(base, ds.n_genes, ds.n_labels)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--train-cells", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=8, help="steps (batches) per dispatch")
    p.add_argument("--workdir", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=["loading", "annbatch", "training"])
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    res = {"device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(a)}
    h5ad, store = build(a.cells, work, f"synth{a.cells}")
    if "loading" not in a.skip:
        res["loading"] = loading(store, a.batch, a.k)
        print(json.dumps(res["loading"]), flush=True)
    if "annbatch" not in a.skip:
        res["annbatch"] = annbatch(h5ad, work, a.batch)
        print(json.dumps(res["annbatch"]), flush=True)
    if "training" not in a.skip:
        _, small = build(a.train_cells, work, f"synth{a.train_cells}")
        res["training"] = training(small, a.batch, a.k)
        print(json.dumps(res["training"]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    ld, ab = res.get("loading"), res.get("annbatch")
    if ld and ab and "cells_per_s" in ab:
        for mode in ("host", "streamed", "resident"):
            print(f"{mode}: {ld[mode]:,.0f} cells/s = {ld[mode] / ab['cells_per_s']:.2f}x annbatch ({ab['cells_per_s']:,.0f})")


if __name__ == "__main__":
    main()
