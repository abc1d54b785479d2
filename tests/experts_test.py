"""HDEE experts as a config run in one process (the multi-process runs: multiprocess_test)."""

import json

import numpy as np
import pytest

from configs import hdee
from decjax.train import validate
from decjax.train.config import ConfigError
from decjax.train.experts import ExpertsConfig, run_config, train
from decjax.train.records import read_jsonl


def test_the_tiny_hdee_config_trains_every_expert_and_accounts_the_budget(tmp_path):
    config = hdee.get_config("size=tiny")
    config.run.progress = False
    validate(config)
    result = train(run_config(config), config.dist, tmp_path)
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    experts = result["experts"]
    assert [e["d_ff"] for e in experts.values()] == [24, 32, 40]  # M_He-I_Ho: sizes S/M/L
    assert all(e["status"] == "finished" and e["steps_done"] == e["budget_steps"]
               for e in experts.values())
    budget = result["budget"]
    assert budget["finished_flops"] == budget["planned_flops"] > 0
    assert budget["lost_spent_flops"] == budget["never_spent_flops"] == 0
    curve = result["val_loss_curve"]
    assert np.isfinite(curve).all() and curve[-1] < curve[0]
    for domain, scored in result["domain_val_loss"].items():  # each by its own expert
        assert scored["expert"] == domain
    with pytest.raises(ValueError, match="already holds a finished run"):
        train(run_config(config), config.dist, tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(ensemble="M_X"), "run.ensemble='M_X' is not allowed: one of M_Ho-I_Ho"),
    (dict(difficulties=("easy",)), "run.domains has 3 entries but run.difficulties has 1"),
    (dict(batch_size=0), "run.batch_size=0 is not allowed: an integer >= 1"),
    (dict(eval_every=-1), "run.eval_every=-1 is not allowed"),
])
def test_bad_experts_fields_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        ExpertsConfig(**change)


def test_an_unknown_experts_field_is_named_in_one_line():
    config = hdee.get_config("size=tiny")
    config.run.unlocked = 1
    with pytest.raises(ConfigError, match="unexpected keyword argument 'unlocked'"):
        validate(config)


def test_experts_branch_from_a_seed_run_and_score_every_domain_on_test_rows(tmp_path):
    def config(ensemble, **run):
        c = hdee.get_config(f"ensemble={ensemble},size=tiny")
        c.run.update(progress=False, held_out=("json",), stdlib_bytes=20_000, **run)
        return run_config(c), c.dist

    seed = train(*config("seed"), tmp_path / "seed")
    assert sorted(seed["experts"]) == ["seed_L", "seed_M", "seed_S"]
    assert (tmp_path / "seed" / "params.msgpack").exists()
    assert set(seed["test"]["json"]["experts"]) == {"seed_S", "seed_M", "seed_L"}
    assert "modes" not in seed["test"]["json"]  # seed models are not an ensemble
    steps = train(*config("M_Ho-I_He", init_from=str(tmp_path / "seed")), tmp_path / "steps")
    first = [r for r in read_jsonl(tmp_path / "steps" / "metrics.jsonl") if r["split"] == "val"][0]
    for expert in steps["experts"]:  # every M expert starts as the M seed model
        for domain, loss in first["loss_experts"][expert].items():
            assert loss == pytest.approx(seed["experts"]["seed_M"]["val_loss"][domain], rel=1e-4)
    assert set(steps["test"]) == {"markov3_v4_a0.2", "markov2_v8", "markov2_v16", "json"}
    scores = steps["test"]["markov2_v16"]
    assert set(scores["modes"]) == {"uniform_posterior", "cached_prior", "top1",
                                    "logprob_average_not_mixture"}
    assert all(np.isfinite(v) and v > 1 for v in scores["modes"].values())
    assert scores["modes"]["top1"] == pytest.approx(scores["experts"][scores["top1"]], rel=1e-4)


def test_a_bad_seed_run_to_branch_from_is_named(tmp_path):
    with pytest.raises(ValueError, match="is not allowed with run.ensemble='seed'"):
        ExpertsConfig(ensemble="seed", init_from="runs/x")
    config = hdee.get_config("ensemble=dense,size=tiny")
    config.run.update(progress=False, init_from=str(tmp_path))
    with pytest.raises(ValueError, match="holds no params.msgpack: name the workdir of a finished"):
        train(run_config(config), config.dist, tmp_path / "dense")
