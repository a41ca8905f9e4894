import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ginseng.nn import (
    nn_annotate,
    nn_annotate_evaluate,
    nn_annotate_init,
    nn_annotate_loss,
    nn_dropout,
    nn_init_linear,
    nn_linear,
    nn_normalize,
    nn_xavier_uniform,
)

KEY = jax.random.key(0)


def _batch(n=16, g=30, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.poisson(2.0, (n, g)).astype(np.float32)), jnp.asarray(rng.integers(0, 3, n))


def test_xavier_uniform_bounds_and_spread():
    w = nn_xavier_uniform(KEY, (200, 100))
    limit = np.sqrt(6 / 300)
    assert w.shape == (200, 100)
    assert float(jnp.abs(w).max()) <= limit
    # A uniform on [-a, a] has std a / sqrt(3).
    np.testing.assert_allclose(float(w.std()), limit / np.sqrt(3), rtol=0.05)


def test_linear_layer():
    p = nn_init_linear(KEY, 5, 3)
    assert p["W"].shape == (5, 3) and p["b"].shape == (3,)
    assert not jnp.any(p["b"])
    x = jnp.ones((2, 5))
    np.testing.assert_allclose(nn_linear(p, x), x @ p["W"] + p["b"])


def test_dropout_modes():
    x = jnp.ones((1000,))
    assert jnp.array_equal(nn_dropout(KEY, x, 0.5, training=False), x)
    assert jnp.array_equal(nn_dropout(KEY, x, 0.0, training=True), x)
    y = nn_dropout(KEY, x, 0.25, training=True)
    kept = y != 0
    np.testing.assert_allclose(float(y[kept][0]), 1 / 0.75, rtol=1e-6)
    assert 0.65 < float(kept.mean()) < 0.85
    with pytest.raises(ValueError, match="dropout rate must be in"):
        nn_dropout(KEY, x, 1.0)


def test_normalize_matches_definition_and_handles_empty_cells():
    x = jnp.asarray([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    out = nn_normalize(x, 100.0)
    np.testing.assert_allclose(out[0], np.log1p(np.array([25.0, 75.0, 0.0])), rtol=1e-6)
    assert jnp.array_equal(out[1], jnp.zeros(3))


def test_target_sum_none_defaults_to_number_of_genes():
    # The seed documents the default as the number of genes (the reference used the batch size).
    p = nn_annotate_init(KEY, 30, 3, 8)
    x, _ = _batch(n=5, g=30)
    a = nn_annotate(p, KEY, x, training=False, target_sum=None)
    b = nn_annotate(p, KEY, x, training=False, target_sum=30.0)
    c = nn_annotate(p, KEY, x, training=False, target_sum=5.0)
    assert jnp.array_equal(a, b)
    assert not jnp.allclose(a, c)


def test_annotate_shapes_attention_and_rowwise():
    p = nn_annotate_init(KEY, 30, 4, 8)
    assert {k: v["W"].shape for k, v in p.items()} == {
        "features1": (30, 30), "features2": (30, 30), "attn1": (30, 8), "attn2": (8, 30), "head": (30, 4),
    }
    x, _ = _batch(g=30)
    logits, attn = nn_annotate(p, KEY, x, return_attn=True, training=False)
    assert logits.shape == (16, 4) and attn.shape == (16, 30)
    assert bool(jnp.all((attn > 0) & (attn < 1)))
    # One cell at a time gives the same result as the batch: the model is row-wise, which is what
    # lets the trainer vmap it over cells with per-cell keys.
    single = jax.vmap(lambda xi: nn_annotate(p, KEY, xi, training=False))(x)
    np.testing.assert_allclose(single, logits, rtol=1e-5, atol=1e-5)


def test_training_flag_controls_randomness():
    p = nn_annotate_init(KEY, 30, 4, 8)
    x, _ = _batch(g=30)
    k1, k2 = jax.random.split(KEY)
    assert jnp.array_equal(
        nn_annotate(p, k1, x, training=False), nn_annotate(p, k2, x, training=False)
    )
    assert not jnp.allclose(nn_annotate(p, k1, x, training=True), nn_annotate(p, k2, x, training=True))


def test_loss_and_evaluate_agree_and_jit_equals_eager():
    p = nn_annotate_init(KEY, 30, 3, 8)
    x, y = _batch(g=30)
    logits = nn_annotate(p, KEY, x, training=False)
    expected = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(16), np.asarray(y)])
    loss = nn_annotate_loss(p, KEY, x, y, training=False)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    ev_loss, total, correct = nn_annotate_evaluate(p, jax.random.key(9), x, y)
    np.testing.assert_allclose(float(ev_loss), expected, rtol=1e-5)
    assert int(total) == 16
    assert int(correct) == int(np.sum(np.argmax(np.asarray(logits), -1) == np.asarray(y)))
    jitted = jax.jit(nn_annotate_evaluate)(p, jax.random.key(9), x, y)
    np.testing.assert_allclose(float(jitted[0]), float(ev_loss), rtol=1e-6)
    assert int(jitted[2]) == int(correct)


def test_gradients_finite_and_loss_decreases():
    from ginseng.opt import opt_adam_update, opt_init_adam

    p = nn_annotate_init(KEY, 30, 3, 8)
    x, y = _batch(n=32, g=30)
    s = opt_init_adam(p)
    first = float(nn_annotate_loss(p, KEY, x, y, training=False))
    step = jax.jit(lambda p, s: opt_adam_update(jax.grad(nn_annotate_loss)(p, KEY, x, y, 0.0), p, s, lr=1e-2))
    for _ in range(30):
        p, s = step(p, s)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(p))
    assert float(nn_annotate_loss(p, KEY, x, y, training=False)) < 0.5 * first


@pytest.mark.parametrize("bad", [("n_genes", 0), ("n_classes", 0), ("hidden_dim", 0)])
def test_init_rejects_empty_dimensions(bad):
    kwargs = {"n_genes": 4, "n_classes": 2, "hidden_dim": 3, bad[0]: bad[1]}
    with pytest.raises(ValueError, match=f"{bad[0]} must be >= 1, got 0"):
        nn_annotate_init(KEY, **kwargs)
