"""The ``data`` config section: defaults and up-front validation.

Every error names the offending field as ``data.<field>`` together with what is allowed, so a
bad command-line override fails before any file is read.
"""

import dataclasses
import numbers
import os
from collections.abc import Sequence

import ml_collections

from decjax.data import synthetic
from decjax.data.tokenizers import MIN_BPE_VOCAB_SIZE, TOKENIZER_NAMES

SOURCES = ("pystdlib", "text_dir", "synthetic", "hf")
# Mid-sized packages present in every CPython >= 3.11 (about 2.3 MB of source together).
DEFAULT_STDLIB_DOMAINS = (
    "asyncio",
    "email",
    "json",
    "concurrent",
    "importlib",
    "logging",
    "xml",
    "http",
    "urllib",
    "unittest",
)
MAX_SEED = 2**32  # grain's shuffle takes 32-bit seeds.


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for every ``data`` field.

    Fields:
        source: ``"pystdlib"`` | ``"text_dir"`` | ``"synthetic"`` | ``"hf"``.
        tokenizer: ``"byte"`` | ``"bpe"``.
        bpe_vocab_size: requested BPE vocabulary size (>= 259); only used by ``"bpe"``.
        path: folder for ``text_dir``.
        domains: domains to load for ``pystdlib`` and ``text_dir`` (empty = all); ignored by
            ``synthetic`` (see ``synthetic_domains``) and ``hf`` (one domain).
        max_bytes_per_domain: per-domain cap in bytes by whole documents (0 = no cap); applies to
            ``pystdlib`` and ``text_dir``.
        val_fraction: fraction of each domain's documents held out, in (0, 0.5].
        seed: seeds the train/validation split and the synthetic chains and documents.
        synthetic_domains: spec strings such as ``"markov2_v8"`` (empty = the default four).
        synthetic_doc_len: letters per synthetic document.
        synthetic_docs_per_domain: documents per synthetic domain.
        hf_name, hf_config, hf_split, hf_text_field: the Hugging Face dataset to load.
        max_documents: how many ``hf`` documents to keep.
    """
    return ml_collections.ConfigDict(
        dict(
            source="pystdlib",
            tokenizer="byte",
            bpe_vocab_size=1024,
            path="",
            domains=DEFAULT_STDLIB_DOMAINS,
            max_bytes_per_domain=0,
            val_fraction=0.05,
            seed=0,
            synthetic_domains=(),
            synthetic_doc_len=4096,
            synthetic_docs_per_domain=64,
            hf_name="",
            hf_config="",
            hf_split="train",
            hf_text_field="text",
            max_documents=10000,
        )
    )


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Validated, normalized ``data`` fields (see :func:`default_data_config`)."""

    source: str
    tokenizer: str
    bpe_vocab_size: int
    path: str
    domains: tuple[str, ...]
    max_bytes_per_domain: int
    val_fraction: float
    seed: int
    synthetic_domains: tuple[str, ...]
    synthetic_doc_len: int
    synthetic_docs_per_domain: int
    hf_name: str
    hf_config: str
    hf_split: str
    hf_text_field: str
    max_documents: int


def _choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"data.{name}={value!r} is unknown; allowed: {', '.join(allowed)}")
    return value


def _int(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    # bool is an int subclass, but `data.seed=True` is certainly a mistake.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"data.{name}={value!r} must be an integer")
    if value < minimum or (maximum is not None and value >= maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum})"
        raise ValueError(f"data.{name}={value!r} is out of range; allowed: {allowed}")
    return int(value)


def _str(name: str, value, *, required: bool = False, why: str = "") -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ValueError(f"data.{name}={value!r} must be a string")
    if required and not value.strip():
        raise ValueError(f"data.{name} must not be empty{why}")
    return value


def _names(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"data.{name}={value!r} must be a tuple of names, e.g. ('a', 'b')")
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"data.{name}={value!r} must hold non-empty strings only")
    if len(set(value)) != len(value):
        raise ValueError(f"data.{name}={value!r} has duplicates")
    return tuple(value)


def _fraction(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"data.{name}={value!r} must be a number")
    if not 0 < value <= 0.5:
        raise ValueError(f"data.{name}={value!r} is out of range; allowed: (0, 0.5]")
    return float(value)


def validate_data_config(config) -> DataSettings:
    """Checks every ``data`` field and returns them normalized.

    Args:
        config: an ``ml_collections.ConfigDict`` or any object with the fields of
            :func:`default_data_config` as attributes; missing fields take their defaults.

    Returns:
        The validated settings.

    Raises:
        ValueError: a field is invalid; the message names it as ``data.<field>``.
    """
    defaults = default_data_config()

    def get(name: str):
        return getattr(config, name, defaults[name])

    source = _choice("source", get("source"), SOURCES)
    synthetic_domains = _names("synthetic_domains", get("synthetic_domains"))
    for spec in synthetic_domains:
        synthetic.parse_spec(spec)  # Raises a ValueError naming data.synthetic_domains.
    return DataSettings(
        source=source,
        tokenizer=_choice("tokenizer", get("tokenizer"), TOKENIZER_NAMES),
        bpe_vocab_size=_int("bpe_vocab_size", get("bpe_vocab_size"), minimum=MIN_BPE_VOCAB_SIZE),
        path=_str(
            "path",
            get("path"),
            required=source == "text_dir",
            why=" when data.source='text_dir'; set it to a folder of text files",
        ),
        domains=_names("domains", get("domains")),
        max_bytes_per_domain=_int("max_bytes_per_domain", get("max_bytes_per_domain"), minimum=0),
        val_fraction=_fraction("val_fraction", get("val_fraction")),
        seed=_int("seed", get("seed"), minimum=0, maximum=MAX_SEED),
        synthetic_domains=synthetic_domains,
        synthetic_doc_len=_int("synthetic_doc_len", get("synthetic_doc_len"), minimum=1),
        synthetic_docs_per_domain=_int(
            "synthetic_docs_per_domain", get("synthetic_docs_per_domain"), minimum=1
        ),
        hf_name=_str(
            "hf_name",
            get("hf_name"),
            required=source == "hf",
            why=" when data.source='hf'; set it to a Hugging Face dataset name",
        ),
        hf_config=_str("hf_config", get("hf_config")),
        hf_split=_str("hf_split", get("hf_split"), required=True),
        hf_text_field=_str("hf_text_field", get("hf_text_field"), required=True),
        max_documents=_int("max_documents", get("max_documents"), minimum=1),
    )
