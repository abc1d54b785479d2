"""Event-based makespan of one SkipPipe iteration, and of its full-pipeline baseline.

Microbatch ``m`` of a :class:`Schedule` runs a chain of tasks: ``io_forward`` on its io node
(embedding and, in the reference, the first ``L/S`` layers), ``forward`` on each hop's node,
``loss`` back on the io node (head, de-embedding and loss), ``backward`` on the hop nodes in
reverse, and ``io_backward`` on the io node (spec skippipe.md §2.1, §2.6). Between two tasks on
different nodes, activations or their gradients (``activation_bytes`` each way) cross the link
in ``placement.transfer_seconds``; links never queue, as in the reference and
:mod:`decjax.sim.estimators`. Each node runs one task at a time, to completion, and never idles
while it has a task it may start; microbatches meeting on a node queue (the collisions the
reference's TC2 phase avoids, §2.4). Rules of the reference simulator ``schedulers/com_sym.py``
([code], §2.6):

* Priority ``"fifo"``: a node serves arrived tasks in arrival order; a microbatch's first task,
  a new injection at its io node, waits until no arrived task does (com_sym sorts by ``(tm,
  tm_receive)`` and injections carry ``tm_receive=10000``). Ties go to the lower microbatch.
* Memory: a forward (``io_forward`` included) takes one activation slot on its node and its
  backward frees it; a forward waits while all ``memory`` slots (reference 3) are taken.
* ``task_gap_s``: the node stays busy this long after each task (reference 0.09-0.13 s).
* The makespan is the end of the last ``io_backward``. The per-stage data-parallel all-reduce
  and the optimizer step that follow (§2.1) are excluded, as in com_sym; add them with
  ``makespan(...).then(decjax.sim.allreduce(...))`` where wanted.

Reconstructions, not read from the reference: the event order is exact (com_sym sweeps unit
ticks 15 times over the nodes, and polls a blocked forward every 0.1 s); one gap value replaces
its 0.09 s after an injection and 0.13 s otherwise; the io node's memory cap replaces its rule
that an agent's next microbatch waits for the previous one; injections are ready at
``release_s`` (default 0; the reference staggers them by 0.1-2.5 s). Priority ``"backward"``
(loss and backward tasks first, then forwards, then injections) is the 1F1B-like option of §7;
with it this simulator equals :func:`decjax.sim.pipeline_makespan`'s ``"1f1b"`` for a full
pipeline whose io tasks and io links cost nothing (``loss_factor=0``, ``io_forward_s=0``) and
whose stage-``s`` nodes have ``memory = S - s``. Its ``"gpipe"`` order (every forward of a wave
before any backward) is a fixed plan that no priority among ready tasks reproduces.
"""

import dataclasses
import heapq
import math
from typing import NamedTuple

import numpy as np

from decjax.sim._checks import nonneg
from decjax.sim.cost import ComputeCost, activation_bytes
from decjax.sim.estimators import Estimate
from decjax.sim.network import Network, Placement, place_round_robin
from decjax.skippipe.builders import full_pipeline_schedule, stage_major_allocation
from decjax.skippipe.paths import IO, Schedule

KINDS = ("io_forward", "forward", "loss", "backward", "io_backward")
PRIORITIES = {"fifo": (1, 0, 0, 0, 0), "backward": (2, 1, 0, 0, 0)}  # class of each kind; low first
REFERENCE_MEMORY = 3  # activation slots per node [code, spec §2.1]
REFERENCE_TASK_GAP_S = 0.13  # busy time after a task [code, spec §2.6]
_ARRIVE, _DONE, _FREE = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields have no scalar ==
class Timeline:
    """Every task of one simulated iteration, one row each, by microbatch, then chain order.

    Attributes:
        microbatch, step, kind, node, stage: ``int32[T]``; ``step`` is the position in the
            microbatch's chain, ``kind`` indexes :data:`KINDS`, ``stage`` is ``IO`` (-1) on
            the io node.
        sender: ``int32[T]`` node the task's input comes from; -1 for an injection.
        link_s, ready_s, start_s, end_s: ``float64[T]`` transfer seconds of the input, and
            when the input arrived, the task started and ended.
    """

    microbatch: np.ndarray
    step: np.ndarray
    kind: np.ndarray
    node: np.ndarray
    stage: np.ndarray
    sender: np.ndarray
    link_s: np.ndarray
    ready_s: np.ndarray
    start_s: np.ndarray
    end_s: np.ndarray

    @property
    def seconds(self) -> float:
        """The makespan: when the last task ends."""
        return float(self.end_s.max())

    def wait_s(self) -> np.ndarray:
        """``float64[T]`` seconds each task waited after its input arrived (busy node, memory)."""
        return self.start_s - self.ready_s


