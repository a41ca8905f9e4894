"""The compiled computations of training: parameter initialization, the train step, the eval step.

Each step is written once and jitted once. Params and optimizer state are replicated over the
``"data"`` mesh (``ginseng._core.mesh``); each global batch is sharded over it. Inside
``jax.shard_map`` every device augments and classifies its rows with one PRNG key per cell
(derived from the step and the cell's position in the GLOBAL batch, never from the device), sums
the masked cross-entropy, takes gradients of that local sum, and the gradients, loss and cell
counts are summed across ``"data"`` (an all-reduce, ``lax.psum``) before dividing by the global
number of real cells. The result therefore does not depend on how many devices or processes ran
it, up to float summation order.

Steps are cached on the settings that shape them and on the mesh, so that training again with the
same settings (tests, sweeps, resumes) reuses the compiled step.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Int

from ginseng._core.mesh import DATA_AXIS, all_sum
from ginseng.augment import augment
from ginseng.nn import _cross_entropy, nn_annotate, nn_annotate_init
from ginseng.opt import opt_adam_update, opt_cosine_lr, opt_init_adam
from ginseng.state import CONFIDENCE_BINS
from ginseng.train.settings import GinsengTrainerSettings

__all__ = ["LARGE_MODEL_PARAMS", "build_confidence_step", "build_eval_step", "build_init", "build_train_step", "cell_keys", "n_params"]


def cell_keys(key: Array, step: Int[Array, ""], slot: Int[Array, " cells"]) -> Array:
    # Keyed by the global step and the cell's position in the GLOBAL batch, never by the device.
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda s: jax.random.fold_in(step_key, s))(slot)


# Fields that shape the compiled computations. Steps are cached on them and on the mesh, so that
# training again with the same settings (tests, sweeps, resumes) reuses the compiled step.
_STEP_FIELDS = (
    "rate", "lam_max", "lower", "upper", "hidden_dim", "dropout_rate", "lr", "lr_schedule", "betas",
    "eps", "weight_decay", "normalize", "target_sum",
)


def _step_key(settings: GinsengTrainerSettings) -> tuple:
    return tuple(getattr(settings, f) for f in _STEP_FIELDS)


def build_train_step(
    settings: GinsengTrainerSettings, mesh: Mesh, total_steps: int, stop_flag: bool = False
):
    # Only a schedule reads total_steps: leave it out of the cache key otherwise.
    total = int(total_steps) if settings.lr_schedule != "constant" else 0
    return _cached_train_step(_step_key(settings), mesh, stop_flag, total)


def build_eval_step(settings: GinsengTrainerSettings, mesh: Mesh):
    return _cached_eval_step(_step_key(settings), mesh)


# Above this many parameters a warning says what the model costs (the gene x gene layers grow with
# the square of the number of genes: 2,000 HVGs give 9 M, all 13,714 genes of pbmc3k 383 M).
LARGE_MODEL_PARAMS = 50_000_000


def n_params(n_genes: int, n_classes: int, hidden_dim: int) -> int:
    g, c, h = n_genes, n_classes, hidden_dim
    return 2 * (g * g + g) + (g * h + h) + (h * g + g) + (g * c + c)


def build_init(settings: GinsengTrainerSettings, mesh: Mesh, n_genes: int, n_classes: int):
    n = n_params(int(n_genes), int(n_classes), settings.hidden_dim)
    if n > LARGE_MODEL_PARAMS and jax.process_index() == 0:
        msg = (
            f"the model has {n / 1e6:,.0f} M parameters for {n_genes} genes (two gene x gene "
            f"layers): {4 * n / 1e9:.1f} GB as float32, about {16 * n / 1e9:.1f} GB in training "
            "with Adam's moments and the gradients, and the same again per checkpoint. Selecting "
            "highly variable genes (a few thousand) is the usual choice"
        )
        warnings.warn(msg, UserWarning, stacklevel=4)  # build_init < _start < GinsengTrainer < the caller
    return _cached_init(settings.hidden_dim, mesh, int(n_genes), int(n_classes))


def _settings_from_key(key: tuple) -> GinsengTrainerSettings:
    return GinsengTrainerSettings(**dict(zip(_STEP_FIELDS, key)))


def _local_update(s: GinsengTrainerSettings, single: bool, psum, total_steps: int):
    """``update(params, opt_state, key, x, y, slot, mask, stop) -> (params, opt_state, loss_sum,
    count, stop_total)``: one device's part of a train step, gradients summed over all devices
    (``stop``: None, or this device's stop flags, summed in the same all-reduce)."""

    def cell_loss(params, key, x, y):
        k_aug, k_nn = jax.random.split(key)
        x = augment(k_aug, x, s.rate, s.lam_max, s.lower, s.upper)
        logits = nn_annotate(
            params, k_nn, x, dropout_rate=s.dropout_rate, normalize=s.normalize,
            target_sum=s.target_sum, training=True,
        )
        return _cross_entropy(logits, y)

    def update(params, opt_state, key, x, y, slot, mask, stop=None):
        keys = cell_keys(key, opt_state.step, slot)
        # Counts arrive as stored (uint16/uint32, or float32); padding rows become zero counts
        # (finite everywhere) and are masked out of the sum.
        x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)

        def local_loss(p):
            losses = jax.vmap(cell_loss, in_axes=(None, 0, 0, 0))(p, keys, x, y)
            return jnp.sum(jnp.where(mask, losses, 0.0))

        # Differentiate with respect to a per-device ("varying") copy of the replicated params:
        # these are this device's gradients, summed explicitly below. (Differentiating the
        # replicated params directly would make autodiff insert that sum itself, and a second
        # psum would then scale the gradients by the device count.)
        local_params = params if single else jax.lax.pcast(params, DATA_AXIS, to="varying")
        loss_sum, grads = jax.value_and_grad(local_loss)(local_params)
        count = jnp.sum(mask.astype(jnp.float32))
        stop_total = None
        if stop is None:
            grads, loss_sum, count = psum((grads, loss_sum, count))
        else:
            grads, loss_sum, count, stop_total = psum((grads, loss_sum, count, jnp.sum(stop)))
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        lr = s.lr if s.lr_schedule == "constant" else opt_cosine_lr(s.lr, opt_state.step, total_steps)
        params, opt_state = opt_adam_update(
            grads, params, opt_state, lr=lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay
        )
        return params, opt_state, loss_sum, count, stop_total

    return update


