"""Synthetic domains with exactly known entropy rates: random Markov chains over letters.

A domain spec names the chain:

* ``"markov<k>_v<v>"``: order-``k`` chain over the first ``v`` letters of ``a..zA..Z`` (so
  ``v <= 52``); each row of the
  transition table (one per ``k``-gram of preceding letters) is drawn from a symmetric
  Dirichlet(``alpha``) with ``alpha = 0.5`` unless the spec ends in ``_a<alpha>``, e.g.
  ``"markov2_v8_a0.2"``. Smaller ``alpha`` gives peakier rows and a lower entropy rate.
* ``"iid_v<v>"``: uniform independent letters, entropy rate exactly ``log(v)``
  (``"iid_v<v>_a<alpha>"`` draws one non-uniform distribution instead).

The entropy rate ``H = sum_s pi(s) H(P[s, :])`` (nats per symbol) is computed exactly from the
stationary distribution ``pi`` over ``k``-grams, so it is the best achievable loss. Each symbol is
one ASCII letter, so with the byte tokenizer it is also nats per *token*. Training losses sit a
little above it: the end-of-document token, the first ``k`` letters of each document (drawn from
the stationary ``k``-gram distribution, with no preceding context) and the first ``k - 1``
targets of every packed row (whose context was cut off) add ``O(k / doc_len + k / seq_len)``
nats per token; with the default 4096-letter documents the document part is below 0.1%.
"""

import dataclasses
import re
import string
import zlib
from collections.abc import Sequence

import numpy as np

Documents = dict[str, list[str]]

DEFAULT_ALPHA = 0.5
ALPHABET = string.ascii_lowercase + string.ascii_uppercase
MAX_VOCAB = len(ALPHABET)
_LETTER_BYTES = np.frombuffer(ALPHABET.encode("ascii"), np.uint8)
_LETTER_INDEX = np.full(256, -1, np.int64)
_LETTER_INDEX[_LETTER_BYTES] = np.arange(MAX_VOCAB)
MAX_STATES = 65536
# Four domains from easy to hard (entropy rates with data.seed=0 are roughly 0.5 to 3.5 nats).
DEFAULT_SYNTHETIC_DOMAINS = ("markov3_v4_a0.2", "markov2_v8", "markov1_v16", "iid_v32")
_SPEC = re.compile(
    r"^(?:markov(?P<order>[1-9][0-9]*)|iid)_v(?P<vocab>[0-9]+)(?:_a(?P<alpha>[0-9]*\.?[0-9]+))?$"
)


@dataclasses.dataclass(frozen=True)
class MarkovSpec:
    """A parsed domain spec; ``alpha is None`` means uniform (plain ``iid_v<v>``)."""

    name: str
    order: int
    vocab: int
    alpha: float | None


def parse_spec(spec: str) -> MarkovSpec:
    """Parses a domain spec such as ``"markov2_v8"``, ``"iid_v32"`` or ``"markov1_v16_a0.1"``.

    Raises:
        ValueError: malformed spec, ``v`` outside ``[2, 26]``, ``v**k > 65536`` or ``alpha <= 0``.
    """
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(
            f"data.synthetic_domains has a malformed spec {spec!r}; allowed: 'markov<k>_v<v>', "
            "'iid_v<v>', optionally ending in '_a<alpha>' (e.g. 'markov2_v8', 'iid_v32')"
        )
    order = int(match["order"] or 0)
    vocab = int(match["vocab"])
    alpha = None if match["alpha"] is None else float(match["alpha"])
    if order and alpha is None:
        alpha = DEFAULT_ALPHA
    if not 2 <= vocab <= MAX_VOCAB:
        raise ValueError(f"data.synthetic_domains: {spec!r} needs 2 <= v <= {MAX_VOCAB} letters")
    if vocab**order > MAX_STATES:
        raise ValueError(
            f"data.synthetic_domains: {spec!r} has v**k = {vocab**order} states; "
            f"at most {MAX_STATES} are allowed"
        )
    if alpha is not None and alpha <= 0:
        raise ValueError(f"data.synthetic_domains: {spec!r} needs alpha > 0")
    return MarkovSpec(name=spec, order=order, vocab=vocab, alpha=alpha)


