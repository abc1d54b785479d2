"""NoLoCo and DiLoCo: the outer step against NumPy, optax conformance, vmap == shard_map."""

import warnings

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decjax.optim import (
    DILOCO_PRESETS,
    StabilityWarning,
    anchor_of,
    diloco,
    noloco,
    pack,
    replicate,
    shard_replicas,
    stability_window,
    stack_replicas,
    unpack,
)
from decjax.optim.replicas import grouping_pool, groups_of_round
from decjax.testing import log_compilations

INNER_LR = 0.1


def random_tree(seed, lead=()):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(*lead, 3, 4)).astype(np.float32),
            "b": {"c": rng.normal(size=(*lead, 5)).astype(np.float32)}}


def quadratic_grads(params, targets):
    """Gradient of 0.5 * |params - targets|^2, per leaf."""
    return jax.tree.map(lambda p, t: p - t, params, targets)


def run_replicas(tx, n_replicas, n_steps, *, mesh=None, seed=0):
    """Trains R replicas on different quadratic targets; returns params after every step."""
    params = stack_replicas(jax.tree.map(jnp.asarray, random_tree(seed)), n_replicas)
    targets = jax.tree.map(jnp.asarray, random_tree(seed + 1, (n_replicas,)))

    def step(params, state, targets):
        updates, state = tx.update(quadratic_grads(params, targets), state, params)
        return optax.apply_updates(params, updates), state

    if mesh is not None:
        params, targets = shard_replicas((params, targets), mesh)
    state = jax.jit(replicate(tx.init, mesh=mesh))(params)
    step = jax.jit(replicate(step, mesh=mesh))
    history = []
    for _ in range(n_steps):
        params, state = step(params, state, targets)
        history.append(jax.tree.map(np.asarray, params))
    return history, state


def replica_anchors(state):
    """Each replica's anchor as a tree shaped like the parameters of one replica."""
    like = jax.tree.map(jnp.asarray, random_tree(0))
    return jax.vmap(anchor_of, in_axes=(0, None))(state, like)


def numpy_outer_run(n_replicas, n_steps, *, sync_every, alpha, beta, gamma, group_size,
                    outer="noloco", nesterov=False, seed=0):
    """The spec's equations, written out in NumPy, with an SGD inner optimizer."""
    theta = {k: np.stack([v] * n_replicas) for k, v in _flat(random_tree(seed)).items()}
    targets = _flat(random_tree(seed + 1, (n_replicas,)))
    phi = {k: v.copy() for k, v in theta.items()}
    delta = {k: np.zeros_like(v) for k, v in theta.items()}
    history, rounds = [], 0
    for t in range(1, n_steps + 1):
        for k in theta:
            theta[k] = theta[k] - INNER_LR * (theta[k] - targets[k])
        if t % sync_every == 0:
            for k in theta:
                if outer == "noloco":
                    delta[k], phi[k] = _numpy_noloco(theta[k], phi[k], delta[k], alpha, beta,
                                                     gamma, groups_of_round(rounds, n_replicas,
                                                                            group_size))
                else:
                    delta[k], phi[k] = _numpy_diloco(theta[k], phi[k], delta[k], alpha, beta,
                                                     nesterov)
                theta[k] = phi[k].copy()
            rounds += 1
        history.append({k: v.copy() for k, v in theta.items()})
    return history


def _numpy_noloco(theta, phi, delta, alpha, beta, gamma, groups):
    new_delta = np.empty_like(delta)
    for group in groups:
        mean_step = np.mean(theta[group] - phi[group], axis=0)
        mean_phi = np.mean(phi[group], axis=0)
        for i in group:
            new_delta[i] = alpha * delta[i] + beta * mean_step - gamma * (phi[i] - mean_phi)
    return new_delta, phi + new_delta


def _numpy_diloco(theta, phi, momentum, alpha, lr, nesterov):
    pseudo_grad = np.mean(phi - theta, axis=0, keepdims=True)  # same on every replica
    momentum = alpha * momentum + pseudo_grad
    step = pseudo_grad + alpha * momentum if nesterov else momentum
    return momentum, phi - lr * step


