"""SkipPipe path rules: each rule broken alone, builders valid on a grid, routes, bad input."""

import numpy as np
import pytest

from decjax.models import full_route
from decjax.skippipe import (
    IO,
    RULES,
    Schedule,
    ScheduleError,
    full_pipeline_schedule,
    legal_paths,
    path_length,
    path_violations,
    round_robin_schedule,
    stage_major_allocation,
    validate,
    violations,
)


def chain(n_stages):
    """One io node (0), then one node per body stage: node ``s + 1`` holds stage ``s``."""
    return [IO, *range(n_stages)]


def hops(stages):
    return [(s, s + 1) for s in stages]


# rule, schedule, validate kwargs, where the message must point
BROKEN = [
    ("io-endpoints", Schedule.from_paths(chain(2), [1], [hops([0, 1])]),
     dict(n_stages=2, skip_ratio=0), "microbatch 0: its io node 1"),
    ("path-length", Schedule.from_paths(chain(2), [0], [hops([0, 1])]),
     dict(n_stages=2, skip_ratio=1 / 3), "microbatch 0: visits 2 body stages, expected 1"),
    ("no-revisit", Schedule.from_paths(chain(2), [0, 0], [hops([0, 0]), hops([1, 1])]),
     dict(n_stages=2, skip_ratio=0), "microbatch 0, hop 1: stage 0 was already"),
    ("adjacent-swap", Schedule.from_paths(chain(3), [0], [hops([2, 0, 1])]),
     dict(n_stages=3, skip_ratio=0), "microbatch 0, hop 1: stage 0 is 2 below"),
    ("max-swaps", Schedule.from_paths(chain(6), [0], [hops([1, 0, 3, 2, 5, 4])]),
     dict(n_stages=6, skip_ratio=0), "microbatch 0, hop 5: swap number 3"),
    ("max-jump", Schedule.from_paths(chain(6), [0] * 3, [hops([0, 5]), hops([1, 2]),
                                                        hops([3, 4])]),
     dict(n_stages=6, skip_ratio=4 / 7), "microbatch 0, hop 1: stage 5 is 5 past"),
    ("hop-node", Schedule.from_paths(chain(2), [0], [[(0, 2), (1, 1)]]),
     dict(n_stages=2, skip_ratio=0), "microbatch 0, hop 0: node 2 holds stage 1, not stage 0"),
    ("stage-balance", Schedule.from_paths([IO, 0, 0, 1], [0] * 3, [[(0, 1)], [(0, 2)], [(1, 3)]]),
     dict(n_stages=2, skip_ratio=1 / 3), "stage 1 gets 1 visits but stage 0 gets 2"),
    ("node-balance", Schedule.from_paths([IO, 0, 0], [0, 0], [[(0, 1)], [(0, 1)]]),
     dict(n_stages=1, skip_ratio=0), "node 2 (stage 0) gets 0 visits but node 1"),
    ("stage-range", Schedule.from_paths(chain(3), [0], [hops([0, 1])]),
     dict(n_stages=2, skip_ratio=0), "node 3 holds stage 2"),
    ("stage-range", Schedule.from_paths(chain(3), [0, 0], [hops([0, 2]), hops([1, 2])]),
     dict(n_stages=2, skip_ratio=0), "microbatch 1, hop 1: stage 2 is not in [0, 2)"),
]


def test_every_rule_has_a_breaking_case():
    assert {rule for rule, *_ in BROKEN} == set(RULES)


@pytest.mark.parametrize("rule, schedule, kwargs, where", BROKEN,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BROKEN)])
def test_schedule_breaking_one_rule_names_it(rule, schedule, kwargs, where):
    found = violations(schedule, **kwargs)
    assert {v.split(":")[0] for v in found} == {rule}, found
    with pytest.raises(ScheduleError, match=rule) as info:
        validate(schedule, **kwargs)
    assert where in str(info.value)
    assert info.value.violations == found and isinstance(info.value, ValueError)


def test_limits_are_parameters():
    swaps = Schedule.from_paths(chain(6), [0], [hops([1, 0, 3, 2, 5, 4])])
    validate(swaps, n_stages=6, skip_ratio=0, max_swaps=3)
    jump = BROKEN[5][1]
    validate(jump, n_stages=6, skip_ratio=4 / 7, max_jump=5)


def test_violations_lists_every_problem_at_once():
    s = Schedule.from_paths(chain(3), [1], [hops([2, 0, 1])])
    rules = [v.split(":")[0] for v in violations(s, n_stages=3, skip_ratio=0)]
    assert rules == ["io-endpoints", "adjacent-swap"]


