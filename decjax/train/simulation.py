"""The simulated world of a run, built from the ``sim`` config section.

Losses come from real training; what one machine cannot reproduce (nodes in many regions,
WAN links, failures) comes from :mod:`decjax.sim`. Each step advances a simulated clock by the
estimated iteration time (plus recovery downtime and rollback, for methods that have them);
failures are read from a seeded trace shared by every method that uses the same ``sim``
settings.
"""

import dataclasses
import pathlib

import ml_collections
import numpy as np

from decjax import sim
from decjax.models import PRESETS, LlamaConfig, StagedLlama, preset

NETWORKS = ("gcp12", "gcp12_skippipe", "uniform")
PLACEMENTS = ("round_robin", "random")
COMPUTE_MODELS = ("reference", "flops")
FAILURE_MODELS = ("none", "hourly", "mtbf", "csv")


def default_sim_config() -> ml_collections.ConfigDict:
    """Defaults: the 12-region table with the reference constants, one replica per stage."""
    return ml_collections.ConfigDict(dict(
        network="gcp12",  # gcp12 | gcp12_skippipe | uniform | path/to/table.csv
        uniform_latency_ms=50.0,
        uniform_bandwidth_gibps=0.1,
        hop_overhead_s=0.35,  # the SkipPipe reference's fixed per-hop cost
        placement="round_robin",  # round_robin | random
        replicas=1,  # data-parallel replicas of every stage
        schedule="1f1b",  # gpipe | 1f1b
        max_in_flight=0,  # 0: no cap
        compute="reference",  # reference (0.055 s per sample per layer) | flops
        seconds_per_sample_layer=0.055,
        device_flops=0.0,  # compute=flops: device FLOP/s; 0 measures this machine
        activation_bytes_per_value=4,
        allreduce="ring",  # ring | tree
        straggler_sigma=0.0,
        failures="none",  # none | hourly | mtbf | csv
        failure_rate=0.10,  # hourly probability that a stage fails
        mtbf_seconds=3600.0,
        failure_csv="",
        failure_seed=0,
        # Cost the world for another model shape (a preset name, e.g. "500m") while training
        # a small proxy with the same number of stages; "" costs the trained model itself.
        cost_model="",
        cost_samples_per_microbatch=0,  # 0: train.batch_size / microbatches / replicas
    ))