def _flat(tree):
    return {"a": tree["a"], "c": tree["b"]["c"]}


def assert_history_close(history, reference, atol=1e-5):
    for got, want in zip(history, reference, strict=True):
        np.testing.assert_allclose(_flat(got)["a"], want["a"], atol=atol)
        np.testing.assert_allclose(_flat(got)["c"], want["c"], atol=atol)


@pytest.mark.parametrize("n_replicas,group_size,gamma", [
    (2, 2, None), (8, 2, None), (8, 2, 0.9), (8, 4, None), (8, 4, 1.1),
    (3, 2, None), (5, 2, 0.9), (7, 2, None), (6, 4, None)])
def test_noloco_matches_numpy_equations(n_replicas, group_size, gamma):
    tx = noloco(optax.sgd(INNER_LR), sync_every=3, outer_lr=0.7, outer_momentum=0.5,
                gamma=gamma, group_size=group_size)
    history, _ = run_replicas(tx, n_replicas, n_steps=10)
    reference = numpy_outer_run(n_replicas, 10, sync_every=3, alpha=0.5, beta=0.7,
                                gamma=0.7 if gamma is None else gamma, group_size=group_size)
    assert_history_close(history, reference)
    assert not np.allclose(history[-1]["a"][0], history[-1]["a"][1])  # replicas stay distinct


@pytest.mark.parametrize("nesterov", [False, True])
def test_diloco_matches_numpy_equations(nesterov):
    tx = diloco(optax.sgd(INNER_LR), sync_every=3, outer_lr=0.7, outer_momentum=0.9,
                nesterov=nesterov)
    history, state = run_replicas(tx, 4, n_steps=10)
    reference = numpy_outer_run(4, 10, sync_every=3, alpha=0.9, beta=0.7, gamma=None,
                                group_size=None, outer="diloco", nesterov=nesterov)
    assert_history_close(history, reference)
    # After the sync at step 9 all replicas restart from one anchor (params up to rounding).
    np.testing.assert_allclose(history[8]["a"][0], history[8]["a"][3], atol=1e-6)
    anchors = np.asarray(replica_anchors(state)["a"])
    np.testing.assert_array_equal(anchors, np.broadcast_to(anchors[0], anchors.shape))


def test_single_replica_diloco_is_lookahead():
    """k = 1 DiLoCo with outer SGD(a) is lookahead: phi += a * (theta - phi), theta = phi."""
    params = jax.tree.map(jnp.asarray, random_tree(0))
    targets = jax.tree.map(jnp.asarray, random_tree(1))
    ours = diloco(optax.adam(0.05), sync_every=4, outer=optax.sgd(0.5), axis_name=None)
    theirs = optax.lookahead(optax.adam(0.05), sync_period=4, slow_step_size=0.5)

    @jax.jit
    def both(params, lookahead_params, state, lookahead_state):
        updates, state = ours.update(quadratic_grads(params, targets), state, params)
        grads = quadratic_grads(lookahead_params.fast, targets)
        la_updates, lookahead_state = theirs.update(grads, lookahead_state, lookahead_params)
        return (optax.apply_updates(params, updates),
                optax.apply_updates(lookahead_params, la_updates), state, lookahead_state)

    lookahead_params = optax.LookaheadParams.init_synced(params)
    state, lookahead_state = ours.init(params), theirs.init(lookahead_params)
    for step in range(1, 13):
        params, lookahead_params, state, lookahead_state = both(
            params, lookahead_params, state, lookahead_state)
        if step % 4 == 0:
            chex.assert_trees_all_close(params, lookahead_params.slow, atol=1e-6)


def test_unit_outer_lr_without_momentum_is_the_inner_optimizer():
    inner = optax.adam(0.05)
    tx = noloco(inner, sync_every=1, outer_lr=1.0, outer_momentum=0.0, axis_name=None)
    params = jax.tree.map(jnp.asarray, random_tree(0))
    targets = jax.tree.map(jnp.asarray, random_tree(1))

    @jax.jit
    def steps(params):
        plain, state, inner_state = params, tx.init(params), inner.init(params)
        for _ in range(5):
            updates, state = tx.update(quadratic_grads(params, targets), state, params)
            params = optax.apply_updates(params, updates)
            updates, inner_state = inner.update(quadratic_grads(plain, targets), inner_state)
            plain = optax.apply_updates(plain, updates)
        return params, plain

    ours, plain = steps(params)
    chex.assert_trees_all_close(ours, plain, atol=1e-6)


