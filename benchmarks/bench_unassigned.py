"""Unassigned cells and majority voting (issue 17), measured end to end through ``annotate``.

Two series, with every setting fixed before any result was seen (nothing is tuned on a split):

- ``baron``: a model trained by the CLI on baron_mouse1 (``data.min_cells=10``: 7 labels) annotates
  all of baron_mouse2 (210 of its 1,064 cells are of types the model never learned), per seed.
- ``loto``: leave one type out on pbmc3k. For every type with >= 100 cells and every seed, the CLI
  trains on the other types (its own stratified 80/20 split, default settings) and annotates its
  20 % test cells plus every cell of the left-out type.

Per rejection rule it prints the share of unseen-type cells Unassigned, of seen-type cells
Unassigned, and the macro-F1 on seen-type cells (over their true labels; an Unassigned cell counts
as a miss) beside the same model without rejection. Rules: ``min_confidence=0.5`` (CellTypist's
default ``p_thres``), ``"auto"``, and ``"auto"`` followed by majority voting over clusters of the
query (k-means, k = round(sqrt(cells)), on a 30-component PCA of log-normalized counts of the
model's genes: a stand-in for the Leiden over-clustering a scanpy user has in ``obs``).

    python benchmarks/bench_unassigned.py baron --seeds 1 2 3
    python benchmarks/bench_unassigned.py loto --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import f1_score

from ginseng import tasks
from ginseng.annotate import annotate
from ginseng.config import compose
from ginseng.io import load_ginseng_state

ROOT = Path(__file__).resolve().parents[1]
RULES = ("none", "0.5", "auto", "auto + vote")


def train(path: Path, workdir: Path, seed: int, *extra: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tasks.run(compose([f"data.path={path}", f"trainer.seed={seed}", "silent=true", *extra]), workdir)
    return workdir / "model.h5"


def clusters_of(query: anndata.AnnData, genes) -> np.ndarray:
    pos = pd.Index(query.var_names).get_indexer(list(genes))
    X = query.X[:, pos[pos >= 0]]
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, np.float64)
    Z = PCA(30, random_state=0).fit_transform(np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4))
    k = round(np.sqrt(len(X)))
    return KMeans(k, n_init=4, random_state=0).fit_predict(Z)


def measure(model: Path, query: anndata.AnnData, key: str = "cell_type") -> dict:
    state = load_ginseng_state(model)
    labels = {str(v) for v in np.asarray(state.label_values)}
    truth = query.obs[key].astype(str).to_numpy()
    seen = np.isin(truth, list(labels))
    clusters = clusters_of(query, state.genes)
    calls = {
        "none": {},
        "0.5": {"min_confidence": 0.5},
        "auto": {"min_confidence": "auto"},
        "auto + vote": {"min_confidence": "auto", "over_clustering": clusters},
    }
    out = {}
    for rule, kw in calls.items():
        table = annotate(state, query, return_table=True, silent=True, **kw)
        pred = (table.majority_voting if "over_clustering" in kw else table.cell_type).astype(str).to_numpy()
        un = pred == "Unassigned"
        seen_labels = sorted(set(truth[seen]))
        out[rule] = {
            "unseen": float(un[~seen].mean()),
            "seen": float(un[seen].mean()),
            "f1": float(f1_score(truth[seen], pred[seen], labels=seen_labels, average="macro", zero_division=0)),
        }
    return out


def baron(seeds, tmp: Path) -> list[dict]:
    query = anndata.read_h5ad(ROOT / "tests/data/baron_mouse2.h5ad")
    rows = []
    for seed in seeds:
        model = train(ROOT / "tests/data/baron_mouse1.h5ad", tmp / f"baron{seed}", seed, "data.min_cells=10")
        rows.append({"series": "baron", "left_out": "(mouse2's 6 unlearned types)", "seed": seed, **_flat(measure(model, query))})
    return rows


def loto(seeds, tmp: Path) -> list[dict]:
    from ginseng.datasets import pbmc3k_path

    full = anndata.read_h5ad(pbmc3k_path())
    counts = full.obs.cell_type.value_counts()
    rows = []
    for left in [str(t) for t in counts.index[counts >= 100]]:
        out = full.obs.cell_type.astype(str) == left
        path = tmp / f"without_{left.replace(' ', '_').replace('+', 'p')}.h5ad"
        full[~out.to_numpy()].copy().write_h5ad(path)
        for seed in seeds:
            work = tmp / f"{path.stem}_{seed}"
            model = train(path, work, seed)
            test = pd.read_csv(work / "test_cells.csv").barcode.astype(str)
            keep = full.obs_names.isin(test) | out.to_numpy()
            rows.append({"series": "loto", "left_out": left, "seed": seed, **_flat(measure(model, full[keep].copy()))})
    return rows


def _flat(res: dict) -> dict:
    return {f"{rule}|{m}": v for rule, d in res.items() for m, v in d.items()}


def summary(df: pd.DataFrame) -> str:
    lines = ["| rule | unseen-type cells Unassigned | seen-type cells Unassigned | macro-F1 on seen-type cells | change vs none |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for rule in RULES:
        u, s, f = (df[f"{rule}|{m}"].mean() for m in ("unseen", "seen", "f1"))
        d = f - df["none|f1"].mean()
        lines.append(f"| {rule} | {u:.3f} | {s:.3f} | {f:.4f} | {d:+.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("series", choices=["baron", "loto"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--csv", default=None, help="also write every run's figures here")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = (baron if args.series == "baron" else loto)(args.seeds, Path(tmp))
    df = pd.DataFrame(rows)
    if args.csv:
        df.to_csv(args.csv, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(df.round(3).to_string(index=False))
    print(f"\n{args.series}: mean over {len(df)} runs ({time.perf_counter() - t0:.0f} s)")
    print(summary(df))


if __name__ == "__main__":
    main()
