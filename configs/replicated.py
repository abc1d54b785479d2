"""Replicated training: data parallel, DiLoCo or NoLoCo, one replica per device, any processes.

    python -m decjax.train --config=configs/replicated.py:method=diloco,size=tiny \
        --workdir=runs/diloco-tiny
    python -m decjax.launch --processes=4 -- python -m decjax.train \
        --config=configs/replicated.py:method=noloco,size=tiny --workdir=runs/noloco-4p
    JAX_NUM_CPU_DEVICES=4 python -m decjax.train \
        --config=configs/noloco.py:stages=4,failures=0.02,recovery=peer_copy \
        --workdir=runs/noloco-lost-stages

Variants: ``method`` (dp, diloco, diloco_nesterov, noloco), ``replicas`` (R; with the launcher
it must equal processes x devices per process), ``seed``, ``steps`` (0: the size's
default; else with a warmup of 4 % and 10 evaluations), ``size`` (``small``: the NoLoCo experiment's
proxy; ``tiny``: seconds on a CPU), ``stages`` (blocks, one pipeline stage each; 0: the size's),
``failures`` (probability per step that a replica loses an interior stage's node) and
``recovery`` (checkfree, checkfree_uniform or peer_copy; :mod:`decjax.train.stage_failures`).
Fields: ``run.*`` (:class:`ReplicatedConfig`) and ``dist.*`` (failure detection and joins,
:func:`decjax.dist.default_dist_config`). Alone, the run stacks its replicas on this process's
devices (one per device: set ``JAX_NUM_CPU_DEVICES`` on a CPU).
"""

import dataclasses

import ml_collections

from configs import base
from decjax.dist import default_dist_config
from decjax.train.replicated import ReplicatedConfig

TINY = dict(steps=30, global_batch=8, seq_len=32, d_model=32, n_heads=2, n_layers=1, d_ff=64,
            warmup_steps=3, sync_every=5, eval_every=10, eval_batches=2, eval_batch_size=8,
            max_bytes_per_domain=100_000)
SMALL = dict(global_batch=32, seq_len=64, d_model=64, n_heads=4, n_layers=2, d_ff=128,
             lr=3e-3, eval_batches=4, eval_batch_size=16)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = base.parse_arg(arg, method="noloco", replicas=4, seed=0, steps=0, size="small",
                         stages=0, failures=0.0, recovery="checkfree")
    sizes = {"tiny": TINY, "small": SMALL}
    if arg.size not in sizes:
        raise ValueError(f"config variant size={arg.size!r}: one of {', '.join(sizes)}")
    fields = dict(sizes[arg.size], method=arg.method, n_replicas=arg.replicas, seed=arg.seed,
                  stage_failure_rate=arg.failures, stage_recovery=arg.recovery)
    if arg.stages:
        fields["n_layers"] = arg.stages
    if arg.steps:  # warmup 4 % of the run (the NoLoCo paper's 1000 of 25k), 10 evaluations
        fields.update(steps=arg.steps, warmup_steps=max(1, arg.steps // 25),
                      eval_every=max(1, arg.steps // 10))
    if arg.size == "tiny":
        fields["global_batch"] = 2 * arg.replicas  # two sequences per replica
    if arg.method == "dp":
        fields["sync_every"] = 0  # every step
    run = ReplicatedConfig(**fields)
    config = ml_collections.ConfigDict()
    config.trainer = "replicated"
    config.run = dataclasses.asdict(run)
    config.dist = default_dist_config()
    return config
