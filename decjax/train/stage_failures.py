"""Lost pipeline stages inside replicated training, rebuilt by CheckFree or copied from a peer.

Each replica of a replicated run (data parallel, DiLoCo, NoLoCo) stands for one pipeline whose
stages are its transformer blocks, each held by one node. With
``ReplicatedConfig.stage_failure_rate = p``, after every step each replica independently loses,
with probability ``p``, the node of one interior block (``1 .. n_layers - 2``, drawn
uniformly; as in plain CheckFree, the edge stages do not fail). The draws depend only on the
seed, so runs that differ only in the recovery rule see the same failures. Two rules rebuild
the lost block of replica ``r`` before the next step:

* ``"checkfree"``: CheckFree's weighted average of the same replica's neighbouring blocks,
  each weighted by its gradient norm of the last step
  (:func:`decjax.checkfree.neighbour_weight`), with fresh optimizer state: zero Adam moments,
  zero outer momentum, and the rebuilt weights as its anchor (the node has no slow weights of
  its own). ``"checkfree_uniform"``: the same with equal weights (CheckFree's uniform rule).
* ``"peer_copy"``: the same block of a peer replica (the next one in the live order that did not
  lose that block this step), with all its state: weights, Adam moments, anchor and momentum.
  Under data parallel the copy is exact; NoLoCo and DiLoCo replicas drift apart between
  synchronisations, so the copy is only close to what was lost.

Both rules are jitted functions of the stacked replica states (a replica axis first on every
leaf), so they run unchanged on a mesh that spans processes. The optimizer must keep its state
parameter-shaped (``pack_state=False``) so that a block's anchor and momentum can be found.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from decjax.checkfree import neighbour_weight

RECOVERIES = ("checkfree", "checkfree_uniform", "peer_copy")
BLOCKS = "blocks"  # the Llama's params key of its transformer blocks


def failure_trace(n_replicas: int, n_layers: int, steps: int, rate: float,
                  seed: int) -> dict[int, list[tuple[int, int]]]:
    """``{step: [(replica, block), ...]}``: the interior blocks lost after each step."""
    if rate <= 0:
        return {}
    rng = np.random.default_rng([seed, 0x5746])  # a stream of its own: data and init unchanged
    hit = rng.random((steps, n_replicas)) < rate
    block = rng.integers(1, n_layers - 1, size=(steps, n_replicas))
    trace: dict[int, list[tuple[int, int]]] = {}
    for t, r in zip(*np.nonzero(hit), strict=True):
        trace.setdefault(int(t) + 1, []).append((int(r), int(block[t, r])))
    return trace


def block_bytes(tree_R, block: int) -> int:
    """Bytes of one replica's leaves of ``block`` in ``tree_R`` (parameters, optimizer state)."""
    return sum(x[0].size * x.dtype.itemsize
               for path, x in jax.tree_util.tree_flatten_with_path(tree_R)[0]
               if (where := _block_path(path)) and where[0] == block)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def _block_path(path) -> tuple[int, tuple] | None:
    """``(block, rest of the path)`` for a leaf under ``[BLOCKS][block]``, else ``None``."""
    keys = _keys(path)
    for i in range(len(keys) - 1):
        if keys[i] == BLOCKS:
            return int(keys[i + 1]), keys[i + 2:]
    return None


