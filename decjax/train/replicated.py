"""R replicas of one small Llama on one device: data parallel, DiLoCo or NoLoCo.

The replicas' parameters and optimizer states are stacked on a leading ``R`` axis and stepped
together under ``jax.vmap(..., axis_name="replica")`` (:func:`decjax.optim.replicate`); the
optimizers' collectives (``pmean``, the NoLoCo peer exchange) are the ones a mesh run uses, and
give the same numbers (:mod:`decjax.optim.replicas`). Every run keeps the tokens per step
fixed: a global batch of ``global_batch`` sequences is split into ``R`` per-replica batches,
and replica ``r`` reads only shard ``r`` of the training data, in its own order.

Methods (one per run):

* ``dp``: data parallel. Per-replica gradients are averaged with ``lax.pmean`` every step and
  the inner optimizer is applied; the replicas stay one model.
* ``diloco``: DiLoCo as the NoLoCo paper's baseline (``PRESETS["noloco_paper"]``: heavy-ball
  momentum 0.3, outer lr 0.7, ``H`` = 100).
* ``diloco_nesterov``: DiLoCo with the original outer optimizer (Nesterov momentum 0.9, outer
  lr 0.7); the original ``H`` = 500 is too long for short runs, so ``H`` defaults to 100.
* ``noloco``: NoLoCo (``H`` = 50, momentum 0.5, ``beta = gamma = 0.7``, random pairs).

The inner optimizer is the NoLoCo paper's: Adam (0.9, 0.999), eps 1e-8, no weight decay, each
replica clipping its own gradient to global norm 1.0, linear warmup then cosine decay to 0.1x
the peak, on inner steps.

Evaluation reports (a) the mean of the replicas' validation losses, (b) the loss of the
parameter-averaged model (what one final all-reduce would give) and (c) the cross-replica
spread of the parameters.
"""

import dataclasses
import functools
import json
import numbers
import pathlib
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from tqdm.auto import tqdm

from decjax.data import LMData, default_data_config, eval_batches, load_data, train_iterator
from decjax.models import Llama, LlamaConfig
from decjax.optim import DILOCO_PRESETS, diloco, noloco, replicate, stack_replicas
from decjax.train.stage_failures import RECOVERIES, failure_trace, rebuild_lost

AXIS = "replica"
METHODS = ("dp", "diloco", "diloco_nesterov", "noloco")
NOLOCO = dict(outer_lr=0.7, outer_momentum=0.5, group_size=2, pool_size=64)
DEFAULT_SYNC_EVERY = {"dp": 1, "diloco": DILOCO_PRESETS["noloco_paper"]["sync_every"],
                      "diloco_nesterov": 100, "noloco": 50}


