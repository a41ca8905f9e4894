"""Worker for bench_side_by_side.py: annbatch 0.3.1, run in benchmarks/.venvs/annb.

Pre-shuffles the h5ad into annbatch's sharded zarr collection (its recommended layout), then times a
shuffled epoch of its Loader, densifying every batch to float32 (what a model step consumes).
Prints one JSON object on its last line.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import zarr
from annbatch import DatasetCollection, Loader


def load_x_and_label(g):
    # Only X and the label column, as annbatch's README recommends (all obs columns are yielded).
    return ad.AnnData(X=ad.io.sparse_dataset(g["X"]), obs=ad.io.read_elem(g["obs"])[["cell_type"]])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--h5ad", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=None, help="annbatch default 512")
    p.add_argument("--preload-nchunks", type=int, default=None, help="annbatch default 32")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument(
        "--no-zarrs",
        action="store_true",
        help="use zarr-python's default codec pipeline instead of zarrs",
    )
    a = p.parse_args()
    if not a.no_zarrs:
        # annbatch's README: the zarrs pipeline "is necessary for local filesystem performance".
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})

    out = Path(a.workdir) / "annb_collection.zarr"
    if out.exists():
        shutil.rmtree(out)  # our own scratch folder from a previous run
    t0 = time.perf_counter()
    coll = DatasetCollection(out)
    coll.add_adatas([a.h5ad], shuffle=True, rng=np.random.default_rng(0))
    create_s = time.perf_counter() - t0

    with ad.settings.override(remove_unused_categories=False):
        loader = Loader(
            batch_size=a.batch_size,
            chunk_size=a.chunk_size,
            preload_nchunks=a.preload_nchunks,
            shuffle=True,
            rng=np.random.default_rng(0),
            preload_to_gpu=False,
        ).use_collection(coll, load_adata=load_x_and_label)
    n_obs = loader.n_obs
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        x = batch["X"]
        x = (
            x.toarray().astype(np.float32, copy=False)
            if hasattr(x, "toarray")
            else np.asarray(x, np.float32)
        )
        y = batch["obs"]["cell_type"].cat.codes.to_numpy()
        assert x.shape[0] == y.shape[0]
        n += x.shape[0]
        if time.perf_counter() - t0 > a.seconds:
            break
    dt = time.perf_counter() - t0
    res = {
        "tool": "annbatch 0.3.1",
        "task": "loader",
        "cells": n,
        "seconds": dt,
        "cells_per_s": n / dt,
        "full_epoch": n >= n_obs,
        "dataset_cells": int(n_obs),
        "create_s": create_s,
        "chunk_size": a.chunk_size or 512,
        "preload_nchunks": a.preload_nchunks or 32,
        "codec_pipeline": "zarr-python" if a.no_zarrs else "zarrs",
        "python": sys.version.split()[0],
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
