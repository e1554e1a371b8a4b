"""Data pipeline: sources, token cache, split, packing, resumable iterator, prefetch."""

import gc
import json
import os
import threading

import numpy as np
import pytest

from vishwam import data
from vishwam.data import DataIterator, PackedRows, TableFiles, TextFiles, Texts


class ByteTokenizer:
    """Byte-level stand-in with the `VishwamAITokenizer` protocol; counts its calls."""

    pad_id, bos_id, eos_id, vocab_size = 0, 2, 3, 260

    def __init__(self, fingerprint="bytes-v1", shift=4):
        self.fingerprint = fingerprint
        self.shift = shift
        self.calls = 0

    def batch_encode(self, texts, add_bos=False, add_eos=False):
        self.calls += 1
        return [([self.bos_id] if add_bos else []) + [b + self.shift for b in t.encode()]
                + ([self.eos_id] if add_eos else []) for t in texts]


def random_docs(rng, n, max_len=90):
    alphabet = list("abcdefgh ,.\n\"'") + ["é", "ß", "→"]
    return ["".join(rng.choice(alphabet, size=int(rng.integers(1, max_len)))) for _ in range(n)]


def stream_of(tok, docs):
    return [t for ids in tok.batch_encode(docs) for t in ids + [tok.eos_id]]


def pack_reference(doc_tokens, seq_len, pad_id):
    """The obvious loop: fill rows of seq_len + 1 from documents, one token at a time."""
    width = seq_len + 1
    rows, row = [], []
    for doc in doc_tokens:
        piece = None
        for t in doc:
            if len(row) == width:
                rows.append(row)
                row, piece = [], None
            if piece is None:
                piece = (max((s for _, s, _ in row), default=0) + 1, 0)
            row.append((t, piece[0], piece[1]))
            piece = (piece[0], piece[1] + 1)
        # a new document always starts a new piece
    if row:
        rows.append(row + [(pad_id, 0, 0)] * (width - len(row)))
    return np.array(rows, dtype=np.int64)  # (rows, width, [token, segment, position])


def check_rows_against_reference(batch, ref_rows, seq_len):
    toks, segs, pos = ref_rows[..., 0], ref_rows[..., 1], ref_rows[..., 2]
    np.testing.assert_array_equal(batch["tokens"], toks[:, :-1])
    np.testing.assert_array_equal(batch["targets"], toks[:, 1:])
    np.testing.assert_array_equal(batch["segment_ids"], segs[:, :-1])
    np.testing.assert_array_equal(batch["positions"], pos[:, :-1])
    mask = (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] > 0)
    np.testing.assert_array_equal(batch["loss_mask"], mask.astype(np.float32))
    for name, dtype in (("tokens", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                        ("positions", np.int32), ("loss_mask", np.float32)):
        assert batch[name].dtype == dtype and batch[name].shape == (len(ref_rows), seq_len)


@pytest.fixture(scope="module")
def rng_docs():
    return random_docs(np.random.default_rng(0), 60)


@pytest.fixture(scope="module")
def corpus(rng_docs):
    return data.tokenize_source(Texts(rng_docs), ByteTokenizer())


# -------------------------------------------------------------------- default corpus


def test_default_corpus_is_deterministic_english_text():
    from pydoc_data.topics import topics

    docs = data.default_corpus()
    assert docs == data.default_corpus()
    assert docs == [topics[k] for k in sorted(topics) if topics[k].strip()]
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert all(isinstance(d, str) and d for d in docs)
    assert data.as_source(None).read().documents == docs


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("seq_len", [7, 32])
def test_packing_matches_reference_and_keeps_every_token(corpus, rng_docs, seq_len):
    tok = ByteTokenizer()
    doc_tokens = [ids + [tok.eos_id] for ids in tok.batch_encode(rng_docs)]
    rows = PackedRows(corpus, seq_len=seq_len)
    batch = rows.batch(np.arange(rows.num_rows))
    ref = pack_reference(doc_tokens, seq_len, tok.pad_id)
    assert rows.num_rows == len(ref)
    check_rows_against_reference(batch, ref, seq_len)
    # Count in == count out, order kept: non-padding tokens of the rows, in row order,
    # are exactly the documents' tokens with EOS after each.
    full = np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1)
    full_segments = np.concatenate([batch["segment_ids"], ref[:, -1:, 1]], axis=1)
    np.testing.assert_array_equal(full[full_segments > 0], stream_of(tok, rng_docs))


