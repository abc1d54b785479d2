"""From documents to packed token rows, and from rows to training and evaluation batches.

:func:`load_data` runs the whole preparation once, in memory:

1. load documents per domain from the configured source;
2. split every domain into training and validation *documents* (before tokenizing, so no text
   is in both splits, and the BPE tokenizer is trained on training text only);
3. tokenize, append EOS to each document and concatenate each split, spreading every domain
   evenly along the stream;
4. cut the stream into rows of ``seq_len + 1`` tokens (inputs ``row[:-1]``, targets
   ``row[1:]``), dropping the ragged tail.

:func:`train_iterator` then serves shuffled, sharded, endlessly repeating batches through grain,
with a checkpointable position; :func:`eval_batches` serves a fixed slice of validation rows.
"""

import dataclasses
import numbers
import os
import pathlib
import platform
import zlib

import grain
import numpy as np

from decjax.data import sources, synthetic
from decjax.data.config import DataSettings, validate_data_config
from decjax.data.tokenizers import Tokenizer, make_tokenizer

Documents = dict[str, list[str]]


@dataclasses.dataclass(frozen=True, eq=False)
class LMData:
    """Packed language-modelling data, ready to batch.

    Attributes:
        tokenizer: the tokenizer that produced the ids.
        domains: domain names; ``*_domain_ids`` index into this tuple.
        train: ``int32[N_train, seq_len + 1]`` training rows (read-only).
        val: ``int32[N_val, seq_len + 1]`` validation rows (read-only).
        train_domain_ids: ``int32[N_train]``: the domain of each row's first token (rows that
            straddle a document boundary may continue into another domain).
        val_domain_ids: ``int32[N_val]``, likewise.
        entropy_rate: best achievable loss per domain in nats per token (synthetic source only,
            else ``None``); see :mod:`decjax.data.synthetic` for the small excess to expect.
        description: one line saying where the data came from.
    """

    tokenizer: Tokenizer
    domains: tuple[str, ...]
    train: np.ndarray
    val: np.ndarray
    train_domain_ids: np.ndarray
    val_domain_ids: np.ndarray
    entropy_rate: dict[str, float] | None
    description: str

    def __post_init__(self):
        for name in ("train", "val"):
            rows, ids = getattr(self, name), getattr(self, f"{name}_domain_ids")
            if rows.ndim != 2 or rows.dtype != np.int32 or ids.shape != rows.shape[:1]:
                raise ValueError(f"LMData.{name} must be int32[N, seq_len + 1] with N domain ids")
            # Read-only: batches are copies, so nothing downstream can corrupt the dataset.
            rows.setflags(write=False)
            ids.setflags(write=False)
        if self.train.shape[1] != self.val.shape[1]:
            raise ValueError("LMData.train and LMData.val must have the same row length")

    @property
    def seq_len(self) -> int:
        """Model sequence length: row length minus the one-token shift."""
        return self.train.shape[1] - 1

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.tokenizer.vocab_size

    def summary(self) -> str:
        """A few human-readable lines: source, domains, tokens and rows."""
        row_len = self.train.shape[1]
        lines = [
            self.description,
            f"{len(self.domains)} domains: {', '.join(self.domains)}",
            f"{self.tokenizer.name} tokenizer, vocab {self.vocab_size}, seq_len {self.seq_len}: "
            f"train {len(self.train):,} rows ({len(self.train) * row_len:,} tokens), "
            f"val {len(self.val):,} rows ({len(self.val) * row_len:,} tokens)",
        ]
        if self.entropy_rate is not None:
            rates = ", ".join(f"{d} {h:.3f}" for d, h in self.entropy_rate.items())
            lines.append(f"entropy rate (nats/token): {rates}")
        return "\n".join(lines)


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/decjax`` (``~/.cache/decjax``): where trained BPE tokenizers go."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "decjax"


