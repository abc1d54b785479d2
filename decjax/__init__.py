"""decjax: training language models on decentralized, cheap, failure-prone nodes."""

from decjax import models, optim, tree, types
from decjax.models import LlamaConfig, StagedLlama, full_route
from decjax.optim import per_stage, reset_stage, stage_adamw

__version__ = "0.1.0"

__all__ = [
    "LlamaConfig",
    "StagedLlama",
    "full_route",
    "models",
    "optim",
    "per_stage",
    "reset_stage",
    "stage_adamw",
    "tree",
    "types",
]
