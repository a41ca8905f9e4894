"""Settings, logger and the data-parallel trainer.

The train step is written once and jitted once. Params and optimizer state are replicated over a
``jax.sharding.Mesh`` with one axis, ``"data"``, spanning every device of every process; each global
batch is sharded over that axis. Inside ``jax.shard_map`` every device augments and classifies its
rows with one PRNG key per cell (derived from the step and the cell's position in the GLOBAL batch,
never from the device), sums the masked cross-entropy, takes gradients of that local sum, and the
gradients, loss and cell counts are summed across ``"data"`` (an all-reduce) before dividing by the
global number of real cells. The result therefore does not depend on how many devices or processes
ran it, up to float summation order.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree
from tqdm.auto import tqdm

from ginseng._checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_resumable,
    latest_checkpoint,
    list_checkpoints,
    newest_usable,
    read_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    set_aside,
)
from ginseng._files import atomic_path
from ginseng._progress import bar_disabled
from ginseng.augment import augment
from ginseng.nn import nn_annotate, nn_annotate_init
from ginseng.opt import opt_adam_update, opt_cosine_lr, opt_init_adam
from ginseng.state import GinsengModelState

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "PREEMPTED_EXIT_CODE",
    "GinsengLogger",
    "GinsengModelState",
    "GinsengTrainer",
    "GinsengTrainerSettings",
    "latest_checkpoint",
    "list_checkpoints",
    "make_mesh",
    "read_checkpoint",
]

# Exit status after SIGTERM/SIGUSR1 made the trainer write a checkpoint and stop (75 = EX_TEMPFAIL,
# "try again later"): a SLURM script can requeue the job on this code and resume with resume=True.
PREEMPTED_EXIT_CODE = 75
LR_SCHEDULES = ("constant", "cosine")

DATA_AXIS = "data"

# Fetch the running loss for the progress bar only this often: every fetch is a host sync.
_PROGRESS_EVERY = 50

# A stop request (SIGTERM/SIGUSR1 on any process) travels with a step's gradient all-reduce and is
# read this many steps later, so reading it never stalls the device queue; the checkpoint is
# therefore written at most _STOP_LAG steps (or one epoch end) after the signal.
_STOP_LAG = 2


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass
class GinsengTrainerSettings:
    """Training configuration settings for `GinsengTrainer`.

    Every field is validated on construction; an invalid value raises ``ValueError`` naming the
    field, what was expected and what was found.

    Attributes
    ----------
    rate : float | None
        Probability of randomly masking input counts (augmentation; None disables it).
    lam_max : float | None
        Maximum mean of Poisson distribution for randomly adding counts (None disables it).
    lower : int | None
        Minimum number of genes to randomly mask out (needs ``upper``).
    upper : int | None
        Maximum (exclusive) number of genes to randomly mask out (None disables gene dropping).
    hidden_dim : int
        Number of hidden dimensions.
    dropout_rate : float
        Dropout probability applied during training. 0.1 by default: against 0.25, it raised
        pbmc3k macro-F1 on 20 splits from 0.885 to 0.902 and kept baron mouse1 -> mouse2 at
        0.977 (0.978 at 0.25); no dropout lowered baron to 0.956 (benchmarks/RESULTS.md, 6f).
    batch_size : int
        Number of samples per training batch: the GLOBAL batch, split over all devices.
    lr : float
        Learning rate for Adam optimizer (the peak rate under a schedule).
    lr_schedule : str
        'constant' (default): ``lr`` throughout; 'cosine': the rate decays from ``lr`` to 0 over the
        run's epochs x batches (``ginseng.opt.opt_cosine_lr``). Cosine decay made runs with
        different seeds on one pbmc3k split agree more closely (macro-F1 sd 0.025 -> 0.006), but
        over five seeds it did not raise pbmc3k and lowered baron (benchmarks/RESULTS.md, section
        6), so it is not the default. A cosine run's length is fixed: resuming it with other
        ``epochs`` is refused.
    betas : tuple[float, float]
        Exponential decay rates for first and second moment estimates for Adam optimizer.
    eps : float
        Numerical stability constant for Adam optimizer.
    weight_decay : float
        L2 regularization factor for Adam optimizer (decoupled).
    normalize : bool
        Whether to normalize the input count data.
    target_sum : float | None
        Target sum used for data normalization (None: the number of genes).
    holdout_fraction : float
        Fraction of the dataset to hold out for validation.
    balance_train : bool
        Whether to balance training samples across classes (rare labels are oversampled, so
        every cell stays in play). Off by default: oversampling shifts the learned prior towards
        rare types, which measured lower macro-F1 on both real benchmarks
        (benchmarks/RESULTS.md, section 6).
    group_level : bool
        Whether to hold out whole groups (e.g. donors) rather than cells.
    group_mode : str
        Strategy for holding out groups ('fraction' or 'loo').
    seed : int
        Random seed for reproducibility (holdout split, initialization, batch order, augmentation).
    checkpoint_dir : str | None
        Directory for checkpoints (None: no checkpoints).
    checkpoint_every : int | None
        Write a checkpoint every this many steps (one is also written at the end of every epoch).
    keep_checkpoints : int
        How many checkpoint files to keep (``checkpoint-<global step>.h5``, newest first; orbax's
        ``max_to_keep``). Resuming from a damaged newest one falls back to the one before it, so
        keep at least 2.
    """

    # Augmentation
    rate: float | None = None
    lam_max: float | None = None
    lower: int | None = None
    upper: int | None = None

    # Model
    hidden_dim: int = 256
    dropout_rate: float = 0.1

    # Optimization
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    # Data
    normalize: bool = True
    target_sum: float | None = None
    holdout_fraction: float = 0.2
    balance_train: bool = False
    group_level: bool = False
    group_mode: str = "fraction"

    # Randomness
    seed: int = 1

    # Checkpoints
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        def fail(name, expected):
            value = getattr(self, name)
            msg = f"GinsengTrainerSettings.{name} must be {expected}, got {value!r}"
            raise ValueError(msg)

        def real(name, lo=None, hi=None, lo_open=False, hi_open=False, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            hi_s = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
            expected = "a number " + " and ".join(s for s in (lo_s, hi_s) if s)
            if optional:
                expected += " or None"
            if not _is_real(value) or not math.isfinite(float(value)):
                fail(name, expected.strip())
            v = float(value)
            if lo is not None and (v <= lo if lo_open else v < lo):
                fail(name, expected.strip())
            if hi is not None and (v >= hi if hi_open else v > hi):
                fail(name, expected.strip())

        def integer(name, lo, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if not _is_int(value) or value < lo:
                fail(name, f"an integer >= {lo}" + (" or None" if optional else ""))

        real("rate", 0.0, 1.0, hi_open=True, optional=True)
        real("lam_max", 0.0, optional=True)
        integer("lower", 0, optional=True)
        integer("upper", 1, optional=True)
        if self.lower is not None and self.upper is None:
            msg = (
                f"GinsengTrainerSettings.lower={self.lower} needs upper (the exclusive maximum "
                "number of genes to drop), got upper=None"
            )
            raise ValueError(msg)
        if self.upper is not None and self.lower is not None and not self.upper > self.lower:
            msg = (
                f"GinsengTrainerSettings.upper must be > lower, got lower={self.lower}, "
                f"upper={self.upper}"
            )
            raise ValueError(msg)
        integer("hidden_dim", 1)
        real("dropout_rate", 0.0, 1.0, hi_open=True)
        integer("batch_size", 1)
        real("lr", 0.0, lo_open=True)
        if self.lr_schedule not in LR_SCHEDULES:
            fail("lr_schedule", " or ".join(repr(v) for v in LR_SCHEDULES))
        if isinstance(self.betas, list):  # Hydra/YAML give lists
            self.betas = tuple(self.betas)
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(_is_real(b) and 0.0 <= float(b) < 1.0 for b in self.betas)
        ):
            fail("betas", "a pair of numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        real("eps", 0.0, lo_open=True)
        real("weight_decay", 0.0)
        if not isinstance(self.normalize, (bool, np.bool_)):
            fail("normalize", "True or False")
        real("target_sum", 0.0, lo_open=True, optional=True)
        real("holdout_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        for name in ("balance_train", "group_level"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(name, "True or False")
        if self.group_mode not in ("fraction", "loo"):
            fail("group_mode", "'fraction' or 'loo'")
        integer("seed", 0)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)
        integer("checkpoint_every", 1, optional=True)
        integer("keep_checkpoints", 1)


@dataclass
class GinsengLogger:
    """Logger for storing training and validation metrics across epochs.

    Attributes
    ----------
    epoch : list[int]
        List of epoch indices (0-based).
    train_loss : list[float]
        Training loss values for each epoch (mean over the epoch's cells).
    holdout_loss : list[float]
        Holdout loss values for each epoch (mean over holdout cells; NaN without a holdout).
    holdout_accuracy : list[float]
        Holdout accuracy values for each epoch (NaN without a holdout).
    holdout_cells : int | None
        Number of holdout cells the per-epoch figures are measured on (set by the trainer): with
        few of them, accuracy moves in coarse steps of 1 / holdout_cells.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    holdout_loss: list[float] = field(default_factory=list)
    holdout_accuracy: list[float] = field(default_factory=list)
    holdout_cells: int | None = None

    def update(self, epoch: int, train_loss: float, holdout_loss: float, holdout_accuracy: float) -> None:
        """Update the logger with new training and validation metrics.

        Parameters
        ----------
        epoch : int
            Current epoch index.
        train_loss : float
            Training loss at this epoch.
        holdout_loss : float
            Validation loss at this epoch.
        holdout_accuracy : float
            Validation accuracy at this epoch.
        """
        self.epoch.append(int(epoch))
        self.train_loss.append(float(train_loss))
        self.holdout_loss.append(float(holdout_loss))
        self.holdout_accuracy.append(float(holdout_accuracy))

    def report(self, silent: bool = False, flush: bool = True) -> None:
        """Print most recent result to standard output.

        Parameters
        ----------
        silent : bool
            If True, suppresses report output.
        flush : bool
            If True, write report to output immediately.

        Returns
        -------
        None
            Output is printed to standard output.
        """
        if silent or not self.epoch:
            return
        msg = (
            f"[ginseng] epoch {self.epoch[-1] + 1} | train loss {self.train_loss[-1]:.4f} | "
            f"holdout loss {self.holdout_loss[-1]:.4f} | "
            f"holdout accuracy {self.holdout_accuracy[-1]:.4f}"
        )
        print(msg, flush=flush)

    def to_dataframe(self) -> pd.DataFrame:
        """Return the history as a table with one row per epoch.

        Returns
        -------
        pd.DataFrame
            Columns ``epoch`` (numbered from 1, as the log prints it), ``train_loss``,
            ``holdout_loss``, ``holdout_accuracy``.
        """
        return pd.DataFrame(
            {
                "epoch": np.asarray(self.epoch, dtype=np.int64) + 1,
                "train_loss": np.asarray(self.train_loss, dtype=np.float64),
                "holdout_loss": np.asarray(self.holdout_loss, dtype=np.float64),
                "holdout_accuracy": np.asarray(self.holdout_accuracy, dtype=np.float64),
            }
        )

    def save_csv(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the history as CSV (atomically; an existing file needs ``overwrite=True``).

        Parameters
        ----------
        path : str | PathLike
            Destination file.
        overwrite : bool
            Replace an existing file.

        Returns
        -------
        Path
            The written file.
        """
        with atomic_path(path, overwrite=overwrite, what="metrics file") as tmp:
            self.to_dataframe().to_csv(tmp, index=False)
        return Path(path)

    def plot(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Plot the training curves (losses and holdout accuracy per epoch) to an image file.

        Parameters
        ----------
        path : str | PathLike
            Destination image (format from the suffix, e.g. ``.png``).
        overwrite : bool
            Replace an existing file.

        Returns
        -------
        Path
            The written file.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        epochs = np.asarray(self.epoch) + 1
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax_loss.plot(epochs, self.train_loss, marker="o", label="train")
        ax_loss.plot(epochs, self.holdout_loss, marker="o", label="holdout")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("cross-entropy")
        ax_loss.legend()
        ax_acc.plot(epochs, self.holdout_accuracy, marker="o", color="C2")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("holdout accuracy")
        ax_acc.set_ylim(0.0, 1.0)
        if self.holdout_cells is not None:
            ax_acc.set_title(f"holdout: {self.holdout_cells:,} cells (steps of {1 / max(self.holdout_cells, 1):.3g})", fontsize=9)
        fig.tight_layout()
        try:
            with atomic_path(path, overwrite=overwrite, what="plot") as tmp:
                fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100)
        finally:
            plt.close(fig)
        return path


# --------------------------------------------------------------------------------------------
# The sharded step
# --------------------------------------------------------------------------------------------


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device of every process).

    Devices are ordered by process, so process ``p``'s rows of a global batch are one contiguous
    block, which is what ``jax.make_array_from_process_local_data`` expects.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        msg = "devices must list at least one device, got an empty list"
        raise ValueError(msg)
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


@dataclass(frozen=True)
class _Layout:
    """Where this process sits in the mesh."""

    process_index: int  # position of this process among the mesh's processes
    process_count: int
    local_devices: int  # mesh devices owned by this process


def _layout(mesh: Mesh) -> _Layout:
    devs = list(mesh.devices.flat)
    procs = sorted({d.process_index for d in devs})
    me = jax.process_index()
    if me not in procs:
        msg = f"this process ({me}) owns none of the {len(devs)} devices given to the trainer"
        raise ValueError(msg)
    per_proc = {p: sum(d.process_index == p for d in devs) for p in procs}
    if len(set(per_proc.values())) != 1:
        msg = f"every process must bring the same number of devices, got {per_proc} (process: devices)"
        raise ValueError(msg)
    return _Layout(procs.index(me), len(procs), per_proc[me])


def _cross_entropy(logits: Float[Array, "*cells classes"], y: Int[Array, "*cells"]) -> Float[Array, "*cells"]:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]


def _cell_keys(key: Array, step: Int[Array, ""], slot: Int[Array, " cells"]) -> Array:
    # Keyed by the global step and the cell's position in the GLOBAL batch, never by the device.
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda s: jax.random.fold_in(step_key, s))(slot)


# Fields that shape the compiled computations. Steps are cached on them and on the mesh, so that
# training again with the same settings (tests, sweeps, resumes) reuses the compiled step.
_STEP_FIELDS = (
    "rate", "lam_max", "lower", "upper", "hidden_dim", "dropout_rate", "lr", "lr_schedule", "betas",
    "eps", "weight_decay", "normalize", "target_sum",
)


def _step_key(settings: GinsengTrainerSettings) -> tuple:
    return tuple(getattr(settings, f) for f in _STEP_FIELDS)


def _build_train_step(
    settings: GinsengTrainerSettings, mesh: Mesh, total_steps: int, stop_flag: bool = False
):
    # Only a schedule reads total_steps: leave it out of the cache key otherwise.
    total = int(total_steps) if settings.lr_schedule != "constant" else 0
    return _cached_train_step(_step_key(settings), mesh, stop_flag, total)


def _build_eval_step(settings: GinsengTrainerSettings, mesh: Mesh):
    return _cached_eval_step(_step_key(settings), mesh)


# Above this many parameters a warning says what the model costs (the gene x gene layers grow with
# the square of the number of genes: 2,000 HVGs give 9 M, all 13,714 genes of pbmc3k 383 M).
LARGE_MODEL_PARAMS = 50_000_000


def _n_params(n_genes: int, n_classes: int, hidden_dim: int) -> int:
    g, c, h = n_genes, n_classes, hidden_dim
    return 2 * (g * g + g) + (g * h + h) + (h * g + g) + (g * c + c)


def _build_init(settings: GinsengTrainerSettings, mesh: Mesh, n_genes: int, n_classes: int):
    n = _n_params(int(n_genes), int(n_classes), settings.hidden_dim)
    if n > LARGE_MODEL_PARAMS and jax.process_index() == 0:
        msg = (
            f"the model has {n / 1e6:,.0f} M parameters for {n_genes} genes (two gene x gene "
            f"layers): {4 * n / 1e9:.1f} GB as float32, about {16 * n / 1e9:.1f} GB in training "
            "with Adam's moments and the gradients, and the same again per checkpoint. Selecting "
            "highly variable genes (a few thousand) is the usual choice"
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
    return _cached_init(settings.hidden_dim, mesh, int(n_genes), int(n_classes))


def _settings_from_key(key: tuple) -> GinsengTrainerSettings:
    return GinsengTrainerSettings(**dict(zip(_STEP_FIELDS, key)))


def _all_sum(mesh: Mesh):
    """``(single, all_sum)``: the sum over the ``"data"`` axis used inside the sharded steps.

    On a one-device mesh the sum is the identity, and it is left out: XLA still emits an
    all-reduce for a ``psum`` over one device, and on the CPU backend those 14 no-op all-reduces of
    the gradients cost ~15-20 % of the step (``benchmarks/bench_step_variants.py``). The result is
    the same bit for bit. ``single`` also turns off shard_map's replication check, which cannot see
    that a value summed over one device is replicated.
    """
    single = mesh.size == 1
    if single:
        return True, lambda tree: tree
    return False, functools.partial(jax.lax.psum, axis_name=DATA_AXIS)


@functools.lru_cache(maxsize=16)
def _cached_train_step(key: tuple, mesh: Mesh, stop_flag: bool = False, total_steps: int = 0):
    """Jitted ``step(params, opt_state, metrics, key, x, y, slot, mask) -> (params, opt_state, metrics)``.

    ``metrics`` is a float32 ``[loss_sum, n_cells]`` accumulated on device, so that the host need not
    fetch anything per step. params, opt_state and metrics are donated.

    With ``stop_flag`` the step takes one more argument, an int32 array with one entry per device
    (sharded over ``"data"``: 1 where that device's process was asked to stop), and returns one more
    value, its sum over all devices. The sum rides on the gradient all-reduce, so every process
    learns that some process received SIGTERM/SIGUSR1 at no extra collective.
    """
    s = _settings_from_key(key)
    single, all_sum = _all_sum(mesh)

    def cell_loss(params, key, x, y):
        k_aug, k_nn = jax.random.split(key)
        x = augment(k_aug, x, s.rate, s.lam_max, s.lower, s.upper)
        logits = nn_annotate(
            params, k_nn, x, dropout_rate=s.dropout_rate, normalize=s.normalize,
            target_sum=s.target_sum, training=True,
        )
        return _cross_entropy(logits, y)

    def local_step(params, opt_state, metrics, key, x, y, slot, mask, stop=None):
        keys = _cell_keys(key, opt_state.step, slot)
        # Counts arrive as stored (uint16/uint32, or float32); padding rows become zero counts
        # (finite everywhere) and are masked out of the sum.
        x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)

        def local_loss(p):
            losses = jax.vmap(cell_loss, in_axes=(None, 0, 0, 0))(p, keys, x, y)
            return jnp.sum(jnp.where(mask, losses, 0.0))

        # Differentiate with respect to a per-device ("varying") copy of the replicated params:
        # these are this device's gradients, summed explicitly below. (Differentiating the
        # replicated params directly would make autodiff insert that sum itself, and a second
        # psum would then scale the gradients by the device count.)
        local_params = params if single else jax.lax.pcast(params, DATA_AXIS, to="varying")
        loss_sum, grads = jax.value_and_grad(local_loss)(local_params)
        count = jnp.sum(mask.astype(jnp.float32))
        if stop is None:
            grads, loss_sum, count = all_sum((grads, loss_sum, count))
        else:
            grads, loss_sum, count, stop_total = all_sum((grads, loss_sum, count, jnp.sum(stop)))
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        lr = s.lr if s.lr_schedule == "constant" else opt_cosine_lr(s.lr, opt_state.step, total_steps)
        params, opt_state = opt_adam_update(
            grads, params, opt_state, lr=lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay
        )
        out = (params, opt_state, metrics + jnp.stack([loss_sum, count]))
        return (*out, stop_total) if stop_flag else out

    rep, dat = P(), P(DATA_AXIS)
    sharded = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(rep, rep, rep, rep, dat, dat, dat, dat) + ((dat,) if stop_flag else ()),
        out_specs=(rep, rep, rep) + ((rep,) if stop_flag else ()),
        check_vma=not single,
    )
    return jax.jit(sharded, donate_argnums=(0, 1, 2))


@functools.lru_cache(maxsize=16)
def _cached_eval_step(key: tuple, mesh: Mesh):
    """Jitted ``step(params, metrics, x, y, mask) -> metrics``; metrics = [loss_sum, correct, count]."""
    s = _settings_from_key(key)
    single, all_sum = _all_sum(mesh)

    def local_step(params, metrics, x, y, mask):
        x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)
        logits = nn_annotate(
            params, jax.random.key(0), x, dropout_rate=s.dropout_rate, normalize=s.normalize,
            target_sum=s.target_sum, training=False,
        )
        losses = _cross_entropy(logits, y)
        loss_sum = jnp.sum(jnp.where(mask, losses, 0.0))
        correct = jnp.sum(jnp.where(mask, jnp.argmax(logits, axis=-1) == y, False).astype(jnp.float32))
        count = jnp.sum(mask.astype(jnp.float32))
        return metrics + all_sum(jnp.stack([loss_sum, correct, count]))

    rep, dat = P(), P(DATA_AXIS)
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(rep, rep, dat, dat, dat), out_specs=rep,
        check_vma=not single,
    )
    return jax.jit(sharded, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def _cached_init(hidden_dim: int, mesh: Mesh, n_genes: int, n_classes: int):
    """Jitted ``init(key) -> (params, opt_state)``, created directly replicated on every device."""

    def init(key):
        params = nn_annotate_init(key, n_genes, n_classes, hidden_dim)
        return params, opt_init_adam(params)

    return jax.jit(init, out_shardings=NamedSharding(mesh, P()))


def _global_arrays(batch, mesh: Mesh, global_rows: int) -> tuple[Array, Array, Array, Array]:
    """Assemble the global (x, y, slot, mask) arrays from this process's rows of the batch.

    ``x`` keeps its dtype (the loader's: the store's integer counts for the trainer), so that no
    more bytes than stored cross to the devices; the steps convert to float32.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    x = np.asarray(batch.x)
    return (
        jax.make_array_from_process_local_data(sharding, x, (global_rows, x.shape[1])),
        jax.make_array_from_process_local_data(sharding, np.asarray(batch.y, np.int32), (global_rows,)),
        jax.make_array_from_process_local_data(sharding, np.asarray(batch.slot, np.int32), (global_rows,)),
        jax.make_array_from_process_local_data(sharding, np.asarray(batch.mask, bool), (global_rows,)),
    )


def _to_host(tree: PyTree) -> PyTree:
    """Copy a replicated pytree to host numpy (each process holds a full copy)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place host values on every device of the mesh (every process passes the same values)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)), tree
    )




# --------------------------------------------------------------------------------------------
# Preemption (checkpoint files: ginseng/_checkpoint.py)
# --------------------------------------------------------------------------------------------


class _StopSignal:
    """Records SIGTERM/SIGUSR1 so that the loop can checkpoint at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, active: bool):
        self.received: int | None = None
        self._old: dict = {}
        self.active = active and threading.current_thread() is threading.main_thread()

    def _handle(self, signum, frame):
        self.received = signum

    def __enter__(self):
        if self.active:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# --------------------------------------------------------------------------------------------
# The trainer
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


def _prepare_checkpoint_dir(ckpt_dir, resume: bool, main: bool) -> None:
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


def _restore(ckpt_dir, settings, identity, batches_per_epoch: int, total_steps: int, main: bool):
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
        make every process stop at the same step, at most 2 steps later (or at the epoch's end),
        write one checkpoint and exit with ``PREEMPTED_EXIT_CODE`` (75).

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
    if not _is_int(epochs) or epochs < 1:
        msg = f"epochs must be an integer >= 1, got {epochs!r}"
        raise ValueError(msg)
    main = jax.process_index() == 0
    verbose = main and not silent

    # With a checkpoint_dir, SIGTERM/SIGUSR1 only set a flag from here on (also while opening the
    # dataset, compiling or restoring), so that a preempted job always leaves through a
    # checkpoint and PREEMPTED_EXIT_CODE.
    watch = settings.checkpoint_dir is not None
    with _StopSignal(active=watch) as stop:
        dataset = _open_dataset(dataset)
        mesh = make_mesh(devices)
        layout = _layout(mesh)
        dataset = _prepare_holdout(dataset, settings)

        # dtype=None: counts travel to the devices as stored (uint16 for most data: half the bytes
        # of float32, no conversion on the host); the steps convert them to float32, exactly.
        loader_kwargs = {
            "batch_size": settings.batch_size, "seed": settings.seed, "pad_multiple": layout.local_devices,
            "process_index": layout.process_index, "process_count": layout.process_count,
            "dtype": None,
        }
        train_loader = dataset.loader(
            split="train", shuffle=True, balance=settings.balance_train, **loader_kwargs
        )
        n_holdout = len(dataset.holdout_indices)
        holdout_loader = (
            dataset.loader(split="holdout", shuffle=False, balance=False, **loader_kwargs)
            if n_holdout > 0
            else None
        )
        if holdout_loader is None and main:
            warnings.warn(
                "the dataset has no holdout cells: holdout loss and accuracy are logged as NaN",
                stacklevel=2,
            )

        init_key, train_key = jax.random.split(jax.random.key(settings.seed))
        params, opt_state = _build_init(settings, mesh, dataset.n_genes, dataset.n_labels)(init_key)
        logger = GinsengLogger(holdout_cells=n_holdout)
        if verbose and n_holdout:
            coarse = f" (few: accuracy moves in steps of {1 / n_holdout:.3f})" if n_holdout < 200 else ""
            print(
                f"[ginseng] training on {len(dataset.train_indices):,} cells; per-epoch holdout: "
                f"{n_holdout:,} cells{coarse}",
                flush=True,
            )
        identity = getattr(dataset, "identity", "")
        ckpt_dir = settings.checkpoint_dir
        total_steps = epochs * train_loader.num_batches
        train_step = _build_train_step(settings, mesh, total_steps, stop_flag=watch)
        eval_step = _build_eval_step(settings, mesh)
        _prepare_checkpoint_dir(ckpt_dir, resume, main)
        start_epoch, start_batch, epoch_metrics = 0, 0, np.zeros(2, np.float32)
        key_data = jax.random.key_data(train_key)
        restored = (
            _restore(ckpt_dir, settings, identity, train_loader.num_batches, total_steps, main)
            if resume
            else None
        )
        if restored is not None:
            params = _replicate(restored["params"], mesh)
            opt_state = _replicate(restored["opt_state"], mesh)
            key_data = restored["train_key"]
            start_epoch, start_batch = restored["epoch"], restored["step_in_epoch"]
            epoch_metrics = restored["metrics"]
            for name, values in restored["logger"].items():
                setattr(logger, name, [int(v) if name == "epoch" else float(v) for v in values])
            if verbose:
                print(
                    f"[ginseng] resuming from {str(restored['path'])!r} at epoch "
                    f"{start_epoch + 1}, step {start_batch} of {train_loader.num_batches} "
                    f"(global step {restored['global_step']})",
                    flush=True,
                )
        train_key = jax.random.wrap_key_data(_replicate(np.asarray(key_data), mesh))

        if watch:
            # This process's stop request, one entry per local device; built once (never donated).
            flag_sharding = NamedSharding(mesh, P(DATA_AXIS))
            stop_flags = [
                jax.make_array_from_process_local_data(
                    flag_sharding, np.full(layout.local_devices, v, np.int32), (mesh.devices.size,)
                )
                for v in (0, 1)
            ]
        # The all-reduced stop counts of the last steps, read _STOP_LAG steps late so that the host
        # never waits on the step it just dispatched. Every process reads the same values at the same
        # step, so all of them checkpoint at the same step and exit together.
        pending: collections.deque = collections.deque()

        def checkpoint(epoch, batch):
            host = _to_host({
                "params": params, "opt_state": opt_state, "metrics": metrics,
                "train_key": jax.random.key_data(train_key),
            })
            return save_checkpoint(
                ckpt_dir,
                state={
                    **host, "rng_impl": jax.random.key_impl(train_key),
                    "device_count": len(train_key.sharding.device_set),
                },
                position={
                    "epoch": epoch, "step_in_epoch": batch, "total_steps": total_steps,
                    "batches_per_epoch": train_loader.num_batches,
                },
                logger=logger, settings=settings, identity=identity, keep=settings.keep_checkpoints,
            )

        def preempted(epoch, batch):
            written = checkpoint(epoch, batch)
            if jax.process_count() > 1:
                from ginseng import distributed

                distributed.barrier("ginseng_preempted")  # nobody exits before the file is in place
            if verbose:
                why = signal.Signals(stop.received).name if stop.received is not None else "another process's signal"
                print(
                    f"[ginseng] {why}: checkpoint written to {str(written)!r} at "
                    f"epoch {epoch + 1}, step {batch}; exiting with code {PREEMPTED_EXIT_CODE} "
                    "(resume=True continues)",
                    flush=True,
                )
            raise SystemExit(PREEMPTED_EXIT_CODE)

        for epoch in range(start_epoch, epochs):
            first = start_batch if epoch == start_epoch else 0
            metrics = _replicate(epoch_metrics if epoch == start_epoch else np.zeros(2, np.float32), mesh)
            with tqdm(
                total=train_loader.num_batches,
                initial=first,
                desc=f"[ginseng] epoch {epoch + 1}/{epochs}",
                unit="step",
                disable=bar_disabled(not verbose, train_loader.num_batches),
            ) as bar:
                for i, batch in enumerate(train_loader.epoch(epoch, start_batch=first), start=first):
                    x, y, slot, mask = _global_arrays(batch, mesh, train_loader.global_batch)
                    stop_now = False
                    if watch:
                        params, opt_state, metrics, stop_count = train_step(
                            params, opt_state, metrics, train_key, x, y, slot, mask,
                            stop_flags[stop.received is not None],
                        )
                        pending.append(stop_count)
                        if len(pending) > _STOP_LAG:
                            stop_now = int(_to_host(pending.popleft())) > 0
                    else:
                        params, opt_state, metrics = train_step(
                            params, opt_state, metrics, train_key, x, y, slot, mask
                        )
                    bar.update(1)
                    if verbose and (i + 1) % _PROGRESS_EVERY == 0:
                        total, count = _to_host(metrics)
                        bar.set_postfix(loss=f"{total / max(count, 1.0):.4f}")
                    if stop_now:
                        preempted(epoch, i + 1)
                    if settings.checkpoint_every and (i + 1) % settings.checkpoint_every == 0 and watch:
                        checkpoint(epoch, i + 1)
            total, count = _to_host(metrics)
            train_loss = float(total / count) if count > 0 else float("nan")
            # The epoch is done (its metrics were just fetched): read the remaining stop counts.
            stop_now = any(int(_to_host(c)) > 0 for c in pending)
            pending.clear()

            holdout_loss = holdout_acc = float("nan")
            if holdout_loader is not None:
                ev = _replicate(np.zeros(3, np.float32), mesh)
                for batch in holdout_loader.epoch(0):
                    x, y, _, mask = _global_arrays(batch, mesh, holdout_loader.global_batch)
                    ev = eval_step(params, ev, x, y, mask)
                loss_sum, correct, count = _to_host(ev)
                if count > 0:
                    holdout_loss, holdout_acc = float(loss_sum / count), float(correct / count)
            logger.update(epoch, train_loss, holdout_loss, holdout_acc)
            logger.report(silent=not verbose)
            if watch:
                # (epoch + 1, step 0): a mid-epoch checkpoint at step == num_batches instead
                # resumes into this epoch's holdout evaluation and log line.
                metrics = _replicate(np.zeros(2, np.float32), mesh)
                if stop_now and epoch + 1 < epochs:
                    preempted(epoch + 1, 0)
                checkpoint(epoch + 1, 0)

    state = GinsengModelState(
        params=_to_host(params),
        genes=np.asarray(dataset.genes),
        label_keys=np.asarray(dataset.label_keys),
        label_values=np.asarray(dataset.label_values),
        normalize=settings.normalize,
        target_sum=settings.target_sum,
        dropout_rate=settings.dropout_rate,
        training=False,
    )
    return logger, state
