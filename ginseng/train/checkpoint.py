"""Training checkpoints: write, rotate, read, and choose the one to resume from.

A checkpoint directory holds up to ``keep`` files named ``checkpoint-<global step>.h5`` (the
convention of orbax's ``max_to_keep``). A new checkpoint is written to a temporary name and
renamed into place; only then are the oldest beyond ``keep`` removed, so a crash at any moment
leaves at least one complete file. Resuming tries the newest first; a damaged one is named in a
warning, set aside as ``<name>.damaged`` (never deleted) and the one before it is used. Since
training is deterministic, replaying the lost steps ends with exactly the uninterrupted model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import h5py
import jax
import numpy as np

from ginseng._core.files import atomic_path
from ginseng._core.h5tree import DamagedError, read_attr, read_dataset, read_tree, write_tree
from ginseng._core.mesh import to_host
from ginseng.opt import AdamState

CHECKPOINT_FORMAT = "ginseng.checkpoint"
CHECKPOINT_VERSION = 1
# Written by ginseng before checkpoint rotation; still found and resumed from (as the oldest).
LEGACY_NAME = "checkpoint.h5"
_NAME = re.compile(r"^checkpoint-(\d+)\.h5$")
_LOGGER_FIELDS = ("epoch", "train_loss", "holdout_loss", "holdout_accuracy")
# Settings that may change between a run and its resumption without changing the result.
# Settings a run may resume with other values of: they change where and how often, not what, is
# computed (device_data: the same batches to every bit in both modes; steps_per_dispatch: every
# step is the same scanned body, test_feed checks both).
RESUME_FREE = ("checkpoint_dir", "checkpoint_every", "keep_checkpoints", "device_data", "steps_per_dispatch")


def checkpoint_path(directory, global_step: int) -> Path:
    return Path(directory) / f"checkpoint-{int(global_step):09d}.h5"


def list_checkpoints(directory) -> list[Path]:
    """The checkpoint files in ``directory``, newest (highest global step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    numbered = sorted(
        (int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_file()
    )
    found = [p for _, p in reversed(numbered)]
    legacy = directory / LEGACY_NAME
    return [*found, legacy] if legacy.is_file() else found


def latest_checkpoint(directory) -> Path | None:
    """The newest checkpoint file in ``directory`` (not checked for damage), or None."""
    found = list_checkpoints(directory)
    return found[0] if found else None


def remove_stale_temporaries(directory) -> None:
    """Remove temporaries left by a process killed mid-save (only ginseng's own names)."""
    for tmp in Path(directory).glob(".checkpoint*.h5.tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_checkpoints(directory) -> list[Path]:
    """Remove every checkpoint file ginseng wrote in ``directory``; returns what was removed."""
    removed = list_checkpoints(directory)
    for path in removed:
        path.unlink()
    return removed


def settings_record(settings) -> dict:
    rec = {k: v for k, v in asdict(settings).items() if k not in RESUME_FREE}
    rec["betas"] = list(rec["betas"])
    return rec


def save_checkpoint(directory, *, state: dict, position: dict, logger, settings, identity, keep: int) -> Path:
    """Write one checkpoint atomically (process 0), then drop the oldest beyond ``keep``.

    ``state``: host (numpy) copies of params, opt_state, metrics and train_key (key data), with
    rng_impl and device_count; every process fetches its replicated copy before calling, so that
    no process waits on another here. ``position``: epoch, step_in_epoch, batches_per_epoch,
    total_steps.
    """
    global_step = int(state["opt_state"].step)
    path = checkpoint_path(directory, global_step)
    if jax.process_index() != 0:
        return path
    with atomic_path(path, overwrite=True, what="checkpoint") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = CHECKPOINT_FORMAT
        f.attrs["format_version"] = CHECKPOINT_VERSION
        for name in ("epoch", "step_in_epoch", "total_steps", "batches_per_epoch"):
            f.attrs[name] = int(position[name])
        f.attrs["global_step"] = global_step
        f.attrs["settings"] = json.dumps(settings_record(settings), sort_keys=True)
        f.attrs["dataset_identity"] = str(identity)
        f.attrs["rng_impl"] = str(state["rng_impl"])
        f.attrs["device_count"] = int(state["device_count"])
        write_tree(f.create_group("params"), state["params"])
        opt = f.create_group("opt_state")
        opt.create_dataset("step", data=np.asarray(state["opt_state"].step))
        write_tree(opt.create_group("m"), state["opt_state"].m)
        write_tree(opt.create_group("v"), state["opt_state"].v)
        write_tree(f.create_group("rng"), {"train_key": state["train_key"]})
        write_tree(f, {"epoch_metrics": state["metrics"]})
        history = {n: np.asarray(getattr(logger, n), dtype=np.float64) for n in _LOGGER_FIELDS}
        write_tree(f.create_group("logger"), history)
    for old in list_checkpoints(directory)[max(1, keep):]:
        with contextlib.suppress(OSError):
            old.unlink()
    return path


def _same_tree_shape(a: dict, b: dict) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict) or set(a) != set(b):
        return False
    return all(
        _same_tree_shape(a[k], b[k]) if isinstance(a[k], dict) else np.shape(a[k]) == np.shape(b[k])
        for k in a
    )


def _check_format(f, path: Path) -> None:
    fmt, version = f.attrs.get("format"), f.attrs.get("format_version")
    if fmt != CHECKPOINT_FORMAT:
        msg = f"{str(path)!r} is not a ginseng checkpoint (format {fmt!r}, expected {CHECKPOINT_FORMAT!r})"
        raise ValueError(msg)
    if version != CHECKPOINT_VERSION:
        msg = (
            f"checkpoint {str(path)!r} has format version {version}; this ginseng reads version "
            f"{CHECKPOINT_VERSION} (was it written by another ginseng release?)"
        )
        raise ValueError(msg)


def _read_record(f) -> dict:
    def attr(name):
        return read_attr(f, name)

    return {
        "epoch": int(attr("epoch")),
        "step_in_epoch": int(attr("step_in_epoch")),
        "batches_per_epoch": int(attr("batches_per_epoch")),
        "global_step": int(attr("global_step")),
        # Absent from checkpoints written before lr_schedule existed (constant rate).
        "total_steps": int(attr("total_steps")) if "total_steps" in f.attrs else None,
        "settings": json.loads(attr("settings")),
        "dataset_identity": str(attr("dataset_identity")),
        "rng_impl": str(attr("rng_impl")),
        "device_count": int(attr("device_count")),
        "params": read_tree(f["params"], "params"),
        "opt_state": AdamState(
            step=read_dataset(f, "opt_state/step"),
            m=read_tree(f["opt_state/m"], "opt_state/m"),
            v=read_tree(f["opt_state/v"], "opt_state/v"),
        ),
        "train_key": read_dataset(f, "rng/train_key"),
        "metrics": read_dataset(f, "epoch_metrics"),
        "logger": read_tree(f["logger"], "logger"),
    }


def _disagreement(rec: dict) -> str | None:
    checks = {
        "global_step differs from the optimizer's step": rec["global_step"] == int(rec["opt_state"].step),
        "params and optimizer moments differ in shape": _same_tree_shape(rec["params"], rec["opt_state"].m)
        and _same_tree_shape(rec["params"], rec["opt_state"].v),
        "epoch_metrics is not [loss_sum, n_cells]": rec["metrics"].shape == (2,),
        "step_in_epoch is outside the epoch": 0 <= rec["step_in_epoch"] <= rec["batches_per_epoch"],
        "the history lacks a column or its columns differ in length": set(rec["logger"]) == set(_LOGGER_FIELDS)
        and len({len(v) for v in rec["logger"].values()}) == 1,
    }
    failed = [what for what, ok in checks.items() if not ok]
    return "its parts disagree (" + "; ".join(failed) + ")" if failed else None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file written by `GinsengTrainer` (no checks against a run).

    Parameters
    ----------
    path : str | PathLike
        A ``checkpoint-<step>.h5`` file.

    Returns
    -------
    dict
        ``epoch`` (the epoch to continue in), ``step_in_epoch`` (batches of that epoch already
        done), ``batches_per_epoch``, ``global_step`` (optimizer steps taken), ``total_steps`` (of
        the whole run: epochs x batches per epoch, which the learning-rate schedule spans; None in
        checkpoints written before schedules existed), ``params``,
        ``opt_state`` (`AdamState` of numpy arrays), ``train_key`` (uint32 key data), ``rng_impl``,
        ``metrics`` (the epoch's running ``[loss_sum, n_cells]``), ``logger`` (dict of arrays),
        ``settings`` (dict), ``dataset_identity`` (str), ``device_count``.

    Raises
    ------
    ValueError
        Naming the file: not an HDF5 file, truncated or corrupted (naming the damaged dataset or
        attribute), not a ginseng checkpoint, or an unknown format version (saying the version
        found and the one this ginseng reads).
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        msg = f"checkpoint {str(path)!r} is not a readable HDF5 file (truncated or corrupted?): {err}"
        raise ValueError(msg) from None
    detail = None
    with f:
        try:
            _check_format(f, path)
            rec = _read_record(f)
        except DamagedError as err:
            detail = str(err)
        except (OSError, KeyError, RuntimeError, TypeError) as err:
            # Only the text is kept: holding the exception would keep its frames (and any h5py
            # object in them) alive until a garbage collection on another thread.
            detail = f"{type(err).__name__}: {err}"
    if detail is None:
        detail = _disagreement(rec)
    if detail is not None:
        msg = f"checkpoint {str(path)!r} is corrupted or incomplete: {detail}"
        raise ValueError(msg)
    return rec


def check_resumable(rec: dict, path: Path, settings, identity, batches_per_epoch: int, total_steps: int) -> None:
    """Refuse a readable checkpoint that belongs to another dataset or other settings."""
    if rec["dataset_identity"] != str(identity):
        msg = (
            f"checkpoint {str(path)!r} was written for dataset {rec['dataset_identity']!r}, "
            f"not for this dataset {str(identity)!r}; use another checkpoint_dir or resume=False"
        )
        raise ValueError(msg)
    saved = {"lr_schedule": "constant", **rec["settings"]}  # older checkpoints: constant rate
    now = json.loads(json.dumps(settings_record(settings), sort_keys=True))
    differ = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if differ:
        msg = f"checkpoint {str(path)!r} was written with other settings: " + "; ".join(differ)
        raise ValueError(msg)
    if rec["batches_per_epoch"] != int(batches_per_epoch):
        msg = (
            f"checkpoint {str(path)!r} was written with {rec['batches_per_epoch']} batches per epoch, "
            f"this run has {batches_per_epoch}; the dataset's training split changed"
        )
        raise ValueError(msg)
    if settings.lr_schedule != "constant" and rec["total_steps"] != int(total_steps):
        saved_epochs = rec["total_steps"] // max(1, rec["batches_per_epoch"])
        msg = (
            f"checkpoint {str(path)!r} was written by a run of {saved_epochs} epochs "
            f"({rec['total_steps']} steps), this run has {total_steps // max(1, batches_per_epoch)} "
            f"epochs ({total_steps} steps); the {settings.lr_schedule!r} learning-rate schedule "
            f"spans the whole run, so resume with epochs={saved_epochs} (or use "
            "lr_schedule='constant' for runs meant to be extended)"
        )
        raise ValueError(msg)


def newest_usable(directory) -> tuple[dict | None, Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that reads completely: (record, its path, [(damaged path, why)]).

    With no checkpoint at all: (None, None, []). With checkpoints of which none reads: a
    ValueError naming every file tried and what is wrong with each.
    """
    tried: list[tuple[Path, str]] = []
    for path in list_checkpoints(directory):
        try:
            return read_checkpoint(path), path, tried
        except ValueError as err:
            tried.append((path, str(err)))
    if tried:
        listed = "; ".join(why for _, why in tried)
        msg = (
            f"no usable checkpoint in checkpoint_dir {str(directory)!r}: tried {len(tried)} "
            f"file(s), newest first: {listed}. Remove them (or use another checkpoint_dir, or resume=False) to start over"
        )
        raise ValueError(msg)
    return None, None, tried


def set_aside(damaged: list[tuple[Path, str]], used: Path, *, main: bool) -> None:
    """On the main process, warn about each damaged checkpoint skipped for ``used`` and rename it
    to ``*.damaged`` (kept for inspection, out of the rotation: never tried or counted again)."""
    for path, why in damaged:
        target = path.with_name(path.name + ".damaged")
        if main:
            with contextlib.suppress(OSError):
                os.replace(path, target)
            warnings.warn(
                f"{why}; resuming from the checkpoint before it, {str(used)!r}, instead "
                f"(the damaged file is kept as {str(target)!r})",
                stacklevel=5,  # set_aside < restore < _start < GinsengTrainer < the caller
            )


# --------------------------------------------------------------------------------------------
# The trainer's side: the directory, what to resume from, and writing its state
# --------------------------------------------------------------------------------------------


def prepare_dir(ckpt_dir, resume: bool, main: bool) -> None:
    """Create the directory, clear a killed save's temporaries, refuse to start over a run."""
    if resume and ckpt_dir is None:
        msg = "resume=True needs settings.checkpoint_dir, got None"
        raise ValueError(msg)
    if ckpt_dir is None:
        return
    if main:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(ckpt_dir)
    if jax.process_count() > 1:
        from ginseng import distributed

        distributed.barrier("ginseng_checkpoint_dir")
    existing = list_checkpoints(ckpt_dir)
    if existing and not resume:
        msg = (
            f"checkpoint_dir {str(ckpt_dir)!r} already holds a checkpoint "
            f"({existing[0].name}); pass resume=True to continue that run, or use another "
            "checkpoint_dir (it is never overwritten by a new run)"
        )
        raise FileExistsError(msg)


def restore(ckpt_dir, settings, identity, batches_per_epoch: int, total_steps: int, main: bool):
    """The checkpoint to resume from (its record, with ``path``), or None to start afresh.

    The newest checkpoint that reads completely is used; damaged newer ones are named in a
    warning and set aside. Every process must continue from the same place: a checkpoint_dir
    that is not on a shared filesystem would let process 0 resume while the others start over.
    """
    rec, path, damaged = newest_usable(ckpt_dir)
    if rec is not None:
        check_resumable(rec, path, settings, identity, batches_per_epoch, total_steps)
        rec["path"] = path
    if jax.process_count() > 1:
        from ginseng import distributed

        where = np.asarray(
            [rec is not None]
            + ([rec["epoch"], rec["step_in_epoch"], rec["global_step"]] if rec else [0, 0, 0]),
            np.int32,
        )
        found = distributed.process_allgather(where)
        if not np.all(found == found[0]):
            seen = "; ".join(
                f"process {p}: " + (f"epoch {r[1]}, step {r[2]}, global step {r[3]}" if r[0] else "no checkpoint")
                for p, r in enumerate(found.tolist())
            )
            msg = (
                f"processes found different checkpoints in checkpoint_dir {str(ckpt_dir)!r} ({seen}); "
                "it must be one directory that every process sees (a shared filesystem)"
            )
            raise ValueError(msg)
    if rec is not None:
        set_aside(damaged, path, main=main)
    return rec



class Checkpointer:
    """Writes the trainer's state (a ``TrainState``) with its position in the run."""

    def __init__(self, directory, settings, identity: str, total_steps: int, batches_per_epoch: int):
        self.directory = directory
        self.settings = settings
        self.identity = identity
        self.total_steps = int(total_steps)
        self.batches_per_epoch = int(batches_per_epoch)

    def save(self, state, logger, epoch: int, batch: int) -> Path:
        """Checkpoint ``state`` as the position (epoch, batch of that epoch) of the run."""
        host = to_host({
            "params": state.params, "opt_state": state.opt_state, "metrics": state.metrics,
            "train_key": jax.random.key_data(state.key),
        })
        return save_checkpoint(
            self.directory,
            state={
                **host, "rng_impl": jax.random.key_impl(state.key),
                "device_count": len(state.key.sharding.device_set),
            },
            position={
                "epoch": epoch, "step_in_epoch": batch, "total_steps": self.total_steps,
                "batches_per_epoch": self.batches_per_epoch,
            },
            logger=logger, settings=self.settings, identity=self.identity,
            keep=self.settings.keep_checkpoints,
        )