def _order_of(transitions: np.ndarray) -> int:
    """``k`` such that ``transitions`` has ``v**k`` rows of ``v`` columns."""
    num_states, vocab = transitions.shape
    order = round(np.log(num_states) / np.log(vocab)) if num_states > 1 else 0
    if vocab**order != num_states:
        raise ValueError(f"a transition table needs v**k rows for v={vocab}; got {num_states}")
    return order


def _next_states(num_states: int, vocab: int) -> np.ndarray:
    """``[S, v]``: the k-gram after state ``s`` emits letter ``a`` (oldest letter dropped)."""
    states = np.arange(num_states)[:, None]
    return (states * vocab + np.arange(vocab)[None, :]) % num_states


def stationary_distribution(
    transitions: np.ndarray, *, tol: float = 1e-13, max_iters: int = 100_000
) -> np.ndarray:
    """The stationary distribution over ``k``-gram states of a Markov chain.

    Args:
        transitions: ``float[v**k, v]``; row ``s`` is the next-letter distribution after the
            ``k``-gram whose base-``v`` digits (oldest first) are ``s``. A ``v x v`` matrix is the
            usual order-1 chain; a single row is an iid source.
        tol: stop when successive iterates differ by less than this (L1).
        max_iters: give up (RuntimeError) after this many iterations.

    Returns:
        ``float64[v**k]`` summing to one.
    """
    transitions = np.asarray(transitions, dtype=np.float64)
    num_states, vocab = transitions.shape
    _order_of(transitions)
    next_states = _next_states(num_states, vocab).ravel()
    pi = np.full(num_states, 1.0 / num_states)
    for _ in range(max_iters):
        flow = np.bincount(
            next_states, weights=(pi[:, None] * transitions).ravel(), minlength=num_states
        )
        # The lazy chain (I + P) / 2 has the same stationary distribution but cannot oscillate,
        # so the iteration converges even for periodic chains.
        new_pi = 0.5 * (pi + flow)
        new_pi /= new_pi.sum()
        if np.abs(new_pi - pi).sum() < tol:
            return new_pi
        pi = new_pi
    raise RuntimeError(f"stationary distribution did not converge in {max_iters} iterations")


