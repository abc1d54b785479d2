"""Ensemble inference for domain experts: BTM's domain posterior and its evaluation modes.

Each expert ``e`` gives per-token target log-probs ``lp[e, b, t] = log p_e(x_t | x_<t)``
(:func:`expert_token_logprobs`). The ensemble predicts with the domain posterior of
Branch-Train-Merge (Li et al., arXiv 2208.03306), reused by HDEE (arXiv 2502.19385)::

    log w[e,t] = log pi_e + sum_{s<t} lp[e,s] - logsumexp_e'(log pi_e' + sum_{s<t} lp[e',s])
    log p(x_t | x_<t) = logsumexp_e(log w[e,t] + lp[e,t])

Only ``float32[E, B, T]`` target log-probs are ever stacked; full-vocabulary logits exist for
``experts_per_chunk`` experts at a time. The cached prior ``pi`` (:func:`estimate_prior`) carries
its provenance, and :func:`check_prior_allowed` refuses to score rows it was estimated on.
"""

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decjax.models.staged import StagedLlama
from decjax.types import Params, PyTree

LogprobFn = Callable[[PyTree, jax.Array], jax.Array]
"""``logprob_fn(params, rows_BT1) -> float32[B, T]`` for one expert."""

PRIOR_SPLITS = ("train", "val")


def _np_logsumexp(x: np.ndarray, axis=None, keepdims: bool = False) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    out = np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top
    return out if keepdims else np.squeeze(out, axis=axis)


# -- per-expert log-probs ----------------------------------------------------------------------


def staged_logprob_fn(model: StagedLlama) -> LogprobFn:
    """Target log-probs of one :class:`StagedLlama` expert along the full route.

    Args:
      model: the expert's architecture.

    Returns:
      ``logprob_fn(params, rows_BT1) -> float32[B, T]``: ``log p(rows[:, t+1] | rows[:, :t+1])``.

    Example::

        model = StagedLlama(LlamaConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=2), 2)
        params_E = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
        lp_EBT = expert_token_logprobs(staged_logprob_fn(model), params_E, rows_BT1)
    """
    route_P = jnp.arange(model.n_stages, dtype=jnp.int32)

    def logprob_fn(params: Params, rows_BT1: jax.Array) -> jax.Array:
        inputs_BT, targets_BT = rows_BT1[:, :-1], rows_BT1[:, 1:]
        logits_BTV = model.microbatch_logits(params, inputs_BT, route_P)
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]

    return logprob_fn


def expert_token_logprobs(
    logprob_fn: LogprobFn, params_E: PyTree, rows_BT1: jax.Array, *, experts_per_chunk: int = 1
) -> jax.Array:
    """``float32[E, B, T]`` target log-probs of every expert of one stacked group.

    Experts run ``experts_per_chunk`` at a time (``lax.map`` over vmapped chunks), so at most
    ``experts_per_chunk`` experts' ``[B, T, V]`` logits are live; ``[E, B, T, V]`` never is.

    Args:
      logprob_fn: one expert's ``(params, rows_BT1) -> [B, T]``, e.g. :func:`staged_logprob_fn`.
      params_E: the group's parameters, every leaf with a leading ``E`` axis.
      rows_BT1: ``int[B, T+1]`` token rows; targets are ``rows[:, 1:]``.
      experts_per_chunk: experts evaluated together; larger is faster and uses more memory.

    Returns:
      ``float32[E, B, T]``.

    Examples:
      >>> unigram = lambda logp_V, rows: logp_V[rows[:, 1:]]   # a toy expert: log p(x_t)
      >>> logp_EV = jax.nn.log_softmax(jnp.arange(12.0).reshape(3, 4), axis=-1)
      >>> expert_token_logprobs(unigram, logp_EV, jnp.zeros((2, 9), jnp.int32)).shape
      (3, 2, 8)
    """
    if experts_per_chunk < 1:
        raise ValueError(f"experts_per_chunk must be >= 1, got {experts_per_chunk}")
    return jax.lax.map(lambda p: logprob_fn(p, rows_BT1), params_E, batch_size=experts_per_chunk)


def group_token_logprobs(
    groups: Sequence[tuple[LogprobFn, PyTree]], rows_BT1: jax.Array, *, experts_per_chunk: int = 1
) -> jax.Array:
    """:func:`expert_token_logprobs` of several groups (e.g. different ``d_ff``), in order.

    Args:
      groups: ``(logprob_fn, params_E)`` per group of same-shaped experts.
      rows_BT1: ``int[B, T+1]`` token rows shared by all experts.
      experts_per_chunk: as in :func:`expert_token_logprobs`, per group.

    Returns:
      ``float32[sum E_g, B, T]``, experts of group 0 first.
    """
    if not groups:
        raise ValueError("groups must hold at least one (logprob_fn, params_E) pair")
    return jnp.concatenate(
        [
            expert_token_logprobs(fn, p, rows_BT1, experts_per_chunk=experts_per_chunk)
            for fn, p in groups
        ],
        axis=0,
    )


