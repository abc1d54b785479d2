"""CheckFree / CheckFree+ and their baselines on one shared failure trace.

    python -m decjax.train --config=configs/checkfree.py:method=checkfree_plus,rate=0.33 \
        --workdir=runs/checkfree-plus-33
    python -m decjax.train --config=configs/checkfree.py:size=tiny --workdir=runs/cf-tiny
    python -m decjax.train.sweep --config=configs/checkfree.py:size=tiny \
        --grid="method=checkpoint,checkfree_plus" --out=runs/cf-sweep

Variants: ``method`` (none, checkpoint, redundant, checkfree, checkfree_plus, and the
combinations checkfree_reroute, reroute and peer_copy, see :mod:`decjax.train.methods`), ``rate``
(failures per stage-hour, in [0, 1); 0 or ``method=none``: no failures), ``seed`` (model,
data order and failure trace), ``steps`` (0: the size's default), ``recovery`` and
``opt_rule`` (CheckFree's rebuild rules, see :mod:`decjax.checkfree`), ``size`` (``small``:
the CheckFree experiment's proxy, a 6-stage byte-level Llama on the Python standard library,
costed in a simulated world of the reference's 500M model, 6 stages x 3 replicas over the
12-region table; ``tiny``: the same world and 6 stages, a smaller model, seconds on a CPU).
Every method at the same ``rate`` and ``seed`` sees the same failure trace.
"""

import ml_collections

from configs import base

SIZES = ("small", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = base.parse_arg(arg, method="checkfree_plus", rate=0.10, seed=0, steps=0,
                         recovery="weighted", opt_rule="fresh", size="small")
    if arg.size not in SIZES:
        raise ValueError(f"config variant size={arg.size!r}: one of {', '.join(SIZES)}")
    if not 0.0 <= arg.rate < 1.0:
        raise ValueError(f"config variant rate={arg.rate!r}: failures per stage-hour in [0, 1)")
    tiny = arg.size == "tiny"
    config = base.get_config("size=tiny")
    config.seed = arg.seed
    steps = arg.steps or (12 if tiny else 400)
    if tiny:
        config.model.update(d_model=32, n_heads=2, n_layers=6, d_ff=64, n_stages=6, seq_len=32)
        config.data.update(domains=("json", "concurrent"), max_bytes_per_domain=60_000)
        config.train.update(steps=steps, batch_size=6, microbatches=6, eval_every=6,
                            eval_batches=2)
    else:
        config.model.update(d_model=64, n_heads=4, n_layers=6, d_ff=256, n_stages=6, seq_len=64)
        config.data.update(max_bytes_per_domain=400_000)
        config.train.update(steps=steps, batch_size=12, microbatches=6, eval_every=25,
                            eval_batches=4)
    config.opt.update(lr=3e-3, schedule="constant", warmup_steps=0)
    config.ckpt.update(every=steps, keep=1)
    config.log.update(every=5, progress=not tiny, plot=True)
    config.sim.update(replicas=3, cost_model="500m", cost_samples_per_microbatch=8,
                      failure_seed=1000 + arg.seed)
    if arg.method != "none" and arg.rate > 0:
        config.sim.update(failures="hourly", failure_rate=arg.rate)
    config.method.update(name=arg.method, lr_scale=1.2, checkpoint_every=10,
                         recovery=arg.recovery, opt_rule=arg.opt_rule)
    return config
