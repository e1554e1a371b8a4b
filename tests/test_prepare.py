"""Streaming preparation: chunked reading and encoding, the same bytes as the whole corpus at once,
memory bounded by the chunk, no trusted cache after a kill, and scripts/prepare_data.py."""

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from vishwam import data
from vishwam.data import TableFiles, TextFiles

ROOT = Path(__file__).resolve().parents[1]

TOKENIZER = textwrap.dedent("""
    import numpy as np

    class FastBytes:
        '''Byte-level tokenizer with the TokenizerLike protocol, vectorised so that large corpora are quick.'''

        pad_id, bos_id, eos_id, vocab_size, fingerprint = 0, 2, 3, 260, "fast-bytes-v1"

        def __init__(self, die_on_call=None):
            self.calls, self.die_on_call = 0, die_on_call

        def batch_encode(self, texts, add_bos=False, add_eos=False):
            self.calls += 1
            if self.calls == self.die_on_call:
                import os, signal
                os.kill(os.getpid(), signal.SIGKILL)
            return [(np.frombuffer(t.encode(), np.uint8).astype(np.int64) + 4).tolist() for t in texts]
""")
namespace: dict = {}
exec(TOKENIZER, namespace)
FastBytes = namespace["FastBytes"]


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> tuple[Path, Path]:
    """A JSONL file and a `\\n\\n`-separated text file with the same documents, about `megabytes` each."""
    rng = np.random.default_rng(seed)
    words = np.array(["the", "expert", "router", "token", "é", "→", "data", "streams", "of", "ß"])
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, text = folder / "corpus.jsonl", folder / "corpus.txt"
    size = 0
    with open(jsonl, "w", encoding="utf-8") as fj, open(text, "w", encoding="utf-8") as ft:
        first = True
        while size < megabytes * 2**20:
            doc = " ".join(rng.choice(words, size=int(rng.integers(5, 400))))
            fj.write(json.dumps({"text": doc}) + "\n")
            ft.write(("" if first else "\n\n") + doc)
            first, size = False, size + len(doc)
    return jsonl, text


def whole_in_memory(documents: list[str], tok) -> dict[str, bytes]:
    """The oracle: every document at once, the arrays built directly and saved with np.save."""
    ids = tok.batch_encode(documents)
    tokens = np.array([t for row in ids for t in row + [tok.eos_id]], dtype=np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(row) + 1 for row in ids])]).astype(np.int64)
    hashes = np.array([int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little")
                       for d in documents], dtype=np.uint64)
    files = {}
    for name, array in (("tokens", tokens), ("offsets", offsets), ("doc_hashes", hashes)):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        files[f"{name}.npy"] = buffer.getvalue()
    return files


def test_streamed_cache_is_byte_identical_to_the_whole_corpus_at_once(tmp_path):
    jsonl, text = write_corpus(tmp_path / "src", 0.5)
    tok = FastBytes()
    documents = TableFiles(jsonl).read().documents
    assert TextFiles(text, separator="\n\n").read().documents == documents
    expected = whole_in_memory(documents, tok)
    for source in (TableFiles(jsonl), TextFiles(text, separator="\n\n")):
        tok.calls = 0
        # 4 KiB chunks against 0.5 MB of text: over a hundred chunks, documents split over file blocks.
        corpus = data.tokenize_source(source, tok, cache_dir=tmp_path / "cache", chunk_chars=4096)
        assert tok.calls > 100 and not corpus.from_cache
        entry = tmp_path / "cache" / corpus.key
        for name, content in expected.items():
            assert (entry / name).read_bytes() == content, (source, name)
        in_memory = data.tokenize_source(source, tok, chunk_chars=4096)
        np.testing.assert_array_equal(in_memory.tokens, corpus.tokens)
        np.testing.assert_array_equal(in_memory.offsets, corpus.offsets)
        np.testing.assert_array_equal(in_memory.doc_hashes, corpus.doc_hashes)


def _peak_traced_bytes(source, tok, cache_dir: Path) -> int:
    tracemalloc.start()
    try:
        data.tokenize_source(source, tok, cache_dir=cache_dir, chunk_chars=1 << 16)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_preparation_memory_is_bounded_by_the_chunk_not_the_corpus(tmp_path):
    small, big = write_corpus(tmp_path / "small", 3, seed=1), write_corpus(tmp_path / "big", 12, seed=2)
    tok = FastBytes()
    for kind in (0, 1):
        make = TableFiles if kind == 0 else (lambda path: TextFiles(path, separator="\n\n"))
        peaks = [_peak_traced_bytes(make(paths[kind]), tok, tmp_path / f"cache{kind}") for paths in (small, big)]
        # The whole corpus in memory would be > 12 MB of text plus its tokens; the streamed peak is a few
        # 64 KiB chunks plus the source fingerprint's 1 MiB read blocks, and 4x the corpus barely moves it.
        assert peaks[1] < 4 * 2**20, peaks
        assert peaks[1] < 1.25 * peaks[0] + 2**20, peaks


