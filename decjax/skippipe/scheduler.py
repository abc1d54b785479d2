"""Network-aware SkipPipe path planner, a provable makespan lower bound, and exact search.

The reference plans paths with a conflict-based search over a time-aware A* and stops once a
schedule is 12% better than its first (spec skippipe.md §2.4); it reports no bound. Here
[ours, not the reference's algorithm]:

* :func:`plan` keeps the given node allocation (no GCMA, §2.3) and io assignment (contiguous
  blocks of microbatches per io node, as :func:`round_robin_schedule`), starts from the
  balanced round-robin schedule and improves it by simulated annealing over moves that keep
  every rule of :func:`validate`, exact stage and node balance included: swap the nodes of two
  visits of one stage, reorder one path, exchange one stage between two paths, exchange two
  whole paths. ``collision_aware=False`` minimises the summed round-trip link seconds of all
  paths (no queueing; the "without TC2" variant); ``collision_aware=True`` continues from the
  best-simulating of that result, the round robin and, where the allocation allows one, the
  best plan in which each io node keeps one path to itself (an exact min–max cover, the space
  the reference's coarsened search explores), and minimises the
  :func:`decjax.skippipe.simulate` makespan in a few short annealing runs, ties broken by the
  summed microbatch completion times; half the moves involve the microbatches of the io node
  that ends last. The latency phase gets at most a third of the time budget.
* :func:`lower_bound` is a makespan no schedule of the same allocation, io assignment and
  balance can beat under the simulator's model (per-node work; activation slots at io nodes
  times the shortest legal round trip).
* :func:`exhaustive_plan` simulates every balanced schedule of a tiny instance: the optimum of
  the planner's search space, to measure its gap.
* :func:`cpsat_bound` solves a relaxation of the simulator (any task order per node) with
  OR-Tools CP-SAT, an optional dependency: a bound, tight on small instances.
* :func:`rotating_plans` plans one schedule per round-robin rotation of the stage sets, so
  each data shard visits every body stage equally often over ``n_stages`` iterations (§7).
"""

import itertools
import json
import math
import os
import pathlib
import time

import numpy as np

from decjax.sim.cost import ComputeCost
from decjax.sim.network import Placement
from decjax.skippipe.builders import _groups, round_robin_schedule
from decjax.skippipe.paths import Schedule, _integer, legal_paths, path_length, validate
from decjax.skippipe.simulate import PRIORITIES, REFERENCE_MEMORY, _run, _slots, simulate

_MOVES = ("node", "order", "stage", "path")
LATENCY_TEMPERATURE_S = 1.0  # initial annealing temperature of each search phase
MAKESPAN_TEMPERATURE_S = 0.5
ANNEALING_RUNS = 4  # the simulated phase's evaluations are split over this many runs


