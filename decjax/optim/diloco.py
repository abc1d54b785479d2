"""DiLoCo: ``H`` local steps, then an outer optimizer step on the all-reduced pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv 2311.08105, Algorithm 1.
"""

import jax
import optax

from decjax.optim import replicas
from decjax.optim.outer import OuterState, periodic_outer_step

DiLoCoState = OuterState

# Outer settings of the two DiLoCo baselines in the literature.
PRESETS = {
    # Douillard et al.: Nesterov momentum 0.9, outer lr 0.7, H = 500.
    "original": dict(sync_every=500, outer_lr=0.7, outer_momentum=0.9, nesterov=True),
    # The baseline of the NoLoCo paper and code: heavy-ball momentum 0.3, H = 100.
    "noloco_paper": dict(sync_every=100, outer_lr=0.7, outer_momentum=0.3, nesterov=False),
}


def diloco(
    inner: optax.GradientTransformation,
    *,
    sync_every: int = 500,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    nesterov: bool = True,
    outer: optax.GradientTransformation | None = None,
    axis_name: str | None = "replica",
    pack_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""DiLoCo: ``sync_every`` inner steps, then ``outer`` on the mean pseudo-gradient.

    Every ``sync_every`` updates all replicas all-reduce the pseudo-gradient
    :math:`\Delta = \mathrm{mean}_i(\phi - \theta_i)` (anchor minus fast weights; a descent
    direction, so it is fed to ``outer`` like a gradient) and step the shared anchor:
    :math:`\phi \leftarrow \phi + \mathrm{outer}(\Delta)`; every replica restarts from
    :math:`\phi`. The anchor and the outer state are float32 and identical on all replicas;
    the inner state is kept. ``update(..., sync=True | False)`` skips the ``lax.cond`` when the
    loop knows its sync steps (:mod:`decjax.optim.outer`).

    The defaults are the original paper's (Nesterov, 0.7, 0.9, ``H`` = 500);
    ``diloco(inner, **PRESETS["noloco_paper"])`` is the baseline of the NoLoCo paper.
    With a single replica (``axis_name=None``) and ``outer=optax.sgd(a)``, DiLoCo is
    ``optax.lookahead(inner, sync_every, a)`` without its state reset:
    :math:`\phi \leftarrow \phi + a(\theta - \phi)`.

    Args:
      inner: the per-replica optimizer, e.g. ``optax.adamw(4e-4, weight_decay=0.1)``.
      sync_every: inner steps per outer step (``H``).
      outer_lr: outer learning rate (ignored when ``outer`` is given).
      outer_momentum: outer momentum (ignored when ``outer`` is given).
      nesterov: Nesterov (True) or heavy-ball (False) outer momentum.
      outer: any outer optimizer; default ``optax.sgd(outer_lr, outer_momentum, nesterov)``.
      axis_name: the replica axis; ``None`` runs a single replica.
      pack_state: store the anchor and outer state as flat buffers (see :func:`noloco`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`DiLoCoState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from decjax.optim import anchor_of, diloco, stack_replicas
      >>> tx = diloco(optax.adam(1e-2), sync_every=1)
      >>> params = stack_replicas({"w": jnp.zeros(3)}, 4)
      >>> grads = {"w": jnp.arange(12.0).reshape(4, 3)}
      >>> step = jax.vmap(tx.update, axis_name="replica")
      >>> updates, state = jax.jit(step)(grads, jax.vmap(tx.init)(params), params)
      >>> anchor = jax.vmap(anchor_of)(state, params)["w"]
      >>> bool((anchor == anchor[:1]).all())   # one shared anchor
      True

    References:
      Douillard et al., DiLoCo, arXiv 2311.08105, Algorithm 1.
    """
    if outer is None:
        outer = optax.sgd(outer_lr, momentum=outer_momentum or None, nesterov=nesterov)

    def outer_rule(fast, anchor, outer_state, round_index):
        del round_index
        pseudo_grad = replicas.mean(jax.tree.map(lambda a, f: a - f, anchor, fast), axis_name)
        step, outer_state = outer.update(pseudo_grad, outer_state, anchor)
        return optax.apply_updates(anchor, step), outer_state

    return periodic_outer_step(inner, sync_every, outer.init, outer_rule, axis_name,
                               pack_state)
