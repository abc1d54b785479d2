"""Tokenizers: a fixed byte tokenizer and a byte-level BPE trained on the training split.

Both share one small interface (:class:`Tokenizer`): ``name``, ``vocab_size``, ``pad_id``,
``eos_id``, ``encode``, ``encode_many`` and ``decode``. Ids ``0`` and ``1`` are always padding
and end-of-document, so the rest of decjax can rely on them without asking the tokenizer.
"""

import hashlib
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

PAD_ID = 0
EOS_ID = 1
TOKENIZER_NAMES = ("byte", "bpe")
# The byte-level alphabet (256 symbols) plus <pad> and <eos>; BPE needs room for merges above it.
MIN_BPE_VOCAB_SIZE = 259


class Tokenizer(Protocol):
    """What the data pipeline and the training loop need from a tokenizer."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> np.ndarray: ...

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``pad=0``, ``eos=1``, byte ``b`` -> ``b + 2``; 258 ids in all."""

    name = "byte"
    vocab_size = 258
    pad_id = PAD_ID
    eos_id = EOS_ID

    def encode(self, text: str) -> np.ndarray:
        """Returns ``int32[len(text.encode())]``; vectorized because it runs on whole corpora."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 2

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes each text separately."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Inverse of :meth:`encode`; skips pad/eos (and out-of-range ids), replaces bad UTF-8."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        byte_ids = ids[(ids >= 2) & (ids < self.vocab_size)] - 2
        return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=258)"


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``) with ``<pad>=0`` and ``<eos>=1``.

    Build one with :func:`load_or_train_bpe` (or :func:`make_tokenizer`), which trains on the
    training split only and caches the result as JSON.
    """

    name = "bpe"
    pad_id = PAD_ID
    eos_id = EOS_ID

    def __init__(self, hf_tokenizer, path: pathlib.Path | None = None):
        """Wraps a ``tokenizers.Tokenizer`` whose ids 0 and 1 are ``<pad>`` and ``<eos>``."""
        if (
            hf_tokenizer.token_to_id("<pad>") != PAD_ID
            or hf_tokenizer.token_to_id("<eos>") != EOS_ID
        ):
            raise ValueError("a BPE tokenizer must map <pad> to id 0 and <eos> to id 1")
        self._tokenizer = hf_tokenizer
        self.path = path

    @property
    def vocab_size(self) -> int:
        """Actual vocabulary size; below the requested one when the corpus ran out of merges."""
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text`` as ``int32[n]`` (no special tokens added)."""
        return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int32)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes many texts at once; the Rust backend parallelizes this."""
        encodings = self._tokenizer.encode_batch(list(texts))
        return [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Inverse of :meth:`encode`; skips pad/eos."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer JSON atomically, so concurrent processes never read half a file."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self._tokenizer.save(str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Loads a tokenizer written by :meth:`save`."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)), pathlib.Path(path))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"


def train_bpe(texts: Sequence[str], vocab_size: int) -> BPETokenizer:
    """Trains a byte-level BPE on ``texts``.

    Training is deterministic: the same texts and vocabulary size give the same merges in every
    process (checked across hash seeds), which the on-disk cache relies on.

    Args:
        texts: training documents.
        vocab_size: requested vocabulary size including the 256 byte symbols and 2 specials.

    Returns:
        The trained tokenizer (not yet saved).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(
            f"data.bpe_vocab_size={vocab_size} is too small; it must be >= {MIN_BPE_VOCAB_SIZE} "
            "(256 byte symbols + <pad> + <eos> + at least one merge)"
        )
    hf_tokenizer = HFTokenizer(models.BPE())
    # No prefix space: encode/decode must round-trip the text exactly.
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],  # Listed first, so they get ids 0 and 1.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # Every byte stays encodable.
        show_progress=False,
    )
    hf_tokenizer.train_from_iterator(list(texts), trainer)
    return BPETokenizer(hf_tokenizer)


def corpus_fingerprint(texts: Iterable[str]) -> str:
    """A short content hash of ``texts`` (order- and boundary-sensitive)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # Length prefix: ["ab"] != ["a", "b"].
        digest.update(data)
    return digest.hexdigest()[:16]


def bpe_cache_path(cache_dir: str | os.PathLike, vocab_size: int, fingerprint: str) -> pathlib.Path:
    """``<cache_dir>/tokenizer-bpe-<vocab>-<fingerprint>.json``."""
    return pathlib.Path(cache_dir) / f"tokenizer-bpe-{vocab_size}-{fingerprint}.json"


def load_or_train_bpe(
    texts: Sequence[str], *, vocab_size: int, cache_dir: str | os.PathLike
) -> BPETokenizer:
    """Loads the cached BPE for these texts and vocabulary size, training and caching it if absent.

    The cache key hashes the training texts themselves rather than a description of where they
    came from, so editing a ``text_dir`` corpus (or changing the split seed) never reuses a stale
    tokenizer, while re-running the same configuration always hits the cache.

    Args:
        texts: the training-split documents (never validation text).
        vocab_size: requested vocabulary size.
        cache_dir: folder for the JSON file; created if missing.

    Returns:
        The tokenizer; its ``path`` is the cache file.
    """
    path = bpe_cache_path(cache_dir, vocab_size, corpus_fingerprint(texts))
    if path.exists():
        return BPETokenizer.load(path)
    tokenizer = train_bpe(texts, vocab_size)
    tokenizer.save(path)
    tokenizer.path = path
    return tokenizer


def make_tokenizer(
    name: str,
    *,
    texts_for_training: Sequence[str] = (),
    vocab_size: int = 1024,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Builds the tokenizer called ``name`` (``data.tokenizer``).

    Args:
        name: ``"byte"`` or ``"bpe"``.
        texts_for_training: training-split documents; used by ``"bpe"`` only.
        vocab_size: requested BPE vocabulary size (``data.bpe_vocab_size``); ignored by ``"byte"``.
        cache_dir: where BPE tokenizers are cached; required by ``"bpe"``.

    Returns:
        The tokenizer.

    Raises:
        ValueError: unknown ``name``, or ``"bpe"`` without training texts or cache folder.
    """
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if not texts_for_training:
            raise ValueError("data.tokenizer='bpe' needs training texts to learn merges from")
        if cache_dir is None:
            raise ValueError("data.tokenizer='bpe' needs a cache_dir for the trained tokenizer")
        return load_or_train_bpe(texts_for_training, vocab_size=vocab_size, cache_dir=cache_dir)
    raise ValueError(f"data.tokenizer={name!r} is unknown; allowed: {', '.join(TOKENIZER_NAMES)}")
