import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decjax import tree
from decjax.models import LlamaConfig, StagedLlama, full_route
from decjax.optim import stage_adamw
from decjax.skippipe import (
    eval_with_omitted_stages,
    kept_stages,
    make_skippipe_train_step,
    normalize_stage_grads,
    omitted_stage_route,
    rotating_schedules,
    round_robin_schedule,
    stage_major_allocation,
    validate,
    visits_per_stage,
)
from decjax.testing import log_compilations
from decjax.train import accumulate_grads, init_state, make_eval_step, make_train_step
from decjax.train.step import split_microbatches

CFG = LlamaConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=3, d_ff=32)
MODEL = StagedLlama(CFG, 3, skip_by_branching=True)  # S = 4 with io: 25% skip keeps 2 of 3
ALLOC = stage_major_allocation([3, 1, 1, 1])


def _rows(batch, seq_len=16, seed=0):
    """Learnable rows ``[B, T+1]``: arithmetic progressions over ids 1..V-1 (0 is the pad)."""
    rng = np.random.default_rng(seed)
    start, stride = rng.integers(0, 31, (batch, 1)), rng.integers(1, 4, (batch, 1))
    return jnp.asarray((start + stride * np.arange(seq_len + 1)) % 31 + 1, jnp.int32)


def _body_leaves(grads, stage):
    return jax.tree.leaves(tree.index(grads["body"], stage))


def test_visits_count_microbatches_per_stage():
    route = np.array([[0, 1], [0, 1], [0, -1], [0, -1]], np.int32)
    np.testing.assert_array_equal(visits_per_stage(route, 3), [4, 2, 0])
    sched = round_robin_schedule(stage_major_allocation([5, 3, 3, 3, 3, 3]), 15, 1 / 3)
    np.testing.assert_array_equal(visits_per_stage(sched.route(), 5), sched.stage_visits(5))


