"""Replicas: the leading ``R`` axis, peer groups, and the collectives NoLoCo and DiLoCo use.

The same optimizer code runs in two ways:

* **one device**: ``jax.vmap(step, axis_name="replica")`` over parameters stacked on a leading
  ``R`` axis (:func:`replicate` with ``mesh=None``). A peer exchange is a gather along that axis.
* **a mesh**: ``jax.shard_map`` over a mesh axis named ``"replica"``, one replica per device
  (:func:`replicate` with a mesh). A peer exchange is ``lax.ppermute``; its permutation must be
  static, so peers are drawn from a fixed *pool* of random groupings (:func:`grouping_pool`) and
  ``lax.switch`` picks the round's grouping. Nothing recompiles from one round to the next.

Both ways draw the same grouping for the same round, so they produce the same numbers.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from decjax.types import PyTree


def in_shard_map(axis_name: str) -> bool:
    """Whether ``axis_name`` is a manual mesh axis here (``jax.shard_map``), not a vmap axis."""
    return axis_name in jax.sharding.get_abstract_mesh().manual_axes


def _unbound(axis_name: str) -> NameError:
    return NameError(
        f"axis_name={axis_name!r} is not bound: run the update under "
        f"jax.vmap(..., axis_name={axis_name!r}) or jax.shard_map over a mesh axis {axis_name!r} "
        "(see decjax.optim.replicate), or pass axis_name=None for a single replica")


def axis_size(axis_name: str) -> int:
    """Number of replicas along ``axis_name``, with an error that says how to bind it."""
    try:
        return lax.axis_size(axis_name)
    except NameError as e:
        raise _unbound(axis_name) from e


def uniform(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Returns ``x``, known to be equal on all replicas, as one value shared by all of them.

    Under ``vmap`` every replica's copy of a step counter is a separate (batched) value, and a
    ``lax.cond`` on a batched predicate runs both branches. Reducing over the vmapped axis
    makes the predicate unbatched, so the sync branch really runs only on sync steps; it
    moves no data. Under ``shard_map`` each device already holds one copy, so ``x`` is
    returned as is (no collective on non-sync steps).
    """
    if axis_name is None or in_shard_map(axis_name):
        return x
    axis_size(axis_name)
    return lax.pmax(x, axis_name)


