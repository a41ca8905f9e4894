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
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "check_writable_target"]


def check_writable_target(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Path:
    """Validate that ``path`` may be written: its directory exists and it does not exist yet.

    Raises
    ------
    FileNotFoundError
        When the parent directory does not exist.
    FileExistsError
        When ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        msg = f"the directory of {what} {str(path)!r} does not exist: {str(parent)!r}"
        raise FileNotFoundError(msg)
    if path.exists() and not overwrite:
        msg = f"{what} {str(path)!r} already exists; pass overwrite=True to replace it"
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
def atomic_path(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Works for files and directories (a zarr store is a directory). On any exception the
    temporary is removed and ``path`` is left as it was. With ``overwrite=True`` an existing
    ``path`` is replaced only after the new one is complete.

    Examples
    --------
    >>> with atomic_path("model.h5") as tmp:        # doctest: +SKIP
    ...     write_hdf5(tmp)
    """
    final = check_writable_target(path, overwrite=overwrite, what=what)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            if not overwrite:  # appeared while we were writing
                msg = f"{what} {str(final)!r} appeared while writing; not replacing it"
                raise FileExistsError(msg)
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
