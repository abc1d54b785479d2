"""Iteration-time estimators: pipeline makespan, gradient exchange, gossip, checkpoints.

Every estimator returns an :class:`Estimate` (seconds, bytes moved, and a breakdown). Links
are modelled one transfer at a time (``latency + bytes / bandwidth + per-hop overhead``);
concurrent transfers do not share bandwidth, as in the SkipPipe and CheckFree reference
simulators.

Pipeline model (:func:`pipeline_makespan`): a linear pipeline of ``S`` stages, one node per
stage per data-parallel replica; replica pipelines run side by side on disjoint nodes.
Microbatch ``m`` runs forward through stages ``0..S-1``, the last stage adds the loss, and
the backward runs back through ``S-1..0``. Activations (and their gradients, of the same
size) cross each hop. Each node runs one task at a time, greedily, in the order the schedule
prescribes:

* ``"gpipe"``: all forwards of a wave, then its backwards (microbatch order), where a wave is
  ``max_in_flight`` microbatches (all of them by default);
* ``"1f1b"``: a ready backward goes first; stage ``s`` admits a new forward only while fewer
  than ``min(S - s, max_in_flight)`` microbatches are in flight on it.
"""

import dataclasses
import math
from collections.abc import Sequence

from decjax.sim.cost import ComputeCost
from decjax.sim.network import Placement