def _slots(memory, n: int) -> list:
    if memory is None:
        return [math.inf] * n
    a = np.asarray(memory)
    if a.ndim == 0:
        a = np.full(n, a)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer) or (a < 1).any():
        raise ValueError(f"memory must be None, an integer >= 1, or {n} integers >= 1 (one per "
                         f"node), got {memory!r}")
    return a.tolist()


def _release(release_s, m: int) -> np.ndarray:
    if release_s is None:
        return np.zeros(m)
    r = np.asarray(release_s)  # ints or floats only
    if r.dtype.kind not in "iuf" or r.shape != (m,) or not np.isfinite(r).all() or (r < 0).any():
        raise ValueError(f"release_s must be None or {m} finite seconds >= 0 (one per "
                         f"microbatch), got {release_s!r}")
    return r.astype(np.float64)


def _check(schedule, placement, cost, priority):
    for name, value, kind in (("schedule", schedule, Schedule),
                              ("placement", placement, Placement), ("cost", cost, ComputeCost)):
        if not isinstance(value, kind):
            raise ValueError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    held, n = schedule.node_stage, schedule.node_stage.size
    if placement.n_nodes != n:
        raise ValueError(f"placement places {placement.n_nodes} nodes but schedule.node_stage "
                         f"has {n}; both must describe the same nodes")
    if held.max() >= cost.n_stages:
        raise ValueError(f"cost covers {cost.n_stages} body stages but schedule.node_stage "
                         f"holds stage {held.max()}")
    bad = np.argwhere((schedule.stages >= 0) & (held[schedule.nodes] != schedule.stages))
    if bad.size:
        m, h = bad[0]
        v = schedule.nodes[m, h]
        raise ValueError(f"schedule: microbatch {m}, hop {h} runs stage {schedule.stages[m, h]} "
                         f"on node {v}, which holds stage {held[v]} (IO is {IO})")
    bad = np.flatnonzero(held[schedule.io_node] != IO)
    if bad.size:
        m = bad[0]
        raise ValueError(f"schedule: microbatch {m} starts on node {schedule.io_node[m]}, "
                         f"which holds body stage {held[schedule.io_node[m]]}, not io")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")


def _chains(schedule: Schedule, cost: ComputeCost, io_forward_s: float) -> dict:
    """Per-task columns of every microbatch's chain, microbatch after microbatch."""
    fwd = cost.forward_s.tolist()
    io_bwd, loss, factor = cost.backward_factor * io_forward_s, cost.loss(), cost.backward_factor
    cols = {key: [] for key in ("microbatch", "step", "kind", "node", "stage", "duration")}
    for m, (u, k) in enumerate(zip(schedule.io_node.tolist(), schedule.path_lengths().tolist(),
                                   strict=True)):
        stages, nodes = schedule.stages[m, :k].tolist(), schedule.nodes[m, :k].tolist()
        cols["microbatch"] += [m] * (2 * k + 3)
        cols["step"] += range(2 * k + 3)
        cols["kind"] += [0] + [1] * k + [2] + [3] * k + [4]
        cols["node"] += [u, *nodes, u, *nodes[::-1], u]
        cols["stage"] += [IO, *stages, IO, *stages[::-1], IO]
        cols["duration"] += [io_forward_s, *(fwd[s] for s in stages), loss,
                             *(factor * fwd[s] for s in stages[::-1]), io_bwd]
    return {key: np.asarray(value) for key, value in cols.items()}


