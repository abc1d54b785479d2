"""Prints the simulated iteration time of a config's pipeline and its breakdown.

    python -m decjax.sim --config=configs/quickstart.py
    python -m decjax.sim --config=configs/base.py:size=500m --config.sim.replicas=3 \
        --config.sim.failures=hourly --config.sim.failure_rate=0.16

The model shape comes from the config (the tokenizer's vocabulary is not needed: only the
body stages, activations and gradients are costed), so nothing is trained or loaded.
"""

from absl import app, flags
from ml_collections import config_flags

from decjax.train.config import ConfigError, make_model, parse_flags, validate
from decjax.train.simulation import (
    check_storage_region,
    describe,
    make_failure_trace,
    make_world,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/x.py:size=tiny.",
    lock_config=True,
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        validate(config)
        model = make_model(config, vocab_size=config.model.vocab_size or 256)
        world = make_world(config, model)
        check_storage_region(config, world)
        estimate = world.iteration(seed=config.sim.failure_seed)
        # Build the trace as the trainer would, so a trace it would refuse is refused here.
        trace = make_failure_trace(config, model.n_stages, estimate.seconds)
        print(describe(world, estimate, config))
        if trace is not None:
            print(f"failure trace: {int((trace.kinds == 'fail').sum())} stage failures in "
                  f"{config.train.steps} steps ({trace.description})")
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