def test_segments_restart_at_document_boundaries_and_mask_cross_targets(corpus):
    tok = ByteTokenizer()
    rows = PackedRows(corpus, seq_len=32)
    b = rows.batch(np.arange(rows.num_rows))
    is_eos = b["tokens"] == tok.eos_id
    real = b["segment_ids"] > 0
    # After an EOS, the next token opens a new segment at position 0 ...
    nxt_seg, nxt_pos = b["segment_ids"][:, 1:], b["positions"][:, 1:]
    after_eos = is_eos[:, :-1] & real[:, 1:]
    assert after_eos.sum() > 10
    np.testing.assert_array_equal(nxt_seg[after_eos], b["segment_ids"][:, :-1][after_eos] + 1)
    assert (nxt_pos[after_eos] == 0).all()
    # ... and an EOS never predicts what follows it (next document or padding),
    # while every document's last token does predict its EOS.
    assert (b["loss_mask"][is_eos] == 0).all()
    assert (b["loss_mask"][b["targets"] == tok.eos_id] == 1).all()
    # Inside a piece positions count up by one and every target is trained.
    same = (nxt_seg == b["segment_ids"][:, :-1]) & real[:, 1:]
    np.testing.assert_array_equal(nxt_pos[same], b["positions"][:, :-1][same] + 1)
    assert (b["loss_mask"][:, :-1][same] == 1).all()
    # Each row starts a fresh piece: a document continued from the previous row restarts at 0.
    assert (b["segment_ids"][:, 0] == 1).all() and (b["positions"][:, 0] == 0).all()


def test_long_document_continues_in_next_rows():
    tok = ByteTokenizer()
    docs = ["x" * 25, "ab", "y" * 3]
    corpus = data.tokenize_source(Texts(docs), tok)
    rows = PackedRows(corpus, seq_len=9)  # rows of 10 tokens; 26 + 3 + 4 = 33 -> 4 rows
    b = rows.batch(np.arange(4))
    assert rows.num_rows == 4
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * 9)
    np.testing.assert_array_equal(b["positions"][1], np.arange(9))  # continuation restarts at 0
    np.testing.assert_array_equal(b["segment_ids"][2], [1] * 6 + [2] * 3)  # 5 x's + EOS, "ab" + EOS
    assert b["tokens"][2, 5] == tok.eos_id and b["loss_mask"][2, 5] == 0 and b["loss_mask"][2, 4] == 1
    assert b["targets"][2, 8] == ord("y") + 4 and b["loss_mask"][2, 8] == 0  # next document
    np.testing.assert_array_equal(b["segment_ids"][3], [1, 1, 1, 0, 0, 0, 0, 0, 0])  # y y EOS pad...
    np.testing.assert_array_equal(b["loss_mask"][3], [1, 1, 0, 0, 0, 0, 0, 0, 0])
    dropped = PackedRows(corpus, seq_len=9, drop_remainder=True)
    assert dropped.num_rows == 3 and dropped.num_tokens == 33


# ----------------------------------------------------------------------------- split


