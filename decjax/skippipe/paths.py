"""SkipPipe path rules: one iteration's :class:`Schedule` and the rules it must obey.

A SkipPipe microbatch (spec skippipe.md §2.1) starts on an *io node* (the reference's stage 0:
embedding, head and loss), visits a fixed number of body stages, each on a node holding that
stage, in increasing order except for a few adjacent swaps, and returns to the same io node for
the loss; backward retraces the path. Body stage ``b`` is the reference's stage ``b + 1``, so
the reference's ``S`` stages are ``n_stages + 1`` here.

The rules, as the reference planner enforces them (spec §2.2; [code] read from its A* and CBS,
[inferred] a reading of the code, not stated by the authors), are listed in :data:`RULES`.
"""

import dataclasses
import itertools
import math

import numpy as np

IO = -1  # ``node_stage`` of an io (stage-0, data) node
RULES = {  # name -> meaning [evidence, spec section]; the frontier is the highest stage so far
    "stage-range": "stage indices lie in [0, n_stages); IO (-1) marks io nodes",
    "io-endpoints": "a microbatch's io_node, where it starts and (implicitly) ends, is an io "
                    "node [code, 2.2.1]",
    "path-length": "every path visits path_length(n_stages, skip_ratio) stages [code, 2.2.2]",
    "no-revisit": "no body stage is visited twice on one path [code, 2.2.2]",
    "adjacent-swap": "a hop below the frontier lands exactly one below it [code, 2.2.3]",
    "max-swaps": "at most max_swaps hops below the frontier per path [code, 2.2.3]",
    "max-jump": "a hop lands at most max_jump past the frontier, which starts at io [code, 2.2.3]",
    "hop-node": "each hop's node holds that hop's stage under the allocation [code, 2.4]",
    "stage-balance": "every body stage gets the same number of visits [inferred, 2.2.4]",
    "node-balance": "every body node gets the same number of visits [inferred, 2.2.4]",
}


class ScheduleError(ValueError):
    """A schedule breaks path rules; ``violations`` lists every problem, rule name first."""

    def __init__(self, violations: list[str]):
        super().__init__("\n".join(violations))
        self.violations = violations


def _integer(value, name: str, low: int) -> int:
    """``value`` as an int >= ``low``; bools and non-integers are rejected."""
    n = None if isinstance(value, bool) else getattr(value, "__index__", lambda: None)()
    if n is None or n < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return n