def split_documents(
    documents: Documents, *, val_fraction: float, seed: int
) -> tuple[Documents, Documents]:
    """Splits every domain into training and validation documents; no text is in both.

    A domain with ``n >= 2`` documents gives ``clip(round(val_fraction * n), 1, n - 1)``
    documents, chosen by a permutation seeded with ``seed`` and the domain name, to validation;
    both splits keep the original document order. A domain with a single document cannot be
    split by documents, so that document is cut at character ``round((1 - val_fraction) * len)``:
    the prefix trains, the suffix validates. (A one-character document only trains.) Note that
    the fraction counts documents, not bytes, so the token share of validation varies.

    Args:
        documents: ``{domain: [text, ...]}``.
        val_fraction: fraction of documents held out, in (0, 0.5].
        seed: split seed.

    Returns:
        ``(train, val)``, both ``{domain: [text, ...]}`` with the input's domain order; a domain
        missing from ``val`` had nothing to hold out.
    """
    train, val = {}, {}
    for domain, docs in documents.items():
        if len(docs) >= 2:
            num_val = min(max(round(val_fraction * len(docs)), 1), len(docs) - 1)
            rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
            is_val = np.zeros(len(docs), dtype=bool)
            is_val[rng.permutation(len(docs))[:num_val]] = True
            train[domain] = [doc for doc, v in zip(docs, is_val, strict=True) if not v]
            val[domain] = [doc for doc, v in zip(docs, is_val, strict=True) if v]
        elif docs and len(docs[0]) >= 2:
            cut = min(max(round((1 - val_fraction) * len(docs[0])), 1), len(docs[0]) - 1)
            train[domain], val[domain] = [docs[0][:cut]], [docs[0][cut:]]
        elif docs:
            train[domain] = list(docs)
    return train, val


def concatenate_split(
    token_docs: dict[str, list[np.ndarray]], domains: tuple[str, ...], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Joins tokenized documents (each followed by EOS) into one stream, domains interleaved.

    Documents are ordered by the position of their midpoint within their own domain's tokens
    (a fraction in [0, 1]), so every domain is spread evenly along the stream and any prefix of
    it, e.g. the first evaluation batches, sees all domains in proportion.

    Args:
        token_docs: ``{domain: [int32 ids, ...]}``.
        domains: domain order; the position in it is the domain id.
        eos_id: id appended after every document.

    Returns:
        ``(tokens int32[n], domain_ids int32[n])``.
    """
    pieces, keys, domain_of_doc = [], [], []
    for domain_id, domain in enumerate(domains):
        docs = token_docs.get(domain, [])
        if not docs:
            continue
        lengths = np.array([len(doc) + 1 for doc in docs], dtype=np.float64)
        keys.append((np.cumsum(lengths) - lengths / 2) / lengths.sum())
        domain_of_doc.extend([domain_id] * len(docs))
        pieces.extend(docs)
    if not pieces:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    keys = np.concatenate(keys)
    domain_of_doc = np.asarray(domain_of_doc, dtype=np.int32)
    order = np.lexsort((domain_of_doc, keys))  # By midpoint, ties by domain id.
    eos = np.array([eos_id], dtype=np.int32)
    tokens = np.concatenate([part for i in order for part in (pieces[i], eos)]).astype(np.int32)
    lengths = np.array([len(pieces[i]) + 1 for i in order])
    return tokens, np.repeat(domain_of_doc[order], lengths).astype(np.int32)


def pack_rows(
    tokens: np.ndarray, domain_ids: np.ndarray, row_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a token stream into ``int32[n, row_len]`` rows, dropping the ragged tail.

    Returns:
        ``(rows, row_domain_ids)``; a row's domain is that of its first token.
    """
    num_rows = len(tokens) // row_len
    rows = tokens[: num_rows * row_len].reshape(num_rows, row_len)
    return rows.astype(np.int32), domain_ids[: num_rows * row_len : row_len].astype(np.int32)


def _load_documents(settings: DataSettings) -> tuple[Documents, dict[str, float] | None, str]:
    """Documents per domain, entropy rates (synthetic only) and a source description."""
    if settings.source == "pystdlib":
        documents = sources.load_pystdlib(settings.domains, settings.max_bytes_per_domain)
        what = f"pystdlib (Python {platform.python_version()})"
        if settings.max_bytes_per_domain:
            what += f", max {settings.max_bytes_per_domain} bytes/domain"
        return documents, None, what
    if settings.source == "text_dir":
        skipped: dict[str, str] = {}
        documents = sources.load_text_dir(
            settings.path, settings.domains, settings.max_bytes_per_domain, skipped=skipped
        )
        what = f"text_dir {settings.path}"
        if settings.max_bytes_per_domain:
            what += f", max {settings.max_bytes_per_domain} bytes/domain"
        if skipped:  # recorded with the run (the start event's data summary)
            what += f", skipped {len(skipped)} files: {sources.describe_skipped(skipped, 20)}"
        return documents, None, what
    if settings.source == "synthetic":
        chains = synthetic.build_markov_sources(settings.synthetic_domains, settings.seed)
        documents = {
            name: chain.documents(
                settings.synthetic_docs_per_domain, settings.synthetic_doc_len, settings.seed
            )
            for name, chain in chains.items()
        }
        rates = {name: chain.entropy_rate for name, chain in chains.items()}
        what = (
            f"synthetic ({settings.synthetic_docs_per_domain} docs x "
            f"{settings.synthetic_doc_len} letters per domain)"
        )
        return documents, rates, what
    documents = sources.load_hf(
        settings.hf_name,
        config_name=settings.hf_config,
        split=settings.hf_split,
        text_field=settings.hf_text_field,
        max_documents=settings.max_documents,
    )
    what = f"hf {settings.hf_name}"
    if settings.hf_config:
        what += f"/{settings.hf_config}"
    return documents, None, f"{what} [{settings.hf_split}], max {settings.max_documents} docs"


def _tokens_per_split(
    split_docs: Documents, tokenizer: Tokenizer, domains: tuple[str, ...]
) -> dict[str, list[np.ndarray]]:
    return {d: tokenizer.encode_many(split_docs[d]) for d in domains if split_docs.get(d)}


def _check_enough(split: str, tokens: np.ndarray, seq_len: int, hint: str) -> None:
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"model.seq_len={seq_len} is larger than the data: the {split} split has only "
            f"{len(tokens)} tokens, and one row needs seq_len + 1 = {seq_len + 1}; {hint}"
        )


