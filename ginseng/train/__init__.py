"""Settings, logger and the data-parallel trainer.

The rooms (each file one concern):

- ``settings``: :class:`GinsengTrainerSettings` and the one place training values are checked.
- ``logger``: :class:`GinsengLogger`.
- ``step``: the compiled init / train / eval steps (``shard_map`` + ``lax.psum``).
- ``checkpoint``: checkpoint files (write, rotate, read, resume), and the trainer's checkpointer.
- ``preempt``: SIGTERM/SIGUSR1 -> one checkpoint at the same step on every process, exit 75.
- ``loop``: :func:`GinsengTrainer` as named stages over one ``TrainState``.

The mesh and moving arrays on and off it are shared with annotation (``ginseng._core.mesh``).
"""

from ginseng._core.mesh import make_mesh
from ginseng.state import GinsengModelState
from ginseng.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
)
from ginseng.train.logger import GinsengLogger
from ginseng.train.loop import GinsengTrainer, TrainState
from ginseng.train.preempt import PREEMPTED_EXIT_CODE
from ginseng.train.settings import LR_SCHEDULES, GinsengTrainerSettings

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LR_SCHEDULES",
    "PREEMPTED_EXIT_CODE",
    "GinsengLogger",
    "GinsengModelState",
    "GinsengTrainer",
    "GinsengTrainerSettings",
    "TrainState",
    "latest_checkpoint",
    "list_checkpoints",
    "make_mesh",
    "read_checkpoint",
]
