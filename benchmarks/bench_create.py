"""Dataset creation from a backed .h5ad: wall time, input passes and peak memory.

``GinsengDataset.create`` writes rows in a seeded permutation a buffer-full (``_WRITE_BUFFER_BYTES``)
at a time. This measures how that scales when the data is many buffers big, by shrinking the buffer
(``--buffer-mb``) on a dataset that fits the disk here; ``--repo`` points at another checkout to
run its code side by side (e.g. a ``git worktree`` of an older commit).

Usage::

    python benchmarks/bench_create.py benchmarks/out/s100k.h5ad --buffer-mb 64
    python benchmarks/bench_create.py benchmarks/out/s100k.h5ad --buffer-mb 64 --repo /tmp/old

Prints one JSON line: seconds, input row blocks read, input passes, peak RSS (MB).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("h5ad")
    p.add_argument("--labels", default="cell_type")
    p.add_argument("--buffer-mb", type=float, default=None, help="write buffer (default: the package's)")
    p.add_argument("--repo", default=None, help="import ginseng from this checkout instead")
    p.add_argument("--workdir", default=None)
    a = p.parse_args(argv)
    if a.repo:
        sys.path.insert(0, str(Path(a.repo).resolve()))
    import anndata

    import ginseng.data as gdata
    import ginseng.data.create as gd

    if a.buffer_mb is not None:
        gd._WRITE_BUFFER_BYTES = int(a.buffer_mb * (1 << 20))
    reads = []
    block = gd._Source.block
    gd._Source.block = lambda self, s, e: reads.append(s) or block(self, s, e)
    adata = anndata.read_h5ad(a.h5ad, backed="r")
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        t0 = time.perf_counter()
        ds = gdata.GinsengDataset.create(Path(tmp) / "ds.zarr", adata, a.labels, silent=True)
        wall = time.perf_counter() - t0
        n_blocks = len(set(reads))
        out = {
            "ginseng": str(Path(gdata.__file__).resolve().parent.parent.parent),
            "cells": ds.n_cells,
            "genes": ds.n_genes,
            "buffer_mb": gd._WRITE_BUFFER_BYTES / (1 << 20),
            "seconds": round(wall, 1),
            "input_passes": round(len(reads) / n_blocks, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