def test_groups_of_one_train_replicas_independently():
    """Identity mixing: with no peers and outer_lr 1 each replica is plain SGD."""
    tx = noloco(optax.sgd(INNER_LR), sync_every=2, outer_lr=1.0, outer_momentum=0.0,
                group_size=1)
    history, _ = run_replicas(tx, 4, n_steps=6)
    plain, _ = run_replicas(optax.sgd(INNER_LR), 4, n_steps=6)
    assert_history_close(history, [_flat(p) for p in plain], atol=1e-6)


@pytest.mark.parametrize("make_tx", [
    lambda: noloco(optax.sgd(INNER_LR), sync_every=2),
    lambda: noloco(optax.sgd(INNER_LR), sync_every=2, gamma=0.9, group_size=4),
    lambda: diloco(optax.adam(0.01), sync_every=2),
], ids=["noloco", "noloco-general-gamma", "diloco"])
@pytest.mark.parametrize("n_replicas", [8, 7])
def test_vmap_and_shard_map_give_the_same_parameters(make_tx, n_replicas):
    mesh = jax.make_mesh((n_replicas,), ("replica",), devices=jax.devices()[:n_replicas])
    stacked, _ = run_replicas(make_tx(), n_replicas, n_steps=7)
    sharded, state = run_replicas(make_tx(), n_replicas, n_steps=7, mesh=mesh)
    assert_history_close(stacked, [_flat(p) for p in sharded], atol=1e-6)
    assert state.anchor.buffers[0].sharding.spec[0] == "replica"


@pytest.mark.parametrize("mesh_shape", [None, (8,)], ids=["vmap", "shard_map"])
def test_new_rounds_do_not_recompile(mesh_shape):
    mesh = None if mesh_shape is None else jax.make_mesh(mesh_shape, ("replica",))
    tx = noloco(optax.sgd(INNER_LR), sync_every=1)
    params = stack_replicas({"w": jnp.zeros(3)}, 8)
    if mesh is not None:
        params = shard_replicas(params, mesh)

    def train_step(params, state):
        updates, state = tx.update(params, state, params)
        return optax.apply_updates(params, updates), state

    train_step = jax.jit(replicate(train_step, mesh=mesh))
    state = jax.jit(replicate(tx.init, mesh=mesh))(params)
    params, state = train_step(params, state)  # compiles
    with log_compilations() as compiled:
        for _ in range(5):  # five more rounds, each with a new peer draw
            params, state = train_step(params, state)
    assert int(np.asarray(state.round)[0]) == 6
    assert "train_step" not in compiled, compiled


