"""Pure JAX functions of the annotation network.

Every function here is a pure function of ``(params, key, x)``: no globals, no devices, no files.
All operations act on the last axis, so each function works on a batch ``(cells, genes)`` and on a
single cell ``(genes,)`` alike. The trainer relies on that: it ``vmap``s ``nn_annotate`` over cells
with one PRNG key per cell (derived from the step and the cell's position in the global batch), so
the result does not depend on how a batch is split across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

__all__ = [
    "nn_annotate",
    "nn_annotate_evaluate",
    "nn_annotate_init",
    "nn_annotate_loss",
    "nn_dropout",
    "nn_init_linear",
    "nn_linear",
    "nn_normalize",
    "nn_xavier_uniform",
]


def nn_xavier_uniform(key: Array, shape: tuple[int, int]) -> Float[Array, "fan_in fan_out"]:
    """Initialize weights with Xavier uniform distribution.

    Parameters
    ----------
    key : Array
        PRNG key array for random number generation.
    shape : tuple of int
        Shape of the weight matrix.

    Returns
    -------
    Array
        Initialized weight matrix, uniform on ``[-a, a]`` with ``a = sqrt(6 / (fan_in + fan_out))``.
    """
    fan_in, fan_out = shape[0], shape[1]
    limit = (6.0 / (fan_in + fan_out)) ** 0.5
    return jax.random.uniform(key, shape, jnp.float32, minval=-limit, maxval=limit)


def nn_init_linear(key: Array, in_dim: int, out_dim: int) -> PyTree[Float[Array, ...]]:
    """Initialize parameters for a linear layer.

    Parameters
    ----------
    key : Array
        PRNG key array for random initialization.
    in_dim : int
        Input dimension.
    out_dim : int
        Output dimension.

    Returns
    -------
    PyTree[Float[Array, "..."]]
        Dictionary with weight matrix `W` of shape ``(in_dim, out_dim)`` and bias vector `b`.
    """
    return {"W": nn_xavier_uniform(key, (in_dim, out_dim)), "b": jnp.zeros((out_dim,), jnp.float32)}


def nn_linear(
    params: PyTree[Float[Array, ...]], x: Float[Array, "*cells in_dim"]
) -> Float[Array, "*cells out_dim"]:
    """Apply a linear transformation.

    Parameters
    ----------
    params : PyTree[Float[Array, "..."]]
        Layer parameters with `W` and `b`.
    x : Array
        Input tensor.

    Returns
    -------
    Array
        Transformed output tensor, ``x @ W + b``.
    """
    return x @ params["W"] + params["b"]


def nn_dropout(
    key: Array, x: Float[Array, ...], rate: float, training: bool = True
) -> Float[Array, ...]:
    """Apply dropout to input array.

    Parameters
    ----------
    key : Array
        PRNG key array for dropout mask.
    x : Array
        Input tensor.
    rate : float
        Dropout probability (a Python float: it selects the computation, it is not traced).
    training : bool
        If True, apply dropout. Set to False for determinstic output after training.

    Returns
    -------
    Array
        Tensor with dropout applied; kept entries are scaled by ``1 / (1 - rate)``.
    """
    if not training or rate == 0.0:
        return x
    if not 0.0 <= rate < 1.0:
        msg = f"dropout rate must be in [0, 1), got {rate}"
        raise ValueError(msg)
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def nn_normalize(
    x: Float[Array, "*cells genes"], target_sum: float = 1e4
) -> Float[Array, "*cells genes"]:
    """Normalize counts per cell and apply log transform.

    Parameters
    ----------
    x : Array
        Count matrix.
    target_sum : float
        Target total count per cell after normalization.

    Returns
    -------
    Array
        ``log1p(target_sum * x / sum(x))`` per cell; a cell with no counts stays all zeros.
    """
    total = jnp.sum(x, axis=-1, keepdims=True)
    scale = jnp.where(total > 0, target_sum / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.log1p(x * scale)


def nn_annotate_init(
    key: Array, n_genes: int, n_classes: int, hidden_dim: int = 256
) -> PyTree[Float[Array, ...]]:
    """Initialize parameters for the cell type annotation network.

    The network embeds genes with two gene-by-gene layers, gates every gene with an attention
    weight in (0, 1) computed through a ``hidden_dim`` bottleneck, and classifies the gated genes.

    Parameters
    ----------
    key : Array
        PRNG key array for random initialization.
    n_genes : int
        Number of genes.
    n_classes : int
        Number of classes.
    hidden_dim : int
        Dimension of hidden layers.

    Returns
    -------
    PyTree[Float[Array, "..."]]
        Dictionary of initialized model parameters: ``features1``, ``features2``, ``attn1``,
        ``attn2`` and ``head``, each a linear layer.
    """
    for name, value in (("n_genes", n_genes), ("n_classes", n_classes), ("hidden_dim", hidden_dim)):
        if int(value) < 1:
            msg = f"{name} must be >= 1, got {value}"
            raise ValueError(msg)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    return {
        "features1": nn_init_linear(k1, n_genes, n_genes),
        "features2": nn_init_linear(k2, n_genes, n_genes),
        "attn1": nn_init_linear(k3, n_genes, hidden_dim),
        "attn2": nn_init_linear(k4, hidden_dim, n_genes),
        "head": nn_init_linear(k5, n_genes, n_classes),
    }


def nn_annotate(
    params: PyTree[Float[Array, ...]],
    key: Array,
    x: Float[Array, "*cells genes"],
    dropout_rate: float = 0.5,
    normalize: bool = True,
    target_sum: None | float = None,
    return_attn: bool = False,
    training: bool = True,
) -> Float[Array, "*cells classes"] | tuple[Float[Array, "*cells classes"], Float[Array, "*cells genes"]]:
    """Annotate cells using a neural attention-based model.

    Parameters
    ----------
    params : PyTree[Float[Array, "..."]]
        Model parameters from `nn_annotate_init`.
    key : Array
        PRNG key array for random number generation.
    x : Array
        Input gene expression matrix ``(cells, genes)``, or one cell ``(genes,)``.
    dropout_rate : float
        Dropout probability.
    normalize : bool
        If True, normalize and log-transform counts.
    target_sum : None | float
        Target total count per cell after normalization (defaults to number of genes).
    return_attn : bool
        If True, also return attention weights.
    training : bool
        Whether the model is in training mode (dropout on). With False the output is deterministic.

    Returns
    -------
    Float[Array, ...] | tuple[Float[Array, ...], Float[Array, ...]]
        Logits. If `return_attn=True`, gene-level attention weights are also returned.
    """
    x = jnp.asarray(x, jnp.float32)
    k_in, k_attn = jax.random.split(key)
    if normalize:
        x = nn_normalize(x, x.shape[-1] if target_sum is None else target_sum)
    h = nn_dropout(k_in, x, dropout_rate, training)
    h = jax.nn.relu(nn_linear(params["features1"], h))
    h = nn_linear(params["features2"], h)
    a = nn_dropout(k_attn, h, dropout_rate, training)
    a = jnp.tanh(nn_linear(params["attn1"], a))
    a = jax.nn.sigmoid(nn_linear(params["attn2"], a))
    logits = nn_linear(params["head"], a * h)
    if return_attn:
        return logits, a
    return logits


def _cross_entropy(logits: Float[Array, "*cells classes"], y: Int[Array, "*cells"]) -> Float[Array, "*cells"]:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, jnp.asarray(y, jnp.int32)[..., None], axis=-1)[..., 0]


def nn_annotate_loss(
    params: PyTree[Float[Array, ...]],
    key: Array,
    x: Float[Array, "cells genes"],
    y: Int[Array, " cells"],
    dropout_rate: float = 0.5,
    normalize: bool = True,
    target_sum: None | float = None,
    training: bool = True,
) -> Float[Array, ""]:
    """Cross-entropy loss for cell type annotation model.

    Parameters
    ----------
    params : PyTree[Float[Array, "..."]]
        Model parameters from `nn_annotate_init`.
    key : Array
        PRNG key array for random number generation.
    x : Array
        Input gene expression matrix.
    y : Array
        True cell type labels (integer class ids).
    dropout_rate : float
        Dropout probability.
    normalize : bool
        If True, normalize and log-transform counts.
    target_sum : None | float
        Target total count per cell after normalization (defaults to number of genes).
    training : bool
        Whether the model is in training mode (honoured: False gives a deterministic loss).

    Returns
    -------
    Float[Array, ""]
        Mean cross-entropy over cells.
    """
    logits = nn_annotate(
        params, key, x, dropout_rate=dropout_rate, normalize=normalize,
        target_sum=target_sum, training=training,
    )
    return jnp.mean(_cross_entropy(logits, y))


def nn_annotate_evaluate(
    params: PyTree[Float[Array, ...]],
    key: Array,
    x: Float[Array, "cells genes"],
    y: Int[Array, " cells"],
    dropout_rate: float = 0.5,
    normalize: bool = True,
    target_sum: None | float = None,
) -> tuple[Float[Array, ""], Int[Array, ""], Int[Array, ""]]:
    """Cross-entropy loss for cell type annotation model.

    Runs with dropout off, so the result is deterministic (``key`` is accepted for API
    compatibility and does not change it). Jit-safe: everything stays a JAX array.

    Parameters
    ----------
    params : PyTree[Float[Array, "..."]]
        Model parameters from `nn_annotate_init`.
    key : Array
        PRNG key array for random number generation.
    x : Array
        Input gene expression matrix.
    y : Array
        True cell type labels.
    dropout_rate : float
        Dropout probability.
    normalize : bool
        If True, normalize and log-transform counts.
    target_sum : None | float
        Target total count per cell after normalization (defaults to number of genes).

    Returns
    -------
    tuple[float, int, int]
        Loss, total number of labels, and number of correct labels
    """
    logits = nn_annotate(
        params, key, x, dropout_rate=dropout_rate, normalize=normalize,
        target_sum=target_sum, training=False,
    )
    y = jnp.asarray(y, jnp.int32)
    loss = jnp.mean(_cross_entropy(logits, y))
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
    return loss, jnp.asarray(y.shape[0], jnp.int32), correct.astype(jnp.int32)
