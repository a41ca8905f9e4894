"""The trained model's state: parameters plus what is needed to apply them to new data.

Defined here (and re-exported from :mod:`ginseng.train`) so that :mod:`ginseng.io` and
:mod:`ginseng.annotate` can use it without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import PyTree

__all__ = ["GinsengModelState"]


@dataclass
class GinsengModelState:
    """State of the Ginseng model, including parameters and metadata.

    Attributes
    ----------
    params : PyTree
        Model parameters (nested dicts of arrays, as from ``nn_annotate_init``).
    genes : np.ndarray
        Gene names used during model training.
    label_keys : np.ndarray
        Keys denoting integer identifier for each label.
    label_values : np.ndarray
        Values denoting original string/integer identifiers for each label.
    normalize : bool
        If True, model was trained on normalized data
    target_sum : float
        Target sum used for normalization (None: the number of genes).
    dropout_rate : float
        Dropout probability applied during training.
    training : bool
        If True, model weighted should not be frozen.
    """

    params: PyTree
    genes: np.ndarray
    label_keys: np.ndarray
    label_values: np.ndarray
    normalize: bool = True
    target_sum: float | None = 1e4
    dropout_rate: float = 0.25
    training: bool = False

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_classes(self) -> int:
        return len(self.label_values)