def _primitives(jaxpr, inside_cond=False):
    """(primitive name, whether under a cond) for every equation, recursively."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, inside_cond
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _primitives(sub, inside_cond or eqn.primitive.name == "cond")


def test_peer_exchange_happens_only_inside_the_sync_branch():
    mesh = jax.make_mesh((8,), ("replica",))
    tx = noloco(optax.sgd(INNER_LR), sync_every=5)
    params = shard_replicas(stack_replicas({"w": jnp.zeros(3)}, 8), mesh)
    state = jax.jit(replicate(tx.init, mesh=mesh))(params)
    update = replicate(lambda g, s, p: tx.update(g, s, p), mesh=mesh)
    primitives = list(_primitives(jax.make_jaxpr(update)(params, state, params).jaxpr))
    permutes = [inside for name, inside in primitives if name == "ppermute"]
    assert permutes and all(permutes)
    assert not [name for name, _ in primitives if name in ("psum", "pmax", "all_gather")]


def test_state_keeps_float32_anchor_and_dtypes_across_steps():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
    tx = noloco(optax.adam(1e-2), sync_every=2, axis_name=None)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    initial = state
    for _ in range(3):  # crosses a sync
        params, state, updates = step(params, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
    assert [b.dtype for b in state.anchor.buffers + state.outer.buffers] == [jnp.float32] * 2
    assert anchor_of(state, params)["w"].dtype == jnp.float32
    assert params["w"].dtype == updates["w"].dtype == jnp.bfloat16


def test_state_sharding_is_stable_across_steps():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    params = jax.device_put({"w": jnp.ones((8, 4))}, jax.NamedSharding(mesh, jax.P("x")))
    tx = noloco(optax.adamw(1e-2), sync_every=2, axis_name=None)
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
        before = jax.tree.map(jax.typeof, state)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p))
        for _ in range(3):
            _, state = step(params, state, params)
            assert jax.tree.map(jax.typeof, state) == before


def test_works_inside_chain_with_extra_args():
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     noloco(optax.adam(0.1), sync_every=2, axis_name=None))
    tx = optax.with_extra_args_support(tx)
    params = {"w": jnp.full(3, 5.0)}
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update({"w": p["w"]}, s, p, unused_extra=1.0))
    for _ in range(40):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert float(jnp.abs(params["w"]).max()) < 1.0


def test_inject_hyperparams_matches_fixed_hyperparams():
    injected = optax.inject_hyperparams(noloco, static_args=("group_size", "seed", "pool_size"))(
        inner=optax.sgd(INNER_LR), sync_every=3, outer_lr=0.7, outer_momentum=0.5)
    fixed = noloco(optax.sgd(INNER_LR), sync_every=3, outer_lr=0.7, outer_momentum=0.5)
    history, state = run_replicas(injected, 4, n_steps=7)
    expected, _ = run_replicas(fixed, 4, n_steps=7)
    assert_history_close(history, [_flat(p) for p in expected], atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.hyperparams["outer_lr"]), 0.7)


def test_multi_steps_accumulates_before_the_inner_step():
    """MultiSteps(k) on grads g1..gk equals one step on their mean."""
    tx = noloco(optax.sgd(INNER_LR), sync_every=2, axis_name=None)
    accumulated = optax.MultiSteps(tx, every_k_schedule=2)
    params = {"w": jnp.arange(3.0)}
    grads = [{"w": jnp.full(3, float(i))} for i in range(8)]
    update = jax.jit(accumulated.update)
    state, p = accumulated.init(params), params
    for g in grads:
        updates, state = update(g, state, p)
        p = optax.apply_updates(p, updates)
    reference_update = jax.jit(tx.update)
    ref_state, q = tx.init(params), params
    for a, b in zip(grads[::2], grads[1::2], strict=True):
        updates, ref_state = reference_update(jax.tree.map(lambda x, y: (x + y) / 2, a, b),
                                              ref_state, q)
        q = optax.apply_updates(q, updates)
    chex.assert_trees_all_close(p, q, atol=1e-6)


def test_stability_window_warns_with_the_window():
    assert stability_window(0.5, 2) == pytest.approx((0.5, 1.5))
    with pytest.warns(StabilityWarning, match=r"0\.500 < gamma < 1\.500"):
        noloco(optax.sgd(0.1), gamma=0.3)
    with pytest.warns(StabilityWarning, match="outer_lr > outer_momentum"):
        noloco(optax.sgd(0.1), outer_lr=0.6, outer_momentum=0.8, gamma=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noloco(optax.sgd(0.1))  # the paper's setting is inside the window


def test_bad_arguments_and_unbound_axis_are_explained():
    assert groups_of_round(0, 3, 2) == [[0, 1, 2]]  # an odd count: one group of three
    assert sorted(map(len, groups_of_round(0, 5, 2))) == [2, 3]
    with pytest.raises(ValueError, match="group_size=0 and n_replicas=4 must be >= 1"):
        grouping_pool(4, 0, 1, 0)
    tx = noloco(optax.sgd(0.1), sync_every=1)
    params = {"w": jnp.zeros(2)}
    with pytest.raises(NameError, match="axis_name='replica' is not bound"):
        jax.jit(tx.update)(params, tx.init(params), params)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(params, tx.init(params))


def test_diloco_presets_are_the_two_published_baselines():
    assert DILOCO_PRESETS["original"]["outer_momentum"] == 0.9
    assert DILOCO_PRESETS["original"]["nesterov"]
    assert DILOCO_PRESETS["noloco_paper"] == dict(sync_every=100, outer_lr=0.7,
                                                  outer_momentum=0.3, nesterov=False)


def test_noloco_converges_on_a_shared_quadratic():
    """Pair averaging keeps the replica mean on the mean target and pulls replicas together."""
    tx = noloco(optax.sgd(INNER_LR), sync_every=5)
    history, _ = run_replicas(tx, 8, n_steps=300)
    targets = random_tree(1, (8,))["a"]
    final = history[-1]["a"]
    np.testing.assert_allclose(final.mean(0), targets.mean(0), atol=1e-4)
    assert final.std(0).mean() < 0.5 * targets.std(0).mean()


@pytest.mark.parametrize("module", ["decjax.optim.noloco", "decjax.optim.diloco"])
def test_docstring_examples_run(module):
    import doctest
    import sys

    result = doctest.testmod(sys.modules[module])
    assert result.attempted > 0 and result.failed == 0


def test_static_sync_flag_matches_the_cond_and_drops_it():
    """A loop that knows its sync steps passes sync=...: same numbers, no cond in the step."""
    tx = noloco(optax.sgd(INNER_LR), sync_every=3, gamma=0.9, group_size=4)

    def make_step(**flag):
        def step(params, state, targets):
            grads = quadratic_grads(params, targets)
            updates, state = tx.update(grads, state, params, **flag)
            return optax.apply_updates(params, updates), state
        return jax.jit(replicate(step))

    params = stack_replicas(jax.tree.map(jnp.asarray, random_tree(0)), 8)
    targets = jax.tree.map(jnp.asarray, random_tree(1, (8,)))
    state = jax.jit(replicate(tx.init))(params)
    with_cond, sync_step, local_step = make_step(), make_step(sync=True), make_step(sync=False)
    cond_params, cond_state = params, state
    for step in range(1, 10):
        cond_params, cond_state = with_cond(cond_params, cond_state, targets)
        params, state = (sync_step if step % 3 == 0 else local_step)(params, state, targets)
        chex.assert_trees_all_close(params, cond_params, atol=1e-6)
    assert int(state.round[0]) == 3
    jaxpr = jax.make_jaxpr(replicate(lambda p, s: tx.update(p, s, p, sync=False)))(params, state)
    assert "cond" not in {name for name, _ in _primitives(jaxpr.jaxpr)}


def test_pack_round_trips_mixed_dtypes():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.arange(4, dtype=jnp.int32),
            "c": (jnp.ones((), jnp.bfloat16), jnp.full((2, 2), 3.0))}
    packed = pack(tree)
    assert [b.dtype for b in packed.buffers] == [jnp.float32, jnp.int32, jnp.bfloat16]
    assert [b.shape for b in packed.buffers] == [(10,), (4,), (1,)]
    chex.assert_trees_all_equal(jax.jit(unpack)(packed, tree), tree)


@pytest.mark.parametrize("make_tx,n_buffers", [
    (lambda pack_state: noloco(optax.sgd(INNER_LR), sync_every=2, gamma=0.9, group_size=2,
                               pack_state=pack_state), 2),  # anchor, momentum
    (lambda pack_state: diloco(optax.adam(0.01), sync_every=2, outer=optax.adam(0.1),
                               pack_state=pack_state), 4),  # anchor, Adam's mu, nu and count
], ids=["noloco", "diloco-adam-outer"])
def test_packed_state_gives_the_same_parameters(make_tx, n_buffers):
    packed, packed_state = run_replicas(make_tx(True), 4, n_steps=5)
    plain, plain_state = run_replicas(make_tx(False), 4, n_steps=5)
    assert_history_close(packed, [_flat(p) for p in plain], atol=0)
    chex.assert_trees_all_equal(replica_anchors(packed_state), plain_state.anchor)
    # One buffer per parameter-shaped tree of the slow state, whatever the number of leaves.
    assert len(jax.tree.leaves((packed_state.anchor, packed_state.outer))) == n_buffers