def validate_sim_config(c: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first ``sim.<field>`` that is not allowed."""

    def require(ok, field, allowed):
        if not ok:
            raise ValueError(f"sim.{field}={c[field]!r} is not allowed: {allowed}")

    network_path = pathlib.Path(str(c.network))
    require(c.network in NETWORKS or network_path.suffix == ".csv", "network",
            f"one of {', '.join(NETWORKS)} or a path to a .csv table")
    require(c.placement in PLACEMENTS, "placement", f"one of {', '.join(PLACEMENTS)}")
    require(c.compute in COMPUTE_MODELS, "compute", f"one of {', '.join(COMPUTE_MODELS)}")
    require(c.failures in FAILURE_MODELS, "failures", f"one of {', '.join(FAILURE_MODELS)}")
    require(c.schedule in sim.SCHEDULES, "schedule", f"one of {', '.join(sim.SCHEDULES)}")
    require(c.allreduce in sim.ALLREDUCES, "allreduce", f"one of {', '.join(sim.ALLREDUCES)}")
    require(isinstance(c.replicas, int) and c.replicas >= 1, "replicas", "an integer >= 1")
    require(c.max_in_flight >= 0, "max_in_flight", "an integer >= 0 (0: no cap)")
    require(c.hop_overhead_s >= 0, "hop_overhead_s", "a number >= 0")
    require(c.seconds_per_sample_layer > 0, "seconds_per_sample_layer", "a number > 0")
    require(c.device_flops >= 0, "device_flops", "a number >= 0 (0: measure this machine)")
    require(c.straggler_sigma >= 0, "straggler_sigma", "a number >= 0")
    require(0.0 <= c.failure_rate < 1.0, "failure_rate", "a probability in [0, 1)")
    require(c.mtbf_seconds > 0, "mtbf_seconds", "a number > 0")
    require(c.failures != "csv" or pathlib.Path(c.failure_csv).is_file(), "failure_csv",
            "an existing CSV file when sim.failures='csv'")
    require(c.uniform_latency_ms >= 0, "uniform_latency_ms", "a number >= 0")
    require(c.uniform_bandwidth_gibps > 0, "uniform_bandwidth_gibps", "a number > 0")
    require(c.cost_model in ("", *PRESETS), "cost_model", f"'' or one of {', '.join(PRESETS)}")
    require(not (c.cost_model and c.compute == "flops" and not c.device_flops), "device_flops",
            "a number > 0 when sim.cost_model is set (that model is not built to measure)")
    require(c.cost_samples_per_microbatch >= 0, "cost_samples_per_microbatch", "an integer >= 0")


@dataclasses.dataclass(frozen=True)
class World:
    """Where the nodes are and what one iteration costs there."""

    placement: sim.Placement
    cost: sim.ComputeCost
    stage_nodes: list[list[int]]
    n_microbatches: int
    activation_bytes: float
    stage_param_bytes: list[float]
    schedule: str
    max_in_flight: int | None
    allreduce: str

    def iteration(self, seed: int = 0) -> sim.Estimate:
        """Simulated time of one training iteration (pipeline, then gradient all-reduce)."""
        return sim.iteration_time(
            self.stage_nodes, self.placement, self.cost, n_microbatches=self.n_microbatches,
            activation_bytes=self.activation_bytes, stage_param_bytes=self.stage_param_bytes,
            schedule=self.schedule, max_in_flight=self.max_in_flight,
            allreduce_algorithm=self.allreduce, seed=seed)


def make_network(c: ml_collections.ConfigDict) -> sim.Network:
    if c.network == "gcp12":
        return sim.Network.gcp12(variant="checkfree", hop_overhead_s=c.hop_overhead_s)
    if c.network == "gcp12_skippipe":
        return sim.Network.gcp12(variant="skippipe", hop_overhead_s=c.hop_overhead_s)
    if c.network == "uniform":
        return sim.Network.uniform(12, latency_ms=c.uniform_latency_ms,
                                   bandwidth_gibps=c.uniform_bandwidth_gibps,
                                   hop_overhead_s=c.hop_overhead_s)
    return sim.Network.from_csv(c.network, hop_overhead_s=c.hop_overhead_s)


def make_world(config: ml_collections.ConfigDict, model: StagedLlama) -> World:
    """The world of ``config.sim`` for ``model`` trained with ``config.train``."""
    c, t = config.sim, config.train
    n_stages, seq_len = model.n_stages, config.model.seq_len
    if c.cost_model:
        shape = preset(c.cost_model)
        if shape["n_stages"] != n_stages:
            raise ValueError(f"sim.cost_model={c.cost_model!r} has {shape['n_stages']} stages, "
                             f"the trained model model.n_stages={n_stages}")
        seq_len = shape["seq_len"]
        costed = LlamaConfig(vocab_size=1, d_model=shape["d_model"], n_heads=shape["n_heads"],
                             n_layers=shape["n_layers"], d_ff=shape["d_ff"])
        model = StagedLlama(costed, n_stages)
    m = model.config
    network = make_network(c)
    n_nodes = n_stages * c.replicas
    if c.placement == "random":
        placement = sim.place_random(network, n_nodes, seed=c.failure_seed)
    else:
        placement = sim.place_round_robin(network, n_nodes)
    samples = c.cost_samples_per_microbatch or t.batch_size // t.microbatches // c.replicas or 1
    if c.compute == "reference":
        cost = sim.ComputeCost.reference(
            n_stages, model.layers_per_stage, samples,
            seconds_per_sample_layer=c.seconds_per_sample_layer,
            straggler_sigma=c.straggler_sigma)
    else:
        flops = sim.stage_forward_flops(m.d_model, m.n_heads, model.layers_per_stage,
                                        m.hidden_dim, seq_len, samples)
        device_flops = c.device_flops or measure_device_flops(model, samples, seq_len)
        cost = sim.ComputeCost.from_flops(np.full(n_stages, flops), device_flops,
                                          straggler_sigma=c.straggler_sigma)
    per_layer = 4 * m.d_model**2 + 3 * m.d_model * m.hidden_dim + 2 * m.d_model
    stage_bytes = 4.0 * per_layer * model.layers_per_stage  # float32 gradients
    return World(
        placement=placement,
        cost=cost,
        stage_nodes=sim.stage_grid(n_stages, c.replicas),
        n_microbatches=t.microbatches,
        activation_bytes=sim.activation_bytes(m.d_model, seq_len, samples,
                                              c.activation_bytes_per_value),
        stage_param_bytes=[stage_bytes] * n_stages,
        schedule=c.schedule,
        max_in_flight=c.max_in_flight or None,
        allreduce=c.allreduce,
    )


def measure_device_flops(model: StagedLlama, samples: int, seq_len: int) -> float:
    """FLOP/s of this machine on one body stage's forward + backward for one microbatch."""
    import jax
    import jax.numpy as jnp

    from decjax import tree

    m = model.config
    stage = tree.index(model.init(jax.random.key(0))["body"], 0)
    x = jax.random.normal(jax.random.key(1), (samples, seq_len, m.d_model), m.compute_dtype)
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply_stage(p, x).astype(jnp.float32))))
    forward = sim.stage_forward_flops(m.d_model, m.n_heads, model.layers_per_stage,
                                      m.hidden_dim, seq_len, samples)
    return sim.measure_flops_per_second(step, stage, x, flops=3 * forward)


