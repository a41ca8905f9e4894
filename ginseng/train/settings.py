"""Training settings, and the one place every training value is checked.

:func:`check_values` holds the rules for every field of :class:`GinsengTrainerSettings`. The
settings run it on construction, naming the Python field (``GinsengTrainerSettings.lr``); the
command line's configuration runs the same rules on its own keys, naming those (``optim.lr``), so
that the two can never drift apart and a user reads the key they typed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["DEVICE_DATA", "GROUP_MODES", "LR_SCHEDULES", "GinsengTrainerSettings", "check_values", "is_int", "is_real"]

LR_SCHEDULES = ("constant", "cosine")
DEVICE_DATA = ("auto", "resident", "streamed")
GROUP_MODES = ("fraction", "loo")


def is_int(value) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _real(lo=None, hi=None, lo_open=False, hi_open=False, optional=False):
    lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    hi_s = "" if hi is None else (f"< {hi}" if hi_open else f"<= {hi}")
    expected = ("a number " + " and ".join(s for s in (lo_s, hi_s) if s)).strip()
    if optional:
        expected += " or None"

    def ok(v):
        if v is None:
            return optional
        if not is_real(v) or not math.isfinite(float(v)):
            return False
        f = float(v)
        return not (
            (lo is not None and (f <= lo if lo_open else f < lo))
            or (hi is not None and (f >= hi if hi_open else f > hi))
        )

    return ok, expected


def _integer(lo, optional=False):
    expected = f"an integer >= {lo}" + (" or None" if optional else "")
    return (lambda v: (v is None and optional) or (is_int(v) and v >= lo)), expected


def _choice(values):
    return (lambda v: v in values), " or ".join(repr(v) for v in values)


def _flag():
    return (lambda v: isinstance(v, (bool, np.bool_))), "True or False"


def _betas(v) -> bool:
    return (
        isinstance(v, (tuple, list)) and len(v) == 2
        and all(is_real(b) and 0.0 <= float(b) < 1.0 for b in v)
    )


# field -> (accepts(value), what is expected)
RULES: dict[str, tuple[Callable, str]] = {
    "rate": _real(0.0, 1.0, hi_open=True, optional=True),
    "lam_max": _real(0.0, optional=True),
    "lower": _integer(0, optional=True),
    "upper": _integer(1, optional=True),
    "hidden_dim": _integer(1),
    "dropout_rate": _real(0.0, 1.0, hi_open=True),
    "batch_size": _integer(1),
    "lr": _real(0.0, lo_open=True),
    "lr_schedule": _choice(LR_SCHEDULES),
    "betas": (_betas, "a pair of numbers in [0, 1)"),
    "eps": _real(0.0, lo_open=True),
    "weight_decay": _real(0.0),
    "normalize": _flag(),
    "target_sum": _real(0.0, lo_open=True, optional=True),
    "holdout_fraction": _real(0.0, 1.0, lo_open=True, hi_open=True),
    "balance_train": _flag(),
    "group_level": _flag(),
    "group_mode": _choice(GROUP_MODES),
    "seed": _integer(0),
    "checkpoint_dir": ((lambda v: True), "a path or None"),
    "checkpoint_every": _integer(1, optional=True),
    "keep_checkpoints": _integer(1),
    "device_data": _choice(DEVICE_DATA),
    "steps_per_dispatch": _integer(1),
}


def check_values(values: Mapping, name: Callable[[str], str] = "GinsengTrainerSettings.{}".format) -> None:
    """Check training values against the rules of :class:`GinsengTrainerSettings`.

    Parameters
    ----------
    values : Mapping
        Field name -> value; only the fields present are checked (the pair ``lower``/``upper``
        when both keys are present).
    name : callable
        Field name -> the name the caller knows it by, used in the message (the Python field by
        default; the command line passes its ``section.key``).

    Raises
    ------
    ValueError
        Naming the value, what was expected and what was found.
    """
    for field, value in values.items():
        accepts, expected = RULES[field]
        if not accepts(value):
            msg = f"{name(field)} must be {expected}, got {value!r}"
            raise ValueError(msg)
    if "lower" in values and "upper" in values:
        lower, upper = values["lower"], values["upper"]
        if lower is not None and upper is None:
            msg = (
                f"{name('lower')}={lower} needs upper (the exclusive maximum number of genes to "
                "drop), got upper=None"
            )
            raise ValueError(msg)
        if lower is not None and not upper > lower:
            msg = f"{name('upper')} must be > lower, got lower={lower}, upper={upper}"
            raise ValueError(msg)


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
    device_data : str
        Where the training cells are drawn from. ``"resident"``: the whole dataset is decoded once
        into device memory (replicated on every device) and every batch is drawn there; the
        host sends only each batch's row numbers. ``"streamed"``: for each dispatch the host
        decodes the whole chunks its batches need into one buffer, sends it once, and the
        batches are drawn from it on the device while the next one is read. ``"auto"``
        (default): resident when the dataset fits the device-memory budget (40 % of a device's
        memory; on a CPU, 25 % of RAM over all its devices), else streamed, saying why. The
        batches, and so the trained model, are the same to every bit in both modes.
    steps_per_dispatch : int
        Train steps run by one dispatch to the devices (a ``lax.scan`` over that many batches):
        the host dispatches and reads stop flags once per this many steps. An epoch's last
        group, or one cut short at a checkpoint, is padded with fully masked steps that leave
        the parameters and optimizer untouched.
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

    # Devices
    device_data: str = "auto"
    steps_per_dispatch: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # Hydra/YAML give lists
            self.betas = tuple(self.betas)
        check_values({f.name: getattr(self, f.name) for f in fields(self)})
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)
