"""GinsengLogger: the per-epoch training record, as a table, a CSV file and a plot."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ginseng._core.files import atomic_path

__all__ = ["GinsengLogger"]


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
