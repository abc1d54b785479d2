import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decjax import tree
from decjax.models import (
    LlamaConfig,
    StagedLlama,
    full_route,
    identity_replica_routes,
    move_samples,
    random_replica_routes,
    routed_replica_forward,
    routed_replica_loss,
)
from decjax.optim.replicas import stack_replicas
from decjax.testing import log_compilations

CFG = LlamaConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=3, d_ff=32)
MODEL = StagedLlama(CFG, n_stages=3)
R, B, T = 3, 2, 6


@functools.cache
def _distinct_params():
    return jax.vmap(MODEL.init)(jax.random.split(jax.random.key(0), R))


def _rows(seed=1):
    """Rows without pad targets, so every replica's head scores the same number of tokens."""
    return jax.random.randint(jax.random.key(seed), (R, B, T + 1), 1, CFG.vocab_size)


def _objective(params_R, rows_RBT1, routes):
    return routed_replica_loss(MODEL, params_R, rows_RBT1, routes)[0].sum()


def test_identity_routes_reproduce_independent_replicas():
    params_R, rows = _distinct_params(), _rows()
    routes = identity_replica_routes(R, MODEL.n_stages, B)
    fwd = jax.jit(functools.partial(routed_replica_forward, MODEL))
    logits, origin = fwd(params_R, rows[..., :-1], routes)
    loss_R, n_tokens_R = jax.jit(functools.partial(routed_replica_loss, MODEL))(
        params_R, rows, routes)
    route = jnp.asarray(full_route(1, MODEL.n_stages))
    forward, loss = jax.jit(MODEL.forward), jax.jit(MODEL.loss)
    for r in range(R):
        params = tree.index(params_R, r)
        expected = forward(params, rows[r, None, :, :-1], route)[0]
        chex.assert_trees_all_close(logits[r], expected, rtol=1e-5, atol=1e-6)
        expected_loss, expected_tokens = loss(params, rows[r], route[0])
        chex.assert_trees_all_close((loss_R[r], n_tokens_R[r]), (expected_loss, expected_tokens),
                                    rtol=1e-6)
    chex.assert_trees_all_equal(origin, jnp.broadcast_to(jnp.arange(R)[:, None], (R, B)))


def test_identical_replicas_give_the_same_total_loss_under_any_routing():
    params_R, rows = stack_replicas(MODEL.init(jax.random.key(0)), R), _rows()
    value_and_grad = jax.jit(jax.value_and_grad(_objective))
    identity = identity_replica_routes(R, MODEL.n_stages, B)
    identity_loss, identity_grads = value_and_grad(params_R, rows, identity)
    for seed in range(3):
        routes = random_replica_routes(jax.random.key(seed), R, MODEL.n_stages, B)
        assert not np.array_equal(routes, identity)
        loss, grads = value_and_grad(params_R, rows, routes)
        chex.assert_trees_all_close(loss, identity_loss, rtol=1e-6)
        # Routing only changes which copy does the work: the gradient summed over copies holds.
        summed = jax.tree.map(lambda g: g.sum(axis=0), (grads, identity_grads))
        chex.assert_trees_all_close(*summed, rtol=1e-4, atol=1e-6)


# Destinations routes[s, r, b]: a 3-cycle for slot 0 at both boundaries, so sending along a
# route and receiving along it (its inverse) lead to different paths.
HAND_ROUTES = jnp.asarray([[[1, 0], [2, 1], [0, 2]],
                           [[0, 2], [2, 0], [1, 1]]], jnp.int32)
# (origin replica, slot) -> replica running (embed + body 0, body 1, body 2 + head).
HAND_PATHS = {(0, 0): (0, 1, 2), (1, 0): (1, 2, 1), (2, 0): (2, 0, 0),
              (0, 1): (0, 0, 2), (1, 1): (1, 1, 0), (2, 1): (2, 2, 1)}


@jax.jit
def _path_loss_and_grads(io_first, stages, io_last, row_T1):
    """Loss of one sequence through the given io and stage params, and its gradients."""

    def loss(io_first, stages, io_last):
        x = MODEL.embed(io_first, row_T1[None, :-1])
        for stage_params in stages:
            x = MODEL.apply_stage(stage_params, x)
        logits = MODEL.head(io_last, x)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, row_T1[1:]).mean()

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(io_first, stages, io_last)


def _hand_composed(params_R, rows_RBT1):
    """Per-head losses and gradients, adding up each path of ``HAND_PATHS`` on its replicas."""
    loss_R = np.zeros(R, np.float32)
    grads = jax.tree.map(jnp.zeros_like, params_R)
    for (origin, slot), path in HAND_PATHS.items():
        stages = [tree.index(params_R["body"], (replica, stage))
                  for stage, replica in enumerate(path)]
        loss, (g_first, g_stages, g_last) = _path_loss_and_grads(
            tree.index(params_R["io"], path[0]), stages, tree.index(params_R["io"], path[-1]),
            rows_RBT1[origin, slot])
        loss_R[path[-1]] += loss / B  # each head averages over the B samples it scores
        for replica, g in ((path[0], g_first), (path[-1], g_last)):
            grads["io"] = jax.tree.map(lambda acc, g, r=replica: acc.at[r].add(g / B),
                                       grads["io"], g)
        for stage, (replica, g) in enumerate(zip(path, g_stages, strict=True)):
            grads["body"] = jax.tree.map(lambda acc, g, i=(replica, stage): acc.at[i].add(g / B),
                                         grads["body"], g)
    return loss_R, grads


