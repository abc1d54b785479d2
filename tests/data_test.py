"""Tests for decjax.data: tokenizers, sources, splitting, packing, batching and validation."""

import math
import re
import sys
import types

import numpy as np
import pytest

from decjax import data as D
from decjax.data import tokenizers as tokenizers_module

SMALL_SYNTHETIC = dict(
    source="synthetic",
    synthetic_domains=("markov1_v4", "iid_v8"),
    synthetic_doc_len=512,
    synthetic_docs_per_domain=12,
)


def make_config(**overrides):
    config = D.default_data_config()
    config.update(overrides)
    return config


def write_marked_corpus(root, domains=("alpha", "beta", "gamma"), docs_per_domain=10):
    """Each document repeats a unique marker, so split membership can be checked by content."""
    for domain in domains:
        (root / domain).mkdir(parents=True)
        for i in range(docs_per_domain):
            marker = f"<{domain}-{i:02d}>"
            (root / domain / f"doc{i:02d}.txt").write_text(f"{marker} " * 40 + "\n")
    return root


def unique_rows_data(num_rows=30, seq_len=7):
    """An LMData whose row ``i`` starts with ``i * (seq_len + 1)``, so rows are identifiable."""
    rows = np.arange(num_rows * (seq_len + 1), dtype=np.int32).reshape(num_rows, seq_len + 1)
    num_val = min(5, num_rows)
    return D.LMData(
        tokenizer=D.ByteTokenizer(),
        domains=("only",),
        train=rows,
        val=rows[:num_val].copy(),
        train_domain_ids=np.zeros(num_rows, np.int32),
        val_domain_ids=np.zeros(num_val, np.int32),
        entropy_rate=None,
        description="unique rows",
    )


def row_ids(batch, seq_len=7):
    return [int(first) // (seq_len + 1) for first in batch[:, 0]]


# Tokenizers.


def test_byte_tokenizer_round_trip():
    tok = D.ByteTokenizer()
    text = "héllo, wörld ✓ 🚀\n\tdef f(): return 0"
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (258, 0, 1)
    assert ids.min() >= 2 and ids.max() < 258
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.encode("A").tolist() == [ord("A") + 2]
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([[0, 1], ids, [1, 0, 0]])) == text  # Specials skipped.
    assert tok.decode([0xFF + 2]) == "\ufffd"  # Invalid UTF-8 is replaced, not raised.


def test_bpe_trains_is_cached_and_round_trips(tmp_path, monkeypatch):
    texts = D.load_pystdlib(("json",))["json"]
    tok = D.make_tokenizer("bpe", texts_for_training=texts, vocab_size=320, cache_dir=tmp_path)
    cached = list(tmp_path.glob("tokenizer-bpe-320-*.json"))
    assert [tok.path] == cached
    assert tok.vocab_size == 320 and (tok.pad_id, tok.eos_id) == (0, 1)
    sample = texts[0][:2000] + "\nnon-ASCII: ünïcødé ✓\n"
    ids = tok.encode(sample)
    assert ids.dtype == np.int32 and ids.max() < 320 and ids.min() >= 2
    assert len(ids) < len(sample.encode("utf-8"))  # Merges compress.
    assert tok.decode(ids) == sample
    assert [a.tolist() for a in tok.encode_many(texts[:3])] == [
        tok.encode(t).tolist() for t in texts[:3]
    ]

    # A second call must load the cache file, never retrain.
    def fail(*args, **kwargs):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(tokenizers_module, "train_bpe", fail)
    again = D.make_tokenizer("bpe", texts_for_training=texts, vocab_size=320, cache_dir=tmp_path)
    assert again.path == tok.path
    assert again.encode(sample).tolist() == ids.tolist()


def test_bpe_training_is_deterministic():
    texts = D.load_pystdlib(("json",))["json"]
    first = D.train_bpe(texts, 300)
    second = D.train_bpe(texts, 300)
    sample = "\n".join(texts)[:5000]
    assert first.encode(sample).tolist() == second.encode(sample).tolist()