def test_a_killed_preparation_leaves_no_cache_a_later_run_trusts(tmp_path):
    jsonl, _ = write_corpus(tmp_path / "src", 0.3)
    (tmp_path / "fast_bytes.py").write_text(TOKENIZER)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from fast_bytes import FastBytes
        from vishwam import data
        tok = FastBytes(die_on_call=5)  # SIGKILL in the middle of the stream
        if sys.argv[1] == "cache":
            data.tokenize_source({str(jsonl)!r}, tok, cache_dir={str(tmp_path / "cache")!r}, chunk_chars=4096)
        else:
            data.prepare_corpus({str(jsonl)!r}, tok, {str(tmp_path / "prepared")!r}, chunk_chars=4096)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for mode in ("cache", "prepared"):
        proc = subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True)
        assert proc.returncode == -9, proc.stderr
    tok = FastBytes()
    key = data.tokenize_source(TableFiles(jsonl), tok).key
    leftovers = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{key}.tmp-"), leftovers  # never renamed into place
    assert not (tmp_path / "prepared").exists()
    tok.calls = 0
    corpus = data.tokenize_source(TableFiles(jsonl), tok, cache_dir=tmp_path / "cache", chunk_chars=4096)
    assert not corpus.from_cache and tok.calls > 5
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [key]  # the dead process's folder is gone
    expected = whole_in_memory(TableFiles(jsonl).read().documents, tok)
    assert (tmp_path / "cache" / key / "tokens.npy").read_bytes() == expected["tokens.npy"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from vishwam.tokenizer import VishwamAITokenizer

    folder = tmp_path_factory.mktemp("prepare_tok")
    VishwamAITokenizer.train(data.default_corpus()[:24], folder / "tok" / "tokenizer.model", vocab_size=400,
                             hard_vocab_limit=False, input_kind="documents").save_pretrained(folder / "tokenizer")
    return folder / "tokenizer"


def test_prepare_data_script_writes_a_directory_that_loads_and_refuses_to_overwrite(tmp_path, tokenizer_dir):
    from vishwam.tokenizer import VishwamAITokenizer

    jsonl, _ = write_corpus(tmp_path / "src", 0.05)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), str(jsonl), "--tokenizer",
               str(tokenizer_dir), "--out", str(tmp_path / "prepared"), "--chunk-mb", "0.01"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "prepared" in done.stdout and "tokenising" in done.stderr  # the progress bar
    tokenizer = VishwamAITokenizer.from_pretrained(tokenizer_dir)
    assert data.is_prepared(tmp_path / "prepared")
    corpus = data.load_prepared(tmp_path / "prepared", tokenizer)
    expected = data.tokenize_source(TableFiles(jsonl), tokenizer)
    np.testing.assert_array_equal(corpus.tokens, expected.tokens)
    assert corpus.from_cache and isinstance(corpus.tokens, np.memmap)
    train, val = data.make_datasets(tokenizer, corpus, seq_len=16, batch_size=2, prefetch=0,
                                    process_index=0, process_count=1)
    assert next(train)["tokens"].shape == (2, 16) and val is not None
    again = subprocess.run(command, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    other = VishwamAITokenizer.train(data.default_corpus()[24:48], tmp_path / "other" / "tokenizer.model",
                                     vocab_size=420, hard_vocab_limit=False, input_kind="documents")
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        data.load_prepared(tmp_path / "prepared", other)
    # scripts/train.py takes the directory as --data, and its tokenizer by default.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    trained = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--preset", "tiny", "--data", str(tmp_path / "prepared"),
         "--steps", "2", "--batch", "4", "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1",
         "--no-progress", "--runs", str(tmp_path / "runs"), "--name", "prepared"],
        env={**env, "XLA_FLAGS": " ".join(flags)}, capture_output=True, text=True, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert f"tokenizer: {tmp_path / 'prepared' / 'tokenizer'}" in trained.stdout
    assert f"{train.rows.num_tokens:,} train tokens" in trained.stdout


class _CountingPool(data.token_cache.EncodePool):
    """The real pool, counting the chunks its workers encoded (proof that they ran);
    `kill_after` kills worker 0 once that many chunks came back."""

    chunks, kill_after = 0, None

    def _receive(self, i):
        result = super()._receive(i)
        type(self).chunks += 1
        if type(self).chunks == type(self).kill_after:
            self._procs[0].kill()
        return result


