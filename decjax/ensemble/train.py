"""Vmapped training of a group of domain experts, each with its own budget and schedule.

The experts of one :class:`~decjax.ensemble.experts.ExpertGroup` share one (padded) model.
Their parameters and optimizer states are stacked on a leading ``E`` axis
(:class:`ExpertState`), and one pure per-expert step runs under
``jax.vmap(..., axis_name="expert")``, or one expert slice per device under ``jax.shard_map``
over a mesh axis ``"expert"`` (nothing crosses that axis). Per-expert quantities are *data*:

* ``total_steps[E]``: each expert's learning-rate schedule ends at its own budget;
* ``active[E]``: a finished (or paused) expert keeps its parameters and optimizer state
  bit-identical, and a new mask never recompiles;
* ``d_ff[E]``: the true SwiGLU width; gradients and updates of padded units are zeroed.

Parameters and optimizer state are float32 master copies whatever the compute dtype.
``tx`` gives the update *direction* (e.g. :func:`adam_direction`); the step multiplies it by
``-lr_schedule(step, total_steps) * lr_scale``.

Example::

    ensembles = hdee_ensembles(base, groups, d_ff=(96, 128, 160), steps=(300, 400, 500))
    corpus = domain_corpus(load_data(config.data, seq_len=64))
    seed_params, _ = train_seed_model(dataclasses.replace(base, d_ff=128), corpus,
                                      corpus.domains, steps=1000, lr_schedule=cosine_lr(6e-4),
                                      batch_size=16)
    group = group_by_shape(ensembles["M_Ho-I_He"])[0]
    params_E, history = train_experts(group, corpus, lr_schedule=cosine_lr(6e-5),
                                      batch_size=16, seeds=seed_params, eval_every=50)
    experts = unstack_experts(group, params_E)   # {name: unpadded params}
"""

import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from decjax import tree
from decjax.ensemble.domains import DomainCorpus, assign_domains, expert_streams
from decjax.ensemble.experts import (
    ExpertGroup,
    ExpertSpec,
    apply_d_ff_mask,
    group_by_shape,
    pad_d_ff,
    params_d_ff,
    unpad_d_ff,
)
from decjax.models.llama import LlamaConfig
from decjax.models.staged import StagedLlama, full_route
from decjax.train.step import accumulate_grads, split_microbatches
from decjax.types import Params, PyTree

AXIS = "expert"
LRSchedule = Callable[[jax.Array, jax.Array], jax.Array]
"""``lr_schedule(step, total_steps) -> lr``, elementwise in ``jnp`` (vmapped per expert)."""


# -- learning-rate schedules of (step, total_steps) -----------------------------------------


def _check_schedule(peak_lr, warmup_steps, final_ratio) -> None:
    if not isinstance(peak_lr, int | float) or peak_lr <= 0:
        raise ValueError(f"peak_lr={peak_lr!r} must be a positive number")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} must be a non-negative integer")
    if not 0 <= final_ratio <= 1:
        raise ValueError(f"final_ratio={final_ratio!r} must lie in [0, 1]")


def _warmup(t, warmup_steps: int):
    return jnp.minimum((t + 1.0) / max(warmup_steps, 1), 1.0)


def constant_lr(lr: float) -> LRSchedule:
    _check_schedule(lr, 0, 1.0)
    return lambda step, total_steps: jnp.full(jnp.shape(step), lr, jnp.float32)


def cosine_lr(peak_lr: float, *, warmup_steps: int = 0, final_ratio: float = 0.1) -> LRSchedule:
    """Linear warmup, then cosine decay to ``final_ratio * peak_lr`` at the expert's budget."""
    _check_schedule(peak_lr, warmup_steps, final_ratio)

    def schedule(step, total_steps):
        t, total = step.astype(jnp.float32), total_steps.astype(jnp.float32)
        progress = jnp.clip((t - warmup_steps) / jnp.maximum(total - warmup_steps, 1.0), 0, 1)
        decay = final_ratio + (1 - final_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return peak_lr * jnp.where(t < warmup_steps, _warmup(t, warmup_steps), decay)

    return schedule


def wsd_lr(peak_lr: float, *, warmup_steps: int = 0, decay_fraction: float = 0.2,
           final_ratio: float = 0.0) -> LRSchedule:
    """Warmup-stable-decay: linear decay over the last ``decay_fraction`` of each budget."""
    _check_schedule(peak_lr, warmup_steps, final_ratio)
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"decay_fraction={decay_fraction!r} must lie in (0, 1]")

    def schedule(step, total_steps):
        t, total = step.astype(jnp.float32), total_steps.astype(jnp.float32)
        n_decay = jnp.maximum(jnp.round(decay_fraction * total), 1.0)
        done = jnp.clip((t - (total - n_decay) + 1) / n_decay, 0, 1)
        stable = jnp.where(t < warmup_steps, _warmup(t, warmup_steps), 1.0)
        return peak_lr * jnp.minimum(stable, 1 - (1 - final_ratio) * done)

    return schedule


