"""Writing files so that nothing is ever half-written, and never over a user's file by accident.

Every file ginseng writes goes to a temporary name in the destination's own directory (so the
final rename is atomic on POSIX filesystems), is flushed, and is renamed into place only when
complete. A failure removes the temporary and leaves any previous file untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_path", "check_writable_target"]


def check_writable_target(
    path: str | os.PathLike,
    overwrite: bool = False,
    what: str = "output",
    kind: str = "file",
    replaceable: Callable[[Path], bool] | None = None,
) -> Path:
    """Validate that ``path`` may be written: its directory exists and it does not exist yet.

    ``overwrite=True`` allows replacing what is there only when it is of the same ``kind`` as
    what will be written: a file for ``kind="file"``; for ``kind="dir"``, a directory that
    ``replaceable`` recognises as ginseng's own (a dataset or annotation store). A directory is
    never replaced by a file, nor a file by a directory, nor a user's directory by a store:
    ``overwrite`` is a request to replace an earlier output, not to delete whatever is there.

    Raises
    ------
    FileNotFoundError
        When the parent directory does not exist.
    FileExistsError
        When ``path`` exists and ``overwrite`` is False, or it exists and is not something that
        ``overwrite`` may replace.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        msg = f"the directory of {what} {str(path)!r} does not exist: {str(parent)!r}"
        raise FileNotFoundError(msg)
    if path.exists() or path.is_symlink():
        if not overwrite:
            msg = f"{what} {str(path)!r} already exists; pass overwrite=True to replace it"
            raise FileExistsError(msg)
        is_dir = path.is_dir()
        if kind == "file" and is_dir:
            msg = (
                f"{what} {str(path)!r} is an existing directory; refusing to replace it with a "
                "file even with overwrite=True. Choose another path or remove it yourself."
            )
            raise FileExistsError(msg)
        if kind == "dir" and (not is_dir or replaceable is None or not replaceable(path)):
            found = "a directory ginseng did not write" if is_dir else "an existing file"
            msg = (
                f"{what} {str(path)!r} is {found}; refusing to replace it even with "
                "overwrite=True. Choose another path or remove it yourself."
            )
            raise FileExistsError(msg)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike,
    overwrite: bool = False,
    what: str = "output",
    kind: str = "file",
    replaceable: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Works for files (``kind="file"``) and directories (``kind="dir"``: a zarr store). On any
    exception the temporary is removed and ``path`` is left as it was. With ``overwrite=True``
    an existing ``path`` is replaced only after the new one is complete, and only when
    :func:`check_writable_target` allows it (same kind; a directory only when ``replaceable``
    recognises it), checked both before and after writing.

    Examples
    --------
    >>> with atomic_path("model.h5") as tmp:        # doctest: +SKIP
    ...     write_hdf5(tmp)
    """
    if kind not in ("file", "dir"):
        msg = f"kind must be 'file' or 'dir', got {kind!r}"
        raise ValueError(msg)
    final = check_writable_target(path, overwrite, what, kind, replaceable)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_dir() != (kind == "dir"):
            msg = f"internal: {what} was written as a {'directory' if tmp.is_dir() else 'file'}, not a {kind}"
            raise RuntimeError(msg)
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            if not overwrite:  # appeared while we were writing
                msg = f"{what} {str(final)!r} appeared while writing; not replacing it"
                raise FileExistsError(msg)
            check_writable_target(final, overwrite, what, kind, replaceable)  # changed meanwhile?
            if final.is_dir() and not final.is_symlink():
                # os.replace cannot put a directory over a non-empty one. Swap the two in one
                # atomic step where the kernel can, so a complete store is always at the path;
                # elsewhere move the old one aside first (a crash between the two renames leaves
                # it, complete, at the .old- name).
                if _exchange(tmp, final):
                    _remove(tmp)
                else:
                    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                    os.replace(final, old)
                    os.replace(tmp, final)
                    _remove(old)
            else:
                os.replace(tmp, final)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise
