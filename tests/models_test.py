import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decjax import tree
from decjax.models import (
    Llama,
    LlamaConfig,
    StagedLlama,
    full_route,
    monolithic_to_staged,
    preset,
    staged_to_monolithic,
)
from decjax.testing import log_compilations

MODEL_FIELDS = ("d_model", "n_heads", "n_layers", "d_ff")
CFG = LlamaConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=4, d_ff=64)


def _tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


@pytest.mark.parametrize("n_stages", [1, 2, 4])
def test_full_route_equals_sequential_model(n_stages):
    model = StagedLlama(CFG, n_stages)
    params = model.init(jax.random.key(0))
    tokens = _tokens((3, 2, 16))
    routed = jax.jit(model.forward)(params, tokens, jnp.asarray(full_route(3, n_stages)))
    reference = jax.vmap(Llama(CFG, nnx.Rngs(jax.random.key(0))))(tokens)
    chex.assert_shape(routed, (3, 2, 16, CFG.vocab_size))
    np.testing.assert_allclose(routed, reference, rtol=1e-5, atol=1e-6)


def test_staged_layout_round_trips_and_has_leading_stage_axis():
    model = StagedLlama(CFG, 2)
    params = model.init(jax.random.key(0))
    assert set(params["io"]) == {"embed", "final_norm", "head"}
    for leaf in jax.tree.leaves(params["body"]):
        assert leaf.shape[:2] == (2, 2)
    again = monolithic_to_staged(staged_to_monolithic(params), 2)
    chex.assert_trees_all_equal(again, params)


def test_init_follows_reference_recipe():
    params = StagedLlama(CFG, 2).init(jax.random.key(0))
    np.testing.assert_array_equal(params["io"]["embed"]["embedding"][0], 0.0)  # pad row
    np.testing.assert_array_equal(params["body"]["attn_norm"]["scale"], 1.0)
    kernels = np.concatenate([np.ravel(k) for k in jax.tree.leaves(params["body"]["mlp"])])
    assert abs(kernels.std() - 0.02) < 0.002 and abs(kernels.mean()) < 0.002


def test_default_hidden_width_is_four_d():
    cfg = LlamaConfig(vocab_size=16, d_model=8, n_heads=2, n_layers=2)
    params = StagedLlama(cfg, 1).init(jax.random.key(0))
    assert params["body"]["mlp"]["w_up"]["kernel"].shape[-1] == 32


@pytest.mark.parametrize("skip_by_branching", [False, True])
def test_route_follows_listed_stages_in_order(skip_by_branching):
    """A route with a swap and a skip equals applying those stages by hand."""
    model = StagedLlama(CFG, 4, skip_by_branching=skip_by_branching)
    params = model.init(jax.random.key(0))
    tokens = _tokens((1, 2, 8))
    route = jnp.asarray([[1, 0, -1, 3]], jnp.int32)
    x = model.embed(params["io"], tokens[0])
    for stage in (1, 0, 3):
        x = model.apply_stage(tree.index(params["body"], stage), x)
    expected = model.head(params["io"], x)
    np.testing.assert_allclose(jax.jit(model.forward)(params, tokens, route)[0], expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("skip_by_branching", [False, True])
def test_unvisited_stages_get_exactly_zero_gradient(skip_by_branching):
    model = StagedLlama(CFG, 4, skip_by_branching=skip_by_branching)
    params = model.init(jax.random.key(0))
    rows = _tokens((2, 9))
    grads = jax.jit(jax.grad(lambda p, r: model.loss(p, rows, r)[0]))(
        params, jnp.asarray([0, -1, 2, -1], jnp.int32)
    )
    for stage in (1, 3):
        for leaf in jax.tree.leaves(tree.index(grads["body"], stage)):
            assert not np.any(np.asarray(leaf)), "an unvisited stage received gradient"
    for stage in (0, 2):
        leaves = jax.tree.leaves(tree.index(grads["body"], stage))
        assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_new_route_of_same_shape_does_not_recompile():
    model = StagedLlama(CFG, 4)
    params = model.init(jax.random.key(0))
    tokens = _tokens((2, 2, 8))

    def routed_forward(params, tokens, route):
        return model.forward(params, tokens, route)

    fwd = jax.jit(routed_forward)
    full = jnp.asarray(full_route(2, 4))
    swapped = jnp.asarray([[1, 0, 2, 3], [0, 1, 3, 2]], jnp.int32)
    skipping = jnp.asarray([[0, -1, 2, -1], [-1, 1, -1, 3]], jnp.int32)
    first = fwd(params, tokens, full)
    with log_compilations() as compiled:
        second = fwd(params, tokens, swapped)
        third = fwd(params, tokens, skipping)
    assert "routed_forward" not in compiled, compiled
    assert not np.allclose(first, second) and not np.allclose(second, third)
    with log_compilations() as compiled:  # the check itself can fail: a new shape compiles
        fwd(params, tokens, full[:, :3])
    assert "routed_forward" in compiled


def test_bad_shapes_and_routes_are_rejected():
    with pytest.raises(ValueError, match="n_layers=4 must be divisible by model.n_stages=3"):
        StagedLlama(CFG, 3)
    model = StagedLlama(CFG, 2)
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="route entries"):
        model.forward(params, _tokens((1, 1, 4)), np.asarray([[0, 2]], np.int32))
    with pytest.raises(ValueError, match="route must be int32"):
        model.forward(params, _tokens((2, 1, 4)), np.asarray([[0, 1]], np.int32))


@pytest.mark.parametrize("size,low,high", [("tiny", 0.1e6, 1e6), ("small", 7e6, 12e6)])
def test_cpu_presets_have_their_advertised_size(size, low, high):
    spec = preset(size)
    cfg = LlamaConfig(vocab_size=258, **{k: spec[k] for k in MODEL_FIELDS})
    n = tree.num_params(StagedLlama(cfg, spec["n_stages"]).abstract_params())
    assert low <= n <= high, n


def test_reference_124m_preset_counts_83m_parameters():
    """The paper's "124M" model has 83.1M parameters with a 32000-token vocabulary."""
    spec = preset("124m")
    cfg = LlamaConfig(vocab_size=32000, **{k: spec[k] for k in MODEL_FIELDS})
    n = tree.num_params(StagedLlama(cfg, spec["n_stages"]).abstract_params())
    assert abs(n - 83.1e6) < 0.1e6, n
