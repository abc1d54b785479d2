"""Per-stage optimizers over the staged parameter layout.

The reference systems keep **one optimizer per pipeline stage**: each stage clips its own
gradient norm, has its own Adam moments and step count, and CheckFree gives a recovered
stage a permanent learning-rate multiplier. :func:`per_stage` expresses that as one optax
transformation over ``{"io": ..., "body": leaves [S, ...]}``: the inner transformation is
applied to ``io`` on its own and ``vmap``-ed over the leading stage axis of ``body``, so
every body-stage quantity has a leading ``S`` axis and "reset stage i" is a single
``.at[i].set(...)`` (:func:`reset_stage`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from decjax.types import Params


class PerStageState(NamedTuple):
    """State of :func:`per_stage`.

    Attributes:
      io: inner state for the embedding/head stage.
      body: inner state for the body stages; every leaf has a leading ``S`` axis.
      count: global step, drives the learning-rate schedule.
      stage_steps: ``int32[S]`` steps taken by each body stage since it was (re)set.
      io_lr_scale: learning-rate multiplier of the io stage.
      body_lr_scale: ``float32[S]`` learning-rate multiplier of each body stage.
    """

    io: optax.OptState
    body: optax.OptState
    count: jax.Array
    stage_steps: jax.Array
    io_lr_scale: jax.Array
    body_lr_scale: jax.Array


def per_stage(
    inner: optax.GradientTransformation, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """Applies ``inner`` independently to the io stage and to every body stage.

    ``inner`` gives the update *direction* (e.g. clip + Adam moments + weight decay) and
    must not apply a learning rate; the update is then
    ``-learning_rate(count) * lr_scale[stage] * inner_update``.

    Args:
      inner: a transformation applied per stage.
      learning_rate: a float or an optax schedule of the global step.

    Returns:
      An ``optax.GradientTransformation`` over staged parameters.
    """
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

    def init_fn(params: Params) -> PerStageState:
        n_stages = jax.tree.leaves(params["body"])[0].shape[0]
        return PerStageState(
            io=inner.init(params["io"]),
            body=jax.vmap(inner.init)(params["body"]),
            count=jnp.zeros([], jnp.int32),
            stage_steps=jnp.zeros([n_stages], jnp.int32),
            io_lr_scale=jnp.ones([], jnp.float32),
            body_lr_scale=jnp.ones([n_stages], jnp.float32),
        )

    def update_fn(grads: Params, state: PerStageState, params: Params | None = None):
        if params is None:
            params = jax.tree.map(lambda _: None, grads)  # inner may not need them
        io_dir, io_state = inner.update(grads["io"], state.io, params["io"])
        body_dir, body_state = jax.vmap(inner.update)(grads["body"], state.body, params["body"])
        lr = schedule(state.count)
        io_updates = jax.tree.map(lambda u: -lr * state.io_lr_scale * u, io_dir)
        body_updates = jax.tree.map(
            lambda u: -lr * _broadcast_to_leaf(state.body_lr_scale, u) * u, body_dir
        )
        new_state = PerStageState(
            io=io_state,
            body=body_state,
            count=optax.safe_increment(state.count),
            stage_steps=state.stage_steps + 1,
            io_lr_scale=state.io_lr_scale,
            body_lr_scale=state.body_lr_scale,
        )
        return {"io": io_updates, "body": body_updates}, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _broadcast_to_leaf(per_stage_values: jax.Array, leaf: jax.Array) -> jax.Array:
    return per_stage_values.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def stage_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Per-stage clipping + AdamW, the reference optimizer (CheckFree, SkipPipe).

    Weight decay applies to matrices and embeddings only (leaves named ``kernel`` or
    ``embedding``), never to norm gains. ``clip_norm=None`` disables clipping.
    """
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    return per_stage(optax.chain(*parts), learning_rate)


def decay_mask(params) -> object:
    """``True`` for weight matrices and embedding tables."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params
    )


def reset_stage(
    tx: optax.GradientTransformation,
    state: PerStageState,
    params: Params,
    stage,
    lr_scale=None,
) -> PerStageState:
    """Fresh optimizer state for body stage ``stage`` (may be traced); others untouched.

    Args:
      tx: the :func:`per_stage` transformation that made ``state``.
      state: its current state.
      params: current parameters (the fresh inner state is built from stage ``stage``).
      stage: index of the body stage to reset.
      lr_scale: new learning-rate multiplier for that stage; ``None`` keeps the old one.
    """
    fresh = tx.init(params)
    body = jax.tree.map(lambda s, f: s.at[stage].set(f[stage]), state.body, fresh.body)
    scale = state.body_lr_scale if lr_scale is None else state.body_lr_scale.at[stage].set(lr_scale)
    return state._replace(
        body=body, stage_steps=state.stage_steps.at[stage].set(0), body_lr_scale=scale
    )


def stage_grad_norms(grads: Params) -> tuple[jax.Array, jax.Array]:
    """Global gradient norm of the io stage and ``float32[S]`` norms of the body stages."""
    return optax.tree.norm(grads["io"]), jax.vmap(optax.tree.norm)(grads["body"])


__all__ = [
    "PerStageState",
    "decay_mask",
    "per_stage",
    "reset_stage",
    "stage_adamw",
    "stage_grad_norms",
]
