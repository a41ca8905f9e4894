"""How well can a trained model tell cells of unseen types from cells of its own types?

Groundwork for rejection ("Unassigned" cells): for a model trained by ``python -m ginseng.launch``
(its run directory holds ``model.h5`` and ``dataset.zarr``) and a labelled query, score every query
cell with several candidate scores and print, per score, the AUROC of unseen-vs-seen and the share
of seen cells flagged when 95 % of the unseen cells are flagged. Thresholds fixed from what the
model saw (its training and holdout cells) are printed too: those are what an "auto" threshold
could use, since the query's labels are unknown in practice.

    python benchmarks/bench_rejection.py RUN_DIR [RUN_DIR ...] --query tests/data/baron_mouse2.h5ad

Scores (higher = more likely unseen): negative max probability, energy (-logsumexp of the
logits), class-conditional Mahalanobis distance on the head's input (the gated features
``attn * h``), and the distance to the k-th nearest training cell of the predicted type in a
50-component PCA of log-normalized counts.
"""

from __future__ import annotations

import argparse

import anndata
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from ginseng.data import GinsengDataset
from ginseng.io import load_ginseng_state
from ginseng.nn import nn_linear, nn_normalize


def features_and_logits(state, X):
    """The head's input (gated features) and the logits, as ``nn_annotate`` computes them."""
    x = jnp.asarray(X, jnp.float32)
    if state.normalize:
        x = nn_normalize(x, x.shape[-1] if state.target_sum is None else state.target_sum)
    p = state.params
    h = nn_linear(p["features2"], jax.nn.relu(nn_linear(p["features1"], x)))
    a = jax.nn.sigmoid(nn_linear(p["attn2"], jnp.tanh(nn_linear(p["attn1"], h))))
    z = a * h
    return np.asarray(z), np.asarray(nn_linear(p["head"], z))


def query_counts(adata, genes, key):
    pos = {g: i for i, g in enumerate(adata.var_names)}
    X = adata.X[:, [pos[g] for g in genes]]
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    return X, adata.obs[key].astype(str).to_numpy()


def lognorm(X):
    X = np.asarray(X, np.float64)
    return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)


def scores_for(run: str, query: anndata.AnnData, key: str, k: int = 10):
    state = load_ginseng_state(f"{run}/model.h5")
    labels = np.asarray(state.label_values).astype(str)
    ds = GinsengDataset(f"{run}/dataset.zarr")
    Xtr, ytr = ds.get_batch(ds.train_indices), ds.labels[ds.train_indices]
    Xref = np.concatenate([Xtr, ds.get_batch(ds.holdout_indices)])
    Xq, truth = query_counts(query, list(state.genes), key)
    seen = np.isin(truth, labels)

    ztr, _ = features_and_logits(state, Xtr)
    mu = np.stack([ztr[ytr == c].mean(0) for c in range(len(labels))])
    centred = ztr - mu[ytr]
    cov = centred.T @ centred / len(ztr)
    prec = np.linalg.inv(cov + 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    pca = PCA(50, random_state=0).fit(lognorm(Xtr))
    ptr = pca.transform(lognorm(Xtr))
    neighbours = [NearestNeighbors(n_neighbors=min(k, int((ytr == c).sum()))).fit(ptr[ytr == c]) for c in range(len(labels))]

    def score(X):
        z, logits = features_and_logits(state, X)
        shifted = logits - logits.max(1, keepdims=True)
        prob = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
        pred = logits.argmax(1)
        maha = np.stack([np.einsum("ij,jk,ik->i", z - m, prec, z - m) for m in mu], 1).min(1)
        pq = pca.transform(lognorm(X))
        knn = np.empty(len(X))
        for c, nn in enumerate(neighbours):
            if (sel := pred == c).any():
                knn[sel] = nn.kneighbors(pq[sel])[0][:, -1]
        return {
            "max probability": -prob.max(1),
            "energy": -(np.log(np.exp(shifted).sum(1)) + logits.max(1)),
            "Mahalanobis (gated features)": maha,
            f"kNN distance (PCA, k={k})": knn,
        }

    return score(Xq), score(Xref), seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--query", required=True)
    parser.add_argument("--key", default="cell_type")
    args = parser.parse_args()
    query = anndata.read_h5ad(args.query)
    print("| run | score | AUROC | seen flagged at 95 % unseen | threshold = max over training+holdout cells: unseen / seen flagged |")
    print("| --- | --- | ---: | ---: | --- |")
    for run in args.runs:
        q, ref, seen = scores_for(run, query, args.key)
        for name, s in q.items():
            at95 = (s[seen] >= np.quantile(s[~seen], 0.05)).mean()
            flag = s > ref[name].max()
            print(f"| {run} | {name} | {roc_auc_score(~seen, s):.3f} | {at95:.3f} | "
                  f"{flag[~seen].mean():.2f} / {flag[seen].mean():.3f} |")


if __name__ == "__main__":
    main()
