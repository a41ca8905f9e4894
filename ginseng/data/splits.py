"""Train/holdout splits: the rules (pure numpy) and persisting the live split in a store.

Per label (the default) the same number of cells of every label is held out, int(smallest
label's count * fraction); with ``group_level`` whole groups are held out, so that no group has
cells in both train and holdout.
"""

from __future__ import annotations

import uuid
import warnings

import numpy as np
import zarr

from ginseng.data.format import ARRAY_CONFIG, GROUP_MODES, as_generator, describe

__all__ = ["cell_holdout", "group_holdout", "holdout_split", "persist_split"]


def group_holdout(groups, labels, label_values, fraction: float, group_mode: str, gen) -> np.ndarray:
    """Boolean mask of held-out cells: whole groups, chosen with ``gen``."""
    if groups is None:
        msg = "group_level=True needs groups, but this dataset was created without groups"
        raise ValueError(msg)
    uniq = np.unique(groups)
    if len(uniq) < 2:
        msg = f"group_level=True needs at least 2 groups, found {len(uniq)}: {describe(uniq)}"
        raise ValueError(msg)
    n_hold = 1 if group_mode == "loo" else int(min(len(uniq) - 1, max(1, round(len(uniq) * fraction))))
    held = gen.choice(uniq, size=n_hold, replace=False)
    is_hold = np.isin(groups, held)
    # Whole groups rarely hold every label; the run can go on, but the user should know which
    # labels the holdout cannot score, or which the model will never see.
    n_labels = len(label_values)
    in_hold = np.bincount(labels[is_hold], minlength=n_labels) > 0
    in_train = np.bincount(labels[~is_hold], minlength=n_labels) > 0
    for where, present in (("holdout", in_hold), ("training", in_train)):
        absent = label_values[~present]
        if absent.size:
            msg = (
                f"the group-level holdout (held-out groups {describe(sorted(held))}) leaves "
                f"{absent.size} of {n_labels} labels with no {where} cells: "
                f"{describe(absent)}"
            )
            warnings.warn(msg, UserWarning, stacklevel=4)
    return is_hold


def cell_holdout(labels, label_values, label_indices: dict, fraction: float, gen) -> np.ndarray:
    """Boolean mask of held-out cells: the same number of every label, chosen with ``gen``."""
    n_labels = len(label_values)
    counts = np.bincount(labels, minlength=n_labels)
    smallest = int(np.argmin(counts))
    n_hold = int(counts[smallest] * fraction)
    if n_hold == 0:
        msg = (
            f"holdout_fraction={fraction} leaves no holdout cells: the smallest label "
            f"{str(label_values[smallest])!r} has {counts[smallest]} cells and "
            f"int({counts[smallest]} * {fraction}) = 0; use a larger fraction (>= {1 / counts[smallest]:.3g})"
        )
        raise ValueError(msg)
    holdout = np.concatenate(
        [gen.choice(label_indices[k], size=n_hold, replace=False) for k in range(n_labels)]
    )
    is_hold = np.zeros(labels.size, dtype=bool)
    is_hold[holdout] = True
    return is_hold


def holdout_split(dataset, holdout_fraction, rng, group_level, group_mode) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, holdout, params) of ``GinsengDataset.make_holdout`` (see there), not yet persisted."""
    if group_mode not in GROUP_MODES:
        msg = f"group_mode must be one of {GROUP_MODES}, found {group_mode!r}"
        raise ValueError(msg)
    f = float(holdout_fraction)
    if not (0.0 < f < 1.0):
        msg = f"holdout_fraction must be in (0, 1), found {holdout_fraction!r}"
        raise ValueError(msg)
    gen = as_generator(rng)
    if group_level:
        is_hold = group_holdout(dataset.groups, dataset.labels, dataset.label_values, f, group_mode, gen)
    else:
        is_hold = cell_holdout(dataset.labels, dataset.label_values, dataset.label_indices, f, gen)
    holdout = np.flatnonzero(is_hold).astype(np.int64)
    train = np.flatnonzero(~is_hold).astype(np.int64)
    if train.size == 0:
        msg = "the holdout split leaves no training cells"
        raise ValueError(msg)
    return train, holdout, {"holdout_fraction": f, "group_level": bool(group_level), "group_mode": group_mode}


def persist_split(path, train: np.ndarray, holdout: np.ndarray, params: dict) -> None:
    """Make (train, holdout) the live split of the store at ``path``.

    The same split as the one on disk now (every run with the same seed and settings) writes
    nothing, so runs sharing a dataset do not rewrite it under each other; compared with the
    store, not with what an open dataset read. Otherwise new arrays first, then the attribute that
    names the live split, then the old arrays are dropped: a crash at any point leaves a store
    whose live split is complete.
    """
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
    old = root.attrs.get("split")
    if (
        old
        and old in root
        and root.attrs.get("split_params") == params
        and np.array_equal(np.asarray(root[f"{old}/train"][:]), train)
        and np.array_equal(np.asarray(root[f"{old}/holdout"][:]), holdout)
    ):
        return
    name = f"split_{uuid.uuid4().hex[:12]}"
    grp = root.create_group(name)
    grp.create_array("train", data=train, chunks=(max(1, len(train)),), config=ARRAY_CONFIG)
    grp.create_array("holdout", data=holdout, chunks=(max(1, len(holdout)),), config=ARRAY_CONFIG)
    root.attrs.update({"split": name, "split_params": params})
    if old and old in root:
        del root[old]
