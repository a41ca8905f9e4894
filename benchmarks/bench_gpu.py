"""One accelerator, end to end: where the time of training from disk goes.

    python benchmarks/bench_gpu.py --cells 400000 --workdir /tmp/gpu --json gpu.json

In one process, on the first device JAX sees (a GPU when there is one; the CPU otherwise, which
is how this script is checked before a GPU run):

1. ceiling   the jitted train step alone on a batch already on the device, per batch size, and at
             batch 1,024 under each matmul precision (default, tensorfloat32, highest): cells/s,
             ms per step and the model FLOP rate it reaches;
2. data      ``synth.py`` writes ``--cells`` x 2,000 synthetic counts to an h5ad (all cores), and
             ``GinsengDataset.create`` builds the store from it opened backed (timed);
3. loader    shuffled ``loader(split="train")`` epochs alone, per spec BATCH:DTYPE[:WORKERS]
             (DTYPE float32 or stored; WORKERS assembly threads, or auto), with minor page faults
             per cell;
4. transfer  the same epochs, each batch also copied to the device as the trainer does it;
5. train     ``GinsengTrainer`` from the store per spec BATCH:DTYPE[:WORKERS] for 3 epochs;
             steady-state epochs, with and without the holdout evaluation, against the ceiling
             measured in the same process, with the CPU time it used (cores busy = CPU seconds /
             wall seconds).

The results go to ``--json`` after every phase (a run stopped early keeps what it measured) and
a table is printed last. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _side_ours import timed_train

from ginseng import train as T
from ginseng._core.mesh import global_arrays
from ginseng.data import GinsengDataset

N_GENES, N_TYPES, HIDDEN = 2000, 10, 256


def flops_per_cell(n_genes=N_GENES, hidden=HIDDEN, n_classes=N_TYPES) -> float:
    """Training FLOPs per cell (as bench_scaling.py): forward matmuls x 3."""
    return 3 * 2 * (2 * n_genes * n_genes + 2 * n_genes * hidden + n_genes * n_classes)


def log(msg):
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env_info() -> dict:
    dev = jax.devices()[0]
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": getattr(dev, "device_kind", ""),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    return info


def step_ceiling(batch, n_classes=N_TYPES, min_seconds=1.0, precision=None, x_dtype=np.float32):
    """The train step alone on one device-resident batch: median of 3 timed blocks."""
    settings = T.GinsengTrainerSettings(batch_size=batch, hidden_dim=HIDDEN, balance_train=False)
    mesh = T.make_mesh(jax.devices()[:1])
    ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with ctx:
        step = T.step.build_train_step(settings, mesh, total_steps=1)
        params, opt = T.step.build_init(settings, mesh, N_GENES, n_classes)(jax.random.key(0))
        rng = np.random.default_rng(0)
        x = jax.device_put(rng.negative_binomial(2, 0.6, (batch, N_GENES)).astype(x_dtype))
        y = jax.device_put(rng.integers(0, n_classes, batch).astype(np.int32))
        slot = jax.device_put(np.arange(batch, dtype=np.int32))
        mask = jax.device_put(np.ones(batch, bool))
        metrics = jax.device_put(np.zeros(2, np.float32))
        key = jax.random.key(1)
        t0 = time.perf_counter()
        params, opt, metrics = step(params, opt, metrics, key, x, y, slot, mask)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        for _ in range(5):  # warm up (the first runs after compiling can be slow)
            params, opt, metrics = step(params, opt, metrics, key, x, y, slot, mask)
        jax.block_until_ready(metrics)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.2 * min_seconds:  # size the blocks
            for _ in range(10):
                params, opt, metrics = step(params, opt, metrics, key, x, y, slot, mask)
            jax.block_until_ready(metrics)
            n += 10
        per = (time.perf_counter() - t0) / n
        steps = max(10, int(min_seconds / 3 / per))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(steps):
                params, opt, metrics = step(params, opt, metrics, key, x, y, slot, mask)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - t0) / steps)
    t = float(np.median(times))
    return {
        "batch": batch, "precision": precision or "default", "x_dtype": np.dtype(x_dtype).name,
        "compile_s": compile_s, "steps_per_block": steps, "ms_per_step": 1e3 * t,
        "ms_per_step_blocks": [1e3 * v for v in times], "cells_per_s": batch / t,
        "tflops": flops_per_cell() * batch / t / 1e12,
    }


def make_data(a) -> tuple[GinsengDataset, dict]:
    import anndata

    h5ad = Path(a.workdir) / f"synth_{a.cells}.h5ad"
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("synth.py")), "--cells", str(a.cells),
         "--genes", str(N_GENES), "--types", str(N_TYPES), "--workers", str(a.workers),
         "--out", str(h5ad), "--overwrite"],
        check=True, stdout=subprocess.DEVNULL,
    )
    synth_s = time.perf_counter() - t0
    adata = anndata.read_h5ad(h5ad, backed="r")
    t0 = time.perf_counter()
    ds = GinsengDataset.create(
        Path(a.workdir) / "ds.zarr", adata, labels="cell_type", overwrite=True, silent=True
    )
    create_s = time.perf_counter() - t0
    ds.make_holdout(holdout_fraction=0.2, rng=np.random.default_rng(0))
    info = {
        "cells": int(ds.n_cells), "genes": int(ds.n_genes), "train_cells": len(ds.train_indices),
        "stored_dtype": ds._X.dtype.numpy_dtype.name, "chunk_rows": int(ds.chunk_rows),
        "synth_s": synth_s, "create_s": create_s, "create_cells_per_s": ds.n_cells / create_s,
        "store_mb": sum(f.stat().st_size for f in (Path(a.workdir) / "ds.zarr").rglob("*") if f.is_file()) / 1e6,
    }
    return ds, info


def parse_spec(spec: str) -> dict:
    """BATCH:DTYPE[:WORKERS] -> its parts (DTYPE: stored or a numpy dtype name)."""
    parts = spec.split(":")
    workers = parts[2] if len(parts) > 2 else "auto"
    return {
        "batch": int(parts[0]),
        "dtype": None if parts[1] == "stored" else np.dtype(parts[1]),
        "workers": None if workers == "auto" else int(workers),
        "spec": spec,
    }


def loader_epochs(ds, spec, epochs, transfer):
    """Shuffled train epochs: cells/s per epoch (and the device copy with ``transfer``)."""
    ld = ds.loader(spec["batch"], split="train", shuffle=True, seed=0, dtype=spec["dtype"],
                   workers=spec["workers"])
    mesh = T.make_mesh(jax.devices()[:1])
    rates = []
    for e in range(epochs):
        c0, t0 = os.times(), time.perf_counter()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        n, last = 0, None
        for b in ld.epoch(e):
            n += int(b.mask.sum())
            if transfer:
                last = global_arrays(b, mesh, ld.global_batch)
        if last is not None:
            jax.block_until_ready(last)
        wall = time.perf_counter() - t0
        c1 = os.times()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        rates.append({"cells_per_s": n / wall, "cores_busy": _cpu(c0, c1) / wall,
                      "minor_faults_per_cell": faults / max(n, 1)})
    return {"spec": spec["spec"], "workers": ld.workers, "transfer": transfer, "epochs": rates}


def attempt(results: list, what: str, fn, *args, **kw):
    """Run one measurement; an exception is recorded (and printed), not fatal to the others."""
    try:
        r = fn(*args, **kw)
    except Exception as err:  # noqa: BLE001 - a benchmark run keeps going past one failure
        r = {"what": what, "error": f"{type(err).__name__}: {err}"}
    results.append(r)
    log(f"{what}: {r}")
    return r


def rows_failed(res) -> list:
    return [r for k in ("ceiling", "loader", "train") for r in res.get(k, []) if "error" in r]


def _cpu(c0, c1) -> float:
    return (c1.user - c0.user) + (c1.system - c0.system)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=400_000)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="synth.py workers")
    ap.add_argument("--ceiling-batches", type=int, nargs="*", default=[256, 1024, 4096])
    ap.add_argument("--precisions", nargs="*", default=["tensorfloat32", "highest"],
                    help="matmul precisions also timed at batch 1,024")
    ap.add_argument("--loader", nargs="*",
                    default=["1024:float32", "1024:stored", "4096:float32", "4096:stored"],
                    help="loader runs, BATCH:DTYPE[:WORKERS] (see the module docstring)")
    ap.add_argument("--train", nargs="*",
                    default=["1024:stored", "1024:float32", "4096:stored", "128:stored"],
                    help="trainer runs, BATCH:DTYPE[:WORKERS] (DTYPE: what is sent to the device)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="timed seconds per ceiling")
    a = ap.parse_args(argv)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    res = {"env": env_info(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}

    def save():
        Path(a.json).write_text(json.dumps(res, indent=1))

    log(f"env: {res['env']}")
    save()
    res["ceiling"] = []
    for b in a.ceiling_batches:
        attempt(res["ceiling"], "ceiling", step_ceiling, b, min_seconds=a.min_seconds)
        save()
    if a.ceiling_batches:
        attempt(res["ceiling"], "ceiling", step_ceiling, 1024, min_seconds=a.min_seconds, x_dtype=np.uint16)
    for prec in a.precisions:
        attempt(res["ceiling"], "ceiling", step_ceiling, 1024, min_seconds=a.min_seconds, precision=prec)
        save()

    ds, res["data"] = make_data(a)
    log(f"data: {res['data']}")
    save()

    res["loader"] = []
    for spec in map(parse_spec, a.loader):
        for transfer in (False, True):
            attempt(res["loader"], "loader", loader_epochs, ds, spec, 2, transfer)
            save()

    res["train"] = []

    def train_run(spec):
        b = spec["batch"]
        settings = T.GinsengTrainerSettings(batch_size=b, hidden_dim=HIDDEN, balance_train=False)
        c0, t0 = os.times(), time.perf_counter()
        r = timed_train(ds, settings, a.epochs if b >= 512 else 2,
                        ceiling_steps=max(50, 200_000 // b), x_dtype=spec["dtype"],
                        loader_kw={"workers": spec["workers"]})
        r["cores_busy"] = _cpu(c0, os.times()) / (time.perf_counter() - t0)
        r["spec"] = spec["spec"]
        return r

    for spec in map(parse_spec, a.train):
        attempt(res["train"], "train", train_run, spec)
        save()

    print("\n| measure | batch | variant | cells/s | note |\n| --- | ---: | --- | ---: | --- |")
    ok = lambda rows: [r for r in rows if "error" not in r]
    for r in rows_failed(res):
        print(f"| FAILED: {r['what']} | | | | {r['error'][:200]} |")
    for c in ok(res["ceiling"]):
        print(f"| step alone (device-resident batch) | {c['batch']} | {c['precision']}, x {c['x_dtype']} "
              f"| {c['cells_per_s']:,.0f} | {c['ms_per_step']:.3f} ms/step, {c['tflops']:.1f} TFLOP/s |")
    d = res["data"]
    print(f"| dataset creation (backed h5ad -> store) | | {d['cells']:,} cells, {d['store_mb']:.0f} MB "
          f"| {d['create_cells_per_s']:,.0f} | synth {d['synth_s']:.1f} s, create {d['create_s']:.1f} s |")
    for r in ok(res["loader"]):
        e = r["epochs"][-1]
        rates = ", ".join(f"{x['cells_per_s']:,.0f}" for x in r["epochs"])
        print(f"| loader{' + device copy' if r['transfer'] else ' alone'} | {r['spec']} | "
              f"{r['workers']} workers | {e['cells_per_s']:,.0f} | epochs {rates}; cores busy "
              f"{e['cores_busy']:.1f}; {e['minor_faults_per_cell']:.2f} faults/cell |")
    for r in ok(res["train"]):
        print(f"| GinsengTrainer from disk | {r['spec']} | x {r['x_dtype']} | {r['cells_per_s']:,.0f} "
              f"| {100 * r['fraction_of_ceiling']:.0f} % of ceiling ({r['train_only_cells_per_s']:,.0f} "
              f"cells/s = {100 * r['train_only_fraction_of_ceiling']:.0f} % without holdout eval); "
              f"cores busy {r['cores_busy']:.1f}; acc {r['holdout_accuracy']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
