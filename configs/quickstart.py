"""Quickstart: a small staged model on the Python standard library, a few minutes on CPU.

    python -m decjax.train --config=configs/quickstart.py --workdir=runs/quickstart

Hardware: 2 CPU cores, about 2.5 minutes. Expected: validation loss (nats/byte) from 5.5 at
step 0 to about 1.8 after 300 steps.
"""

from configs import base


def get_config(arg=None):
    arg = base.parse_arg(arg, size="quickstart")
    if arg.size != "quickstart":
        return base.get_config(f"size={arg.size}")
    config = base.get_config("size=tiny")
    config.model.update(d_model=128, n_heads=4, n_layers=4, d_ff=512, n_stages=2, seq_len=128)
    config.train.update(steps=300, batch_size=16, microbatches=2, eval_every=50, eval_batches=8)
    config.opt.update(lr=3e-3, warmup_steps=20)
    config.ckpt.every = 100
    config.data.max_bytes_per_domain = 1_000_000
    return config
