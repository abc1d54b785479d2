"""Optimizers: per-stage transformations over the staged layout."""

from decjax.optim.staged import (
    PerStageState,
    decay_mask,
    per_stage,
    reset_stage,
    stage_adamw,
    stage_grad_norms,
)

__all__ = [
    "PerStageState",
    "decay_mask",
    "per_stage",
    "reset_stage",
    "stage_adamw",
    "stage_grad_norms",
]