class _Instance:
    """Everything fixed while planning: allocation, legal orders, link seconds, io blocks."""

    def __init__(self, allocation, placement, n_microbatches, skip_ratio, activation_bytes,
                 max_swaps, max_jump):
        groups = _groups(allocation)
        self.allocation = np.asarray(allocation, np.int32)
        self.io_nodes, self.stage_nodes = groups[0], groups[1:]
        self.n_stages, self.m = len(groups) - 1, _integer(n_microbatches, "n_microbatches", 1)
        self.limits = dict(max_swaps=max_swaps, max_jump=max_jump)
        self.k = path_length(self.n_stages, skip_ratio)
        if not isinstance(placement, Placement) or placement.n_nodes != self.allocation.size:
            raise ValueError(f"placement must be a Placement of the allocation's "
                             f"{self.allocation.size} nodes, got {placement!r}")
        t = placement.transfer_matrix(activation_bytes)
        self.round_trip = (t + t.T).tolist()  # forward hop plus the backward hop retracing it
        self.orders = {}  # frozenset of stages -> its legal visiting orders
        for order in legal_paths(self.n_stages, self.k, **self.limits):
            self.orders.setdefault(frozenset(order), []).append(order)
        self.io = [int(u) for u in self.io_nodes[np.arange(self.m) * self.io_nodes.size
                                                 // self.m]]

    def schedule(self, orders, nodes) -> Schedule:
        return Schedule(self.allocation, self.io, orders, nodes)

    def latency(self, m, nodes) -> float:
        """Round-trip link seconds of microbatch ``m``'s path through ``nodes``."""
        rt, chain = self.round_trip, [self.io[m], *nodes, self.io[m]]
        return sum(rt[a][b] for a, b in itertools.pairwise(chain))


def _propose(rng, inst, orders, nodes, fixed_sets, focus):
    """A random balance-preserving move: ``(m1, m2, new paths)`` or ``None`` if not possible.

    Half the time ``m1`` is drawn from ``focus`` (microbatch indices), when given."""
    if focus and rng.random() < 0.5:
        m1 = focus[int(rng.integers(len(focus)))]
    else:
        m1 = int(rng.integers(inst.m))
    move = _MOVES[int(rng.integers(2 if fixed_sets else 4))] if inst.m > 1 else "order"
    o1, n1 = orders[m1], nodes[m1]
    if move == "order":
        choices = inst.orders[frozenset(o1)]
        o = choices[int(rng.integers(len(choices)))]
        where = dict(zip(o1, n1, strict=True))
        return m1, None, ((o, tuple(where[s] for s in o)), None)
    m2 = int(rng.integers(inst.m - 1))
    m2 += m2 >= m1
    o2, n2 = orders[m2], nodes[m2]
    if move == "path":
        return m1, m2, ((o2, n2), (o1, n1))
    if move == "node":
        h1 = int(rng.integers(inst.k))
        if o1[h1] not in o2:
            return None
        h2 = o2.index(o1[h1])
        if n1[h1] == n2[h2]:
            return None
        a, b = list(n1), list(n2)
        a[h1], b[h2] = n2[h2], n1[h1]
        return m1, m2, ((o1, tuple(a)), (o2, tuple(b)))
    only1, only2 = sorted(set(o1) - set(o2)), sorted(set(o2) - set(o1))
    if not only1:
        return None
    s1, s2 = only1[int(rng.integers(len(only1)))], only2[int(rng.integers(len(only2)))]
    new = []
    for o, n, out, into, node in ((o1, n1, s1, s2, n2[o2.index(s2)]),
                                  (o2, n2, s2, s1, n1[o1.index(s1)])):
        where = dict(zip(o, n, strict=True))
        del where[out]
        where[into] = node
        swapped = tuple(into if s == out else s for s in o)
        choices = inst.orders.get(frozenset(swapped), [])
        if not choices:
            return None
        if swapped not in choices:
            swapped = choices[int(rng.integers(len(choices)))]
        new.append((swapped, tuple(where[s] for s in swapped)))
    return m1, m2, tuple(new)


def _search(inst, orders, nodes, score, rng, *, fixed_sets, deadline, max_evaluations,
            temperature):
    """Annealing (linear cooling from ``temperature`` seconds to 0) over balance-preserving
    moves; ``score(orders, nodes, touched)`` -> ``(key, focus)``. Leaves the best state found."""
    current, focus = score(orders, nodes, None)
    best, kept = current, (list(orders), list(nodes))
    for i in range(max_evaluations):
        if time.perf_counter() > deadline:
            break
        move = _propose(rng, inst, orders, nodes, fixed_sets, focus)
        if move is None:
            continue
        m1, m2, paths = move
        old = [(m, orders[m], nodes[m]) for m in (m1, m2) if m is not None]
        for m, path in zip((m1, m2), paths, strict=True):
            if m is not None:
                orders[m], nodes[m] = path
        key, new_focus = score(orders, nodes, (m1, m2))
        heat = temperature * (1 - i / max_evaluations)
        if key <= current or (heat > 0 and rng.random() < math.exp((current[0] - key[0]) / heat)):
            current, focus = key, new_focus
            if key < best:
                best, kept = key, (list(orders), list(nodes))
        else:
            for m, o, n in old:
                orders[m], nodes[m] = o, n
            score.restore(orders, nodes, (m1, m2))
    orders[:], nodes[:] = kept
    return best


class _LatencyScore:
    """Summed round-trip link seconds of every path, updated for the touched microbatches."""

    def __init__(self, inst):
        self.inst, self.per = inst, []

    def __call__(self, orders, nodes, touched):
        if touched is None:
            self.per = [self.inst.latency(m, nodes[m]) for m in range(self.inst.m)]
        else:
            self.restore(orders, nodes, touched)
        return (math.fsum(self.per),), None

    def restore(self, orders, nodes, touched):
        for m in touched:
            if m is not None:
                self.per[m] = self.inst.latency(m, nodes[m])


class _Simulator:
    """:func:`simulate`'s completion times for path lists, without its checks or Timeline.

    The planner simulates thousands of candidates, so this builds the task chains straight from
    ``(io, orders, nodes)`` lists and runs :func:`simulate`'s own event loop on them: the same
    numbers (a test checks it), at a fraction of the cost. Options are :func:`simulate`'s and
    are checked by :func:`plan`'s first :func:`simulate` call.
    """

    def __init__(self, placement, cost, activation_bytes, *, memory=REFERENCE_MEMORY,
                 priority="fifo", io_forward_s=None, task_gap_s=0.0, release_s=None, seed=0):
        io_f = float(np.mean(cost.forward_s)) if io_forward_s is None else float(io_forward_s)
        self.io_tasks = io_f, cost.loss(), cost.backward_factor * io_f
        self.fwd = cost.forward_s.tolist()
        self.bwd = [cost.backward_factor * f for f in self.fwd]
        self.link = placement.transfer_matrix(activation_bytes).tolist()
        self.slots = _slots(memory, placement.n_nodes)
        self.class_of = PRIORITIES[priority]
        self.cost, self.seed, self.gap, self.release = cost, seed, float(task_gap_s), release_s

    def completions(self, io, orders, nodes, microbatches=None) -> list[float] | None:
        """End of each path's ``io_backward``; ``None`` when memory deadlocks the paths.

        ``microbatches``: the schedule's indices of these paths (for ``release_s``); default
        ``0 .. len(io) - 1``."""
        (io_f, loss, io_b), fwd, bwd, link = self.io_tasks, self.fwd, self.bwd, self.link
        chain_node, duration, link_s, kind = [], [], [], []
        for u, order, hops in zip(io, orders, nodes, strict=True):
            k = len(hops)
            chain = [u, *hops, u, *hops[::-1], u]
            chain_node += chain
            duration += [io_f, *(fwd[s] for s in order), loss, *(bwd[s] for s in order[::-1]),
                         io_b]
            link_s += [0.0, *(link[a][b] for a, b in itertools.pairwise(chain))]
            kind += [0, *[1] * k, 2, *[3] * k, 4]
        duration = np.asarray(duration)
        if self.cost.straggler_sigma:
            duration = duration * self.cost.sample(self.seed, duration.shape)
        index = range(len(io)) if microbatches is None else microbatches
        release = [0.0] * len(io) if self.release is None else \
            [float(self.release[m]) for m in index]
        _, start, end = _run(np.asarray(chain_node), np.asarray(kind), duration,
                             np.asarray(link_s), release, list(self.slots),
                             [self.class_of[x] for x in kind], self.gap)
        if any(math.isnan(t) for t in start):
            return None
        return [t for t, x in zip(end, kind, strict=True) if x == 4]


class _MakespanScore:
    """Simulated makespan, then the summed completion times (``inf`` for a memory deadlock).

    Focus: the microbatches of the io node whose microbatch ends last. Its makespan is a chain
    of microbatches through its activation slots, so the move that helps is often on an
    earlier microbatch of that io node, not on the last one itself."""

    def __init__(self, inst, simulator):
        self.inst, self.simulator = inst, simulator
        self.blocks = {u: [m for m in range(inst.m) if inst.io[m] == u] for u in set(inst.io)}

    def __call__(self, orders, nodes, touched):
        done = self.simulator.completions(self.inst.io, orders, nodes)
        if done is None:
            return (math.inf, math.inf), None
        last = max(range(len(done)), key=done.__getitem__)
        return (max(done), math.fsum(done)), self.blocks[self.inst.io[last]]

    def restore(self, orders, nodes, touched):
        pass


def _isolated_paths(inst, simulator, deadline, max_paths: int = 20_000):
    """The best plan in which each io node sends all its microbatches along one path and no
    two io nodes share a body node; ``None`` where no such plan is balanced, or on timeout.

    Such a plan is balanced exactly when every body node's visit quota equals an io node's
    microbatch count (the reference instance: 5 io nodes x 3 hops cover the 15 body nodes,
    6 visits each, 6 microbatches each). Its io nodes then never meet, so an io node's time on
    a path is one small simulation of its microbatches alone, and the best plan is an exact
    min–max cover, found by depth-first search, hardest io node first [ours; the reference's
    coarsened CBS searches this space heuristically (spec skippipe.md §2.4, §2.7)].
    """
    n_io = inst.io_nodes.size
    count = inst.m // n_io
    if inst.m % n_io or any(count * members.size * inst.n_stages != inst.m * inst.k
                            for members in inst.stage_nodes):
        return None
    paths = [(order, hops) for group in inst.orders.values() for order in group
             for hops in itertools.product(*(inst.stage_nodes[s].tolist() for s in order))]
    if len(paths) * n_io > max_paths:
        return None
    costs = {}  # io node -> [(seconds, path index)], fastest first
    for j, u in enumerate(inst.io_nodes.tolist()):
        block = range(j * count, (j + 1) * count)
        costs[u] = []
        for i, (order, hops) in enumerate(paths):
            if time.perf_counter() > deadline:
                return None
            done = simulator.completions([u] * count, [order] * count, [hops] * count, block)
            if done is not None:
                costs[u].append((max(done), i))
        costs[u].sort()
    if not all(costs.values()):
        return None
    ios = sorted(costs, key=lambda u: -costs[u][0][0])  # the most constrained first
    best = [math.inf, None]

    def cover(depth, used, worst, chosen):
        if depth == len(ios):
            best[:] = worst, dict(chosen)
            return
        u = ios[depth]
        for seconds, i in costs[u]:
            if max(worst, seconds) >= best[0]:
                break  # sorted: no later path of u does better
            if used.isdisjoint(paths[i][1]):
                chosen[u] = paths[i]
                cover(depth + 1, used | set(paths[i][1]), max(worst, seconds), chosen)
        chosen.pop(u, None)

    cover(0, frozenset(), 0.0, {})
    if best[1] is None:
        return None
    return [best[1][u][0] for u in inst.io], [best[1][u][1] for u in inst.io]


def plan(allocation, placement: Placement, cost: ComputeCost, *, n_microbatches: int,
         skip_ratio: float, activation_bytes: float, collision_aware: bool = True,
         time_budget_s: float = 9.0, max_evaluations: int = 4000, seed: int = 0,
         shift: int = 0, fixed_sets: bool = False, max_swaps: int = 2, max_jump: int = 4,
         **sim_options) -> Schedule:
    """Balanced SkipPipe paths that minimise the simulated iteration time (see module doc).

    Args:
        allocation: ``int[N]`` body stage of each node, ``IO`` (-1) for io nodes; kept as is.
        placement: region of each node (link seconds).
        cost: compute seconds per stage, as in :func:`decjax.skippipe.simulate`.
        n_microbatches: microbatches ``M`` per iteration; io node ``j`` of ``J`` starts
            a contiguous block of microbatches, as in :func:`round_robin_schedule`.
        skip_ratio: as in :func:`path_length`.
        activation_bytes: bytes per hop, each way.
        collision_aware: minimise the simulated makespan (True) or only the summed round-trip
            link seconds of the paths (False: no queueing, the reference's "without TC2").
        time_budget_s: wall-clock cap of the whole search.
        max_evaluations: cap on simulated candidates (collision-aware phase); the latency
            phase tries ``10 * max_evaluations`` moves. The result depends only on ``seed``
            when this cap, not the time budget, ends the search.
        seed: seed of the move proposals.
        shift: round-robin rotation of the starting schedule (see :func:`rotating_plans`).
        fixed_sets: keep each microbatch's set of visited stages from the starting schedule
            (optimise only orders and nodes).
        max_swaps, max_jump: path-order rules, as in :func:`validate`.
        **sim_options: other keywords of :func:`decjax.skippipe.simulate` (``memory``,
            ``priority``, ``io_forward_s``, ``task_gap_s``, ``release_s``).

    Returns:
        A :class:`Schedule` that passes :func:`validate`. The latency phase starts from
        :func:`round_robin_schedule` and ends no worse in summed link seconds; with
        ``collision_aware=True`` the simulated phase starts from the best-simulating of its
        result, the round robin and the isolated-path cover, so the plan's makespan is at most
        each of them (when the evaluation cap, not the time budget, ends the earlier phases).

    Example::

        alloc = stage_major_allocation([5, 3, 3, 3, 3, 3])
        s = plan(alloc, place, cost, n_microbatches=30, skip_ratio=1 / 3,
                 activation_bytes=32 * 2**20)
        makespan(s, place, cost, activation_bytes=32 * 2**20).seconds
    """
    deadline = time.perf_counter() + float(time_budget_s)
    inst = _Instance(allocation, placement, n_microbatches, skip_ratio, activation_bytes,
                     max_swaps, max_jump)
    evaluations = _integer(max_evaluations, "max_evaluations", 0)
    start = round_robin_schedule(inst.allocation, inst.m, skip_ratio, shift=shift)
    validate(start, n_stages=inst.n_stages, skip_ratio=skip_ratio, **inst.limits)
    orders = [tuple(r) for r in start.stages.tolist()]
    nodes = [tuple(r) for r in start.nodes.tolist()]
    start_orders, start_nodes = list(orders), list(nodes)
    rng = np.random.default_rng(seed)
    # The latency phase only seeds the simulated one: leave that one most of the budget.
    latency_deadline = min(deadline, time.perf_counter() + time_budget_s / 3) \
        if collision_aware else deadline
    _search(inst, orders, nodes, _LatencyScore(inst), rng, fixed_sets=fixed_sets,
            deadline=latency_deadline, max_evaluations=10 * evaluations,
            temperature=LATENCY_TEMPERATURE_S)
    if collision_aware:
        simulate(start, placement, cost, activation_bytes=activation_bytes, **sim_options)  # checks
        simulator = _Simulator(placement, cost, activation_bytes, **sim_options)
        score = _MakespanScore(inst, simulator)
        starts = [(orders, nodes), (start_orders, start_nodes)]  # ties keep the first
        if not fixed_sets:
            starts.append(_isolated_paths(inst, simulator, deadline))
        orders, nodes = map(list, min((s for s in starts if s), key=lambda s: score(*s, None)[0]))
        # Short annealing runs, each from the best so far: the landscape is flat (a max), and a
        # run that wanders off its start rarely comes back within one long cooling.
        for _ in range(ANNEALING_RUNS):
            _search(inst, orders, nodes, score, rng, fixed_sets=fixed_sets, deadline=deadline,
                    max_evaluations=evaluations // ANNEALING_RUNS,
                    temperature=MAKESPAN_TEMPERATURE_S)
    out = inst.schedule(orders, nodes)
    validate(out, n_stages=inst.n_stages, skip_ratio=skip_ratio, **inst.limits)
    return out


def rotating_plans(allocation, placement: Placement, cost: ComputeCost, *, n_microbatches: int,
                   skip_ratio: float, activation_bytes: float, count: int | None = None,
                   **options) -> list[Schedule]:
    """Planned schedules to cycle across iterations, one per round-robin rotation.

    Schedule ``j`` is ``plan(..., shift=j, fixed_sets=True)``: microbatch ``m`` visits the
    stages :func:`round_robin_schedule` gives it at ``shift=j`` (orders and nodes planned), so
    over ``n_stages`` consecutive iterations every microbatch position (data shard) visits each
    body stage equally often, unlike the reference's fixed paths (spec §2.7, §7) [ours].
    Fixing the sets costs some makespan against a free :func:`plan`; the bench reports it.

    Args:
        allocation, placement, cost, n_microbatches, skip_ratio, activation_bytes: as in
            :func:`plan`.
        count: schedules to return; default ``n_stages`` (one full rotation).
        **options: other keywords of :func:`plan` (``time_budget_s`` is per schedule).

    Returns:
        A list of ``count`` validated schedules; iteration ``t`` uses ``plans[t % count]``.
    """
    n_stages = len(_groups(allocation)) - 1
    count = n_stages if count is None else _integer(count, "count", 1)
    return [plan(allocation, placement, cost, n_microbatches=n_microbatches,
                 skip_ratio=skip_ratio, activation_bytes=activation_bytes, shift=j,
                 fixed_sets=True, **options) for j in range(count)]


_SCHEDULE_FIELDS = ("node_stage", "io_node", "stages", "nodes")


def rotation_key(skip_ratio: float, max_swaps: int) -> str:
    """The key of one rotation in a plans file: ``"skip 0.2500, max_swaps 2"``."""
    return f"skip {skip_ratio:.4f}, max_swaps {max_swaps}"


def save_rotations(path: str | os.PathLike, rotations: dict, planner: dict) -> None:
    """Writes ``{rotation_key: {"plans": [Schedule], "wall": seconds}}`` and the planner
    settings that made them to ``path`` (JSON, atomically), for :func:`load_rotations`."""
    path = pathlib.Path(path)
    cells = {key: {"wall": cell["wall"],
                   "plans": [{f: getattr(p, f).tolist() for f in _SCHEDULE_FIELDS}
                             for p in cell["plans"]]}
             for key, cell in rotations.items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"planner": planner, "rotations": cells}))
    os.replace(tmp, path)