def test_gradients_follow_the_routed_path_back():
    params_R, rows = _distinct_params(), _rows()
    assert HAND_PATHS[0, 0] == (0, 1, 2)  # sample 0 of replica 0 runs stage 1 on replica 1

    def routed(params_R, rows_RBT1):
        loss_R = routed_replica_loss(MODEL, params_R, rows_RBT1, HAND_ROUTES)[0]
        return loss_R.sum(), loss_R

    (_, loss_R), grads = jax.jit(jax.value_and_grad(routed, has_aux=True))(params_R, rows)
    expected_loss_R, expected_grads = _hand_composed(params_R, rows)
    chex.assert_trees_all_close(loss_R, expected_loss_R, rtol=1e-5)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_replicas,n_stages,batch", [(3, 3, 500), (4, 2, 7), (2, 1, 3)])
def test_random_routes_are_permutations_per_boundary_and_sample(n_replicas, n_stages, batch):
    make = jax.jit(random_replica_routes, static_argnums=(1, 2, 3))
    routes = np.asarray(make(jax.random.key(0), n_replicas, n_stages, batch))
    assert routes.shape == (n_stages - 1, n_replicas, batch) and routes.dtype == np.int32
    np.testing.assert_array_equal(np.sort(routes, axis=1),
                                  np.broadcast_to(np.arange(n_replicas)[:, None], routes.shape))
    for boundary in routes:  # load balance: each replica receives exactly B samples
        np.testing.assert_array_equal(np.bincount(boundary.ravel()), batch)
    if n_stages > 1:
        assert not np.array_equal(routes, make(jax.random.key(1), n_replicas, n_stages, batch))
    if batch == 500:  # every permutation of 3 replicas shows up among the samples
        assert len({tuple(column) for column in routes[0].T}) == 6


def test_move_samples_sends_each_sample_to_its_destination():
    x_RB = jnp.asarray([[10, 20], [11, 21], [12, 22]])
    destinations_RB = jnp.asarray([[1, 0], [2, 2], [0, 1]])
    chex.assert_trees_all_equal(jax.jit(move_samples)(x_RB, destinations_RB),
                                jnp.asarray([[12, 20], [10, 22], [11, 21]]))


def test_new_routes_do_not_recompile():
    params_R, rows = _distinct_params(), _rows()

    def routed_step(params_R, rows_RBT1, routes):
        return jax.value_and_grad(_objective)(params_R, rows_RBT1, routes)

    step = jax.jit(routed_step)
    routes = [random_replica_routes(jax.random.key(seed), R, MODEL.n_stages, B) for seed in (0, 1)]
    with log_compilations() as compiled:  # the check itself can fail: the first call compiles
        first = step(params_R, rows, routes[0])
    assert "routed_step" in compiled, compiled
    with log_compilations() as compiled:
        second = step(params_R, rows, routes[1])
        step(params_R, rows, HAND_ROUTES)
    assert "routed_step" not in compiled, compiled
    assert not np.allclose(first[0], second[0])


def test_bad_routes_are_rejected():
    params_R, rows = _distinct_params(), _rows()
    with pytest.raises(ValueError, match="routes must be"):
        routed_replica_loss(MODEL, params_R, rows, np.zeros((1, R, B), np.int32))
    with pytest.raises(ValueError, match="permutation"):
        routed_replica_loss(MODEL, params_R, rows, np.zeros((2, R, B), np.int32))


def test_noloco_trains_replicas_along_random_routes():
    """Pipeline x data parallel NoLoCo: routed gradients outside, the vmapped update inside."""
    from decjax.optim import noloco, replicate

    tx = noloco(optax.adam(3e-2), sync_every=2, group_size=R)
    params_R = stack_replicas(MODEL.init(jax.random.key(0)), R)
    rows = _rows()

    @jax.jit
    def train_step(params_R, opt_state, key):
        routes = random_replica_routes(key, R, MODEL.n_stages, B)
        loss, grads_R = jax.value_and_grad(_objective)(params_R, rows, routes)
        step = replicate(lambda g, s, p: tx.update(g, s, p))
        updates, opt_state = step(grads_R, opt_state, params_R)
        return optax.apply_updates(params_R, updates), opt_state, loss

    opt_state = jax.jit(replicate(tx.init))(params_R)
    params_R, opt_state, first = train_step(params_R, opt_state, jax.random.key(1))
    with log_compilations() as compiled:
        for step in range(2, 12):
            params_R, opt_state, loss = train_step(params_R, opt_state, jax.random.key(step))
    assert "train_step" not in compiled
    assert float(loss) < 0.7 * float(first)
    assert int(opt_state.round[0]) == 5
