"""Readers (10x mtx v2/v3, 10x h5 v2/v3, h5ad) and model files (exact round trip, clear errors)."""

import gzip
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from ginseng.io import (
    detect_gene_id_kind,
    load_ginseng_state,
    make_names_unique,
    read_10x_h5,
    read_10x_mtx,
    read_adata,
    save_ginseng_state,
)
from ginseng.nn import nn_annotate, nn_annotate_init
from ginseng.state import GinsengModelState

N_CELLS, N_GENES = 7, 5
# A duplicated symbol ("DUP") checks make_unique.
GENE_IDS = [f"ENSG0000000000{j}" for j in range(N_GENES)]
SYMBOLS = ["CD3E", "DUP", "MS4A1", "DUP", "LYZ"]
BARCODES = [f"AAAC{i:02d}-1" for i in range(N_CELLS)]


@pytest.fixture
def counts():
    rng = np.random.default_rng(3)
    X = rng.poisson(1.0, size=(N_CELLS, N_GENES)).astype(np.float32)
    X[0] = 0  # an empty cell
    X[:, 2] = 0  # an empty gene
    X[3, 4] = 123456  # a large count survives the round trip
    return X


def _write_text(path, lines, gz):
    data = "".join(line + "\n" for line in lines).encode()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def write_mtx(folder, X, version):
    folder.mkdir()
    gz = version == 3
    mtx = folder / "matrix.mtx"
    scipy.io.mmwrite(mtx, sp.coo_matrix(X.T.astype(np.int64)))  # genes x cells, like Cell Ranger
    if gz:
        with open(mtx, "rb") as src, gzip.open(folder / "matrix.mtx.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        mtx.unlink()
    _write_text(folder / ("barcodes.tsv.gz" if gz else "barcodes.tsv"), BARCODES, gz)
    if version == 3:
        feats = [f"{i}\t{s}\tGene Expression" for i, s in zip(GENE_IDS, SYMBOLS, strict=True)]
        _write_text(folder / "features.tsv.gz", feats, gz)
    else:
        _write_text(
            folder / "genes.tsv", [f"{i}\t{s}" for i, s in zip(GENE_IDS, SYMBOLS, strict=True)], gz
        )
    return folder


def write_h5_v3(path, X, genomes=None):
    csc = sp.csc_matrix(X.T.astype(np.int32))  # genes x cells
    genomes = genomes or ["GRCh38"] * N_GENES
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = (
            csc.data,
            csc.indices.astype(np.int64),
            csc.indptr.astype(np.int64),
        )
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = np.array(BARCODES, dtype="S")
        ft = g.create_group("features")
        ft["id"] = np.array(GENE_IDS, dtype="S")
        ft["name"] = np.array(SYMBOLS, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * N_GENES, dtype="S")
        ft["genome"] = np.array(genomes, dtype="S")
    return path


def write_h5_v2(path, X, genomes=("hg19",)):
    csc = sp.csc_matrix(X.T.astype(np.int32))
    with h5py.File(path, "w") as f:
        for k, name in enumerate(genomes):
            g = f.create_group(name)
            g["data"], g["indices"], g["indptr"] = csc.data + k, csc.indices, csc.indptr
            g["shape"] = np.array(csc.shape, dtype=np.int32)
            g["barcodes"] = np.array(BARCODES, dtype="S")
            g["genes"] = np.array(GENE_IDS, dtype="S")
            g["gene_names"] = np.array(SYMBOLS, dtype="S")
    return path


def check_adata(adata, X, var_names="gene_symbols"):
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), X)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var["gene_ids"]) == GENE_IDS
    assert list(adata.var["gene_symbols"]) == SYMBOLS
    if var_names == "gene_symbols":
        assert list(adata.var_names) == ["CD3E", "DUP", "MS4A1", "DUP-1", "LYZ"]
    else:
        assert list(adata.var_names) == GENE_IDS


# ---------------------------------------------------------------- mtx


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("var_names", ["gene_symbols", "gene_ids"])
def test_read_10x_mtx_round_trip(tmp_path, counts, version, var_names):
    folder = write_mtx(tmp_path / "mtx", counts, version)
    adata = read_10x_mtx(folder, var_names=var_names)
    check_adata(adata, counts, var_names)
    assert ("feature_types" in adata.var) == (version == 3)


