"""What data-parallel training, DiLoCo and NoLoCo send, and how long it takes, on a network.

One synchronisation (:func:`sync_cost`) is either

* ``"allreduce"``: every replica ends with the mean of a parameter-sized tensor (the gradient
  in data-parallel training, the pseudo-gradient in DiLoCo), by a ring or a binary tree
  (:func:`decjax.sim.ring_allreduce`, :func:`decjax.sim.tree_allreduce`); or
* ``"gossip"``: NoLoCo's exchange inside small random groups, all groups at once. A member
  sends ``messages_per_peer`` parameter-sized messages to every other member of its group:
  one with the reference setting ``gamma == outer_lr`` (the fast weights), two for a general
  ``gamma`` (fast weights and anchor) or for the reference code, which sends the anchor and
  the pseudo-gradient.

A whole run (:func:`run_communication`) syncs every step (data parallel) or every ``H`` steps
(DiLoCo, NoLoCo). NoLoCo's groups are the ones its optimizer actually draws in each round
(:func:`noloco_groups`), so a run's cost follows its real random pairs.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from decjax.sim._checks import count, index, nonneg
from decjax.sim.estimators import ALLREDUCES, Estimate, gossip_exchange
from decjax.sim.estimators import allreduce as allreduce_estimate
from decjax.sim.network import Placement

SYNC_METHODS = ("allreduce", "gossip")
RUN_METHODS = ("data_parallel", "diloco", "noloco")

Groups = Sequence[Sequence[int]]


def _choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: one of {', '.join(allowed)}")
    return value


def _check_nodes(nodes: Sequence[int], placement: Placement) -> list[int]:
    if isinstance(nodes, str) or not isinstance(nodes, Sequence | np.ndarray) or len(nodes) == 0:
        raise ValueError(f"nodes must be a non-empty sequence of node ids, got {nodes!r}")
    checked = [index(n, "nodes entry", placement.n_nodes) for n in nodes]
    if len(set(checked)) != len(checked):
        raise ValueError(f"nodes must be distinct (one replica per node), got {list(nodes)}")
    return checked


def _check_groups(groups: Groups, n_replicas: int) -> list[tuple[int, ...]]:
    """``groups`` as tuples of replica positions, each position in at most one group."""
    if isinstance(groups, str) or not isinstance(groups, Sequence | np.ndarray):
        raise ValueError(f"groups must be a sequence of groups of replica positions, "
                         f"got {groups!r}")
    checked, seen = [], set()
    for group in groups:
        members = tuple(index(m, "groups entry", n_replicas) for m in group)
        if seen.intersection(members) or len(set(members)) != len(members):
            raise ValueError(f"groups must not repeat a replica, got {[list(g) for g in groups]}")
        seen.update(members)
        checked.append(members)
    return checked


def _group_exchange(groups: list[tuple[int, ...]], nodes: list[int], placement: Placement,
                    payload: float) -> Estimate:
    """Groups larger than pairs: each member sends ``payload`` to every peer, one after another.

    Sends from one member are sequential (its uplink is not shared for free); all members and
    all groups run at the same time, and receiving does not slow sending.
    """
    seconds, sent = 0.0, 0.0
    for group in groups:
        for me in group:
            peers = [p for p in group if p != me]
            seconds = max(seconds, sum(placement.transfer_seconds(nodes[me], nodes[p], payload)
                                       for p in peers))
            sent += len(peers) * payload
    return Estimate(seconds, sent, {"gossip": seconds})


def _gossip(groups: list[tuple[int, ...]], nodes: list[int], placement: Placement,
            payload: float) -> Estimate:
    pairs = [(nodes[a], nodes[b]) for a, b in (g for g in groups if len(g) == 2)]
    pair_cost = gossip_exchange(pairs, placement, payload)
    larger = _group_exchange([g for g in groups if len(g) > 2], nodes, placement, payload)
    seconds = max(pair_cost.seconds, larger.seconds)  # every group exchanges concurrently
    return Estimate(seconds, pair_cost.bytes + larger.bytes, {"gossip": seconds})


def sync_cost(method: str, nodes: Sequence[int], placement: Placement, nbytes: float, *,
              groups: Groups | None = None, allreduce: str = "ring",
              messages_per_peer: int = 1) -> Estimate:
    """Seconds and bytes of one synchronisation of ``len(nodes)`` replicas.

    Args:
      method: ``"allreduce"`` (data-parallel gradients, DiLoCo pseudo-gradients) or
        ``"gossip"`` (NoLoCo's group exchange).
      nodes: ``nodes[r]`` is the node that holds replica ``r``.
      placement: where the nodes are.
      nbytes: bytes of one parameter-sized message (e.g. ``2 * params`` in bf16).
      groups: for ``"gossip"`` only: groups of replica positions (indices into ``nodes``) that
        average together; a replica in no group, or alone in one, sends nothing.
      allreduce: for ``"allreduce"``: ``"ring"`` or ``"tree"``.
      messages_per_peer: for ``"gossip"``: parameter-sized messages each member sends to each
        peer (1 for NoLoCo with ``gamma == outer_lr``, 2 for a general ``gamma``).

    Returns:
      An :class:`decjax.sim.Estimate` whose breakdown is ``{"allreduce": s}`` or
      ``{"gossip": s}``.

    Examples:
      >>> from decjax.sim import Network, place_round_robin
      >>> world = place_round_robin(Network.uniform(4, latency_ms=0, bandwidth_gibps=1), 4)
      >>> sync_cost("gossip", [0, 1, 2, 3], world, 2**30, groups=[(0, 1), (2, 3)]).seconds
      1.0
    """
    _choice("method", method, SYNC_METHODS)
    _choice("allreduce", allreduce, ALLREDUCES)
    nodes = _check_nodes(nodes, placement)
    nbytes = nonneg(nbytes, "nbytes")
    messages_per_peer = count(messages_per_peer, "messages_per_peer")
    if method == "allreduce":
        if groups is not None:
            raise ValueError("groups is only used by method='gossip'; an all-reduce spans "
                             "every replica")
        return allreduce_estimate(nodes, placement, nbytes, allreduce)
    if groups is None:
        raise ValueError("method='gossip' needs groups: the replica positions that average "
                         "together, e.g. noloco_groups(...)")
    return _gossip(_check_groups(groups, len(nodes)), nodes, placement,
                   messages_per_peer * nbytes)


def noloco_groups(n_replicas: int, round_index: int, *, group_size: int = 2,
                  pool_size: int = 64, seed: int = 0) -> list[tuple[int, ...]]:
    """The groups :func:`decjax.noloco` averages in outer round ``round_index`` (0-based).

    The optimizer's own draw (:func:`decjax.optim.replicas.groups_of_round`). It runs a few
    JAX random ops on the default backend; the rest of this package does not use JAX.
    """
    from decjax.optim import replicas  # local: importing decjax.sim must not start JAX

    groups = replicas.groups_of_round(round_index, count(n_replicas, "n_replicas"),
                                      count(group_size, "group_size"),
                                      pool_size=count(pool_size, "pool_size"), seed=seed)
    return [tuple(g) for g in groups]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields have no scalar ==
class RunCommunication:
    """Communication of a whole run, step by step (compute not included).

    Attributes:
      seconds: ``float[n_steps]`` communication seconds spent at the end of each step.
      bytes: ``float[n_steps]`` bytes sent over links at the end of each step.
      sync_steps: ``int[k]`` the 1-based steps that end with a synchronisation.
    """

    seconds: np.ndarray
    bytes: np.ndarray
    sync_steps: np.ndarray

    @property
    def total_seconds(self) -> float:
        return float(self.seconds.sum())

    @property
    def total_bytes(self) -> float:
        return float(self.bytes.sum())

    @property
    def n_syncs(self) -> int:
        return int(self.sync_steps.size)

    def clock(self, compute_seconds_per_step: float) -> np.ndarray:
        """``float[n_steps + 1]`` simulated seconds after each step, ``clock[0] = 0``.

        Compute and communication do not overlap (a blocking exchange, as in the references).
        """
        step = nonneg(compute_seconds_per_step, "compute_seconds_per_step") + self.seconds
        return np.concatenate([[0.0], np.cumsum(step)])


def run_communication(method: str, *, n_steps: int, nodes: Sequence[int], placement: Placement,
                      nbytes: float, sync_every: int | None = None, allreduce: str = "ring",
                      group_size: int = 2, messages_per_peer: int = 1, pool_size: int = 64,
                      seed: int = 0) -> RunCommunication:
    """Per-step communication of a run of ``n_steps`` inner steps.

    Args:
      method: ``"data_parallel"`` (gradient all-reduce every step), ``"diloco"``
        (pseudo-gradient all-reduce every ``sync_every`` steps) or ``"noloco"`` (group gossip
        every ``sync_every`` steps, with the optimizer's groups of each round).
      n_steps: inner steps in the run.
      nodes: ``nodes[r]`` is the node of replica ``r``.
      placement: where the nodes are.
      nbytes: bytes of one parameter-sized message.
      sync_every: ``H`` for DiLoCo and NoLoCo; data parallel takes ``None`` or 1.
      allreduce: ``"ring"`` or ``"tree"`` (data parallel and DiLoCo).
      group_size, pool_size, seed: NoLoCo's grouping, as passed to :func:`decjax.noloco`.
      messages_per_peer: NoLoCo's messages per peer (see :func:`sync_cost`).

    Returns:
      A :class:`RunCommunication`.
    """
    _choice("method", method, RUN_METHODS)
    n_steps = count(n_steps, "n_steps")
    if method == "data_parallel":
        if sync_every not in (None, 1):
            raise ValueError(f"sync_every={sync_every!r}: data parallel syncs every step, so "
                             "pass None or 1")
        sync_every = 1
    elif sync_every is None:
        raise ValueError(f"method={method!r} needs sync_every (H, inner steps per outer step)")
    sync_every = count(sync_every, "sync_every")
    sync_steps = np.arange(sync_every, n_steps + 1, sync_every)
    seconds, sent = np.zeros(n_steps), np.zeros(n_steps)
    if method == "noloco":
        costs = [sync_cost("gossip", nodes, placement, nbytes, messages_per_peer=messages_per_peer,
                           groups=noloco_groups(len(nodes), r, group_size=group_size,
                                                pool_size=pool_size, seed=seed))
                 for r in range(sync_steps.size)]
    else:
        one = sync_cost("allreduce", nodes, placement, nbytes, allreduce=allreduce)
        costs = [one] * sync_steps.size
    seconds[sync_steps - 1] = [c.seconds for c in costs]
    sent[sync_steps - 1] = [c.bytes for c in costs]
    return RunCommunication(seconds, sent, sync_steps)

