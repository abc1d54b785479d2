"""SkipPipe: partial pipelines along planned paths on the SkipPipe reference network.

    python -m decjax.train --config=configs/skippipe.py:skip=0.25 --workdir=runs/skip25
    python -m decjax.train --config=configs/skippipe.py:skip=0 --workdir=runs/skip0
    python -m decjax.train --config=configs/skippipe.py:size=tiny --workdir=runs/skip-tiny

Variants: ``skip`` (share of the body stages each microbatch skips, in [0, 1); 0: full
pipelines on the allocation's aligned pipelines, the DT-FM baseline), ``swaps`` (adjacent
swaps allowed per path; the reference: 2), ``until`` (share of the iterations on skip
schedules, full pipelines after), ``layers`` (blocks per stage), ``seed``, ``steps`` (0: the
size's default),
``dataset`` (pystdlib or synthetic), ``size`` (``small``: the SkipPipe experiment's proxy, io
+ 5 body stages of one block, 30 microbatches of 2 x 64 bytes, planner caps as the experiment's
training schedules; ``tiny``: 15 microbatches of 1 x 32, small planner caps, seconds on a CPU). The
clock charges each iteration the simulated makespan of its schedule for the reference's 500M
model (:class:`decjax.train.methods.SkipPipe`); losses are the proxy's, measured. Runs that
should share their schedules read them from a plans file (``--config.method.plans_file``,
written by :func:`decjax.skippipe.save_rotations`), as the SkipPipe experiment does.
"""

import ml_collections

from configs import base

SIZES = ("small", "tiny")
DATASETS = ("pystdlib", "synthetic")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = base.parse_arg(arg, skip=0.25, swaps=2, until=1.0, layers=1, seed=0, steps=0,
                         dataset="pystdlib", size="small")
    if arg.size not in SIZES:
        raise ValueError(f"config variant size={arg.size!r}: one of {', '.join(SIZES)}")
    if arg.dataset not in DATASETS:
        raise ValueError(f"config variant dataset={arg.dataset!r}: one of {', '.join(DATASETS)}")
    tiny = arg.size == "tiny"
    config = base.get_config("size=tiny")
    config.seed = arg.seed
    steps = arg.steps or (12 if tiny else 800)
    d_model = 32 if tiny else 64
    config.model.update(d_model=d_model, n_heads=2 if tiny else 4, n_layers=5 * arg.layers,
                        n_stages=5, d_ff=4 * d_model, seq_len=32 if tiny else 64)
    # Balanced paths need visits that split evenly over 5 stages of 3 nodes: 15 | microbatches.
    microbatches = 15 if tiny else 30
    config.train.update(steps=steps, batch_size=(1 if tiny else 2) * microbatches,
                        microbatches=microbatches,
                        eval_every=6 if tiny else 50, eval_batches=2 if tiny else 8)
    config.data.update(max_bytes_per_domain=60_000 if tiny else 400_000)
    if tiny:
        config.data.domains = ("json", "concurrent")
    if arg.dataset == "synthetic":
        config.data.source = "synthetic"
    config.opt.update(lr=3e-3, warmup_steps=3 if tiny else 20)
    config.ckpt.update(every=steps, keep=1)
    config.log.update(every=5, plot=True)
    config.method.update(name="skippipe", skip_ratio=arg.skip, max_swaps=arg.swaps,
                         skip_until=arg.until)
    if tiny:
        config.method.update(gcma_evaluations=100, plan_evaluations=40, plan_budget_s=0.3)
    return config
