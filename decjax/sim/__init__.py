"""The simulated decentralized world: network, compute cost, estimators, failure traces.

Real losses come from real training; what one machine cannot be — many nodes in many
regions on slow links, with churn — is modelled here from published figures. Nothing in
this package touches JAX devices (except :func:`noloco_groups`, which repeats the NoLoCo
optimizer's JAX draw), so it can be used for planning on any machine.

Print a config's simulated iteration time with ``python -m decjax.sim --config=...``.
"""

from decjax.sim.communication import (
    RUN_METHODS,
    SYNC_METHODS,
    RunCommunication,
    noloco_groups,
    run_communication,
    sync_cost,
)
from decjax.sim.cost import (
    ComputeCost,
    activation_bytes,
    head_forward_flops,
    measure_flops_per_second,
    stage_forward_flops,
)
from decjax.sim.estimators import (
    ALLREDUCES,
    SCHEDULES,
    Estimate,
    allreduce,
    checkpoint_transfer,
    gossip_exchange,
    iteration_time,
    pipeline_makespan,
    ring_allreduce,
    stage_grid,
    tree_allreduce,
)
from decjax.sim.failures import (
    FailureTrace,
    bernoulli_trace,
    burst_trace,
    empirical_rate,
    hourly_to_per_iteration,
    hourly_trace,
    mtbf_trace,
)
from decjax.sim.network import (
    Network,
    Placement,
    place_explicit,
    place_random,
    place_round_robin,
)

__all__ = [
    "ALLREDUCES",
    "RUN_METHODS",
    "SCHEDULES",
    "SYNC_METHODS",
    "ComputeCost",
    "Estimate",
    "FailureTrace",
    "Network",
    "Placement",
    "RunCommunication",
    "activation_bytes",
    "allreduce",
    "bernoulli_trace",
    "burst_trace",
    "checkpoint_transfer",
    "empirical_rate",
    "gossip_exchange",
    "head_forward_flops",
    "hourly_to_per_iteration",
    "hourly_trace",
    "iteration_time",
    "measure_flops_per_second",
    "mtbf_trace",
    "noloco_groups",
    "pipeline_makespan",
    "place_explicit",
    "place_random",
    "place_round_robin",
    "ring_allreduce",
    "run_communication",
    "stage_forward_flops",
    "stage_grid",
    "sync_cost",
    "tree_allreduce",
]
