"""Training along SkipPipe paths and inference with omitted stages.

Training (spec skippipe.md §2.8): microbatch ``m`` runs along route row ``m`` of a
:class:`Schedule`, gradients accumulate over the ``M`` microbatches, and each body stage's
gradient is then normalised by one of :data:`NORMALIZATIONS`. Inference (§2.9): io is always
kept, a subset of the body stages runs in increasing order, the others are skipped.

Marked [ref] where the reference does the same, [ours] where this module chooses.
"""

import hashlib
import itertools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decjax.models.staged import StagedLlama
from decjax.skippipe.builders import _groups, round_robin_schedule
from decjax.skippipe.paths import Schedule, _integer, path_length
from decjax.train.step import make_train_step, split_microbatches
from decjax.types import Params

NORMALIZATIONS = {  # mode -> what divides a body stage's summed microbatch gradients
    "visitors": "the microbatches that visited the stage: the reference's distributed runtime, "
                "where balance makes each stage's all-reduce a mean over its visitors [ref, 2.8]",
    "microbatches": "all M microbatches, non-visitors counting as zero (gradients shrink with "
                    "the visit fraction): the reference's convergence emulation [ref, 2.8]",
}
CHOICES = {  # how omitted-stage inference picks the kept body stages
    "spread": "evenly spaced, first and last body stage kept (the first if only one), the "
              "same for every batch [ours]",
    "random": "a uniformly random sorted subset, drawn anew for every batch [ref, fork eval.py]",
}


def visits_per_stage(route_MP, n_stages: int) -> jax.Array:
    """``int32[n_stages]``: how many microbatches visit each body stage (jit-safe).

    Example::

        visits_per_stage(np.array([[0, 1], [0, -1]]), 3)  # [2, 1, 0]
    """
    stages = jnp.arange(n_stages, dtype=jnp.int32).reshape(1, 1, n_stages)
    hit_MPS = jnp.asarray(route_MP)[:, :, None] == stages
    return jnp.sum(jnp.any(hit_MPS, axis=1), axis=0, dtype=jnp.int32)


def _check_mode(mode: str) -> None:
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {mode!r}")


def normalize_stage_grads(grads: Params, route_MP, mode: str = "visitors") -> Params:
    """Rescales the mean-over-``M`` staged gradient per body stage, as ``mode`` says.

    ``grads`` is what ``accumulate_grads`` returns: summed microbatch gradients over ``M``.
    ``"visitors"`` multiplies body stage ``s`` by ``M / k_s`` (``k_s`` its visitors), giving
    the mean over the microbatches that visited it; an unvisited stage stays exactly zero.
    ``"microbatches"`` returns ``grads`` unchanged. ``io`` is seen by every microbatch. The
    reference gets the visitor mean only through exact stage balance; dividing by ``k_s`` on
    unbalanced schedules too is [ours].

    Args:
        grads: staged gradient ``{"io": ..., "body": leaves [S, ...]}``.
        route_MP: ``int32[M, P]`` routes of the step (``-1`` = skip slot); may be traced.
        mode: a key of :data:`NORMALIZATIONS`.

    Returns:
        The rescaled gradient, same structure and dtypes.

    Example::

        g = normalize_stage_grads(grads, np.array([[0, 1], [0, -1]]))  # body[1] doubled
    """
    _check_mode(mode)
    if mode == "microbatches":
        return grads
    n_stages = jax.tree.leaves(grads["body"])[0].shape[0]
    visits = visits_per_stage(route_MP, n_stages)
    scale_S = route_MP.shape[0] / jnp.maximum(visits, 1).astype(jnp.float32)

    def rescale(g):
        return g * scale_S.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)

    return {**grads, "body": jax.tree.map(rescale, grads["body"])}


