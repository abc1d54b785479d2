"""LLaMA-style decoder (Flax NNX), its staged layout and the routed forward pass."""

from decjax.models.llama import Llama, LlamaConfig, flops_per_token
from decjax.models.presets import PRESETS, preset
from decjax.models.replica_routing import (
    identity_replica_routes,
    move_samples,
    random_replica_routes,
    routed_replica_forward,
    routed_replica_loss,
)
from decjax.models.staged import (
    StagedLlama,
    full_route,
    monolithic_to_staged,
    staged_to_monolithic,
)

__all__ = [
    "PRESETS",
    "Llama",
    "LlamaConfig",
    "StagedLlama",
    "flops_per_token",
    "full_route",
    "identity_replica_routes",
    "monolithic_to_staged",
    "move_samples",
    "preset",
    "random_replica_routes",
    "routed_replica_forward",
    "routed_replica_loss",
    "staged_to_monolithic",
]
