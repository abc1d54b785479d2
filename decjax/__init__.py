"""decjax: training language models on decentralized, cheap, failure-prone nodes.

Subpackages load on first use, so ``import decjax.payments`` (pure Python) does not pull in
JAX.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("checkfree", "ensemble", "models", "optim", "payments", "sim", "skippipe",
                "tree", "types")
_EXPORTS = {
    "LlamaConfig": "models",
    "StagedLlama": "models",
    "full_route": "models",
    "diloco": "optim",
    "noloco": "optim",
    "per_stage": "optim",
    "replicate": "optim",
    "reset_stage": "optim",
    "stage_adamw": "optim",
}

__all__ = sorted((*_SUBPACKAGES, *_EXPORTS))


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"decjax.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"decjax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'decjax' has no attribute {name!r}")


def __dir__():
    return __all__
