"""NoLoCo: an outer optimizer that averages with a random peer instead of all-reducing.

Kolehmainen et al., "NoLoCo: No-all-reduce Low Communication Training Method for Large
Models", arXiv 2506.10911; reference code ``gensyn-ai/noloco`` (``sparse_optimizer_c.py``).
"""

import math
import warnings

import jax
import jax.numpy as jnp
import optax

from decjax.optim import replicas
from decjax.optim.outer import OuterState, periodic_outer_step

NoLoCoState = OuterState


class StabilityWarning(UserWarning):
    """Outer hyperparameters outside the window where NoLoCo's analysis bounds the variance."""


def stability_window(outer_momentum: float, group_size: int) -> tuple[float, float]:
    """The open interval of ``gamma`` in which NoLoCo's replica variance stays bounded.

    From the paper's Appendix A: ``sqrt(n / (2(n-1))) * alpha < gamma <
    sqrt(n / (2(n-1)) * (2 + alpha**2))``; for pairs (n = 2),
    ``alpha < gamma < sqrt(2 + alpha**2)``.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: the window needs groups of at least 2")
    c = group_size / (2 * (group_size - 1))
    return math.sqrt(c) * outer_momentum, math.sqrt(c * (2 + outer_momentum**2))


def _concrete(x) -> float | None:
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _warn_if_unstable(outer_lr, outer_momentum, gamma, group_size) -> None:
    alpha, beta, gamma = (_concrete(v) for v in (outer_momentum, outer_lr, gamma))
    if None in (alpha, beta, gamma) or group_size < 2:
        return
    low, high = stability_window(alpha, group_size)
    if not low < gamma < high:
        warnings.warn(
            f"noloco: gamma={gamma} is outside the stability window {low:.3f} < gamma < "
            f"{high:.3f} for outer_momentum={alpha}, group_size={group_size} "
            "(NoLoCo paper, App. A); replicas may drift apart", StabilityWarning, stacklevel=3)
    if not beta > alpha:
        warnings.warn(
            f"noloco: outer_lr={beta} <= outer_momentum={alpha}; the paper's convergence "
            "condition for the mean needs outer_lr > outer_momentum (App. A)",
            StabilityWarning, stacklevel=3)


def noloco(
    inner: optax.GradientTransformation,
    *,
    sync_every: int = 50,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.5,
    gamma: float | None = None,
    group_size: int = 2,
    axis_name: str | None = "replica",
    seed: int = 0,
    pool_size: int = 64,
    pack_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""NoLoCo: ``sync_every`` inner steps, then a momentum step towards a random peer group.

    Every ``sync_every`` updates, replica :math:`i` with anchor :math:`\phi_i`, fast weights
    :math:`\theta_i` and outer momentum :math:`\delta_i` in a random group :math:`G` of
    ``group_size`` replicas does

    .. math::
      \delta_i \leftarrow \alpha\,\delta_i + \beta\,\mathrm{mean}_G(\theta_j - \phi_j)
                 - \gamma\,(\phi_i - \mathrm{mean}_G\,\phi_j), \qquad
      \phi_i \leftarrow \phi_i + \delta_i, \qquad \theta_i \leftarrow \phi_i

    with :math:`\alpha` = ``outer_momentum``, :math:`\beta` = ``outer_lr``. This is the sign
    of the paper's proof (App. A.2) and code; Eq. 2 as printed has :math:`-\beta`. The step is
    heavy-ball momentum, as in the reference (the paper calls it Nesterov).

    With ``gamma=None`` (:math:`\gamma = \beta`, the reference setting) the step simplifies to
    :math:`\delta_i \leftarrow \alpha\delta_i + \beta(\mathrm{mean}_G\theta_j - \phi_i)`, so a
    replica only needs its peers' fast weights: one parameter-sized message per peer (our
    algebraic simplification; the reference code exchanges anchor and step separately). Any
    other ``gamma`` also exchanges the anchors. The anchor and momentum are float32 whatever
    the parameter dtype; the inner state is kept across outer steps.

    Groups are redrawn every outer step from a pool of ``pool_size`` random groupings drawn
    with ``seed``, identical on all replicas, so the exchange compiles once (see
    :mod:`decjax.optim.replicas`). Run ``update`` under ``jax.vmap(..., axis_name=axis_name)``
    or ``jax.shard_map`` over a mesh axis ``axis_name`` (:func:`decjax.optim.replicate`).
    A loop that knows its sync steps may pass ``update(..., sync=True | False)`` to skip the
    ``lax.cond`` (:mod:`decjax.optim.outer`).

    Args:
      inner: the per-replica optimizer, e.g. ``optax.adam(6e-4)``.
      sync_every: inner steps per outer step (``H``; paper: 50).
      outer_lr: :math:`\beta` (paper: 0.7).
      outer_momentum: :math:`\alpha` (paper: 0.5).
      gamma: weight of the pull towards the group's mean anchor; ``None`` means ``outer_lr``.
      group_size: replicas per group (paper: 2); when it does not divide the number of
        replicas, the replicas left over join the first groups (pairs: one group of three).
      axis_name: the replica axis; ``None`` runs a single replica (its group is itself).
      seed: seed of the peer draws.
      pool_size: number of distinct groupings the draws pick from.
      pack_state: store the anchor and momentum as one flat buffer each (fast non-sync steps;
        read with :func:`decjax.optim.anchor_of`); ``False`` keeps them parameter-shaped,
        for parameters sharded within a replica (:mod:`decjax.optim.outer`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`NoLoCoState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from decjax.optim import noloco, stack_replicas
      >>> tx = noloco(optax.adam(1e-2), sync_every=2)
      >>> params = stack_replicas({"w": jnp.zeros(3)}, 4)           # 4 replicas
      >>> state = jax.vmap(tx.init)(params)
      >>> grads = {"w": jnp.arange(12.0).reshape(4, 3)}
      >>> step = jax.vmap(tx.update, axis_name="replica")
      >>> updates, state = jax.jit(step)(grads, state, params)
      >>> state.count.tolist()
      [1, 1, 1, 1]

    References:
      Kolehmainen et al., NoLoCo, arXiv 2506.10911, Eq. 1-3 and App. A.
    """
    if isinstance(group_size, jax.Array) or isinstance(seed, jax.Array):
        raise TypeError("group_size and seed fix the shape of the peer exchange; with "
                        "optax.inject_hyperparams pass static_args=('group_size', 'seed')")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if pool_size < 1:
        raise ValueError(f"pool_size={pool_size} must be >= 1")
    _warn_if_unstable(outer_lr, outer_momentum, outer_lr if gamma is None else gamma, group_size)

    def peer_mean(tree, round_index):
        return replicas.group_mean(tree, round_index, axis_name, group_size=group_size,
                                   pool_size=pool_size, seed=seed)

    def outer_rule(fast, anchor, momentum, round_index):
        if gamma is None:
            mean_fast = peer_mean(fast, round_index)
            momentum = jax.tree.map(lambda d, a, m: outer_momentum * d + outer_lr * (m - a),
                                    momentum, anchor, mean_fast)
        else:
            mean_fast, mean_anchor = peer_mean((fast, anchor), round_index)
            momentum = jax.tree.map(
                lambda d, a, mf, ma: outer_momentum * d + outer_lr * (mf - ma)
                - gamma * (a - ma), momentum, anchor, mean_fast, mean_anchor)
        return jax.tree.map(lambda a, d: a + d, anchor, momentum), momentum

    def zero_momentum(anchor):
        return jax.tree.map(jnp.zeros_like, anchor)

    return periodic_outer_step(inner, sync_every, zero_momentum, outer_rule, axis_name,
                               pack_state)
