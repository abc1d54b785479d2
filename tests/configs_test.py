import importlib
import json
import pathlib

import pytest

from decjax.train import validate

CONFIGS = sorted(
    p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
    if p.stem != "__init__"
)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "size=tiny"])
def test_every_config_and_its_tiny_variant_validate(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    validate(config)
    if arg == "size=tiny" and config.get("trainer") == "replicated":
        assert config.run.steps <= 100 and config.run.d_model <= 64
    elif arg == "size=tiny" and config.get("trainer") == "experts":
        assert max(config.run.steps) <= 100 and config.run.d_model <= 64
    elif arg == "size=tiny":
        assert config.train.steps <= 100 and config.model.d_model <= 64


@pytest.mark.parametrize("size", ["small", "124m", "500m", "1.5b"])
def test_preset_variants_validate(size):
    from configs import base

    config = base.get_config(f"size={size}")
    validate(config)
    assert config.model.n_layers % config.model.n_stages == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_every_tiny_variant_trains_in_seconds(name, tmp_path):
    import jax
    import numpy as np

    from decjax.train.records import read_jsonl
    from decjax.train.sweep import finished, train_config

    config = importlib.import_module(f"configs.{name}").get_config("size=tiny")
    if config.get("trainer") == "replicated":  # alone: one replica per (fake) device
        config.run.n_replicas = len(jax.devices())
        config.run.global_batch = 2 * config.run.n_replicas
    if config.get("trainer") in ("replicated", "experts"):
        config.run.progress = False
    else:
        config.log.update(progress=False, plot=False)
    train_config(config, tmp_path)
    assert finished(tmp_path)
    val = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "val"]
    losses = [r.get("loss", r.get("loss_mean")) for r in val]
    assert len(losses) >= 2 and np.isfinite(losses).all() and losses[-1] < losses[0]
    if "settle" in config:  # the run's nodes are paid for the microbatches they processed
        record = json.loads((tmp_path / "settlement.json").read_text())
        assert record["failed"] == [] and record["violations"] == []
        assert {p["node"]: p["amount"] for p in record["payments"]} == {
            node: n * config.settle.price_per_microbatch for node, n in record["work"].items()}
        assert record["work"]["io"] == config.train.steps * config.train.microbatches
