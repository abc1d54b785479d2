"""HDEE experts as a config run in one process (the multi-process runs: multiprocess_test)."""

import json

import numpy as np
import pytest

from configs import hdee
from decjax.train import validate
from decjax.train.config import ConfigError
from decjax.train.experts import ExpertsConfig, run_config, train


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