def _int_array(value, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != ndim or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty {ndim}-D integer array, got {a!r}")
    out = a.astype(np.int32)
    out.flags.writeable = False
    return out


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields have no scalar ==
class Schedule:
    """One iteration's SkipPipe plan: the node allocation and every microbatch's path.

    Microbatch ``m`` leaves io node ``io_node[m]``, visits body stage ``stages[m, h]`` on node
    ``nodes[m, h]`` for hops ``h = 0, 1, ...`` and returns to ``io_node[m]`` (implicitly, as in
    the reference's path chains, spec §2.7). Slots after the last hop hold ``-1`` in both arrays.

    Attributes:
        node_stage: ``int32[N]`` body stage held by each node; ``IO`` (-1) for io nodes.
        io_node: ``int32[M]`` io (data) node where each microbatch starts and ends.
        stages: ``int32[M, P]`` body stage of each hop; ``-1`` after the path ends.
        nodes: ``int32[M, P]`` node of each hop; ``-1`` after the path ends.

    Example::

        s = Schedule.from_paths([IO, 0, 1, 2], io_node=[0, 0],
                                paths=[[(0, 1), (2, 3)], [(1, 2), (0, 1)]])
        print(s)           # allocation, then one row per microbatch
        route = s.route()  # [[0, 2], [1, 0]] for StagedLlama.forward
    """

    node_stage: np.ndarray
    io_node: np.ndarray
    stages: np.ndarray
    nodes: np.ndarray

    def __post_init__(self):
        for name, ndim in (("node_stage", 1), ("io_node", 1), ("stages", 2), ("nodes", 2)):
            object.__setattr__(self, name, _int_array(getattr(self, name), name, ndim))
        n, (m, _) = self.node_stage.size, self.stages.shape
        if self.node_stage.min() < IO:
            raise ValueError(f"node_stage must hold stages >= 0 or IO (-1), got {self.node_stage}")
        if self.io_node.shape != (m,) or self.nodes.shape != self.stages.shape:
            raise ValueError(f"io_node must be [M], stages and nodes [M, P]; got shapes "
                             f"{self.io_node.shape}, {self.stages.shape}, {self.nodes.shape}")
        if min(self.io_node.min(), self.nodes.min() + 1, self.stages.min() + 1) < 0 \
                or max(self.io_node.max(), self.nodes.max()) >= n:
            raise ValueError(f"io_node must be in [0, {n}), nodes in [-1, {n}), stages >= -1; got "
                             f"{self.io_node}, {self.nodes}, {self.stages}")
        pad = self.stages < 0
        if (pad != (self.nodes < 0)).any() or (pad[:, :-1] & ~pad[:, 1:]).any():
            raise ValueError("stages and nodes must hold -1 at the same slots, and only after "
                             f"a path's last hop; got stages={self.stages}, nodes={self.nodes}")

    @classmethod
    def from_paths(cls, node_stage, io_node, paths) -> "Schedule":
        """A schedule from per-microbatch hop lists ``[(stage, node), ...]``, padded with -1."""
        table = np.full((len(paths), max([len(p) for p in paths] + [1]), 2), -1, np.int64)
        for m, path in enumerate(paths):
            table[m, :len(path)] = np.reshape(path, (-1, 2))
        return cls(node_stage, io_node, table[..., 0], table[..., 1])

    @property
    def n_microbatches(self) -> int:
        return int(self.stages.shape[0])

    @property
    def width(self) -> int:
        """Route width ``P``: the number of hop slots per microbatch."""
        return int(self.stages.shape[1])

    def path_lengths(self) -> np.ndarray:
        """``int[M]`` number of body stages each microbatch visits."""
        return (self.stages >= 0).sum(axis=1)

    def path(self, m: int) -> list[tuple[int, int]]:
        """Microbatch ``m``'s hops as ``(stage, node)`` pairs, in order."""
        k = int(self.path_lengths()[m])
        return list(zip(self.stages[m, :k].tolist(), self.nodes[m, :k].tolist(), strict=True))

    def route(self, width: int | None = None) -> np.ndarray:
        """``int32[M, width]`` route for ``StagedLlama.forward``: stages, then ``-1`` padding.

        ``-1`` is a skip slot (activations pass through). The width is static under ``jit``;
        ``width=n_stages`` gives a skip schedule the full route's shape, e.g. to interleave full
        passes (spec §2.2 rule 5), at the cost of a discarded stage per padded slot unless
        ``skip_by_branching=True``. ``width`` defaults to :attr:`width`.
        """
        longest = int(self.path_lengths().max())
        width = self.width if width is None else _integer(width, "width", longest)
        out = np.full((self.n_microbatches, width), -1, np.int32)
        keep = min(width, self.width)
        out[:, :keep] = self.stages[:, :keep]
        return out

    def stage_visits(self, n_stages: int) -> np.ndarray:
        """``int[n_stages]`` microbatch visits per body stage (out-of-range stages ignored)."""
        s = self.stages[(self.stages >= 0) & (self.stages < n_stages)]
        return np.bincount(s, minlength=n_stages)

    def node_visits(self) -> np.ndarray:
        """``int[N]`` microbatch visits per node; an io node's own microbatches are not hops."""
        return np.bincount(self.nodes[self.nodes >= 0], minlength=self.node_stage.size)

    def describe(self) -> str:
        """Table of the allocation, then one row per microbatch: ``stage@node`` hops."""
        groups = [f"{'io' if s == IO else f'stage {s}'}: "
                  + " ".join(map(str, np.flatnonzero(self.node_stage == s)))
                  for s in np.unique(self.node_stage)]
        lines = [f"Schedule: {self.n_microbatches} microbatches, {self.node_stage.size} nodes, "
                 f"route width {self.width}", "allocation  " + " | ".join(groups),
                 f"{'mb':>4}  {'io':>4}  path (stage@node)"]
        for m, io in enumerate(self.io_node):
            hops = "  ".join(f"{s}@{n}" for s, n in self.path(m))
            lines.append(f"{m:>4}  {io:>4}  {hops}  -> {io}")
        return "\n".join(lines)

    __str__ = describe


def path_length(n_stages: int, skip_ratio: float) -> int:
    """Body stages per path: ``n_stages - round(skip_ratio * (n_stages + 1))``.

    The reference's skip ratio counts all ``S = n_stages + 1`` stages, io included: ``skip =
    (S - PAT_LENGTH) / S`` with ``PAT_LENGTH - 1`` body stages per path (spec §2.2 rule 2).
    The spec gives only that formula; rounding ``skip_ratio * S`` to the nearest integer, ties
    towards skipping fewer, is this module's convention (0.33 and 1/3 agree; ``n_stages=4,
    skip_ratio=0.5`` keeps 2 of 4).

    Args:
        n_stages: number of body stages (the reference's stages 1..S-1).
        skip_ratio: fraction of all ``S`` stages each microbatch skips, in ``[0, 1)``.

    Returns:
        The path length ``k``, ``1 <= k <= n_stages``.

    Example::

        path_length(5, 1 / 3)  # 3: S=6, PAT_LENGTH=4 (the GCP runs)
        path_length(3, 0.25)   # 2: S=4, PAT_LENGTH=3 (v1)
    """
    n = _integer(n_stages, "n_stages", 1)
    highest = (n - 0.5) / (n + 1)  # largest ratio that still keeps one body stage
    if isinstance(skip_ratio, bool) or not isinstance(skip_ratio, int | float | np.number) \
            or not 0 <= skip_ratio <= highest:
        raise ValueError(f"skip_ratio must be a number in [0, {highest:.4f}] for n_stages={n} "
                         f"(at least one body stage kept), got {skip_ratio!r}")
    return n - math.ceil(skip_ratio * (n + 1) - 0.5 - 1e-9)


def _order_problems(stages, max_swaps: int, max_jump: int):
    """Yields ``(rule, hop, detail)`` for the ordering rules of one path's stage sequence."""
    frontier, swaps, seen = IO, 0, set()
    for hop, s in enumerate(int(s) for s in stages):
        if s in seen:
            yield "no-revisit", hop, f"stage {s} was already visited"
            continue
        seen.add(s)
        where = "io" if frontier == IO else f"stage {frontier}"
        if s < frontier:
            swaps += 1
            if frontier - s > 1:
                yield "adjacent-swap", hop, (f"stage {s} is {frontier - s} below the frontier "
                                             f"{where}; a swap may go only 1 below")
            if swaps == max_swaps + 1:
                yield "max-swaps", hop, f"swap number {swaps} exceeds max_swaps={max_swaps}"
        elif s - frontier > max_jump:
            yield "max-jump", hop, (f"stage {s} is {s - frontier} past the frontier {where}; "
                                    f"max_jump={max_jump}")
        frontier = max(frontier, s)


def path_violations(stages, *, max_swaps: int = 2, max_jump: int = 4) -> list[str]:
    """``no-revisit``/``adjacent-swap``/``max-swaps``/``max-jump`` problems of one path.

    Args:
        stages: body stages of a path or path prefix, in order (no ``-1``).
        max_swaps, max_jump: as in :func:`validate`.

    Returns:
        One ``"rule: hop h: detail"`` string per problem; empty if the order is legal.

    Example::

        path_violations([0, 4, 3])  # []  (the reference's 1->5->4)
        path_violations([2, 0, 1])  # ['adjacent-swap: hop 1: stage 0 is 2 below ...']
    """
    max_swaps, max_jump = _integer(max_swaps, "max_swaps", 0), _integer(max_jump, "max_jump", 1)
    return [f"{rule}: hop {h}: {d}" for rule, h, d in _order_problems(stages, max_swaps, max_jump)]


def legal_paths(n_stages: int, length: int, *, max_swaps: int = 2,
                max_jump: int = 4) -> list[tuple[int, ...]]:
    """Every legal visiting order of ``length`` of ``n_stages`` body stages (spec §7)."""
    n, k = _integer(n_stages, "n_stages", 1), _integer(length, "length", 1)
    return [p for p in itertools.permutations(range(n), k)
            if not path_violations(p, max_swaps=max_swaps, max_jump=max_jump)]


def _microbatch_problems(sched: Schedule, m: int, n: int, k: int, limits) -> list[str]:
    io, hops = int(sched.io_node[m]), sched.path(m)
    out = []
    if sched.node_stage[io] != IO:
        out.append(f"io-endpoints: microbatch {m}: its io node {io} holds body stage "
                   f"{sched.node_stage[io]}, not io (stage 0)")
    if len(hops) != k:
        out.append(f"path-length: microbatch {m}: visits {len(hops)} body stages, expected {k}")
    for h, (s, node) in enumerate(hops):
        if s >= n:
            out.append(f"stage-range: microbatch {m}, hop {h}: stage {s} is not in [0, {n})")
        if sched.node_stage[node] != s:
            held = "io" if sched.node_stage[node] == IO else f"stage {sched.node_stage[node]}"
            out.append(f"hop-node: microbatch {m}, hop {h}: node {node} holds {held}, not "
                       f"stage {s}")
    return out + [f"{rule}: microbatch {m}, hop {h}: {d}"
                  for rule, h, d in _order_problems([s for s, _ in hops], *limits)]


def _balance_problems(sched: Schedule, n: int) -> list[str]:
    out = []
    per_stage = sched.stage_visits(n)
    if per_stage.min() != per_stage.max():
        lo, hi = int(per_stage.argmin()), int(per_stage.argmax())
        out.append(f"stage-balance: stage {lo} gets {per_stage[lo]} visits but stage {hi} gets "
                   f"{per_stage[hi]}; every body stage must get the same number")
    body = np.flatnonzero((sched.node_stage >= 0) & (sched.node_stage < n))
    per_node = sched.node_visits()[body]
    if body.size and per_node.min() != per_node.max():
        lo, hi = body[per_node.argmin()], body[per_node.argmax()]
        out.append(f"node-balance: node {lo} (stage {sched.node_stage[lo]}) gets {per_node.min()} "
                   f"visits but node {hi} (stage {sched.node_stage[hi]}) gets {per_node.max()}; "
                   "every body node must get the same number")
    return out


def violations(schedule: Schedule, *, n_stages: int, skip_ratio: float, max_swaps: int = 2,
               max_jump: int = 4) -> list[str]:
    """Every rule a schedule breaks, each as ``"rule: where: detail"``; see :func:`validate`."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    k = path_length(n_stages, skip_ratio)
    limits = (_integer(max_swaps, "max_swaps", 0), _integer(max_jump, "max_jump", 1))
    out = [f"stage-range: node {v} holds stage {s}, not in [0, {n_stages}) or IO"
           for v, s in enumerate(schedule.node_stage) if s >= n_stages]
    for m in range(schedule.n_microbatches):
        out += _microbatch_problems(schedule, m, n_stages, k, limits)
    return out + _balance_problems(schedule, n_stages)


def validate(schedule: Schedule, *, n_stages: int, skip_ratio: float, max_swaps: int = 2,
             max_jump: int = 4) -> None:
    """Raises :class:`ScheduleError` unless ``schedule`` obeys every rule in :data:`RULES`.

    The [inferred] balance rules: the reference only caps visits per stage (``|stage| *
    memory``) and per body node (``memory``); they force exact balance because its total visits
    equal the total capacity (spec §2.2 rule 4). Node balance counts body nodes only, so with
    stage balance it needs equal body stage sizes, as in every reference partition.

    Args:
        schedule: the plan to check.
        n_stages: number of body stages.
        skip_ratio: fraction of all ``n_stages + 1`` stages skipped; see :func:`path_length`.
        max_swaps: hops allowed below the frontier per path (reference 2; v1 1).
        max_jump: how far past the frontier a hop may land (reference 4).

    Raises:
        ScheduleError: its message and ``violations`` name each broken rule and where.

    Example::

        alloc = stage_major_allocation([5, 3, 3, 3, 3, 3])  # the GCP partition
        validate(round_robin_schedule(alloc, 15, 1 / 3), n_stages=5, skip_ratio=1 / 3)
        # ScheduleError("path-length: microbatch 0: visits 3 body stages, expected 5\n...")
        validate(round_robin_schedule(alloc, 15, 1 / 3), n_stages=5, skip_ratio=0)
    """
    problems = violations(schedule, n_stages=n_stages, skip_ratio=skip_ratio,
                          max_swaps=max_swaps, max_jump=max_jump)
    if problems:
        raise ScheduleError(problems)
