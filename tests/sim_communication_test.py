"""Communication accounting of data parallel, DiLoCo and NoLoCo, by hand and on gcp12."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decjax.optim import replicas
from decjax.sim import (
    Network,
    noloco_groups,
    place_round_robin,
    run_communication,
    sync_cost,
    tree_allreduce,
)

GIB = 2**30
NODES = [0, 1, 2, 3]


def _uniform_world(n_nodes=4):
    """Every link: 10 ms and 1 GiB/s, so one GiB takes 1.01 s and a quarter GiB 0.26 s."""
    net = Network.uniform(n_nodes, latency_ms=10.0, bandwidth_gibps=1.0)
    return place_round_robin(net, n_nodes)


def test_ring_allreduce_of_four_replicas():
    estimate = sync_cost("allreduce", NODES, _uniform_world(), GIB, allreduce="ring")
    assert estimate.seconds == pytest.approx(2 * 3 * 0.26)  # 2(R-1) steps of nbytes/R
    assert estimate.bytes == 6 * GIB
    assert estimate.breakdown == {"allreduce": pytest.approx(1.56)}


def test_tree_allreduce_of_four_replicas():
    estimate = sync_cost("allreduce", NODES, _uniform_world(), GIB, allreduce="tree")
    assert estimate.seconds == pytest.approx(2 * 2 * 1.01)  # 2 levels, up and down
    assert estimate.bytes == 6 * GIB


def test_pair_gossip_is_one_hop_and_one_message_each_way():
    estimate = sync_cost("gossip", NODES, _uniform_world(), GIB, groups=[(0, 2), (1, 3)])
    assert estimate.seconds == pytest.approx(1.01)
    assert estimate.bytes == 4 * GIB
    assert estimate.breakdown == {"gossip": pytest.approx(1.01)}


def test_two_messages_per_peer_double_bytes_and_payload_time():
    estimate = sync_cost("gossip", NODES, _uniform_world(), GIB, groups=[(0, 1), (2, 3)],
                         messages_per_peer=2)
    assert estimate.seconds == pytest.approx(0.01 + 2.0)
    assert estimate.bytes == 8 * GIB


def test_group_of_four_sends_to_each_peer_in_turn():
    estimate = sync_cost("gossip", NODES, _uniform_world(), GIB, groups=[(0, 1, 2, 3)])
    assert estimate.seconds == pytest.approx(3 * 1.01)
    assert estimate.bytes == 4 * 3 * GIB


def test_gossip_groups_index_replicas_not_nodes():
    # Replicas 0 and 1 live on nodes 4 and 5 of a world with one slow region pair.
    net = Network(regions=("a", "b"), latency_s=np.zeros((2, 2)),
                  bandwidth_bytes_per_s=np.array([[GIB, GIB / 4], [GIB / 4, GIB]]))
    world = place_round_robin(net, 6)  # nodes 4, 5 are in regions a, b
    estimate = sync_cost("gossip", [4, 5], world, GIB, groups=[(0, 1)])
    assert estimate.seconds == pytest.approx(4.0)


def test_run_costs_every_step_for_data_parallel_and_every_h_for_diloco():
    world = _uniform_world()
    dp = run_communication("data_parallel", n_steps=10, nodes=NODES, placement=world,
                           nbytes=GIB)
    assert dp.n_syncs == 10
    assert dp.total_seconds == pytest.approx(10 * 1.56)
    assert dp.total_bytes == 10 * 6 * GIB
    diloco = run_communication("diloco", n_steps=12, nodes=NODES, placement=world, nbytes=GIB,
                               sync_every=5)
    assert diloco.sync_steps.tolist() == [5, 10]
    assert np.flatnonzero(diloco.seconds).tolist() == [4, 9]
    assert diloco.total_bytes == 2 * 6 * GIB
    np.testing.assert_allclose(diloco.clock(1.0)[[0, 4, 5, 12]], [0.0, 4.0, 6.56, 15.12])


def test_noloco_run_sends_one_message_per_replica_per_round():
    run = run_communication("noloco", n_steps=150, nodes=NODES, placement=_uniform_world(),
                            nbytes=GIB, sync_every=50)
    assert run.sync_steps.tolist() == [50, 100, 150]
    assert run.total_seconds == pytest.approx(3 * 1.01)
    assert run.total_bytes == 3 * 4 * GIB


@pytest.mark.parametrize("group_size", [2, 4])
def test_noloco_groups_are_the_ones_the_optimizer_averages(group_size):
    n, pool_size, seed = 8, 16, 3

    @functools.partial(jax.vmap, axis_name="replica", in_axes=(0, None))
    def group_of_each_replica(one_hot, round_index):
        mean = replicas.group_mean(one_hot, round_index, "replica", group_size=group_size,
                                   pool_size=pool_size, seed=seed)
        return mean > 0  # replica r's row marks its group members

    for round_index in range(5):
        members = np.asarray(group_of_each_replica(jnp.eye(n), jnp.int32(round_index)))
        from_optimizer = sorted({tuple(np.flatnonzero(row)) for row in members})
        assert noloco_groups(n, round_index, group_size=group_size, pool_size=pool_size,
                             seed=seed) == from_optimizer


def test_gossip_beats_tree_allreduce_for_16_replicas_over_gcp12():
    world = place_round_robin(Network.gcp12(), 16)  # 12 regions, four of them hold two
    nodes = list(range(16))
    nbytes = 2 * 125e6  # a 125M-parameter model in bf16
    tree = tree_allreduce(nodes, world, nbytes)
    for round_index in range(10):
        gossip = sync_cost("gossip", nodes, world, nbytes,
                           groups=noloco_groups(16, round_index, seed=0))
        assert gossip.seconds < tree.seconds / 2
        assert gossip.bytes == 16 * nbytes < tree.bytes


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="star"), r"method='star' is not allowed: one of allreduce, gossip"),
    (dict(method="allreduce", allreduce="star"), r"allreduce='star' is not allowed: one of "
                                                 r"ring, tree"),
    (dict(method="gossip"), r"method='gossip' needs groups"),
    (dict(method="allreduce", groups=[(0, 1)]), r"groups is only used by method='gossip'"),
    (dict(method="gossip", groups=[(0, 1), (1, 2)]), r"groups must not repeat a replica"),
    (dict(method="gossip", groups=[(0, 4)]), r"groups entry must be in \[0, 4\)"),
    (dict(method="gossip", groups=[(0, 1)], messages_per_peer=0),
     r"messages_per_peer must be a positive integer"),
    (dict(method="allreduce", nodes=[0, 0, 1, 2]), r"nodes must be distinct"),
    (dict(method="allreduce", nbytes=-1.0), r"nbytes must be a finite number >= 0"),
])
def test_sync_cost_errors_name_the_argument(kwargs, message):
    args = dict(nodes=NODES, placement=_uniform_world(), nbytes=GIB) | kwargs
    with pytest.raises(ValueError, match=message):
        sync_cost(args.pop("method"), **args)


def test_run_communication_errors_name_the_argument():
    world = dict(nodes=NODES, placement=_uniform_world(), nbytes=GIB, n_steps=10)
    with pytest.raises(ValueError, match="method='fsdp' is not allowed: one of data_parallel, "
                                         "diloco, noloco"):
        run_communication("fsdp", **world)
    with pytest.raises(ValueError, match="method='diloco' needs sync_every"):
        run_communication("diloco", **world)
    with pytest.raises(ValueError, match="data parallel syncs every step"):
        run_communication("data_parallel", sync_every=5, **world)
