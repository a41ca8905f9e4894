"""The trained model's state: parameters plus what is needed to apply them to new data.

Defined here (and re-exported from :mod:`ginseng.train`) so that :mod:`ginseng.io` and
:mod:`ginseng.annotate` can use it without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import PyTree

__all__ = ["CONFIDENCE_BINS", "GinsengModelState"]

# Bins of the reference confidence histogram (``GinsengModelState.confidence_counts``): 1/4096
# resolution in [0, 1], exact integer counts, summed over devices and processes.
CONFIDENCE_BINS = 4096


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
    confidence_counts : np.ndarray | None
        What the model saw in training, for ``annotate(min_confidence="auto")``: how many of its
        holdout cells (its training cells when it had no holdout) had their top probability in
        each of ``CONFIDENCE_BINS`` equal bins of [0, 1]. None for a state built by hand or a
        model file written before ginseng 0.2.
    """

    params: PyTree
    genes: np.ndarray
    label_keys: np.ndarray
    label_values: np.ndarray
    normalize: bool = True
    target_sum: float | None = None
    dropout_rate: float = 0.1
    training: bool = False
    confidence_counts: np.ndarray | None = None

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
