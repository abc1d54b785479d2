"""NoLoCo's random pipeline routing across ``R`` data-parallel replicas of a staged model.

Every params leaf carries a leading replica axis ``R`` (e.g. from
:func:`decjax.optim.replicas.stack_replicas`). Replica ``r`` embeds its own batch and runs body
stage 0; after each body stage ``s < S - 1`` every sample moves to another replica's stage
``s + 1``, and the head runs on the replica where the sample finished body stage ``S - 1``.

**Routes** ``int32[S - 1, R, B]``: ``routes[s, r, b]`` is the *destination* replica of the
sample in slot ``b`` of replica ``r`` at the boundary after body stage ``s`` (the reference's
sender rule: rank ``r`` sends to ``perm[r]``). A sample keeps its slot ``b``; ``routes[s, :, b]``
must be a permutation, so every replica receives exactly one sample per slot (load balance).

**The io stage.** decjax keeps embedding and head together in ``params["io"]``. Routing follows
the NoLoCo reference, whose first pipeline stage holds the embedding and whose last holds the
head: the embedding runs on the sample's own replica (where its data lives) and the head on the
replica of its last body stage, so replica ``r``'s ``io`` gets embedding gradient from its own
samples and head gradient from the samples that arrive at it. There are no routes around the io
stage, hence ``S - 1`` boundaries (none for ``S = 1``).

Gradients follow the same path back: the moves are gathers, whose transpose sends each
cotangent to the replica the sample came from. Evaluate with :func:`identity_replica_routes`.

The reference (``gensyn-ai/noloco``, ``dipaco_pipeline.py``) sends activations between
processes; this single-program form (stacked replicas, a gather per stage boundary) is our
reconstruction of the same routing rule, not a port of its transport. A NoLoCo training step
differentiates :func:`routed_replica_loss` over all replicas and then runs the optimizer under
``decjax.optim.replicate``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decjax.models.staged import StagedLlama
from decjax.types import Params


def identity_replica_routes(n_replicas: int, n_stages: int, batch: int) -> jax.Array:
    """``int32[S - 1, R, B]`` routes that keep every sample on its own replica (evaluation)."""
    stay = jnp.arange(n_replicas, dtype=jnp.int32)[None, :, None]
    return jnp.broadcast_to(stay, (max(n_stages - 1, 0), n_replicas, batch))


def random_replica_routes(key: jax.Array, n_replicas: int, n_stages: int, batch: int) -> jax.Array:
    """An independent random permutation of the replicas per boundary and per sample slot.

    Args:
      key: a fresh key per step (jittable; the sizes are static).
      n_replicas: ``R``.
      n_stages: ``S``, body stages; routes cover the ``S - 1`` boundaries between them.
      batch: ``B``, sequences per replica.

    Returns:
      ``int32[S - 1, R, B]``: ``routes[s, r, b]`` is the replica that receives the sample in
      slot ``b`` of replica ``r`` after body stage ``s``.

    Example::

        routes = jax.jit(random_replica_routes, static_argnums=(1, 2, 3))(key, 4, 2, 8)
        assert (jnp.sort(routes, axis=1) == jnp.arange(4)[None, :, None]).all()
    """
    stay = identity_replica_routes(n_replicas, n_stages, batch)
    return jax.random.permutation(key, stay, axis=1, independent=True)


def move_samples(x_RB: jax.Array, destinations_RB: jax.Array) -> jax.Array:
    """Moves the sample in slot ``b`` of replica ``r`` to replica ``destinations_RB[r, b]``.

    Args:
      x_RB: any array ``[R, B, ...]`` (activations, token ids, origin ids).
      destinations_RB: ``int32[R, B]``, a permutation of the replicas in every column ``b``.

    Returns:
      ``x_RB`` with ``out[destinations_RB[r, b], b] = x_RB[r, b]``.

    Example::

        x_RB = jnp.array([[10], [11], [12]])
        move_samples(x_RB, jnp.array([[1], [2], [0]]))  # [[12], [10], [11]]
    """
    # A gather with the inverse permutation (the argsort of a permutation) rather than a
    # scatter: the transpose of the gather moves each gradient back to its sample's sender.
    sources_RB = jnp.argsort(destinations_RB, axis=0)
    index = sources_RB.reshape(sources_RB.shape + (1,) * (x_RB.ndim - 2))
    return jnp.take_along_axis(x_RB, index, axis=0)


def routed_replica_forward(model: StagedLlama, params_R: Params, tokens_RBT: jax.Array,
                           routes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits of ``R`` replicas' batches routed through the replicas' stages.

    Args:
      model: the staged model that every replica runs.
      params_R: staged params, every leaf with a leading ``R`` axis.
      tokens_RBT: replica ``r``'s own batch in ``tokens_RBT[r]``.
      routes: ``int32[S - 1, R, B]`` (see the module docstring); an argument, so new routes
        reuse one compilation.

    Returns:
      ``(logits_RBTV, origin_RB)``: ``logits_RBTV[r, b]`` is computed by replica ``r``'s head
      for the sample that started in slot ``b`` of replica ``origin_RB[r, b]``.

    Example::

        fwd = jax.jit(functools.partial(routed_replica_forward, model))
        logits_RBTV, origin_RB = fwd(params_R, tokens_RBT, random_replica_routes(key, R, S, B))
    """
    _check_routes(tokens_RBT, routes, model.n_stages)
    n_replicas, batch = tokens_RBT.shape[:2]
    x = jax.vmap(model.embed)(params_R["io"], tokens_RBT)
    origin_RB = jnp.broadcast_to(jnp.arange(n_replicas, dtype=jnp.int32)[:, None],
                                 (n_replicas, batch))
    for stage in range(model.n_stages):
        stage_params_R = jax.tree.map(lambda leaf, s=stage: leaf[:, s], params_R["body"])
        x = jax.vmap(model.apply_stage)(stage_params_R, x)
        if stage < model.n_stages - 1:
            x = move_samples(x, routes[stage])
            origin_RB = move_samples(origin_RB, routes[stage])
    return jax.vmap(model.head)(params_R["io"], x), origin_RB