def test_load_data_trains_bpe_on_the_training_split_only(tmp_path):
    config = make_config(**SMALL_SYNTHETIC, tokenizer="bpe", bpe_vocab_size=300)
    data = D.load_data(config, seq_len=32, cache_dir=tmp_path)
    documents = D.load_synthetic(("markov1_v4", "iid_v8"), doc_len=512, docs_per_domain=12)
    train_docs, _ = D.split_documents(documents, val_fraction=0.05, seed=0)
    fingerprint = tokenizers_module.corpus_fingerprint(sum(train_docs.values(), []))
    assert data.tokenizer.path == tmp_path / f"tokenizer-bpe-300-{fingerprint}.json"
    assert data.train.max() < data.vocab_size == 300
    # Entropy is converted to nats per BPE token: more than per letter, as tokens span letters.
    assert data.entropy_rate["iid_v8"] > math.log(8)


def test_make_tokenizer_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"data\.tokenizer='sentencepiece'.*byte, bpe"):
        D.make_tokenizer("sentencepiece", texts_for_training=["x"], vocab_size=300, cache_dir=".")
    with pytest.raises(ValueError, match=r"data\.bpe_vocab_size"):
        D.train_bpe(["some text"], 100)


# Sources.


def test_pystdlib_domains_are_discovered():
    available = D.available_pystdlib_domains()
    assert available == sorted(available)
    assert {"asyncio", "email", "json", "toplevel"} <= set(available)
    assert set(D.DEFAULT_STDLIB_DOMAINS) <= set(available)
    assert not {"test", "idlelib", "site-packages", "lib2to3", "__pycache__"} & set(available)

    docs = D.load_pystdlib(("json", "toplevel"))
    assert list(docs) == ["json", "toplevel"]
    assert any("JSONDecoder" in doc for doc in docs["json"])
    assert docs == D.load_pystdlib(("json", "toplevel"))  # Deterministic.
    assert all(isinstance(doc, str) and doc for doc in docs["toplevel"])


def test_pystdlib_cap_keeps_whole_files_in_order():
    full = D.load_pystdlib(("email",))["email"]
    cap = sum(len(doc.encode()) for doc in full[:3]) + 1
    capped = D.load_pystdlib(("email",), max_bytes_per_domain=cap)["email"]
    assert capped == full[:3]
    assert D.load_pystdlib(("email",), max_bytes_per_domain=1)["email"] == full[:1]


def test_pystdlib_unknown_domain_lists_available_ones():
    with pytest.raises(ValueError, match=r"data\.domains.*nonexistent_pkg.*available:.*asyncio"):
        D.load_pystdlib(("json", "nonexistent_pkg"))


def test_text_dir_domains_from_sub_folders(tmp_path):
    (tmp_path / "poems").mkdir()
    (tmp_path / "poems" / "a.txt").write_text("roses are red")
    (tmp_path / "poems" / "nested").mkdir()
    (tmp_path / "poems" / "nested" / "b.md").write_text("violets are blue")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "main.py").write_text("print('hi')")
    (tmp_path / "code" / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "notes.txt").write_text("top-level note")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("skip me")

    docs = D.load_text_dir(tmp_path)
    assert docs == {
        "default": ["top-level note"],
        "code": ["print('hi')"],
        "poems": ["roses are red", "violets are blue"],
    }
    assert D.load_text_dir(tmp_path, domains=("poems",)) == {"poems": docs["poems"]}
    with pytest.raises(ValueError, match=r"data\.domains.*prose"):
        D.load_text_dir(tmp_path, domains=("prose",))


