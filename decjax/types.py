"""Type aliases and the axis-letter glossary used across decjax.

Array names carry their shapes as suffixes (``tokens_MBT``) with these letters:

  S  body stages                 L  layers per stage
  M  microbatches per step       P  hops (slots) in a route
  B  sequences per microbatch    T  tokens per sequence
  D  model width                 F  feed-forward width
  V  vocabulary                  H  attention heads
  R  replicas                    E  experts
"""

from typing import Any

import jax

PyTree = Any
Params = dict[str, Any]
"""Staged parameters: ``{"io": {embed, final_norm, head}, "body": leaves [S, L, ...]}``."""
Route = jax.Array
"""``int32[M, P]``: body stages visited by each microbatch, in order; ``-1`` marks a skip slot."""