def _entropy_per_token(
    rates_per_letter: dict[str, float],
    train_docs: Documents,
    train_tokens: dict[str, list[np.ndarray]],
) -> dict[str, float]:
    """Converts nats/letter to nats/token with each domain's letters-per-token ratio.

    Tokenization is invertible, so a text's total entropy is the same counted in letters or in
    tokens; the ratio is exactly 1 for the byte tokenizer (one ASCII letter = one byte).
    """
    rates = {}
    for domain, rate in rates_per_letter.items():
        letters = sum(len(doc) for doc in train_docs.get(domain, []))
        tokens = sum(len(ids) for ids in train_tokens.get(domain, []))
        rates[domain] = rate * letters / tokens if tokens else rate
    return rates


def load_data(config, *, seq_len: int, cache_dir: str | os.PathLike | None = None) -> LMData:
    """Loads, splits, tokenizes and packs the data described by ``config``.

    Args:
        config: the ``data`` config section (see :func:`default_data_config`); any object with
            those attributes works, and missing ones take their defaults.
        seq_len: model sequence length (``model.seq_len``); rows hold ``seq_len + 1`` tokens.
        cache_dir: folder for trained BPE tokenizers; defaults to :func:`default_cache_dir`.

    Returns:
        The packed data.

    Raises:
        ValueError: an invalid field (named ``data.<field>``), or ``seq_len`` too large for one
            training or one validation row (named ``model.seq_len``).
        ImportError, RuntimeError: ``data.source='hf'`` without ``datasets`` or network.
    """
    settings = validate_data_config(config)
    if not _is_int(seq_len) or seq_len < 1:
        raise ValueError(f"model.seq_len={seq_len!r} must be a positive integer")
    seq_len = int(seq_len)
    documents, letter_rates, what = _load_documents(settings)
    domains = tuple(documents)
    train_docs, val_docs = split_documents(
        documents, val_fraction=settings.val_fraction, seed=settings.seed
    )
    tokenizer = make_tokenizer(
        settings.tokenizer,
        texts_for_training=[doc for docs in train_docs.values() for doc in docs],
        vocab_size=settings.bpe_vocab_size,
        cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
    )
    train_tokens = _tokens_per_split(train_docs, tokenizer, domains)
    train_stream, train_stream_ids = concatenate_split(train_tokens, domains, tokenizer.eos_id)
    val_stream, val_stream_ids = concatenate_split(
        _tokens_per_split(val_docs, tokenizer, domains), domains, tokenizer.eos_id
    )
    _check_enough("training", train_stream, seq_len, "use more data or a smaller model.seq_len")
    _check_enough(
        "validation", val_stream, seq_len, "raise data.val_fraction or lower model.seq_len"
    )
    train, train_domain_ids = pack_rows(train_stream, train_stream_ids, seq_len + 1)
    val, val_domain_ids = pack_rows(val_stream, val_stream_ids, seq_len + 1)
    entropy_rate = None
    if letter_rates is not None:
        entropy_rate = _entropy_per_token(letter_rates, train_docs, train_tokens)
    description = (
        f"{what}; {settings.tokenizer} tokenizer; split val_fraction={settings.val_fraction} "
        f"seed={settings.seed}"
    )
    return LMData(
        tokenizer=tokenizer,
        domains=domains,
        train=train,
        val=val,
        train_domain_ids=train_domain_ids,
        val_domain_ids=val_domain_ids,
        entropy_rate=entropy_rate,
        description=description,
    )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def _grain_seed(seed: int, shard_index: int) -> int:
    # grain reshuffles epoch e with seed + e, so seeds s and s + 1 would replay each other's
    # epochs one apart; hashing the seed first decorrelates neighbouring seeds. Every shard
    # also needs its own order: equal shards ``i::n`` shuffled alike move in lockstep, so at
    # each step all shards would read neighbouring rows of the same document.
    entropy = seed if shard_index == 0 else [seed, shard_index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


def train_iterator(
    data: LMData,
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    prefetch: int = 4,
) -> grain.DatasetIterator:
    """An endless iterator of shuffled training batches ``int32[batch_size, seq_len + 1]``.

    Shard ``i`` of ``n`` (one per data-parallel replica or data node) owns rows ``i, i + n, ...``,
    so shards are disjoint, cover all rows, and each only ever sees its own rows. Within a shard,
    rows are shuffled with ``seed`` (mixed with the shard index, so that shards do not move in
    lockstep), reshuffled every epoch, and batched across epoch boundaries;
    a batch larger than the shard repeats rows. Everything runs in this process (no worker
    processes; at most ``prefetch`` batches are read ahead by threads), so the order depends
    only on the arguments.

    ``get_state()`` / ``set_state()`` on the result save and restore the exact position.

    Args:
        data: packed data from :func:`load_data`.
        batch_size: rows per batch (per shard).
        seed: shuffle seed in ``[0, 2**32)``.
        shard_index: this shard, in ``[0, num_shards)``.
        num_shards: number of disjoint shards; at most the number of training rows.
        prefetch: batches read ahead in background threads; 0 reads on demand.

    Returns:
        A grain ``DatasetIterator``.

    Raises:
        ValueError: invalid sizes or shard indices, or a shard that would be empty.
    """
    batch_size = _check_positive("batch_size", batch_size)
    num_shards = _check_positive("num_shards", num_shards)
    if not _is_int(shard_index) or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index!r} must be in [0, num_shards={num_shards})")
    if num_shards > len(data.train):
        raise ValueError(
            f"num_shards={num_shards} exceeds the {len(data.train)} training rows, so some "
            "shards would be empty; use fewer shards, more data or a smaller model.seq_len"
        )
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    if not _is_int(prefetch) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r} must be a non-negative integer")
    dataset = (
        grain.MapDataset.source(data.train)[int(shard_index) :: num_shards]
        .shuffle(_grain_seed(int(seed), int(shard_index)))
        .repeat()
        .batch(batch_size, drop_remainder=True)
    )
    options = grain.ReadOptions(num_threads=min(int(prefetch), 2), prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def _eval_row_indices(num_rows: int, batch_size: int, num_batches: int) -> np.ndarray:
    batch_size = _check_positive("batch_size", batch_size)
    num_batches = _check_positive("num_batches", num_batches)
    return np.arange(num_batches * batch_size).reshape(num_batches, batch_size) % num_rows


def eval_batches(data: LMData, *, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """The first ``num_batches * batch_size`` validation rows as batches, always the same.

    Always returns exactly ``num_batches`` batches ``int32[batch_size, seq_len + 1]``: when the
    validation split has fewer rows, it is cycled from the start, so some rows count more than
    once. Rows are taken in order, so a smaller request is a prefix of a larger one, and the
    interleaved packing makes any prefix cover the domains in proportion.
    """
    indices = _eval_row_indices(len(data.val), batch_size, num_batches)
    return [data.val[batch] for batch in indices]


def eval_domain_ids(data: LMData, *, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """``int32[batch_size]`` domain ids matching :func:`eval_batches` row for row."""
    indices = _eval_row_indices(len(data.val), batch_size, num_batches)
    return [data.val_domain_ids[batch] for batch in indices]
