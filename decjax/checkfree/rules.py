"""Stage recovery without checkpoints: CheckFree, CheckFree+ and ablation rules.

CheckFree (Blagoev, Ersoy, Chen, "All is Not Lost: LLM Recovery without Checkpoints",
arXiv 2506.15461; reference code gensyn-ai/CheckFree) rebuilds a lost body stage ``i`` from its
neighbours::

    W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b),   a = |g_{i+1}|^p + 1e-4,  b = |g_{i-1}|^p + 1e-4

where ``g`` are the neighbours' per-stage gradient norms of the previous step, measured after
per-stage clipping (the reference: ``p = 1``; some summaries say squared norms, ``p = 2``).
The rebuilt stage restarts its Adam state and keeps a raised learning rate (x1.1 or x1.2).

Planning is host-side (:func:`plan_repairs`: which stages are lost this iteration, which
survivors to combine); the repair itself is one jitted function of traced indices and weights
(:func:`interpolate_stage`), so every failure reuses one compilation and every other stage stays
bit-identical.

Beyond the reference:

* **Adjacent failures** use survivors only: a lost stage is rebuilt from the nearest
  *surviving* stage on each side, weighted by gradient norm and by distance, instead of the
  reference's leak of the lost neighbour's pre-failure weights.
* **Optimizer moments** (``opt_rule="average"``): the rebuilt stage's Adam moments are the same
  combination of its sources' moments instead of zeros, which avoids the near sign-SGD first
  step of a fresh Adam at a raised learning rate.
"""

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decjax.optim.staged import PerStageState
from decjax.types import Params, PyTree

RULES = ("weighted", "uniform", "copy", "random")
OPT_RULES = ("fresh", "average")
NORM_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class Repair:
    """How to rebuild one lost body stage: ``(1 - w) * W[left] + w * W[right]``, or re-init."""

    stage: int
    left: int
    right: int
    weight_right: float
    kind: str  # "interpolate" | "copy" | "random"


def swap_partner(stage: int, n_stages: int) -> int | None:
    """CheckFree+'s swap partner of a body stage: 0 <-> 1 and S-2 <-> S-1; ``None`` inside."""
    if n_stages < 4:
        raise ValueError(f"CheckFree+ needs n_stages >= 4 body stages, got {n_stages}")
    pairs = {0: 1, 1: 0, n_stages - 2: n_stages - 1, n_stages - 1: n_stages - 2}
    return pairs.get(stage)


def checkfree_plus_routes(n_microbatches: int, n_stages: int) -> np.ndarray:
    """``int32[M, S]``: even microbatches run in order; odd ones swap the two edge pairs.

    S=6: even ``[0 1 2 3 4 5]``, odd ``[1 0 2 3 5 4]`` (the reference's stages 1..6).
    """
    swap_partner(0, n_stages)  # validates n_stages
    order = np.arange(n_stages, dtype=np.int32)
    swapped = order.copy()
    swapped[[0, 1]] = [1, 0]
    swapped[[n_stages - 2, n_stages - 1]] = [n_stages - 1, n_stages - 2]
    return np.stack([swapped if m % 2 else order for m in range(n_microbatches)])


def neighbour_weight(norm_left: float, norm_right: float, *, power: int = 1,
                     dist_left: int = 1, dist_right: int = 1) -> float:
    """Weight of the right source: ``a / (a + b)`` with distance discounting.

    ``a = (|g_right|^p + 1e-4) / dist_right`` and ``b = (|g_left|^p + 1e-4) / dist_left``; for
    adjacent sources (distances 1) this is exactly the reference rule.
    """
    a = (abs(norm_right) ** power + NORM_EPS) / dist_right
    b = (abs(norm_left) ** power + NORM_EPS) / dist_left
    return a / (a + b)


