"""When ginseng shows a progress bar."""

from __future__ import annotations


def bar_disabled(silent: bool, total: int | None) -> bool | None:
    """tqdm's ``disable=``: off when silent or for a single step (a bar that jumps from 0 to done
    says nothing), and None otherwise, which is tqdm's own convention of staying quiet when its
    output is not a terminal (a log file or a batch job then gets no run-on bar lines)."""
    if silent or (total is not None and total <= 1):
        return True
    return None
