"""Loader throughput: a shuffled epoch of GinsengDataset.iter_batches / loader, in cells/s.

Builds a synthetic store (negative-binomial counts around cell-type programs, varying library
sizes), then times one shuffled epoch of ``iter_batches(split="train")`` and of the loader alone,
and compares the per-batch label mix with iid sampling (mean total-variation distance of each
batch's label histogram from the global one).

    python benchmarks/bench_loader.py --cells 200000 --genes 2000 --batch 256
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import ginseng.data.sampler as gdata
from ginseng.data import GinsengDataset


def synthetic_counts(n_cells, n_genes, n_labels, seed=0, block=20000):
    """uint16 NB counts (~27 % non-zero at the defaults) and integer labels, generated in blocks."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n_cells)
    base = rng.gamma(0.35, 1.2, n_genes)
    program = np.ones((n_labels, n_genes))
    for k in range(n_labels):
        program[k, rng.choice(n_genes, n_genes // 10, replace=False)] = 5.0
    X = np.empty((n_cells, n_genes), dtype=np.uint16)
    for s in range(0, n_cells, block):
        e = min(n_cells, s + block)
        lib = rng.lognormal(0.0, 0.5, e - s)[:, None]
        mu = base[None, :] * program[labels[s:e]] * lib
        # NB(r=2) as a gamma-Poisson mixture: the same law, several times faster to sample.
        lam = mu * rng.standard_gamma(2.0, mu.shape) / 2.0
        X[s:e] = np.minimum(rng.poisson(lam), 65535)
    return X, labels


def mean_tv(label_batches, glob, n_labels):
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(y, minlength=n_labels) / len(y) - glob).sum()
                for y in label_batches
            ]
        )
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--labels", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument(
        "--chunk-rows", type=int, default=None, help="default: ginseng's automatic choice"
    )
    p.add_argument(
        "--window-rows", type=int, default=None, help="override the loader's shuffle window"
    )
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument(
        "--epochs", type=int, default=2, help="timed epochs (the first includes warm-up)"
    )
    p.add_argument("--path", default=None, help="store path (default: a temporary directory)")
    p.add_argument("--reuse", action="store_true", help="reuse an existing store at --path")
    args = p.parse_args(argv)

    if args.window_rows:
        gdata._WINDOW_ROWS = args.window_rows
    tmp = None
    if args.path is None:
        tmp = tempfile.mkdtemp(prefix="ginseng-bench-")
        path = Path(tmp) / "bench.zarr"
    else:
        path = Path(args.path)
    try:
        if args.reuse and path.exists():
            ds = GinsengDataset(path)
            print(f"reusing {path}")
        else:
            t = time.perf_counter()
            X, labels = synthetic_counts(args.cells, args.genes, args.labels)
            t_gen = time.perf_counter() - t
            print(
                f"generated {X.shape} uint16, {100 * np.count_nonzero(X) / X.size:.1f}% non-zero in {t_gen:.1f}s"
            )
            t = time.perf_counter()
            ds = GinsengDataset.create(
                path, X, labels, chunk_size=args.chunk_rows, overwrite=True, silent=True
            )
            t_create = time.perf_counter() - t
            del X
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            print(
                f"created in {t_create:.1f}s ({args.cells / t_create:,.0f} cells/s), "
                f"{size / 1e6:.0f} MB on disk, dtype {ds.root['X'].dtype}, chunk rows {ds.chunk_rows}"
            )
            ds.make_holdout(0.2, rng=0)
        print(f"dataset: {ds}")
        print(f"window rows {gdata._WINDOW_ROWS}, batch {args.batch}, prefetch {args.prefetch}")
        n_train = len(ds.train_indices)

        for epoch in range(args.epochs):
            t = time.perf_counter()
            ys = []
            for _x, y in ds.iter_batches(args.batch, shuffle=True, rng=epoch, split="train"):
                ys.append(y)
            dt = time.perf_counter() - t
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"iter_batches epoch {epoch}: {n_train / dt:,.0f} cells/s ({dt:.2f}s), max RSS {rss:.0f} MB"
            )

        ld = ds.loader(args.batch, split="train", seed=1, prefetch=args.prefetch)
        for epoch in range(args.epochs):
            t = time.perf_counter()
            for _b in ld.epoch(epoch):
                pass
            dt = time.perf_counter() - t
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"loader epoch {epoch}: {n_train / dt:,.0f} cells/s ({dt:.2f}s), max RSS {rss:.0f} MB"
            )

        t = time.perf_counter()
        plan = ld.plan(0)
        print(f"epoch plan: {time.perf_counter() - t:.3f}s for {plan.size} cells")

        lab = ds.labels[ds.train_indices]
        glob = np.bincount(lab, minlength=ds.n_labels) / lab.size
        got = mean_tv(ys, glob, ds.n_labels)
        rng = np.random.default_rng(0)
        iid = np.mean(
            [
                mean_tv(
                    np.array_split(
                        lab[rng.permutation(lab.size)], np.arange(args.batch, lab.size, args.batch)
                    ),
                    glob,
                    ds.n_labels,
                )
                for _ in range(5)
            ]
        )
        print(
            f"per-batch label mix, mean TV vs global: loader {got:.4f}, iid {iid:.4f} (ratio {got / iid:.3f})"
        )
        print(f"date {datetime.date.today()}, cores {os.cpu_count()}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
