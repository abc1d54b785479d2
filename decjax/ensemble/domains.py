"""A multi-domain corpus for domain experts, the expert-to-domain assignment and data streams.

:func:`domain_corpus` regroups an :class:`~decjax.data.LMData` by domain. Each domain keeps its
training rows and cuts its validation rows into two disjoint halves: ``val`` (first half, to
estimate a mixture prior or pick checkpoints) and ``test`` (second half, to report perplexity).
Validation documents are spread along the packed stream, so the two halves hold (nearly)
disjoint documents; at most the one document that straddles the cut is in both.

Example::

    data = load_data(config.data, seq_len=64)
    corpus = domain_corpus(data)
    assignment = assign_domains(corpus, {"code": ("json", "email"), "web": ("http",)},
                                held_out=("xml",))
    streams = expert_streams(corpus, assignment.experts, batch_size=16, seed=0)
    rows_BT1 = streams["code"].next()       # int32[16, seq_len + 1], shuffled, cycled
    streams["code"].epochs                  # passes over the expert's rows so far
"""

import dataclasses
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class DomainCorpus:
    """Rows ``int32[N, seq_len + 1]`` per domain and split.

    Attributes:
      domains: domain names, in the data's order.
      rows: ``{split: {domain: rows}}`` for ``split`` in :data:`SPLITS`; a domain with no rows
        in a split has an empty ``[0, seq_len + 1]`` array there.
    """

    domains: tuple[str, ...]
    rows: dict[str, dict[str, np.ndarray]]

    @property
    def row_len(self) -> int:
        return next(iter(self.rows["train"].values())).shape[1]

    def get(self, split: str, domain: str) -> np.ndarray:
        """The rows of ``domain`` in ``split``; errors name the allowed values."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        check_domains(self, (domain,), "domain")
        return self.rows[split][domain]

    def summary(self) -> str:
        """One line per domain: rows per split."""
        lines = [f"{'domain':24s} {'train':>7s} {'val':>6s} {'test':>6s}"]
        for d in self.domains:
            counts = [len(self.rows[s][d]) for s in SPLITS]
            lines.append(f"{d:24s} {counts[0]:7d} {counts[1]:6d} {counts[2]:6d}")
        return "\n".join(lines)


def split_val_test(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First half (rounded down) for ``val``, the rest for ``test``: disjoint by construction."""
    cut = len(rows) // 2
    return rows[:cut], rows[cut:]


def corpus_from_rows(domains: Sequence[str], train: np.ndarray, train_domain_ids: np.ndarray,
                     val: np.ndarray, val_domain_ids: np.ndarray) -> DomainCorpus:
    """Builds a :class:`DomainCorpus` from packed rows and per-row domain ids.

    Args:
      domains: domain names; ids index into it.
      train, val: ``int[N, seq_len + 1]`` rows.
      train_domain_ids, val_domain_ids: ``int[N]`` domain id of each row.
    """
    domains = tuple(domains)
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains={domains} has duplicates")
    if np.ndim(train) != 2 or np.ndim(val) != 2 or np.shape(train)[1] != np.shape(val)[1]:
        raise ValueError("train and val must be [N, seq_len + 1] rows of the same length")
    out = {s: {} for s in SPLITS}
    for name, rows, ids in (("train", train, train_domain_ids), ("val", val, val_domain_ids)):
        rows, ids = np.asarray(rows, np.int32), np.asarray(ids)
        if rows.ndim != 2 or ids.shape != rows.shape[:1]:
            raise ValueError(f"{name} must be [N, seq_len + 1] rows with N domain ids")
        if ids.size and (ids.min() < 0 or ids.max() >= len(domains)):
            raise ValueError(f"{name}_domain_ids must lie in [0, {len(domains)})")
        for i, d in enumerate(domains):
            out[name][d] = rows[ids == i]
    for d in domains:
        out["val"][d], out["test"][d] = split_val_test(out["val"][d])
    for split in out.values():
        for rows in split.values():
            rows.setflags(write=False)
    return DomainCorpus(domains=domains, rows=out)


def domain_corpus(data) -> DomainCorpus:
    """Regroups an :class:`~decjax.data.LMData` by domain (a row's domain: its first token's)."""
    return corpus_from_rows(data.domains, data.train, data.train_domain_ids, data.val,
                            data.val_domain_ids)


def check_domains(corpus: DomainCorpus, names: Sequence[str], field: str) -> tuple[str, ...]:
    """Returns ``names`` as a tuple; raises if one is not a domain of ``corpus``."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"{field}={names!r} must be a tuple of domain names, e.g. ('a', 'b')")
    for name in names:
        if name not in corpus.domains:
            raise ValueError(f"{field}: unknown domain {name!r}; available: "
                             f"{', '.join(corpus.domains)}")
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Validated domains per expert, and the held-out evaluation domains."""

    experts: dict[str, tuple[str, ...]]
    held_out: tuple[str, ...]

    @property
    def training_domains(self) -> tuple[str, ...]:
        """Every domain some expert trains on, first-seen order."""
        return tuple(dict.fromkeys(d for ds in self.experts.values() for d in ds))