@functools.lru_cache(maxsize=64)
def grouping_pool(n_replicas: int, group_size: int, pool_size: int, seed: int) -> np.ndarray:
    """Random partitions of the replicas into groups, as source tables for a peer exchange.

    Each grouping follows the reference NoLoCo code: draw a permutation ``perm`` of the
    replicas and form the groups ``perm[k::G]`` with ``G = max(1, R // n)`` groups. Member
    ``q`` of a group of ``m`` receives, for every shift ``s`` in ``1..m-1``, the value of member
    ``(q + s) % m``.

    When ``n`` does not divide ``R`` (an odd number of replicas left after a failure, say) the
    ``R mod n`` replicas left over join the first groups, one each, so nobody sits a round out;
    with pairs, that is one group of three. A member of a group smaller than the largest one
    "receives from itself" at the shifts it does not have (:func:`pad_mask` marks them).

    Args:
      n_replicas: ``R >= 1``.
      group_size: ``n >= 1``, replicas per group (2 = pairs).
      pool_size: number of groupings drawn.
      seed: seed of the draw; every replica computes the same pool.

    Returns:
      ``int32[pool_size, m_max - 1, R]``: ``pool[k, s - 1, i]`` is the replica that ``i``
      receives from at shift ``s`` in grouping ``k`` (``m_max`` is the largest group's size).
    """
    if group_size < 1 or n_replicas < 1:
        raise ValueError(f"group_size={group_size} and n_replicas={n_replicas} must be >= 1")
    rng = np.random.default_rng(seed)
    n_groups = max(1, n_replicas // group_size)
    largest = -(-n_replicas // n_groups)
    pool = np.empty((pool_size, largest - 1, n_replicas), np.int32)
    for k in range(pool_size):
        perm = rng.permutation(n_replicas)
        pool[k] = np.arange(n_replicas)  # padding: a missing shift receives from itself
        for g in range(n_groups):
            group = perm[g::n_groups]
            for shift in range(1, group.size):
                pool[k, shift - 1, group] = np.roll(group, -shift)
    return pool


def pad_mask(sources: np.ndarray) -> np.ndarray:
    """``bool[..., m_max - 1, R]``: the shifts at which a replica receives from itself."""
    return sources == np.arange(sources.shape[-1])


def _pick(round_index: jax.Array, pool_size: int, seed: int) -> jax.Array:
    """Index into the pool of the grouping used in round ``round_index``; same on every replica."""
    key = jax.random.fold_in(jax.random.key(seed), round_index)
    return jax.random.randint(key, (), 0, pool_size)


def groups_of_round(round_index: int, n_replicas: int, group_size: int, *, pool_size: int = 64,
                    seed: int = 0) -> list[list[int]]:
    """The replica groups of outer round ``round_index``, as :func:`group_mean` forms them.

    For host-side bookkeeping (who talks to whom, for the communication cost) and tests.
    """
    sources = grouping_pool(n_replicas, group_size, pool_size, seed)[
        int(_pick(jnp.int32(round_index), pool_size, seed))]
    groups = {frozenset([i, *sources[:, i].tolist()]) for i in range(n_replicas)}
    return sorted(sorted(g) for g in groups)


def group_mean(tree: PyTree, round_index: jax.Array, axis_name: str | None, *,
               group_size: int, pool_size: int, seed: int) -> PyTree:
    """Mean of ``tree`` over this replica's group in round ``round_index``.

    With ``axis_name=None`` (a single replica) the group is the replica itself.
    """
    if axis_name is None or group_size == 1:
        return tree
    pool = grouping_pool(axis_size(axis_name), group_size, pool_size, seed)
    pick = _pick(uniform(round_index, axis_name), pool_size, seed)
    padded = pad_mask(pool)
    if in_shard_map(axis_name):
        branches = [functools.partial(_receive_ppermute, sources=sources, axis_name=axis_name)
                    for sources in pool]
        received = lax.switch(pick, branches, tree)
    else:
        received = _receive_gather(tree, jnp.asarray(pool)[pick], axis_name)
    if not padded.any():  # equal groups: every shift is a real peer
        return jax.tree.map(lambda x, r: (x + r) / (pool.shape[1] + 1), tree, received)
    # Unequal groups: drop what a replica "received" from itself and divide by its group's size.
    me = lax.axis_index(axis_name)
    n_padded = jnp.asarray(padded.sum(axis=1))[pick, me]
    size = (pool.shape[1] + 1 - n_padded).astype(jnp.float32)
    return jax.tree.map(lambda x, r: ((x + r - n_padded * x) / size).astype(x.dtype),
                        tree, received)


def _receive_ppermute(tree: PyTree, sources: np.ndarray, axis_name: str) -> PyTree:
    """Sum of what the group peers send, one ``ppermute`` per shift."""
    def receive(x):
        total = jnp.zeros_like(x)
        for table in sources:
            perm = [(int(src), dst) for dst, src in enumerate(table)]
            total = total + lax.ppermute(x, axis_name, perm)
        return total
    return jax.tree.map(receive, tree)


def _receive_gather(tree: PyTree, sources: jax.Array, axis_name: str) -> PyTree:
    """Sum of what the group peers send, as gathers along the vmapped replica axis."""
    me = lax.axis_index(axis_name)

    def receive(x):
        everyone = lax.all_gather(x, axis_name)  # under vmap: the stacked replicas, no copy
        return sum(everyone[sources[s, me]] for s in range(sources.shape[0]))
    return jax.tree.map(receive, tree)


def mean(tree: PyTree, axis_name: str | None) -> PyTree:
    """All-replica mean (an all-reduce); identity for a single replica."""
    if axis_name is None:
        return tree
    axis_size(axis_name)
    return lax.pmean(tree, axis_name)


def stack_replicas(tree: PyTree, n_replicas: int) -> PyTree:
    """``n_replicas`` identical copies of ``tree`` on a new leading ``R`` axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n_replicas, *jnp.shape(x))), tree)


def shard_replicas(tree: PyTree, mesh: jax.sharding.Mesh, axis_name: str = "replica") -> PyTree:
    """Places the leading ``R`` axis of every leaf along the mesh axis ``axis_name``."""
    return jax.device_put(tree, jax.NamedSharding(mesh, jax.P(axis_name)))


def replicate(step_fn: Callable, *, axis_name: str = "replica",
              mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Runs ``step_fn`` once per replica; every argument and output has a leading ``R`` axis.

    Args:
      step_fn: a per-replica function, e.g. ``train_step(state, batch) -> (state, metrics)``,
        whose optimizer talks to the other replicas through ``axis_name``.
      axis_name: the replica axis name the optimizer was built with.
      mesh: ``None`` stacks all replicas on the current device (``jax.vmap``); a mesh with an
        axis ``axis_name`` of size ``R`` runs one replica per device (``jax.shard_map``; place
        the inputs with :func:`shard_replicas`).

    Returns:
      The replicated function (jit it yourself).
    """
    if mesh is None:
        return jax.vmap(step_fn, axis_name=axis_name)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; axis_name={axis_name!r} is not one")

    def one_replica_per_device(*args):
        _check_one_replica(args, axis_name, mesh.shape[axis_name])
        out = step_fn(*jax.tree.map(lambda x: x[0], args))
        return jax.tree.map(lambda x: x[None], out)

    spec = jax.P(axis_name)
    return jax.shard_map(one_replica_per_device, mesh=mesh, in_specs=spec, out_specs=spec)


def _check_one_replica(args: PyTree, axis_name: str, n_devices: int) -> None:
    for leaf in jax.tree.leaves(args):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != 1:
            raise ValueError(
                f"replicate(mesh=...) runs one replica per device along {axis_name!r}: every "
                f"input needs a leading replica axis of size {n_devices}, got a leaf of shape "
                f"{jnp.shape(leaf)} per device")