def make_skippipe_train_step(model: StagedLlama, tx: optax.GradientTransformation, *,
                             normalization: str = "visitors"):
    """``train_step(state, rows_BT1, route_MP) -> (state, metrics)`` along SkipPipe routes.

    ``make_train_step`` with :func:`normalize_stage_grads` as its gradient transform; metrics
    add ``stage_visits``. The route is an argument: schedules of one shape share a compilation.

    Args:
        model: the staged model (``skip_by_branching=True`` avoids computing skipped slots).
        tx: optimizer over staged parameters, e.g. ``stage_adamw``.
        normalization: a key of :data:`NORMALIZATIONS`; ``"visitors"`` by default.

    Returns:
        The pure step function; ``jax.jit`` it.

    Example::

        step = jax.jit(make_skippipe_train_step(model, tx))
        state, metrics = step(state, rows_BT1, schedule.route())
    """
    _check_mode(normalization)
    plain = make_train_step(model, tx, grad_transform=lambda g, r: normalize_stage_grads(
        g, r, normalization))

    def skippipe_train_step(state, rows_BT1: jax.Array, route_MP: jax.Array):
        state, metrics = plain(state, rows_BT1, route_MP)
        return state, {**metrics, "stage_visits": visits_per_stage(route_MP, model.n_stages)}

    return skippipe_train_step


def rotating_schedules(allocation, n_microbatches: int, skip_ratio: float, *,
                       start: int = 0) -> Iterator[Schedule]:
    """Endless balanced schedules, iteration ``t`` being ``round_robin_schedule(shift=t % S)``.

    Over any ``S`` consecutive iterations every microbatch position (data shard) visits each
    body stage equally often, removing the reference's fixed data-shard-to-path bias (spec
    §2.7, §7) [ours]. All schedules share one route shape, so one compilation.

    Args:
        allocation, n_microbatches, skip_ratio: as in :func:`round_robin_schedule`.
        start: iteration of the first schedule yielded (to resume a run).

    Returns:
        An iterator of :class:`Schedule`.

    Example::

        for t, sched in zip(range(steps), rotating_schedules(alloc, 12, 0.25)):
            state, _ = step(state, next(batches), sched.route())
    """
    n_stages = len(_groups(allocation)) - 1
    for t in itertools.count(_integer(start, "start", 0)):
        yield round_robin_schedule(allocation, n_microbatches, skip_ratio, shift=t % n_stages)


def kept_stages(n_stages: int, keep, *, choice: str = "spread", rng=None) -> np.ndarray:
    """The body stages that inference with omitted stages runs, in order.

    A float ``keep`` is the fraction of the reference's ``S = n_stages + 1`` stages kept, io
    counted as one, so it keeps ``path_length(n_stages, 1 - keep)`` body stages: ``0.5`` at
    ``S = 6`` keeps 2 of 5, the reference's "half the model" [ref]. A sequence of ints names
    the kept body stages, run in the given order.

    Args:
        n_stages: number of body stages.
        keep: fraction of all stages, io counted, in ``(0, 1]`` with at least one body stage
            kept; or the body stages to keep.
        choice: a key of :data:`CHOICES` (float ``keep`` only).
        rng: seed or ``np.random.Generator`` for ``choice="random"``.

    Returns:
        ``int32[k]`` body stages.

    Example::

        kept_stages(5, 0.5), kept_stages(3, 0.75), kept_stages(4, [3, 1])  # [0 4] [0 2] [3 1]
    """
    n = _integer(n_stages, "n_stages", 1)
    if not isinstance(keep, int | float | np.floating) or isinstance(keep, bool):
        out = np.asarray(keep)
        if out.ndim != 1 or not out.size or not np.issubdtype(out.dtype, np.integer) \
                or out.min() < 0 or out.max() >= n or np.unique(out).size != out.size:
            raise ValueError(f"kept stages must be distinct integers in [0, {n}), got {keep!r}")
        return out.astype(np.int32)
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {sorted(CHOICES)}, got {choice!r}")
    most = (n - 0.5) / (n + 1)  # the largest skip ratio path_length allows: one stage kept
    if not 1 - most - 1e-9 <= keep <= 1:
        raise ValueError(f"keep must be a fraction in [{1 - most:.4f}, 1] for n_stages={n} "
                         f"(io and at least one body stage), got {keep!r}")
    k = path_length(n, min(max(0.0, 1 - keep), most))
    if choice == "random":
        return np.sort(np.random.default_rng(rng).choice(n, k, replace=False)).astype(np.int32)
    return np.floor(np.linspace(0, n - 1, k) + 0.5).astype(np.int32)


