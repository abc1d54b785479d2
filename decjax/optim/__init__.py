"""Optimizers: per-stage transformations, NoLoCo and DiLoCo, and the replica helpers."""

from decjax.optim.diloco import PRESETS as DILOCO_PRESETS
from decjax.optim.diloco import DiLoCoState, diloco
from decjax.optim.noloco import NoLoCoState, StabilityWarning, noloco, stability_window
from decjax.optim.outer import OuterState, Packed, anchor_of, pack, unpack
from decjax.optim.replicas import replicate, shard_replicas, stack_replicas
from decjax.optim.staged import (
    PerStageState,
    decay_mask,
    per_stage,
    reset_stage,
    stage_adamw,
    stage_grad_norms,
)

__all__ = [
    "DILOCO_PRESETS",
    "DiLoCoState",
    "NoLoCoState",
    "OuterState",
    "Packed",
    "PerStageState",
    "StabilityWarning",
    "anchor_of",
    "decay_mask",
    "diloco",
    "noloco",
    "pack",
    "per_stage",
    "replicate",
    "reset_stage",
    "shard_replicas",
    "stability_window",
    "stack_replicas",
    "stage_adamw",
    "stage_grad_norms",
    "unpack",
]
