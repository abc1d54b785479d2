"""Expert specs: compute budgets of HDEE's ensembles, exactness of d_ff padding, shape groups."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decjax import tree
from decjax.ensemble import experts as ex
from decjax.ensemble import train as tr
from decjax.models import LlamaConfig, StagedLlama

BASE = LlamaConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1)
GROUPS = [(("law",), "easy"), (("wiki",), "moderate"), (("math", "cs"), "hard")]


def _rows(batch, seed, seq_len=8):
    """Learnable rows ``[B, T+1]`` over ids 1..31: arithmetic progressions."""
    rng = np.random.default_rng(seed)
    start, stride = rng.integers(0, 31, (batch, 1)), rng.integers(1, 4, (batch, 1))
    return jnp.asarray((start + stride * np.arange(seq_len + 1)) % 31 + 1, jnp.int32)


def test_non_embedding_params_counts_body_and_final_norm():
    cfg = dataclasses.replace(BASE, n_layers=2, d_ff=40)
    d = cfg.d_model
    assert ex.non_embedding_params(cfg) == 2 * (4 * d * d + 3 * d * 40 + 2 * d) + d
    spec = ex.ExpertSpec("x", ("law",), 40, 7, cfg)
    assert ex.expert_compute(spec, tokens_per_step=128) == 6 * ex.non_embedding_params(cfg) * 896


def test_three_factory_ensembles_have_exactly_equal_budgets():
    ensembles = ex.hdee_ensembles(BASE, GROUPS, d_ff=(24, 32, 40), steps=(30, 40, 50))
    assert list(ensembles) == list(ex.ENSEMBLE_NAMES)
    budgets = {name: ex.ensemble_budget(specs) for name, specs in ensembles.items()}
    assert len(set(budgets.values())) == 1, budgets
    table = ex.check_budget(ensembles, tokens_per_step=64)
    assert "M_He-I_Ho" in table and "+0.000%" in table
    het = {s.name: (s.d_ff, s.steps) for s in ensembles["M_He-I_Ho"]}
    assert het == {"law": (24, 40), "wiki": (32, 40), "math+cs": (40, 40)}
    assert [s.steps for s in ensembles["M_Ho-I_He"]] == [30, 40, 50]
    # The moderate expert is the same in all three ensembles (HDEE's shared lineage).
    assert len({specs[1] for specs in ensembles.values()}) == 1


def test_mismatched_budgets_raise_naming_the_ensembles():
    good = ex.homogeneous(BASE, GROUPS, d_ff=32, steps=40)
    bad = [dataclasses.replace(good[0], steps=41), *good[1:]]
    with pytest.raises(ValueError, match=r"'homog' = .*'longer' = .*\+0\.8333%"):
        ex.check_budget({"homog": good, "longer": bad})
    assert ex.check_budget({"homog": good, "longer": bad}, rtol=0.01)


@pytest.mark.parametrize("call, message", [
    (lambda: ex.size_heterogeneous(BASE, GROUPS, d_ff=(24, 32, 48), steps=40),
     "budget cannot be matched: .*choose d_ff_small \\+ d_ff_large = 2 \\* d_ff_medium"),
    (lambda: ex.step_heterogeneous(BASE, GROUPS, d_ff=32, steps=(30, 40, 60)),
     "budget cannot be matched: .*steps_easy \\+ steps_hard = 2 \\* steps_moderate"),
    (lambda: ex.size_heterogeneous(BASE, GROUPS[:2], d_ff=(24, 32, 40), steps=40),
     "as many easy as hard groups"),
    (lambda: ex.homogeneous(BASE, GROUPS, d_ff=0, steps=40), r"d_ff=0 must be a positive"),
    (lambda: ex.hdee_ensembles(BASE, GROUPS, d_ff=(24, 32), steps=(3, 4, 5)),
     r"d_ff=\(24, 32\) must be three values"),
    (lambda: ex.step_heterogeneous(BASE, GROUPS, d_ff=32, steps=(30, 40, 50.0)),
     r"steps\[2\]=50.0 must be a positive integer"),
    (lambda: ex.homogeneous(BASE, [(("a",), "medium")], d_ff=32, steps=4),
     r"groups\[0\].difficulty='medium' is not allowed; allowed: easy, moderate, hard"),
    (lambda: ex.homogeneous(BASE, [("a", "easy"), ("a", "hard")], d_ff=32, steps=4),
     r"groups\[1\] repeats domain"),
    (lambda: ex.ExpertSpec("x", ("a",), 32, -1, BASE), r"ExpertSpec\(x\).steps=-1"),
])
def test_bad_input_raises_naming_the_field(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_solve_matching_steps_and_dense_steps():
    ref = ex.homogeneous(BASE, GROUPS, d_ff=32, steps=40)
    budget = ex.ensemble_budget(ref)
    assert ex.solve_matching_steps(ref, budget) == ref
    fixed = ex.solve_matching_steps(ref, budget + 2 * ex.non_embedding_params(ref[0].config),
                                    vary=["math+cs"])
    assert [s.steps for s in fixed] == [40, 40, 42]
    with pytest.raises(ValueError, match="budget cannot be matched: .* would need 40.333"):
        ex.solve_matching_steps(ref, budget + ex.non_embedding_params(ref[0].config))
    with pytest.raises(ValueError, match="vary: unknown expert 'nope'; available: law, wiki"):
        ex.solve_matching_steps(ref, budget, vary=["nope"])
    dense = dataclasses.replace(BASE, d_ff=96)
    steps = ex.dense_steps(dense, 6 * budget * 64, tokens_per_step=64)
    assert abs(steps * ex.non_embedding_params(dense) / budget - 1) < 0.01
    assert ex.dense_reference(BASE, d_ff=32, domains=("law", "wiki"), ensemble=ref).steps == 120
    with pytest.raises(ValueError, match="off by"):
        ex.dense_steps(dense, 6 * 10 * ex.non_embedding_params(dense) + 1e7, tokens_per_step=1,
                       rtol=1e-6)


def test_group_by_shape_exact_and_padded():
    specs = ex.hdee_ensembles(BASE, GROUPS, d_ff=(24, 32, 40), steps=(3, 4, 5))["M_He-I_Ho"]
    other = ex.ExpertSpec("wide", ("cs",), 32, 4, dataclasses.replace(BASE, d_model=32))
    exact = ex.group_by_shape([*specs, other])
    assert [g.names for g in exact] == [("law",), ("wiki",), ("math+cs",), ("wide",)]
    padded = ex.group_by_shape([*specs, other], max_pad_ratio=1.34)
    assert [(g.names, g.config.d_ff) for g in padded] == [
        (("law", "wiki"), 32), (("math+cs",), 40), (("wide",), 32)]
    one = ex.group_by_shape(specs, max_pad_ratio=2)
    assert len(one) == 1 and one[0].config.d_ff == 40
    assert one[0].padded_fraction == pytest.approx(1 - 96 / 120)
    assert ex.shape_signature(one[0].config) != ex.shape_signature(specs[0].config)
    with pytest.raises(ValueError, match="max_pad_ratio=0.5 must be a number >= 1"):
        ex.group_by_shape(specs, max_pad_ratio=0.5)
    with pytest.raises(ValueError, match="names must be unique"):
        ex.group_by_shape([specs[0], specs[0]])


def test_pad_unpad_and_mask_shapes():
    small = dataclasses.replace(BASE, d_ff=24)
    params = StagedLlama(small, 1).init(jax.random.key(0))
    padded = ex.pad_d_ff(params, small, 40)
    assert ex.params_d_ff(padded) == 40
    assert padded["body"]["mlp"]["w_down"]["kernel"].shape[-2:] == (40, 16)
    chex.assert_trees_all_equal(ex.unpad_d_ff(padded, 24), params)
    mask = ex.d_ff_mask(padded, 24)["body"]["mlp"]["w_gate"]["kernel"]
    assert mask.shape == (1, 1, 1, 40) and int(mask.sum()) == 24
    noisy = jax.tree.map(jnp.ones_like, padded)
    cleared = ex.apply_d_ff_mask(noisy, 24)["body"]["mlp"]
    assert float(cleared["w_up"]["kernel"][..., 24:].sum()) == 0
    assert float(cleared["w_down"]["kernel"][..., 23, :].min()) == 1
    with pytest.raises(ValueError, match="config.d_ff=32"):
        ex.pad_d_ff(params, dataclasses.replace(BASE, d_ff=32), 40)
    with pytest.raises(ValueError, match="d_ff_target=16 must be an integer >= d_ff=24"):
        ex.pad_d_ff(params, small, 16)


def test_zero_padding_is_exactly_the_small_model_through_adamw_steps():
    small_cfg, wide = dataclasses.replace(BASE, d_ff=24), 40
    small, padded = StagedLlama(small_cfg, 1), StagedLlama(dataclasses.replace(BASE, d_ff=wide), 1)
    params = small.init(jax.random.key(1))
    tx = tr.adam_direction(weight_decay=0.1)
    schedule = tr.cosine_lr(1e-2, warmup_steps=1)

    def run(model, params_1):
        state = tr.init_expert_state(params_1, tx, total_steps=[6], d_ff=[24])
        step = tr.make_expert_train_step(model, tx, schedule)
        losses = []
        for i in range(6):
            state, metrics = step(state, _rows(4, i)[None], jnp.ones((1,), bool))
            losses.append(metrics["loss"][0])
        return tree.index(state.params, 0), np.array(losses)

    route = jnp.zeros((1,), jnp.int32)
    logits = lambda m, p: m.microbatch_logits(p, _rows(4, 99)[:, :-1], route)
    start = ex.pad_d_ff(params, small_cfg, wide)
    chex.assert_trees_all_close(logits(padded, start), logits(small, params), atol=1e-6)
    small_end, small_losses = run(small, tree.stack([params]))
    padded_end, padded_losses = run(padded, tree.stack([start]))
    np.testing.assert_allclose(padded_losses, small_losses, rtol=1e-6)
    assert small_losses[-1] < small_losses[0]
    chex.assert_trees_all_close(ex.unpad_d_ff(padded_end, 24), small_end, atol=1e-6)
    chex.assert_trees_all_close(logits(padded, padded_end), logits(small, small_end), atol=1e-6)
    mlp = padded_end["body"]["mlp"]
    for name, pad in (("w_gate", mlp["w_gate"]["kernel"][..., 24:]),
                      ("w_up", mlp["w_up"]["kernel"][..., 24:]),
                      ("w_down", mlp["w_down"]["kernel"][..., 24:, :])):
        assert not np.any(np.asarray(pad)), name
