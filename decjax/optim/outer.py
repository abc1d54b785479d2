"""The skeleton NoLoCo and DiLoCo share: ``H`` inner steps, then one outer step.

Each replica keeps float32 *slow weights* (the anchor, φ) next to its parameters (the fast
weights, θ). Every update runs the inner optimizer; on every ``sync_every``-th update the
outer rule turns the fast weights reached after that step into a new anchor, and the update
returned moves the parameters onto it. The outer step sits under ``lax.cond``, so its
communication runs only on sync steps.

The conditional costs a little on every step: XLA cannot fuse the inner update into
``apply_updates`` across it (``bench/noloco_step.py``). A loop that knows which steps sync can
pass ``sync=True`` / ``sync=False`` to ``update`` (a Python bool, so two compiled steps and no
cond): a non-sync step is then exactly the inner step plus a counter. Keep ``sync`` in step with
``sync_every``: ``sync=False`` on a step that reaches ``sync_every`` skips that outer step.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from decjax.optim import replicas

# outer_rule(fast, anchor, outer_state, round) -> (new_anchor, new_outer_state); all float32.
OuterRule = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]


class OuterState(NamedTuple):
    """State shared by :func:`decjax.optim.noloco` and :func:`decjax.optim.diloco`.

    Attributes:
      inner: the inner optimizer's state; kept across outer steps (never reset or averaged).
      anchor: float32 slow weights φ, the parameters right after the last outer step.
      outer: float32 outer-optimizer state (NoLoCo: the momentum δ; DiLoCo: an optax state).
      count: inner steps since the last outer step (int32).
      round: outer steps taken so far (int32); seeds the peer draw.
    """

    inner: optax.OptState
    anchor: optax.Params
    outer: Any
    count: jax.Array
    round: jax.Array


def float32_copy(tree: Any) -> Any:
    """A float32 copy that never shares buffers with ``tree`` (so both can be donated)."""
    return jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), tree)


def periodic_outer_step(
    inner: optax.GradientTransformation,
    sync_every: int | jax.Array,
    outer_init: Callable[[Any], Any],
    outer_rule: OuterRule,
    axis_name: str | None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that every ``sync_every`` updates ``outer_rule`` sets a new anchor."""
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        anchor = float32_copy(params)
        return OuterState(inner.init(params), anchor, outer_init(anchor),
                          jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, sync: bool | None = None, **extra_args):
        if params is None:
            raise ValueError("the outer step needs the current parameters: call "
                             "update(grads, state, params)")
        if sync not in (None, True, False):
            raise TypeError(f"sync={sync!r} must be a Python bool known when tracing, or None")
        updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        count = state.count + 1

        def outer_step(_):
            fast = jax.tree.map(lambda p, u: p.astype(jnp.float32) + u, params, updates)
            anchor, outer = outer_rule(fast, state.anchor, state.outer, state.round)
            # Move the parameters onto the new anchor; the difference is taken in float32.
            to_anchor = jax.tree.map(lambda a, p, u: (a - p.astype(jnp.float32)).astype(u.dtype),
                                     anchor, params, updates)
            return to_anchor, OuterState(inner_state, anchor, outer, jnp.zeros_like(count),
                                         state.round + 1)

        def inner_step(_):
            return updates, state._replace(inner=inner_state, count=count)

        if sync is not None:  # the caller knows: no cond, so nothing to keep the step from fusing
            return outer_step(None) if sync else inner_step(None)
        is_sync = replicas.uniform(count, axis_name) >= sync_every
        return lax.cond(is_sync, outer_step, inner_step, None)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