SCHEDULES = ("gpipe", "1f1b")
ALLREDUCES = ("ring", "tree")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Simulated seconds, bytes sent over links, and named parts of the seconds.

    ``breakdown`` values add up to ``seconds``. ``idle_s`` is extra information: how long an
    average pipeline node waits during the iteration (the pipeline bubble plus link waits).
    """

    seconds: float
    bytes: float
    breakdown: dict[str, float] = dataclasses.field(default_factory=dict)
    idle_s: float = 0.0

    def then(self, other: "Estimate") -> "Estimate":
        """``self`` followed by ``other``: seconds and bytes add, breakdowns merge."""
        parts = dict(self.breakdown)
        for key, value in other.breakdown.items():
            parts[key] = parts.get(key, 0.0) + value
        return Estimate(self.seconds + other.seconds, self.bytes + other.bytes, parts,
                        self.idle_s + other.idle_s)


ZERO = Estimate(0.0, 0.0)


# -- pipeline ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Task:
    stage: int
    microbatch: int
    backward: bool
    duration: float
    ready: float = math.inf  # when its input has arrived
    start: float = math.nan
    end: float = math.nan
    arrival_link: float = 0.0  # transfer seconds of the input that made it ready
    cause: "_Task | None" = None  # the task whose output it waited for


def _simulate_pipeline(nodes, placement, cost, n_microbatches, activation_bytes, schedule,
                       max_in_flight, multipliers):
    """Greedy list scheduling of one replica pipeline; returns (tasks, bytes sent)."""
    n_stages = len(nodes)
    hop = [placement.transfer_seconds(nodes[s], nodes[s + 1], activation_bytes)
           for s in range(n_stages - 1)]
    loss = cost.loss()
    fwd = [[_Task(s, m, False, cost.forward(s) * multipliers[s, m]
                  + (loss if s == n_stages - 1 else 0.0)) for m in range(n_microbatches)]
           for s in range(n_stages)]
    bwd = [[_Task(s, m, True, cost.backward(s) * multipliers[s, m])
            for m in range(n_microbatches)] for s in range(n_stages)]
    for task in fwd[0]:
        task.ready = 0.0
    cap = max_in_flight or n_microbatches
    free = [0.0] * n_stages
    done_fwd, done_bwd = [0] * n_stages, [0] * n_stages
    node_last: list[_Task | None] = [None] * n_stages

    def eligible(s):
        """Tasks stage ``s`` may start next under the schedule, in priority order."""
        f_next = fwd[s][done_fwd[s]] if done_fwd[s] < n_microbatches else None
        b_next = bwd[s][done_bwd[s]] if done_bwd[s] < done_fwd[s] else None
        if schedule == "1f1b":
            in_flight_cap = min(n_stages - s, cap)
            if f_next is not None and done_fwd[s] - done_bwd[s] >= in_flight_cap:
                f_next = None
            return [t for t in (b_next, f_next) if t is not None]
        wave_end = min((done_bwd[s] // cap + 1) * cap, n_microbatches)
        if done_fwd[s] < wave_end:  # forwards of the current wave come first
            return [f_next]
        return [b_next] if b_next is not None else []

    for _ in range(2 * n_stages * n_microbatches):
        best = None
        for s in range(n_stages):
            options = [t for t in eligible(s) if t.ready < math.inf]
            if not options:
                continue
            decision = max(free[s], min(t.ready for t in options))
            ready_now = [t for t in options if t.ready <= decision]
            if best is None or decision < best[0]:
                best = (decision, s, ready_now[0])
        if best is None:
            raise RuntimeError("pipeline simulation deadlocked; check max_in_flight")
        start, s, task = best
        task.start, task.end = start, start + task.duration
        if task.cause is None or start > task.ready:  # waited for the node, not the input
            task.cause, task.arrival_link = node_last[s], 0.0
        free[s], node_last[s] = task.end, task
        if task.backward:
            done_bwd[s] += 1
            if s > 0:
                nxt = bwd[s - 1][task.microbatch]
                nxt.ready, nxt.cause, nxt.arrival_link = task.end + hop[s - 1], task, hop[s - 1]
        else:
            done_fwd[s] += 1
            if s < n_stages - 1:
                nxt = fwd[s + 1][task.microbatch]
                nxt.ready, nxt.cause, nxt.arrival_link = task.end + hop[s], task, hop[s]
            else:
                nxt = bwd[s][task.microbatch]
                nxt.ready, nxt.cause, nxt.arrival_link = task.end, task, 0.0
    tasks = [t for row in fwd + bwd for t in row]
    n_hops = 2 * (n_stages - 1) * n_microbatches
    return tasks, n_hops * activation_bytes


def _critical_path(tasks) -> tuple[float, float]:
    """Compute and link seconds along the chain of causes that ends the iteration."""
    task = max(tasks, key=lambda t: t.end)
    compute = link = 0.0
    while task is not None:
        compute += task.duration
        link += task.arrival_link
        task = task.cause
    return compute, link


def pipeline_makespan(
    stage_nodes: Sequence[Sequence[int]],
    placement: Placement,
    cost: ComputeCost,
    *,
    n_microbatches: int,
    activation_bytes: float,
    schedule: str = "1f1b",
    max_in_flight: int | None = None,
    seed: int = 0,
) -> Estimate:
    """Seconds for every replica pipeline to finish all forwards and backwards.

    Args:
      stage_nodes: ``stage_nodes[s][r]`` is the node of stage ``s`` in replica pipeline ``r``.
      placement: where the nodes are.
      cost: per-stage compute times (straggler noise is drawn per task when it has a sigma).
      n_microbatches: microbatches per replica pipeline.
      activation_bytes: bytes of one microbatch's activations crossing one hop.
      schedule: ``"gpipe"`` or ``"1f1b"`` (see the module docstring).
      max_in_flight: cap on microbatches holding activations on a node; ``None``: no cap.
      seed: seed of the straggler draws.

    Returns:
      An :class:`Estimate` whose breakdown splits the critical path of the slowest replica
      into ``compute`` and ``communication``; ``idle_s`` is an average node's waiting time.
    """
    _check_pipeline_args(stage_nodes, placement, cost, n_microbatches, activation_bytes,
                         schedule, max_in_flight)
    n_stages, n_replicas = len(stage_nodes), len(stage_nodes[0])
    multipliers = cost.sample(seed, (n_replicas, n_stages, n_microbatches))
    worst, total_bytes = None, 0.0
    for r in range(n_replicas):
        nodes = [stage_nodes[s][r] for s in range(n_stages)]
        tasks, sent = _simulate_pipeline(nodes, placement, cost, n_microbatches,
                                         activation_bytes, schedule, max_in_flight,
                                         multipliers[r])
        total_bytes += sent
        end = max(t.end for t in tasks)
        if worst is None or end > worst[0]:
            worst = (end, tasks)
    end, tasks = worst
    compute, link = _critical_path(tasks)
    mean_busy = sum(t.duration for t in tasks) / n_stages
    return Estimate(end, total_bytes, {"compute": compute, "communication": link},
                    idle_s=end - mean_busy)


def _check_pipeline_args(stage_nodes, placement, cost, n_microbatches, activation_bytes,
                         schedule, max_in_flight):
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not allowed: one of {', '.join(SCHEDULES)}")
    if not stage_nodes or not stage_nodes[0]:
        raise ValueError("stage_nodes must list at least one node for at least one stage")
    widths = {len(row) for row in stage_nodes}
    if len(widths) != 1:
        raise ValueError(f"every stage needs the same number of replicas, got {sorted(widths)}")
    flat = [n for row in stage_nodes for n in row]
    if len(set(flat)) != len(flat):
        raise ValueError("a node appears in stage_nodes twice; nodes hold one stage each")
    if min(flat) < 0 or max(flat) >= placement.n_nodes:
        raise ValueError(f"stage_nodes refers to a node outside 0..{placement.n_nodes - 1}")
    if len(stage_nodes) != cost.n_stages:
        raise ValueError(f"stage_nodes has {len(stage_nodes)} stages, the cost model "
                         f"{cost.n_stages}")
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches={n_microbatches} must be >= 1")
    if activation_bytes < 0:
        raise ValueError(f"activation_bytes={activation_bytes} must be >= 0")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight={max_in_flight} must be >= 1 or None")


# -- collectives ------------------------------------------------------------------------------


def ring_allreduce(nodes: Sequence[int], placement: Placement, nbytes: float) -> Estimate:
    """Ring all-reduce: ``2(R-1)`` steps, each moving ``nbytes/R`` to the next node.

    Seconds ``= 2(R-1) * max_i link(i -> i+1, nbytes/R)``; bytes ``= 2(R-1) * nbytes``.
    """
    n = len(nodes)
    if n <= 1:
        return Estimate(0.0, 0.0, {"allreduce": 0.0})
    step = max(placement.transfer_seconds(nodes[i], nodes[(i + 1) % n], nbytes / n)
               for i in range(n))
    seconds = 2 * (n - 1) * step
    return Estimate(seconds, 2 * (n - 1) * nbytes, {"allreduce": seconds})


def tree_allreduce(nodes: Sequence[int], placement: Placement, nbytes: float) -> Estimate:
    """Binary-tree reduce to ``nodes[0]`` then broadcast back: ``2 * ceil(log2 R)`` levels.

    Level ``d`` pairs node ``i`` with ``i + 2^d`` (``i`` a multiple of ``2^(d+1)``) and moves
    the full ``nbytes``; seconds ``= 2 * sum_d max link``; bytes ``= 2(R-1) * nbytes``.
    """
    n = len(nodes)
    seconds = 0.0
    for level in range(math.ceil(math.log2(n)) if n > 1 else 0):
        stride = 2**level
        pairs = [(i, i + stride) for i in range(0, n, 2 * stride) if i + stride < n]
        seconds += 2 * max(placement.transfer_seconds(nodes[b], nodes[a], nbytes)
                           for a, b in pairs)
    return Estimate(seconds, 2 * (n - 1) * nbytes, {"allreduce": seconds})


def allreduce(nodes, placement, nbytes, algorithm: str = "ring") -> Estimate:
    if algorithm not in ALLREDUCES:
        raise ValueError(f"allreduce={algorithm!r} is not allowed: one of {', '.join(ALLREDUCES)}")
    return (ring_allreduce if algorithm == "ring" else tree_allreduce)(nodes, placement, nbytes)


def gossip_exchange(pairs: Sequence[tuple[int, int]], placement: Placement,
                    nbytes: float) -> Estimate:
    """Simultaneous pairwise exchange (NoLoCo): one hop, each side sends ``nbytes``."""
    if not pairs:
        return Estimate(0.0, 0.0, {"gossip": 0.0})
    seconds = max(max(placement.transfer_seconds(a, b, nbytes),
                      placement.transfer_seconds(b, a, nbytes)) for a, b in pairs)
    return Estimate(seconds, 2 * len(pairs) * nbytes, {"gossip": seconds})


def checkpoint_transfer(nodes: Sequence[int], placement: Placement, storage_region: str,
                        nbytes_per_node: float, *, kind: str = "upload") -> Estimate:
    """Every node uploads (or downloads) its ``nbytes_per_node`` to storage at once."""
    if kind not in ("upload", "download"):
        raise ValueError(f"kind={kind!r} is not allowed: 'upload' or 'download'")
    net = placement.network
    storage = net.region_index(storage_region)
    seconds = max((net.transfer_seconds(placement.node_regions[n], storage, nbytes_per_node)
                   for n in nodes), default=0.0)
    return Estimate(seconds, len(nodes) * nbytes_per_node, {f"checkpoint_{kind}": seconds})


# -- one training iteration -------------------------------------------------------------------


def stage_grid(n_stages: int, n_replicas: int) -> list[list[int]]:
    """Nodes numbered stage-major: stage ``s``, replica ``r`` is node ``s * R + r``."""
    return [[s * n_replicas + r for r in range(n_replicas)] for s in range(n_stages)]


def iteration_time(
    stage_nodes: Sequence[Sequence[int]],
    placement: Placement,
    cost: ComputeCost,
    *,
    n_microbatches: int,
    activation_bytes: float,
    stage_param_bytes: Sequence[float],
    schedule: str = "1f1b",
    max_in_flight: int | None = None,
    allreduce_algorithm: str = "ring",
    seed: int = 0,
) -> Estimate:
    """Pipeline makespan, then the slowest per-stage gradient all-reduce among replicas."""
    pipe = pipeline_makespan(stage_nodes, placement, cost, n_microbatches=n_microbatches,
                             activation_bytes=activation_bytes, schedule=schedule,
                             max_in_flight=max_in_flight, seed=seed)
    exchanges = [allreduce(row, placement, nbytes, allreduce_algorithm)
                 for row, nbytes in zip(stage_nodes, stage_param_bytes, strict=True)]
    slowest = max(exchanges, key=lambda e: e.seconds)
    exchange = Estimate(slowest.seconds, sum(e.bytes for e in exchanges), slowest.breakdown)
    return pipe.then(exchange)


