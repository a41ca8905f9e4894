import pytest

from ginseng._core.files import atomic_path


def test_file_written_only_on_success(tmp_path):
    target = tmp_path / "model.h5"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.h5"]


def test_failure_leaves_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.h5"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target, overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.h5"]


def test_existing_target_refused_without_overwrite(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("user data")
    with pytest.raises(FileExistsError, match="out.csv' already exists; pass overwrite=True"), atomic_path(target, what="output"):
        pass
    assert target.read_text() == "user data"


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: .*nowhere"), atomic_path(tmp_path / "nowhere" / "x.h5"):
        pass


def _ours(path):
    return (path / "MARK").is_file()


def test_directories_replace_atomically(tmp_path):
    target = tmp_path / "store.zarr"
    with atomic_path(target, kind="dir", replaceable=_ours) as tmp:
        tmp.mkdir()
        (tmp / "MARK").write_text("1")
    with atomic_path(target, overwrite=True, kind="dir", replaceable=_ours) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]


def test_overwrite_never_replaces_a_directory_with_a_file(tmp_path):
    # overwrite=True asks to replace an earlier output, not to delete a user's folder that
    # happens to sit at the output path (this used to rmtree it).
    target = tmp_path / "table.csv"
    target.mkdir()
    (target / "precious.txt").write_text("data")
    with pytest.raises(FileExistsError, match="is an existing directory; refusing"), atomic_path(target, overwrite=True) as tmp:
        tmp.write_text("x")
    assert (target / "precious.txt").read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


@pytest.mark.parametrize("existing", ["foreign_dir", "file"])
def test_overwrite_replaces_only_our_own_directories(tmp_path, existing):
    target = tmp_path / "out.zarr"
    if existing == "file":
        target.write_text("user file")
    else:
        target.mkdir()
        (target / "precious.txt").write_text("data")
    found = "an existing file" if existing == "file" else "a directory ginseng did not write"
    with pytest.raises(FileExistsError, match=f"is {found}; refusing"), atomic_path(target, overwrite=True, kind="dir", replaceable=_ours) as tmp:
        tmp.mkdir()
    if existing == "file":
        assert target.read_text() == "user file"
    else:
        assert (target / "precious.txt").read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_target_that_changes_kind_while_writing_is_not_replaced(tmp_path):
    target = tmp_path / "model.h5"
    target.write_text("old")
    with pytest.raises(FileExistsError, match="is an existing directory"), atomic_path(target, overwrite=True) as tmp:
        tmp.write_text("new")
        target.unlink()
        target.mkdir()
        (target / "x").write_text("user")
    assert (target / "x").read_text() == "user"


def test_package_exposes_every_seed_module_lazily():
    import subprocess
    import sys

    code = (
        "import sys, ginseng\n"
        "assert 'ginseng.data' not in sys.modules\n"
        "for m in ('annotate','augment','data','io','nn','opt','train','utils'):\n"
        "    assert getattr(ginseng, m).__name__ == 'ginseng.' + m\n"
        "print(ginseng.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip()
