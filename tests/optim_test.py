import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decjax import tree
from decjax.optim import per_stage, reset_stage, stage_adamw, stage_grad_norms

S = 3


def _params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "io": {"embed": {"embedding": jax.random.normal(k1, (5, 4))}},
        "body": {
            "w": {"kernel": jax.random.normal(k2, (S, 2, 4, 4))},
            "norm": {"scale": jax.random.normal(k3, (S, 2, 4))},
        },
    }


def _grads(seed):
    return jax.tree.map(lambda p: 3.0 * jax.random.normal(jax.random.key(seed), p.shape),
                        _params())


def test_each_stage_matches_its_own_optimizer():
    """Per-stage clip + AdamW == one independent optax optimizer per stage."""
    lr, wd = 1e-2, 0.1
    tx = stage_adamw(lr, weight_decay=wd, clip_norm=1.0)
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update)

    def reference_tx(mask):
        return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                           optax.add_decayed_weights(wd, mask=mask), optax.scale(-lr))

    stage_params = [tree.index(params["body"], s) for s in range(S)]
    refs = [reference_tx({"w": {"kernel": True}, "norm": {"scale": False}}) for _ in range(S)]
    ref_states = [r.init(p) for r, p in zip(refs, stage_params, strict=True)]
    io_ref = reference_tx({"embed": {"embedding": True}})
    io_state, io_params = io_ref.init(params["io"]), params["io"]
    for step in range(3):
        grads = _grads(step)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for s in range(S):
            u, ref_states[s] = refs[s].update(tree.index(grads["body"], s), ref_states[s],
                                              stage_params[s])
            stage_params[s] = optax.apply_updates(stage_params[s], u)
        u, io_state = io_ref.update(grads["io"], io_state, io_params)
        io_params = optax.apply_updates(io_params, u)
    chex.assert_trees_all_close(params["body"], tree.stack(stage_params), rtol=1e-5)
    chex.assert_trees_all_close(params["io"], io_params, rtol=1e-5)
    np.testing.assert_array_equal(state.stage_steps, [3] * S)


def test_clipping_is_per_stage():
    tx = per_stage(optax.clip_by_global_norm(1.0), learning_rate=1.0)
    params = _params()
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["body"]["w"]["kernel"] = grads["body"]["w"]["kernel"].at[1].set(100.0)
    grads["body"]["w"]["kernel"] = grads["body"]["w"]["kernel"].at[2].set(1e-3)
    updates, _ = tx.update(grads, tx.init(params))
    _, norms = stage_grad_norms(updates)
    np.testing.assert_allclose(norms, [0.0, 1.0, 1e-3 * np.sqrt(32)], rtol=1e-5)


def test_reset_stage_touches_only_that_stage():
    tx = stage_adamw(1e-2)
    params = _params()
    state = tx.init(params)
    for step in range(2):
        updates, state = tx.update(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
    reset = jax.jit(lambda st, p, i: reset_stage(tx, st, p, i, lr_scale=1.2))(state, params, 1)
    fresh = tx.init(params)
    for old, new, init in zip(jax.tree.leaves(state.body), jax.tree.leaves(reset.body),
                              jax.tree.leaves(fresh.body), strict=True):
        np.testing.assert_array_equal(new[1], init[1])
        np.testing.assert_array_equal(new[0], old[0])
        np.testing.assert_array_equal(new[2], old[2])
    np.testing.assert_array_equal(reset.stage_steps, [2, 0, 2])
    np.testing.assert_allclose(reset.body_lr_scale, [1.0, 1.2, 1.0])
    chex.assert_trees_all_equal(reset.io, state.io)


def test_lr_scale_multiplies_that_stage_update():
    tx = per_stage(optax.identity(), learning_rate=0.5)
    params = _params()
    state = tx.init(params)._replace(body_lr_scale=jnp.asarray([1.0, 2.0, 0.0]))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state)
    kernel = updates["body"]["w"]["kernel"]
    np.testing.assert_allclose(kernel[:, 0, 0, 0], [-0.5, -1.0, 0.0])
    np.testing.assert_allclose(updates["io"]["embed"]["embedding"], -0.5)


def test_schedule_follows_global_step_and_state_is_stable():
    schedule = optax.linear_schedule(1.0, 0.0, 4)
    tx = per_stage(optax.identity(), learning_rate=schedule)
    params = _params()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    seen = []
    for _ in range(3):
        updates, new_state = update(grads, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state = new_state
        seen.append(float(-updates["io"]["embed"]["embedding"][0, 0]))
    np.testing.assert_allclose(seen, [1.0, 0.75, 0.5])


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_state_leaves_have_leading_stage_axis(clip_norm):
    state = stage_adamw(1e-3, clip_norm=clip_norm).init(_params())
    for leaf in jax.tree.leaves(state.body):
        if leaf.ndim:
            assert leaf.shape[0] == S
    assert state.stage_steps.shape == (S,)
