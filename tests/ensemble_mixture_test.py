"""Tests for decjax.ensemble.mixture: BTM posterior mixtures, cached priors, expert log-probs."""

import doctest
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decjax.ensemble import mixture
from decjax.models import LlamaConfig, StagedLlama

E, B, T, V = 3, 2, 8, 16


def _random_lp(seed: int, shape=(E, B, T)) -> np.ndarray:
    return -np.random.default_rng(seed).exponential(2.0, size=shape).astype(np.float32)


def _loop_posterior_and_mixture(lp, log_prior):
    """The spec's equations, one position at a time, in float64."""
    n_e, n_b, n_t = lp.shape
    lp = lp.astype(np.float64)
    log_w, logp = np.zeros(lp.shape), np.zeros((n_b, n_t))
    for b in range(n_b):
        for t in range(n_t):
            scores = np.array([log_prior[e] + lp[e, b, :t].sum() for e in range(n_e)])
            log_w[:, b, t] = scores - np.log(np.exp(scores - scores.max()).sum()) - scores.max()
            terms = log_w[:, b, t] + lp[:, b, t]
            logp[b, t] = np.log(np.exp(terms - terms.max()).sum()) + terms.max()
    return log_w, logp


@pytest.mark.parametrize("prior", [None, np.log(np.array([0.6, 0.3, 0.1]))])
def test_posterior_and_mixture_match_loop(prior):
    lp = _random_lp(0)
    log_w, logp = jax.jit(
        lambda x: (mixture.posterior_log_weights(x, prior), mixture.mixture_logprobs(x, prior))
    )(lp)
    ref_prior = np.zeros(E) - np.log(E) if prior is None else prior
    want_w, want_p = _loop_posterior_and_mixture(lp, ref_prior)
    chex.assert_trees_all_close(log_w, want_w, atol=1e-5)
    chex.assert_trees_all_close(logp, want_p, atol=1e-5)


def test_unnormalised_prior_gives_the_same_mixture():
    lp, prior = _random_lp(1), np.array([0.2, -1.0, 0.5], np.float32)
    chex.assert_trees_all_close(
        mixture.mixture_logprobs(lp, prior),
        mixture.mixture_logprobs(lp, prior - np.log(np.exp(prior).sum())),
        atol=1e-6,
    )


def _random_expert_logits(seed: int):
    rng = np.random.default_rng(seed)
    logits_EBTV = 2.0 * rng.normal(size=(E, B, T, V)).astype(np.float32)
    targets_BT = rng.integers(0, V, size=(B, T))
    logp_EBTV = logits_EBTV - np.log(np.exp(logits_EBTV).sum(-1, keepdims=True))
    lp_EBT = np.take_along_axis(logp_EBTV, targets_BT[None, :, :, None], axis=-1)[..., 0]
    return logits_EBTV, targets_BT, lp_EBT


def test_mixture_next_token_distribution_sums_to_one_and_matches_target():
    logits_EBTV, targets_BT, lp_EBT = _random_expert_logits(0)
    log_w_EBT = mixture.posterior_log_weights(lp_EBT)
    per_position = jax.vmap(jax.vmap(mixture.mixture_next_token_logprobs, (1, 1)), (1, 1))
    logp_BTV = jax.jit(per_position)(logits_EBTV, log_w_EBT)
    chex.assert_shape(logp_BTV, (B, T, V))
    chex.assert_trees_all_close(jnp.exp(logp_BTV).sum(-1), jnp.ones((B, T)), atol=1e-5)
    at_target = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    chex.assert_trees_all_close(at_target, mixture.mixture_logprobs(lp_EBT), atol=1e-5)


def test_logprob_average_is_not_a_mixture():
    logits_EBTV, _, lp_EBT = _random_expert_logits(1)
    avg_BTV = mixture.logprob_average(jax.nn.log_softmax(logits_EBTV, axis=-1))
    mass_BT = jnp.exp(avg_BTV).sum(-1)
    assert float(mass_BT.max()) < 1.0 - 1e-3  # geometric mean of distinct distributions
    assert not np.allclose(mixture.logprob_average(lp_EBT), mixture.mixture_logprobs(lp_EBT))


def test_one_expert_and_identical_experts_reduce_to_the_expert():
    lp = _random_lp(2, (1, B, T))
    chex.assert_trees_all_close(mixture.mixture_logprobs(lp), lp[0], atol=1e-6)
    same = np.repeat(lp, E, axis=0)
    chex.assert_trees_all_close(mixture.mixture_logprobs(same), lp[0], atol=1e-6)
    chex.assert_trees_all_close(
        mixture.mixture_logprobs(same, np.log([0.7, 0.2, 0.1])), lp[0], atol=1e-6
    )


