"""Per-replica state across membership changes: host memory, local files, a new mesh, a peer.

Every leaf has a leading replica axis laid out one replica per device along a mesh axis, so a
process's part of a leaf is its local replicas, in mesh order.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from decjax.types import PyTree


def to_host(tree: PyTree) -> PyTree:
    """This process's replicas of every leaf, as NumPy ``[local replicas, ...]`` in mesh order.

    Works while other processes are dead: only local shards are read.
    """
    def local(x):
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])
    return jax.tree.map(local, tree)


def to_mesh(host_tree: PyTree, mesh: jax.sharding.Mesh, axis_name: str = "replica") -> PyTree:
    """Global arrays over ``mesh`` from every process's local replicas (:func:`to_host`)."""
    sharding = jax.NamedSharding(mesh, jax.P(axis_name))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_tree)


def copy_replicas(tree: PyTree, mesh: jax.sharding.Mesh, pairs: list[tuple[int, int]],
                  axis_name: str = "replica") -> PyTree:
    """Overwrites replica ``dst`` with replica ``src`` for every ``(src, dst)`` position pair.

    A point-to-point ``ppermute`` per pair: a joining replica copies a live peer's state
    directly, without a checkpoint.
    """
    def copy(x):
        me = lax.axis_index(axis_name)
        for src, dst in pairs:
            received = lax.ppermute(x, axis_name, [(src, dst)])
            x = jnp.where(me == dst, received, x)
        return x

    spec = jax.P(axis_name)
    return jax.jit(jax.shard_map(lambda t: jax.tree.map(copy, t), mesh=mesh, in_specs=spec,
                                 out_specs=spec))(tree)


def nbytes(tree: PyTree) -> int:
    """Bytes of one replica's share of ``tree`` (leading axis dropped)."""
    return sum(x.dtype.itemsize * int(np.prod(x.shape[1:])) for x in jax.tree.leaves(tree))


def save_local(host_tree: PyTree, replica_ids: list[int], folder) -> None:
    """Writes each local replica of ``host_tree`` to ``<folder>/replica-<id>.npz``."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree.leaves(host_tree)
    for i, r in enumerate(replica_ids):
        tmp = folder / f"replica-{r}.tmp.npz"
        np.savez(tmp, *[x[i] for x in leaves])
        tmp.replace(folder / f"replica-{r}.npz")


def load_local(like: PyTree, replica_ids: list[int], saved: list[bool], folder) -> PyTree:
    """``like`` (host, ``[local replicas, ...]``) with the ``saved`` replicas read back."""
    leaves, treedef = jax.tree.flatten(like)
    leaves = [x.copy() for x in leaves]
    for i, (r, ok) in enumerate(zip(replica_ids, saved, strict=True)):
        if ok:
            with np.load(pathlib.Path(folder) / f"replica-{r}.npz") as stored:
                for k, x in enumerate(leaves):
                    x[i] = stored[f"arr_{k}"]
    return jax.tree.unflatten(treedef, leaves)
