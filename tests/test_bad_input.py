"""The bad-input battery: every way a user can hand ginseng something wrong, and what happens.

Each case pins the error (or warning) message on the part that names what was expected and what
was found, and checks that nothing was written or left behind and that the user's files are
untouched, byte for byte. /work/notes/bad_input_table.md (the README table) lists one row per
case with the test that covers it. Tiny synthetic data: the whole file runs in well under a minute.
"""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from conftest import make_counts

from ginseng.annotate import annotate
from ginseng.config import ConfigKeyError, compose, to_object
from ginseng.data import GinsengDataset
from ginseng.io import load_ginseng_state, read_10x_h5, read_10x_mtx, read_adata, save_ginseng_state
from ginseng.nn import nn_annotate_init
from ginseng.state import GinsengModelState
from ginseng.train import GinsengTrainer, GinsengTrainerSettings
from ginseng.utils import compute_hvgs

REPO = Path(__file__).resolve().parents[1]
N_CELLS, N_GENES = 60, 12


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (or ``root`` itself) -> its bytes: 'untouched' means equal."""
    root = Path(root)
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def names(folder: Path) -> list[str]:
    """Entries of ``folder``, hidden temporaries included."""
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.fixture
def adata():
    return make_counts(n_cells=N_CELLS, n_genes=N_GENES, n_labels=3, n_groups=3, seed=1)


@pytest.fixture
def store(tmp_path, adata):
    """A small dataset (4 row chunks of 16 cells) in its own folder."""
    path = tmp_path / "ds.zarr"
    GinsengDataset.create(path, adata, "cell_type", chunk_size=16, silent=True)
    return path


def make_state(genes, seed=0):
    params = nn_annotate_init(jax.random.key(seed), len(genes), 3, 8)
    return GinsengModelState(
        params, np.asarray(genes, dtype=str), np.arange(3), np.array(["a", "b", "c"])
    )


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.h5"
    save_ginseng_state(make_state([f"GENE{j}" for j in range(N_GENES)]), path)
    return path


# ------------------------------------------------------------------------------------------
# dataset creation
# ------------------------------------------------------------------------------------------


def test_create_labels_length_mismatch(tmp_path, adata):
    with pytest.raises(ValueError, match=f"labels has 10 entries but the data has {N_CELLS} cells"):
        GinsengDataset.create(tmp_path / "d", adata, np.zeros(10), silent=True)
    assert names(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"labels": "celltype"},
            r"labels column 'celltype' not found in adata.obs; columns: \['cell_type', 'donor'\]",
        ),
        ({"groups": "donr"}, r"groups column 'donr' not found in adata.obs; columns: .*'donor'"),
        (
            {"gene_key": "sym"},
            r"gene_key column 'sym' not found in adata.var; columns: \['symbol', 'keep'\]",
        ),
        ({"gene_mask": "kep"}, r"gene_mask column 'kep' not found in adata.var; columns: .*'keep'"),
    ],
    ids=["labels", "groups", "gene_key", "gene_mask"],
)
def test_create_missing_column_lists_what_exists(tmp_path, adata, kwargs, match):
    kwargs = {"labels": "cell_type", **kwargs}
    with pytest.raises(ValueError, match=match):
        GinsengDataset.create(tmp_path / "d", adata, silent=True, **kwargs)
    assert names(tmp_path) == []


def test_create_gene_mask_wrong_length(tmp_path, adata):
    with pytest.raises(
        ValueError, match=f"gene_mask has 5 entries but the data has {N_GENES} genes"
    ):
        GinsengDataset.create(tmp_path / "d", adata, "cell_type", gene_mask=np.ones(5, bool))
    assert names(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # A string column: dtype object (pandas 2) or str (pandas 3).
        ({"gene_mask": "symbol"}, r"gene_mask column 'symbol' must be boolean, found dtype (object|str)"),
        ({"gene_mask": np.zeros(N_GENES, bool)}, f"gene_mask selects 0 of {N_GENES} genes"),
        ({"layer": "raw"}, r"layer 'raw' not found in adata.layers; available: \[\]"),
        ({"chunk_size": 0}, r"chunk_size must be positive, found 0"),
        (
            {"labels": np.array(["a", None] * (N_CELLS // 2), dtype=object)},
            rf"labels has {N_CELLS // 2} missing values \(NaN/None\); every cell needs one",
        ),
    ],
    ids=[
        "mask_not_bool",
        "mask_selects_nothing",
        "unknown_layer",
        "chunk_size_0",
        "missing_labels",
    ],
)
def test_create_other_bad_arguments(tmp_path, adata, kwargs, match):
    kwargs = {"labels": "cell_type", **kwargs}
    with pytest.raises(ValueError, match=match):
        GinsengDataset.create(tmp_path / "d", adata, silent=True, **kwargs)
    assert names(tmp_path) == []


def test_create_fewer_than_two_labels(tmp_path, adata):
    with pytest.raises(ValueError, match=r"at least 2 labels, found 1: \['only'\]"):
        GinsengDataset.create(tmp_path / "d", adata, np.array(["only"] * N_CELLS), silent=True)
    assert names(tmp_path) == []


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (-3.0, "counts must be non-negative, found -3"),
        (np.nan, "counts must be finite, found 1 NaN/inf"),
        (np.inf, "counts must be finite, found 1 NaN/inf"),
    ],
    ids=["negative", "nan", "inf"],
)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_create_bad_counts(tmp_path, value, match, sparse):
    ad = make_counts(n_cells=N_CELLS, n_genes=N_GENES, n_labels=3, seed=1, sparse=sparse)
    if sparse:
        ad.X.data[5] = value
    else:
        ad.X[7, 2] = value
    with pytest.raises(ValueError, match=match):
        GinsengDataset.create(tmp_path / "d", ad, "cell_type", silent=True)
    assert names(tmp_path) == []


def test_create_non_integer_counts_warns_and_keeps_values(tmp_path, adata):
    adata.X = adata.X / 3.0  # e.g. normalized data: the run can go on, so a warning
    with pytest.warns(UserWarning, match="counts contain non-integer values .* storing float32"):
        ds = GinsengDataset.create(tmp_path / "d", adata, "cell_type", silent=True)
    np.testing.assert_array_equal(ds.get_batch(np.arange(N_CELLS)), adata.X.astype(np.float32))


def test_create_existing_dataset_refused_and_untouched(store, adata):
    before = snapshot(store)
    with pytest.raises(
        FileExistsError, match=r"dataset path '.*ds.zarr' already exists; pass overwrite=True"
    ):
        GinsengDataset.create(store, adata, "donor", silent=True)
    assert snapshot(store) == before


def test_create_overwrite_with_bad_input_keeps_old_dataset(store, adata):
    # overwrite=True replaces a dataset only once the new one is complete: bad input keeps it.
    before = snapshot(store)
    with pytest.raises(ValueError, match="labels column 'nope' not found"):
        GinsengDataset.create(store, adata, "nope", overwrite=True, silent=True)
    assert snapshot(store) == before
    assert names(store.parent) == ["ds.zarr"]


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_create_never_deletes_a_user_path_even_with_overwrite(tmp_path, adata, kind):
    target = tmp_path / "results"
    if kind == "directory":
        target.mkdir()
        (target / "precious.csv").write_bytes(b"id,value\n1,2\n")
        (target / "sub").mkdir()
        (target / "sub" / "notes.txt").write_bytes(b"\x00\x01 keep")
    else:
        target.write_bytes(b"my thesis")
    before = snapshot(target)
    for overwrite in (False, True):
        with pytest.raises(
            FileExistsError,
            match=r"'.*results' (already exists|exists and is not a ginseng dataset; refusing)",
        ):
            GinsengDataset.create(target, adata, "cell_type", overwrite=overwrite, silent=True)
    assert snapshot(target) == before
    assert names(tmp_path) == ["results"]


def test_create_failure_midway_leaves_nothing(tmp_path, adata, monkeypatch):
    # A failure after the counts were written (here: disk full while writing labels).
    real = GinsengDataset._write_permuted

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GinsengDataset, "_write_permuted", staticmethod(write_then_fail))
    with pytest.raises(OSError, match="No space left"):
        GinsengDataset.create(tmp_path / "d", adata, "cell_type", silent=True)
    assert names(tmp_path) == []  # no store, no temporary directory


_KILL_CREATE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from ginseng._core import files as _files
    from ginseng.data import GinsengDataset

    where = sys.argv[2]
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(64, 8)).astype(np.float32)
    labels = np.repeat(["a", "b"], 32)
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if where == "after_counts":
        real = GinsengDataset._write_permuted
        def write_then_die(*args, **kwargs):
            real(*args, **kwargs)
            die()
        GinsengDataset._write_permuted = staticmethod(write_then_die)
    else:  # just before the temporary directory is renamed into place
        real_replace = os.replace
        def replace(src, dst):  # zarr renames its own files too: only the store's rename dies
            if os.path.basename(dst) == os.path.basename(sys.argv[1]):
                die()
            real_replace(src, dst)
        _files.os.replace = replace
    GinsengDataset.create(sys.argv[1], X, labels, chunk_size=16, silent=True)
    """
)