@functools.lru_cache(maxsize=16)
def _cached_train_step(key: tuple, mesh: Mesh, stop_flag: bool = False, total_steps: int = 0):
    """Jitted ``step(params, opt_state, metrics, key, x, y, slot, mask) -> (params, opt_state, metrics)``.

    ``metrics`` is a float32 ``[loss_sum, n_cells]`` accumulated on device, so that the host need not
    fetch anything per step. params, opt_state and metrics are donated.

    With ``stop_flag`` the step takes one more argument, an int32 array with one entry per device
    (sharded over ``"data"``: 1 where that device's process was asked to stop), and returns one more
    value, its sum over all devices. The sum rides on the gradient all-reduce, so every process
    learns that some process received SIGTERM/SIGUSR1 at no extra collective.
    """
    single, psum = all_sum(mesh)
    update = _local_update(_settings_from_key(key), single, psum, total_steps)

    def local_step(params, opt_state, metrics, key, x, y, slot, mask, stop=None):
        params, opt_state, loss_sum, count, stop_total = update(params, opt_state, key, x, y, slot, mask, stop)
        out = (params, opt_state, metrics + jnp.stack([loss_sum, count]))
        return (*out, stop_total) if stop_flag else out

    rep, dat = P(), P(DATA_AXIS)
    sharded = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(rep, rep, rep, rep, dat, dat, dat, dat) + ((dat,) if stop_flag else ()),
        out_specs=(rep, rep, rep) + ((rep,) if stop_flag else ()),
        check_vma=not single,
    )
    return jax.jit(sharded, donate_argnums=(0, 1, 2))


def _draw(X, labels, rows, offset):
    """A batch drawn on the device: rows of the buffer ``X`` (-1: padding, masked) and their
    labels; ``offset`` + position is each row's global slot."""
    mask = rows >= 0
    at = jnp.where(mask, rows, 0)
    x = jnp.take(X, at, axis=0, mode="clip")  # every index is in range; "clip" says so to XLA
    y = jnp.take(labels, at, axis=0, mode="clip")
    slot = offset + jnp.arange(rows.shape[0], dtype=jnp.int32)
    return x, y, slot, mask


