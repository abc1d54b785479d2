"""Command-line entry point.

    python -m decjax.train --config=configs/quickstart.py --workdir=runs/quickstart
    python -m decjax.train --config=configs/base.py:size=tiny --workdir=runs/tiny \
        --config.opt.lr=1e-3

The config is locked, so a misspelt ``--config.x.y`` override fails immediately. A config with
``trainer='replicated'`` (``configs/replicated.py``, ``noloco.py``, ``diloco.py``) trains
replicas, one with ``trainer='experts'`` (``configs/hdee.py``) an ensemble of domain experts,
alone or as one process of a group started by ``python -m decjax.launch``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from decjax.dist.group import REGROUP_EXIT_CODE, Regroup
from decjax.train.checkpoint import CheckpointError
from decjax.train.config import ConfigError, parse_flags
from decjax.train.sweep import train_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/x.py:size=tiny.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and the run record.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and XLA are chatty at INFO
    config = _CONFIG.value
    try:
        try:
            train_config(config, _WORKDIR.value)
        except Regroup:  # the launcher restarts the group with its new members
            raise SystemExit(REGROUP_EXIT_CODE) from None
    except (ConfigError, CheckpointError, ValueError, TimeoutError) as e:
        # Bad input: a one-line message, not a traceback.
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
