"""GCMA-style node→stage allocation and aligned full pipelines (DT-FM; spec skippipe.md §2.3).

The reference allocates nodes with DT-FM's genetic algorithm (``schedulers/gcma.py``) and runs
its full-pipeline baseline on the aligned pipelines it reconstructs. This module does the same
with its own code. What follows the reference [code] and what is ours:

* Objective [code]: ``score = DP_cost + 2 * PP_cost``. ``DP_cost`` is the largest link cost
  between two nodes of one group, io group included. ``PP_cost`` is a TSP tour over the groups
  starting at the io group, whose edge weight is the bottleneck (min–max) matching cost between
  the two groups' nodes. The reference's ``tsp_dp`` is called with its default ``isOpen=False``,
  so the tour is **closed** (back to the io group, as the loss hop is), although the spec says
  open-loop; ``closed_tour`` picks either. Each matched edge costs the link seconds plus the
  sender's forward seconds (the reference's node weight; constant for homogeneous stages).
  ``DP_cost`` uses the activation link seconds, as the reference's ``gcma.py`` does; passing
  ``stage_param_bytes`` uses that many bytes instead (the all-reduce's real payload).
* Groups of different sizes [code]: a matching pairs ``min(|A|, |B|)`` nodes, every node of the
  smaller group, as the reference's zero-cost padding does.
* Matching and TSP [ours]: bottleneck matching by binary search over the sorted weights with a
  Kuhn augmenting-path check (the reference reruns ``scipy.linear_sum_assignment`` while
  forbidding the largest edge); Held–Karp bitmask DP for the tour.
* Search [ours, after the reference's shape]: a steady-state genetic algorithm (5-point
  crossover with size repair, child replaces the worse parent) whose children are improved by a
  Kernighan–Lin-style pairwise-swap descent, not the reference's cyclic partitioning; seeded,
  with the stage-major and round-robin allocations in the first population, so the result is
  never worse than either. Ties on ``score`` go to the smaller summed group ``DP`` costs.
* Output: groups are relabelled along the tour (stage ``p`` = the ``p+1``-th group after io), so
  consecutive body stages are well connected while stage numbers stay the model's layer blocks.
  Pipelines are aligned along the tour by bottleneck matchings, ties to the smallest summed cost
  [code, with the tie-break ours]; io nodes are then matched to pipelines on the round trip
  ``io → first stage`` plus ``last stage → io`` [ours; the reference pairs the j-th io node with
  the j-th matched node, which need not be the node it was matched with].
"""

import itertools
import time
from typing import NamedTuple

import numpy as np

from decjax.sim.cost import ComputeCost
from decjax.sim.network import Placement
from decjax.skippipe.builders import _groups, stage_major_allocation
from decjax.skippipe.paths import IO, Schedule, _integer

MAX_TSP_GROUPS = 13  # Held–Karp's 2**(n-1) * n**2 work stays below ~1 s up to here


class Allocation(NamedTuple):
    """A node→stage allocation with its aligned pipelines and GCMA score.

    Attributes:
        allocation: ``int32[N]`` body stage of each node, ``IO`` (-1) for io nodes, as
            :func:`stage_major_allocation`.
        pipelines: ``int32[J, S + 1]``: io node of pipeline ``j``, then its node at body stages
            ``0 .. S-1``; ``J`` is the smallest group size (extra nodes idle in the baseline).
        score, dp_cost, pp_cost: ``dp_cost + 2 * pp_cost``, in seconds (see module doc).
        evaluations: partitions scored by the search.
    """

    allocation: np.ndarray
    pipelines: np.ndarray
    score: float
    dp_cost: float
    pp_cost: float
    evaluations: int = 0