def test_read_10x_mtx_make_unique_false_keeps_duplicates(tmp_path, counts):
    with pytest.warns(UserWarning, match="not unique"):
        adata = read_10x_mtx(write_mtx(tmp_path / "mtx", counts, 3), make_unique=False)
    assert list(adata.var_names) == SYMBOLS


def test_read_10x_mtx_missing_file_names_it(tmp_path, counts):
    folder = write_mtx(tmp_path / "mtx", counts, 2)
    (folder / "barcodes.tsv").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing: barcodes \(barcodes.tsv.gz or barcodes.tsv\)"
    ):
        read_10x_mtx(folder)


def test_read_10x_mtx_shape_mismatch(tmp_path, counts):
    folder = write_mtx(tmp_path / "mtx", counts, 2)
    _write_text(folder / "barcodes.tsv", BARCODES[:-1], gz=False)
    with pytest.raises(
        ValueError, match=r"5 genes x 7 cells but there are 5 features .* and 6 barcodes"
    ):
        read_10x_mtx(folder)


def test_bad_var_names(tmp_path, counts):
    folder = write_mtx(tmp_path / "mtx", counts, 2)
    with pytest.raises(ValueError, match=r"var_names must be one of .* got 'symbols'"):
        read_10x_mtx(folder, var_names="symbols")


# ---------------------------------------------------------------- h5


@pytest.mark.parametrize("var_names", ["gene_symbols", "gene_ids"])
def test_read_10x_h5_v3_round_trip(tmp_path, counts, var_names):
    adata = read_10x_h5(write_h5_v3(tmp_path / "f.h5", counts), var_names=var_names)
    check_adata(adata, counts, var_names)
    assert list(adata.var["feature_types"]) == ["Gene Expression"] * N_GENES


def test_read_10x_h5_v3_genome_filter(tmp_path, counts):
    genomes = ["GRCh38", "mm10", "GRCh38", "mm10", "GRCh38"]
    path = write_h5_v3(tmp_path / "f.h5", counts, genomes)
    assert read_10x_h5(path).n_vars == N_GENES
    mouse = read_10x_h5(path, genome="mm10", var_names="gene_ids")
    assert list(mouse.var_names) == [GENE_IDS[1], GENE_IDS[3]]
    np.testing.assert_array_equal(mouse.X.toarray(), counts[:, [1, 3]])
    with pytest.raises(
        ValueError, match=r"genome 'hg19' .* available genomes: \['GRCh38', 'mm10'\]"
    ):
        read_10x_h5(path, genome="hg19")


def test_read_10x_h5_v2_round_trip_and_genome(tmp_path, counts):
    path = write_h5_v2(tmp_path / "f.h5", counts, genomes=("hg19", "mm10"))
    check_adata(read_10x_h5(path), counts)  # first genome by default
    mouse = read_10x_h5(path, genome="mm10")
    np.testing.assert_array_equal(mouse.X.toarray(), np.where(counts > 0, counts + 1, 0))
    with pytest.raises(
        ValueError, match=r"genome 'GRCh38' .* available genomes: \['hg19', 'mm10'\]"
    ):
        read_10x_h5(path, genome="GRCh38")


def test_read_10x_h5_not_10x(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["X"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"not a 10x Genomics h5 file.*found keys \['X'\]"):
        read_10x_h5(path)


# ---------------------------------------------------------------- read_adata


def test_read_adata_dispatch(tmp_path, counts, small_adata):
    folder = write_mtx(tmp_path / "mtx", counts, 3)
    check_adata(read_adata(folder), counts)
    check_adata(read_adata(write_h5_v3(tmp_path / "f.h5", counts)), counts)
    small_adata.write_h5ad(tmp_path / "a.h5ad")
    mem = read_adata(tmp_path / "a.h5ad")
    assert not mem.isbacked
    np.testing.assert_array_equal(mem.X, small_adata.X)
    backed = read_adata(str(tmp_path / "a.h5ad"), backed=True)
    assert backed.isbacked
    np.testing.assert_array_equal(backed.X[:10], small_adata.X[:10])
    backed.file.close()


def test_read_adata_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"'.*nope.h5ad' does not exist; expected an AnnData"
    ):
        read_adata(tmp_path / "nope.h5ad")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(
        ValueError, match=r"unsupported file type '.csv'; expected .* 10x mtx directory"
    ):
        read_adata(tmp_path / "x.csv")
    (tmp_path / "bad.h5ad").write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match=r"could not read h5ad file '.*bad.h5ad'"):
        read_adata(tmp_path / "bad.h5ad")


