"""The SkipPipe method of decjax.train (configs/skippipe.py): stored plans, annealed skipping."""

import numpy as np
import pytest

from configs import skippipe as skippipe_config
from decjax import skippipe
from decjax.train.records import read_jsonl
from decjax.train.sweep import train_config


def tiny_rotation(path, skip: float, max_swaps: int) -> list:
    """Plans of the tiny config's instance and allocation, stored in ``path``."""
    config = skippipe_config.get_config("size=tiny")
    partition = (5,) + (3,) * config.model.n_stages
    _, placement, cost, nbytes = skippipe.reference_instance(partition)
    allocation = skippipe.gcma_allocation(
        placement, partition, cost, activation_bytes=nbytes, seed=0,
        max_evaluations=config.method.gcma_evaluations, time_budget_s=600.0).allocation
    plans = skippipe.rotating_plans(
        allocation, placement, cost, n_microbatches=config.train.microbatches, skip_ratio=skip,
        activation_bytes=nbytes, max_swaps=max_swaps, max_evaluations=20, time_budget_s=0.2)
    skippipe.save_rotations(path, {skippipe.rotation_key(skip, max_swaps): {
        "plans": plans, "wall": 0.2}}, planner={"max_evaluations": 20})
    return plans


def test_a_run_trains_on_stored_plans_then_on_full_pipelines(tmp_path):
    plans = tiny_rotation(tmp_path / "rotations.json", 0.25, 2)
    planner, stored = skippipe.load_rotations(tmp_path / "rotations.json")
    assert planner == {"max_evaluations": 20}
    assert [p.route(width=5).tolist() for p in stored["skip 0.2500, max_swaps 2"]["plans"]] \
        == [p.route(width=5).tolist() for p in plans]
    config = skippipe_config.get_config("size=tiny,skip=0.25,until=0.5")
    config.method.plans_file = str(tmp_path / "rotations.json")
    config.log.update(progress=False, plot=False)
    train_config(config, tmp_path / "run")
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    start = events[0]
    assert start["routes_digest"] == skippipe.routes_digest([p.route(width=5) for p in plans])
    assert start["skip_steps"] == 6  # half of the 12 steps
    work = [e["microbatches"] for e in events if e["event"] == "work"]
    microbatches = config.train.microbatches
    assert all(min(w.values()) < microbatches for w in work[:6])  # skipping
    assert all(set(w.values()) == {microbatches} for w in work[6:])  # full pipelines
    final = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"][-1]
    expected = 6 * np.mean(start["makespans"]) + 6 * start["full_pipeline_makespan"]
    assert final["sim_seconds"] == pytest.approx(expected, rel=1e-9)


def test_a_plans_file_without_the_runs_rotation_is_named(tmp_path):
    tiny_rotation(tmp_path / "rotations.json", 0.25, 2)
    config = skippipe_config.get_config("size=tiny,skip=0.25,swaps=0")
    config.method.plans_file = str(tmp_path / "rotations.json")
    config.log.update(progress=False, plot=False)
    with pytest.raises(ValueError, match=r"method.plans_file=.* holds no plans for skip 0.2500, "
                                         r"max_swaps 0 \(it holds: skip 0.2500, max_swaps 2\)"):
        train_config(config, tmp_path / "run")


@pytest.mark.parametrize("until", [0.0, 1.5])
def test_a_skip_share_outside_its_range_is_named(until):
    from decjax.train import validate

    with pytest.raises(ValueError, match=rf"method.skip_until={until} is not allowed: in \(0, 1\]"):
        validate(skippipe_config.get_config(f"size=tiny,until={until}"))
