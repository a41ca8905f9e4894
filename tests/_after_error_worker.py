"""Child process for tests/test_after_error.py: errors first, then ordinary work, same process.

    python _after_error_worker.py damaged-checkpoint WORKDIR
    python _after_error_worker.py bad-input-sweep WORKDIR TEST_ID [TEST_ID ...]

Each mode ends with create -> train -> annotate in the process that just saw the errors, then
checks that no thread ginseng started is alive and no file under WORKDIR is still open, and
prints ``AFTER-ERROR OK``. A hang is caught by the parent's timeout.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import warnings
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import h5py
import jax
import numpy as np
from conftest import make_counts

from ginseng.annotate import annotate
from ginseng.data import GinsengDataset
from ginseng.train import GinsengTrainer, GinsengTrainerSettings, list_checkpoints

SETTINGS = {"hidden_dim": 8, "batch_size": 16, "seed": 3}


def damage_in_the_middle(path: Path) -> str:
    """Zero 64 bytes inside the stored chunk nearest the middle of the file; return its name."""
    middle = path.stat().st_size // 2
    chunks = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                info = obj.id.get_chunk_info(0)
                if info.size >= 64:
                    chunks.append((abs(info.byte_offset + info.size // 2 - middle), info.byte_offset, info.size, name))

        f.visititems(visit)
    _, offset, size, name = min(chunks)
    with open(path, "r+b") as fh:
        fh.seek(offset + (size - 64) // 2)
        fh.write(bytes(64))
    return name


def ordinary_work(workdir: Path) -> None:
    """create -> train (with checkpoints) -> annotate to a file, as a pipeline would go on."""
    adata = make_counts(n_cells=120, n_genes=24, n_labels=3, seed=11)
    ds = GinsengDataset.create(workdir / "after.zarr", adata, "cell_type", chunk_size=32, silent=True)
    settings = GinsengTrainerSettings(**SETTINGS, checkpoint_dir=str(workdir / "after_ckpt"), checkpoint_every=2)
    _, state = GinsengTrainer(ds, settings, epochs=1, silent=True)
    annotate(state, adata, output=workdir / "after.csv", silent=True)
    import pandas as pd

    assert len(pd.read_csv(workdir / "after.csv")) == 120


def leftovers(workdir: Path) -> list[str]:
    gc.collect()
    found = [
        f"thread {t.name!r}"
        for t in threading.enumerate()
        if t.is_alive()
        and (t.name.startswith("ginseng") or getattr(getattr(t, "_target", None), "__module__", "").startswith("ginseng"))
    ]
    root = str(workdir.resolve())
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            found.append(f"open file {target}")
    return found


def damaged_checkpoint(workdir: Path) -> None:
    adata = make_counts(n_cells=150, n_genes=24, n_labels=3, seed=5)
    ds = GinsengDataset.create(workdir / "ds.zarr", adata, "cell_type", chunk_size=32, silent=True)
    _, ref = GinsengTrainer(ds, GinsengTrainerSettings(**SETTINGS), epochs=2, silent=True)

    # 1. The newest checkpoint is damaged: a warning names it, the run resumes from the one
    #    before it and ends bit-identical to the uninterrupted run.
    ckpt = workdir / "ckpt"
    settings = GinsengTrainerSettings(**SETTINGS, checkpoint_dir=str(ckpt), checkpoint_every=3)
    GinsengTrainer(ds, settings, epochs=2, silent=True)
    kept = list_checkpoints(ckpt)
    assert len(kept) == settings.keep_checkpoints == 3, kept
    where = damage_in_the_middle(kept[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _log, resumed = GinsengTrainer(ds, settings, epochs=2, silent=True, resume=True)
    said = [str(w.message) for w in caught if str(kept[0]) in str(w.message)]
    assert said and where in said[0] and f"resuming from the checkpoint before it, {str(kept[1])!r}" in said[0], [
        str(w.message) for w in caught
    ]
    leaves = zip(jax.tree.leaves(ref.params), jax.tree.leaves(resumed.params), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves), "resumed run differs from the uninterrupted one"
    # The damaged file is kept aside; the resumed run reached the same step again and wrote a
    # good checkpoint under the name.
    from ginseng.train import read_checkpoint

    assert Path(str(kept[0]) + ".damaged").is_file()
    assert read_checkpoint(list_checkpoints(ckpt)[0])["global_step"] == read_checkpoint(kept[1])["global_step"] + 2

    # 2. Every checkpoint damaged (the case, keep=1): one error names each file and what
    #    is damaged in it; the process goes on.
    lone = GinsengTrainerSettings(**SETTINGS, checkpoint_dir=str(workdir / "lone"), checkpoint_every=3, keep_checkpoints=1)
    GinsengTrainer(ds, lone, epochs=1, silent=True)
    (only,) = list_checkpoints(workdir / "lone")
    where = damage_in_the_middle(only)
    try:
        GinsengTrainer(ds, lone, epochs=2, silent=True, resume=True)
    except ValueError as err:
        text = str(err)
        assert "no usable checkpoint" in text and str(only) in text and f"dataset {where!r} cannot be read" in text, text
    else:
        raise AssertionError("a damaged checkpoint was resumed from")
    for path in list_checkpoints(ckpt):
        damage_in_the_middle(path)
    try:
        GinsengTrainer(ds, settings, epochs=2, silent=True, resume=True)
    except ValueError as err:
        tried = list_checkpoints(ckpt)
        assert len(tried) == settings.keep_checkpoints and all(str(p) in str(err) for p in tried), str(err)
    else:
        raise AssertionError("damaged checkpoints were resumed from")


def bad_input_sweep(workdir: Path, test_ids: list[str]) -> None:
    import pytest

    class Count:
        passed = failed = 0

        def pytest_runtest_logreport(self, report):
            if report.when == "call":
                Count.passed += report.passed
                Count.failed += report.failed

    args = ["-q", "-p", "no:cacheprovider", "-m", "", f"--basetemp={workdir / 'sweep'}", f"--rootdir={HERE.parent}", *test_ids]
    rc = pytest.main(args, plugins=[Count()])
    assert rc == 0 and Count.failed == 0, f"bad-input tests failed (pytest exit {rc})"
    print(f"SWEEP {Count.passed} passed", flush=True)


def main(argv: list[str]) -> int:
    mode, workdir = argv[0], Path(argv[1])
    if mode == "damaged-checkpoint":
        damaged_checkpoint(workdir)
    else:
        bad_input_sweep(workdir, argv[2:])
    ordinary_work(workdir)
    left = leftovers(workdir)
    assert not left, f"still alive or open after the run: {left}"
    print("AFTER-ERROR OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
