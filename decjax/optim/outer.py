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

The anchor and the outer state are stored packed (:class:`Packed`: one flat buffer per dtype)
unless ``pack_state=False``, and the outer rule runs on the packed buffers (it is elementwise,
so no value changes; an outer optimizer given to DiLoCo sees one flat vector, so per-leaf
transforms such as masks need ``pack_state=False``). A non-sync step only passes them
through, and the per-buffer cost of a jitted step with donated arguments (host dispatch,
aliasing) then dominates small and medium models on GPU: with two parameter-shaped float32
trees per leaf it made a non-sync update 1.3-2x slower than the inner update
(``bench/noloco_step.py``). Packed, they add two buffers in all. Keep ``pack_state=False``
where the parameters of *one* replica are sharded over devices (FSDP, tensor parallelism), so
the anchor keeps each leaf's sharding.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from decjax.optim import replicas

# outer_rule(fast, anchor, outer_state, round) -> (new_anchor, new_outer_state); all float32.
OuterRule = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]


class Packed(NamedTuple):
    """A pytree stored as one flat buffer per dtype (in order of first appearance).

    Leaves are concatenated in tree order, so :func:`unpack` needs a tree of the same
    structure, shapes and dtypes (arrays or ``jax.ShapeDtypeStruct``) to cut them out again.
    """

    buffers: tuple[jax.Array, ...]


def _dtype_order(leaves) -> list:
    return list(dict.fromkeys(jnp.dtype(x.dtype) for x in leaves))


def pack(tree: Any) -> Packed:
    """``tree`` as a :class:`Packed`: one flat buffer per dtype, no value changed."""
    leaves = jax.tree.leaves(tree)
    return Packed(tuple(
        jnp.concatenate([jnp.ravel(x) for x in leaves if jnp.dtype(x.dtype) == dtype])
        for dtype in _dtype_order(leaves)))


def unpack(packed: Packed, like: Any) -> Any:
    """The tree :func:`pack` packed, given a tree ``like`` it (same structure and dtypes)."""
    leaves, treedef = jax.tree.flatten(like)
    offsets = dict.fromkeys(_dtype_order(leaves), 0)
    buffers = dict(zip(offsets, packed.buffers, strict=True))
    out = []
    for x in leaves:
        dtype, size = jnp.dtype(x.dtype), int(np.prod(x.shape, dtype=np.int64))
        start = offsets[dtype]
        out.append(lax.slice_in_dim(buffers[dtype], start, start + size).reshape(x.shape))
        offsets[dtype] = start + size
    return treedef.unflatten(out)


def float32_like(tree: Any) -> Any:
    """Shapes of ``tree`` with dtype float32, as ``jax.ShapeDtypeStruct``s."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32), tree)


class OuterState(NamedTuple):
    """State shared by :func:`decjax.optim.noloco` and :func:`decjax.optim.diloco`.

    Attributes:
      inner: the inner optimizer's state; kept across outer steps (never reset or averaged).
      anchor: float32 slow weights φ, the parameters right after the last outer step; a
        :class:`Packed` unless ``pack_state=False`` (read it with :func:`anchor_of`).
      outer: float32 outer-optimizer state (NoLoCo: the momentum δ; DiLoCo: an optax state);
        packed likewise.
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


def anchor_of(state: OuterState, params: Any) -> Any:
    """The anchor of ``state`` as a float32 tree shaped like ``params`` (one replica)."""
    return unpack(state.anchor, float32_like(params)) if isinstance(state.anchor, Packed) \
        else state.anchor


def periodic_outer_step(
    inner: optax.GradientTransformation,
    sync_every: int | jax.Array,
    outer_init: Callable[[Any], Any],
    outer_rule: OuterRule,
    axis_name: str | None,
    pack_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that every ``sync_every`` updates ``outer_rule`` sets a new anchor."""
    inner = optax.with_extra_args_support(inner)
    store = pack if pack_state else (lambda tree: tree)

    def init_fn(params):
        anchor = store(float32_copy(params))
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
            fast = store(jax.tree.map(lambda p, u: p.astype(jnp.float32) + u, params, updates))
            # The rule runs on the stored form (elementwise), so the new anchor and outer state
            # can take the old buffers' place instead of being rebuilt.
            anchor, outer = outer_rule(fast, state.anchor, state.outer, state.round)
            anchor_tree = unpack(anchor, float32_like(params)) if pack_state else anchor
            # Move the parameters onto the new anchor; the difference is taken in float32.
            to_anchor = jax.tree.map(lambda a, p, u: (a - p.astype(jnp.float32)).astype(u.dtype),
                                     anchor_tree, params, updates)
            return to_anchor, OuterState(inner_state, anchor, outer, jnp.zeros_like(count),
                                         state.round + 1)

        def inner_step(_):
            return updates, state._replace(inner=inner_state, count=count)

        if sync is not None:  # the caller knows: no cond, so nothing to keep the step from fusing
            return outer_step(None) if sync else inner_step(None)
        is_sync = replicas.uniform(count, axis_name) >= sync_every
        return lax.cond(is_sync, outer_step, inner_step, None)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