@dataclasses.dataclass(frozen=True)
class ReplicatedConfig:
    """One replicated training run; every field is checked when the config is built.

    Attributes:
      method: one of :data:`METHODS`.
      n_replicas: ``R``.
      steps: inner steps.
      global_batch: sequences per step over all replicas (``R`` must divide it).
      seq_len: tokens per sequence.
      d_model, n_heads, n_layers, d_ff: the Llama's shape (``d_ff=0``: ``4 * d_model``).
      lr: peak inner learning rate.
      warmup_steps: linear warmup steps; then cosine decay to ``min_lr_ratio * lr``.
      min_lr_ratio: final learning rate as a fraction of ``lr``.
      clip_norm: per-replica global gradient-norm clip (0 disables).
      sync_every: ``H``; 0 takes the method's default (:data:`DEFAULT_SYNC_EVERY`).
      eval_every: steps between evaluations (and the last step).
      eval_batches, eval_batch_size: the fixed validation set.
      seed: model init, data order and NoLoCo's peer draws.
      max_bytes_per_domain: cap on each data domain (0: all of it).
      progress: show a progress bar.
      stage_failure_rate: probability, after each step, that a replica loses the node of one
        of its interior blocks (each replica a pipeline of one block per stage;
        :mod:`decjax.train.stage_failures`); 0: no failures.
      stage_recovery: how a lost block is rebuilt: ``"checkfree"`` (its neighbours' average,
        weighted by their gradient norms), ``"checkfree_uniform"`` (equal weights) or
        ``"peer_copy"`` (the same block of a peer replica).
    """

    method: str = "noloco"
    n_replicas: int = 4
    steps: int = 1000
    global_batch: int = 32
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    sync_every: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    eval_batch_size: int = 32
    seed: int = 0
    max_bytes_per_domain: int = 0
    progress: bool = True
    stage_failure_rate: float = 0.0
    stage_recovery: str = "checkfree"

    def __post_init__(self):
        _check_config(self)

    @property
    def h(self) -> int:
        """Inner steps between synchronisations (1 for data parallel)."""
        return self.sync_every or DEFAULT_SYNC_EVERY[self.method]


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"ReplicatedConfig.{field}={value!r} is not allowed: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_config(c: ReplicatedConfig) -> None:
    _require(c.method in METHODS, "method", c.method, f"one of {', '.join(METHODS)}")
    for field in ("n_replicas", "steps", "global_batch", "seq_len", "d_model", "n_heads",
                  "n_layers", "eval_every", "eval_batches", "eval_batch_size"):
        value = getattr(c, field)
        _require(_is_int(value) and value > 0, field, value, "a positive integer")
    for field in ("d_ff", "warmup_steps", "sync_every", "seed", "max_bytes_per_domain"):
        value = getattr(c, field)
        _require(_is_int(value) and value >= 0, field, value, "an integer >= 0")
    _require(_is_real(c.lr) and c.lr > 0, "lr", c.lr, "a number > 0")
    _require(_is_real(c.clip_norm) and c.clip_norm >= 0, "clip_norm", c.clip_norm,
             "a number >= 0 (0 disables clipping)")
    _require(_is_real(c.min_lr_ratio) and 0 <= c.min_lr_ratio <= 1, "min_lr_ratio",
             c.min_lr_ratio, "a number in [0, 1]")
    _require(c.warmup_steps <= c.steps, "warmup_steps", c.warmup_steps,
             f"at most steps={c.steps}")
    _require(c.global_batch % c.n_replicas == 0, "global_batch", c.global_batch,
             f"a multiple of n_replicas={c.n_replicas} (equal tokens per replica)")
    _require(c.d_model % c.n_heads == 0 and (c.d_model // c.n_heads) % 2 == 0, "n_heads",
             c.n_heads, f"must divide d_model={c.d_model} into heads of even width (rotary)")
    _require(c.method != "dp" or c.sync_every in (0, 1), "sync_every", c.sync_every,
             "0 or 1 for method='dp' (data parallel syncs every step)")
    _require(_is_real(c.stage_failure_rate) and 0 <= c.stage_failure_rate < 1,
             "stage_failure_rate", c.stage_failure_rate, "a probability in [0, 1)")
    _require(c.stage_recovery in RECOVERIES, "stage_recovery", c.stage_recovery,
             f"one of {', '.join(RECOVERIES)}")
    if c.stage_failure_rate:
        _require(c.n_layers >= 3, "n_layers", c.n_layers,
                 "at least 3 with stage_failure_rate > 0 (blocks 1 .. n_layers - 2 can fail)")
        _require(c.stage_recovery != "peer_copy" or c.n_replicas >= 2, "stage_recovery",
                 c.stage_recovery, "needs n_replicas >= 2 (a peer to copy from)")


# -- model and optimizers ---------------------------------------------------------------------


def make_model(config: ReplicatedConfig, vocab_size: int) -> Llama:
    shape = LlamaConfig(vocab_size=vocab_size, d_model=config.d_model, n_heads=config.n_heads,
                        n_layers=config.n_layers, d_ff=config.d_ff)
    return Llama(shape, nnx.Rngs(config.seed))


def make_inner(config: ReplicatedConfig) -> optax.GradientTransformation:
    """Adam (0.9, 0.999, eps 1e-8), no weight decay, per-replica clipping, warmup + cosine."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
        decay_steps=config.steps, end_value=config.lr * config.min_lr_ratio)
    adam = optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)
    if not config.clip_norm:
        return adam
    # No pmean inside this chain: every replica clips the norm of its own gradient.
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adam)


def make_optimizer(config: ReplicatedConfig) -> optax.GradientTransformation:
    """The per-replica optimizer of ``config.method``; it talks to the others over ``AXIS``."""
    inner, h = make_inner(config), config.h
    # Lost blocks are rebuilt leaf by leaf, so the anchor and momentum stay parameter-shaped.
    outer = dict(axis_name=AXIS, pack_state=not config.stage_failure_rate)
    if config.method == "dp":
        return inner  # the gradient is averaged in the train step
    if config.method == "diloco":
        return diloco(inner, **(DILOCO_PRESETS["noloco_paper"] | dict(sync_every=h)), **outer)
    if config.method == "diloco_nesterov":
        return diloco(inner, **(DILOCO_PRESETS["original"] | dict(sync_every=h)), **outer)
    return noloco(inner, sync_every=h, seed=config.seed, **outer, **NOLOCO)


# -- pure steps -------------------------------------------------------------------------------


class Replicas(NamedTuple):
    """Parameters and optimizer states of all replicas, each leaf with a leading ``R`` axis."""

    params: Any
    opt_state: Any


def init_replicas(config: ReplicatedConfig, vocab_size: int):
    """``(graphdef, optimizer, replicas)``; every replica starts from the same weights."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(config, vocab_size)))
    tx = make_optimizer(config)

    @jax.jit  # one compiled program instead of one per eager initializer op
    def init():
        state = nnx.split(make_model(config, vocab_size))[1]
        params = stack_replicas(nnx.to_pure_dict(state), config.n_replicas)
        return Replicas(params, jax.vmap(tx.init)(params))

    return graphdef, tx, init()


def next_token_loss(graphdef, params, rows_BT1: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats per token) of packed rows ``[B, T+1]``."""
    logits = nnx.merge(graphdef, params)(rows_BT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, rows_BT1[:, 1:]).mean()


def make_train_step(graphdef, tx: optax.GradientTransformation, method: str,
                    mesh: jax.sharding.Mesh | None = None):
    """Jitted ``step(replicas, rows_RBT1) -> (replicas, loss_R, block_grad_norms_RL)``: one
    inner step per replica, with the gradient norm of each transformer block (CheckFree's
    weights when a block is lost, :mod:`decjax.train.stage_failures`).

    ``mesh=None`` stacks the replicas on one device (``vmap``); a mesh with axis ``"replica"``
    runs one replica per device, across processes too (``shard_map``).
    """

    def replica_step(params, opt_state, rows_BT1):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(graphdef, p, rows_BT1))(params)
        if method == "dp":
            grads = lax.pmean(grads, AXIS)
        norms = jnp.stack([optax.tree.norm(grads["blocks"][b]) for b in sorted(grads["blocks"])])
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, norms

    step = replicate(replica_step, axis_name=AXIS, mesh=mesh)

    @jax.jit
    def train_step(replicas: Replicas, rows_RBT1: jax.Array):
        params, opt_state, loss_R, norms_RL = step(replicas.params, replicas.opt_state,
                                                   rows_RBT1)
        return Replicas(params, opt_state), loss_R, norms_RL

    return train_step


def average(params_R):
    """The parameter-averaged model (the result of one all-reduce)."""
    return jax.tree.map(lambda x: x.mean(axis=0), params_R)


def parameter_spread(params_R) -> jax.Array:
    """Root-mean-square over all parameters of their standard deviation across replicas."""
    leaves = jax.tree.leaves(params_R)
    total_var = sum(jnp.var(x, axis=0).sum() for x in leaves)
    return jnp.sqrt(total_var / sum(x[0].size for x in leaves))


def make_evaluate(graphdef, rows_NBT1: np.ndarray, out_shardings=None):
    """Jitted ``evaluate(params_R) -> (loss_R, averaged_loss, spread)`` on fixed rows.

    ``out_shardings``: e.g. a replicated ``NamedSharding``, so that every process of a
    multi-process run can read the results.
    """
    rows_NBT1 = jnp.asarray(rows_NBT1)

    def loss_of(params):
        per_batch = lax.map(lambda rows: next_token_loss(graphdef, params, rows), rows_NBT1)
        return per_batch.mean()

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def evaluate(params_R):
        return (jax.vmap(loss_of)(params_R), loss_of(average(params_R)),
                parameter_spread(params_R))

    return evaluate


# -- data and the loop ------------------------------------------------------------------------


def load_run_data(config: ReplicatedConfig) -> LMData:
    """The Python standard library, byte tokenizer, packed into rows of ``seq_len + 1``."""
    data_config = default_data_config()
    data_config.max_bytes_per_domain = config.max_bytes_per_domain
    return load_data(data_config, seq_len=config.seq_len)


def replica_batches(data: LMData, config: ReplicatedConfig) -> Iterator[np.ndarray]:
    """Endless ``int32[R, global_batch / R, T+1]``: replica ``r`` reads data shard ``r``."""
    per_replica = config.global_batch // config.n_replicas
    shards = [train_iterator(data, batch_size=per_replica, seed=config.seed,
                             shard_index=r, num_shards=config.n_replicas, prefetch=0)
              for r in range(config.n_replicas)]
    while True:
        yield np.stack([next(shard) for shard in shards])


@dataclasses.dataclass
class RunResult:
    """Curves and final numbers of one run (JSON-friendly; losses in nats per token, i.e.
    per byte with the byte tokenizer).

    ``val_*`` lists are aligned with ``eval_steps``; ``train_loss`` is the replicas' mean
    training loss at every step.
    """

    config: dict
    sync_every: int
    n_params: int
    eval_steps: list[int]
    val_loss_mean: list[float]
    val_loss_averaged: list[float]
    spread: list[float]
    final_replica_losses: list[float]
    train_loss: list[float]
    outer_steps: int
    wall_seconds: float
    stage_failures: int = 0

    @property
    def final(self) -> dict[str, float]:
        return {"val_loss_mean": self.val_loss_mean[-1],
                "val_loss_averaged": self.val_loss_averaged[-1], "spread": self.spread[-1]}


def _outer_steps(opt_state) -> int:
    rounds = getattr(opt_state, "round", None)
    return 0 if rounds is None else int(rounds[0])


def train(config: ReplicatedConfig, data: LMData | None = None) -> RunResult:
    """Trains ``config.n_replicas`` replicas with ``config.method`` and evaluates them."""
    start = time.perf_counter()
    data = data if data is not None else load_run_data(config)
    graphdef, tx, replicas = init_replicas(config, data.vocab_size)
    train_step = make_train_step(graphdef, tx, config.method)
    evaluate = make_evaluate(graphdef, np.stack(eval_batches(
        data, batch_size=config.eval_batch_size, num_batches=config.eval_batches)))
    batches = replica_batches(data, config)
    trace = failure_trace(config.n_replicas, config.n_layers, config.steps,
                          config.stage_failure_rate, config.seed)
    evals, eval_steps, train_losses, lost = [evaluate(replicas.params)], [0], [], 0
    bar = tqdm(range(1, config.steps + 1), disable=not config.progress, leave=False,
               desc=f"{config.method} R={config.n_replicas} seed={config.seed}")
    for step in bar:
        replicas, loss_R, norms_RL = train_step(replicas, next(batches))
        train_losses.append(loss_R.mean())
        if step % config.eval_every == 0 or step == config.steps:
            evals.append(evaluate(replicas.params))
            eval_steps.append(step)
        if step in trace:  # nodes lost after this step, rebuilt before the next
            rebuilt, events = rebuild_lost(replicas, trace[step], list(range(config.n_replicas)),
                                           config.stage_recovery, np.asarray(norms_RL))
            replicas, lost = Replicas(*rebuilt), lost + len(events)
    bar.close()
    losses_R, averaged, spread = (np.asarray(x) for x in zip(*evals, strict=True))
    return RunResult(
        config=dataclasses.asdict(config), sync_every=config.h,
        n_params=sum(x[0].size for x in jax.tree.leaves(replicas.params)),
        eval_steps=eval_steps, val_loss_mean=losses_R.mean(axis=1).tolist(),
        val_loss_averaged=averaged.tolist(), spread=spread.tolist(),
        final_replica_losses=losses_R[-1].tolist(),
        train_loss=np.asarray(train_losses).tolist(),
        outer_steps=_outer_steps(replicas.opt_state),
        wall_seconds=time.perf_counter() - start, stage_failures=lost)


def train_workdir(config, workdir: str | pathlib.Path, data: LMData | None = None) -> RunResult:
    """Trains a ``trainer='replicated'`` config (``configs/replicated.py``) with :func:`train`:
    every replica on this process, whatever its device count (the group trainer,
    :mod:`decjax.train.distributed`, wants one device per replica). Writes the run record that
    :func:`decjax.train.sweep.sweep` reuses: ``config.json``, ``metrics.jsonl`` (the validation
    curve), ``events.jsonl`` (start, end) and ``result.json`` (a :class:`RunResult`); pass it
    as ``sweep(..., train=functools.partial(train_workdir, data=data))``."""
    from decjax.train import records
    from decjax.train.distributed import run_config

    run = run_config(config)
    record = records.RunRecord(workdir)
    record.write_config(config.to_json(sort_keys=True))
    record.event(0, "start", trainer="replicated (vmapped, one process)",
                 replicas=run.n_replicas, method=run.method)
    result = train(run, data)
    for step, mean, averaged, spread in zip(result.eval_steps, result.val_loss_mean,
                                            result.val_loss_averaged, result.spread, strict=True):
        record.metrics(step, "val", {"loss": mean, "loss_averaged": averaged, "spread": spread})
    records.write_atomically(record.workdir / "result.json",
                             json.dumps(dataclasses.asdict(result)))
    record.event(run.steps, "end", val_loss=result.val_loss_mean[-1],
                 wall_seconds=result.wall_seconds)
    record.close()
    return result
