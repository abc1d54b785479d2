import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decjax import tree
from decjax.checkfree import (
    apply_repairs,
    checkfree_plus_routes,
    interpolate_stage,
    io_replica_overhead,
    neighbour_weight,
    plan_repairs,
    swap_partner,
)
from decjax.models import LlamaConfig, StagedLlama
from decjax.optim import stage_adamw
from decjax.testing import log_compilations

S = 6
CFG = LlamaConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=S, d_ff=32)


@pytest.fixture(scope="module")
def trained():
    """Params and a non-trivial optimizer state after two steps."""
    model = StagedLlama(CFG, S)
    params = model.init(jax.random.key(0))
    tx = stage_adamw(1e-2)
    state = tx.init(params)
    for seed in range(2):
        key = jax.random.key(seed)
        grads = jax.tree.map(lambda p, k=key: jax.random.normal(k, p.shape), params)
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(jnp.add, params, updates)
    return model, tx, params, state


def test_checkfree_plus_routes_match_hand_tables():
    expected = {
        4: [[0, 1, 2, 3], [1, 0, 3, 2]],
        6: [[0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 5, 4]],
        8: [[0, 1, 2, 3, 4, 5, 6, 7], [1, 0, 2, 3, 4, 5, 7, 6]],
    }
    for n_stages, (even, odd) in expected.items():
        routes = checkfree_plus_routes(4, n_stages)
        np.testing.assert_array_equal(routes, [even, odd, even, odd])
        assert routes.dtype == np.int32
    with pytest.raises(ValueError, match="n_stages >= 4"):
        checkfree_plus_routes(2, 3)


def test_reference_weights():
    # a = |g_next| + 1e-4 on the next stage, b = |g_prev| + 1e-4 on the previous one.
    w = neighbour_weight(0.5, 1.0)
    assert w == pytest.approx((1.0 + 1e-4) / (1.5 + 2e-4))
    assert neighbour_weight(0.5, 1.0, power=2) == pytest.approx((1 + 1e-4) / (1.25 + 2e-4))
    [repair] = plan_repairs([2], S, grad_norms=np.array([1, 0.5, 0.5, 1.0, 1, 1]))
    assert (repair.left, repair.right, repair.kind) == (1, 3, "interpolate")
    assert repair.weight_right == pytest.approx(w)
    [uniform] = plan_repairs([2], S, rule="uniform")
    assert uniform.weight_right == 0.5


def test_adjacent_failures_use_survivors_only():
    repairs = {r.stage: r for r in plan_repairs([2, 3], S, grad_norms=np.ones(S))}
    assert (repairs[2].left, repairs[2].right) == (1, 4)
    assert (repairs[3].left, repairs[3].right) == (1, 4)
    # Equal norms: distance weighting gives linear interpolation between stages 1 and 4.
    assert repairs[2].weight_right == pytest.approx(1 / 3)
    assert repairs[3].weight_right == pytest.approx(2 / 3)
    edge = plan_repairs([0, 1], S)  # no swaps: both copy the first survivor
    assert [(r.left, r.kind) for r in edge] == [(2, "copy"), (2, "copy")]


def test_checkfree_plus_edges_copy_their_swap_partner():
    assert [swap_partner(s, S) for s in range(S)] == [1, 0, None, None, 5, 4]
    repairs = plan_repairs([0, 5, 3], S, swaps=True)
    kinds = {r.stage: (r.kind, r.left) for r in repairs}
    assert kinds[0] == ("copy", 1) and kinds[5] == ("copy", 4)
    assert kinds[3][0] == "interpolate"
    # Both partners lost: fall back to the nearest survivors.
    both = {r.stage: r for r in plan_repairs([0, 1], S, swaps=True)}
    assert both[0].left == 2 and both[1].left == 2


def test_copy_and_bad_input():
    assert [(r.left, r.kind) for r in plan_repairs([3], S, rule="copy")] == [(2, "copy")]
    assert [(r.left, r.kind) for r in plan_repairs([0], S, rule="copy")] == [(1, "copy")]
    with pytest.raises(ValueError, match="rule='median'"):
        plan_repairs([1], S, rule="median")
    with pytest.raises(ValueError, match="must lie in"):
        plan_repairs([6], S)
    with pytest.raises(ValueError, match="every body stage was lost"):
        plan_repairs(range(S), S)


@pytest.mark.parametrize("opt_rule", ["fresh", "average"])
def test_recovery_leaves_every_other_stage_bit_identical(trained, opt_rule):
    _, tx, params, state = trained
    repairs = plan_repairs([2, 3], S, grad_norms=np.linspace(0.2, 1.0, S))
    new_params, new_state = apply_repairs(params, state, tx, repairs, lr_scale=1.2,
                                          opt_rule=opt_rule)
    for stage in (0, 1, 4, 5):
        chex.assert_trees_all_equal(tree.index(new_params["body"], stage),
                                    tree.index(params["body"], stage))
        chex.assert_trees_all_equal(tree.index(new_state.body, stage),
                                    tree.index(state.body, stage))
    chex.assert_trees_all_equal(new_params["io"], params["io"])
    chex.assert_trees_all_equal(new_state.io, state.io)
    w = repairs[0].weight_right
    expected = jax.tree.map(lambda x: (1 - w) * x[1] + w * x[4], params["body"])
    chex.assert_trees_all_close(tree.index(new_params["body"], 2), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_state.body_lr_scale, [1, 1, 1.2, 1.2, 1, 1])
    np.testing.assert_array_equal(new_state.stage_steps, [2, 2, 0, 0, 2, 2])
    mu = new_state.body[1].mu  # (clip state, Adam state)
    if opt_rule == "fresh":
        assert not np.any(np.asarray(jax.tree.leaves(tree.index(mu, 2))[0]))
    else:
        leaf = jax.tree.leaves(mu)[0]
        np.testing.assert_allclose(leaf[2], (1 - w) * leaf[1] + w * leaf[4], rtol=1e-5, atol=1e-9)


def test_random_repair_needs_fresh_params_and_uses_them(trained):
    model, tx, params, state = trained
    fresh = model.init(jax.random.key(7))
    repairs = plan_repairs([4], S, rule="random")
    with pytest.raises(ValueError, match="fresh_params"):
        apply_repairs(params, state, tx, repairs)
    new_params, _ = apply_repairs(params, state, tx, repairs, fresh_params=fresh)
    chex.assert_trees_all_equal(tree.index(new_params["body"], 4), tree.index(fresh["body"], 4))


def test_traced_stage_index_compiles_once(trained):
    _, _, params, _ = trained
    body = params["body"]
    interpolate_stage(body, 1, 0, 2, 0.3)
    with log_compilations() as compiled:
        for stage, w in ((2, 0.1), (3, 0.7), (4, 0.5)):
            body = interpolate_stage(body, stage, stage - 1, stage + 1, w)
    assert "interpolate_stage" not in compiled, compiled


def test_io_replica_overhead_is_reported(trained):
    _, _, params, _ = trained
    report = io_replica_overhead(params)
    assert report["embedding_params"] == 32 * 16
    assert report["head_params"] == 16 + 16 * 32
    assert report["embedding_fraction_of_stage"] == pytest.approx(
        32 * 16 / report["stage_params"])
