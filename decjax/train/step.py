"""Pure train and eval steps over the staged model.

``train_step(state, rows_BT1, route_MP) -> (state, metrics)`` splits the batch into ``M``
microbatches, runs microbatch ``m`` along ``route_MP[m]``, accumulates gradients with a
``lax.scan`` (one microbatch of activations alive at a time) and applies the per-stage
optimizer. The route is an argument, so a new route of the same shape does not recompile.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from decjax.models.staged import StagedLlama
from decjax.optim.staged import stage_grad_norms
from decjax.types import Params


class TrainState(NamedTuple):
    """Everything a training step reads and writes."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState


def init_state(model: StagedLlama, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    params = model.init(key)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(model: StagedLlama, tx: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of :func:`init_state`'s result, computed without allocating."""
    return jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0)))


def split_microbatches(rows_BT1: jax.Array, n_microbatches: int) -> jax.Array:
    """``[B, T+1] -> [M, B/M, T+1]``."""
    batch = rows_BT1.shape[0]
    if batch % n_microbatches:
        raise ValueError(f"batch size {batch} is not divisible by {n_microbatches} microbatches")
    return rows_BT1.reshape(n_microbatches, batch // n_microbatches, *rows_BT1.shape[1:])


def accumulate_grads(model: StagedLlama, params: Params, rows_MBT1, route_MP):
    """Mean loss and mean gradient over microbatches, one microbatch at a time."""
    grad_fn = jax.value_and_grad(model.loss, has_aux=True)

    def body(acc, xs):
        (loss, _), grads = grad_fn(params, *xs)
        loss_sum, grad_sum = acc
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, grad_sum), _ = jax.lax.scan(body, zeros, (rows_MBT1, route_MP))
    n = rows_MBT1.shape[0]
    return loss_sum / n, jax.tree.map(lambda g: g / n, grad_sum)


def make_train_step(model: StagedLlama, tx: optax.GradientTransformation, *,
                    grad_transform: Callable[[Params, jax.Array], Params] | None = None):
    """Returns the pure ``train_step(state, rows_BT1, route_MP) -> (state, metrics)``.

    ``grad_transform(grads, route_MP) -> grads``, if given, rewrites the mean gradient before
    the optimizer and the norm metrics (e.g. SkipPipe's per-stage visitor normalisation).
    """

    def train_step(state: TrainState, rows_BT1: jax.Array, route_MP: jax.Array):
        rows_MBT1 = split_microbatches(rows_BT1, route_MP.shape[0])
        loss, grads = accumulate_grads(model, state.params, rows_MBT1, route_MP)
        if grad_transform is not None:
            grads = grad_transform(grads, route_MP)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        io_norm, body_norms = stage_grad_norms(grads)
        metrics = {"loss": loss, "grad_norm_io": io_norm, "grad_norm_body": body_norms}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(model: StagedLlama):
    """Returns ``eval_step(params, rows_BT1, route_MP) -> (loss_sum, n_tokens)``."""

    def eval_step(params: Params, rows_BT1: jax.Array, route_MP: jax.Array):
        rows_MBT1 = split_microbatches(rows_BT1, route_MP.shape[0])

        def body(acc, xs):
            loss, n_tokens = model.loss(params, *xs)
            return (acc[0] + loss * n_tokens, acc[1] + n_tokens), None

        zeros = (jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))
        return jax.lax.scan(body, zeros, (rows_MBT1, route_MP))[0]

    return eval_step
