"""SkipPipe makespan simulator: hand-computed tiny cases, 1F1B parity, determinism, bad input."""

import numpy as np
import pytest

from decjax.sim import ComputeCost, Network, Placement, pipeline_makespan
from decjax.skippipe import (
    IO,
    KINDS,
    Schedule,
    baseline_makespan,
    full_pipeline_schedule,
    makespan,
    round_robin_schedule,
    simulate,
    stage_major_allocation,
)

HALF_GIB = 2**29
LINK = 0.75  # seconds per hop below: 0.5 GiB at 1 GiB/s, no latency, 0.25 s overhead


def uniform(n_nodes: int) -> Placement:
    net = Network.uniform(1, latency_ms=0, bandwidth_gibps=1, hop_overhead_s=0.25)
    return Placement(net, np.zeros(n_nodes, np.int64))


def cost(*forward, loss_factor=0.25) -> ComputeCost:
    return ComputeCost(forward_s=np.array(forward, float), loss_factor=loss_factor)


def run(schedule, forward=(1.0, 1.0), **options):
    options = {"io_forward_s": 1.0, **options}
    place = uniform(schedule.node_stage.size)
    return (simulate(schedule, place, cost(*forward), activation_bytes=HALF_GIB, **options),
            makespan(schedule, place, cost(*forward), activation_bytes=HALF_GIB, **options))


def test_one_microbatch_through_two_stages():
    s = Schedule.from_paths([IO, 0, 1], [0], [[(0, 1), (1, 2)]])
    tl, est = run(s, forward=(1.0, 2.0), io_forward_s=0.5)
    # io 0.5, f0 1, f1 2, loss 0.375 (= 0.25 x mean forward 1.5), b1 3, b0 1.5, io 0.75; 6 hops
    assert est.seconds == 9.125 + 6 * LINK == 13.625
    assert est.bytes == 6 * HALF_GIB
    assert est.breakdown == {"compute": 9.125, "communication": 4.5, "wait": 0.0}
    assert [KINDS[k] for k in tl.kind] == ["io_forward", "forward", "forward", "loss",
                                           "backward", "backward", "io_backward"]
    assert tl.node.tolist() == [0, 1, 2, 0, 2, 1, 0]
    assert tl.stage.tolist() == [IO, 0, 1, IO, 1, 0, IO]
    assert tl.start_s.tolist() == [0.0, 1.25, 3.0, 5.75, 6.875, 10.625, 12.875]
    assert (tl.wait_s() == 0).all()
    assert est.idle_s == pytest.approx(13.625 - 9.125 / 3)


@pytest.mark.parametrize("gap", [0.0, 0.125])
def test_two_microbatches_colliding_on_one_node_queue(gap):
    # io nodes 0 and 1 both send to node 2 at t = 1.75; microbatch 1 waits for microbatch 0
    s = Schedule.from_paths([IO, IO, 0], [0, 1], [[(0, 2)], [(0, 2)]])
    tl, est = run(s, forward=(1.0,), task_gap_s=gap)
    fwd = tl.kind == KINDS.index("forward")
    assert tl.ready_s[fwd].tolist() == [1.75, 1.75]
    assert tl.start_s[fwd].tolist() == [1.75, 2.75 + gap]
    # microbatch 1: io 1, wait 1 + gap, f 1, loss 0.25, backward behind microbatch 0's (ends at
    # 6), b 1.5, io 1.5; microbatch 0 ends at 8.25 + gap
    assert est.seconds == 9.75 + gap
    assert est.breakdown["compute"] == 5.25 and est.breakdown["communication"] == 4 * LINK
    assert est.breakdown["wait"] == pytest.approx(1.5 + gap)
    apart = Schedule.from_paths([IO, IO, 0, 0], [0, 1], [[(0, 2)], [(0, 3)]])
    assert run(apart, forward=(1.0,), task_gap_s=gap)[1].seconds == 8.25