@pytest.mark.parametrize("stages", [[0, 4, 3], [3, 2, 4], [0, 2, 1], [3], [1, 0, 3, 2]])
def test_reference_paths_are_legal(stages):
    # 1->5->4, 4->3->5, 1->3->2 from the reference schedule.json (stage b here = b + 1 there)
    assert path_violations(stages) == []


@pytest.mark.parametrize("stages, kwargs, expected", [
    ([4], {}, "max-jump: hop 0: stage 4 is 5 past the frontier io; max_jump=4"),
    ([1, 0, 3, 2], dict(max_swaps=1), "max-swaps: hop 3: swap number 2 exceeds max_swaps=1"),
    ([0, 2, 1, 4, 3, 6, 5], {}, "max-swaps: hop 6: swap number 3 exceeds max_swaps=2"),
    ([3, 1, 2], {}, "adjacent-swap: hop 1: stage 1 is 2 below the frontier stage 3; a swap may "
                    "go only 1 below"),
])
def test_illegal_orders(stages, kwargs, expected):
    assert path_violations(stages, **kwargs) == [expected]


def test_legal_paths():
    paths = legal_paths(5, 3)
    # 10 stage sets in order, plus one adjacent swap at the front (6 sets) or at the back (6)
    assert len(paths) == 22 and {(0, 4, 3), (3, 2, 4), (0, 2, 1)} <= set(paths)
    assert legal_paths(4, 4, max_swaps=0) == [(0, 1, 2, 3)]
    assert (4, 5) not in legal_paths(6, 2) and (3, 5) in legal_paths(6, 2)


@pytest.mark.parametrize("n_stages, skip_ratio, k", [
    (5, 1 / 3, 3), (5, 0.33, 3), (3, 0.25, 2), (5, 0.5, 2),  # the reference's settings
    (4, 0, 4), (4, 0.25, 3), (4, 0.5, 2), (6, 0.25, 4), (7, 0.33, 4), (8, 0.5, 4), (1, 0, 1),
])
def test_path_length(n_stages, skip_ratio, k):
    assert path_length(n_stages, skip_ratio) == k