# -- mixtures ----------------------------------------------------------------------------------


def _log_prior(n_experts: int, log_prior_E: jax.Array | None) -> jax.Array:
    if log_prior_E is None:
        return jnp.zeros((n_experts,), jnp.float32)  # normalised by the posterior's log_softmax
    return jnp.asarray(log_prior_E, jnp.float32)


def posterior_log_weights(lp_EBT: jax.Array, log_prior_E: jax.Array | None = None) -> jax.Array:
    """``log w[e, b, t]``: the domain posterior given row ``b``'s prefix ``x_<t``.

    Args:
      lp_EBT: per-expert target log-probs.
      log_prior_E: log prior over experts (need not be normalised); ``None`` is uniform.

    Returns:
      ``float32[E, B, T]``, normalised over ``E``; at ``t = 0`` it equals the prior.
    """
    lp_EBT = jnp.asarray(lp_EBT, jnp.float32)
    # Exclusive prefix sum; built by shifting so that t = 0 is exactly zero.
    cum_EBT = jnp.cumsum(lp_EBT, axis=-1)
    prefix_EBT = jnp.concatenate([jnp.zeros_like(cum_EBT[..., :1]), cum_EBT[..., :-1]], axis=-1)
    log_prior = _log_prior(lp_EBT.shape[0], log_prior_E)
    return jax.nn.log_softmax(log_prior[:, None, None] + prefix_EBT, axis=0)


def mixture_logprobs(lp_EBT: jax.Array, log_prior_E: jax.Array | None = None) -> jax.Array:
    """``float32[B, T]`` log-probs of the posterior-weighted mixture of experts.

    Examples:
      >>> lp = jnp.log(jnp.array([[[0.5, 0.5]], [[0.1, 0.1]]]))   # E=2, B=1, T=2
      >>> [round(float(p), 3) for p in jnp.exp(mixture_logprobs(lp))[0]]
      [0.3, 0.433]
    """
    log_w_EBT = posterior_log_weights(lp_EBT, log_prior_E)
    return jax.nn.logsumexp(log_w_EBT + lp_EBT, axis=0)


def sequence_log_posterior(lp_EBT: jax.Array, log_prior_E: jax.Array | None = None) -> jax.Array:
    """``float32[E, B]``: the domain posterior after each whole row (the next step's weights)."""
    log_prior = _log_prior(lp_EBT.shape[0], log_prior_E)
    return jax.nn.log_softmax(log_prior[:, None] + jnp.sum(lp_EBT, axis=-1), axis=0)


def mixture_next_token_logprobs(logits_EV: jax.Array, log_w_E: jax.Array) -> jax.Array:
    """``float32[V]``: the mixture's full next-token distribution at one position (generation).

    Args:
      logits_EV: each expert's logits (or log-softmax) for this position.
      log_w_E: log weights over experts, e.g. a column of :func:`posterior_log_weights`.

    Returns:
      Log-probabilities over the vocabulary; ``exp`` sums to one.
    """
    logp_EV = jax.nn.log_softmax(jnp.asarray(logits_EV, jnp.float32), axis=-1)
    log_w_E = jax.nn.log_softmax(jnp.asarray(log_w_E, jnp.float32))
    return jax.nn.logsumexp(log_w_E[:, None] + logp_EV, axis=0)


def top1_logprobs(lp_EBT: jax.Array, expert_index) -> jax.Array:
    """``float32[B, T]`` of one expert (scalar index) or one expert per row (``int[B]``)."""
    index = jnp.asarray(expert_index)
    if index.ndim == 0:
        return lp_EBT[index]
    return jnp.take_along_axis(lp_EBT, index[None, :, None], axis=0)[0]


def logprob_average(lp_EBT: jax.Array) -> jax.Array:
    """``mean_e lp[e]``: the reference's "simple_avg". NOT a probability mixture.

    ``exp`` of it is the geometric mean of the experts' probabilities, which sums to less than
    one over the vocabulary whenever experts differ; its perplexity is the geometric mean of
    the experts' perplexities. Report it only as a labelled baseline.
    """
    return jnp.mean(lp_EBT, axis=0)


