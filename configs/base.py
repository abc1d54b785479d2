"""Base config shared by every decjax setup; other config files start from it.

    python -m decjax.train --config=configs/base.py:size=tiny --workdir=runs/base-tiny

Variants (after the colon, comma separated): ``size`` (a model preset: tiny, small, 124m,
500m, 1.5b; ``tiny`` also shortens training so the run takes seconds on a CPU).
Any field can then be overridden with ``--config.<section>.<field>=value``.
"""

import ml_collections

from decjax.data import default_data_config
from decjax.models import preset
from decjax.train.methods import default_method_config
from decjax.train.simulation import default_sim_config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses ``"k1=v1,k2=v2"`` into a ConfigDict, typed after ``defaults``.

    Keys missing from ``defaults`` are rejected so that a typo in a variant fails loudly.
    """
    parsed = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(
                f"config variant {item!r}: expected key=value with key in {sorted(defaults)}"
            )
        default = defaults[key]
        if isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes")
        elif default is None:
            parsed[key] = value
        else:
            parsed[key] = type(default)(value)
    return parsed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, size="small")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=0,  # 0: the tokenizer's vocabulary size
            rope_theta=1e4,
            norm_eps=1e-6,
            init_std=0.02,
            dtype="float32",
            **preset(arg.size),
        )
    )
    config.data = default_data_config()
    config.opt = ml_collections.ConfigDict(
        dict(
            lr=3e-4,
            schedule="warmup_cosine",  # constant | warmup_cosine
            warmup_steps=100,
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            clip_norm=1.0,
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(steps=2000, batch_size=32, microbatches=4, eval_every=200, eval_batches=8)
    )
    config.sim = default_sim_config()
    config.method = default_method_config()
    config.ckpt = ml_collections.ConfigDict(dict(every=500, keep=2))
    config.log = ml_collections.ConfigDict(
        dict(every=10, progress=True, tensorboard=False, plot=True)
    )
    if arg.size == "tiny":
        config.train.update(steps=40, batch_size=8, microbatches=2, eval_every=20, eval_batches=2)
        config.opt.update(lr=3e-3, warmup_steps=5)
        config.ckpt.every = 20
        config.data.max_bytes_per_domain = 200_000
    return config
