"""The trainer's simulated world: config -> placement, costs and one iteration's time."""

import numpy as np
import pytest

from configs import base
from decjax import sim
from decjax.train import make_model
from decjax.train.simulation import SimClock, make_world, measure_device_flops


def _config(**sim_fields):
    config = base.get_config("size=tiny")
    config.sim.update(sim_fields)
    return config


def test_reference_world_uses_the_reference_constants():
    config = _config(replicas=2)
    model = make_model(config, vocab_size=258)
    world = make_world(config, model)
    samples = config.train.batch_size // config.train.microbatches // 2
    assert world.cost.forward(0) == pytest.approx(0.055 * model.layers_per_stage * samples)
    assert world.stage_nodes == [[0, 1], [2, 3]]
    regions = [world.placement.region_of(n) for n in range(4)]
    assert regions == ["Australia", "Belgium", "Canada", "Germany"]
    estimate = world.iteration()
    assert sum(estimate.breakdown.values()) == pytest.approx(estimate.seconds)
    assert estimate.breakdown["allreduce"] > 0  # two replicas exchange gradients


def test_flops_world_divides_by_the_device_throughput():
    config = _config(compute="flops", device_flops=1e12)
    model = make_model(config, vocab_size=258)
    m = model.config
    samples = config.train.batch_size // config.train.microbatches
    flops = sim.stage_forward_flops(m.d_model, m.n_heads, model.layers_per_stage, m.hidden_dim,
                                    config.model.seq_len, samples)
    assert make_world(config, model).cost.forward(1) == pytest.approx(flops / 1e12)


def test_device_flops_are_measured_on_this_machine():
    config = _config()
    flops = measure_device_flops(make_model(config, vocab_size=258), samples=2, seq_len=32)
    assert np.isfinite(flops) and 1e6 < flops < 1e15


def test_clock_state_round_trips():
    clock = SimClock()
    clock.advance("iteration", 2.5)
    clock.advance("recovery", 1.0)
    again = SimClock.from_state(clock.state())
    assert again.seconds == 3.5 and again.parts == {"iteration": 2.5, "recovery": 1.0}
