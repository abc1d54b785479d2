"""HDEE: a seed run, one of three compute-matched ensembles of domain experts, or the dense
baseline; alone or over processes.

    python -m decjax.train --config=configs/hdee.py:ensemble=seed,size=tiny \
        --workdir=runs/hdee-seed
    python -m decjax.train --config=configs/hdee.py:ensemble=M_Ho-I_He,size=tiny \
        --config.run.init_from=runs/hdee-seed --workdir=runs/hdee-steps
    python -m decjax.launch --processes=3 -- python -m decjax.train \
        --config=configs/hdee.py:size=tiny --workdir=runs/hdee-3p

Variants: ``ensemble`` (``seed``: S/M/L seed models on every training domain; M_Ho-I_Ho
homogeneous, M_He-I_Ho sizes S/M/L, M_Ho-I_He steps T-d/T/T+d; ``dense``: one M model with an
ensemble's compute), ``seed`` (initialisation and data order), ``size`` (``small``: the HDEE
experiment's setup, six training domains in three difficulty groups, each a Markov chain and a
standard-library package, and four held-out domains; ``quick``: the same with the
experiment's quick step counts; ``tiny``: three Markov domains, seconds on a CPU). Experts and
the dense model branch from a seed run named by ``run.init_from`` (empty: independent
initialisations). Fields: ``run.*`` (:class:`decjax.train.experts.ExpertsConfig`) and
``dist.*``. The device count (processes x devices per process) must divide the number of
models; a killed process's experts are reported lost and their budget accounted.
"""

import dataclasses

import ml_collections

from configs import base
from decjax.dist import default_dist_config
from decjax.train.experts import RUN_KINDS, ExpertsConfig

# The experiment's domains, fixed before training: each group pairs a Markov chain (entropy
# rate 0.58, 1.51, 2.10 nats/byte) with a stdlib package (gzip ratio 0.149, 0.228, 0.246).
SMALL = dict(domains=("markov3_v4_a0.2+encodings", "markov2_v8+asyncio",
                      "markov2_v16+distutils"),
             held_out=("xml", "multiprocessing", "unittest", "markov1_v8"))
QUICK = dict(SMALL, steps=(30, 45, 60), seed_steps=60, eval_every=15, eval_rows=16,
             test_rows=64)
TINY = dict(d_ff=(24, 32, 40), steps=(12, 18, 24), seed_steps=12, d_model=32, n_heads=2,
            n_layers=1, seq_len=32, batch_size=4, warmup_steps=3, eval_every=6, eval_rows=8,
            docs_per_domain=8, doc_len=1024, test_rows=16, prior_rows=8)
SEED_LR, EXPERT_LR = 3e-3, 1e-3  # peak learning rates: seed models, experts and dense


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = base.parse_arg(arg, ensemble="M_He-I_Ho", seed=0, size="small")
    sizes = {"small": SMALL, "quick": QUICK, "tiny": TINY}
    if arg.size not in sizes:
        raise ValueError(f"config variant size={arg.size!r}: one of {', '.join(sizes)}")
    if arg.ensemble not in RUN_KINDS:
        raise ValueError(f"config variant ensemble={arg.ensemble!r}: one of "
                         f"{', '.join(RUN_KINDS)}")
    run = ExpertsConfig(ensemble=arg.ensemble, seed=arg.seed,
                        lr=SEED_LR if arg.ensemble == "seed" else EXPERT_LR, **sizes[arg.size])
    config = ml_collections.ConfigDict()
    config.trainer = "experts"
    config.run = dataclasses.asdict(run)
    config.dist = default_dist_config()
    config.dist.join_check_every = 0  # a lost expert has no live copy to rejoin from
    return config
