"""GinsengTrainer: the training loop as named stages over one :class:`TrainState`.

Reading top to bottom: set up (dataset, mesh, holdout, loaders, compiled steps), restore (a
checkpoint to resume from, or a fresh state), then per epoch: train its batches, evaluate the
holdout, log, checkpoint. Preemption (``ginseng.train.preempt``) and checkpoint files
(``ginseng.train.checkpoint``) live in their own modules; every stage takes what it needs as
arguments, nothing reads loop variables from an enclosing scope.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np
from jaxtyping import Array, PyTree
from tqdm.auto import tqdm

from ginseng._core.mesh import Layout, global_arrays, layout, make_mesh, replicate, to_host
from ginseng._core.progress import bar_disabled
from ginseng.state import CONFIDENCE_BINS, GinsengModelState
from ginseng.train import checkpoint as ckpt
from ginseng.train.feed import dispatch_groups, make_feed
from ginseng.train.logger import GinsengLogger
from ginseng.train.preempt import StopSignal, StopWatch, exit_preempted
from ginseng.train.settings import GinsengTrainerSettings, is_int
from ginseng.train.step import (
    build_confidence_step,
    build_eval_step,
    build_init,
    build_multi_eval_step,
    build_multi_step,
    build_train_step,
)

__all__ = ["GinsengTrainer", "TrainState"]

# Fetch the running loss for the progress bar only this often: every fetch is a host sync.
_PROGRESS_EVERY = 50


class TrainState(NamedTuple):
    """Everything the device carries from step to step (a pytree; the steps donate it)."""

    params: PyTree
    opt_state: Any  # AdamState
    metrics: Array  # float32 [loss_sum, n_cells] of the epoch so far
    key: Array  # the run's training key; every cell's key is folded from it


@dataclass
class _Run:
    """What the stages share: fixed once set-up is done."""

    settings: GinsengTrainerSettings
    epochs: int
    dataset: Any
    mesh: Any
    layout: Layout
    train_loader: Any
    holdout_loader: Any
    reference_loader: Any  # the cells whose confidences the model keeps (holdout, else training)
    train_step: Any  # without a feed: one step per host batch
    eval_step: Any
    feed: Any  # resident or streamed device data (None: the host loader, batch by batch)
    multi_step: Any  # steps_per_dispatch train steps per dispatch, drawn from the feed's buffer
    multi_eval: Any
    checkpointer: ckpt.Checkpointer | None
    watch: StopWatch | None
    verbose: bool
    main: bool


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


def _open_dataset(dataset):
    if isinstance(dataset, (str, os.PathLike)):
        from ginseng.data import GinsengDataset

        return GinsengDataset(dataset)
    # Duck-typed: anything with the GinsengDataset loader interface trains (tests use in-memory ones).
    if not all(hasattr(dataset, a) for a in ("loader", "make_holdout", "n_genes", "n_labels")):
        msg = f"dataset must be a GinsengDataset or the path to one, got {type(dataset).__name__}"
        raise TypeError(msg)
    return dataset


def _prepare_holdout(dataset, settings: GinsengTrainerSettings):
    """Make the (deterministic, seeded) holdout split on process 0 and share it with the others."""
    from ginseng import distributed

    if jax.process_index() == 0:
        dataset.make_holdout(
            holdout_fraction=settings.holdout_fraction,
            rng=np.random.default_rng(settings.seed),
            group_level=settings.group_level,
            group_mode=settings.group_mode,
        )
    if jax.process_count() > 1:
        distributed.barrier("ginseng_holdout")
        if jax.process_index() != 0:
            dataset = type(dataset)(dataset.path)  # re-read the split process 0 persisted
    return dataset


def _loaders(dataset, settings: GinsengTrainerSettings, lay: Layout, main: bool):
    """The shuffled training loader, the ordered holdout loader (None without holdout cells) and
    the ordered loader of the cells whose confidences the model keeps (the holdout's, else the
    training cells').

    dtype=None: counts travel to the devices as stored (uint16 for most data: half the bytes of
    float32, no conversion on the host); the steps convert them to float32, exactly.
    """
    kwargs = {
        "batch_size": settings.batch_size, "seed": settings.seed, "pad_multiple": lay.local_devices,
        "process_index": lay.process_index, "process_count": lay.process_count, "dtype": None,
    }
    train = dataset.loader(split="train", shuffle=True, balance=settings.balance_train, **kwargs)
    if len(dataset.holdout_indices) == 0:
        if main:
            warnings.warn(
                "the dataset has no holdout cells: holdout loss and accuracy are logged as NaN",
                stacklevel=4,
            )
        return train, None, dataset.loader(split="train", shuffle=False, balance=False, **kwargs)
    holdout = dataset.loader(split="holdout", shuffle=False, balance=False, **kwargs)
    return train, holdout, holdout


def _announce(dataset, verbose: bool) -> None:
    n_holdout = len(dataset.holdout_indices)
    if verbose and n_holdout:
        coarse = f" (few: accuracy moves in steps of {1 / n_holdout:.3f})" if n_holdout < 200 else ""
        print(
            f"[ginseng] training on {len(dataset.train_indices):,} cells; per-epoch holdout: "
            f"{n_holdout:,} cells{coarse}",
            flush=True,
        )


def _set_up(dataset, settings, epochs, devices, stop: StopSignal, silent: bool) -> _Run:
    main = jax.process_index() == 0
    dataset = _open_dataset(dataset)
    mesh = make_mesh(devices)
    lay = layout(mesh)
    dataset = _prepare_holdout(dataset, settings)
    train_loader, holdout_loader, reference_loader = _loaders(dataset, settings, lay, main)
    watching = settings.checkpoint_dir is not None
    total_steps = epochs * train_loader.num_batches
    feed = make_feed(dataset, settings.device_data, mesh, lay, verbose=main and not silent)
    checkpointer = None
    if watching:
        checkpointer = ckpt.Checkpointer(
            settings.checkpoint_dir, settings, getattr(dataset, "identity", ""), total_steps,
            train_loader.num_batches,
        )
    return _Run(
        settings=settings, epochs=epochs, dataset=dataset, mesh=mesh, layout=lay,
        train_loader=train_loader, holdout_loader=holdout_loader, reference_loader=reference_loader,
        train_step=None if feed else build_train_step(settings, mesh, total_steps, stop_flag=watching),
        eval_step=None if feed else build_eval_step(settings, mesh), feed=feed,
        multi_step=build_multi_step(settings, mesh, total_steps, stop_flag=watching) if feed else None,
        multi_eval=build_multi_eval_step(settings, mesh) if feed else None,
        checkpointer=checkpointer,
        watch=StopWatch(stop, mesh, lay.local_devices) if watching else None,
        verbose=main and not silent, main=main,
    )


# --------------------------------------------------------------------------------------------
# Start: a fresh state, or the state of the checkpoint to resume from
# --------------------------------------------------------------------------------------------


def _start(run: _Run, logger: GinsengLogger, resume: bool) -> tuple[TrainState, int, int]:
    """(state, first epoch, first batch of that epoch)."""
    s = run.settings
    init_key, train_key = jax.random.split(jax.random.key(s.seed))
    params, opt_state = build_init(s, run.mesh, run.dataset.n_genes, run.dataset.n_labels)(init_key)
    _announce(run.dataset, run.verbose)
    ckpt.prepare_dir(s.checkpoint_dir, resume, run.main)
    restored = None
    if resume:
        restored = ckpt.restore(
            s.checkpoint_dir, s, getattr(run.dataset, "identity", ""),
            run.train_loader.num_batches, run.epochs * run.train_loader.num_batches, run.main,
        )
    if restored is None:
        key_data, metrics = jax.random.key_data(train_key), np.zeros(2, np.float32)
        position = (0, 0)
    else:
        params = replicate(restored["params"], run.mesh)
        opt_state = replicate(restored["opt_state"], run.mesh)
        key_data, metrics = restored["train_key"], restored["metrics"]
        position = (restored["epoch"], restored["step_in_epoch"])
        _restore_logger(logger, restored["logger"])
        if run.verbose:
            print(
                f"[ginseng] resuming from {str(restored['path'])!r} at epoch "
                f"{position[0] + 1}, step {position[1]} of {run.train_loader.num_batches} "
                f"(global step {restored['global_step']})",
                flush=True,
            )
    key = jax.random.wrap_key_data(replicate(np.asarray(key_data), run.mesh))
    return TrainState(params, opt_state, replicate(metrics, run.mesh), key), *position


def _restore_logger(logger: GinsengLogger, history: dict) -> None:
    for name, values in history.items():
        setattr(logger, name, [int(v) if name == "epoch" else float(v) for v in values])


# --------------------------------------------------------------------------------------------
# One epoch: train its batches, evaluate the holdout, log, checkpoint
# --------------------------------------------------------------------------------------------


def _step(run: _Run, state: TrainState, *, batch) -> tuple[TrainState, bool]:
    """One train step; also whether a stop request (read ``STOP_LAG`` steps late) has arrived."""
    x, y, slot, mask = global_arrays(batch, run.mesh, run.train_loader.global_batch)
    params, opt_state, metrics = state.params, state.opt_state, state.metrics
    if run.watch is None:
        out = run.train_step(params, opt_state, metrics, state.key, x, y, slot, mask)
        return TrainState(*out, state.key), False
    *out, stop_count = run.train_step(
        params, opt_state, metrics, state.key, x, y, slot, mask, run.watch.flag()
    )
    return TrainState(*out, state.key), run.watch.record(stop_count)


def _dispatch(run: _Run, state: TrainState, *, X, labels, rows) -> tuple[TrainState, bool]:
    """One dispatch of ``steps_per_dispatch`` steps; also whether a stop request has arrived."""
    params, opt_state, metrics = state.params, state.opt_state, state.metrics
    if run.watch is None:
        out = run.multi_step(params, opt_state, metrics, state.key, X, labels, rows)
        return TrainState(*out, state.key), False
    *out, stop_count = run.multi_step(params, opt_state, metrics, state.key, X, labels, rows, run.watch.flag())
    return TrainState(*out, state.key), run.watch.record(stop_count)


def _dispatches(run: _Run, epoch: int, first: int):
    """The epoch's work from batch ``first``: ``(batches, run_it)`` pairs, ``run_it(state) ->
    (state, stop requested)``. With device data, ``steps_per_dispatch`` batches a dispatch, groups
    cut at every checkpoint position; otherwise the host loader's batches, one at a time."""
    loader = run.train_loader
    if run.feed is None:
        for i, batch in enumerate(loader.epoch(epoch, start_batch=first), start=first):
            yield range(i, i + 1), functools.partial(_step, run, batch=batch)
        return
    k = run.settings.steps_per_dispatch
    groups = dispatch_groups(loader.num_batches, first, k, run.settings.checkpoint_every)
    for g, (X, labels, rows) in zip(groups, run.feed.groups(loader, epoch, groups, k), strict=True):
        yield g, functools.partial(_dispatch, run, X=X, labels=labels, rows=rows)


def _train_epoch(run: _Run, state: TrainState, logger, epoch: int, first: int) -> TrainState:
    """Train the batches ``first ..`` of ``epoch``; checkpoint every ``checkpoint_every`` steps."""
    loader, every = run.train_loader, run.settings.checkpoint_every
    with tqdm(
        total=loader.num_batches, initial=first, desc=f"[ginseng] epoch {epoch + 1}/{run.epochs}",
        unit="step", disable=bar_disabled(not run.verbose, loader.num_batches),
    ) as bar:
        for g, run_it in _dispatches(run, epoch, first):
            state, stop_now = run_it(state)
            bar.update(len(g))
            if run.verbose and g.stop // _PROGRESS_EVERY > g.start // _PROGRESS_EVERY:
                total, count = to_host(state.metrics)
                bar.set_postfix(loss=f"{total / max(count, 1.0):.4f}")
            if stop_now:
                _preempt(run, state, logger, epoch, g.stop)
            if every and g.stop % every == 0 and run.checkpointer is not None:
                run.checkpointer.save(state, logger, epoch, g.stop)
    return state


def _evaluate(run: _Run, params) -> tuple[float, float]:
    """(loss, accuracy) on the holdout cells; NaN without any."""
    if run.holdout_loader is None:
        return float("nan"), float("nan")
    metrics = replicate(np.zeros(3, np.float32), run.mesh)
    loader = run.holdout_loader
    if run.feed is not None:  # drawn on the device like the training batches
        k = run.settings.steps_per_dispatch
        groups = dispatch_groups(loader.num_batches, 0, k, None)
        for X, labels, rows in run.feed.groups(loader, 0, groups, k):
            metrics = run.multi_eval(params, metrics, X, labels, rows)
    else:
        for batch in loader.epoch(0):
            x, y, _, mask = global_arrays(batch, run.mesh, loader.global_batch)
            metrics = run.eval_step(params, metrics, x, y, mask)
    loss_sum, correct, count = to_host(metrics)
    if count > 0:
        return float(loss_sum / count), float(correct / count)
    return float("nan"), float("nan")


def _end_epoch(run: _Run, state: TrainState, logger: GinsengLogger, epoch: int) -> TrainState:
    """Log the epoch, reset the metrics, then (with checkpoints) checkpoint at (epoch + 1, 0).

    Position (epoch + 1, step 0) rather than a mid-epoch step == num_batches: the latter would
    resume into this epoch's holdout evaluation and log line again.
    """
    total, count = to_host(state.metrics)
    train_loss = float(total / count) if count > 0 else float("nan")
    # The epoch is done (its metrics were just fetched): read the remaining stop counts.
    stop_now = run.watch.drain() if run.watch is not None else False
    holdout_loss, holdout_acc = _evaluate(run, state.params)
    logger.update(epoch, train_loss, holdout_loss, holdout_acc)
    logger.report(silent=not run.verbose)
    state = state._replace(metrics=replicate(np.zeros(2, np.float32), run.mesh))  # the next epoch's
    if run.checkpointer is None:
        return state
    if stop_now and epoch + 1 < run.epochs:
        _preempt(run, state, logger, epoch + 1, 0)
    run.checkpointer.save(state, logger, epoch + 1, 0)
    return state


def _preempt(run: _Run, state: TrainState, logger, epoch: int, batch: int):
    written = run.checkpointer.save(state, logger, epoch, batch)
    exit_preempted(written, epoch, batch, run.watch.signal.received, run.verbose)


def _confidence_counts(run: _Run, params) -> np.ndarray:
    """The histogram of the reference cells' top probability under the final parameters: what
    ``annotate(min_confidence="auto")`` reads its threshold from."""
    step = build_confidence_step(run.settings, run.mesh)
    counts = replicate(np.zeros(CONFIDENCE_BINS, np.int32), run.mesh)
    loader = run.reference_loader
    for batch in loader.epoch(0):
        x, _, _, mask = global_arrays(batch, run.mesh, loader.global_batch)
        counts = step(params, counts, x, mask)
    return to_host(counts).astype(np.int64)


def _model_state(run: _Run, params) -> GinsengModelState:
    s, ds = run.settings, run.dataset
    return GinsengModelState(
        params=to_host(params),
        genes=np.asarray(ds.genes),
        label_keys=np.asarray(ds.label_keys),
        label_values=np.asarray(ds.label_values),
        normalize=s.normalize,
        target_sum=s.target_sum,
        dropout_rate=s.dropout_rate,
        training=False,
        confidence_counts=_confidence_counts(run, params),
    )


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def GinsengTrainer(
    dataset,
    settings: GinsengTrainerSettings | None = None,
    epochs: int = 10,
    silent: bool = False,
    *,
    devices=None,
    resume: bool = False,
) -> tuple[GinsengLogger, GinsengModelState]:
    """Train a neural network classifier on a `GinsengDataset`, data-parallel over all devices.

    Parameters
    ----------
    dataset : GinsengDataset | str
        GinsengDataset or path to GinsengDataset.
    settings : GinsengTrainerSettings
        Training configuration including model, optimization, and augmentation parameters
        (default: ``GinsengTrainerSettings()``).
    epochs : int
        Number of training epochs to run.
    silent : bool
        If True, suppresses training progress output (only process 0 ever prints).
    devices : sequence of jax.Device, optional
        Devices to train on. Default: ``jax.devices()``, i.e. every device of every process once
        ``jax.distributed`` is initialized (see :mod:`ginseng.distributed`).
    resume : bool
        Continue from the checkpoint in ``settings.checkpoint_dir`` when there is one (refused if
        it was written for another dataset or other settings). The resumed run ends with exactly
        the model of an uninterrupted run. Without ``resume``, a ``checkpoint_dir`` that already
        holds a checkpoint is refused (``FileExistsError``), never overwritten. With
        ``checkpoint_dir`` set, SIGTERM or SIGUSR1 (to any one process of a multi-process run)
        make every process stop at the same step, at most 2 dispatches later (2 x
        ``settings.steps_per_dispatch`` steps; 2 steps for a dataset read batch by batch) or at
        the epoch's end, write one checkpoint and exit with ``PREEMPTED_EXIT_CODE`` (75).

    Returns
    -------
    logger : GinsengLogger
        Training log with loss and accuracy metrics across epochs.
    state : GinsengModelState
        Final trained model state including parameters (host numpy arrays) and metadata.
    """
    settings = GinsengTrainerSettings() if settings is None else settings
    if not isinstance(settings, GinsengTrainerSettings):
        msg = f"settings must be a GinsengTrainerSettings, got {type(settings).__name__}"
        raise TypeError(msg)
    if not is_int(epochs) or epochs < 1:
        msg = f"epochs must be an integer >= 1, got {epochs!r}"
        raise ValueError(msg)
    # With a checkpoint_dir, SIGTERM/SIGUSR1 only set a flag from here on (also while opening the
    # dataset, compiling or restoring), so that a preempted job always leaves through a
    # checkpoint and PREEMPTED_EXIT_CODE.
    with StopSignal(active=settings.checkpoint_dir is not None) as stop:
        run = _set_up(dataset, settings, epochs, devices, stop, silent)
        logger = GinsengLogger(holdout_cells=len(run.dataset.holdout_indices))
        state, start_epoch, start_batch = _start(run, logger, resume)
        for epoch in range(start_epoch, epochs):
            state = _train_epoch(run, state, logger, epoch, start_batch if epoch == start_epoch else 0)
            state = _end_epoch(run, state, logger, epoch)
    return logger, _model_state(run, state.params)
