"""decjax: training language models on decentralized, cheap, failure-prone nodes."""

from decjax import checkfree, models, optim, sim, tree, types
from decjax.models import LlamaConfig, StagedLlama, full_route
from decjax.optim import per_stage, reset_stage, stage_adamw

__version__ = "0.1.0"

__all__ = [
    "LlamaConfig",
    "StagedLlama",
    "checkfree",
    "full_route",
    "models",
    "optim",
    "per_stage",
    "reset_stage",
    "sim",
    "stage_adamw",
    "tree",
    "types",
]