def plan_repairs(
    failed: Iterable[int],
    n_stages: int,
    *,
    rule: str = "weighted",
    grad_norms: np.ndarray | None = None,
    power: int = 1,
    swaps: bool = False,
) -> list[Repair]:
    """Host-side plan for this iteration's lost stages, using surviving stages only.

    Args:
      failed: body stages lost before this iteration (any order, duplicates ignored).
      n_stages: number of body stages ``S``.
      rule: ``"weighted"`` (CheckFree), ``"uniform"`` (0.5/0.5), ``"copy"`` (the previous
        surviving stage, or the next one for the first stage), ``"random"`` (re-initialise).
      grad_norms: ``float[S]`` per-stage post-clip gradient norms of the previous step.
      power: exponent on the norms (1: reference code; 2: squared, as some summaries say).
      swaps: CheckFree+: a lost edge stage (0, 1, S-2, S-1) copies its swap partner when the
        partner survived.

    Returns:
      One :class:`Repair` per lost stage.

    Raises:
      ValueError: bad arguments, or every stage lost (nothing to rebuild from).
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not allowed: one of {', '.join(RULES)}")
    if power not in (1, 2):
        raise ValueError(f"power={power} is not allowed: 1 or 2")
    lost = sorted(set(int(s) for s in failed))
    if any(not 0 <= s < n_stages for s in lost):
        raise ValueError(f"failed stages {lost} must lie in 0..{n_stages - 1}")
    survivors = [s for s in range(n_stages) if s not in lost]
    if lost and not survivors and rule != "random":
        raise ValueError("every body stage was lost at once; nothing is left to rebuild from")
    norms = np.ones(n_stages) if grad_norms is None else np.asarray(grad_norms, np.float64)
    repairs = []
    for stage in lost:
        if rule == "random":
            repairs.append(Repair(stage, stage, stage, 0.0, "random"))
            continue
        partner = swap_partner(stage, n_stages) if swaps else None
        if partner is not None and partner in survivors:
            repairs.append(Repair(stage, partner, partner, 0.0, "copy"))
            continue
        left = max((s for s in survivors if s < stage), default=None)
        right = min((s for s in survivors if s > stage), default=None)
        if rule == "copy" or left is None or right is None:
            source = left if left is not None else right
            repairs.append(Repair(stage, source, source, 0.0, "copy"))
            continue
        if rule == "uniform":
            weight = (stage - left) / (right - left)  # plain linear interpolation
        else:
            weight = neighbour_weight(norms[left], norms[right], power=power,
                                      dist_left=stage - left, dist_right=right - stage)
        repairs.append(Repair(stage, left, right, float(weight), "interpolate"))
    return repairs


@jax.jit
def interpolate_stage(body: PyTree, stage, left, right, weight_right) -> PyTree:
    """``body[stage] <- (1 - w) * body[left] + w * body[right]`` on every leaf (traced args).

    Integer leaves (e.g. step counts) are taken from ``left``. Every other stage is untouched.
    """

    def combine(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.at[stage].set(leaf[left])
        w = jnp.asarray(weight_right, leaf.dtype)
        return leaf.at[stage].set((1 - w) * leaf[left] + w * leaf[right])

    return jax.tree.map(combine, body)


@jax.jit
def replace_stage(body: PyTree, source: PyTree, stage) -> PyTree:
    """``body[stage] <- source[stage]`` on every leaf (e.g. freshly initialised weights)."""
    return jax.tree.map(lambda leaf, src: leaf.at[stage].set(src[stage]), body, source)


def apply_repairs(
    params: Params,
    opt_state: PerStageState,
    tx: optax.GradientTransformation,
    repairs: list[Repair],
    *,
    fresh_params: Params | None = None,
    lr_scale: float = 1.0,
    opt_rule: str = "fresh",
) -> tuple[Params, PerStageState]:
    """Rebuilds the planned stages' weights and optimizer state; others stay bit-identical.

    All sources are read from the pre-failure ``params`` of *surviving* stages, so the order
    of repairs does not matter.

    Args:
      params: staged parameters.
      opt_state: the per-stage optimizer state (:func:`decjax.optim.per_stage`).
      tx: the transformation that made ``opt_state`` (for fresh states).
      repairs: from :func:`plan_repairs`.
      fresh_params: newly initialised parameters, needed by ``"random"`` repairs.
      lr_scale: persistent learning-rate multiplier of every rebuilt stage (reference: 1.1
        or 1.2).
      opt_rule: ``"fresh"`` (reference: new Adam state) or ``"average"`` (the same combination
        of the sources' Adam moments, step count of the left source).
    """
    if opt_rule not in OPT_RULES:
        raise ValueError(f"opt_rule={opt_rule!r} is not allowed: one of {', '.join(OPT_RULES)}")
    body, opt_body = params["body"], opt_state.body
    for r in repairs:
        if r.kind == "random":
            if fresh_params is None:
                raise ValueError("a 'random' repair needs fresh_params")
            body = replace_stage(body, fresh_params["body"], r.stage)
        else:
            body = interpolate_stage(body, r.stage, r.left, r.right, r.weight_right)
    new_params = {**params, "body": body}
    fresh = tx.init(new_params)
    for r in repairs:
        if opt_rule == "average" and r.kind != "random":
            opt_body = interpolate_stage(opt_body, r.stage, r.left, r.right, r.weight_right)
        else:
            opt_body = replace_stage(opt_body, fresh.body, r.stage)
    stages = np.asarray([r.stage for r in repairs], np.int32)
    new_state = opt_state._replace(body=opt_body)
    if len(stages):
        new_state = new_state._replace(
            stage_steps=opt_state.stage_steps.at[stages].set(0),
            body_lr_scale=opt_state.body_lr_scale.at[stages].set(lr_scale),
        )
    return new_params, new_state


def restore_io(tx: optax.GradientTransformation, opt_state: PerStageState,
               params: Params) -> PerStageState:
    """A lost io stage is copied back from its replicas (weights only): fresh io optimizer."""
    return opt_state._replace(io=tx.init(params).io)


def io_replica_overhead(params: Params) -> dict[str, float]:
    """Storage cost of CheckFree+'s (de)embedding replicas, relative to one body stage.

    The embedding is replicated on the first body stage's node and the final norm + head on
    the last one's, so a lost io stage is restored by copying (weights only).
    """
    def count(tree):
        return float(sum(x.size for x in jax.tree.leaves(tree)))

    io, body = params["io"], params["body"]
    stage = count(body) / jax.tree.leaves(body)[0].shape[0]
    embed = count(io["embed"])
    head = count(io["final_norm"]) + count(io["head"])
    return {"embedding_params": embed, "head_params": head, "stage_params": stage,
            "embedding_fraction_of_stage": embed / stage, "head_fraction_of_stage": head / stage}