# ---------------------------------------------------------------- names


@pytest.mark.filterwarnings("ignore:Suffix used")
def test_make_names_unique_like_anndata():
    names = ["A", "B", "A", "A-1", "A", "B"]
    ad = anndata.AnnData(np.zeros((1, len(names)), dtype=np.float32))
    ad.var_names = names
    ad.var_names_make_unique()
    assert list(make_names_unique(names)) == list(ad.var_names)
    assert len(set(make_names_unique(names))) == len(names)


def test_detect_gene_id_kind():
    assert (
        detect_gene_id_kind(["ENSG00000141510", "ENSMUSG00000059552.3", "ENSDARG00000000001"])
        == "ensembl"
    )
    assert detect_gene_id_kind(["CD3E", "MS4A1", "ENSEMBLE", "ENSG"]) == "symbol"
    assert detect_gene_id_kind(["CD3E", "ENSG00000141510"]) == "mixed"
    with pytest.raises(ValueError, match="no names"):
        detect_gene_id_kind([])


# ---------------------------------------------------------------- model files


def make_state(target_sum=1e4, label_values=("B cell", "T cell", "monocyte")):
    params = nn_annotate_init(jax.random.key(0), 12, len(label_values), hidden_dim=8)
    return GinsengModelState(
        params=params,
        genes=np.array([f"GENE{j}" for j in range(11)] + ["Ünïcode-γ"]),
        label_keys=np.arange(len(label_values)),
        label_values=np.array(label_values),
        normalize=False,
        target_sum=target_sum,
        dropout_rate=0.125,
        training=True,
    )


@pytest.mark.parametrize("target_sum", [1e4, None])
def test_model_round_trip_exact(tmp_path, target_sum):
    state = make_state(target_sum)
    path = tmp_path / "model.h5"
    save_ginseng_state(state, path)
    loaded = load_ginseng_state(path)
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(state.params)
    for (kp, a), b in zip(
        jax.tree_util.tree_leaves_with_path(state.params),
        jax.tree_util.tree_leaves(loaded.params),
        strict=True,
    ):
        assert isinstance(b, jax.Array), kp
        assert a.dtype == b.dtype and a.shape == b.shape, kp
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
    assert list(loaded.genes) == list(state.genes)
    np.testing.assert_array_equal(loaded.label_keys, state.label_keys)
    assert loaded.label_keys.dtype.kind == "i"
    assert list(loaded.label_values) == list(state.label_values)
    assert loaded.target_sum == target_sum
    assert (loaded.normalize, loaded.dropout_rate, loaded.training) == (False, 0.125, True)
    with h5py.File(path) as f:  # the layout other tools can read, with no pickle
        assert f.attrs["format"] == "ginseng.model" and f.attrs["format_version"] == 1
        assert "ginseng_version" in f.attrs
        assert f["params/features1/W"].shape == state.params["features1"]["W"].shape
        assert h5py.check_string_dtype(f["genes"].dtype).encoding == "utf-8"


def test_model_integer_labels(tmp_path):
    state = make_state(label_values=(3, 7))
    save_ginseng_state(state, tmp_path / "m.h5")
    loaded = load_ginseng_state(tmp_path / "m.h5")
    assert loaded.label_values.dtype.kind == "i" and list(loaded.label_values) == [3, 7]


def test_model_save_refuses_existing_and_overwrites(tmp_path):
    path = tmp_path / "m.h5"
    path.write_text("user's file")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_ginseng_state(make_state(), path)
    assert path.read_text() == "user's file"
    save_ginseng_state(make_state(), path, overwrite=True)
    assert load_ginseng_state(path).n_classes == 3
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"]  # no temporaries left


def test_model_save_failure_leaves_nothing(tmp_path):
    state = make_state()
    state.params["features1"]["bad"] = object()
    with pytest.raises((TypeError, ValueError)):
        save_ginseng_state(state, tmp_path / "m.h5")
    assert list(tmp_path.iterdir()) == []