def adam_direction(*, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, clip_norm: float = 1.0
                   ) -> optax.GradientTransformation:
    """Clip, Adam moments, decoupled weight decay: a direction with no learning rate."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*parts)


# -- stacked state ---------------------------------------------------------------------------


class ExpertState(NamedTuple):
    """Everything the vmapped step reads and writes; every leaf has a leading ``E`` axis."""

    step: jax.Array         # int32[E] steps taken
    total_steps: jax.Array  # int32[E] each expert's budget (its schedule ends there)
    d_ff: jax.Array         # int32[E] true SwiGLU width (units beyond it are padding)
    lr_scale: jax.Array     # float32[E] per-expert learning-rate multiplier
    params: Params
    opt_state: optax.OptState


def init(init_fn: Callable[[jax.Array], PyTree], key: jax.Array, n: int) -> PyTree:
    """``n`` independent initialisations stacked on a leading axis."""
    return jax.vmap(init_fn)(jax.random.split(key, n))


def apply(apply_fn: Callable) -> Callable:
    """``apply_fn(params, x)`` over stacked params, with ``x`` shared by every expert."""
    return jax.vmap(apply_fn, in_axes=(0, None))


def branch(seed_params: PyTree, n: int) -> PyTree:
    """``n`` copies of one seed model on a leading axis (BTM's branching)."""
    return tree.stack([seed_params] * n)


def _as_seeds(seeds) -> dict[int, Params]:
    if isinstance(seeds, Mapping) and "io" in seeds:
        return {params_d_ff(seeds): seeds}
    return dict(seeds)


def _independent_params(group: ExpertGroup, key: jax.Array) -> list[Params]:
    # Keyed by name and initialised at the expert's own width, so an expert starts from the
    # same weights whichever group (and padding) it is trained in.
    out = [None] * len(group.specs)
    for d_ff in sorted({s.d_ff for s in group.specs}):
        idx = [i for i, s in enumerate(group.specs) if s.d_ff == d_ff]
        keys = jnp.stack([jax.random.fold_in(key, zlib.crc32(group.specs[i].name.encode()) >> 1)
                          for i in idx])
        params = jax.vmap(StagedLlama(group.specs[idx[0]].config, 1).init)(keys)
        for j, i in enumerate(idx):
            out[i] = tree.index(params, j)
    return out


def group_params(group: ExpertGroup, *, key: jax.Array | None = None, seeds=None) -> Params:
    """Stacked initial parameters of a group, zero-padded to its ``d_ff``.

    Args:
      group: the experts.
      key: independent initialisation; expert ``name`` of width ``d_ff`` draws a model of its
        own width from ``fold_in(key, crc32(name) >> 1)`` (one compilation per width).
      seeds: branch instead: a seed model's params, or ``{d_ff: params}`` with one seed per
        width; every expert starts as a copy of the seed of its width.
    """
    if seeds is None:
        singles = _independent_params(group, jax.random.key(0) if key is None else key)
    else:
        seeds = _as_seeds(seeds)
        missing = sorted({s.d_ff for s in group.specs} - set(seeds))
        if missing:
            raise ValueError(f"seeds: no seed model of d_ff {missing}; available: {sorted(seeds)}")
        singles = [seeds[s.d_ff] for s in group.specs]
    width = group.config.hidden_dim
    return tree.stack([pad_d_ff(p, s.config, width)
                       for p, s in zip(singles, group.specs, strict=True)])


def _float32(params: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def init_expert_state(params_E: Params, tx: optax.GradientTransformation, *,
                      total_steps: Sequence[int], d_ff: Sequence[int] | None = None,
                      lr_scale: Sequence[float] | None = None) -> ExpertState:
    """Float32 master params, vmapped optimizer init and the per-expert data."""
    params_E = _float32(params_E)
    n = jax.tree.leaves(params_E)[0].shape[0]
    d_ff = [params_d_ff(params_E)] * n if d_ff is None else d_ff
    lr_scale = [1.0] * n if lr_scale is None else lr_scale
    for field, values in (("total_steps", total_steps), ("d_ff", d_ff), ("lr_scale", lr_scale)):
        if len(values) != n:
            raise ValueError(f"{field} has {len(values)} entries for {n} experts")
    return ExpertState(step=jnp.zeros((n,), jnp.int32),
                       total_steps=jnp.asarray(total_steps, jnp.int32),
                       d_ff=jnp.asarray(d_ff, jnp.int32),
                       lr_scale=jnp.asarray(lr_scale, jnp.float32),
                       params=params_E, opt_state=jax.vmap(tx.init)(params_E))


# -- the step --------------------------------------------------------------------------------


def expert_step_fn(model: StagedLlama, tx: optax.GradientTransformation,
                   lr_schedule: LRSchedule, *, n_microbatches: int = 1) -> Callable:
    """The pure one-expert ``step(state, rows_BT1, active) -> (state, metrics)``.

    The expert trains only if ``active`` and ``step < total_steps``; otherwise every leaf of
    its state is returned unchanged (a ``where``, so bit-identical).
    """
    route_MP = jnp.asarray(full_route(n_microbatches, model.n_stages))

    def step(state: ExpertState, rows_BT1: jax.Array, active: jax.Array):
        rows_MBT1 = split_microbatches(rows_BT1, n_microbatches)
        loss, grads = accumulate_grads(model, state.params, rows_MBT1, route_MP)
        grads = apply_d_ff_mask(grads, state.d_ff)
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = lr_schedule(state.step, state.total_steps) * state.lr_scale
        updates = apply_d_ff_mask(jax.tree.map(lambda d: -lr * d, direction), state.d_ff)
        params = optax.apply_updates(state.params, updates)
        run = jnp.logical_and(active, state.step < state.total_steps)
        new = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        new = jax.tree.map(lambda n, o: jnp.where(run, n, o), new, state)
        metrics = {"loss": loss, "lr": lr, "grad_norm": optax.tree.norm(grads), "active": run}
        return new, metrics

    return step


def _over_experts(fn: Callable, mesh, in_specs, out_specs) -> Callable:
    if mesh is None:
        return jax.vmap(fn, axis_name=AXIS, in_axes=in_specs, out_axes=out_specs)
    spec = lambda axes: tuple(jax.P() if a is None else jax.P(AXIS) for a in axes)
    local = jax.vmap(fn, in_axes=in_specs, out_axes=out_specs)
    # Nothing crosses the expert axis; check_vma would reject the unvarying initial carries of
    # the loss and gradient scans (decjax.train.step.accumulate_grads).
    return jax.shard_map(local, mesh=mesh, in_specs=spec(in_specs), out_specs=spec(out_specs),
                         check_vma=False)


def make_expert_train_step(model: StagedLlama, tx: optax.GradientTransformation,
                           lr_schedule: LRSchedule, *, n_microbatches: int = 1,
                           mesh: jax.sharding.Mesh | None = None, donate: bool = True) -> Callable:
    """Jitted ``step(state_E, rows_EBT1, active_E) -> (state_E, metrics_E)``.

    Args:
      model: the group's (padded) model.
      tx: the update direction (no learning rate), e.g. :func:`adam_direction`.
      lr_schedule: ``(step, total_steps) -> lr``, evaluated per expert.
      n_microbatches: gradient accumulation steps per optimizer step.
      mesh: ``None`` vmaps over ``E`` on one device; a mesh with an ``"expert"`` axis whose size
        divides ``E`` runs ``E / n`` experts per device (place inputs with :func:`shard_experts`).
      donate: donate the input state (do not reuse it after the call).
    """
    step = _over_experts(expert_step_fn(model, tx, lr_schedule, n_microbatches=n_microbatches),
                         mesh, (0, 0, 0), (0, 0))
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_expert_eval(model: StagedLlama, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Jitted ``eval(params_E, rows_NBT1) -> (loss_sum[E], n_tokens[E])`` on shared rows."""
    route_P = jnp.arange(model.n_stages, dtype=jnp.int32)

    def one(params, rows_NBT1):
        def body(acc, rows_BT1):
            loss, n_tokens = model.loss(params, rows_BT1, route_P)
            return (acc[0] + loss * n_tokens, acc[1] + n_tokens), None

        zero = jnp.zeros((), jnp.float32)
        return jax.lax.scan(body, (zero, zero), rows_NBT1)[0]

    return jax.jit(_over_experts(one, mesh, (0, None), (0, 0)))


def expert_mesh(n_experts: int, devices: Sequence | None = None) -> jax.sharding.Mesh | None:
    """A 1-D ``"expert"`` mesh on the most devices that divide ``n_experts``; ``None`` for 1."""
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts={n_experts!r} must be a positive integer")
    devices = list(jax.devices() if devices is None else devices)
    n = max(d for d in range(1, min(len(devices), n_experts) + 1) if n_experts % d == 0)
    if n == 1:
        return None
    return jax.make_mesh((n,), (AXIS,), devices=devices[:n],
                         axis_types=(jax.sharding.AxisType.Explicit,))


def shard_experts(tree_E: PyTree, mesh: jax.sharding.Mesh | None) -> PyTree:
    """Places every leaf's leading ``E`` axis along the mesh axis ``"expert"``."""
    if mesh is None:
        return tree_E
    return jax.device_put(tree_E, jax.NamedSharding(mesh, jax.P(AXIS)))


def unstack_experts(group: ExpertGroup, params_E: Params) -> dict[str, Params]:
    """``{name: params}`` with each expert cut back to its own ``d_ff``."""
    return {s.name: unpad_d_ff(tree.index(params_E, i), s.d_ff)
            for i, s in enumerate(group.specs)}


# -- host loop -------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainHistory:
    """What :func:`train_experts` measured.

    Attributes:
      names: expert names, in stacking order.
      config: the group's (padded) architecture.
      train: one record per expert and step it trained: ``{"step", "expert", "loss", "lr",
        "grad_norm", "epochs"}`` (``step`` counts from 1).
      evals: ``{"step", "expert", "expert_step", "domain", "loss"}`` on ``val`` rows at step 0,
        every ``eval_every`` steps and at every expert's last step.
    """

    names: tuple[str, ...]
    config: LlamaConfig
    train: list[dict] = dataclasses.field(default_factory=list)
    evals: list[dict] = dataclasses.field(default_factory=list)

    def train_loss(self, expert: str) -> np.ndarray:
        return np.array([r["loss"] for r in self.train if r["expert"] == expert])

    def val_loss(self, expert: str, domain: str) -> np.ndarray:
        """``float[n, 2]``: (expert_step, loss) at each evaluation."""
        return np.array([(r["expert_step"], r["loss"]) for r in self.evals
                         if r["expert"] == expert and r["domain"] == domain])

    def final_val_loss(self, expert: str, domain: str) -> float:
        return float(self.val_loss(expert, domain)[-1, 1])


def _as_group(specs) -> ExpertGroup:
    if isinstance(specs, ExpertGroup):
        return specs
    groups = group_by_shape(list(specs), max_pad_ratio=math.inf)
    if len(groups) != 1:
        raise ValueError("specs differ in more than d_ff and cannot share one vmapped run; "
                         "train each group of group_by_shape(specs) separately")
    return groups[0]


def _eval_sets(corpus: DomainCorpus, domains, eval_rows: int, batch_size: int) -> dict:
    """``{domain: int32[N, B, T+1]}`` from the first ``val`` rows (remainder dropped)."""
    domains = [d for d in corpus.domains if len(corpus.rows["val"][d])] if domains is None \
        else domains
    sets = {}
    for d in domains:
        rows = corpus.get("val", d)[:eval_rows]
        if len(rows) == 0:
            raise ValueError(f"eval_domains: domain {d!r} has no val rows")
        size = min(batch_size, len(rows))
        n = len(rows) // size
        sets[d] = jnp.asarray(rows[: n * size].reshape(n, size, rows.shape[1]))
    return sets


def _evaluate(history, eval_fn, params_E, sets, step: int, expert_steps) -> None:
    for domain, rows in sets.items():
        loss_sum, n_tokens = jax.device_get(eval_fn(params_E, rows))
        for i, name in enumerate(history.names):
            history.evals.append({"step": step, "expert": name, "expert_step": expert_steps[i],
                                  "domain": domain, "loss": float(loss_sum[i] / n_tokens[i])})


def _log_train(history, metrics, step: int, epochs: dict, bar) -> None:
    metrics = jax.device_get(metrics)  # waits for that step only
    losses = []
    for i, name in enumerate(history.names):
        if metrics["active"][i]:
            losses.append(float(metrics["loss"][i]))
            history.train.append({"step": step, "expert": name, "loss": losses[-1],
                                  "lr": float(metrics["lr"][i]),
                                  "grad_norm": float(metrics["grad_norm"][i]),
                                  "epochs": epochs[name]})
    bar.set_postfix(loss=f"{np.mean(losses):.3f}", active=len(losses), refresh=False)


def train_experts(specs: ExpertGroup | Sequence[ExpertSpec], corpus: DomainCorpus, *,
                  lr_schedule: LRSchedule, batch_size: int, seed: int = 0,
                  tx: optax.GradientTransformation | None = None, seeds=None,
                  lr_scale: Sequence[float] | None = None, n_microbatches: int = 1,
                  eval_every: int = 0, eval_domains: Sequence[str] | None = None,
                  eval_rows: int = 64, mesh=None, progress: bool = True
                  ) -> tuple[Params, TrainHistory]:
    """Trains a group of experts together for ``max(steps)`` iterations.

    Args:
      specs: an :class:`ExpertGroup`, or specs that differ only in ``d_ff`` (padded together).
      corpus: the data; expert ``i`` reads batches of its own domains' training rows.
      lr_schedule: ``(step, total_steps) -> lr``; each expert's ends at its own ``steps``.
      batch_size: rows per step per expert.
      seed: data order and (without ``seeds``) independent initialisation.
      tx: update direction; default :func:`adam_direction`.
      seeds: branch from seed models (see :func:`group_params`).
      lr_scale: per-expert learning-rate multipliers.
      n_microbatches: gradient accumulation per step.
      eval_every: evaluate every this many steps (0: only at step 0 and each expert's end).
      eval_domains: domains scored on their first ``eval_rows`` val rows (default all).
      eval_rows: val rows per domain.
      mesh: ``None`` (vmap on one device), ``"auto"`` (:func:`expert_mesh`) or a mesh with an
        ``"expert"`` axis whose size divides ``E``.
      progress: show a tqdm bar.

    Returns:
      ``(params_E, history)``: stacked float32 params (padded to the group's ``d_ff``; see
      :func:`unstack_experts`) and a :class:`TrainHistory`.
    """
    group = _as_group(specs)
    assign_domains(corpus, {s.name: s.domains for s in group.specs})
    for field, value, low in (("batch_size", batch_size, 1), ("eval_rows", eval_rows, 1),
                              ("eval_every", eval_every, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{field}={value!r} must be an integer >= {low}")
    steps = np.array([s.steps for s in group.specs])
    n = len(group.specs)
    mesh = expert_mesh(n) if isinstance(mesh, str) and mesh == "auto" else mesh
    model = StagedLlama(group.config, n_stages=1)
    tx = adam_direction() if tx is None else tx
    params = group_params(group, key=jax.random.key(seed), seeds=seeds)
    state = shard_experts(init_expert_state(
        params, tx, total_steps=steps.tolist(), d_ff=[s.d_ff for s in group.specs],
        lr_scale=lr_scale), mesh)
    step_fn = make_expert_train_step(model, tx, lr_schedule, n_microbatches=n_microbatches,
                                     mesh=mesh)
    eval_fn = make_expert_eval(model, mesh)
    streams = expert_streams(corpus, {s.name: s.domains for s in group.specs},
                             batch_size=batch_size, seed=seed)
    sets = _eval_sets(corpus, eval_domains, eval_rows, batch_size)
    eval_at = {*steps.tolist(), *(range(eval_every, steps.max() + 1, eval_every)
                                  if eval_every else ())}
    history = TrainHistory(names=group.names, config=group.config)
    idle = np.zeros((batch_size, corpus.row_len), np.int32)
    pending = None
    with tqdm(total=int(steps.max()), disable=not progress, desc=f"experts x{n}",
              unit="step", dynamic_ncols=True) as bar:
        _evaluate(history, eval_fn, state.params, sets, 0, np.zeros(n, int))
        for t in range(int(steps.max())):
            active = t < steps
            rows = np.stack([streams[s.name].next() if a else idle
                             for s, a in zip(group.specs, active, strict=True)])
            state, metrics = step_fn(state, shard_experts(jnp.asarray(rows), mesh),
                                     shard_experts(jnp.asarray(active), mesh))
            if pending is not None:
                _log_train(history, *pending, bar)
            pending = (metrics, t + 1, {name: streams[name].epochs for name in group.names})
            bar.update()
            if t + 1 in eval_at:
                _evaluate(history, eval_fn, state.params, sets, t + 1, np.minimum(steps, t + 1))
        if pending is not None:
            _log_train(history, *pending, bar)
    return state.params, history


def train_seed_model(config, corpus: DomainCorpus, domains: Sequence[str], *, steps: int,
                     **kwargs) -> tuple[Params, TrainHistory]:
    """Trains one plain model (a seed or a dense baseline) with the same step (``E = 1``).

    ``config`` is a :class:`~decjax.models.LlamaConfig` with an explicit ``d_ff``; ``kwargs``
    are those of :func:`train_experts`. Returns unstacked params.
    """
    spec = ExpertSpec("seed", tuple(domains), config.hidden_dim, steps, config)
    params_E, history = train_experts([spec], corpus, **kwargs)
    return tree.index(params_E, 0), history
