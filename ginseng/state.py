"""The trained model's state: parameters plus what is needed to apply them to new data.

Defined here (and re-exported from :mod:`ginseng.train`) so that :mod:`ginseng.io` and
:mod:`ginseng.annotate` can use it without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import PyTree

__all__ = ["GinsengModelState"]


def _leaves(tree):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key])
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _leaves(item)
    elif tree is not None:
        yield tree


@dataclass(repr=False)
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
        Dropout probability applied during training (and by annotate's Monte Carlo dropout).
    training : bool
        If True, model weighted should not be frozen.
    """

    params: PyTree
    genes: np.ndarray
    label_keys: np.ndarray
    label_values: np.ndarray
    normalize: bool = True
    target_sum: float | None = None
    dropout_rate: float = 0.1
    training: bool = False

    def __repr__(self) -> str:
        # The default dataclass repr printed every parameter array and gene name.
        leaves = [np.asarray(x) for x in _leaves(self.params)]
        n_params = sum(int(x.size) for x in leaves)
        labels = [str(v) for v in np.asarray(self.label_values)]
        shown = ", ".join(labels[:6]) + (f", ... ({len(labels)} in all)" if len(labels) > 6 else "")
        return (
            f"GinsengModelState(n_genes={self.n_genes}, n_classes={self.n_classes}, "
            f"labels=[{shown}], params={n_params:,} in {len(leaves)} arrays, "
            f"normalize={self.normalize}, target_sum={self.target_sum}, "
            f"dropout_rate={self.dropout_rate}, training={self.training})"
        )

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_classes(self) -> int:
        return len(self.label_values)
