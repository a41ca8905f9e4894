"""Count-level augmentations for single-cell RNA data, as pure jit-safe functions.

Each function acts on the last (gene) axis. Applied to a batch with one key, the random draws
are shared per call as documented below; the trainer ``vmap``s them over cells with one key per
cell, so every cell is augmented independently and the result does not depend on the batch split.
No function branches in Python on a traced value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["augment", "augment_background", "augment_dropgene", "augment_mask"]


def augment_mask(key: Array, x: Float[Array, ...], rate: float = 0.1) -> Float[Array, ...]:
    """Randomly mask out counts across cells.

    Parameters
    ----------
    key : Array
        PRNG key array for dropout mask.
    x : Array
        Input tensor.
    rate : float
        Dropout probability: each entry is zeroed with this probability (no rescaling: these are
        counts).

    Returns
    -------
    Array
        Tensor with dropout applied.
    """
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x, jnp.zeros_like(x))


def augment_background(
    key: Array, x: Float[Array, "*cells genes"], lam_max: float = 0.1
) -> Float[Array, "*cells genes"]:
    """Randomly add Poisson-distributed background noise to counts.

    A mean ``lam`` is drawn uniformly from ``[0, lam_max)`` (one per call), then Poisson(lam)
    counts are added to every entry. Jit-safe: ``lam == 0`` simply adds zeros.

    Parameters
    ----------
    key : Array
        PRNG key array for noise generation.
    x : Array
        Non-normalized count matrix.
    lam_max : float
        Maximum mean of Poisson distribution for sampling added noise.

    Returns
    -------
    Array
        Counts with added Poisson noise.
    """
    k_lam, k_noise = jax.random.split(key)
    lam = jax.random.uniform(k_lam, (), jnp.float32, 0.0, lam_max)
    noise = jax.random.poisson(k_noise, lam, x.shape)
    return x + noise.astype(x.dtype)


def augment_dropgene(
    key: Array, x: Float[Array, "*cells genes"], lower: int = 0, upper: int = 2
) -> Float[Array, "*cells genes"]:
    """Randomly zero out entire genes.

    ``n`` is drawn uniformly from ``[lower, upper)`` and ``n`` distinct genes, chosen uniformly,
    are zeroed (the same genes for every cell of ``x``; under the trainer's per-cell ``vmap`` each
    cell draws its own). Shapes are static (``upper``), so it is jit-safe.

    Parameters
    ----------
    key : Array
        PRNG key array for mask generation.
    x : Array
        Count matrix.
    lower : int
        Minimum number of genes to mask out.
    upper : int
        Maximum (exclusive) number of genes to mask out.

    Returns
    -------
    Array
        Filtered counts.
    """
    n_genes = x.shape[-1]
    if not 0 <= lower <= upper:
        msg = f"augment_dropgene needs 0 <= lower <= upper, got lower={lower}, upper={upper}"
        raise ValueError(msg)
    k_n, k_idx = jax.random.split(key)
    # lower == upper: exactly `lower` genes (as jax.random.randint gives for an empty range), so
    # lower=upper=0 drops nothing.
    n = jax.random.randint(k_n, (), lower, upper) if upper > lower else jnp.asarray(lower)
    k = min(max(upper - 1, lower), n_genes)
    if k == 0:
        return x
    # The k genes with the largest uniform scores are a uniform random k-subset; keep the first n.
    _, idx = jax.lax.top_k(jax.random.uniform(k_idx, (n_genes,)), k)
    drop = jnp.zeros((n_genes,), bool).at[idx].set(jnp.arange(k) < n)
    return jnp.where(drop, jnp.zeros_like(x), x)


def augment(
    key: Array,
    x: Float[Array, "*cells genes"],
    rate: float | None = 0.1,
    lam_max: float | None = 0.1,
    lower: int | None = 0,
    upper: int | None = 2,
) -> Float[Array, "*cells genes"]:
    """Apply a combination of single-cell RNA relevant augmentations.

    Each augmentation runs only when its parameters are set (not None and not zero): masking
    (``rate``), background noise (``lam_max``) and gene dropping (``upper``, with ``lower``
    defaulting to 0). These are Python values, fixed when the step is compiled.

    Parameters
    ----------
    key : Array
        PRNG key array for mask generation.
    x : Array
        Count matrix.
    rate : float
        Dropout probability.
    lam_max : float
        Maximum mean of Poisson distribution for sampling added noise.
    lower : int
        Minimum number of genes to mask out.
    upper : int
        Maximum (exclusive) number of genes to mask out.

    Returns
    -------
    Array
        Augmented counts.
    """
    k_mask, k_bg, k_drop = jax.random.split(key, 3)
    if rate:
        x = augment_mask(k_mask, x, rate)
    if lam_max:
        x = augment_background(k_bg, x, lam_max)
    if upper:
        x = augment_dropgene(k_drop, x, lower or 0, upper)
    return x