def routed_replica_loss(model: StagedLlama, params_R: Params, rows_RBT1: jax.Array,
                        routes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-replica mean next-token cross-entropy of the samples each replica's head processed.

    The targets travel with their samples; pad targets are masked out as in
    :meth:`StagedLlama.loss`. Differentiate the *sum* over replicas: a stage's gradient then
    collects every sample that passed through it, whichever head scored it.

    Args:
      model: the staged model that every replica runs.
      params_R: staged params, every leaf with a leading ``R`` axis.
      rows_RBT1: replica ``r``'s packed rows ``[B, T + 1]`` in ``rows_RBT1[r]``.
      routes: ``int32[S - 1, R, B]``.

    Returns:
      ``(loss_R, n_tokens_R)``.

    Example::

        def objective(params_R, rows_RBT1, routes):
            return routed_replica_loss(model, params_R, rows_RBT1, routes)[0].sum()

        grads_R = jax.jit(jax.grad(objective))(params_R, rows_RBT1, routes)
    """
    inputs_RBT, targets_RBT = rows_RBT1[..., :-1], rows_RBT1[..., 1:]
    logits_RBTV, origin_RB = routed_replica_forward(model, params_R, inputs_RBT, routes)
    targets_RBT = jnp.take_along_axis(targets_RBT, origin_RB[..., None], axis=0)
    losses_RBT = optax.softmax_cross_entropy_with_integer_labels(logits_RBTV, targets_RBT)
    mask_RBT = (targets_RBT != model.config.pad_id).astype(jnp.float32)
    n_tokens_R = jnp.sum(mask_RBT, axis=(1, 2))
    loss_R = jnp.sum(losses_RBT * mask_RBT, axis=(1, 2)) / jnp.maximum(n_tokens_R, 1.0)
    return loss_R, n_tokens_R


def _check_routes(tokens_RBT, routes, n_stages: int) -> None:
    if tokens_RBT.ndim != 3:
        raise ValueError(f"tokens must be [R, B, T], got shape {tokens_RBT.shape}")
    expected = (max(n_stages - 1, 0), *tokens_RBT.shape[:2])
    if routes.shape != expected or not jnp.issubdtype(routes.dtype, jnp.integer):
        raise ValueError(f"routes must be int[S - 1, R, B] = {expected}, got "
                         f"{routes.dtype}{list(routes.shape)}")
    if isinstance(routes, np.ndarray) and not (
            np.sort(routes, axis=1) == np.arange(expected[1])[:, None]).all():
        raise ValueError("every routes[s, :, b] must be a permutation of the replicas")
