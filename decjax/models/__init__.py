"""LLaMA-style decoder (Flax NNX), its staged layout and the routed forward pass."""

from decjax.models.llama import Llama, LlamaConfig, flops_per_token
from decjax.models.presets import PRESETS, preset
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
    "monolithic_to_staged",
    "preset",
    "staged_to_monolithic",
]
