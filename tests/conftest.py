"""Shared fixtures. Four virtual CPU devices for every test, set before JAX starts, so that the
data-parallel paths (mesh, shard_map, all-reduce) run in CI on a machine without accelerators."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# pandas 3 has copy-on-write as its only mode (arrays from .to_numpy() can be read-only views);
# a fresh install on Python >= 3.12 gets pandas 3, CI's Python 3.11 gets pandas 2. Run every test
# with pandas 3's semantics, so that code writing into such a view fails here too.
if int(pd.__version__.split(".")[0]) < 3:
    pd.set_option("mode.copy_on_write", True)

DATA_DIR = Path(__file__).resolve().parent / "data"


def make_counts(n_cells=400, n_genes=120, n_labels=4, n_groups=5, seed=0, sparse=False):
    """Synthetic raw counts with label-specific gene programs (negative binomial), labels as
    strings, groups as strings, gene names as strings. Returns an AnnData."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n_cells)
    base = rng.gamma(0.6, 1.0, n_genes)
    program = np.ones((n_labels, n_genes))
    for k in range(n_labels):
        program[k, rng.choice(n_genes, max(3, n_genes // 10), replace=False)] = 6.0
    lib = rng.lognormal(0.0, 0.4, n_cells)[:, None]
    mu = base[None, :] * program[labels] * lib
    r = 2.0
    X = rng.negative_binomial(r, r / (r + mu)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{k}" for k in labels]),
            "donor": pd.Categorical([f"donor_{g}" for g in rng.integers(0, n_groups, n_cells)]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"symbol": [f"SYM{j}" for j in range(n_genes)], "keep": np.arange(n_genes) % 3 != 0},
        index=[f"GENE{j}" for j in range(n_genes)],
    )
    return anndata.AnnData(X=sp.csr_matrix(X) if sparse else X, obs=obs, var=var)


@pytest.fixture
def small_adata():
    return make_counts()


@pytest.fixture
def small_adata_sparse():
    return make_counts(sparse=True)


@pytest.fixture(scope="session")
def pbmc3k_path():
    from ginseng.datasets import pbmc3k_path

    return pbmc3k_path()


@pytest.fixture(scope="session")
def baron_paths():
    return DATA_DIR / "baron_mouse1.h5ad", DATA_DIR / "baron_mouse2.h5ad"
