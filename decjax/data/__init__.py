"""The data layer: sources, tokenizers, splitting, packing and batching (numpy + grain only).

Typical use::

    data = load_data(config.data, seq_len=config.model.seq_len, cache_dir=cache_dir)
    batches = train_iterator(data, batch_size=32, seed=0, shard_index=0, num_shards=1)
    tokens_BT1 = next(batches)  # int32[B, seq_len + 1]; inputs [:, :-1], targets [:, 1:]
"""

from decjax.data.config import (
    DEFAULT_STDLIB_DOMAINS,
    SOURCES,
    DataSettings,
    default_data_config,
    validate_data_config,
)
from decjax.data.pipeline import (
    LMData,
    concatenate_split,
    default_cache_dir,
    eval_batches,
    eval_domain_ids,
    load_data,
    pack_rows,
    split_documents,
    train_iterator,
)
from decjax.data.sources import (
    available_pystdlib_domains,
    cap_documents,
    load_hf,
    load_pystdlib,
    load_text_dir,
)
from decjax.data.synthetic import (
    DEFAULT_SYNTHETIC_DOMAINS,
    MarkovSource,
    build_markov_source,
    build_markov_sources,
    load_synthetic,
    markov_entropy_rate,
    stationary_distribution,
    synthetic_entropy_rates,
)
from decjax.data.tokenizers import (
    EOS_ID,
    PAD_ID,
    TOKENIZER_NAMES,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_or_train_bpe,
    make_tokenizer,
    train_bpe,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DEFAULT_STDLIB_DOMAINS",
    "DEFAULT_SYNTHETIC_DOMAINS",
    "DataSettings",
    "EOS_ID",
    "LMData",
    "MarkovSource",
    "PAD_ID",
    "SOURCES",
    "TOKENIZER_NAMES",
    "Tokenizer",
    "available_pystdlib_domains",
    "build_markov_source",
    "build_markov_sources",
    "cap_documents",
    "concatenate_split",
    "default_cache_dir",
    "default_data_config",
    "eval_batches",
    "eval_domain_ids",
    "load_data",
    "load_hf",
    "load_or_train_bpe",
    "load_pystdlib",
    "load_synthetic",
    "load_text_dir",
    "make_tokenizer",
    "markov_entropy_rate",
    "pack_rows",
    "split_documents",
    "stationary_distribution",
    "synthetic_entropy_rates",
    "train_bpe",
    "train_iterator",
    "validate_data_config",
]