def test_model_load_truncated(tmp_path):
    path = tmp_path / "m.h5"
    save_ginseng_state(make_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model file '.*m.h5' .*truncated or corrupted"):
        load_ginseng_state(path)


def test_model_load_not_hdf5_and_missing(tmp_path):
    path = tmp_path / "m.h5"
    path.write_bytes(b"\x80\x04 pickle? no thanks")
    with pytest.raises(ValueError, match=r"model file '.*m.h5' is not an HDF5 file"):
        load_ginseng_state(path)
    with pytest.raises(FileNotFoundError, match=r"model file '.*none.h5' does not exist"):
        load_ginseng_state(tmp_path / "none.h5")


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def test_model_load_wrong_format_version_and_missing_params(tmp_path):
    path = tmp_path / "m.h5"
    save_ginseng_state(make_state(), path)
    _edit(path, lambda f: f.attrs.__setitem__("format_version", 7))
    with pytest.raises(
        ValueError,
        match=r"'.*m.h5' has format_version 7, but this ginseng .* reads format_version 1",
    ):
        load_ginseng_state(path)
    # Not an integer: named as found, never parsed or truncated (1.5 used to pass as 1).
    for bad, shown in ((1.5, "1.5"), ("v2", "'v2'")):
        _edit(path, lambda f, bad=bad: f.attrs.__setitem__("format_version", bad))
        with pytest.raises(ValueError, match=rf"'.*m.h5' has format_version {shown}, but this ginseng"):
            load_ginseng_state(path)

    _edit(path, lambda f: f.attrs.__setitem__("format", "anndata"))
    with pytest.raises(
        ValueError,
        match=r"not a ginseng model file: expected attribute format='ginseng.model', found 'anndata'",
    ):
        load_ginseng_state(path)

    save_ginseng_state(make_state(), path, overwrite=True)
    _edit(path, lambda f: f.__delitem__("params"))
    with pytest.raises(ValueError, match=r"'.*m.h5' is incomplete: missing \['params'\]"):
        load_ginseng_state(path)


def test_model_loaded_params_run(tmp_path):
    state = make_state()
    save_ginseng_state(state, tmp_path / "m.h5")
    loaded = load_ginseng_state(tmp_path / "m.h5")
    x = jnp.ones((2, 12))
    a = nn_annotate(state.params, jax.random.key(1), x, 0.0, True, 1e4, False, False)
    b = nn_annotate(loaded.params, jax.random.key(1), x, 0.0, True, 1e4, False, False)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_model_load_inconsistent_shapes(tmp_path):
    path = tmp_path / "m.h5"
    save_ginseng_state(make_state(), path)

    def drop_a_gene(f):
        genes = f["genes"].asstr()[()][:-1]
        del f["genes"]
        f.create_dataset("genes", data=genes, dtype=h5py.string_dtype("utf-8"))

    _edit(path, drop_a_gene)
    with pytest.raises(
        ValueError,
        match=r"inconsistent \(11 genes, 3 labels\): params/features1/W has shape \(12, 12\), expected \(11, \*\)",
    ):
        load_ginseng_state(path)


_KILL_SCRIPT = """
import sys
import numpy as np
from ginseng.io import save_ginseng_state
from ginseng.state import GinsengModelState
rng = np.random.default_rng(0)
layer = lambda i, o: {"W": rng.standard_normal((i, o), dtype=np.float32), "b": np.zeros(o, np.float32)}
params = {"features1": layer(300, 300), "features2": layer(300, 300), "head": layer(300, 4)}
genes = np.array([f"G{i}" for i in range(300)])
state = GinsengModelState(params, genes, np.arange(4), np.array(list("abcd")))
save_ginseng_state(state, sys.argv[1], overwrite=True)
print("ready", flush=True)
while True:
    save_ginseng_state(state, sys.argv[1], overwrite=True)
"""


def test_model_save_killed_mid_write_never_leaves_a_half_file(tmp_path):
    # SIGKILL a process that keeps re-saving a model, at a random moment: the model file is
    # complete (only a hidden temporary may be left behind). One kill keeps the test short.
    path = tmp_path / "m.h5"
    rng = np.random.default_rng(0)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],  # the repo root, so ginseng imports uninstalled
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(float(rng.uniform(0.02, 0.2)))
    proc.kill()
    proc.wait()
    assert load_ginseng_state(path).n_genes == 300
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m.h5"]
    assert all(name.startswith(".m.h5.tmp-") for name in leftovers), leftovers


def test_model_state_repr_is_a_summary_not_every_array():
    text = repr(make_state())
    assert text.startswith("GinsengModelState(n_genes=")
    assert "labels=[B cell, T cell, monocyte]" in text and "arrays" in text
    assert len(text) < 400