def test_visitor_normalisation_is_the_mean_over_visitors():
    """A stage visited by 2 of 4 microbatches gets twice the plain mean; unvisited stays 0."""
    params = MODEL.init(jax.random.key(0))
    rows, route = split_microbatches(_rows(8), 4), jnp.asarray([[0, 1], [0, 1], [0, -1], [0, -1]])
    _, plain = jax.jit(lambda p: accumulate_grads(MODEL, p, rows, route))(params)
    scaled = normalize_stage_grads(plain, route)
    chex.assert_trees_all_equal(scaled["io"], plain["io"])
    chex.assert_trees_all_close(_body_leaves(scaled, 0), _body_leaves(plain, 0), rtol=1e-6)
    chex.assert_trees_all_close(_body_leaves(scaled, 1), [2 * g for g in _body_leaves(plain, 1)],
                                rtol=1e-6)
    assert not any(np.any(np.asarray(g)) for g in _body_leaves(scaled, 2))
    grad_fn = jax.jit(jax.grad(lambda p, r, q: MODEL.loss(p, r, q)[0]))
    visitors = [grad_fn(params, rows[m], route[m]) for m in (0, 1)]
    mean_1 = [(a + b) / 2 for a, b in zip(*[_body_leaves(g, 1) for g in visitors], strict=True)]
    chex.assert_trees_all_close(_body_leaves(scaled, 1), mean_1, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_equal(normalize_stage_grads(plain, route, "microbatches"), plain)


def test_full_route_step_equals_plain_step():
    tx = stage_adamw(1e-2)
    state = init_state(MODEL, tx, jax.random.key(0))
    rows, route = _rows(6), jnp.asarray(full_route(3, 3))
    plain, _ = jax.jit(make_train_step(MODEL, tx))(state, rows, route)
    for normalization in ("visitors", "microbatches"):
        step = jax.jit(make_skippipe_train_step(MODEL, tx, normalization=normalization))
        skip, metrics = step(state, rows, route)
        chex.assert_trees_all_close(skip.params, plain.params, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(metrics["stage_visits"], [3, 3, 3])


def test_new_schedule_does_not_recompile():
    tx = stage_adamw(1e-2)
    step = jax.jit(make_skippipe_train_step(MODEL, tx))
    state, rows = init_state(MODEL, tx, jax.random.key(0)), _rows(6)
    scheds = itertools.islice(rotating_schedules(ALLOC, 3, 0.25), 3)
    routes = [jnp.asarray(s.route()) for s in scheds]
    assert not np.array_equal(routes[0], routes[1])
    state, _ = step(state, rows, routes[0])
    with log_compilations() as compiled:
        for route in routes[1:]:
            state, _ = step(state, rows, route)
    assert "skippipe_train_step" not in compiled, compiled


def test_rotating_schedules_visit_every_stage_from_every_position():
    scheds = list(itertools.islice(rotating_schedules(ALLOC, 6, 0.25, start=2), 7))
    for sched in scheds:
        validate(sched, n_stages=3, skip_ratio=0.25)
    np.testing.assert_array_equal(scheds[3].stages, scheds[0].stages)  # period S = 3
    counts = np.zeros((6, 3), int)  # microbatch position x stage, over one period
    for sched in scheds[:3]:
        np.add.at(counts, (np.arange(6)[:, None], sched.stages), 1)
    np.testing.assert_array_equal(counts, 2)  # 2 of 3 stages per step, each stage twice


def test_training_at_quarter_skip_on_rotating_schedules_lowers_loss():
    tx = stage_adamw(1e-2)
    step = jax.jit(make_skippipe_train_step(MODEL, tx))
    state, losses = init_state(MODEL, tx, jax.random.key(0)), []
    for t, sched in enumerate(itertools.islice(rotating_schedules(ALLOC, 3, 0.25), 30)):
        state, metrics = step(state, _rows(6, seed=t), jnp.asarray(sched.route()))
        losses.append(float(metrics["loss"]))
        assert min(metrics["stage_visits"]) == max(metrics["stage_visits"]) == 2
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_kept_stages_and_routes():
    assert kept_stages(5, 0.5).tolist() == [0, 4]  # the reference's "half the model" at S=6
    assert kept_stages(5, 2 / 3).tolist() == [0, 2, 4]
    assert kept_stages(3, 0.75).tolist() == [0, 2]
    assert kept_stages(3, 1.0).tolist() == [0, 1, 2]
    assert kept_stages(4, [3, 1]).tolist() == [3, 1]
    drawn = kept_stages(5, 0.5, choice="random", rng=3)
    assert drawn.size == 2 and list(drawn) == sorted(drawn)
    np.testing.assert_array_equal(drawn, kept_stages(5, 0.5, choice="random", rng=3))
    np.testing.assert_array_equal(omitted_stage_route(5, 0.5, 2), [[0, 4, -1, -1, -1]] * 2)
    assert omitted_stage_route(3, [1], width=1).tolist() == [[1]]


@pytest.mark.parametrize("bad, match", [
    (dict(keep=0.1), "keep must be a fraction in"), (dict(keep=1.5), "keep must be a fraction"),
    (dict(keep=[0, 0]), "distinct integers"), (dict(keep=[3]), r"in \[0, 3\)"),
    (dict(keep=0.5, choice="middle"), "choice must be one of"),
])
def test_bad_keep_is_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        kept_stages(3, **bad)


def test_bad_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalization must be one of"):
        make_skippipe_train_step(MODEL, stage_adamw(1e-2), normalization="mean")


def test_omitted_stage_eval():
    params, batches = MODEL.init(jax.random.key(0)), [_rows(4, seed=s) for s in (7, 8)]
    out = eval_with_omitted_stages(MODEL, params, batches, n_microbatches=2)
    assert list(out) == [1.0, 0.75, 0.5]
    assert out[0.75]["kept_stages"] == [(0, 2)] * 2 and out[0.5]["kept_stages"] == [(0,)] * 2
    for res in out.values():
        assert np.isfinite([res["loss"], res["perplexity"], res["sequence_perplexity"]]).all()
        np.testing.assert_allclose(res["perplexity"], np.exp(res["loss"]), rtol=1e-6)
        assert res["sequence_perplexity"] >= res["perplexity"] * (1 - 1e-6)  # Jensen
    eval_step, route = jax.jit(make_eval_step(MODEL)), jnp.asarray(full_route(2, 3))
    sums = [eval_step(params, rows, route) for rows in batches]
    plain = sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums)
    np.testing.assert_allclose(out[1.0]["loss"], plain, rtol=1e-6)
    drawn = eval_with_omitted_stages(MODEL, params, batches, keep=[0.75, (2, 1)], choice="random")
    assert all(len(s) == 2 and list(s) == sorted(s) for s in drawn[0.75]["kept_stages"])
    assert drawn[(2, 1)]["kept_stages"] == [(2, 1)] * 2