def test_text_dir_names_and_records_every_skipped_file(tmp_path, caplog):
    (tmp_path / "prose").mkdir()
    (tmp_path / "prose" / "a.txt").write_text("a long enough sentence of plain text. " * 20)
    (tmp_path / "prose" / "b.txt").write_text("another document, also plain text. " * 20)
    (tmp_path / "prose" / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "prose" / "empty.txt").write_text("")
    (tmp_path / "prose" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    skipped = {}
    with caplog.at_level("WARNING"):
        docs = D.load_text_dir(tmp_path, skipped=skipped)
    assert len(docs["prose"]) == 2
    assert skipped == {"prose/blob.bin": "binary (NUL bytes)", "prose/empty.txt": "empty",
                       "prose/latin1.txt": "not UTF-8 (byte 3)"}
    assert "skipped 3 of 5 files: prose/blob.bin (binary (NUL bytes))" in caplog.text
    data = D.load_data(make_config(source="text_dir", path=str(tmp_path), domains=(),
                                   val_fraction=0.5),
                       seq_len=8, cache_dir=tmp_path)
    assert "skipped 3 files: prose/blob.bin (binary (NUL bytes)), prose/empty.txt (empty)" in (
        data.summary())


def test_text_dir_errors_name_the_path_field(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path=.*not an existing folder"):
        D.load_text_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data\.path=.*no UTF-8 text"):
        D.load_text_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"data\.path"):
        D.load_data(make_config(source="text_dir", path=""), seq_len=8, cache_dir=tmp_path)


def test_hf_without_datasets_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # Makes `import datasets` fail.
    config = make_config(source="hf", hf_name="wikitext", hf_config="wikitext-2-raw-v1")
    with pytest.raises(ImportError, match=re.escape("pip install decjax[hf]")):
        D.load_data(config, seq_len=8, cache_dir=tmp_path)


def test_hf_download_failure_suggests_offline_sources(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(RuntimeError, match=r"could not be downloaded.*pystdlib.*text_dir"):
        D.load_hf("wikitext", split="train")


# Synthetic Markov chains.


def test_entropy_rate_of_iid_is_log_v():
    for v in (2, 8, 32):
        assert D.markov_entropy_rate(np.full((1, v), 1.0 / v)) == pytest.approx(math.log(v))
        assert D.build_markov_source(f"iid_v{v}", seed=3).entropy_rate == pytest.approx(math.log(v))


def test_entropy_rate_of_two_state_chain_by_hand():
    p, q = 0.1, 0.3  # P(0 -> 1) and P(1 -> 0).
    transitions = np.array([[1 - p, p], [q, 1 - q]])
    h = lambda x: -x * math.log(x) - (1 - x) * math.log(1 - x)
    pi0, pi1 = q / (p + q), p / (p + q)
    assert D.stationary_distribution(transitions) == pytest.approx([pi0, pi1])
    assert D.markov_entropy_rate(transitions) == pytest.approx(pi0 * h(p) + pi1 * h(q))
    # Deterministic alternation: periodic, entropy zero, stationary still (1/2, 1/2).
    flip = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert D.stationary_distribution(flip) == pytest.approx([0.5, 0.5])
    assert D.markov_entropy_rate(flip) == pytest.approx(0.0)


@pytest.mark.parametrize("spec", ["markov2_v8", "markov1_v16_a0.2", "markov3_v4"])
def test_true_model_cross_entropy_matches_entropy_rate(spec):
    source = D.build_markov_source(spec, seed=0)
    docs = source.documents(num_docs=8, doc_len=4096, seed=1)
    assert all(len(doc) == 4096 for doc in docs)
    cross_entropy = np.mean([source.cross_entropy(doc) for doc in docs])
    assert 0 < source.entropy_rate < math.log(source.vocab)
    assert cross_entropy == pytest.approx(source.entropy_rate, abs=0.03)


def test_synthetic_documents_are_seeded():
    a = D.load_synthetic(("markov1_v4",), doc_len=64, docs_per_domain=3, seed=0)
    b = D.load_synthetic(("markov1_v4",), doc_len=64, docs_per_domain=3, seed=0)
    c = D.load_synthetic(("markov1_v4",), doc_len=64, docs_per_domain=3, seed=1)
    assert a == b and a != c
    assert set("".join(a["markov1_v4"])) <= set("abcd")
    assert list(D.load_synthetic(doc_len=8, docs_per_domain=1)) == list(D.DEFAULT_SYNTHETIC_DOMAINS)


def test_synthetic_load_data_reports_entropy_per_token(tmp_path):
    data = D.load_data(make_config(**SMALL_SYNTHETIC), seq_len=32, cache_dir=tmp_path)
    expected = D.synthetic_entropy_rates(("markov1_v4", "iid_v8"), seed=0)
    assert data.domains == ("markov1_v4", "iid_v8")
    assert data.entropy_rate == pytest.approx(expected)  # Byte tokenizer: letter = token.
    assert data.entropy_rate["iid_v8"] == pytest.approx(math.log(8))
    assert "entropy rate" in data.summary()


# Splitting and packing.


def test_split_documents_never_shares_documents():
    docs = {"many": [f"doc {i}" for i in range(40)], "two": ["x" * 10, "y" * 10]}
    train, val = D.split_documents(docs, val_fraction=0.1, seed=0)
    assert len(val["many"]) == 4 and len(val["two"]) == 1
    for domain in docs:
        assert not set(train[domain]) & set(val[domain])
        assert sorted(train[domain] + val[domain]) == sorted(docs[domain])
    assert D.split_documents(docs, val_fraction=0.1, seed=0) == (train, val)
    assert D.split_documents(docs, val_fraction=0.1, seed=1)[1]["many"] != val["many"]


def test_single_document_domain_is_split_by_characters():
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    train, val = D.split_documents({"solo": [text]}, val_fraction=0.2, seed=0)
    assert train["solo"] == [text[:80]] and val["solo"] == [text[80:]]


def test_train_and_val_share_no_document_content(tmp_path):
    corpus = write_marked_corpus(tmp_path / "corpus")
    config = make_config(source="text_dir", path=str(corpus), domains=(), val_fraction=0.2)
    data = D.load_data(config, seq_len=64, cache_dir=tmp_path)
    markers = lambda rows: set(re.findall(r"<\w+-\d\d>", data.tokenizer.decode(rows)))
    train_markers, val_markers = markers(data.train), markers(data.val)
    assert train_markers and val_markers
    assert not train_markers & val_markers
    assert len(train_markers | val_markers) >= 28  # Only ragged tails are dropped.
    assert {m.split("-")[0] for m in val_markers} == {"<alpha", "<beta", "<gamma"}


def test_pack_rows_shapes_and_one_token_shift():
    tokens = np.arange(100, dtype=np.int32)
    domain_ids = (np.arange(100) // 50).astype(np.int32)
    rows, row_domains = D.pack_rows(tokens, domain_ids, row_len=9)
    assert rows.shape == (11, 9) and rows.dtype == np.int32  # 100 // 9 rows; tail dropped.
    inputs, targets = rows[:, :-1], rows[:, 1:]
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(rows.ravel(), tokens[:99])
    assert row_domains.tolist() == [0] * 6 + [1] * 5  # Domain of each row's first token.


def test_load_data_packs_documents_with_eos(tmp_path):
    data = D.load_data(make_config(**SMALL_SYNTHETIC), seq_len=31, cache_dir=tmp_path)
    assert data.seq_len == 31
    assert data.train.shape[1] == data.val.shape[1] == 32
    assert data.train.dtype == data.val.dtype == np.int32
    assert data.train_domain_ids.shape == (len(data.train),)
    assert data.val_domain_ids.shape == (len(data.val),)
    assert set(np.unique(data.train_domain_ids)) == {0, 1}
    # 22 training documents of 512 letters, each followed by one EOS, minus the ragged tail.
    num_train_tokens = 2 * 11 * 513
    assert len(data.train) == num_train_tokens // 32
    assert (data.train == data.tokenizer.eos_id).sum() == pytest.approx(22, abs=1)
    assert not data.train.flags.writeable  # Frozen data.


def test_default_config_loads_default_stdlib_domains(tmp_path):
    data = D.load_data(D.default_data_config(), seq_len=128, cache_dir=tmp_path)
    assert data.domains == D.DEFAULT_STDLIB_DOMAINS
    assert len(data.train) > 10 * len(data.val) > 0
    assert "asyncio" in data.summary()


def test_seq_len_too_large_names_the_field(tmp_path):
    config = make_config(**SMALL_SYNTHETIC)
    with pytest.raises(ValueError, match=r"model\.seq_len=100000 is larger than the data"):
        D.load_data(config, seq_len=100_000, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"model\.seq_len=.*validation split"):
        D.load_data(config, seq_len=2000, cache_dir=tmp_path)


# Batching.


def test_shuffling_is_deterministic_and_seed_dependent():
    data = unique_rows_data()
    take = lambda it, n: [row_ids(next(it)) for _ in range(n)]
    first = take(D.train_iterator(data, batch_size=4, seed=7), 5)
    assert first == take(D.train_iterator(data, batch_size=4, seed=7, prefetch=0), 5)
    assert first != take(D.train_iterator(data, batch_size=4, seed=8), 5)
    assert sum(first, []) != list(range(20))  # Actually shuffled.


def test_batches_cover_each_epoch_exactly_once():
    data = unique_rows_data(num_rows=30)
    it = D.train_iterator(data, batch_size=5, seed=0)
    epochs = [sum((row_ids(next(it)) for _ in range(6)), []) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(30))
    assert epochs[0] != epochs[1]  # Reshuffled every epoch.
    batch = D.train_iterator(data, batch_size=5, seed=0).__next__()
    assert batch.shape == (5, 8) and batch.dtype == np.int32


def test_shards_are_disjoint_and_cover_all_rows():
    data = unique_rows_data(num_rows=31)
    seen = []
    for shard in range(3):
        it = D.train_iterator(data, batch_size=1, seed=0, shard_index=shard, num_shards=3)
        shard_rows = len(range(shard, 31, 3))
        seen.append({row_ids(next(it))[0] for _ in range(3 * shard_rows)})  # Three epochs.
        assert len(seen[-1]) == shard_rows
        assert all(i % 3 == shard for i in seen[-1])
    assert set.union(*seen) == set(range(31))
    assert sum(len(s) for s in seen) == 31


def test_shards_do_not_read_in_lockstep():
    """Equal shards shuffled alike would give every replica neighbouring rows at each step."""
    data = unique_rows_data(num_rows=400)
    firsts = [row_ids(next(D.train_iterator(data, batch_size=1, seed=0, shard_index=shard,
                                            num_shards=4)))[0] // 4 for shard in range(4)]
    assert len(set(firsts)) > 1, firsts


def test_invalid_shards_are_rejected():
    data = unique_rows_data(num_rows=4)
    with pytest.raises(ValueError, match="shard_index"):
        D.train_iterator(data, batch_size=1, seed=0, shard_index=2, num_shards=2)
    with pytest.raises(ValueError, match="shard_index"):
        D.train_iterator(data, batch_size=1, seed=0, shard_index=-1, num_shards=2)
    with pytest.raises(ValueError, match="empty"):
        D.train_iterator(data, batch_size=1, seed=0, shard_index=0, num_shards=5)
    with pytest.raises(ValueError, match="batch_size"):
        D.train_iterator(data, batch_size=0, seed=0)


def test_iterator_state_resumes_exactly():
    data = unique_rows_data(num_rows=30)
    it = D.train_iterator(data, batch_size=4, seed=3)
    for _ in range(9):  # Crosses an epoch boundary.
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(12)]

    it.set_state(state)
    np.testing.assert_array_equal(np.stack([next(it) for _ in range(12)]), np.stack(expected))
    fresh = D.train_iterator(data, batch_size=4, seed=3)
    fresh.set_state(state)
    np.testing.assert_array_equal(np.stack([next(fresh) for _ in range(12)]), np.stack(expected))


def test_eval_batches_are_deterministic_and_cycle():
    data = unique_rows_data()  # 5 validation rows.
    batches = D.eval_batches(data, batch_size=2, num_batches=4)
    assert len(batches) == 4 and all(b.shape == (2, 8) and b.dtype == np.int32 for b in batches)
    assert [row_ids(b) for b in batches] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    assert all(
        (a == b).all()
        for a, b in zip(batches, D.eval_batches(data, batch_size=2, num_batches=4), strict=True)
    )
    ids = D.eval_domain_ids(data, batch_size=2, num_batches=4)
    assert [i.shape for i in ids] == [(2,)] * 4


# Config validation.


@pytest.mark.parametrize(
    "field, value",
    [
        ("source", "wikipedia"),
        ("tokenizer", "sentencepiece"),
        ("bpe_vocab_size", 100),
        ("bpe_vocab_size", 0),
        ("path", 3),
        ("domains", "json"),
        ("domains", ("json", "json")),
        ("max_bytes_per_domain", -1),
        ("val_fraction", 0.0),
        ("val_fraction", 0.6),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", 1.5),
        ("synthetic_domains", ("markov1",)),
        ("synthetic_domains", ("markov9_v8",)),
        ("synthetic_domains", ("iid_v99",)),
        ("synthetic_doc_len", 0),
        ("synthetic_docs_per_domain", -3),
        ("hf_config", None),
        ("hf_split", ""),
        ("hf_text_field", ""),
        ("max_documents", 0),
    ],
)
def test_every_config_error_names_its_field(field, value, tmp_path):
    config = types.SimpleNamespace(**D.default_data_config().to_dict())
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"data\.{field}\b"):
        D.validate_data_config(config)
    with pytest.raises(ValueError, match=rf"data\.{field}\b"):
        D.load_data(config, seq_len=8, cache_dir=tmp_path)


def test_required_fields_depend_on_the_source():
    with pytest.raises(ValueError, match=r"data\.hf_name"):
        D.validate_data_config(make_config(source="hf"))
    with pytest.raises(ValueError, match=r"data\.path"):
        D.validate_data_config(make_config(source="text_dir"))
    settings = D.validate_data_config(types.SimpleNamespace(source="synthetic"))
    assert settings.tokenizer == "byte"  # Missing fields take their defaults.


def test_invalid_seq_len_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"model\.seq_len"):
        D.load_data(make_config(**SMALL_SYNTHETIC), seq_len=0, cache_dir=tmp_path)
