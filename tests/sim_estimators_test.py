"""Estimators against hand-computed schedules and closed forms."""

import math

import numpy as np
import pytest

from decjax.sim.cost import ComputeCost
from decjax.sim.estimators import (
    checkpoint_transfer,
    gossip_exchange,
    iteration_time,
    pipeline_makespan,
    ring_allreduce,
    stage_grid,
    tree_allreduce,
)
from decjax.sim.network import Network, place_explicit, place_round_robin

GIB = 2**30


def _world(n_nodes, *, hop_seconds=0.0, bandwidth_gibps=1e9):
    """Every node in its own region; a hop costs ``hop_seconds`` plus bytes/bandwidth."""
    net = Network.uniform(n_nodes, latency_ms=1000.0 * hop_seconds,
                          bandwidth_gibps=bandwidth_gibps)
    return place_round_robin(net, n_nodes)


def _cost(n_stages, forward=1.0, backward_factor=2.0):
    return ComputeCost(forward_s=np.full(n_stages, forward), backward_factor=backward_factor,
                       loss_factor=0.0)


def _makespan(n_stages, m, schedule, hop=0.0, max_in_flight=None):
    return pipeline_makespan(stage_grid(n_stages, 1), _world(n_stages, hop_seconds=hop),
                             _cost(n_stages), n_microbatches=m, activation_bytes=0.0,
                             schedule=schedule, max_in_flight=max_in_flight)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stage_pipeline_with_hops(schedule):
    # F=1, B=2, hop 0.5, M=2. GPipe: s0 F [0,1],[1,2]; s1 F [1.5,2.5],[2.5,3.5], B [3.5,5.5],
    # [5.5,7.5]; s0 B [6,8],[8,10]. 1F1B reaches 10 too (s1 B0 [2.5,4.5] before F1 [4.5,5.5]).
    estimate = _makespan(2, 2, schedule, hop=0.5)
    assert estimate.seconds == pytest.approx(10.0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("n_stages,m", [(2, 2), (3, 3), (3, 5), (4, 8)])
def test_uniform_pipeline_without_links_matches_closed_form(schedule, n_stages, m):
    """(M + S - 1)(F + B) for both orders when links are free."""
    assert _makespan(n_stages, m, schedule).seconds == pytest.approx((m + n_stages - 1) * 3.0)


def test_gpipe_and_1f1b_differ_with_slow_links():
    # S=2, M=3, F=1, B=2, hop 1 (worked by hand):
    # GPipe: s1 F [2,3],[3,4],[4,5]; s1 B [5,7],[7,9],[9,11]; s0 B [8,10],[10,12],[12,14].
    # 1F1B (s1 holds one microbatch): s1 F0 [2,3] B0 [3,5] F1 [5,6] B1 [6,8]; s0 B0 [6,8]
    # F2 [8,9] B1 [9,11]; s1 F2 [10,11] B2 [11,13]; s0 B2 [14,16].
    gpipe, one_f_one_b = _makespan(2, 3, "gpipe", hop=1.0), _makespan(2, 3, "1f1b", hop=1.0)
    assert gpipe.seconds == pytest.approx(14.0)
    assert one_f_one_b.seconds == pytest.approx(16.0)
    # GPipe's critical path: four forwards and four backwards (12 s) plus two hops.
    assert gpipe.breakdown == pytest.approx({"compute": 12.0, "communication": 2.0})


def test_gpipe_waves_respect_in_flight_cap():
    # One microbatch in flight: F0 [0,1] | s1 F0 [1,2] B0 [2,4] | s0 B0 [4,6], then again.
    assert _makespan(2, 2, "gpipe", max_in_flight=1).seconds == pytest.approx(12.0)


def test_breakdown_adds_up_and_bytes_count_every_hop():
    estimate = pipeline_makespan(stage_grid(3, 2), _world(6, hop_seconds=0.25), _cost(3),
                                 n_microbatches=4, activation_bytes=1000.0)
    assert sum(estimate.breakdown.values()) == pytest.approx(estimate.seconds)
    assert estimate.bytes == 2 * 2 * 2 * 4 * 1000.0  # replicas x directions x hops x microbatches
    assert 0.0 < estimate.idle_s < estimate.seconds


def test_slowest_replica_sets_the_makespan():
    far = Network(regions=("a", "b", "c"),
                  latency_s=np.array([[0.0, 0.01, 2.0], [0.01, 0.0, 2.0], [2.0, 2.0, 0.0]]),
                  bandwidth_bytes_per_s=np.full((3, 3), 1e18), name="far")
    # Replica 0 runs a -> b (10 ms hops), replica 1 runs a -> c (2 s hops).
    placement = place_explicit(far, ["a", "a", "b", "c"])
    est = pipeline_makespan([[0, 1], [2, 3]], placement, _cost(2), n_microbatches=1,
                            activation_bytes=0.0, schedule="gpipe")
    assert est.seconds == pytest.approx(1 + 2.0 + 1 + 2 + 2.0 + 2)


def test_ring_and_tree_allreduce_closed_forms():
    nbytes, latency = 8 * GIB, 0.01
    placement = _world(5, hop_seconds=latency, bandwidth_gibps=2.0)
    for n in (2, 4, 5):
        nodes = list(range(n))
        ring = ring_allreduce(nodes, placement, nbytes)
        assert ring.seconds == pytest.approx(2 * (n - 1) * (latency + nbytes / n / (2.0 * GIB)))
        assert ring.bytes == 2 * (n - 1) * nbytes
        tree = tree_allreduce(nodes, placement, nbytes)
        levels = math.ceil(math.log2(n))
        assert tree.seconds == pytest.approx(2 * levels * (latency + nbytes / (2.0 * GIB)))
        assert tree.bytes == 2 * (n - 1) * nbytes
    assert ring_allreduce([3], placement, nbytes).seconds == 0.0


def test_gossip_exchange_costs_one_hop():
    placement = _world(4, hop_seconds=0.05, bandwidth_gibps=1.0)
    est = gossip_exchange([(0, 1), (2, 3)], placement, GIB)
    assert est.seconds == pytest.approx(0.05 + 1.0)
    assert est.bytes == 4 * GIB


def test_checkpoint_upload_is_the_slowest_node():
    net = Network.gcp12()
    placement = place_round_robin(net, 3)  # Australia, Belgium, Canada
    est = checkpoint_transfer([0, 1, 2], placement, "Belgium", GIB)
    expected = max(net.transfer_seconds(r, "Belgium", GIB) for r in net.regions[:3])
    assert est.seconds == pytest.approx(expected)
    assert est.bytes == 3 * GIB


def test_iteration_adds_slowest_stage_allreduce():
    placement = _world(4, hop_seconds=0.0, bandwidth_gibps=1.0)
    est = iteration_time(stage_grid(2, 2), placement, _cost(2), n_microbatches=2,
                         activation_bytes=0.0, stage_param_bytes=[GIB, 2 * GIB],
                         schedule="gpipe")
    pipe = (2 + 2 - 1) * 3.0
    assert est.seconds == pytest.approx(pipe + 2 * 1 * (2 * GIB / 2) / GIB)
    assert est.breakdown["allreduce"] == pytest.approx(2.0)


def test_stragglers_are_seeded():
    cost = ComputeCost(forward_s=np.ones(3), straggler_sigma=0.5)
    run = lambda seed: pipeline_makespan(stage_grid(3, 1), _world(3), cost, n_microbatches=4,
                                         activation_bytes=0.0, seed=seed).seconds
    assert run(1) == run(1) and run(1) != run(2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule="zigzag"), "schedule='zigzag'"),
        (dict(n_microbatches=0), "n_microbatches=0"),
        (dict(max_in_flight=0), "max_in_flight=0"),
        (dict(stage_nodes=[[0], [0]]), "appears in stage_nodes twice"),
        (dict(stage_nodes=[[0], [9]]), "outside"),
    ],
)
def test_bad_pipeline_arguments(kwargs, match):
    args = dict(stage_nodes=[[0], [1]], placement=_world(2), cost=_cost(2), n_microbatches=2,
                activation_bytes=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipeline_makespan(**args)