def test_split_is_stable_under_adding_documents_and_hits_the_fraction():
    tok = ByteTokenizer()
    docs = [f"document number {i}" for i in range(2000)]
    more = docs[:1000] + [f"new document {i}" for i in range(500)] + docs[1000:]
    c1 = data.tokenize_source(Texts(docs), tok)
    c2 = data.tokenize_source(Texts(more), tok)
    _, val1 = data.split_documents(c1.doc_hashes, 0.1)
    train2, val2 = data.split_documents(c2.doc_hashes, 0.1)
    val_texts1 = {docs[i] for i in val1}
    val_texts2 = {more[i] for i in val2}
    train_texts2 = {more[i] for i in train2}
    assert val_texts1 <= val_texts2 and not (val_texts1 & train_texts2)
    assert 150 < len(val1) < 250
    np.testing.assert_array_equal(val1, data.split_documents(c1.doc_hashes, 0.1)[1])
    # A tiny corpus still gets one validation document; all-validation is an error.
    assert len(data.split_documents(c1.doc_hashes[:3], 1e-9)[1]) == 1
    with pytest.raises(ValueError, match="val_fraction must be in"):
        data.split_documents(c1.doc_hashes, 1.0)
    with pytest.raises(ValueError, match="no training documents"):
        data.split_documents(np.array([2**63], np.uint64), 0.9)  # hash reads as 0.5 < 0.9


# -------------------------------------------------------------------------- iterator


def rows_as_tuples(batch):
    return [tuple(r) for r in np.concatenate([batch["tokens"], batch["targets"][:, -1:]], 1)]


