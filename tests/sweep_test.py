"""Sweeps of configs: grids from variants, finished runs reused, changed configs refused."""

import pathlib
import subprocess
import sys

import pytest

from configs import checkfree
from decjax.train.sweep import config_changes, finished, grid_configs, sweep

ROOT = pathlib.Path(__file__).parents[1]
CHECKFREE = str(ROOT / "configs" / "checkfree.py")


def test_a_grid_is_every_combination_of_its_variant_values():
    configs = grid_configs(CHECKFREE, "size=tiny", "method=checkpoint,checkfree_plus;rate=0.1,0")
    assert list(configs) == ["method=checkpoint-rate=0.1", "method=checkpoint-rate=0",
                             "method=checkfree_plus-rate=0.1", "method=checkfree_plus-rate=0"]
    config = configs["method=checkfree_plus-rate=0.1"]
    assert config.method.name == "checkfree_plus" and config.sim.failure_rate == 0.1
    assert configs["method=checkpoint-rate=0"].sim.failures == "none"
    with pytest.raises(ValueError, match="--grid part 'method': expected key=value1"):
        grid_configs(CHECKFREE, "", "method")
    with pytest.raises(ValueError, match="config variant 'bogus=1'"):
        grid_configs(CHECKFREE, "", "bogus=1")


def test_the_sweep_cli_trains_a_grid_and_a_second_sweep_reuses_it(tmp_path):
    command = [sys.executable, "-m", "decjax.train.sweep", f"--config={CHECKFREE}:size=tiny",
               "--grid=method=none,checkfree_plus", f"--out={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("method=none", "method=checkfree_plus"):
        assert finished(tmp_path / name) and f"{name}: final val loss" in result.stdout
    trained = []
    configs = {f"method={m}": checkfree.get_config(f"size=tiny,method={m}")
               for m in ("none", "checkfree_plus", "checkpoint")}
    sweep(configs, tmp_path, train=lambda config, workdir: trained.append(workdir.name),
          progress=False)
    assert trained == ["method=checkpoint"]  # the two finished runs were reused

    changed = {"method=none": checkfree.get_config("size=tiny,method=none,seed=3")}
    record = (tmp_path / "method=none" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"method=none holds a finished run of another config "
                                         r"\(seed: 0 -> 3"):
        sweep(changed, tmp_path, train=lambda *_: trained.append("x"), progress=False)
    assert trained == ["method=checkpoint"]
    assert (tmp_path / "method=none" / "metrics.jsonl").read_text() == record


def test_a_bad_config_in_a_sweep_stops_it_before_any_run(tmp_path):
    good = checkfree.get_config("size=tiny")
    bad = checkfree.get_config("size=tiny")
    bad.train.steps = -5
    with pytest.raises(ValueError, match="train.steps=-5 is not allowed"):
        sweep({"good": good, "bad": bad}, tmp_path, train=lambda *_: pytest.fail("trained"))


def test_config_changes_name_nested_fields():
    assert config_changes({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}}) == [
        "a.c: 2 -> 5", "d: 3 -> '<absent>'"]
    assert config_changes({"x": {"y": 1}}, {"x": {"y": 1}}) == []