def row_entropies(transitions: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row, with ``0 log 0 = 0``."""
    p = np.asarray(transitions, dtype=np.float64)
    safe = np.where(p > 0, p, 1.0)
    return -(p * np.log(safe)).sum(axis=1)


def markov_entropy_rate(transitions: np.ndarray) -> float:
    """Exact entropy rate in nats per symbol: ``sum_s pi(s) H(transitions[s])``.

    Args:
        transitions: ``float[v**k, v]`` as in :func:`stationary_distribution`.

    Returns:
        The entropy rate; ``log(v)`` for a uniform table.
    """
    return float(stationary_distribution(transitions) @ row_entropies(transitions))


def _rng(seed: int, name: str, stream: int) -> np.random.Generator:
    # Keyed by the spec name, so adding or reordering domains never changes the other chains.
    return np.random.default_rng([seed, zlib.crc32(name.encode()), stream])


def random_transitions(spec: MarkovSpec, seed: int) -> np.ndarray:
    """The transition table of ``spec``: ``float64[v**k, v]``, rows ~ Dirichlet(alpha)."""
    num_states = spec.vocab**spec.order
    if spec.alpha is None:
        return np.full((num_states, spec.vocab), 1.0 / spec.vocab)
    rows = _rng(seed, spec.name, 0).dirichlet(np.full(spec.vocab, spec.alpha), size=num_states)
    return rows / rows.sum(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovSource:
    """One synthetic domain: its chain, stationary distribution and entropy rate."""

    name: str
    order: int
    vocab: int
    transitions: np.ndarray
    stationary: np.ndarray
    entropy_rate: float

    def sample(self, num_docs: int, doc_len: int, rng: np.random.Generator) -> np.ndarray:
        """Samples ``int64[num_docs, doc_len]`` letter indices, all documents in parallel.

        Each document starts in a state drawn from the stationary distribution (its digits are
        the first ``k`` letters), so the whole document is a stationary sample.
        """
        num_states = self.transitions.shape[0]
        k, v = self.order, self.vocab
        cdf = np.cumsum(self.transitions, axis=1)
        states = rng.choice(num_states, size=num_docs, p=self.stationary)
        length = max(doc_len, k)
        symbols = np.empty((num_docs, length), dtype=np.int64)
        symbols[:, :k] = (states[:, None] // v ** np.arange(k - 1, -1, -1)) % v
        uniforms = rng.random((num_docs, length - k))
        for t in range(k, length):
            # Inverse-CDF sampling; the clamp guards against cdf[-1] rounding just below 1.
            letter = np.minimum((uniforms[:, t - k, None] > cdf[states]).sum(axis=1), v - 1)
            symbols[:, t] = letter
            states = (states * v + letter) % num_states
        return symbols[:, :doc_len]

    def documents(self, num_docs: int, doc_len: int, seed: int) -> list[str]:
        """``num_docs`` seeded documents of ``doc_len`` letters each."""
        symbols = self.sample(num_docs, doc_len, _rng(seed, self.name, 1))
        return [_LETTER_BYTES[row].tobytes().decode("ascii") for row in symbols]

    def cross_entropy(self, text: str) -> float:
        """Mean ``-log p(letter | previous k letters)`` in nats under the true chain.

        Positions ``0..k-1`` have no full context and are left out.
        """
        symbols = _LETTER_INDEX[np.frombuffer(text.encode("ascii"), np.uint8)]
        if symbols.min(initial=0) < 0 or symbols.max(initial=0) >= self.vocab:
            raise ValueError(f"text has letters outside the {self.vocab}-letter alphabet")
        k, v = self.order, self.vocab
        if symbols.size <= k:
            raise ValueError(f"need more than {k} letters to score an order-{k} chain")
        states = np.zeros(symbols.size - k, dtype=np.int64)
        for j in range(k):
            states = states * v + symbols[j : symbols.size - k + j]
        return float(-np.log(self.transitions[states, symbols[k:]]).mean())


def build_markov_source(spec: str, seed: int) -> MarkovSource:
    """Builds the chain for ``spec``, seeded by ``seed`` and the spec name."""
    parsed = parse_spec(spec)
    transitions = random_transitions(parsed, seed)
    stationary = stationary_distribution(transitions)
    return MarkovSource(
        name=parsed.name,
        order=parsed.order,
        vocab=parsed.vocab,
        transitions=transitions,
        stationary=stationary,
        entropy_rate=float(stationary @ row_entropies(transitions)),
    )


def build_markov_sources(specs: Sequence[str] = (), seed: int = 0) -> dict[str, MarkovSource]:
    """One :class:`MarkovSource` per spec (the default set when ``specs`` is empty)."""
    specs = tuple(specs) or DEFAULT_SYNTHETIC_DOMAINS
    if len(set(specs)) != len(specs):
        raise ValueError(f"data.synthetic_domains has duplicates: {list(specs)}")
    return {spec: build_markov_source(spec, seed) for spec in specs}


def load_synthetic(
    specs: Sequence[str] = (), *, doc_len: int = 4096, docs_per_domain: int = 64, seed: int = 0
) -> Documents:
    """Seeded synthetic documents, one domain per spec (the default set when empty)."""
    sources = build_markov_sources(specs, seed)
    return {name: src.documents(docs_per_domain, doc_len, seed) for name, src in sources.items()}


def synthetic_entropy_rates(specs: Sequence[str] = (), seed: int = 0) -> dict[str, float]:
    """Entropy rate in nats per letter of each domain (the default set when ``specs`` is empty)."""
    return {name: src.entropy_rate for name, src in build_markov_sources(specs, seed).items()}