def _loop_on_host(mesh: Mesh, single: bool) -> bool:
    """Whether a dispatch's steps are run by a host loop over one-step programs instead of one
    ``lax.scan``: on CPU devices with all-reduces in the step. XLA's CPU collectives inside a
    loop break when the program comes from JAX's persistent compilation cache (a rendezvous
    check failure or a crash, JAX 0.10.2), and an unrolled scan lets XLA fuse across steps, so
    that results would depend on how steps are grouped. On a CPU the dispatch costs little
    against the step; on GPUs (and one device) the scan stays."""
    return not single and mesh.devices.flat[0].platform == "cpu"


def build_multi_step(settings: GinsengTrainerSettings, mesh: Mesh, total_steps: int, stop_flag: bool = False):
    """``step(params, opt_state, metrics, key, X, labels, rows[, stop])``: the train steps of
    ``rows`` (k batches x global batch, int32, sharded over ``"data"`` on axis 1) in one
    dispatch (a jitted ``lax.scan``), each batch drawn on the device from the replicated buffer
    ``X`` and its ``labels``; params, opt_state and metrics are donated.

    A step whose batch is entirely padding (rows all -1) leaves params, opt_state and metrics
    exactly as they were: the remainder of an epoch and a group cut short at a checkpoint
    change nothing. Every step is the same scanned body whatever k, the buffer or the group, so
    the grouping changes no bit. With ``stop_flag`` the stop flags (one per device) are summed
    once per dispatch and returned last.
    """
    return _cached_multi_step(_step_key(settings), mesh, int(total_steps), bool(stop_flag))


@functools.lru_cache(maxsize=16)
def _cached_multi_step(key: tuple, mesh: Mesh, total_steps: int, stop_flag: bool):
    single, psum = all_sum(mesh)
    update = _local_update(_settings_from_key(key), single, psum, total_steps)
    on_host = _loop_on_host(mesh, single)

    def local_step(params, opt_state, metrics, key, X, labels, rows):
        offset = jax.lax.axis_index(DATA_AXIS) * rows.shape[1]

        def body(carry, r):
            params, opt_state, metrics = carry
            x, y, slot, mask = _draw(X, labels, r, offset)
            new_p, new_o, loss_sum, count, _ = update(params, opt_state, key, x, y, slot, mask)
            active = count > 0  # all-reduced: the same on every device

            def keep(new, old):
                return jnp.where(active, new, old)

            params = jax.tree.map(keep, new_p, params)
            opt_state = jax.tree.map(keep, new_o, opt_state)
            return (params, opt_state, keep(metrics + jnp.stack([loss_sum, count]), metrics)), None

        if on_host:  # one step, no loop (rows is (1, batch))
            return body((params, opt_state, metrics), rows[0])[0]
        return jax.lax.scan(body, (params, opt_state, metrics), rows)[0]

    rep = P()
    program = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(rep, rep, rep, rep, rep, rep, P(None, DATA_AXIS)),
        out_specs=(rep, rep, rep), check_vma=not single,
    ), donate_argnums=(0, 1, 2))
    stop_sum = _stop_sum(mesh) if stop_flag else None

    def step(params, opt_state, metrics, key, X, labels, rows, stop=None):
        if on_host:
            for j in range(rows.shape[0]):
                params, opt_state, metrics = program(params, opt_state, metrics, key, X, labels, rows[j : j + 1])
        else:
            params, opt_state, metrics = program(params, opt_state, metrics, key, X, labels, rows)
        return (params, opt_state, metrics) + ((stop_sum(stop),) if stop_flag else ())

    return step


@functools.lru_cache(maxsize=16)
def _stop_sum(mesh: Mesh):
    """Jitted sum over all devices of the per-device stop flags (sharded over ``"data"``)."""
    single, psum = all_sum(mesh)
    return jax.jit(jax.shard_map(lambda stop: psum(jnp.sum(stop)), mesh=mesh, in_specs=P(DATA_AXIS),
                                 out_specs=P(), check_vma=not single))


def _eval_logits(s: GinsengTrainerSettings, params, x, mask):
    """The model's logits without dropout; padding rows (mask False) become zero counts."""
    x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)
    return nn_annotate(
        params, jax.random.key(0), x, dropout_rate=s.dropout_rate, normalize=s.normalize,
        target_sum=s.target_sum, training=False,
    )


