"""Simple SkipPipe schedules that obey every path rule: baselines and test fixtures.

An *allocation* is ``int[N]``: the body stage held by each node, ``IO`` (-1) for an io (data)
node, as in :attr:`Schedule.node_stage`. The network-aware scheduler builds on these.
"""

import numpy as np

from decjax.models import full_route
from decjax.skippipe.paths import IO, Schedule, _int_array, _integer, path_length


def stage_major_allocation(partition_sizes) -> np.ndarray:
    """``int32[N]`` allocation from the reference's ``partition_sizes``, io first.

    Args:
        partition_sizes: node count of io (the reference's stage 0), then of each body stage.

    Returns:
        Node stages numbered stage-major.

    Example::

        stage_major_allocation([2, 1, 1])  # [IO, IO, 0, 1]
    """
    sizes = [_integer(s, "partition_sizes entries", 1) for s in np.atleast_1d(partition_sizes)]
    if len(sizes) < 2:
        raise ValueError(f"partition_sizes must list io and >= 1 body stage, got {sizes}")
    return np.repeat(np.arange(IO, len(sizes) - 1, dtype=np.int32), sizes)


def _groups(allocation) -> list[np.ndarray]:
    """Nodes of io, then of each body stage; each must be non-empty."""
    node_stage = _int_array(allocation, "allocation", 1)
    groups = [np.flatnonzero(node_stage == s) for s in range(IO, int(node_stage.max()) + 1)]
    if node_stage.min() < IO or len(groups) < 2 or min(g.size for g in groups) == 0:
        raise ValueError("allocation must give every node IO (-1) or a body stage, with io "
                         f"and every stage 0..max held by some node; got {node_stage}")
    return groups


def full_pipeline_schedule(allocation, n_microbatches: int) -> Schedule:
    """DT-FM's no-skip baseline: sequential full pipelines (spec §2.1).

    Pipeline ``j`` is the ``j``-th node (by index) of io and of every body stage, for ``j``
    below the smallest stage size ``J``; microbatch ``m`` runs on pipeline ``m % J``, so extra
    io nodes idle, as in the reference. Every rule holds (``skip_ratio=0``) when every body
    stage has ``J`` nodes and ``J`` divides ``n_microbatches``.

    Args:
        allocation: ``int[N]`` body stage of each node, ``IO`` for io nodes.
        n_microbatches: microbatches ``M`` in the iteration.

    Returns:
        A :class:`Schedule` whose route is ``full_route(M, n_stages)``.

    Example::

        s = full_pipeline_schedule(stage_major_allocation([5, 3, 3, 3, 3, 3]), 30)
        s.route()  # == full_route(30, 5); pipelines 0, 1, 2 take 10 microbatches each
    """
    groups = _groups(allocation)
    m = _integer(n_microbatches, "n_microbatches", 1)
    pipe = np.arange(m) % min(g.size for g in groups)
    nodes = np.stack([g[pipe] for g in groups[1:]], axis=1)
    return Schedule(allocation, groups[0][pipe], full_route(m, len(groups) - 1), nodes)


def round_robin_schedule(allocation, n_microbatches: int, skip_ratio: float, *,
                         shift: int = 0) -> Schedule:
    """Balanced skipping without swaps: the skipped stages rotate across microbatches.

    Microbatch ``m`` visits, in order, the ``k = path_length(S, skip_ratio)`` body stages ``i``
    with ``((i + m + shift) % S) * k % S < k``: ``k`` of ``S`` spread evenly, so no jump
    exceeds ``ceil(S / k)`` (at most 3 for skip ratios up to 0.5), and each stage is visited
    ``k`` times in any ``S`` consecutive microbatches. The ``c``-th visit of a stage goes to its
    node ``c % size``; io nodes take contiguous blocks of microbatches. Every rule of
    :func:`validate` holds when ``S`` divides ``n_microbatches``, all body stages have ``R``
    nodes, ``R`` divides ``n_microbatches * k / S`` and ``ceil(S / k) <= max_jump``.

    Args:
        allocation: ``int[N]`` body stage of each node, ``IO`` for io nodes.
        n_microbatches: microbatches ``M`` in the iteration.
        skip_ratio: as in :func:`path_length`.
        shift: rotation offset; vary it across iterations so a data shard does not always
            skip the same stages (the reference's fixed paths, spec §2.7 and §7).

    Returns:
        A :class:`Schedule` of width ``k`` (no ``-1`` padding).

    Example::

        s = round_robin_schedule(stage_major_allocation([5, 3, 3, 3, 3, 3]), 15, 1 / 3)
        s.stage_visits(5), s.node_visits()[5:]  # 9 per body stage, 3 per body node
    """
    groups = _groups(allocation)
    n, m = len(groups) - 1, _integer(n_microbatches, "n_microbatches", 1)
    k, shift = path_length(n, skip_ratio), _integer(shift, "shift", 0)
    offsets = (np.arange(n)[None, :] + np.arange(m)[:, None] + shift) % n
    stages = np.nonzero(offsets * k % n < k)[1].reshape(m, k)  # row-major: ascending per row
    flat, nodes = stages.ravel(), np.empty(stages.size, np.int64)
    for s, members in enumerate(groups[1:]):
        hit = np.flatnonzero(flat == s)
        nodes[hit] = members[np.arange(hit.size) % members.size]
    io = groups[0][np.arange(m) * groups[0].size // m]
    return Schedule(allocation, io, stages, nodes.reshape(m, k))


def reference_plan(partitions, paths, microbatches_per_path: int) -> Schedule:
    """A :class:`Schedule` from the reference planner's output (gensyn-ai/skippipe's
    ``create_schedule.py`` JSON: its ``partitions`` and ``ca-paths``), to simulate it here.

    Args:
        partitions: node lists, io (data) nodes first, then each body stage's nodes.
        paths: one ``{node: next node}`` chain per agent, as the JSON's ``ca-paths`` values;
            agent ``a`` starts at ``partitions[0][a]`` (keys may be strings, as in JSON).
        microbatches_per_path: microbatches each agent's path carries (the reference sends
            ``3 // paths_in_coarsened * 2`` per agent).

    Returns:
        A schedule whose microbatches are grouped by io node in node order, as
        :func:`round_robin_schedule` and :func:`plan` assign them.
    """
    count = _integer(microbatches_per_path, "microbatches_per_path", 1)
    if isinstance(paths, dict):  # the JSON's {"0": chain, "1": chain, ...}
        paths = [paths[key] for key in sorted(paths, key=int)]
    if not partitions or len(paths) != len(partitions[0]):
        raise ValueError(f"partitions must list the io nodes first, one per path; got "
                         f"{len(partitions[0]) if partitions else 0} io nodes for {len(paths)} "
                         "paths")
    allocation = np.full(sum(len(p) for p in partitions), IO, np.int32)
    for stage, members in enumerate(partitions[1:]):
        allocation[list(members)] = stage
    rows = []
    for io, chain in zip(partitions[0], paths, strict=True):
        chain, node, hops = {int(a): int(b) for a, b in chain.items()}, int(io), []
        while node in chain and len(hops) < allocation.size:  # the cap stops a cyclic chain
            node = chain[node]
            hops.append(node)
        rows += [(int(io), hops)] * count
    rows.sort(key=lambda row: row[0])  # stable: each io node's microbatches stay together
    return Schedule(allocation, [io for io, _ in rows],
                    [[int(allocation[v]) for v in hops] for _, hops in rows],
                    [hops for _, hops in rows])