def _run(node, kind, duration, link, release, slots, rank, gap):
    """Event loop; returns (ready, start, end) lists, ``nan`` start for tasks never run."""
    n, heads = len(slots), np.flatnonzero(kind == 0).tolist()
    takes, frees, last = (kind <= 1).tolist(), (kind >= 3).tolist(), (kind == 4).tolist()
    node, duration, link = node.tolist(), duration.tolist(), link.tolist()
    ready, start, end = ([math.nan] * len(node) for _ in range(3))
    events = [(release[i], i, _ARRIVE, t) for i, t in enumerate(heads)]
    heapq.heapify(events)
    seq, queues, busy = len(events), [[] for _ in range(n)], [False] * n
    while events:
        now, touched = events[0][0], set()
        while events and events[0][0] == now:
            _, _, what, t = heapq.heappop(events)
            v = node[t]
            touched.add(v)
            if what == _ARRIVE:
                ready[t] = now
                queues[v].append((rank[t], now, t))
            elif what == _FREE:
                busy[v] = False
            else:
                slots[v] += frees[t]
                if not last[t]:
                    heapq.heappush(events, (now + link[t + 1], seq, _ARRIVE, t + 1))
                    seq += 1
        for v in sorted(touched):
            options = [] if busy[v] else [e for e in queues[v] if slots[v] >= 1 or not takes[e[2]]]
            if not options:
                continue
            entry = min(options)
            queues[v].remove(entry)
            t = entry[2]
            slots[v] -= takes[t]
            start[t], end[t], busy[v] = now, now + duration[t], True
            heapq.heappush(events, (end[t], seq, _DONE, t))
            heapq.heappush(events, (end[t] + gap, seq + 1, _FREE, t))
            seq += 2
    return ready, start, end


def simulate(schedule: Schedule, placement: Placement, cost: ComputeCost, *,
             activation_bytes: float, memory=REFERENCE_MEMORY, priority: str = "fifo",
             io_forward_s: float | None = None, task_gap_s: float = 0.0, release_s=None,
             seed: int = 0) -> Timeline:
    """Runs one iteration of ``schedule`` and returns when every task ran (see module doc).

    Args:
        schedule: the plan; its io nodes must be io nodes and each hop's node must hold that
            hop's stage (the other rules of :func:`validate` are not required).
        placement: region of each of the schedule's ``N`` nodes.
        cost: ``forward``/``backward`` seconds per body stage and ``loss()`` on the io node;
            with a ``straggler_sigma``, every task's time is scaled by a draw from ``seed``.
        activation_bytes: bytes sent per hop, forward (activations) and backward (gradients).
        memory: activation slots per node: an int for all, ``N`` ints, or ``None`` (no cap).
        priority: ``"fifo"`` (the reference) or ``"backward"`` (1F1B-like).
        io_forward_s: seconds of an io node's forward; its backward is ``backward_factor``
            times that. Default: the mean body-stage forward, as the reference's stage 0 holds
            ``L/S`` layers besides embedding and head [code, §2.1]; pass 0 for an io stage
            without layers (``StagedLlama``'s).
        task_gap_s: seconds a node stays busy after each task.
        release_s: ``[M]`` seconds at which each microbatch is ready at its io node; default 0.
        seed: seed of the straggler draws.

    Returns:
        A :class:`Timeline`.

    Raises:
        ValueError: bad arguments (the message names them), or ``memory`` too small for the
            schedule to finish (a cycle of microbatches each waiting for another's slot).

    Example::

        alloc = stage_major_allocation([5, 3, 3, 3, 3, 3])
        place = place_round_robin(Network.gcp12(hop_overhead_s=0.35), 20)
        cost = ComputeCost.reference(5, layers_per_stage=4, samples_per_microbatch=8)
        tl = simulate(round_robin_schedule(alloc, 30, 1 / 3), place, cost,
                      activation_bytes=32 * 2**20)
        tl.seconds, tl.wait_s().sum()  # makespan; total queueing of all tasks
    """
    _check(schedule, placement, cost, priority)
    nbytes = nonneg(activation_bytes, "activation_bytes")
    io_s = np.mean(cost.forward_s) if io_forward_s is None else io_forward_s
    slots, release = _slots(memory, placement.n_nodes), _release(release_s, schedule.n_microbatches)
    c = _chains(schedule, cost, nonneg(io_s, "io_forward_s"))
    duration = c["duration"] * cost.sample(seed, c["duration"].shape)
    sender = np.where(c["step"] > 0, np.roll(c["node"], 1), -1)
    link = np.where(sender >= 0, placement.transfer_matrix(nbytes)[sender, c["node"]], 0.0)
    rank = np.asarray(PRIORITIES[priority])[c["kind"]].tolist()
    ready, start, end = _run(c["node"], c["kind"], duration, link, release.tolist(), slots, rank,
                             nonneg(task_gap_s, "task_gap_s"))
    stuck = np.isnan(start)
    if stuck.any():
        raise ValueError(f"memory={memory!r} deadlocks this schedule: microbatches "
                         f"{np.unique(c['microbatch'][stuck]).tolist()} wait for activation slots "
                         "that microbatches behind them hold; raise memory or reorder the paths")
    i32 = {key: c[key].astype(np.int32) for key in ("microbatch", "step", "kind", "node", "stage")}
    return Timeline(**i32, sender=sender.astype(np.int32), link_s=link,
                    ready_s=np.asarray(ready), start_s=np.asarray(start), end_s=np.asarray(end))


