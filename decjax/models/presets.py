"""Model size presets.

``tiny`` and ``small`` run on a laptop CPU. The reference sizes follow the CheckFree
reference configurations (d, heads, layers, stages x layers per stage, sequence length);
note that the paper's "124M" model has 83.1M parameters by count with a 32000-token vocabulary.
They are not meant to be trained on CPU.
"""

import types

PRESETS = types.MappingProxyType({
    # ~0.3M parameters with the byte tokenizer.
    "tiny": dict(d_model=64, n_heads=4, n_layers=4, d_ff=256, n_stages=2, seq_len=128),
    # ~8.5M parameters with the byte tokenizer.
    "small": dict(d_model=256, n_heads=8, n_layers=8, d_ff=1024, n_stages=4, seq_len=256),
    "124m": dict(d_model=512, n_heads=8, n_layers=12, d_ff=0, n_stages=4, seq_len=512),
    "500m": dict(d_model=1024, n_heads=16, n_layers=24, d_ff=0, n_stages=6, seq_len=1024),
    "1.5b": dict(d_model=2048, n_heads=16, n_layers=24, d_ff=0, n_stages=6, seq_len=4096),
})


def preset(name: str) -> dict:
    """The model fields of preset ``name`` (``model.size``)."""
    if name not in PRESETS:
        raise ValueError(f"model.size={name!r} is unknown; allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