def check_storage_region(config: ml_collections.ConfigDict, world: World) -> str:
    """``method.storage_region``, refused (naming the field) if the network has no such region."""
    region = config.method.storage_region
    try:
        world.placement.network.region_index(region)
    except ValueError as e:
        raise ValueError(f"method.storage_region={region!r} is not allowed: {e}") from None
    return region


def make_failure_trace(config: ml_collections.ConfigDict, n_stages: int,
                       iteration_seconds: float) -> "sim.FailureTrace | None":
    """The run's stage-failure trace (``None`` without failures); seeded by ``sim``."""
    c, n_steps = config.sim, config.train.steps
    if c.failures == "none":
        return None
    if c.failures == "hourly":
        return sim.hourly_trace(n_stages, n_steps, c.failure_rate, iteration_seconds,
                                c.failure_seed)
    if c.failures == "mtbf":
        return sim.mtbf_trace(n_stages, n_steps, c.mtbf_seconds, iteration_seconds,
                              c.failure_seed)
    return sim.FailureTrace.from_csv(c.failure_csv, n_targets=n_stages, n_steps=n_steps)


@dataclasses.dataclass
class SimClock:
    """Simulated seconds so far, split by what they were spent on."""

    seconds: float = 0.0
    parts: dict[str, float] = dataclasses.field(default_factory=dict)

    def advance(self, kind: str, seconds: float) -> float:
        self.seconds += seconds
        self.parts[kind] = self.parts.get(kind, 0.0) + seconds
        return self.seconds

    def state(self) -> dict:
        return {"seconds": self.seconds, "parts": dict(self.parts)}

    @classmethod
    def from_state(cls, state: dict) -> "SimClock":
        return cls(float(state["seconds"]), dict(state["parts"]))


def _placement_table(world: World) -> list[str]:
    n_replicas = len(world.stage_nodes[0])
    rows = ["  stage  " + "".join(f"{f'replica {r}':<18}" for r in range(n_replicas))]
    for s, nodes in enumerate(world.stage_nodes):
        cells = "".join(f"{f'{n} {world.placement.region_of(n)}':<18}" for n in nodes)
        rows.append(f"  {s:>5}  {cells}")
    return rows


def describe(world: World, estimate: sim.Estimate, config: ml_collections.ConfigDict) -> str:
    """A readable report of the world and of one iteration's simulated time."""
    c = config.sim
    lines = [
        f"network:   {world.placement.network.summary()}",
        f"placement: {c.placement}, {len(world.stage_nodes)} stages x {c.replicas} replicas",
        *_placement_table(world),
        f"compute:   forward {world.cost.forward(0):.3f} s, backward {world.cost.backward(0):.3f}"
        f" s per stage per microbatch, loss {world.cost.loss():.3f} s ({c.compute} model)",
        f"pipeline:  {world.n_microbatches} microbatches per replica, {c.schedule} order, "
        f"{world.activation_bytes / 2**20:.2f} MiB of activations per hop",
        "",
        f"simulated iteration time: {estimate.seconds:.2f} s",
    ]
    for part, seconds in estimate.breakdown.items():
        share = seconds / estimate.seconds if estimate.seconds else 0.0
        lines.append(f"  {part:<14} {seconds:8.2f} s  {share:6.1%}")
    lines.append(f"  average node idle {estimate.idle_s:.2f} s "
                 f"({estimate.idle_s / max(estimate.seconds, 1e-12):.1%} of the iteration)")
    lines.append(f"  bytes over links per iteration: {estimate.bytes / 2**20:,.1f} MiB")
    if c.failures == "hourly":
        p = sim.hourly_to_per_iteration(c.failure_rate, estimate.seconds)
        lines.append(f"failures: {c.failure_rate:.0%}/h per stage -> p = {p:.5f} per iteration")
    lines.append("(compute, communication: critical path of the slowest replica pipeline; "
                 "allreduce: slowest stage's gradient exchange)")
    return "\n".join(lines)