def test_swap_path_retraces_and_avoids_a_collision():
    swap = Schedule.from_paths([IO, 0, 1], [0], [[(1, 2), (0, 1)]])
    tl, est = run(swap)
    assert tl.node.tolist() == [0, 2, 1, 0, 1, 2, 0]
    assert tl.stage.tolist() == [IO, 1, 0, IO, 0, 1, IO]
    alone = est.seconds
    assert alone == 1 + 1 + 1 + 0.25 + 1.5 + 1.5 + 1.5 + 6 * LINK
    # two io nodes: in order, both microbatches want stage 0 first; swapped, they never meet
    in_order = Schedule.from_paths([IO, IO, 0, 1], [0, 1], [[(0, 2), (1, 3)]] * 2)
    swapped = Schedule.from_paths([IO, IO, 0, 1], [0, 1], [[(0, 2), (1, 3)], [(1, 3), (0, 2)]])
    assert run(swapped)[1].seconds == alone
    assert run(in_order)[1].seconds > alone


def test_skip_path_is_faster_by_the_skipped_stage_and_hop():
    alloc = [IO, 0, 1, 2]
    full = Schedule.from_paths(alloc, [0], [[(0, 1), (1, 2), (2, 3)]])
    skip = Schedule.from_paths(alloc, [0], [[(0, 1), (2, 3)]])
    forward = (1.0, 2.0, 1.0)  # loss = 0.25 x 4 / 3 in both
    t_full, t_skip = run(full, forward)[1], run(skip, forward)[1]
    assert t_full.seconds - t_skip.seconds == pytest.approx(2.0 + 3.0 + 2 * LINK)
    assert t_full.bytes - t_skip.bytes == 2 * HALF_GIB


def test_memory_cap_holds_a_forward_until_a_backward_frees_a_slot():
    s = Schedule.from_paths([IO, 0], [0, 0], [[(0, 1)], [(0, 1)]])
    tl, est = run(s, forward=(1.0,), memory=1)
    injections = tl.start_s[tl.kind == KINDS.index("io_forward")]
    first_done = tl.end_s[(tl.microbatch == 0) & (tl.kind == KINDS.index("io_backward"))][0]
    assert injections.tolist() == [0.0, first_done] and est.seconds == 2 * first_done
    assert run(s, forward=(1.0,), memory=2)[1].seconds < est.seconds


def test_fifo_serves_arrivals_in_order_and_backward_priority_does_not():
    # 4 microbatches on one body node: the 4th forward (queued since 0.75) and the 1st backward
    # (arrives at 3.5) both wait for the node to finish the 3rd forward at 3.75
    s = Schedule.from_paths([IO, 0], [0] * 4, [[(0, 1)]] * 4)

    def order(priority):
        tl = run(s, forward=(1.0,), io_forward_s=0.0, memory=None, priority=priority)[0]
        on_node = tl.node == 1
        return "".join(KINDS[k][0] for k in tl.kind[on_node][np.argsort(tl.start_s[on_node])])

    assert order("fifo") == "ffffbbbb"
    assert order("backward") == "fffbbbfb"


def chain_placement(n_replicas, n_stages, seed):
    """Every node in its own region; io nodes reach everyone for free, body links have latency."""
    n = n_replicas * (n_stages + 1)
    latency = np.random.default_rng(seed).uniform(0.1, 2.0, (n, n))
    latency = (latency + latency.T) / 2
    latency[:n_replicas, :] = latency[:, :n_replicas] = 0.0
    net = Network(tuple(f"r{i}" for i in range(n)), latency, np.full((n, n), 1e9))
    return Placement(net, np.arange(n))


@pytest.mark.parametrize("n_replicas, n_stages, per_replica, seed", [
    (1, 1, 3, 0), (1, 3, 1, 1), (1, 3, 5, 2), (2, 3, 4, 3), (3, 4, 6, 4), (2, 2, 8, 5)])
def test_full_pipeline_matches_pipeline_makespan_1f1b(n_replicas, n_stages, per_replica, seed):
    alloc = stage_major_allocation([n_replicas] + [n_replicas] * n_stages)
    sched = full_pipeline_schedule(alloc, n_replicas * per_replica)
    place = chain_placement(n_replicas, n_stages, seed)
    c = ComputeCost(forward_s=np.random.default_rng(seed).uniform(0.5, 2.0, n_stages),
                    loss_factor=0.0)
    memory = np.concatenate([np.full(n_replicas, 99), np.repeat(n_stages - np.arange(n_stages),
                                                                 n_replicas)])
    ours = makespan(sched, place, c, activation_bytes=0, io_forward_s=0.0, memory=memory,
                    priority="backward")
    grid = [np.flatnonzero(alloc == s).tolist() for s in range(n_stages)]
    theirs = pipeline_makespan(grid, place, c, n_microbatches=per_replica, activation_bytes=0,
                               schedule="1f1b")
    assert ours.seconds == pytest.approx(theirs.seconds, rel=1e-12)


