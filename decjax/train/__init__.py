"""Training: train state, pure steps, the loop, checkpoints and the run record.

Run from the command line with ``python -m decjax.train --config=... --workdir=...``.
"""

from decjax.train.checkpoint import Checkpointer, CheckpointError
from decjax.train.config import ConfigError, make_model, make_optimizer, validate
from decjax.train.loop import RunSummary, restore_run, train_and_evaluate
from decjax.train.step import (
    TrainState,
    accumulate_grads,
    init_state,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "RunSummary",
    "TrainState",
    "accumulate_grads",
    "init_state",
    "make_eval_step",
    "make_model",
    "make_optimizer",
    "make_train_step",
    "restore_run",
    "train_and_evaluate",
    "validate",
]