@pytest.mark.parametrize("n_stages", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("skip_ratio", [0, 0.25, 1 / 3, 0.5])
def test_round_robin_obeys_every_rule(n_stages, skip_ratio):
    k = path_length(n_stages, skip_ratio)
    for replicas in (1, 2, 3):
        for n_io, n_mb in ((1, n_stages * replicas), (3, 6 * n_stages * replicas)):
            alloc = stage_major_allocation([n_io] + [replicas] * n_stages)
            s = round_robin_schedule(alloc, n_mb, skip_ratio, shift=replicas)
            validate(s, n_stages=n_stages, skip_ratio=skip_ratio)
            route = s.route()
            assert route.shape == (n_mb, k) and route.dtype == np.int32
            assert (np.diff(route, axis=1) > 0).all()  # in order, no swaps, no padding
            assert (s.stage_visits(n_stages) == n_mb * k // n_stages).all()


def test_round_robin_reference_partition():
    s = round_robin_schedule(stage_major_allocation([5, 3, 3, 3, 3, 3]), 15, 1 / 3)
    assert s.stage_visits(5).tolist() == [9] * 5  # 60% of the microbatches, spec §2.2 rule 4
    assert s.node_visits().tolist() == [0] * 5 + [3] * 15
    assert s.io_node.tolist() == np.repeat(np.arange(5), 3).tolist()
    assert len({tuple(r) for r in s.route()[:3]}) == 3  # one data node, three stage sets


def test_round_robin_shift_rotates():
    alloc = stage_major_allocation([1, 1, 1, 1, 1, 1])
    a, b = (round_robin_schedule(alloc, 6, 1 / 3, shift=h).route() for h in (0, 1))
    np.testing.assert_array_equal(a[1:], b[:-1])


@pytest.mark.parametrize("sizes, n_mb", [([1, 1, 1, 1], 4), ([5, 3, 3, 3, 3, 3], 30),
                                         ([2, 2, 2, 2, 2, 2, 2, 2, 2], 8)])
def test_full_pipeline_round_trips_full_route(sizes, n_mb):
    s = full_pipeline_schedule(stage_major_allocation(sizes), n_mb)
    n_stages = len(sizes) - 1
    np.testing.assert_array_equal(s.route(), full_route(n_mb, n_stages))
    assert s.route().dtype == full_route(n_mb, n_stages).dtype
    validate(s, n_stages=n_stages, skip_ratio=0)


def test_full_pipeline_uses_aligned_pipelines():
    s = full_pipeline_schedule(stage_major_allocation([5, 3, 3, 3, 3, 3]), 30)
    assert s.path(4) == [(0, 6), (1, 9), (2, 12), (3, 15), (4, 18)]  # pipeline 1
    assert np.bincount(s.io_node).tolist() == [10, 10, 10]  # data nodes 3, 4 idle (DT-FM)


def test_route_padding():
    s = round_robin_schedule(stage_major_allocation([1, 1, 1, 1, 1, 1]), 5, 1 / 3)
    padded = s.route(width=5)
    np.testing.assert_array_equal(padded[:, :3], s.route())
    assert (padded[:, 3:] == -1).all() and padded.dtype == np.int32
    short = Schedule.from_paths(chain(3), [0, 0], [hops([0, 1, 2]), hops([1])])
    np.testing.assert_array_equal(short.route(), [[0, 1, 2], [1, -1, -1]])
    np.testing.assert_array_equal(short.route(width=4), [[0, 1, 2, -1], [1, -1, -1, -1]])
    with pytest.raises(ValueError, match=r"width must be an integer >= 3"):
        s.route(width=2)


def test_describe_table():
    s = Schedule.from_paths([IO, 0, 1, 2], [0, 0], [[(0, 1), (2, 3)], [(1, 2), (0, 1)]])
    assert str(s) == s.describe() == "\n".join([
        "Schedule: 2 microbatches, 4 nodes, route width 2",
        "allocation  io: 0 | stage 0: 1 | stage 1: 2 | stage 2: 3",
        "  mb    io  path (stage@node)",
        "   0     0  0@1  2@3  -> 0",
        "   1     0  1@2  0@1  -> 0",
    ])


def test_stage_major_allocation():
    assert stage_major_allocation([2, 1, 3]).tolist() == [IO, IO, 0, 1, 1, 1]


@pytest.mark.parametrize("call, message", [
    (lambda: path_length(0, 0.25), r"n_stages must be an integer >= 1"),
    (lambda: path_length(True, 0.25), r"n_stages must be an integer >= 1"),
    (lambda: path_length(5, 1.0), r"skip_ratio must be a number in \[0, 0.7500\]"),
    (lambda: path_length(5, -0.1), r"skip_ratio must be a number in \[0, "),
    (lambda: path_length(1, 0.33), r"skip_ratio .* for n_stages=1 \(at least one"),
    (lambda: path_length(5, "0.3"), r"skip_ratio must be a number"),
    (lambda: path_violations([0], max_swaps=-1), r"max_swaps must be an integer >= 0"),
    (lambda: path_violations([0], max_jump=0), r"max_jump must be an integer >= 1"),
    (lambda: validate("plan", n_stages=2, skip_ratio=0), r"schedule must be a Schedule"),
    (lambda: Schedule([IO, 0], [0, 0], [[0]], [[1]]), r"io_node must be \[M\]"),
    (lambda: Schedule([IO, 0], [0], [[0, 0]], [[1]]), r"stages and nodes \[M, P\]"),
    (lambda: Schedule([IO, 0], [0], [[0.0]], [[1]]), r"stages must be a non-empty 2-D integer"),
    (lambda: Schedule([IO, 0], [2], [[0]], [[1]]), r"io_node must be in \[0, 2\)"),
    (lambda: Schedule([IO, 0], [0], [[0]], [[5]]), r"nodes in \[-1, 2\)"),
    (lambda: Schedule([-2, 0], [0], [[0]], [[1]]), r"node_stage must hold stages >= 0 or IO"),
    (lambda: Schedule([IO, 0], [0], [[-1, 0]], [[-1, 1]]), r"only after a path's last hop"),
    (lambda: Schedule([IO, 0], [0], [[0, -1]], [[1, 1]]), r"-1 at the same slots"),
    (lambda: stage_major_allocation([3]), r"partition_sizes must list io and >= 1 body"),
    (lambda: stage_major_allocation([2, 0]), r"partition_sizes entries must be an integer >= 1"),
    (lambda: round_robin_schedule([IO, 1], 2, 0), r"allocation must give every node IO"),
    (lambda: round_robin_schedule([0, 1], 2, 0), r"allocation must give every node IO"),
    (lambda: round_robin_schedule([IO, 0], 0, 0), r"n_microbatches must be an integer >= 1"),
    (lambda: round_robin_schedule([IO, 0], 1, 0, shift=-1), r"shift must be an integer >= 0"),
    (lambda: full_pipeline_schedule([IO, 0], 1.5), r"n_microbatches must be an integer >= 1"),
])
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
