"""decjax: training language models on decentralized, cheap, failure-prone nodes."""

from decjax import checkfree, models, optim, sim, tree, types
from decjax.models import LlamaConfig, StagedLlama, full_route
from decjax.optim import diloco, noloco, per_stage, replicate, reset_stage, stage_adamw

__version__ = "0.1.0"

__all__ = [
    "LlamaConfig",
    "StagedLlama",
    "checkfree",
    "diloco",
    "full_route",
    "models",
    "noloco",
    "optim",
    "per_stage",
    "replicate",
    "reset_stage",
    "sim",
    "stage_adamw",
    "tree",
    "types",
]
