"""HDEE: one of three compute-matched ensembles of domain experts, alone or over processes.

    python -m decjax.train --config=configs/hdee.py:ensemble=M_He-I_Ho,size=tiny \
        --workdir=runs/hdee-tiny
    python -m decjax.launch --processes=3 -- python -m decjax.train \
        --config=configs/hdee.py:size=tiny --workdir=runs/hdee-3p

Variants: ``ensemble`` (M_Ho-I_Ho homogeneous, M_He-I_Ho sizes S/M/L, M_Ho-I_He steps
T-d/T/T+d), ``size`` (``small``: the HDEE experiment's proxy, three Markov domains; ``tiny``:
seconds on a CPU). Fields: ``run.*`` (:class:`decjax.train.experts.ExpertsConfig`) and
``dist.*``. The device count (processes x devices per process) must divide the number of
experts; a killed process's experts are reported lost and their budget accounted.
"""

import dataclasses

import ml_collections

from configs import base
from decjax.dist import default_dist_config
from decjax.train.experts import ExpertsConfig

TINY = dict(d_ff=(24, 32, 40), steps=(12, 18, 24), d_model=32, n_heads=2, n_layers=1,
            seq_len=32, batch_size=4, warmup_steps=3, eval_every=6, eval_rows=8,
            docs_per_domain=8, doc_len=1024)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = base.parse_arg(arg, ensemble="M_He-I_Ho", size="small")
    sizes = {"tiny": TINY, "small": {}}
    if arg.size not in sizes:
        raise ValueError(f"config variant size={arg.size!r}: one of {', '.join(sizes)}")
    run = ExpertsConfig(ensemble=arg.ensemble, **sizes[arg.size])
    config = ml_collections.ConfigDict()
    config.trainer = "experts"
    config.run = dataclasses.asdict(run)
    config.dist = default_dist_config()
    config.dist.join_check_every = 0  # a lost expert has no live copy to rejoin from
    return config