@pytest.fixture
def counting_pool(monkeypatch):
    _CountingPool.chunks, _CountingPool.kill_after = 0, None
    monkeypatch.setattr(data.token_cache, "EncodePool", _CountingPool)
    return _CountingPool


def _tricky_documents(n: int) -> list[str]:
    rng = np.random.default_rng(7)
    words = ["the", "expert", "▁literal", "<s>", "</s>", "é", "→ß", "  two  spaces", "\n", "tab\t", "1234", "😀"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(n)]


@pytest.mark.parametrize("scheme", [None, "first"])
def test_encoding_workers_write_the_same_bytes_as_one_process(tmp_path, tokenizer_dir, counting_pool, scheme):
    from vishwam.tokenizer import VishwamAITokenizer

    tok = VishwamAITokenizer.from_pretrained(tokenizer_dir, prepend_scheme=scheme)
    documents = _tricky_documents(600)  # with literal U+2581 and special-token text: the slow paths
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    for add_bos in (False, True):
        one = data.tokenize_source(jsonl, tok, cache_dir=tmp_path / "one", chunk_chars=2048, add_bos=add_bos,
                                   workers=1)
        assert counting_pool.chunks == 0
        two = data.tokenize_source(jsonl, tok, cache_dir=tmp_path / "two", chunk_chars=2048, add_bos=add_bos,
                                   workers=2)
        assert counting_pool.chunks > 20  # every chunk went through a worker process
        counting_pool.chunks = 0
        assert one.key == two.key
        for name in ("tokens.npy", "offsets.npy", "doc_hashes.npy", "meta.json"):
            assert (tmp_path / "one" / one.key / name).read_bytes() == (tmp_path / "two" / two.key / name).read_bytes()
        ids = tok.batch_encode(documents, add_bos=add_bos)
        expected = np.concatenate([row + [tok.eos_id] for row in ids])
        np.testing.assert_array_equal(two.tokens, expected)
        hashes = [int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little") for d in documents]
        np.testing.assert_array_equal(two.doc_hashes, np.array(hashes, dtype=np.uint64))
    # More workers than chunks, and the in-memory path.
    few = data.tokenize_source(data.Texts(documents[:30]), tok, chunk_chars=300, workers=8)
    np.testing.assert_array_equal(few.tokens, np.concatenate([r + [tok.eos_id] for r in tok.batch_encode(documents[:30])]))


def test_a_dead_worker_is_one_clear_error_and_a_mismatched_one_a_fallback(tmp_path, tokenizer_dir, counting_pool):
    import shutil

    from vishwam.tokenizer import VishwamAITokenizer

    jsonl, _ = write_corpus(tmp_path / "src", 0.1)
    tok = VishwamAITokenizer.from_pretrained(tokenizer_dir)
    counting_pool.kill_after = 3
    with pytest.raises(RuntimeError, match=r"encoding worker 0 failed \(exit code -9\)"):
        data.tokenize_source(jsonl, tok, cache_dir=tmp_path / "cache", chunk_chars=2048, workers=2)
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary entry was removed, nothing committed
    # The model file replaced after the tokenizer was loaded: the workers would encode differently.
    counting_pool.kill_after, counting_pool.chunks = None, 0
    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, copy)
    moved = VishwamAITokenizer.from_pretrained(copy)
    VishwamAITokenizer.train(data.default_corpus()[30:40], copy / "tokenizer.model", vocab_size=420,
                             hard_vocab_limit=False, input_kind="documents")
    with pytest.warns(UserWarning, match="rebuilt another tokenizer.*encoding in this process instead"):
        fallback = data.tokenize_source(jsonl, moved, chunk_chars=2048, workers=2)
    assert counting_pool.chunks == 0  # no worker encoded anything: the loaded model did, in this process
    np.testing.assert_array_equal(fallback.tokens, data.tokenize_source(jsonl, moved, workers=1).tokens)
    np.testing.assert_array_equal(fallback.tokens, data.tokenize_source(jsonl, tok, workers=1).tokens)
    with pytest.raises(ValueError, match="workers must be"):
        data.tokenize_source(jsonl, tok, chunk_chars=2048, workers=0)


def test_ids_outside_the_vocabulary_are_refused_before_the_narrow_cast():
    class Broken(FastBytes):
        vocab_size = 300  # uint16 cache: 65536 + 10 would wrap to 10 after the cast

        def batch_encode(self, texts, add_bos=False, add_eos=False):
            return [[5, 65536 + 10] for _ in texts]

    with pytest.raises(ValueError, match=r"ids in \[3, 65546\], outside its vocab_size=300"):
        data.tokenize_source(data.Texts(["a", "b"]), Broken())
