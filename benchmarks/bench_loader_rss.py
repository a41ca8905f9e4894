"""Loader memory against dataset size: peak RSS of shuffled epochs over stores of different sizes.

For each store (built once from a synthetic h5ad by ``GinsengDataset.create``, streamed from the
backed file), a fresh interpreter opens it, makes a 20 % holdout and runs ``--epochs`` shuffled
epochs of ``loader(split="train")`` at batch 256, printing cells/s, the current RSS after each
epoch, and the peak RSS. The stores' index arrays (labels, order, splits: ~20 bytes a cell) are the
only part that should grow with the number of cells.

    python benchmarks/synth.py --cells 1000000 --out benchmarks/out/s1m.h5ad
    python benchmarks/bench_loader_rss.py benchmarks/out/side/synth_200000x2000_10t_s0.h5ad \\
        benchmarks/out/s1m.h5ad --workdir benchmarks/out/rss
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(store: str, epochs: int, batch: int) -> None:
    import numpy as np

    from ginseng.data import GinsengDataset

    base = rss_mb()
    ds = GinsengDataset(store)
    ds.make_holdout(0.2, rng=np.random.default_rng(0))
    opened = rss_mb()
    ld = ds.loader(batch, split="train", shuffle=True, seed=0)
    per_epoch = []
    for e in range(epochs):
        n, t0 = 0, time.perf_counter()
        for b in ld.epoch(e):
            n += int(b.mask.sum())
        per_epoch.append({"cells_per_s": n / (time.perf_counter() - t0), "rss_mb": rss_mb()})
    print(json.dumps({
        "store": store, "n_cells": int(ds.n_cells), "train_cells": len(ds.train_indices),
        "rss_after_imports_mb": base, "rss_after_open_mb": opened, "epochs": per_epoch,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_1m": os.getloadavg()[0],
    }))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("h5ad", nargs="*", help="synthetic h5ad files (synth.py), one store each")
    p.add_argument("--workdir", default="benchmarks/out/rss")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.epochs, a.batch)
        return 0
    import anndata

    from ginseng.data import GinsengDataset

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for h5ad in a.h5ad:
        store = work / (Path(h5ad).stem + ".ginseng")
        if not store.exists():
            t0 = time.perf_counter()
            GinsengDataset.create(store, anndata.read_h5ad(h5ad, backed="r"), labels="cell_type", silent=True)
            print(f"built {store} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(store), "--epochs", str(a.epochs), "--batch", str(a.batch)],
            capture_output=True, text=True, check=True,
        )
        print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