def _local_eval(s: GinsengTrainerSettings, psum):
    def local(params, x, y, mask):
        logits = _eval_logits(s, params, x, mask)
        losses = _cross_entropy(logits, y)
        loss_sum = jnp.sum(jnp.where(mask, losses, 0.0))
        correct = jnp.sum(jnp.where(mask, jnp.argmax(logits, axis=-1) == y, False).astype(jnp.float32))
        count = jnp.sum(mask.astype(jnp.float32))
        return psum(jnp.stack([loss_sum, correct, count]))

    return local


@functools.lru_cache(maxsize=16)
def _cached_eval_step(key: tuple, mesh: Mesh):
    """Jitted ``step(params, metrics, x, y, mask) -> metrics``; metrics = [loss_sum, correct, count]."""
    single, psum = all_sum(mesh)
    local = _local_eval(_settings_from_key(key), psum)

    def local_step(params, metrics, x, y, mask):
        return metrics + local(params, x, y, mask)

    rep, dat = P(), P(DATA_AXIS)
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(rep, rep, dat, dat, dat), out_specs=rep,
        check_vma=not single,
    )
    return jax.jit(sharded, donate_argnums=(1,))


def build_multi_eval_step(settings: GinsengTrainerSettings, mesh: Mesh):
    """``step(params, metrics, X, labels, rows) -> metrics``: the eval step scanned over
    ``rows`` (k batches x global batch) drawn on the device like :func:`build_multi_step`'s."""
    return _cached_multi_eval_step(_step_key(settings), mesh)


@functools.lru_cache(maxsize=16)
def _cached_multi_eval_step(key: tuple, mesh: Mesh):
    single, psum = all_sum(mesh)
    local = _local_eval(_settings_from_key(key), psum)
    on_host = _loop_on_host(mesh, single)

    def local_step(params, metrics, X, labels, rows):
        offset = jax.lax.axis_index(DATA_AXIS) * rows.shape[1]

        def body(m, r):
            x, y, _, mask = _draw(X, labels, r, offset)
            return m + local(params, x, y, mask), None

        if on_host:
            return body(metrics, rows[0])[0]
        return jax.lax.scan(body, metrics, rows)[0]

    rep = P()
    program = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(rep, rep, rep, rep, P(None, DATA_AXIS)), out_specs=rep,
        check_vma=not single,
    ), donate_argnums=(1,))

    def step(params, metrics, X, labels, rows):
        for part in ([rows[j : j + 1] for j in range(rows.shape[0])] if on_host else [rows]):
            metrics = program(params, metrics, X, labels, part)
        return metrics

    return step


def build_confidence_step(settings: GinsengTrainerSettings, mesh: Mesh):
    """Jitted ``step(params, counts, x, mask) -> counts``: the histogram of the cells' top
    probability (as annotate computes it) in ``CONFIDENCE_BINS`` bins of [0, 1], int32, summed
    over devices (exact whatever their number)."""
    return _cached_confidence_step(_step_key(settings), mesh)


@functools.lru_cache(maxsize=16)
def _cached_confidence_step(key: tuple, mesh: Mesh):
    s = _settings_from_key(key)
    single, psum = all_sum(mesh)

    def local_step(params, counts, x, mask):
        conf = jnp.max(jax.nn.softmax(_eval_logits(s, params, x, mask), axis=-1), axis=-1)
        bins = jnp.clip(jnp.floor(conf * CONFIDENCE_BINS).astype(jnp.int32), 0, CONFIDENCE_BINS - 1)
        local = jnp.zeros(CONFIDENCE_BINS, jnp.int32).at[bins].add(mask.astype(jnp.int32))
        return counts + psum(local)

    rep, dat = P(), P(DATA_AXIS)
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(rep, rep, dat, dat), out_specs=rep, check_vma=not single,
    )
    return jax.jit(sharded, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def _cached_init(hidden_dim: int, mesh: Mesh, n_genes: int, n_classes: int):
    """Jitted ``init(key) -> (params, opt_state)``, created directly replicated on every device."""

    def init(key):
        params = nn_annotate_init(key, n_genes, n_classes, hidden_dim)
        return params, opt_init_adam(params)

    return jax.jit(init, out_shardings=NamedSharding(mesh, P()))
