import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ginseng.augment import augment, augment_background, augment_dropgene, augment_mask

KEY = jax.random.key(3)
X = jnp.full((64, 50), 5.0)


def test_mask_zeroes_about_rate_and_keeps_the_rest():
    y = augment_mask(KEY, X, 0.3)
    frac = float((y == 0).mean())
    assert 0.25 < frac < 0.35
    assert bool(jnp.all((y == 0) | (y == 5.0)))


def test_background_adds_nonnegative_integers_and_is_jit_safe():
    y = jax.jit(augment_background, static_argnums=2)(KEY, X, 2.0)
    d = np.asarray(y - X)
    assert (d >= 0).all() and np.array_equal(d, np.round(d))
    assert d.mean() < 2.0
    # lam_max = 0 must not branch on a traced value: it adds nothing.
    assert jnp.array_equal(jax.jit(augment_background, static_argnums=2)(KEY, X, 0.0), X)


@pytest.mark.parametrize(("lower", "upper"), [(0, 1), (3, 4), (2, 9)])
def test_dropgene_zeroes_between_lower_and_upper_genes(lower, upper):
    counts = []
    for i in range(40):
        y = jax.jit(augment_dropgene, static_argnums=(2, 3))(jax.random.key(i), X, lower, upper)
        dropped = np.asarray((y == 0).all(axis=0))
        # Whole genes are dropped (the same genes in every cell of the call).
        assert np.array_equal(np.asarray((y == 0).any(axis=0)), dropped)
        counts.append(int(dropped.sum()))
    assert min(counts) >= lower and max(counts) <= upper - 1
    if upper - lower > 1:
        assert len(set(counts)) > 1


def test_dropgene_rejects_bad_bounds():
    with pytest.raises(ValueError, match="lower=4, upper=3"):
        augment_dropgene(KEY, X, 4, 3)
    with pytest.raises(ValueError, match="lower=-1, upper=3"):
        augment_dropgene(KEY, X, -1, 3)


def test_dropgene_equal_bounds_drop_exactly_that_many():
    # ginseng 0.1's own tests call lower=upper=0 and expect nothing dropped.
    assert jnp.array_equal(augment_dropgene(KEY, X, 0, 0), X)
    for i in range(5):  # X has no zeros: the zero columns are the dropped genes
        y = augment_dropgene(jax.random.key(i), X, 3, 3)
        assert int(jnp.sum(jnp.all(y == 0, axis=0))) == 3


def test_augment_disabled_parts_are_identity_and_vmap_is_per_cell():
    assert jnp.array_equal(augment(KEY, X, None, None, None, None), X)
    keys = jax.random.split(KEY, X.shape[0])
    y = jax.vmap(lambda k, x: augment(k, x, 0.1, 0.5, 0, 5))(keys, X)
    assert y.shape == X.shape
    # Per-cell keys: cells differ from each other.
    assert not jnp.array_equal(y[0], y[1])
    # Same keys, same result.
    assert jnp.array_equal(y, jax.vmap(lambda k, x: augment(k, x, 0.1, 0.5, 0, 5))(keys, X))