def bottleneck_matching(weights) -> tuple[float, list[tuple[int, int]]]:
    """Min–max matching of every row or every column of ``weights``, whichever are fewer.

    Binary search over the sorted distinct weights; each probe asks Kuhn's augmenting paths for
    a matching that saturates the smaller side using only edges at most that weight.

    Returns:
        The bottleneck (largest matched weight) and the ``(row, column)`` pairs.
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 2 or w.size == 0 or np.isnan(w).any():
        raise ValueError(f"weights must be a non-empty 2-D array without NaN, got {w!r}")
    flip = w.shape[0] > w.shape[1]
    small = (w.T if flip else w).tolist()
    values = sorted({x for row in small for x in row})
    lo, hi = 0, len(values) - 1  # the complete graph at the largest weight always matches
    while lo < hi:
        mid = (lo + hi) // 2
        if _saturating(small, values[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    pairs = _saturating(small, values[lo])
    return values[lo], sorted((c, r) if flip else (r, c) for r, c in pairs)


def _saturating(small, threshold):
    """Pairs matching every row of ``small`` on edges ``<= threshold``, or ``None``."""
    adj = [[c for c, x in enumerate(row) if x <= threshold] for row in small]
    owner = {}

    def augment(r, seen):
        for c in adj[r]:
            if c not in seen:
                seen.add(c)
                if c not in owner or augment(owner[c], seen):
                    owner[c] = r
                    return True
        return False

    if not all(augment(r, set()) for r in range(len(small))):
        return None
    return [(r, c) for c, r in owner.items()]


def _aligned_pairs(weights) -> list[tuple[int, int]]:
    """A bottleneck matching with the smallest summed weight (exhaustive up to 8 of 8)."""
    w = np.asarray(weights, np.float64)
    value, pairs = bottleneck_matching(w)
    rows, cols = w.shape
    if rows > cols:
        return [(r, c) for c, r in _aligned_pairs(w.T)]
    if _count_injections(rows, cols) > 40320:
        return pairs
    best = min(itertools.permutations(range(cols), rows),
               key=lambda p: (max(w[range(rows), p]) > value, w[range(rows), p].sum()))
    return list(enumerate(best))


def _count_injections(rows: int, cols: int) -> int:
    return int(np.prod(np.arange(cols - rows + 1, cols + 1)))


def tsp_path(weights, *, start: int = 0, closed: bool = False,
             kinds=None) -> tuple[float, list[int]]:
    """Exact shortest Hamiltonian path (or tour) from ``start`` by Held–Karp bitmask DP.

    Args:
        weights: ``[n, n]`` edge weights, ``n <= MAX_TSP_GROUPS``; ``weights[a][b]`` for a->b.
        start: first city.
        closed: add the edge back to ``start`` (a tour); otherwise an open path.
        kinds: optional ``[n]`` labels; the city at position ``i`` of the order must have the
            kind of city ``i`` (GCMA: a group may only take a stage of its own size).

    Returns:
        The cost and the visiting order, ``start`` first.
    """
    w = np.asarray(weights, np.float64)
    n = w.shape[0]
    if w.shape != (n, n) or not 1 <= n <= MAX_TSP_GROUPS or not 0 <= start < n:
        raise ValueError(f"weights must be [n, n] with 1 <= n <= {MAX_TSP_GROUPS} and start in "
                         f"[0, n); got shape {w.shape}, start {start}")
    kinds = [0] * n if kinds is None else list(kinds)
    if len(kinds) != n or kinds[start] != kinds[0]:
        raise ValueError(f"kinds must hold n = {n} labels with kinds[start] == kinds[0], "
                         f"got {kinds}")
    w, others = w.tolist(), [c for c in range(n) if c != start]
    if not others:
        return 0.0, [start]
    full, inf = (1 << len(others)) - 1, (float("inf"), None)
    cost = {(1 << i, i): (w[start][c], None) for i, c in enumerate(others)
            if kinds[c] == kinds[1]}
    for mask in sorted(range(1, full + 1), key=int.bit_count):
        for j, cj in enumerate(others):
            if mask >> j & 1 and (mask, j) not in cost and mask != 1 << j \
                    and kinds[cj] == kinds[mask.bit_count()]:
                prev = mask ^ (1 << j)
                cost[mask, j] = min([(cost[prev, i][0] + w[ci][cj], i) for i, ci
                                     in enumerate(others) if (prev, i) in cost] or [inf])
    total, last = min((cost[full, j][0] + (w[cj][start] if closed else 0.0), j)
                      for j, cj in enumerate(others) if (full, j) in cost)
    order, mask = [], full
    while last is not None:
        order.append(others[last])
        mask, last = mask ^ (1 << last), cost[mask, last][1]
    return total, [start, *order[::-1]]


class _Scorer:
    """Scores partitions (group bitmasks); caches group and group-pair costs."""

    def __init__(self, placement, cost, activation_bytes, stage_param_bytes, closed):
        t = placement.transfer_matrix(activation_bytes)
        self.link = ((t + t.T) / 2).tolist()  # activations forward, gradients back
        dp = t if stage_param_bytes is None else placement.transfer_matrix(stage_param_bytes)
        self.dp = ((dp + dp.T) / 2).tolist()
        self.weight = float(np.mean(cost.forward_s))  # the reference's node weight (homogeneous)
        self.closed, self.evaluations, self._dp, self._pair = closed, 0, {}, {}

    def group_dp(self, group) -> float:
        key = frozenset(group)
        if key not in self._dp:
            self._dp[key] = max((self.dp[a][b] for a in group for b in group), default=0.0)
        return self._dp[key]

    def pair(self, a, b) -> float:
        key = (frozenset(a), frozenset(b))
        if key not in self._pair:
            value = bottleneck_matching([[self.link[u][v] for v in b] for u in a])[0]
            self._pair[key] = self._pair[key[::-1]] = value + self.weight
        return self._pair[key]

    def tour(self, groups) -> tuple[float, list[int]]:
        w = [[0.0 if i == j else self.pair(a, b) for j, b in enumerate(groups)]
             for i, a in enumerate(groups)]
        return tsp_path(w, start=0, closed=self.closed, kinds=[len(g) for g in groups])

    def __call__(self, labels) -> tuple:
        """``(score, summed group DP, DP_cost, PP_cost)`` of group labels ``int[N]``."""
        self.evaluations += 1
        groups = _label_groups(labels)
        dps = [self.group_dp(g) for g in groups]
        pp = self.tour(groups)[0]
        return max(dps) + 2 * pp, sum(dps), max(dps), pp


def _label_groups(labels) -> list[tuple[int, ...]]:
    n_groups = max(labels) + 1
    groups = [[] for _ in range(n_groups)]
    for v, g in enumerate(labels):
        groups[g].append(v)
    return [tuple(g) for g in groups]


def _sizes(partition) -> list[int]:
    sizes = [_integer(s, "partition entries", 1) for s in np.atleast_1d(partition)]
    if len(sizes) < 2:
        raise ValueError(f"partition must list io and >= 1 body stage, got {sizes}")
    return sizes


def round_robin_allocation(partition) -> np.ndarray:
    """``int32[N]``: nodes dealt in turn to io and every body stage that still has room."""
    room, labels = _sizes(partition), []
    while any(room):
        for g, left in enumerate(room):
            if left:
                labels.append(g - 1)
                room[g] -= 1
    return np.asarray(labels, np.int32)


def _crossover(rng, p1, p2, sizes, points: int = 5) -> list[int]:
    """``p2`` with ``points`` positions copied from ``p1``, then group sizes repaired."""
    child = list(p2)
    for v in rng.choice(len(child), size=min(points, len(child)), replace=False):
        child[v] = p1[v]
    count = np.bincount(child, minlength=len(sizes))
    for v in rng.permutation(len(child)).tolist():
        g = child[v]
        if count[g] > sizes[g]:
            h = int(np.flatnonzero(count < sizes)[0])
            child[v], count[g], count[h] = h, count[g] - 1, count[h] + 1
    return child


def _descend(rng, scorer, labels, key, stop) -> tuple[list[int], tuple]:
    """Kernighan–Lin-style pairwise swaps, first improvement, until none improves or ``stop()``."""
    labels, improved = list(labels), True
    while improved and not stop():
        improved = False
        pairs = [(u, v) for u, v in itertools.combinations(range(len(labels)), 2)
                 if labels[u] != labels[v]]
        for i in rng.permutation(len(pairs)).tolist():
            if stop():
                break
            u, v = pairs[i]
            if labels[u] == labels[v]:
                continue
            labels[u], labels[v] = labels[v], labels[u]
            new = scorer(labels)
            if new[:2] < key[:2]:
                key, improved = new, True
            else:
                labels[u], labels[v] = labels[v], labels[u]
    return labels, key


def _search(scorer, sizes, rng, population, deadline, max_evaluations):
    """Steady-state GA with swap descent on every child; returns the best labels and key."""
    def stop():
        return scorer.evaluations >= max_evaluations or time.perf_counter() > deadline

    base = [int(g) + 1 for g in stage_major_allocation(sizes)]
    pool = [base, [int(g) + 1 for g in round_robin_allocation(sizes)]]
    pool += [rng.permutation(base).tolist() for _ in range(max(population - 2, 0))]
    keys = [scorer(p) for p in pool]
    while not stop():
        i, j = rng.choice(len(pool), size=2, replace=False).tolist()
        child = _crossover(rng, pool[i], pool[j], sizes)
        child, key = _descend(rng, scorer, child, scorer(child), stop)
        worse = i if keys[i][:2] > keys[j][:2] else j
        if key[:2] < keys[worse][:2] and child not in pool:
            pool[worse], keys[worse] = child, key
    best = min(range(len(pool)), key=lambda k: keys[k][:2])
    return pool[best], keys[best]


def gcma_allocation(placement: Placement, partition, cost: ComputeCost, *,
                    activation_bytes: float, stage_param_bytes: float | None = None,
                    seed: int = 0, time_budget_s: float = 2.0, max_evaluations: int = 6000,
                    population: int = 16, closed_tour: bool = True) -> Allocation:
    """GCMA-style allocation of ``placement``'s nodes to io and body stages (see module doc).

    Args:
        placement: region of each node; ``N`` must equal ``sum(partition)``.
        partition: node count of io, then of each body stage (e.g. ``[5, 3, 3, 3, 3, 3]``).
        cost: compute seconds per body stage (the matched edges' node weight).
        activation_bytes: bytes per pipeline hop.
        stage_param_bytes: bytes of a stage's data-parallel all-reduce; ``None`` scores DP
            links with ``activation_bytes`` as the reference does.
        seed: seeds the search; the result is deterministic when ``max_evaluations`` ends the
            search before ``time_budget_s``.
        time_budget_s, max_evaluations: the search stops at whichever comes first.
        population: GA population size (the reference uses 200 over 8000 trials).
        closed_tour: the PP tour returns to the io group (reference code) or is an open path.

    Returns:
        An :class:`Allocation`; pass ``.allocation`` to :func:`plan`, and ``.pipelines`` to
        :func:`aligned_pipeline_schedule` for the DT-FM baseline.

    Example::

        alloc, place, cost, nbytes = reference_instance()
        g = gcma_allocation(place, REFERENCE_PARTITION, cost, activation_bytes=nbytes)
        base = makespan(aligned_pipeline_schedule(g.allocation, g.pipelines, 30), place, cost,
                        activation_bytes=nbytes)
    """
    sizes = _sizes(partition)
    if not isinstance(placement, Placement) or placement.n_nodes != sum(sizes):
        raise ValueError(f"placement must be a Placement of sum(partition) = {sum(sizes)} "
                         f"nodes, got {placement!r}")
    if len(sizes) > MAX_TSP_GROUPS:
        raise ValueError(f"at most {MAX_TSP_GROUPS} groups (io and body stages), got {sizes}")
    if cost.n_stages != len(sizes) - 1:
        raise ValueError(f"cost covers {cost.n_stages} body stages, partition {len(sizes) - 1}")
    scorer = _Scorer(placement, cost, activation_bytes, stage_param_bytes, closed_tour)
    rng = np.random.default_rng(seed)
    deadline = time.perf_counter() + float(time_budget_s)
    labels, key = _search(scorer, sizes, rng, _integer(population, "population", 2), deadline,
                          _integer(max_evaluations, "max_evaluations", 1))
    groups = _label_groups(labels)
    order = scorer.tour(groups)[1]
    allocation = np.empty(len(labels), np.int32)
    for stage, g in enumerate(order):
        allocation[list(groups[g])] = stage - 1
    pipelines = _align(scorer, [groups[g] for g in order])
    return Allocation(allocation, pipelines, key[0], key[2], key[3], scorer.evaluations)


def _align(scorer, groups) -> np.ndarray:
    """``int32[J, S + 1]`` pipelines: body groups chained by matching, then io matched."""
    link = scorer.link
    chains = [[v] for v in groups[1]]
    for group in groups[2:]:
        pairs = _aligned_pairs([[link[c[-1]][v] for v in group] for c in chains])
        chains = [chains[i] + [group[j]] for i, j in pairs]
    io = groups[0]
    pairs = _aligned_pairs([[link[u][c[0]] + link[c[-1]][u] for c in chains] for u in io])
    return np.asarray(sorted([io[i], *chains[j]] for i, j in pairs), np.int32)


def allocation_score(placement: Placement, allocation, cost: ComputeCost, *,
                     activation_bytes: float, stage_param_bytes: float | None = None,
                     closed_tour: bool = True) -> tuple[float, float, float]:
    """``(score, DP_cost, PP_cost)`` of any allocation ``int[N]`` (io ``IO``), as GCMA scores it.

    The score depends on the groups only, not on which body stage each group holds.
    """
    groups = _groups(allocation)
    labels = [0] * sum(g.size for g in groups)
    for k, g in enumerate(groups):
        for v in g.tolist():
            labels[v] = k
    scorer = _Scorer(placement, cost, activation_bytes, stage_param_bytes, closed_tour)
    score, _, dp, pp = scorer(labels)
    return score, dp, pp


def aligned_pipeline_schedule(allocation, pipelines, n_microbatches: int) -> Schedule:
    """DT-FM's full-pipeline baseline on aligned pipelines: microbatch ``m`` on ``m % J``.

    Like :func:`full_pipeline_schedule`, whose pipeline ``j`` is the ``j``-th node of each stage
    by index, but pipeline ``j`` is ``pipelines[j]`` (io node, then one node per body stage).
    """
    pipe = np.asarray(pipelines)
    m = _integer(n_microbatches, "n_microbatches", 1)
    if pipe.ndim != 2 or pipe.shape[0] < 1 or pipe.shape[1] < 2:
        raise ValueError(f"pipelines must be [J, S + 1] node indices, got shape {pipe.shape}")
    which = pipe[np.arange(m) % pipe.shape[0]]
    stages = np.tile(np.arange(pipe.shape[1] - 1), (m, 1))
    schedule = Schedule(allocation, which[:, 0], stages, which[:, 1:])
    if (schedule.node_stage[which[:, 0]] != IO).any() \
            or (schedule.node_stage[which[:, 1:]] != stages).any():
        raise ValueError(f"pipelines must list an io node, then a node of each body stage in "
                         f"order; got {pipe.tolist()} for allocation {schedule.node_stage}")
    return schedule