def assign_domains(corpus: DomainCorpus, experts: Mapping[str, Sequence[str]],
                   held_out: Sequence[str] = ()) -> Assignment:
    """Checks an expert-to-domains assignment against the corpus.

    Args:
      corpus: the data.
      experts: ``{expert_name: (domain, ...)}``; several experts may share a domain.
      held_out: domains no expert trains on, scored on their ``test`` rows.

    Returns:
      The validated :class:`Assignment`.

    Raises:
      ValueError: an unknown domain (the message lists the available ones), a domain both
        trained on and held out, an expert whose domains have no training rows, or a held-out
        domain without test rows.
    """
    if not isinstance(experts, Mapping) or not experts:
        raise ValueError(f"experts={experts!r} must be a non-empty mapping name -> domains")
    checked = {}
    for name, domains in experts.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"experts: expert names must be non-empty strings, got {name!r}")
        checked[name] = check_domains(corpus, domains, f"experts[{name!r}]")
        if not checked[name]:
            raise ValueError(f"experts[{name!r}] has no domains")
    held_out = check_domains(corpus, held_out, "held_out")
    for name, domains in checked.items():
        both = [d for d in domains if d in held_out]
        if both:
            raise ValueError(f"domain {both[0]!r} is both in experts[{name!r}]={domains} and in "
                             f"held_out={held_out}; a held-out domain must not be trained on")
        if sum(len(corpus.rows["train"][d]) for d in domains) == 0:
            raise ValueError(f"expert {name} has no training data (domains {', '.join(domains)})")
    for d in held_out:
        if len(corpus.rows["test"][d]) == 0:
            raise ValueError(f"held_out domain {d!r} has no test rows; raise data.val_fraction "
                             "or lower model.seq_len")
    return Assignment(experts=checked, held_out=held_out)


def _stream_seed(seed: int, name: str) -> list[int]:
    # Keyed by the expert's name: adding or reordering experts leaves every other order intact.
    return [int(seed), zlib.crc32(name.encode())]


class ExpertStream:
    """Shuffled, endlessly cycled batches of one expert's training rows (numpy, deterministic).

    Rows of all the expert's domains are pooled, so each domain is sampled in proportion to its
    size. Every epoch is a fresh permutation seeded by ``(seed, name, epoch)``; batches run
    across epoch boundaries, so a small domain is simply repeated (:attr:`epochs` counts the
    passes). :meth:`get_state` / :meth:`set_state` save and restore the position exactly.
    """

    def __init__(self, rows: np.ndarray, *, batch_size: int, seed: int, name: str):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if len(rows) == 0:
            raise ValueError(f"expert {name} has no training data")
        self.rows, self.batch_size, self.seed, self.name = rows, batch_size, seed, name
        self.rows_served = 0
        self._cached = (-1, None)

    @property
    def epochs(self) -> float:
        """Rows served so far divided by the number of rows."""
        return self.rows_served / len(self.rows)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            rng = np.random.default_rng([*_stream_seed(self.seed, self.name), epoch])
            self._cached = (epoch, rng.permutation(len(self.rows)))
        return self._cached[1]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Row indices at stream positions ``start .. start + count - 1``."""
        n, out = len(self.rows), []
        for pos in range(start, start + count):
            if not out or pos % n == 0:
                perm = self._permutation(pos // n)
            out.append(perm[pos % n])
        return np.asarray(out, np.int64)

    def next(self) -> np.ndarray:
        """The next batch ``int32[batch_size, seq_len + 1]``."""
        batch = self.rows[self.indices(self.rows_served, self.batch_size)]
        self.rows_served += self.batch_size
        return batch

    def get_state(self) -> dict:
        return {"rows_served": self.rows_served}

    def set_state(self, state: dict) -> None:
        self.rows_served = int(state["rows_served"])


def expert_rows(corpus: DomainCorpus, domains: Sequence[str], split: str = "train") -> np.ndarray:
    """The rows of ``domains`` in ``split``, concatenated in the given domain order."""
    parts = [corpus.get(split, d) for d in domains]
    return np.concatenate(parts) if parts else np.zeros((0, corpus.row_len), np.int32)


def expert_streams(corpus: DomainCorpus, experts: Mapping[str, Sequence[str]], *,
                   batch_size: int, seed: int) -> dict[str, ExpertStream]:
    """One :class:`ExpertStream` per expert, over the training rows of its domains."""
    return {name: ExpertStream(expert_rows(corpus, domains), batch_size=batch_size, seed=seed,
                               name=name)
            for name, domains in experts.items()}