def test_weights_at_first_position_equal_the_prior():
    lp = _random_lp(3)
    w0 = jnp.exp(mixture.posterior_log_weights(lp)[:, :, 0])
    chex.assert_trees_all_close(w0, jnp.full((E, B), 1.0 / E), atol=1e-7)
    prior = np.array([0.5, 0.3, 0.2], np.float32)
    w0 = jnp.exp(mixture.posterior_log_weights(lp, np.log(prior))[:, :, 0])
    chex.assert_trees_all_close(w0, jnp.broadcast_to(prior[:, None], (E, B)), atol=1e-6)


def test_sequence_posterior_is_the_weight_after_the_last_token():
    lp = _random_lp(4)
    extended = np.concatenate([lp, np.zeros((E, B, 1), np.float32)], axis=-1)
    chex.assert_trees_all_close(
        mixture.sequence_log_posterior(lp),
        mixture.posterior_log_weights(extended)[..., -1],
        atol=1e-5,
    )


def test_top1_and_perplexity():
    lp = _random_lp(5)
    chex.assert_trees_all_close(mixture.top1_logprobs(lp, 1), lp[1])
    chex.assert_trees_all_close(
        mixture.top1_logprobs(lp, np.array([2, 0])), np.stack([lp[2, 0], lp[0, 1]])
    )
    mask = np.zeros((B, T), np.float32)
    mask[:, :3] = 1
    chex.assert_trees_all_close(
        mixture.perplexity(lp[0], mask), np.exp(-lp[0, :, :3].mean()), rtol=1e-6
    )
    chex.assert_trees_all_close(mixture.perplexity(lp[0]), np.exp(-lp[0].mean()), rtol=1e-6)


# -- cached prior --------------------------------------------------------------------------------


def _rows(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(n * (T + 1)).reshape(n, T + 1) + start * (T + 1)) % 50


def test_estimate_prior_matches_ewm_loop():
    n = 12
    lp = _random_lp(6, (E, n, T)) * 0.05  # small gaps keep every posterior away from 0 and 1
    prior = mixture.estimate_prior(lp, rows=_rows(n), decay=0.3, max_sequences=10)
    ewm = None
    for i in range(10):
        scores = lp[:, i].astype(np.float64).sum(-1)
        post = np.exp(scores - scores.max())
        post /= post.sum()
        ewm = post if ewm is None else 0.7 * ewm + 0.3 * post
    chex.assert_trees_all_close(np.exp(prior.log_weights), ewm, atol=1e-6)
    assert prior.n_sequences == 10 and prior.split == "val" and prior.decay == 0.3
    assert prior.row_fingerprints == frozenset(mixture.row_fingerprints(_rows(10)))
    assert mixture.top1_expert(prior) == int(np.argmax(ewm))


def test_prior_refuses_test_split():
    lp = _random_lp(7, (E, 4, T))
    with pytest.raises(ValueError, match="split.*'train', 'val'"):
        mixture.estimate_prior(lp, rows=_rows(4), split="test")
    with pytest.raises(ValueError, match="split"):
        mixture.DomainPrior(np.zeros(E), "test", frozenset(), 0.3, 4)


def test_check_prior_allowed():
    lp_val = _random_lp(8, (E, 4, T))
    prior = mixture.estimate_prior(lp_val, rows=_rows(4))
    overlapping = np.concatenate([_rows(4)[2:].astype(np.int32), _rows(3, start=10)])
    with pytest.raises(ValueError, match="estimated on 2 of the evaluation rows"):
        mixture.check_prior_allowed(prior, overlapping, "test")
    with pytest.raises(ValueError, match="eval_split='val'"):
        mixture.check_prior_allowed(prior, _rows(B, start=10), "val")
    lp = _random_lp(9)
    with pytest.raises(ValueError, match="evaluation rows"):
        mixture.mixture_logprobs_with_prior(lp, prior, eval_rows=_rows(B))
    got = mixture.mixture_logprobs_with_prior(lp, prior, eval_rows=_rows(B, start=10))
    chex.assert_trees_all_close(got, mixture.mixture_logprobs(lp, prior.log_weights), atol=1e-6)


def test_restrict_top_k_renormalises():
    prior = mixture.DomainPrior(np.log([0.5, 0.2, 0.3]), "val", frozenset(), 0.3, 1)
    top2 = mixture.restrict_top_k(prior, 2)
    chex.assert_trees_all_close(np.exp(top2.log_weights), np.array([0.625, 0.0, 0.375]))
    assert top2.split == "val" and top2.row_fingerprints == prior.row_fingerprints
    lp = _random_lp(10)
    chex.assert_trees_all_close(
        mixture.mixture_logprobs(lp, top2.log_weights),
        mixture.mixture_logprobs(lp[[0, 2]], top2.log_weights[[0, 2]]),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="k must lie"):
        mixture.restrict_top_k(prior, 0)