@pytest.mark.parametrize("where", ["after_counts", "before_rename"])
def test_create_killed_never_leaves_a_store_that_opens(tmp_path, where):
    target = tmp_path / "d.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_CREATE, str(target), where],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists()
    with pytest.raises(ValueError, match=r"'.*d.zarr' is not a ginseng dataset"):
        GinsengDataset(target)
    leftovers = names(tmp_path)
    assert leftovers and all(n.startswith(".d.zarr.tmp-") for n in leftovers), leftovers
    if where == "after_counts":  # the hidden temporary itself is refused as incomplete
        with pytest.raises(ValueError, match="is an incomplete ginseng dataset"):
            GinsengDataset(tmp_path / leftovers[0])


_KILL_OVERWRITE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from ginseng._core import files as _files
    from ginseng.data import GinsengDataset

    X = np.random.default_rng(0).poisson(2.0, size=(64, 8)).astype(np.float32)
    labels = np.repeat(["a", "b"], 32)
    GinsengDataset.create(sys.argv[1], X, labels, silent=True)
    real = _files._remove
    def remove_then_die(path):
        # The new store has been swapped into place; the old one (now at the temporary name)
        # is about to be removed. Die at exactly this point.
        if os.path.basename(path).startswith(".d.zarr.tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)
        real(path)
    _files._remove = remove_then_die
    GinsengDataset.create(sys.argv[1], X, labels, overwrite=True, silent=True)
    """
)


def test_overwrite_killed_between_renames_keeps_a_dataset_at_the_path(tmp_path):
    target = tmp_path / "d.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_OVERWRITE, str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert GinsengDataset(target).n_cells == 64


# ------------------------------------------------------------------------------------------
# opening a store
# ------------------------------------------------------------------------------------------


def test_open_not_a_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "zarr.json").write_text("{not json")
    (tmp_path / "file.txt").write_text("hello")
    before = snapshot(tmp_path)
    for path in ("folder", "file.txt", "missing"):
        with pytest.raises(
            ValueError,
            match=rf"'.*{path}' is not a ginseng dataset \(no zarr group with format 'ginseng.dataset'\)",
        ):
            GinsengDataset(tmp_path / path)
    assert snapshot(tmp_path) == before


def _edit_attrs(store: Path, **changes) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"complete": False},
            r"'.*ds.zarr' is an incomplete ginseng dataset \(its creation did not finish\)",
        ),
        (
            {"format_version": 99},
            r"'.*ds.zarr' is a ginseng dataset of format_version 99; this ginseng reads version 1",
        ),
    ],
    ids=["incomplete", "unknown_version"],
)
def test_open_incomplete_or_unknown_version(store, changes, match):
    _edit_attrs(store, **changes)
    before = snapshot(store)
    with pytest.raises(ValueError, match=match):
        GinsengDataset(store)
    assert snapshot(store) == before  # opening never modifies anything


def _x_chunks(store: Path) -> list[Path]:
    return sorted(p for p in (store / "X" / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_damaged_count_chunk_names_the_store(store, damage):
    chunk = _x_chunks(store)[1]  # rows 16..31 of storage order
    if damage == "deleted":
        chunk.unlink()  # used to read back silently as 16 cells of zeros
    else:
        chunk.write_bytes(b"\x00garbage" * 8)
    ds = GinsengDataset(store)  # the counts are read lazily: the error comes on reading them
    match = rf"ginseng dataset '.*ds.zarr' is damaged: reading counts failed .*{chunk.name}"
    with pytest.raises(ValueError, match=match):
        ds.get_batch(np.arange(N_CELLS))
    with pytest.raises(ValueError, match=match):
        for _ in ds.loader(8, split="all", shuffle=True).epoch(0):
            pass
    with pytest.raises(ValueError, match=match):
        list(ds.iter_batches(8))


@pytest.mark.parametrize("damage", ["deleted", "corrupted", "truncated_metadata"])
def test_damaged_metadata_refused_on_open(store, damage):
    labels_chunk = store / "labels" / "c" / "0"
    if damage == "deleted":
        labels_chunk.unlink()  # used to read back silently as all cells of label 0
        match = r"'.*ds.zarr' is damaged: array 'labels' has 0 of its 1 chunk files"
    elif damage == "corrupted":
        labels_chunk.write_bytes(b"xx")
        match = (
            r"'.*ds.zarr' is damaged: reading its metadata failed \(RuntimeError: .*decompression"
        )
    else:
        (store / "genes" / "zarr.json").write_text('{"zarr_format": 3')
        match = r"'.*ds.zarr' is damaged: reading its metadata failed"
    with pytest.raises(ValueError, match=match):
        GinsengDataset(store)


# ------------------------------------------------------------------------------------------
# holdout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan")])
def test_holdout_fraction_outside_open_unit_interval(store, fraction):
    ds = GinsengDataset(store)
    before = snapshot(store)
    with pytest.raises(
        ValueError, match=rf"holdout_fraction must be in \(0, 1\), found {fraction}"
    ):
        ds.make_holdout(fraction)
    assert snapshot(store) == before and not ds.has_holdout()


def test_holdout_leaving_a_label_without_holdout_cells(store):
    ds = GinsengDataset(store)
    smallest = int(np.bincount(ds.labels).min())
    with pytest.raises(
        ValueError,
        match=rf"holdout_fraction=0.01 leaves no holdout cells: the smallest label 'type_.' has {smallest} cells",
    ):
        ds.make_holdout(0.01)
    assert not GinsengDataset(store).has_holdout()


def test_holdout_unknown_group_mode(store):
    ds = GinsengDataset(store)
    with pytest.raises(
        ValueError, match=r"group_mode must be one of \('fraction', 'loo'\), found 'random'"
    ):
        ds.make_holdout(0.2, group_level=True, group_mode="random")


def test_holdout_group_level_without_groups(store):
    with pytest.raises(
        ValueError,
        match="group_level=True needs groups, but this dataset was created without groups",
    ):
        GinsengDataset(store).make_holdout(0.2, group_level=True)


def test_holdout_group_level_missing_label_warns(tmp_path):
    # label 'c' lives only in donor 'd2': holding out d2 leaves 'c' without training cells,
    # holding out d0 leaves it without holdout cells. The run can go on: a warning says which.
    X = np.random.default_rng(0).poisson(2.0, (30, 6)).astype(np.float32)
    labels = np.array(["a", "b"] * 10 + ["c"] * 10)
    groups = np.array(["d0", "d1"] * 10 + ["d2"] * 10)
    ds = GinsengDataset.create(tmp_path / "d", X, labels, groups=groups, silent=True)
    with pytest.warns(
        UserWarning,
        match=r"held-out groups \['d.'\]\) leaves [12] of 3 labels with no (holdout|training) cells: \['",
    ) as rec:
        ds.make_holdout(0.3, rng=0, group_level=True, group_mode="loo")
    held = ds.groups[ds.holdout_indices[0]]
    expected = {
        "d2": {"holdout": "['a', 'b']", "training": "['c']"},
        "d0": {"holdout": "['c']"},
        "d1": {"holdout": "['c']"},
    }[held]
    got = {
        m: str(r.message).split(": ")[-1]
        for r in rec
        for m in ("holdout", "training")
        if f"no {m} cells" in str(r.message)
    }
    assert got == expected
    assert ds.has_holdout()


# ------------------------------------------------------------------------------------------
# loader / iter_batches
# ------------------------------------------------------------------------------------------


def test_unknown_split(store):
    ds = GinsengDataset(store)
    match = r"split must be one of \('train', 'holdout', 'all'\), found 'test'"
    with pytest.raises(ValueError, match=match):
        ds.loader(8, split="test")
    with pytest.raises(ValueError, match=match):
        list(ds.iter_batches(8, split="test"))
    with pytest.raises(ValueError, match=match):
        ds.__len__("test")


@pytest.mark.parametrize("batch_size", [0, -4, 2.5, True])
def test_batch_size_below_one_or_not_an_integer(store, batch_size):
    ds = GinsengDataset(store)
    match = rf"batch_size must be an integer >= 1, found {batch_size!r}"
    with pytest.raises(ValueError, match=match):
        ds.loader(batch_size)
    with pytest.raises(ValueError, match=match):
        list(ds.iter_batches(batch_size))


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("batch_size", 0, "an integer >= 1"),
        ("lr", -1e-3, "a number > 0.0"),
        ("holdout_fraction", 1.0, "a number > 0.0 and < 1.0"),
        ("dropout_rate", 1.0, "a number >= 0.0 and < 1.0"),
        ("hidden_dim", 12.5, "an integer >= 1"),
    ],
)
def test_trainer_settings_bad_value_names_the_field(field, value, expected):
    with pytest.raises(
        ValueError, match=rf"GinsengTrainerSettings.{field} must be {expected}, got {value!r}"
    ):
        GinsengTrainerSettings(**{field: value})


def test_trainer_settings_unknown_group_mode():
    with pytest.raises(ValueError, match=r"group_mode must be 'fraction' or 'loo', got 'random'"):
        GinsengTrainerSettings(group_mode="random")


@pytest.mark.parametrize("what", ["missing", "folder", "h5ad"])
def test_trainer_dataset_path_that_is_not_a_dataset(tmp_path, adata, what):
    path = tmp_path / {"missing": "nope.zarr", "folder": "data", "h5ad": "cells.h5ad"}[what]
    if what == "folder":
        path.mkdir()
        (path / "readme.txt").write_text("mine")
    elif what == "h5ad":
        adata.write_h5ad(path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=rf"'.*{path.name}' is not a ginseng dataset"):
        GinsengTrainer(path, GinsengTrainerSettings(), epochs=1, silent=True)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------
# model files
# ------------------------------------------------------------------------------------------


def test_model_file_truncated(model_file):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError,
        match=r"model file '.*model.h5' cannot be opened as HDF5; it is truncated or corrupted",
    ):
        load_ginseng_state(model_file)


def test_model_file_corrupted_in_the_middle(model_file):
    # Zeroed bytes inside a weight matrix: HDF5 reads them without complaint, so before the
    # checksum this loaded a silently different model.
    with h5py.File(model_file, "r") as f:
        offset = f["params/head/W"].id.get_offset()
    data = bytearray(model_file.read_bytes())
    data[offset + 8 : offset + 72] = bytes(64)
    model_file.write_bytes(bytes(data))
    with pytest.raises(
        ValueError,
        match=r"model file '.*model.h5' is corrupted: its content does not match the checksum",
    ):
        load_ginseng_state(model_file)


@pytest.mark.parametrize(
    "content", [b"", b"params,genes\n1,2\n", b"\x80\x04\x95pickle"], ids=["empty", "csv", "pickle"]
)
def test_model_file_not_hdf5(model_file, content):
    model_file.write_bytes(content)
    with pytest.raises(ValueError, match=r"model file '.*model.h5' is not an HDF5 file"):
        load_ginseng_state(model_file)


def test_model_file_unknown_version(model_file):
    with h5py.File(model_file, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(
        ValueError,
        match=r"'.*model.h5' has format_version 3, but this ginseng .* reads format_version 1",
    ):
        load_ginseng_state(model_file)


def test_model_file_wrong_format(tmp_path, adata):
    path = tmp_path / "cells.h5ad"  # an HDF5 file, but an AnnData one
    adata.write_h5ad(path)
    with pytest.raises(
        ValueError,
        match=r"'.*cells.h5ad' is not a ginseng model file: expected attribute format='ginseng.model', found None",
    ):
        load_ginseng_state(path)


def test_model_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model file '.*nope.h5' does not exist"):
        load_ginseng_state(tmp_path / "nope.h5")


def test_model_save_existing_refused_and_untouched(model_file):
    before = snapshot(model_file)
    with pytest.raises(
        FileExistsError, match=r"model file '.*model.h5' already exists; pass overwrite=True"
    ):
        save_ginseng_state(make_state(["X", "Y"]), model_file)
    assert snapshot(model_file) == before


# ------------------------------------------------------------------------------------------
# annotate
# ------------------------------------------------------------------------------------------


def test_annotate_no_gene_overlap(tmp_path, adata):
    state = make_state([f"OTHER{j}" for j in range(5)])
    with pytest.raises(
        ValueError,
        match=r"none of the model's 5 genes .* are in the input's 12 genes \(adata.var_names",
    ):
        annotate(state, adata, output=tmp_path / "out.csv", silent=True)
    assert names(tmp_path) == []


def test_annotate_ensembl_against_symbols_names_both_kinds(tmp_path, adata):
    state = make_state([f"ENSG{j:011d}" for j in range(N_GENES)])
    with pytest.raises(
        ValueError,
        match=r"the model's genes are Ensembl ids \(e.g. .*'ENSG00000000000'.*\) but the input's genes \(adata.var_names\) are gene symbols \(e.g. .*'GENE0'.*\); 0 of 12 model genes match",
    ):
        annotate(state, adata, output=tmp_path / "out.csv", silent=True)
    assert names(tmp_path) == []


def test_annotate_gene_examples_print_as_plain_strings(adata):
    # The messages quote example genes with repr() of numpy scalars: "(e.g. np.str_('ENSG...'))"
    # and "(e.g. [np.str_('OTHER0'), ...])"; a user should read "(e.g. 'ENSG...')".
    with pytest.raises(ValueError) as err:
        annotate(make_state([f"ENSG{j:011d}" for j in range(N_GENES)]), adata, silent=True)
    assert "np.str_" not in str(err.value)
    with pytest.raises(ValueError) as err:
        annotate(make_state([f"OTHER{j}" for j in range(5)]), adata, silent=True)
    assert "np.str_" not in str(err.value)


def test_annotate_partial_overlap_warns_with_percentage(adata):
    state = make_state([f"GENE{j}" for j in range(9)] + ["NEW1", "NEW2", "NEW3"])
    with pytest.warns(UserWarning, match=r"only 9 of the model's 12 genes \(75.0%\) were found"):
        annotate(state, adata, silent=True)
    assert adata.obs["ginseng_cell_type"].notna().all()  # the run went on


@pytest.mark.parametrize("batch_size", [0, -1])
def test_annotate_batch_size_below_one(tmp_path, adata, batch_size):
    state = make_state(list(adata.var_names))
    with pytest.raises(ValueError, match=rf"batch_size must be an integer >= 1, got {batch_size}"):
        annotate(state, adata, batch_size=batch_size, output=tmp_path / "o.csv", silent=True)
    assert names(tmp_path) == []


def test_annotate_existing_output_without_overwrite(tmp_path, adata):
    out = tmp_path / "cells.csv"
    out.write_bytes(b"barcode,cell_type\nmine,mine\n")
    state = make_state(list(adata.var_names))
    with pytest.raises(FileExistsError, match=r"'.*cells.csv' already exists; pass overwrite=True"):
        annotate(state, adata, output=out, silent=True)
    assert out.read_bytes() == b"barcode,cell_type\nmine,mine\n"
    assert names(tmp_path) == ["cells.csv"]


def test_annotate_output_directory_missing(tmp_path, adata):
    state = make_state(list(adata.var_names))
    with pytest.raises(
        FileNotFoundError, match=r"the directory of .*'.*nodir/cells.csv' does not exist"
    ):
        annotate(state, adata, output=tmp_path / "nodir" / "cells.csv", silent=True)
    assert names(tmp_path) == []


def test_annotate_unknown_output_extension(tmp_path, adata):
    state = make_state(list(adata.var_names))
    with pytest.raises(
        ValueError,
        match=r"'.*cells.xlsx' has extension '.xlsx'; expected one of \['.csv', .*'.parquet'",
    ):
        annotate(state, adata, output=tmp_path / "cells.xlsx", silent=True)
    assert names(tmp_path) == []


def test_annotate_unreadable_model_writes_nothing(tmp_path, adata):
    bad = tmp_path / "model.h5"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"model file '.*model.h5' is not an HDF5 file"):
        annotate(bad, adata, output=tmp_path / "cells.csv", silent=True)
    assert names(tmp_path) == ["model.h5"]


# ------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------


def test_read_missing_path(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"input '.*nope.h5ad' does not exist; expected an AnnData '.h5ad' file",
    ):
        read_adata(tmp_path / "nope.h5ad")


@pytest.mark.parametrize("name", ["cells.csv", "cells.loom", "cells"])
def test_read_unknown_extension(tmp_path, name):
    (tmp_path / name).write_text("a,b\n1,2\n")
    ext = re.escape(Path(name).suffix or "(no extension)")
    with pytest.raises(
        ValueError, match=rf"unsupported file type '{ext}'; expected .*'.h5ad'.*'.h5'.*mtx"
    ):
        read_adata(tmp_path / name)


def test_read_truncated_h5ad(tmp_path, adata):
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(
        ValueError, match=r"could not read h5ad file '.*cells.h5ad' \(truncated or corrupted\?\)"
    ):
        read_adata(path)


def _write_mtx(folder: Path, X: np.ndarray) -> None:
    folder.mkdir()
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(X.T.astype(np.int64)))
    (folder / "barcodes.tsv").write_text("".join(f"C{i}\n" for i in range(X.shape[0])))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.write("".join(f"ENSG{j:011d}\tG{j}\tGene Expression\n" for j in range(X.shape[1])))


@pytest.mark.parametrize(
    ("missing", "what"),
    [("matrix.mtx", "matrix"), ("barcodes.tsv", "barcodes"), ("features.tsv.gz", "features")],
)
def test_read_mtx_folder_missing_a_file(tmp_path, missing, what):
    folder = tmp_path / "mtx"
    _write_mtx(folder, np.ones((3, 4), np.float32))
    (folder / missing).unlink()
    present = sorted(p.name for p in folder.iterdir())
    with pytest.raises(
        FileNotFoundError,
        match=rf"'.*mtx' is missing: {what} \(.*\); it contains {present!r}".replace(
            "[", r"\["
        ).replace("]", r"\]"),
    ):
        read_10x_mtx(folder)
    # read_adata sends a folder to read_10x_mtx: the same error
    with pytest.raises(FileNotFoundError, match=rf"is missing: {what} "):
        read_adata(folder)


def test_read_10x_h5_unknown_genome(tmp_path):
    path = tmp_path / "f.h5"
    csc = sp.csc_matrix(np.ones((4, 3), np.int32))  # genes x cells
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array(csc.shape, np.int32)
        g["barcodes"] = np.array(["A", "B", "C"], dtype="S")
        ft = g.create_group("features")
        ft["id"] = np.array([f"ENSG{j:011d}" for j in range(4)], dtype="S")
        ft["name"] = np.array(["A1", "B1", "C1", "D1"], dtype="S")
        ft["genome"] = np.array(["GRCh38", "GRCh38", "mm10", "mm10"], dtype="S")
    with pytest.raises(
        ValueError,
        match=r"genome 'hg19' is not in 10x h5 file '.*f.h5'; available genomes: \['GRCh38', 'mm10'\]",
    ):
        read_10x_h5(path, genome="hg19")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_top_genes": 0}, ValueError, r"n_top_genes must be an integer >= 1, got 0"),
        ({"layer": "raw"}, KeyError, r"layer 'raw' is not in adata.layers; available layers: \[\]"),
        (
            {"min_mean": 5, "max_mean": 1},
            ValueError,
            r"min_mean must be smaller than max_mean, got min_mean=5, max_mean=1",
        ),
    ],
    ids=["n_top_genes_0", "unknown_layer", "min_above_max"],
)
def test_compute_hvgs_bad_arguments(adata, kwargs, error, match):
    before = adata.var.copy()
    with pytest.raises(error, match=match):
        compute_hvgs(adata, **kwargs)
    assert adata.var.equals(before)  # nothing marked


def test_annotate_truth_key_missing_column(adata):
    state = make_state(list(adata.var_names))
    with pytest.raises(
        ValueError,
        match=r"truth_key 'celltype' is not a column of adata.obs; available columns: \['cell_type', 'donor'\]",
    ):
        annotate(state, adata, truth_key="celltype", silent=True)
    assert "ginseng_cell_type" not in adata.obs


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("GINSENG_RUN_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "ginseng.launch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_misspelled_override_lists_valid_keys(tmp_path):
    proc = _cli(["trainer.epoch=3"], tmp_path)
    assert proc.returncode == 2
    assert "unknown config key 'trainer.epoch'" in proc.stderr
    assert "Did you mean 'trainer.epochs'?" in proc.stderr
    assert "Valid keys: trainer.balance_train, trainer.batch_size" in proc.stderr
    assert names(tmp_path) == []  # no run directory for a command that never ran
    with pytest.raises(
        ConfigKeyError,
        match=r"'trainr' is not a key of the top level of the config. Did you mean 'trainer'\? Valid keys: annotate, data",
    ):
        compose(["trainr.epochs=3"])


def test_cli_input_error_is_one_line_not_a_traceback(tmp_path):
    adata = make_counts(n_cells=20, n_genes=6, n_labels=2, seed=0)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    run_dir = tmp_path / "run"
    args = [f"data.path={tmp_path / 'cells.h5ad'}", "data.labels=celltype", f"hydra.run.dir={run_dir}"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 1
    assert "Error: data.labels='celltype' is not a column of obs in" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "HYDRA_FULL_ERROR=1" in proc.stderr
    assert "Error: data.labels='celltype'" in (run_dir / "launch.log").read_text()
    assert not (run_dir / "dataset.zarr").exists()


def test_cli_unknown_task_value(tmp_path):
    proc = _cli(["task=bogus"], tmp_path)
    assert proc.returncode != 0
    assert "Invalid value 'bogus', expected one of [prepare, train, annotate]" in proc.stderr
    assert names(tmp_path) == []


def test_cli_bad_value_names_the_key():
    with pytest.raises(ValueError, match=r"trainer.batch_size must be an integer >= 1, got 0"):
        to_object(compose(["trainer.batch_size=0"]))


def test_cli_missing_data_path(tmp_path):
    from ginseng import tasks

    conf = to_object(
        compose(["task=prepare", f"data.path={tmp_path / 'nope.h5ad'}", "silent=true"])
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"data.path '.*nope.h5ad' does not exist \(expected an .h5ad, 10x .h5 or mtx folder\)",
    ):
        tasks.run(conf, tmp_path / "run")
    assert not (tmp_path / "run").exists() or names(tmp_path / "run") == []


def test_cli_annotate_without_model_or_input(tmp_path):
    from ginseng import tasks

    conf = to_object(compose(["task=annotate", "silent=true"]))
    with pytest.raises(
        ValueError,
        match=r"task=annotate needs annotate.model=<model.h5> and annotate.input=.*; missing: annotate.model, annotate.input",
    ):
        tasks.run(conf, tmp_path / "run")
    conf = to_object(
        compose(
            [
                "task=annotate",
                f"annotate.model={tmp_path / 'm.h5'}",
                f"annotate.input={tmp_path / 'c.h5ad'}",
                "silent=true",
            ]
        )
    )
    with pytest.raises(FileNotFoundError, match=r"annotate.model '.*m.h5' does not exist"):
        tasks.run(conf, tmp_path / "run")


def test_cli_missing_label_column(tmp_path, adata):
    from ginseng import tasks

    adata.write_h5ad(tmp_path / "cells.h5ad")
    conf = to_object(
        compose(
            [
                "task=prepare",
                f"data.path={tmp_path / 'cells.h5ad'}",
                "data.labels=celltype",
                "silent=true",
            ]
        )
    )
    with pytest.raises(
        KeyError,
        match=r"data.labels='celltype' is not a column of obs in '.*cells.h5ad'; obs has: cell_type, donor",
    ):
        tasks.run(conf, tmp_path / "run")


def _with_rare_label(adata, n_rare):
    adata = adata.copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[:n_rare] = "rare"
    adata.obs["cell_type"] = labels
    return adata


def test_cli_leaves_out_labels_below_min_cells_and_says_which(tmp_path, adata):
    # baron_mouse1 has a 2-cell label: the default run used to crash after building the store.
    from ginseng import tasks

    _with_rare_label(adata, 3).write_h5ad(tmp_path / "cells.h5ad")
    conf = to_object(compose([
        "task=prepare", f"data.path={tmp_path / 'cells.h5ad'}", "genes.select=all", "silent=true",
    ]))
    with pytest.warns(UserWarning, match=r"leaving out 1 of 4 labels with fewer than 6 cells \(3 cells; the model will not know them\): 'rare' \(3\)\. .*data.min_cells sets the minimum"):
        prepared = tasks.run(conf, tmp_path / "run")
    assert "rare" not in set(prepared.dataset.label_values)
    assert prepared.dataset.n_cells + len(prepared.test_indices) == N_CELLS - 3
    assert not np.isin(np.arange(3), np.concatenate([prepared.train_indices, prepared.test_indices])).any()


def test_cli_refuses_a_holdout_of_no_cells_before_building_anything(tmp_path, adata):
    from ginseng import tasks

    _with_rare_label(adata, 3).write_h5ad(tmp_path / "cells.h5ad")
    conf = to_object(compose([
        "task=train", f"data.path={tmp_path / 'cells.h5ad'}", "data.min_cells=0", "silent=true",
    ]))
    with pytest.raises(
        ValueError,
        match=r"trainer.holdout_fraction=0.2 holds out no cell of each label: the smallest label 'rare' has 2 training cells .*Raise data.min_cells .* or trainer.holdout_fraction \(to >= 0.5\)",
    ):
        tasks.run(conf, tmp_path / "run")
    assert names(tmp_path / "run") == []


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("data.gene_key=gene_symbol", r"data.gene_key='gene_symbol' is not a column of var in '.*cells.h5ad'; var has: symbol, keep"),
        ("data.layer=counts", r"data.layer='counts' is not a layer of '.*cells.h5ad'; layers: \(none: the counts are in X\)"),
    ],
)
def test_cli_missing_gene_key_or_layer_named_before_any_work(tmp_path, adata, override, pattern):
    from ginseng import tasks

    adata.write_h5ad(tmp_path / "cells.h5ad")
    conf = to_object(compose(["task=prepare", f"data.path={tmp_path / 'cells.h5ad'}", override, "silent=true"]))
    with pytest.raises(KeyError, match=pattern):
        tasks.run(conf, tmp_path / "run")
    assert names(tmp_path / "run") == []


def test_duplicated_gene_names_refused_and_nothing_written(tmp_path, adata):
    # A model maps genes by name: two columns with one name used to be stored silently, and
    # annotate then fed both model inputs from the first column.
    adata = adata.copy()
    names_ = adata.var_names.to_numpy().copy()
    names_[5] = names_[2]
    adata.var_names = names_
    with pytest.raises(
        ValueError,
        match=rf"gene names must be unique .* adata.var_names has 1 duplicated name\(s\) among the {N_GENES} genes kept: \['{names_[2]}'\]; make them unique first",
    ):
        GinsengDataset.create(tmp_path / "ds", adata, labels="cell_type", silent=True)
    assert names(tmp_path) == []
    mask = np.ones(N_GENES, bool)
    mask[5] = False  # without the duplicate it is fine
    GinsengDataset.create(tmp_path / "ds", adata, labels="cell_type", gene_mask=mask, silent=True)


def test_create_accepts_coo_and_nullable_boolean_mask_and_names_a_path(tmp_path, adata):
    X = sp.csr_matrix(adata.X)
    ds = GinsengDataset.create(tmp_path / "coo", X.tocoo(), labels=adata.obs["cell_type"].to_numpy(), silent=True)
    np.testing.assert_array_equal(ds.get_batch(np.arange(N_CELLS)), X.toarray())
    ad = adata.copy()
    ad.var["nb"] = pd.array([True] * (N_GENES - 1) + [False], dtype="boolean")
    ds = GinsengDataset.create(tmp_path / "nb", ad, labels="cell_type", gene_mask="nb", silent=True)
    assert ds.n_genes == N_GENES - 1
    ad.var["nb"] = pd.array([True] * (N_GENES - 1) + [None], dtype="boolean")
    with pytest.raises(ValueError, match="gene_mask column 'nb' has 1 missing values"):
        GinsengDataset.create(tmp_path / "nb2", ad, labels="cell_type", gene_mask="nb", silent=True)
    with pytest.raises(TypeError, match=r"found the path '.*x.h5ad': read it first"):
        GinsengDataset.create(tmp_path / "p", str(tmp_path / "x.h5ad"), labels="cell_type", silent=True)
    assert names(tmp_path) == ["coo", "nb"]
