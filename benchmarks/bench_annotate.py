"""Atlas-scale annotation benchmark: memory and throughput of ``annotate(path, output=...)``.

For every size (default 100,000 and 1,000,000 cells x 2,000 genes) it writes a synthetic backed
h5ad out of core (CSR, row blocks appended to resizable HDF5 datasets in the anndata layout), then
runs, each in a fresh subprocess:

- ``annotate(model.h5, cells.h5ad, backed=True, output=out.parquet)`` -> cells/s (wall time of
  the whole call: model load, open, compile, stream, write), peak RSS (VmHWM of that process),
  output rows checked;
- the forward-pass compute ceiling: the same jitted forward (``ginseng.annotate.forward.build_forward``,
  same batch size, devices and settings) applied repeatedly to one in-memory batch -> cells/s.

- h5py alone reading the same file's X (data, indices, indptr) in the same row blocks, nothing
  else done with them -> cells/s: the rate at which the input can be read at all.

Targets (issue 5): peak RSS at 1M cells < 1.5 GB, 100k within 20 % of it; throughput >= 90 % of
the ceiling. Usage::

    python benchmarks/bench_annotate.py --cells 100000 1000000 --workdir /tmp/bench_annotate
    # whole-transcriptome input (issue 15): 20,000 genes, ~2,000 non-zeros a cell, 2,000-gene model
    python benchmarks/bench_annotate.py --cells 20000 200000 --genes 20000 --density 0.075 --model-genes 2000

Prints one JSON line per measurement and a summary; ``--json`` writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

BLOCK = 8192  # rows per generated block
N_DISTINCT = 4  # distinct generated blocks, cycled (the content does not change the cost)


def write_h5ad(path: Path, n_cells: int, n_genes: int, density: float, seed: int = 0) -> None:
    """Write a CSR h5ad of ``n_cells`` x ``n_genes`` float32 counts without holding it in memory."""
    import anndata
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    var = pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)])
    obs = pd.DataFrame({"n": np.zeros(0, np.int8)}, index=pd.Index([], dtype=str))
    # Write the skeleton (obs/var/empty X) with anndata, then replace X and obs by streamed data.
    skel = anndata.AnnData(X=sp.csr_matrix((0, n_genes), dtype=np.float32), obs=obs, var=var)
    tmp = path.with_name(path.name + ".tmp")
    skel.write_h5ad(tmp)
    base = rng.gamma(0.6, 1.0, n_genes)
    p_nz = np.clip(base / base.mean() * density, 0, 0.95)
    blocks = []
    for _ in range(N_DISTINCT):
        nz = rng.random((BLOCK, n_genes)) < p_nz
        vals = np.where(nz, rng.poisson(2.0, (BLOCK, n_genes)) + 1, 0).astype(np.float32)
        blocks.append(sp.csr_matrix(vals))
    with h5py.File(tmp, "r+") as f:
        del f["X"]
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,))
        indptr = g.create_dataset("indptr", shape=(n_cells + 1,), dtype="int64")
        nnz = 0
        indptr[0] = 0
        for k, a in enumerate(range(0, n_cells, BLOCK)):
            b = min(a + BLOCK, n_cells)
            blk = blocks[k % N_DISTINCT][: b - a]
            data.resize((nnz + blk.nnz,))
            indices.resize((nnz + blk.nnz,))
            data[nnz:] = blk.data
            indices[nnz:] = blk.indices
            indptr[a + 1 : b + 1] = nnz + blk.indptr[1:]
            nnz += blk.nnz
        del f["obs"]
    # obs with barcodes, written by anndata's own writer for the group
    from anndata.io import write_elem

    with h5py.File(tmp, "r+") as f:
        write_elem(f, "obs", pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)])))
    os.replace(tmp, path)


def make_model(path: Path, genes: list[str], n_classes: int, hidden: int) -> None:
    import jax

    from ginseng.io import save_ginseng_state
    from ginseng.nn import nn_annotate_init
    from ginseng.state import GinsengModelState

    params = nn_annotate_init(jax.random.key(0), len(genes), n_classes, hidden)
    labels = np.array([f"type_{k}" for k in range(n_classes)])
    save_ginseng_state(GinsengModelState(params, np.array(genes), np.arange(n_classes), labels), path,
                       overwrite=True)


def peak_rss_mb() -> float:
    """Peak RSS of this process's own address space.

    VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over from the parent across
    fork + exec, so a child would report the benchmark driver's peak if it was larger.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child_annotate(args) -> dict:
    from ginseng.annotate import annotate

    out = Path(args.out)
    t0 = time.perf_counter()
    annotate(args.model, args.input, backed=True, output=out, batch_size=args.batch_size,
             overwrite=True, silent=True)
    dt = time.perf_counter() - t0
    import pyarrow.parquet as pq

    n = pq.ParquetFile(out).metadata.num_rows
    return {"kind": "annotate", "cells": n, "seconds": dt, "cells_per_s": n / dt,
            "peak_rss_mb": peak_rss_mb()}