def test_evaluate_modes():
    lp = _random_lp(11)
    prior = mixture.estimate_prior(_random_lp(12, (E, 5, T)), rows=_rows(5))
    got = mixture.evaluate_modes(lp, prior=prior, eval_rows=_rows(B, start=10))
    assert set(got) == {"uniform_posterior", "cached_prior", "top1", "logprob_average_not_mixture"}
    assert got["top1"] == pytest.approx(float(np.exp(-lp[mixture.top1_expert(prior)].mean())))
    assert got["logprob_average_not_mixture"] == pytest.approx(float(np.exp(-lp.mean())), 1e-5)
    assert set(mixture.evaluate_modes(lp)) == {"uniform_posterior", "logprob_average_not_mixture"}
    with pytest.raises(ValueError, match="eval_rows"):
        mixture.evaluate_modes(lp, prior=prior)


# -- expert log-probs from real models -------------------------------------------------------------


def _tiny_model(d_ff: int = 0) -> StagedLlama:
    config = LlamaConfig(vocab_size=V, d_model=16, n_heads=2, n_layers=2, d_ff=d_ff)
    return StagedLlama(config, n_stages=2)


@functools.cache
def _experts(d_ff: int = 0):
    """``E`` experts of the default width, or one narrower expert cut out of expert 0.

    Slicing avoids a second (slow to compile) initialisation; the cut expert is a valid
    ``d_ff``-wide model with its own values.
    """
    wide = _tiny_model()
    params_E = jax.vmap(wide.init)(jax.random.split(jax.random.key(0), E))
    if not d_ff:
        return wide, params_E
    narrow = _tiny_model(d_ff)
    cut = lambda a, s: a[tuple(slice(0, n) for n in (1, *s.shape))]
    return narrow, jax.tree.map(cut, params_E, narrow.abstract_params())


def _eval_rows():
    return jax.random.randint(jax.random.key(42), (B, T + 1), 1, V)


@functools.cache
def _per_expert_loop(d_ff: int = 0) -> np.ndarray:
    """Each expert's target log-probs, one expert at a time, via optax's cross-entropy."""
    model, params_E = _experts(d_ff)
    n = jax.tree.leaves(params_E)[0].shape[0]
    rows = _eval_rows()

    @jax.jit
    def one(params):
        logits = model.microbatch_logits(params, rows[:, :-1], jnp.arange(model.n_stages))
        return -optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:])

    return np.stack([one(jax.tree.map(lambda a, e=e: a[e], params_E)) for e in range(n)])


def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


def test_expert_token_logprobs_match_per_expert_loop_and_never_stack_logits():
    model, params_E = _experts()
    fn, rows = mixture.staged_logprob_fn(model), _eval_rows()

    def run(chunk):
        return jax.jit(
            functools.partial(mixture.expert_token_logprobs, fn, experts_per_chunk=chunk)
        )

    lp1, lp3 = run(1)(params_E, rows), run(3)(params_E, rows)
    chex.assert_shape(lp1, (E, B, T))
    chex.assert_trees_all_close(lp1, _per_expert_loop(), atol=1e-5)
    chex.assert_trees_all_close(lp3, _per_expert_loop(), atol=1e-5)
    shapes = lambda chunk: set(_all_shapes(jax.make_jaxpr(run(chunk))(params_E, rows).jaxpr))
    assert (1, B, T, V) in shapes(1)  # one expert's logits at a time
    assert (E, B, T, V) not in shapes(1)
    assert (E, B, T, V) in shapes(3)  # the check does see a stacked [E, B, T, V] when one exists


def test_groups_of_different_widths_concatenate_in_order():
    (narrow, p_narrow), (wide, p_wide) = _experts(d_ff=32), _experts()
    fns = (mixture.staged_logprob_fn(narrow), mixture.staged_logprob_fn(wide))

    @jax.jit
    def run(params_narrow, params_wide, rows):
        groups = [(fns[0], params_narrow), (fns[1], params_wide)]
        return mixture.group_token_logprobs(groups, rows, experts_per_chunk=2)

    got = run(p_narrow, p_wide, _eval_rows())
    chex.assert_shape(got, (1 + E, B, T))
    chex.assert_trees_all_close(got[:1], _per_expert_loop(d_ff=32), atol=1e-5)
    chex.assert_trees_all_close(got[1:], _per_expert_loop(), atol=1e-5)


def test_docstring_examples_run():
    result = doctest.testmod(mixture, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