def _estimate(timeline: Timeline, nbytes: float, n_nodes: int) -> Estimate:
    """Seconds, bytes over links, and where the slowest microbatch's time went."""
    seconds = timeline.seconds
    own = timeline.microbatch == timeline.microbatch[np.argmax(timeline.end_s)]
    compute = float((timeline.end_s - timeline.start_s)[own].sum())
    link = float(timeline.link_s[own].sum())
    hops = int(((timeline.sender >= 0) & (timeline.sender != timeline.node)).sum())
    busy = np.bincount(timeline.node, weights=timeline.end_s - timeline.start_s,
                       minlength=n_nodes)
    return Estimate(seconds, hops * nbytes,
                    {"compute": compute, "communication": link,
                     "wait": seconds - compute - link},
                    idle_s=float(np.mean(seconds - busy)))


def makespan(schedule: Schedule, placement: Placement, cost: ComputeCost, *,
             activation_bytes: float, **options) -> Estimate:
    """Simulated seconds of one iteration of ``schedule``, as a :class:`decjax.sim.Estimate`.

    Args:
        schedule, placement, cost, activation_bytes: as in :func:`simulate`.
        **options: the other keywords of :func:`simulate` (``memory``, ``priority``, ...).

    Returns:
        ``seconds`` (data-parallel sync excluded, see the module doc) and ``bytes`` sent over
        links. ``breakdown`` follows the microbatch that ends last: ``compute`` (its tasks),
        ``communication`` (its transfers) and ``wait`` (its release time and queueing: collisions,
        full memory, task gaps); they add up to ``seconds``. ``idle_s`` is the mean over all
        nodes, extra io nodes included, of the seconds not spent computing.

    Example::

        skip = makespan(schedule, place, cost, activation_bytes=32 * 2**20)
        full = baseline_makespan(schedule, place, cost, activation_bytes=32 * 2**20)
        1 - skip.seconds / full.seconds  # SkipPipe's reduction of the iteration time
    """
    timeline = simulate(schedule, placement, cost, activation_bytes=activation_bytes, **options)
    return _estimate(timeline, nonneg(activation_bytes, "activation_bytes"), placement.n_nodes)


def baseline_makespan(schedule: Schedule, placement: Placement, cost: ComputeCost, *,
                      activation_bytes: float, **options) -> Estimate:
    """The reference baseline (DT-FM, spec §2.1, §4): full pipelines on ``schedule``'s nodes.

    Simulates :func:`full_pipeline_schedule` over the same allocation and microbatch count
    (``M / J`` microbatches on each of the ``J`` aligned pipelines; extra io nodes idle) with
    the same options as :func:`makespan`. The reference aligns pipelines by matching (§2.3);
    here pipeline ``j`` is the ``j``-th node of each stage.
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    full = full_pipeline_schedule(schedule.node_stage, schedule.n_microbatches)
    return makespan(full, placement, cost, activation_bytes=activation_bytes, **options)


REFERENCE_PARTITION = (5, 3, 3, 3, 3, 3)  # io nodes, then the nodes of each body stage


class Instance(NamedTuple):
    """Where and at what cost a schedule runs: the arguments every planner call shares."""

    allocation: np.ndarray
    placement: Placement
    cost: ComputeCost
    activation_bytes: float


def reference_instance(partition=REFERENCE_PARTITION, *, variant: str = "checkfree") -> Instance:
    """The SkipPipe evaluation setting (spec skippipe.md §2.1, §3) for a stage-major partition.

    Node ``k`` sits in GCP region ``k % 12`` with 0.35 s per hop, each body stage holds 4 of the
    reference's layers (``w = 1.76`` s forward per microbatch of 8 samples), and a hop carries
    32 MiB of activations (d_model 1024, 1024 tokens, 8 samples). The default partition is the
    reference instance: 20 nodes, 5 io nodes and 5 body stages of 3 nodes.
    """
    allocation = stage_major_allocation(list(partition))
    placement = place_round_robin(Network.gcp12(variant=variant, hop_overhead_s=0.35),
                                  allocation.size)
    cost = ComputeCost.reference(len(partition) - 1, layers_per_stage=4,
                                 samples_per_microbatch=8)
    return Instance(allocation, placement, cost,
                    activation_bytes(d_model=1024, seq_len=1024, samples=8))