@functools.partial(jax.jit, static_argnames=("block", "rule"))
def lose_stage(replicas, replica, peer, weight_right=0.5, *, block: int, rule: str):
    """``(params, opt_state)`` with ``block`` of ``replica`` rebuilt by ``rule`` (see module
    doc): ``"peer_copy"`` copies replica ``peer``'s block; ``"checkfree"`` takes
    ``(1 - weight_right) * left + weight_right * right`` of the neighbouring blocks."""
    params, opt_state = replicas
    if rule == "peer_copy":
        def copy(path, leaf):
            where = _block_path(path)
            return leaf.at[replica].set(leaf[peer]) if where and where[0] == block else leaf

        return (jax.tree_util.tree_map_with_path(copy, params),
                jax.tree_util.tree_map_with_path(copy, opt_state))
    blocks = params[BLOCKS]
    rebuilt = jax.tree.map(lambda a, b: (1 - weight_right) * a[replica] + weight_right * b[replica],
                           blocks[block - 1], blocks[block + 1])
    by_rest = {_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(rebuilt)[0]}

    def fresh(path, leaf):
        where = _block_path(path)
        if not where or where[0] != block or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        anchor = any(getattr(k, "name", None) == "anchor" for k in path)
        value = by_rest[where[1]] if anchor else jnp.zeros(leaf.shape[1:], leaf.dtype)
        return leaf.at[replica].set(value.astype(leaf.dtype))

    params = {**params, BLOCKS: {**blocks, block: jax.tree.map(
        lambda leaf, v: leaf.at[replica].set(v), blocks[block], rebuilt)}}
    return params, jax.tree_util.tree_map_with_path(fresh, opt_state)


def peer_for(replica_ids: list[int], replica: int, block: int,
             lost_now: list[tuple[int, int]]) -> int | None:
    """Mesh position of the replica to copy ``block`` from: the next live one, in mesh order,
    that did not lose ``block`` this step; ``None`` if every live replica lost it."""
    position = replica_ids.index(replica)
    for k in range(1, len(replica_ids)):
        candidate = replica_ids[(position + k) % len(replica_ids)]
        if (candidate, block) not in lost_now:
            return (position + k) % len(replica_ids)
    return None


def rebuild_lost(replicas, lost: list[tuple[int, int]], replica_ids: list[int], rule: str,
                 block_norms: np.ndarray):
    """Rebuilds this step's lost ``(replica, block)`` pairs of the live ``replica_ids`` (mesh
    order); ``block_norms[position, block]`` are the last step's gradient norms. Returns
    ``((params, opt_state), events)``, one event dict per rebuilt block, with
    ``weight_error``, the rebuilt weights' relative distance from the lost ones. A
    ``"peer_copy"`` with no peer left holding the block falls back to ``"checkfree"``."""
    events = []
    for replica, block in lost:
        if replica not in replica_ids:  # gone with its process
            continue
        peer = peer_for(replica_ids, replica, block, lost) if rule == "peer_copy" else None
        if peer is not None:
            used = "peer_copy"
        else:  # a CheckFree rule, or a peer copy with no peer left: CheckFree weighted
            used = "checkfree" if rule == "peer_copy" else rule
        position = replica_ids.index(replica)
        norms = block_norms[position]
        weight = 0.5 if used == "checkfree_uniform" else neighbour_weight(
            float(norms[block - 1]), float(norms[block + 1]))
        before = replicas[0]
        replicas = lose_stage(tuple(replicas), position, peer or 0, weight, block=block,
                              rule="peer_copy" if peer is not None else "checkfree")
        events.append(dict(replica_id=replica, block=block, recovery=used,
                           peer_id=None if peer is None else replica_ids[peer],
                           weight_right=None if peer is not None else weight,
                           weight_error=float(_relative_error(before, replicas[0], position,
                                                              block=block))))
    return replicas, events


@functools.partial(jax.jit, static_argnames=("block",))
def _relative_error(before_R, after_R, replica, *, block: int):
    """``|rebuilt - lost| / |lost|`` over the block's weights: how far the rebuild is off."""
    pairs = zip(jax.tree.leaves(before_R[BLOCKS][block]), jax.tree.leaves(after_R[BLOCKS][block]),
                strict=True)
    diff, norm = zip(*[(jnp.sum((b[replica] - a[replica]) ** 2), jnp.sum(a[replica] ** 2))
                       for a, b in pairs], strict=True)
    return jnp.sqrt(sum(diff) / sum(norm))