def load_rotations(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(planner settings, {rotation_key: {"plans": [Schedule], "wall": seconds}})`` of a
    file written by :func:`save_rotations`."""
    stored = json.loads(pathlib.Path(path).read_text())
    return stored["planner"], {
        key: {"plans": [Schedule(**p) for p in cell["plans"]], "wall": cell["wall"]}
        for key, cell in stored["rotations"].items()}


def path_latency(schedule: Schedule, placement: Placement, activation_bytes: float) -> float:
    """Summed round-trip link seconds of every path (the non-aware planner's objective)."""
    t = placement.transfer_matrix(activation_bytes)
    rt = t + t.T
    total = 0.0
    for m, u in enumerate(schedule.io_node.tolist()):
        chain = [u, *(n for _, n in schedule.path(m)), u]
        total += sum(rt[a, b] for a, b in itertools.pairwise(chain))
    return float(total)


def _shortest_round_trip(inst, cost, u) -> float:
    """Least link plus body compute seconds of any legal path from io node ``u``."""
    rt, fwd = np.asarray(inst.round_trip), cost.forward_s * (1 + cost.backward_factor)
    best = math.inf
    for orders in inst.orders.values():
        for order in orders:
            reach = rt[u, inst.stage_nodes[order[0]]]
            here = inst.stage_nodes[order[0]]
            for s in order[1:]:
                nxt = inst.stage_nodes[s]
                reach = (reach[:, None] + rt[np.ix_(here, nxt)]).min(axis=0)
                here = nxt
            best = min(best, float((reach + rt[here, u]).min() + fwd[list(order)].sum()))
    return best


def lower_bound(allocation, placement: Placement, cost: ComputeCost, *, n_microbatches: int,
                skip_ratio: float, activation_bytes: float, memory=REFERENCE_MEMORY,
                io_forward_s: float | None = None, task_gap_s: float = 0.0,
                max_swaps: int = 2, max_jump: int = 4, **unused_options) -> float:
    """Seconds below which no balanced schedule of :func:`plan`'s search space can finish.

    Valid for the simulator's model with deterministic costs, any priority and release times
    (which only delay), and the io assignment of :func:`plan`. The maximum of:

    * per body node: the earliest start of its first task (``io_forward_s`` plus its cheapest
      incoming link), its balanced visits times forward plus backward, the task gaps between,
      and the cheapest outgoing link plus an ``io_backward`` after its last backward;
    * per io node: its microbatches' ``io_forward``, ``loss`` and ``io_backward`` plus gaps;
    * per io node with ``r`` activation slots and ``c`` microbatches: a slot is held from a
      microbatch's ``io_forward`` to the end of its ``io_backward``, at least the shortest legal
      round trip ``L`` (links plus all compute), so some slot serves ``ceil(c / r)``
      microbatches one after another: ``ceil(c / r) * L`` plus the gaps between them.

    Args:
        allocation, placement, cost, n_microbatches, skip_ratio, activation_bytes, max_swaps,
            max_jump: as in :func:`plan`.
        memory, io_forward_s, task_gap_s: as in :func:`decjax.skippipe.simulate`.
        **unused_options: other simulator keywords (``priority``, ``release_s``); ignored.

    Returns:
        The bound in seconds.
    """
    if cost.straggler_sigma:
        raise ValueError("lower_bound needs deterministic costs (straggler_sigma=0)")
    inst = _Instance(allocation, placement, n_microbatches, skip_ratio, activation_bytes,
                     max_swaps, max_jump)
    n_nodes, gap = inst.allocation.size, float(task_gap_s)
    io_f = float(np.mean(cost.forward_s)) if io_forward_s is None else float(io_forward_s)
    io_b, loss = cost.backward_factor * io_f, cost.loss()
    slots = np.full(n_nodes, math.inf) if memory is None else np.broadcast_to(memory, n_nodes)
    t = placement.transfer_matrix(activation_bytes) + np.diag(np.full(n_nodes, math.inf))
    visits = inst.m * inst.k / inst.n_stages
    bounds = []
    for s, members in enumerate(inst.stage_nodes):
        q = visits / members.size
        work = q * (1 + cost.backward_factor) * cost.forward_s[s] + max(2 * q - 1, 0) * gap
        bounds += [io_f + t[:, v].min() + work + t[v].min() + io_b for v in members]
    for u in inst.io_nodes.tolist():
        c = inst.io.count(u)
        if c:
            bounds.append(c * (io_f + loss + io_b) + (3 * c - 1) * gap)
            rounds = max(1, math.ceil(c / slots[u]))  # 1 when memory is uncapped
            trip = io_f + loss + io_b + _shortest_round_trip(inst, cost, u)
            bounds.append(rounds * trip + (rounds - 1) * gap)
    return float(max(bounds))


def exhaustive_plan(allocation, placement: Placement, cost: ComputeCost, *, n_microbatches: int,
                    skip_ratio: float, activation_bytes: float, max_schedules: int = 100_000,
                    max_swaps: int = 2, max_jump: int = 4,
                    **sim_options) -> tuple[Schedule, float]:
    """The best schedule of :func:`plan`'s search space by simulating every one (tiny cases).

    Enumerates every assignment of a legal path (order and nodes) to each microbatch that
    gives each body node exactly its balanced visit count, with :func:`plan`'s io assignment.

    Args:
        allocation, placement, cost, n_microbatches, skip_ratio, activation_bytes, max_swaps,
            max_jump, **sim_options: as in :func:`plan`.
        max_schedules: refuse (``ValueError``) rather than simulate more schedules than this.

    Returns:
        ``(schedule, seconds)``: an optimal schedule (first found) and its simulated makespan.
    """
    inst = _Instance(allocation, placement, n_microbatches, skip_ratio, activation_bytes,
                     max_swaps, max_jump)
    visits = inst.m * inst.k / inst.n_stages
    caps = np.zeros(inst.allocation.size, np.int64)
    for members in inst.stage_nodes:
        q = visits / members.size
        if q != int(q):
            raise ValueError(f"no balanced schedule: {visits:g} visits per stage over "
                             f"{members.size} nodes")
        caps[members] = int(q)
    options = [(o, ns) for group in inst.orders.values() for o in group
               for ns in itertools.product(*(inst.stage_nodes[s].tolist() for s in o))]
    found = []

    def fill(m, paths):
        if len(found) > max_schedules:
            return
        if m == inst.m:
            found.append(list(paths))
            return
        for o, ns in options:
            if all(caps[v] for v in ns):
                caps[list(ns)] -= 1
                fill(m + 1, [*paths, (o, ns)])
                caps[list(ns)] += 1

    fill(0, [])
    if len(found) > max_schedules:
        raise ValueError(f"more than max_schedules={max_schedules} balanced schedules")
    best, best_s = None, math.inf
    for paths in found:
        s = inst.schedule([o for o, _ in paths], [ns for _, ns in paths])
        sec = simulate(s, placement, cost, activation_bytes=activation_bytes,
                       **sim_options).seconds
        if sec < best_s:
            best, best_s = s, sec
    return best, best_s


def cpsat_bound(allocation, placement: Placement, cost: ComputeCost, *, n_microbatches: int,
                skip_ratio: float, activation_bytes: float, memory=REFERENCE_MEMORY,
                io_forward_s: float | None = None, task_gap_s: float = 0.0,
                time_limit_s: float = 30.0, workers: int = 2, hint: Schedule | None = None,
                max_swaps: int = 2, max_jump: int = 4,
                **unused_options) -> tuple[float, Schedule | None, bool]:
    """A lower bound from OR-Tools CP-SAT on a relaxation of the simulator (optional extra).

    The model has the simulator's tasks, durations, links, task gaps, activation slots and
    :func:`plan`'s search space (legal orders, balance, io assignment), but lets a node run its
    waiting tasks in any order and idle: every simulated run is one of its timetables, so its
    optimum, and CP-SAT's proven bound on it, are below the best simulated makespan. Times are
    rounded down to milliseconds, which keeps the bound valid. Needs ``ortools`` (``pip install
    decjax[solver]``).

    Args:
        allocation, placement, cost, n_microbatches, skip_ratio, activation_bytes, max_swaps,
            max_jump: as in :func:`plan`.
        memory, io_forward_s, task_gap_s: as in :func:`decjax.skippipe.simulate`.
        time_limit_s, workers: CP-SAT's wall-clock limit and threads.
        hint: a schedule to start from (e.g. :func:`plan`'s).
        **unused_options: other simulator keywords (``priority``, ``release_s``); ignored.

    Returns:
        ``(bound_s, schedule, optimal)``: the proven bound in seconds, the paths of CP-SAT's
        best timetable (``None`` if it found none; simulate it for a FIFO makespan), and
        whether CP-SAT proved its timetable optimal (then ``bound_s`` is the relaxation's
        optimum).
    """
    from ortools.sat.python import cp_model  # optional dependency

    if cost.straggler_sigma:
        raise ValueError("cpsat_bound needs deterministic costs (straggler_sigma=0)")
    inst = _Instance(allocation, placement, n_microbatches, skip_ratio, activation_bytes,
                     max_swaps, max_jump)
    ms = lambda x: int(math.floor(1000 * x + 1e-9))  # noqa: E731 (rounded down: a relaxation)
    link = [[ms(x) for x in row] for row in placement.transfer_matrix(activation_bytes)]
    io_f = float(np.mean(cost.forward_s)) if io_forward_s is None else float(io_forward_s)
    io_f, loss, io_b = ms(io_f), ms(cost.loss()), ms(cost.backward_factor * io_f)
    gap, stage = ms(task_gap_s), inst.allocation.tolist()
    fwd = {v: ms(cost.forward_s[stage[v]]) for g in inst.stage_nodes for v in g.tolist()}
    bwd = {v: ms(cost.backward_factor * cost.forward_s[stage[v]]) for v in fwd}
    orders = [o for group in inst.orders.values() for o in group]
    longest = max(max(r) for r in link)  # one microbatch at a time bounds the optimum
    horizon = inst.m * (io_f + loss + io_b + (2 * inst.k + 3) * gap + (2 * inst.k + 2) * longest
                        + inst.k * (max(fwd.values()) + max(bwd.values())))
    model = cp_model.CpModel()
    new = lambda name: model.NewIntVar(0, horizon, name)  # noqa: E731
    span = new("makespan")
    busy = {v: [] for v in range(inst.allocation.size)}  # intervals that keep a node busy
    held = {v: [] for v in range(inst.allocation.size)}  # activation-slot intervals
    y, z = {}, {}
    for m, u in enumerate(inst.io):
        z[m] = [model.NewBoolVar(f"z{m}_{i}") for i in range(len(orders))]
        model.AddExactlyOne(z[m])
        a, lo, e = new(f"a{m}"), new(f"l{m}"), new(f"e{m}")
        f = [new(f"f{m}_{h}") for h in range(inst.k)]
        b = [new(f"b{m}_{h}") for h in range(inst.k)]
        for h in range(inst.k):
            y[m, h] = {v: model.NewBoolVar(f"y{m}_{h}_{v}") for v in fwd}
            model.AddExactlyOne(y[m, h].values())
            for s, g in enumerate(inst.stage_nodes):
                model.Add(sum(y[m, h][v] for v in g.tolist())
                          == sum(zi for zi, o in zip(z[m], orders, strict=True) if o[h] == s))
            for v, lit in y[m, h].items():
                busy[v] += [model.NewOptionalFixedSizeIntervalVar(f[h], fwd[v] + gap, lit, ""),
                            model.NewOptionalFixedSizeIntervalVar(b[h], bwd[v] + gap, lit, "")]
                size = model.NewIntVar(0, horizon, "")
                held[v].append(model.NewOptionalIntervalVar(f[h], size, b[h] + bwd[v], lit, ""))
        dur_f = [sum(fwd[v] * lit for v, lit in y[m, h].items()) for h in range(inst.k)]
        dur_b = [sum(bwd[v] * lit for v, lit in y[m, h].items()) for h in range(inst.k)]
        first, last = y[m, 0], y[m, inst.k - 1]
        model.Add(f[0] >= a + io_f + sum(link[u][v] * lit for v, lit in first.items()))
        model.Add(lo >= f[-1] + dur_f[-1] + sum(link[v][u] * lit for v, lit in last.items()))
        model.Add(b[-1] >= lo + loss + sum(link[u][v] * lit for v, lit in last.items()))
        model.Add(e >= b[0] + dur_b[0] + sum(link[v][u] * lit for v, lit in first.items()))
        for h in range(inst.k - 1):
            for v, p in y[m, h].items():
                for w, q in y[m, h + 1].items():
                    if stage[v] != stage[w]:
                        model.Add(f[h + 1] >= f[h] + fwd[v] + link[v][w]).OnlyEnforceIf([p, q])
                        model.Add(b[h] >= b[h + 1] + bwd[w] + link[w][v]).OnlyEnforceIf([p, q])
        model.Add(span >= e + io_b)
        busy[u] += [model.NewFixedSizeIntervalVar(x, d + gap, "")
                    for x, d in ((a, io_f), (lo, loss), (e, io_b))]
        held[u].append(model.NewIntervalVar(a, model.NewIntVar(0, horizon, ""), e + io_b, ""))
    q = inst.m * inst.k // inst.n_stages
    for g in inst.stage_nodes:
        for v in g.tolist():
            model.Add(sum(y[m, h][v] for m in range(inst.m) for h in range(inst.k))
                      == q // g.size)
    slots = [None] * inst.allocation.size if memory is None \
        else np.broadcast_to(memory, inst.allocation.size).tolist()
    for v in busy:
        model.AddNoOverlap(busy[v])
        if slots[v] is not None and held[v]:
            model.AddCumulative(held[v], [1] * len(held[v]), int(slots[v]))
    if hint is not None:
        for m in range(inst.m):
            path = hint.path(m)
            for i, o in enumerate(orders):
                model.AddHint(z[m][i], o == tuple(s for s, _ in path))
            for h, (_, node) in enumerate(path):
                for v, lit in y[m, h].items():
                    model.AddHint(lit, v == node)
    model.Minimize(span)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = _integer(workers, "workers", 1)
    status = solver.Solve(model)
    bound = solver.BestObjectiveBound() / 1000
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return bound, None, False
    paths_o = [orders[[solver.Value(x) for x in z[m]].index(1)] for m in range(inst.m)]
    paths_n = [tuple(next(v for v, lit in y[m, h].items() if solver.Value(lit))
                     for h in range(inst.k)) for m in range(inst.m)]
    return bound, inst.schedule(paths_o, paths_n), status == cp_model.OPTIMAL