def perplexity(logp_BT: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``exp(-mean log p)`` over the positions where ``mask`` is nonzero (all by default)."""
    logp_BT = jnp.asarray(logp_BT, jnp.float32)
    if mask is None:
        return jnp.exp(-jnp.mean(logp_BT))
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.exp(-jnp.sum(logp_BT * mask) / jnp.maximum(jnp.sum(mask), 1.0))


# -- cached prior (BTM) ------------------------------------------------------------------------


def row_fingerprints(rows) -> list[str]:
    """sha1 of each row's tokens as int64, so dtype does not change the fingerprint."""
    rows = np.asarray(rows, dtype=np.int64).reshape(np.shape(rows)[0], -1)
    return [hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest() for r in rows]


@dataclasses.dataclass(frozen=True, eq=False)
class DomainPrior:
    """A cached prior over experts with the provenance of the rows it was estimated on.

    Attributes:
      log_weights: ``float[E]`` log prior, normalised (``-inf`` for dropped experts).
      split: data split of the estimation rows; only ``"train"`` or ``"val"``.
      row_fingerprints: :func:`row_fingerprints` of those rows.
      decay: EWM smoothing factor used.
      n_sequences: rows used.
    """

    log_weights: np.ndarray
    split: str
    row_fingerprints: frozenset[str]
    decay: float
    n_sequences: int

    def __post_init__(self):
        if self.split not in PRIOR_SPLITS:
            raise ValueError(
                f"prior split must be one of {PRIOR_SPLITS} (never the evaluation split), "
                f"got split={self.split!r}"
            )


def estimate_prior(
    lp_val_ENT, *, rows, split: str = "val", decay: float = 0.3, max_sequences: int = 100
) -> DomainPrior:
    """BTM's cached prior: an EWM of per-sequence posteriors over validation rows.

    With ``post_n = softmax_e(sum_t lp[e, n, t])`` (uniform start for every sequence), the
    prior is ``y_{N-1}`` of ``y_0 = post_0``, ``y_n = (1 - decay) y_{n-1} + decay post_n``
    (pandas ``ewm(alpha=decay, adjust=False)``), over the first ``max_sequences`` rows.

    Args:
      lp_val_ENT: per-expert target log-probs of ``N`` validation rows.
      rows: ``int[N, T+1]`` the rows ``lp_val_ENT`` was computed on (their fingerprints are kept).
      split: where the rows come from: ``"val"`` (or ``"train"``); ``"test"`` is refused.
      decay: EWM smoothing factor in ``(0, 1]``.
      max_sequences: at most this many rows are used.

    Returns:
      A :class:`DomainPrior`.

    Examples:
      >>> lp = np.log(np.full((2, 3, 4), 0.5)); lp[1] -= 0.1
      >>> prior = estimate_prior(lp, rows=np.arange(15).reshape(3, 5))
      >>> top1_expert(prior)
      0
    """
    if split not in PRIOR_SPLITS:
        raise ValueError(f"split must be one of {PRIOR_SPLITS}, got split={split!r}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must lie in (0, 1], got decay={decay}")
    if max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    lp = np.asarray(lp_val_ENT, np.float64)
    rows = np.asarray(rows)
    if lp.ndim != 3 or rows.shape[0] != lp.shape[1]:
        raise ValueError(
            f"lp_val_ENT must be [E, N, T] and rows [N, ...] with the same N, "
            f"got {lp.shape} and {rows.shape}"
        )
    n = min(max_sequences, lp.shape[1])
    seq_logp_NE = lp[:, :n].sum(axis=-1).T
    post_NE = np.exp(seq_logp_NE - _np_logsumexp(seq_logp_NE, axis=-1, keepdims=True))
    ewm_E = post_NE[0]
    for post_E in post_NE[1:]:
        ewm_E = (1.0 - decay) * ewm_E + decay * post_E
    with np.errstate(divide="ignore"):  # an expert with zero weight gets log 0 = -inf
        log_weights = np.log(ewm_E / ewm_E.sum())
    return DomainPrior(log_weights, split, frozenset(row_fingerprints(rows[:n])), decay, n)


def check_prior_allowed(prior: DomainPrior, eval_rows, eval_split: str) -> None:
    """Raises ``ValueError`` unless ``prior`` was estimated on other data than the evaluation."""
    if eval_split == prior.split:
        raise ValueError(
            f"eval_split={eval_split!r} equals the prior's split; estimate the prior on "
            f"one of {PRIOR_SPLITS} and evaluate on another split"
        )
    overlap = sum(fp in prior.row_fingerprints for fp in row_fingerprints(eval_rows))
    if overlap:
        raise ValueError(
            f"prior was estimated on {overlap} of the evaluation rows; "
            "estimate it on validation data"
        )


def top1_expert(prior: DomainPrior) -> int:
    """The expert with the largest prior weight."""
    return int(np.argmax(prior.log_weights))


def restrict_top_k(prior: DomainPrior, k: int) -> DomainPrior:
    """Keeps the ``k`` experts with the largest prior (BTM ``--eval-topk``), renormalised."""
    log_w = np.asarray(prior.log_weights, np.float64)
    if not 1 <= k <= log_w.shape[0]:
        raise ValueError(f"k must lie in [1, {log_w.shape[0]}], got k={k}")
    keep = np.argsort(-log_w, kind="stable")[:k]
    kept = np.full_like(log_w, -np.inf)
    kept[keep] = log_w[keep] - _np_logsumexp(log_w[keep])
    return dataclasses.replace(prior, log_weights=kept)


def mixture_logprobs_with_prior(
    lp_EBT: jax.Array, prior: DomainPrior, *, eval_rows, eval_split: str = "test"
) -> jax.Array:
    """:func:`mixture_logprobs` with a cached prior, after :func:`check_prior_allowed`."""
    check_prior_allowed(prior, eval_rows, eval_split)
    if np.shape(prior.log_weights) != (lp_EBT.shape[0],):
        raise ValueError(
            f"prior has {np.shape(prior.log_weights)} weights for {lp_EBT.shape[0]} experts"
        )
    return mixture_logprobs(lp_EBT, jnp.asarray(prior.log_weights, jnp.float32))


def evaluate_modes(
    lp_EBT: jax.Array,
    *,
    prior: DomainPrior | None = None,
    eval_rows=None,
    eval_split: str = "test",
    mask: jax.Array | None = None,
) -> dict[str, float]:
    """Perplexity of each ensemble prediction mode, reported separately.

    Keys: ``"uniform_posterior"`` (BTM posterior from a uniform prior), ``"cached_prior"`` and
    ``"top1"`` (with ``prior``; ``eval_rows`` then required) and
    ``"logprob_average_not_mixture"`` (:func:`logprob_average`).
    """
    modes = {"uniform_posterior": mixture_logprobs(lp_EBT)}
    if prior is not None:
        if eval_rows is None:
            raise ValueError("eval_rows is required with a prior, to check it never saw them")
        modes["cached_prior"] = mixture_logprobs_with_prior(
            lp_EBT, prior, eval_rows=eval_rows, eval_split=eval_split
        )
        modes["top1"] = top1_logprobs(lp_EBT, top1_expert(prior))
    modes["logprob_average_not_mixture"] = logprob_average(lp_EBT)
    return {name: float(perplexity(logp, mask)) for name, logp in modes.items()}


_STACKED_LOGPROBS: dict = {}


def stacked_token_logprobs(config, params_E: PyTree, rows: np.ndarray, *,
                           chunk: int = 64) -> np.ndarray:
    """``float32[E, N, T]`` target log-probs of every stacked one-stage expert of ``config``
    on ``rows``, in fixed chunks of ``chunk`` rows (one compilation per config and ``E``)."""
    n_experts = jax.tree.leaves(params_E)[0].shape[0]
    key = (config, n_experts, chunk)
    if key not in _STACKED_LOGPROBS:
        fn = staged_logprob_fn(StagedLlama(config, n_stages=1))
        _STACKED_LOGPROBS[key] = jax.jit(lambda p, r: expert_token_logprobs(
            fn, p, r, experts_per_chunk=n_experts))
    out = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        padded = np.concatenate([part, np.repeat(part[:1], chunk - len(part), axis=0)])
        out.append(np.asarray(_STACKED_LOGPROBS[key](params_E, jnp.asarray(padded)))[:, :len(part)])
    return np.concatenate(out, axis=1)


def score_domains(config, params_E: PyTree, names: Sequence[str], corpus, domains: Sequence[str],
                  *, test_rows: int, prior_rows: int = 100, prior_decay: float = 0.3,
                  mixtures: bool = True) -> dict:
    """Per domain, every stacked expert's test perplexity and, with ``mixtures``, each
    prediction mode's (:func:`evaluate_modes`) under BTM's cached prior estimated on the
    domain's first ``prior_rows`` *validation* rows.

    ``corpus`` is a :class:`decjax.ensemble.DomainCorpus` with disjoint val and test rows; at
    most ``test_rows`` test rows are scored. Zero-padded SwiGLU units change nothing, so a
    padded group is scored with its padded ``config``.
    """
    out = {}
    for d in domains:
        test = np.asarray(corpus.get("test", d)[:test_rows])
        lp_test = stacked_token_logprobs(config, params_E, test)
        scores = {"experts": {n: float(np.exp(-lp_test[i].mean())) for i, n in enumerate(names)},
                  "test_rows": len(test)}
        if mixtures:
            val = np.asarray(corpus.get("val", d)[:prior_rows])
            prior = estimate_prior(stacked_token_logprobs(config, params_E, val), rows=val,
                                   split="val", decay=prior_decay, max_sequences=prior_rows)
            scores.update(modes=evaluate_modes(jnp.asarray(lp_test), prior=prior,
                                               eval_rows=test, eval_split="test"),
                          prior=np.exp(prior.log_weights).tolist(),
                          top1=names[top1_expert(prior)], prior_rows=prior.n_sequences)
        out[d] = scores
    return out
