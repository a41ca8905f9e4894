"""Worker for bench_accuracy.py --reference: train reference ginseng 0.1.4 (benchmarks/.venvs/ref)
on train.h5ad (already restricted to the HVGs chosen in the project's interpreter), annotate
test.h5ad, and write the predicted labels, one per line, to pred.txt. Same split, same genes."""

import argparse
import shutil
import sys
from pathlib import Path

import anndata

from ginseng.annotate import GinsengAnnotate
from ginseng.data import GinsengDataset
from ginseng.train import GinsengTrainer, GinsengTrainerSettings


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--balance", choices=["true", "false"], required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    w = Path(a.workdir)
    ds_path = w / "ref_ds"
    if ds_path.exists():
        shutil.rmtree(ds_path)  # our own scratch folder (the reference refuses existing paths)
    train = anndata.read_h5ad(w / "train.h5ad")
    test = anndata.read_h5ad(w / "test.h5ad")
    ds = GinsengDataset.create(ds_path, train, labels="cell_type")
    settings = GinsengTrainerSettings(balance_train=a.balance == "true", seed=a.seed)
    _, state = GinsengTrainer(ds, settings=settings, epochs=a.epochs, silent=True)
    out = GinsengAnnotate(state, test, copy=True, silent=True, backed=False)
    (w / "pred.txt").write_text("\n".join(map(str, out.obs["ginseng_cell_type"])) + "\n")
    print("ok", sys.version.split()[0])


if __name__ == "__main__":
    main()
