"""Adam with decoupled weight decay, as pure functions over pytrees."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

__all__ = ["AdamState", "opt_adam_update", "opt_cosine_lr", "opt_init_adam"]


class AdamState(NamedTuple):
    """State for the Adam optimizer.

    Attributes
    ----------
    step : int
        Current optimization step (an int32 array, so the state is a pytree of arrays that can be
        donated, sharded and saved).
    m : PyTree of Array
        Exponential moving average of gradients.
    v : PyTree of Array
        Exponential moving average of squared gradients.
    """

    step: Int[Array, ""]
    m: PyTree[Float[Array, ...]]
    v: PyTree[Float[Array, ...]]


def opt_init_adam(params: PyTree[Float[Array, ...]]) -> AdamState:
    """Initialize Adam optimizer state.

    Parameters
    ----------
    params : PyTree[Float[Array, ...]]
        Model parameters to be optimized.

    Returns
    -------
    AdamState
        Initial optimizer state with zeroed moments.
    """
    return AdamState(
        step=jnp.zeros((), jnp.int32),
        m=jax.tree.map(jnp.zeros_like, params),
        v=jax.tree.map(jnp.zeros_like, params),
    )


def opt_adam_update(
    grads: PyTree[Float[Array, ...]],
    params: PyTree[Float[Array, ...]],
    state: AdamState,
    lr: float = 0.001,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[PyTree[Float[Array, ...]], AdamState]:
    """Perform one Adam optimization step.

    Parameters
    ----------
    grads : PyTree[Float[Array, ...]]
        Gradients of the loss w.r.t. parameters.
    params : PyTree[Float[Array, ...]]
        Current model parameters.
    state : AdamState
        Current optimizer state.
    lr : float
        Learning rate.
    betas : tuple[float, float]
        Exponential decay rates for first and second moment estimates.
    eps : float
        Numerical stability constant.
    weight_decay : float
        L2 regularization factor, decoupled from the gradient (AdamW): ``p -= lr * wd * p``.

    Returns
    -------
    tuple
        Updated parameters and new optimizer state.
    """
    b1, b2 = betas
    step = state.step + 1
    t = step.astype(jnp.float32)
    m = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state.v, grads)
    c1 = 1.0 - b1**t
    c2 = 1.0 - b2**t

    def update(p, m, v):
        u = (m / c1) / (jnp.sqrt(v / c2) + eps)
        if weight_decay:
            u = u + weight_decay * p
        return p - lr * u

    return jax.tree.map(update, params, m, v), AdamState(step=step, m=m, v=v)


def opt_cosine_lr(lr: float, step: Int[Array, ""] | int, total_steps: int) -> Float[Array, ""]:
    """Learning rate of step ``step`` under cosine decay from ``lr`` to 0 over ``total_steps``.

    ``lr * (1 + cos(pi * step / total_steps)) / 2``: ``lr`` at step 0, ``lr / 2`` half way, 0 from
    ``total_steps`` on. Jit-safe (``step`` may be traced).

    Parameters
    ----------
    lr : float
        Peak (initial) learning rate.
    step : int | Array
        Step index, from 0 (e.g. ``AdamState.step`` before the update).
    total_steps : int
        Number of steps over which the rate decays.

    Returns
    -------
    Array
        The learning rate (float32 scalar).
    """
    if int(total_steps) < 1:
        msg = f"total_steps must be >= 1, got {total_steps}"
        raise ValueError(msg)
    t = jnp.minimum(jnp.asarray(step, jnp.float32) / float(total_steps), 1.0)
    return jnp.float32(lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