def reference_instance(n_microbatches=30):
    alloc = stage_major_allocation([5, 3, 3, 3, 3, 3])
    place = Placement(Network.gcp12(hop_overhead_s=0.35), np.arange(20) % 12)
    return (round_robin_schedule(alloc, n_microbatches, 1 / 3), place,
            ComputeCost.reference(5, layers_per_stage=4, samples_per_microbatch=8))


def test_deterministic_and_seeded():
    sched, place, c = reference_instance()
    a = simulate(sched, place, c, activation_bytes=2**25, task_gap_s=0.13)
    b = simulate(sched, place, c, activation_bytes=2**25, task_gap_s=0.13)
    for field in ("node", "kind", "ready_s", "start_s", "end_s"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    noisy = ComputeCost(forward_s=c.forward_s, straggler_sigma=0.3)
    runs = [makespan(sched, place, noisy, activation_bytes=2**25, seed=s).seconds
            for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]


def test_baseline_is_full_pipelines_over_the_same_allocation():
    sched, place, c = reference_instance()
    base = baseline_makespan(sched, place, c, activation_bytes=2**25)
    full = full_pipeline_schedule(sched.node_stage, 30)
    assert base == makespan(full, place, c, activation_bytes=2**25)
    assert base.bytes == 30 * 2 * 6 * 2**25
    skip = makespan(sched, place, c, activation_bytes=2**25)
    assert skip.bytes == 30 * 2 * 4 * 2**25 and skip.seconds < base.seconds
    assert sum(skip.breakdown.values()) == pytest.approx(skip.seconds)


def test_deadlock_is_reported():
    # each microbatch holds its first node's only slot and waits for the other's
    s = Schedule.from_paths([IO, IO, 0, 1], [0, 1], [[(0, 2), (1, 3)], [(1, 3), (0, 2)]])
    with pytest.raises(ValueError, match=r"memory=1 deadlocks .* microbatches \[0, 1\]"):
        run(s, forward=(1.0, 1.0), memory=1)


ONE = Schedule.from_paths([IO, 0, 1], [0], [[(0, 1), (1, 2)]])


@pytest.mark.parametrize("schedule, n_nodes, kwargs, match", [
    ("not a schedule", 3, {}, "schedule must be a Schedule"),
    (ONE, 4, {}, "placement places 4 nodes but schedule.node_stage has 3"),
    (Schedule.from_paths([IO, 0, 2], [0], [[(0, 1)]]), 3, {}, "cost covers 2 body stages"),
    (Schedule.from_paths([IO, 0, 1], [0], [[(0, 2)]]), 3, {},
     "microbatch 0, hop 0 runs stage 0 on node 2, which holds stage 1"),
    (Schedule.from_paths([IO, 0, 1], [1], [[(1, 2)]]), 3, {},
     "microbatch 0 starts on node 1, which holds body stage 0"),
    (ONE, 3, dict(memory=0), "memory must be None, an integer >= 1, or 3 integers"),
    (ONE, 3, dict(memory=[3, 3]), "memory must be"),
    (ONE, 3, dict(memory=True), "memory must be"),
    (ONE, 3, dict(priority="lifo"), "priority must be one of"),
    (ONE, 3, dict(release_s=[0.0, 1.0]), "release_s must be None or 1 finite"),
    (ONE, 3, dict(release_s=[-1.0]), "release_s must be"),
    (ONE, 3, dict(activation_bytes=-1), "activation_bytes must be"),
    (ONE, 3, dict(task_gap_s=float("nan")), "task_gap_s must be"),
    (ONE, 3, dict(io_forward_s=-1.0), "io_forward_s must be"),
])
def test_bad_arguments_are_named(schedule, n_nodes, kwargs, match):
    kwargs = {"activation_bytes": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        makespan(schedule, uniform(n_nodes), cost(1.0, 1.0), **kwargs)


def test_bad_placement_and_cost_are_named():
    with pytest.raises(ValueError, match="placement must be a Placement"):
        makespan(ONE, "here", cost(1.0, 1.0), activation_bytes=1.0)
    with pytest.raises(ValueError, match="cost must be a ComputeCost"):
        makespan(ONE, uniform(3), None, activation_bytes=1.0)