def omitted_stage_route(n_stages: int, keep, n_microbatches: int = 1, *,
                        choice: str = "spread", rng=None, width: int | None = None) -> np.ndarray:
    """``int32[M, width]`` route running :func:`kept_stages` then ``-1`` skip slots.

    ``width`` defaults to ``n_stages``, the full route's shape, so every ``keep`` shares one
    compilation. Every microbatch gets the same stages, drawn once [ref: one draw per batch].

    Example::

        omitted_stage_route(5, 0.5, 2)  # [[0, 4, -1, -1, -1], [0, 4, -1, -1, -1]]
    """
    stages = kept_stages(n_stages, keep, choice=choice, rng=rng)
    width = n_stages if width is None else _integer(width, "width", stages.size)
    route = np.full((_integer(n_microbatches, "n_microbatches", 1), width), -1, np.int32)
    route[:, :stages.size] = stages
    return route


def _eval_sums(model: StagedLlama):
    """``(params, rows_BT1, route_MP) -> [loss_sum, n_tokens, row_ppl_sum, n_rows]``."""

    def sums(params, rows_BT1, route_MP):
        def body(acc, xs):
            rows, route_P = xs
            targets = rows[:, 1:]
            logits = model.microbatch_logits(params, rows[:, :-1], route_P)
            mask = (targets != model.config.pad_id).astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask
            loss_B, tokens_B = ce.sum(axis=1), mask.sum(axis=1)
            row_ppl = jnp.where(tokens_B > 0, jnp.exp(loss_B / jnp.maximum(tokens_B, 1.0)), 0.0)
            return acc + jnp.stack([loss_B.sum(), tokens_B.sum(), row_ppl.sum(),
                                    (tokens_B > 0).sum()]), None

        rows_MBT1 = split_microbatches(rows_BT1, route_MP.shape[0])
        return jax.lax.scan(body, jnp.zeros(4, jnp.float32), (rows_MBT1, route_MP))[0]

    return jax.jit(sums)


def eval_with_omitted_stages(model: StagedLlama, params: Params, batches: Sequence,
                             keep=(1.0, 0.75, 0.5), *, n_microbatches: int = 1,
                             choice: str = "spread", seed=0) -> dict:
    """Loss and perplexity with only some body stages run, per entry of ``keep``.

    ``perplexity`` is ``exp`` of the token-mean loss; ``sequence_perplexity`` is the
    reference's metric, the mean over rows of ``exp(row mean loss)`` [ref]. ``keep=1.0``
    runs the full route, so its loss is the ordinary eval loss.

    Args:
        model, params: the staged model and its parameters.
        batches: packed rows ``[B, T+1]`` each; iterated once per ``keep`` entry.
        keep: fractions or kept-stage lists, as in :func:`kept_stages`.
        n_microbatches: ``M`` each batch is split into (one route row each).
        choice, seed: as in :func:`kept_stages`; one generator per ``keep`` entry.

    Returns:
        ``{keep: {"loss", "perplexity", "sequence_perplexity", "kept_stages"}}``, the last a
        list of one tuple per batch.

    Example::

        eval_with_omitted_stages(model, params, val_batches)[0.5]["perplexity"]
    """
    sums_fn, out = _eval_sums(model), {}
    for entry in keep:
        key = entry if isinstance(entry, int | float) else tuple(entry)
        rng, kept, total = np.random.default_rng(seed), [], np.zeros(4)
        for rows in batches:
            route = omitted_stage_route(model.n_stages, entry, n_microbatches, choice=choice,
                                        rng=rng)
            kept.append(tuple(int(s) for s in route[0] if s >= 0))
            total += np.asarray(jax.device_get(sums_fn(params, rows, jnp.asarray(route))))
        if not total[1]:
            raise ValueError("batches hold no target tokens to evaluate")
        loss = float(total[0] / total[1])
        out[key] = {"loss": loss, "perplexity": float(np.exp(loss)),
                    "sequence_perplexity": float(total[2] / total[3]), "kept_stages": kept}
    return out


def routes_digest(routes) -> str:
    """A short fingerprint of the routes (``int32[M, P]`` each) a run cycles through."""
    return hashlib.sha256(np.stack(routes).astype(np.int32).tobytes()).hexdigest()[:16]


__all__ = [
    "CHOICES",
    "NORMALIZATIONS",
    "eval_with_omitted_stages",
    "kept_stages",
    "make_skippipe_train_step",
    "normalize_stage_grads",
    "omitted_stage_route",
    "rotating_schedules",
    "routes_digest",
    "visits_per_stage",
]
