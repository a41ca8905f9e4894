import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ginseng.opt import AdamState, opt_adam_update, opt_cosine_lr, opt_init_adam


def _reference_adamw(g_seq, p0, lr, b1, b2, eps, wd):
    """Adam with decoupled weight decay, written out in numpy step by step."""
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(g_seq, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * (mh / (np.sqrt(vh) + eps) + wd * p)
    return p, m, v


def test_init_is_zero_and_a_namedtuple():
    params = {"a": jnp.ones((2, 3)), "b": {"c": jnp.ones(4)}}
    s = opt_init_adam(params)
    assert isinstance(s, AdamState) and s._fields == ("step", "m", "v")
    assert int(s.step) == 0
    assert all(not jnp.any(leaf) for leaf in jax.tree.leaves((s.m, s.v)))


def test_matches_numpy_adamw_over_several_steps():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
    params, state = {"w": jnp.asarray(p0)}, opt_init_adam({"w": jnp.asarray(p0)})
    update = jax.jit(lambda g, p, s: opt_adam_update(g, p, s, lr=0.01, weight_decay=0.1))
    for g in grads:
        params, state = update({"w": jnp.asarray(g)}, params, state)
    p_ref, m_ref, v_ref = _reference_adamw(grads, p0, 0.01, 0.9, 0.999, 1e-8, 0.1)
    np.testing.assert_allclose(params["w"], p_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.m["w"], m_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.v["w"], v_ref, rtol=1e-5, atol=1e-8)
    assert int(state.step) == 4


def test_first_step_moves_each_parameter_by_lr():
    # With bias correction the first Adam step is lr * sign(g) (up to eps).
    p = {"w": jnp.zeros(3)}
    new, _ = opt_adam_update({"w": jnp.asarray([2.0, -0.5, 1e-3])}, p, opt_init_adam(p), lr=0.1)
    np.testing.assert_allclose(new["w"], [-0.1, 0.1, -0.1], rtol=1e-4)


def test_cosine_lr_decays_from_lr_to_zero_and_is_jit_safe():
    lr = jax.jit(lambda step: opt_cosine_lr(0.02, step, 10))
    values = np.asarray([float(lr(jnp.int32(t))) for t in range(13)])
    expected = 0.01 * (1 + np.cos(np.pi * np.minimum(np.arange(13), 10) / 10))
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-9)
    assert values[0] == pytest.approx(0.02) and values[5] == pytest.approx(0.01)
    assert np.all(np.diff(values[:11]) < 0) and np.all(values[10:] == 0.0)
    with pytest.raises(ValueError, match="total_steps must be >= 1, got 0"):
        opt_cosine_lr(0.02, 0, 0)