def test_restore_reproduces_following_batches(corpus):
    rows = PackedRows(corpus, seq_len=16)
    rng = np.random.default_rng(1)
    for prefetch in (0, 3):
        with DataIterator(rows, batch_size=6, seed=5, process_index=0, process_count=1,
                          prefetch=prefetch) as it:
            stop = int(rng.integers(1, 3 * rows.num_rows // 6))  # somewhere in the first 3 epochs
            for _ in range(stop):
                next(it)
            saved = json.loads(json.dumps(it.state()))
            expected = [next(it) for _ in range(rows.num_rows // 6 + 2)]  # crosses an epoch
        with DataIterator(rows, batch_size=6, seed=5, process_index=0, process_count=1,
                          prefetch=prefetch) as fresh:
            next(fresh)
            fresh.restore(saved)
            got = [next(fresh) for _ in expected]
        for a, b in zip(expected, got):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    with DataIterator(rows, batch_size=6, seed=6, process_index=0, process_count=1) as other:
        with pytest.raises(ValueError, match="seed"):
            other.restore(saved)


def test_prefetch_yields_the_same_batches_as_synchronous(corpus):
    rows = PackedRows(corpus, seq_len=16)
    with DataIterator(rows, batch_size=4, process_index=0, process_count=1, prefetch=0) as a, \
            DataIterator(rows, batch_size=4, process_index=0, process_count=1, prefetch=2) as b:
        for _ in range(rows.num_rows // 4 + 3):
            x, y = next(a), next(b)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])


def test_epochs_reshuffle_the_same_rows(corpus):
    rows = PackedRows(corpus, seq_len=16)
    n = rows.num_rows
    everything = rows_as_tuples(rows.batch(np.arange(n)))
    with DataIterator(rows, batch_size=5, seed=3, process_index=0, process_count=1) as it:
        seen = [r for _ in range(-(-2 * n // 5)) for r in rows_as_tuples(next(it))]
    first, second = seen[:n], seen[n:2 * n]
    assert sorted(first) == sorted(everything) == sorted(second)
    assert first != second and first != everything
    with DataIterator(rows, batch_size=5, seed=4, process_index=0, process_count=1) as other:
        assert rows_as_tuples(next(other)) != seen[:5]


def test_processes_share_each_global_batch(corpus):
    rows = PackedRows(corpus, seq_len=16)
    single = DataIterator(rows, batch_size=6, seed=2, process_index=0, process_count=1, prefetch=0)
    shards = [DataIterator(rows, batch_size=6, seed=2, process_index=p, process_count=3, prefetch=0)
              for p in range(3)]
    for _ in range(4):
        whole = next(single)
        parts = [next(s) for s in shards]
        assert parts[0]["tokens"].shape == (2, 16)
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    # A state saved by one process restores on another process count.
    shards[1].restore(single.state())
    np.testing.assert_array_equal(next(shards[1])["tokens"], next(single)["tokens"][2:4])
    with pytest.raises(ValueError, match="divisible by process_count=4"):
        DataIterator(rows, batch_size=6, process_index=0, process_count=4)


def test_validation_iterator_is_one_padded_ordered_pass(corpus):
    rows = PackedRows(corpus, seq_len=16)
    n = rows.num_rows
    val = DataIterator(rows, batch_size=4, shuffle=False, repeat=False, process_index=0, process_count=1)
    batches = list(val)
    assert len(batches) == len(val) == -(-n // 4)
    stacked = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    reference = rows.batch(np.arange(n))
    for k in reference:
        np.testing.assert_array_equal(stacked[k][:n], reference[k])
    assert (stacked["loss_mask"][n:] == 0).all() and (stacked["segment_ids"][n:] == 0).all()
    with pytest.raises(StopIteration):
        next(val)
    val.reset()
    np.testing.assert_array_equal(next(val)["tokens"], batches[0]["tokens"])
    val.close()


class FailingRows(PackedRows):
    def batch(self, rows):
        if self.calls == 3:
            raise OSError("disk went away")
        self.calls += 1
        return super().batch(rows)


def prefetch_threads(exclude=()):
    return [t for t in threading.enumerate() if t.name == "vishwam-data-prefetch" and t not in exclude]


def test_prefetch_thread_reraises_source_errors_and_shuts_down(corpus):
    rows = FailingRows(corpus, seq_len=16)
    rows.calls = 0
    earlier = prefetch_threads()
    it = DataIterator(rows, batch_size=2, process_index=0, process_count=1, prefetch=2)
    for _ in range(3):
        next(it)
    with pytest.raises(OSError, match="disk went away") as info:
        next(it)
    assert any("prefetch thread" in note for note in info.value.__notes__)
    assert it.position == 3
    rows.calls = -100  # the failure was transient: the next call resumes at batch 3
    next(it)
    assert it.position == 4
    (thread,) = prefetch_threads(earlier)
    it.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(it)
    # An iterator dropped without close() stops its thread when collected.
    dropped = DataIterator(PackedRows(corpus, seq_len=16), batch_size=2, prefetch=2)
    assert dropped.process_count == 1  # defaults come from jax
    next(dropped)
    (thread,) = prefetch_threads(earlier)
    del dropped
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


# ------------------------------------------------------------------------ file sources


DOCS = ['plain words', 'a "quoted", comma\nsecond line', "unicode: é → ß", "   spaces\tand tab  "]


def test_text_files_and_duckdb_tables_give_identical_tokens(tmp_path):
    import duckdb

    tok = ByteTokenizer()
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc_{i:02d}.txt").write_text(doc, encoding="utf-8")
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, doc in enumerate(DOCS):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    with duckdb.connect() as con:
        con.execute("CREATE TABLE t (id INTEGER, text VARCHAR)")
        con.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(DOCS)))
        con.execute(f"COPY t TO '{tmp_path / 'docs.parquet'}' (FORMAT parquet)")
        con.execute(f"COPY t TO '{tmp_path / 'docs.csv'}' (FORMAT csv, HEADER)")
    expected = stream_of(tok, DOCS)
    txt = data.tokenize_source(str(tmp_path / "doc_*.txt"), tok)
    np.testing.assert_array_equal(txt.tokens, expected)
    for name in ("docs.jsonl", "docs.parquet", "docs.csv"):
        source = data.as_source(tmp_path / name)
        assert isinstance(source, TableFiles)
        corpus = data.tokenize_source(source, tok)
        np.testing.assert_array_equal(corpus.tokens, expected, err_msg=name)
        np.testing.assert_array_equal(corpus.doc_hashes, txt.doc_hashes)
    query = TableFiles(tmp_path / "docs.parquet", query="SELECT text AS body FROM data WHERE id % 2 = 1 "
                       "ORDER BY id DESC", text_column="body")
    np.testing.assert_array_equal(data.tokenize_source(query, tok).tokens, stream_of(tok, DOCS[3::-2]))
    separated = tmp_path / "joined.text"
    separated.write_text("\n<|sep|>\n".join(DOCS))
    joined = data.tokenize_source(TextFiles(separated, separator="\n<|sep|>\n"), tok)
    np.testing.assert_array_equal(joined.tokens, expected)


def test_bad_sources_fail_with_clear_messages(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(FileNotFoundError, match=r"no files match '.*nothing_\*\.txt'"):
        data.tokenize_source(str(tmp_path / "nothing_*.txt"), tok)
    (tmp_path / "empty1.txt").write_text("")
    (tmp_path / "empty2.txt").write_text("")
    with pytest.raises(ValueError, match=r"TextFiles.*empty\*\.txt.*no documents"):
        data.tokenize_source(str(tmp_path / "empty*.txt"), tok)
    with pytest.raises(IsADirectoryError, match="pass a glob"):
        data.tokenize_source(tmp_path, tok)
    (tmp_path / "t.jsonl").write_text('{"body": "x", "n": 1}\n')
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body', 'n'\]"):
        data.tokenize_source(tmp_path / "t.jsonl", tok)
    with pytest.raises(ValueError, match="type BIGINT, not text"):
        data.tokenize_source(TableFiles(tmp_path / "t.jsonl", text_column="n"), tok)
    (tmp_path / "bad.csv").write_bytes(b"text\n\"a\xffb\"\n")
    with pytest.raises(ValueError, match=r"(?s)DuckDB could not read .*bad\.csv.*UTF-8 only"):
        data.tokenize_source(tmp_path / "bad.csv", tok)
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe then \xc3 end")
    with pytest.warns(UserWarning, match="replaced 3 undecodable byte"):
        corpus = data.tokenize_source(tmp_path / "bad.txt", tok)
    assert corpus.replaced == 3
    np.testing.assert_array_equal(corpus.tokens, stream_of(tok, ["ok \ufffd\ufffd then \ufffd end"]))
    with pytest.raises(ValueError, match=r"bad\.txt: bytes 3-4 are not valid utf-8"):
        data.tokenize_source(TextFiles(tmp_path / "bad.txt", errors="strict"), tok)
    (tmp_path / "two.txt").write_text("first\n\nsecond")
    (tmp_path / "rows.jsonl").write_text('{"text": "a row"}\n')
    mixed = data.as_source([tmp_path / "rows.jsonl", tmp_path / "two.txt"], separator="\n\n")
    assert isinstance(mixed, data.Sources)
    assert mixed.read().documents == ["a row", "first", "second"]
    assert [d for piece in mixed.stream() for d in piece.documents] == ["a row", "first", "second"]
    assert mixed.fingerprint() != data.as_source([tmp_path / "rows.jsonl", tmp_path / "two.txt"]).fingerprint()
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 1"):
        data.make_datasets(tok, Texts(DOCS), seq_len=1, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        data.make_datasets(tok, Texts(DOCS), seq_len=8, batch_size=0)
    with pytest.raises(TypeError, match=r"lacks \['fingerprint'\]"):
        data.tokenize_source(Texts(DOCS), type("T", (), {"batch_encode": 1, "eos_id": 3, "pad_id": 0,
                                                        "vocab_size": 9})())


# ----------------------------------------------------------------------------- cache


def test_token_cache_is_reused_and_invalidated(tmp_path, rng_docs):
    cache = tmp_path / "cache"
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(rng_docs))
    source = TextFiles(src, separator="\n\n")
    tok = ByteTokenizer()
    cold = data.tokenize_source(source, tok, cache_dir=cache)
    assert tok.calls > 0 and not cold.from_cache
    assert [p.name for p in cache.iterdir()] == [cold.key]  # no temporary folder left
    calls = tok.calls
    warm = data.tokenize_source(source, tok, cache_dir=cache)
    assert warm.from_cache and tok.calls == calls and isinstance(warm.tokens, np.memmap)
    np.testing.assert_array_equal(warm.tokens, cold.tokens)
    np.testing.assert_array_equal(warm.doc_hashes, cold.doc_hashes)
    # Another tokenizer (other fingerprint) never reuses the entry.
    other = ByteTokenizer(fingerprint="bytes-v2", shift=5)
    second = data.tokenize_source(source, other, cache_dir=cache)
    assert not second.from_cache and other.calls > 0 and second.key != cold.key
    np.testing.assert_array_equal(second.tokens, np.asarray(cold.tokens) + (np.asarray(cold.tokens) != 3))
    # An entry planted under another tokenizer's key is detected and rebuilt.
    third = ByteTokenizer(fingerprint="bytes-v3", shift=6)
    key3 = data.tokenize_source(source, third).key  # in memory: the key, no cache entry
    os.rename(cache / second.key, cache / key3)
    with pytest.warns(UserWarning, match="metadata mismatch"):
        rebuilt = data.tokenize_source(source, third, cache_dir=cache)
    assert not rebuilt.from_cache and third.calls == 2 and rebuilt.key == key3
    np.testing.assert_array_equal(rebuilt.tokens, np.asarray(cold.tokens) + 2 * (np.asarray(cold.tokens) != 3))
    # A truncated array file is detected and rebuilt too.
    np.save(cache / cold.key / "tokens.npy", np.zeros(3, np.uint16))
    with pytest.warns(UserWarning, match="do not match meta.json"):
        assert not data.tokenize_source(source, tok, cache_dir=cache).from_cache
    # Changing the source's content changes the key.
    src.write_text("\n\n".join(rng_docs[:-1]))
    assert data.tokenize_source(source, tok, cache_dir=cache).key != cold.key


# ------------------------------------------------------------------- real tokenizer


@pytest.fixture(scope="module")
def real_tokenizers(tmp_path_factory):
    from vishwam.tokenizer import VishwamAITokenizer

    folder = tmp_path_factory.mktemp("tokenizers")
    docs = data.default_corpus()
    return [VishwamAITokenizer.train(docs, folder / f"v{size}.model", vocab_size=size)
            for size in (400, 480)]


def test_real_tokenizer_end_to_end_with_cache(tmp_path, real_tokenizers):
    tok, other = real_tokenizers
    docs = data.default_corpus()
    train, val = data.make_datasets(tok, seq_len=64, batch_size=4, val_fraction=0.1, seed=1,
                                    cache_dir=tmp_path, process_index=0, process_count=1)
    with train, val:
        corpus = train.rows.corpus
        expected = [t for ids in tok.batch_encode(docs) for t in ids + [tok.eos_id]]
        np.testing.assert_array_equal(corpus.tokens, expected)
        assert corpus.num_documents == len(docs) and corpus.tokens.max() < tok.vocab_size
        # Every document lands on exactly one side, and the packed rows hold exactly its tokens.
        assert train.rows.num_tokens + val.rows.num_tokens == len(expected)
        first = next(train)
        # The first piece of a row that starts a document decodes to that document's text.
        val_batch = next(val)
        seg = val_batch["segment_ids"][0]
        piece = val_batch["tokens"][0][(seg == 1)]
        assert val_batch["positions"][0, 0] == 0
        text = tok.decode(piece[piece != tok.eos_id].tolist())
        first_val_doc = docs[data.split_documents(corpus.doc_hashes, 0.1)[1][0]]
        assert len(text) > 20 and first_val_doc.startswith(text)
        state = train.state()
    # A second run reads the cache (no tokenising) and resumes to the same batches.
    train2, val2 = data.make_datasets(tok, seq_len=64, batch_size=4, val_fraction=0.1, seed=1,
                                      cache_dir=tmp_path, process_index=0, process_count=1)
    with train2, val2:
        assert train2.rows.corpus.from_cache
        np.testing.assert_array_equal(train2.batch_at(0)["tokens"], first["tokens"])
        train2.restore(state)
        np.testing.assert_array_equal(next(train2)["tokens"], train.batch_at(1)["tokens"])
    # Another tokenizer gets its own entry, with its own ids.
    corpus_other = data.tokenize_source(None, other, cache_dir=tmp_path)
    assert not corpus_other.from_cache and corpus_other.key != corpus.key
    assert len(list(tmp_path.iterdir())) == 2
    np.testing.assert_array_equal(
        corpus_other.tokens, [t for ids in other.batch_encode(docs) for t in ids + [other.eos_id]])