def child_h5py(args) -> dict:
    import h5py

    t0 = time.perf_counter()
    nnz = 0
    with h5py.File(args.input, "r") as f:
        data, indices, indptr = f["X/data"], f["X/indices"], f["X/indptr"]
        n = len(indptr) - 1
        for a in range(0, n, args.batch_size):
            ptr = indptr[a : min(n, a + args.batch_size) + 1]
            d, i = data[int(ptr[0]) : int(ptr[-1])], indices[int(ptr[0]) : int(ptr[-1])]
            assert i.size == d.size
            nnz += d.size
    dt = time.perf_counter() - t0
    return {"kind": "h5py", "cells_per_s": n / dt, "seconds": dt, "nnz": nnz}


def child_ceiling(args) -> dict:
    import anndata
    import jax
    from jax.sharding import Mesh

    from ginseng._core.mesh import replicate
    from ginseng.annotate.forward import build_forward
    from ginseng.io import load_ginseng_state

    state = load_ginseng_state(args.model)
    ad = anndata.read_h5ad(args.input, backed="r")
    devs = jax.devices()
    gb = -(-args.batch_size // len(devs)) * len(devs)
    cols = pd.Index(ad.var_names).get_indexer(np.asarray(state.genes).astype(str))
    x = np.asarray(ad.X[:gb].toarray(), np.float32)[:, cols]
    mesh = Mesh(np.asarray(devs), ("data",))
    fwd, data_sh, _ = build_forward(
        mesh, dropout_rate=state.dropout_rate, normalize=state.normalize, target_sum=state.target_sum,
        randomness=False, n_samples=1, want_probs=False, want_attn=False)
    params = replicate(state.params, mesh)
    seed = replicate(np.uint32(0), mesh)
    xd = jax.device_put(x, data_sh)
    idx = jax.device_put(np.arange(gb, dtype=np.int32), data_sh)
    jax.block_until_ready(fwd(params, seed, xd, idx))
    reps = args.reps
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fwd(params, seed, xd, idx)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    return {"kind": "ceiling", "cells_per_s": reps * gb / dt, "batch": gb, "reps": reps}


def run_child(mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", mode]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--density", type=float, default=0.27)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=30, help="forward passes timed for the ceiling")
    ap.add_argument("--workdir", default="/tmp/bench_annotate")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--model-genes", type=int, default=None,
                    help="genes the model reads (every k-th input gene; default: all of them)")
    ap.add_argument("--child", choices=["annotate", "ceiling", "h5py"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        fn = {"annotate": child_annotate, "ceiling": child_ceiling, "h5py": child_h5py}[args.child]
        print(json.dumps(fn(args)))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    import jax

    info = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cpus, jax {jax.__version__} {jax.default_backend()} "
                       f"x{jax.device_count()}",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([sys.executable] + sys.argv)}
    print(json.dumps(info), flush=True)
    genes = [f"GENE{j}" for j in range(args.genes)]
    m = args.model_genes or args.genes
    model_genes = genes[:: max(1, args.genes // m)][:m]
    model = work / f"model_{args.genes}_{m}.h5"
    make_model(model, model_genes, args.classes, args.hidden)
    results = []
    for n in args.cells:
        h5ad = work / f"cells_{n}_{args.genes}.h5ad"
        if not h5ad.exists():
            t0 = time.perf_counter()
            write_h5ad(h5ad, n, args.genes, args.density)
            print(json.dumps({"kind": "write", "cells": n, "seconds": time.perf_counter() - t0,
                              "bytes": h5ad.stat().st_size}), flush=True)
        common = {"model": model, "input": h5ad, "batch_size": args.batch_size}
        ceil1 = run_child("ceiling", reps=args.reps, **common)
        ann = run_child("annotate", out=work / f"out_{n}.parquet", **common)
        ceil2 = run_child("ceiling", reps=args.reps, **common)
        h5 = run_child("h5py", input=h5ad, batch_size=args.batch_size)
        ceiling = max(ceil1["cells_per_s"], ceil2["cells_per_s"])
        row = {"cells": n, "genes": args.genes, "batch_size": args.batch_size,
               "annotate_cells_per_s": round(ann["cells_per_s"], 1),
               "ceiling_cells_per_s": [round(ceil1["cells_per_s"], 1), round(ceil2["cells_per_s"], 1)],
               "fraction_of_ceiling": round(ann["cells_per_s"] / ceiling, 3),
               "model_genes": m, "h5py_read_cells_per_s": round(h5["cells_per_s"], 1),
               "fraction_of_h5py_read": round(ann["cells_per_s"] / h5["cells_per_s"], 3),
               "peak_rss_mb": round(ann["peak_rss_mb"], 1), "seconds": round(ann["seconds"], 1)}
        assert ann["cells"] == n, (ann["cells"], n)
        results.append(row)
        print(json.dumps(row), flush=True)
    if len(results) >= 2:
        small, big = results[0], results[-1]
        print(json.dumps({"rss_ratio_small_over_big": round(small["peak_rss_mb"] / big["peak_rss_mb"], 3)}))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
