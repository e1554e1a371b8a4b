"""VishwamAITokenizer: lossless round trip, fixed ids, HF-style calls, cache, files, bad input."""

import hashlib
import io
import json
import random
import re
import threading
from pydoc_data.topics import topics

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from vishwam.tokenizer import CACHE_MAX_CHARS, VishwamAITokenizer

MIXED = [
    "Hello   world\t\ttabs\n\nnew lines  and trailing spaces   ",
    "नमस्ते दुनिया, यह हिंदी में एक वाक्य है। संख्या १२३।",
    "你好，世界！这是一个中文句子。我们测试分词。",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧 flags 🇮🇳",
    "def f(x):\n    return x  # four-space indent\n\tand a tab\r\n",
    "Ünïcödé ﬁ ligature, e\u0301 combining, NBSP\u00a0here, zero\u200bwidth",
    "<tool>call(arg)</tool> and <tool> again",
]
USER_SYMBOLS = ("<tool>",)
TRICKY = [
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " leading",
    "trailing ",
    "  two  inner  spaces  ",
    "\u2581",  # SentencePiece's own whitespace marker, written literally
    "a\u2581b \u2581 c\u2581\u2581",
    " \u2581x",
    "\x00nul\x7f",
    "\ufeffbom",
    "\U0010ffff max code point",
    "🧿 nazar (rare, byte fallback)",
    "\r\n\r\n",
    "<tool>",
    "x<tool>\u2581<tool> ",
]
ALPHABET = [*" \t\n\r\u2581abcXYZ019.,;<>/?!", *"नमस्ते你好世界😀👍🏽\u200d\u0301ßé€", "<tool>"]


def _documents():
    bulk = [topics[name] for name in sorted(topics)[:60]]
    return bulk + MIXED * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "nested" / "dir" / "tok.model"
    return VishwamAITokenizer.train(
        _documents(), path, vocab_size=800, user_symbols=USER_SYMBOLS, max_length=16
    )


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _raw_model(tmp_path, **options):
    """A model trained by plain SentencePiece, for the checks on foreign model files."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(MIXED * 30),
        model_writer=buffer,
        hard_vocab_limit=False,
        minloglevel=2,
        **{"vocab_size": 150, **options},
    )
    path = tmp_path / "raw.model"
    path.write_bytes(buffer.getvalue())
    return path


# ---------------------------------------------------------------------- format


def test_special_ids_and_sizes(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    sp = spm.SentencePieceProcessor(model_file=str(tok.model_path))
    assert [sp.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<tool>"]
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert tok.vocab_size == len(tok) == 800
    assert tok.encode("<tool>") == [sp.piece_to_id("\u2581"), 4]
    assert tok.encode("a<tool>b").count(4) == 1


def test_written_atomically_with_parents(tok):
    folder = tok.model_path.parent
    assert folder.name == "dir" and tok.model_path.is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["tok.model"]  # no temporary left behind


def test_fingerprint_is_sha256_of_the_model_proto(tok, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tok.model_path))
    assert tok.fingerprint == hashlib.sha256(sp.serialized_model_proto()).hexdigest()
    other = VishwamAITokenizer.train(MIXED * 30, tmp_path / "other.model", vocab_size=400)
    assert other.fingerprint != tok.fingerprint


# ---------------------------------------------------------------------- round trip


@pytest.mark.parametrize("text", MIXED + TRICKY)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    assert tok.decode(tok.encode(text, add_bos=True, add_eos=True), skip_special_tokens=False) == (
        "[BOS]" + text + "[EOS]"
    )


def test_round_trip_random_mixed_script(tok):
    texts = _random_texts(300)
    assert tok.batch_decode(tok.batch_encode(texts)) == texts
    assert all(tok.decode(tok.encode(t)) == t for t in texts[:50])


def test_plain_text_ids_equal_raw_sentencepiece(tok):
    # The default (prepend_scheme=None) is sp's own ids; a literal U+2581 is the one
    # exception (sp itself would decode it as a space).
    sp = spm.SentencePieceProcessor(model_file=str(tok.model_path))
    texts = [t for t in MIXED + TRICKY + _random_texts(100) if "\u2581" not in t]
    assert tok.batch_encode(texts) == sp.encode(texts)
    assert sp.decode(sp.encode("a\u2581b")) == "a b"
    assert tok.decode(tok.encode("a\u2581b")) == "a\u2581b"


def test_decode_skips_or_shows_special_tokens(tok):
    ids = tok.encode("x y")
    assert tok.decode([2, *ids, 3, 0, 0]) == "x y"
    assert tok.decode([2, *ids, 3, 0, 0], skip_special_tokens=False) == "[BOS]x y[EOS][PAD][PAD]"
    # Two texts joined by EOS: sp's own spacing, with or without the special token shown.
    two = [*ids, 3, *tok.encode("z")]
    assert tok.decode(two) == "x y z"
    assert tok.decode(two, skip_special_tokens=False) == "x y[EOS] z"
    assert tok.decode(np.array(ids)) == tok.decode(jnp.array(ids)) == tok.decode(tuple(ids)) == "x y"
    assert tok.decode([1, *ids, 1]) == "x y"  # [UNK] is skipped too
    assert tok.decode([1, *ids], skip_special_tokens=False) == "[UNK]x y"
    assert tok.batch_decode(np.array([[*ids, 0], [2, *ids]])) == ["x y", "x y"]


def test_coverage(tok):
    assert tok.coverage(["hello world"]) == 1.0
    assert tok.coverage(["🧿"]) == 0.0  # not in the corpus: one character, all bytes
    assert tok.coverage(["ab🧿"]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------- batch and cache


def test_batch_equals_loop(tok):
    texts = MIXED + TRICKY + MIXED[:3]  # repeats inside one batch
    for bos, eos in [(False, False), (True, False), (False, True), (True, True)]:
        fresh = VishwamAITokenizer(tok.model_path, cache_size=0)
        assert tok.batch_encode(texts, bos, eos) == [fresh.encode(t, bos, eos) for t in texts]
        assert fresh.batch_encode(texts, bos, eos) == [tok.encode(t, bos, eos) for t in texts]
    batch = tok.batch_encode(texts, True, True)
    assert tok.batch_decode(batch) == [tok.decode(ids) for ids in batch] == texts
    assert tok.batch_decode(batch, False) == [tok.decode(ids, False) for ids in batch]


def test_cache_counts_hits_and_returns_independent_lists(tok):
    cached = VishwamAITokenizer(tok.model_path, cache_size=3)
    first = cached.encode("the same line")
    assert cached.cache_info() == {"hits": 0, "misses": 1, "size": 1, "maxsize": 3}
    first.append(999)
    second = cached.encode("the same line")
    third = cached.encode("the same line")
    assert second == third == first[:-1] and second is not third
    second.clear()
    assert cached.encode("the same line", add_bos=True) == [2, *third]
    assert cached.cache_info() == {"hits": 3, "misses": 1, "size": 1, "maxsize": 3}

    batch = cached.batch_encode(["a", "b", "a", "the same line"])
    assert batch[0] == batch[2] and batch[0] is not batch[2]
    batch[0].append(999)
    assert cached.encode("a") == batch[2]
    # "a" and "b" encoded once each; the repeat and the cached line are hits; then "a".
    assert cached.cache_info() == {"hits": 6, "misses": 3, "size": 3, "maxsize": 3}
    cached.batch_encode(["c", "d"])  # evicts the two least recently used
    assert cached.cache_info()["size"] == 3
    cached.encode("the same line")
    assert cached.cache_info()["misses"] == 6  # it had been evicted


def test_cache_off_and_long_texts(tok):
    off = VishwamAITokenizer(tok.model_path, cache_size=0)
    assert off.encode("x") == off.encode("x") == tok.encode("x")
    assert off.cache_info() == {"hits": 0, "misses": 0, "size": 0, "maxsize": 0}
    on = VishwamAITokenizer(tok.model_path, cache_size=4)
    long = "word " * (CACHE_MAX_CHARS // 5 + 1)
    assert on.decode(on.encode(long)) == long
    assert on.cache_info()["size"] == 0


def test_threads_get_the_same_ids(tok):
    shared = VishwamAITokenizer(tok.model_path, cache_size=32)  # small: constant eviction
    texts = _random_texts(200, seed=1) + MIXED
    expected = VishwamAITokenizer(tok.model_path, cache_size=0).batch_encode(texts)
    results, errors = {}, []

    def work(worker):
        try:
            order = list(range(len(texts)))
            random.Random(worker).shuffle(order)
            got = {i: shared.encode(texts[i]) for i in order}
            batched = shared.batch_encode([texts[i] for i in order])
            results[worker] = ([got[i] for i in range(len(texts))], dict(zip(order, batched)))
        except Exception as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for singles, batched in results.values():
        assert singles == expected
        assert [batched[i] for i in range(len(texts))] == expected
    info = shared.cache_info()
    assert info["hits"] + info["misses"] == 6 * 2 * len(texts) and info["size"] <= 32


# ---------------------------------------------------------------------- __call__


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("padding", ["longest", True, "max_length", False, "do_not_pad"])
def test_call_padding_and_masks(tok, padding, side):
    texts = ["a", "hello there world", ""]
    hf = VishwamAITokenizer(tok.model_path, max_length=16, padding_side=side)
    out = hf(texts, padding=padding)
    plain = tok.batch_encode(texts)
    width = {"max_length": 16, False: None, "do_not_pad": None}.get(padding, max(map(len, plain)))
    for ids, mask, raw in zip(out["input_ids"], out["attention_mask"], plain):
        assert len(ids) == len(mask) == (width or len(raw))
        real = [i for i, m in zip(ids, mask) if m == 1]
        pads = [i for i, m in zip(ids, mask) if m == 0]
        assert real == raw and pads == [0] * len(pads)
        assert mask == sorted(mask, reverse=side == "right")  # pads on the chosen side
    if width is None:
        with pytest.raises(ValueError, match="padding='longest'"):
            hf(texts, padding=padding, return_tensors="np")
    else:
        arrays = hf(texts, padding=padding, return_tensors="np")
        assert arrays["input_ids"].dtype == np.int32 and arrays["input_ids"].shape == (3, width)
        np.testing.assert_array_equal(arrays["input_ids"], np.array(out["input_ids"]))
        np.testing.assert_array_equal(arrays["attention_mask"], np.array(out["attention_mask"]))
        jax_out = hf(texts, padding=padding, return_tensors="jax")
        np.testing.assert_array_equal(np.asarray(jax_out["input_ids"]), arrays["input_ids"])


def test_call_truncation_keeps_bos_eos(tok):
    text = "a fairly long sentence that certainly takes more than eight tokens to spell out"
    full = tok.encode(text)
    assert len(full) > 8
    out = tok(text, max_length=8, add_bos=True, add_eos=True)
    assert out["input_ids"] == [2, *full[:6], 3] and out["attention_mask"] == [1] * 8
    out = tok([text, "x"], max_length=8, truncation=False, padding="longest", return_tensors="np")
    assert out["input_ids"].shape == (2, len(full))
    assert tok(text)["input_ids"] == full[:16]  # the tokenizer's own max_length=16
    empty = tok([], return_tensors="np")
    assert empty["input_ids"].shape == (0, 0)
    assert tok.batch_encode([]) == [] and tok.batch_decode([]) == [] and tok.decode([]) == ""


# ---------------------------------------------------------------------- files


def test_save_and_load_pretrained(tok, tmp_path):
    texts = MIXED + TRICKY
    custom = VishwamAITokenizer(tok.model_path, max_length=64, add_bos_token=True, padding_side="left")
    paths = custom.save_pretrained(tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(p.name for p in paths) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is True
    assert (config["add_bos_token"], config["add_eos_token"], config["model_max_length"]) == (True, False, 64)
    assert (config["pad_token"], config["unk_token"], config["bos_token"], config["eos_token"]) == (
        "[PAD]",
        "[UNK]",
        "[BOS]",
        "[EOS]",
    )
    eos_entry = config["added_tokens_decoder"]["3"]
    assert eos_entry["content"] == "[EOS]" and eos_entry["special"] and not eos_entry["normalized"]
    special_map = json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text())
    assert special_map == {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
    }

    loaded = VishwamAITokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.batch_encode(texts) == tok.batch_encode(texts)
    assert (loaded.max_length, loaded.add_bos_token, loaded.padding_side) == (64, True, "left")
    assert loaded("hi")["input_ids"][0] == 2
    assert VishwamAITokenizer.from_pretrained(tmp_path / "hf", max_length=8).max_length == 8


def test_train_from_files_unigram(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(MIXED * 20), encoding="utf-8")
    second.write_text(topics["assignment"], encoding="utf-8")
    files = [str(first), second]
    tok = VishwamAITokenizer.train(files, tmp_path / "u.model", vocab_size=700, model_type="unigram")
    assert tok.vocab_size == 700
    texts = MIXED + TRICKY + _random_texts(50, seed=2)
    assert tok.batch_decode(tok.batch_encode(texts)) == texts
    # One path on its own is a file too; input_kind="documents" reads the same string as text.
    assert VishwamAITokenizer.train(first, tmp_path / "one.model", vocab_size=500).vocab_size == 500
    with pytest.raises(ValueError, match="vocab_size=500 is more than"):
        VishwamAITokenizer.train([str(first)], tmp_path / "doc.model", vocab_size=500, input_kind="documents")
    with pytest.raises(ValueError, match="item 1 .* is not an existing file"):
        VishwamAITokenizer.train([second, "a typo.txt"], tmp_path / "mix.model", vocab_size=500)


def test_soft_vocab_limit(tmp_path):
    small = ["tiny corpus of a few words", "a few more words"] * 10
    with pytest.raises(ValueError, match=r"vocab_size=5000 is more than .* largest that works is \d+") as info:
        VishwamAITokenizer.train(small, tmp_path / "t.model", vocab_size=5000)
    largest = int(re.search(r"largest that works is (\d+)", str(info.value)).group(1))
    assert not (tmp_path / "t.model").exists()
    soft = VishwamAITokenizer.train(small, tmp_path / "t.model", vocab_size=5000, hard_vocab_limit=False)
    assert soft.vocab_size == largest < 5000
    assert VishwamAITokenizer.train(small, tmp_path / "t2.model", vocab_size=largest).vocab_size == largest


# ---------------------------------------------------------------------- bad input


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        VishwamAITokenizer(tmp_path / "nope.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 10)
    with pytest.raises(ValueError, match="corrupt.model is not a valid SentencePiece model"):
        VishwamAITokenizer(corrupt)
    with pytest.raises(FileNotFoundError, match="tokenizer.model not found"):
        VishwamAITokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match="tokenizer.model is not a valid"):
        VishwamAITokenizer.from_pretrained(tmp_path)


def test_special_tokens_that_disagree(tok, tmp_path):
    with pytest.raises(ValueError, match=r"pad_token='<pad>' disagrees .* id 0 is '\[PAD\]'"):
        VishwamAITokenizer(tok.model_path, pad_token="<pad>")
    with pytest.raises(ValueError, match=r"eos_token='</s>' disagrees .* id 3 is '\[EOS\]'"):
        VishwamAITokenizer(tok.model_path, eos_token="</s>")
    no_bos = _raw_model(tmp_path, **LLAMA_STYLE, bos_id=-1)
    with pytest.raises(ValueError, match=r"defines no bos token .* pass bos_token=PIECE"):
        VishwamAITokenizer(no_bos)
    assert VishwamAITokenizer(no_bos, bos_token="</s>").bos_id == 2
    with pytest.raises(ValueError, match=r"pad_token='\[PAD\]' is not a piece of the model's vocabulary"):
        VishwamAITokenizer(no_bos, bos_token="</s>", pad_token="[PAD]")


# Llama's layout: sentencepiece's default ids (unk 0, bos 1, eos 2, no pad), lossless, byte fallback.
LLAMA_STYLE = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False, "byte_fallback": True,
               "vocab_size": 700}


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    return VishwamAITokenizer(_raw_model(tmp_path_factory.mktemp("llama"), **LLAMA_STYLE), max_length=16)


def test_llama_style_model_loads_with_its_own_ids(llama_tok):
    sp = spm.SentencePieceProcessor(model_file=str(llama_tok.model_path))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert (llama_tok.unk_id, llama_tok.bos_id, llama_tok.eos_id) == (0, 1, 2)
    assert llama_tok.pad_id == llama_tok.unk_id == 0  # no pad in the model: the unk piece, never emitted
    assert llama_tok.special_tokens == {"pad_token": "<unk>", "unk_token": "<unk>", "bos_token": "<s>",
                                        "eos_token": "</s>"}
    texts = MIXED + TRICKY + _random_texts(50, seed=4)
    ids = llama_tok.batch_encode(texts)
    assert all(0 not in row for row in ids)  # byte fallback: unk (= pad) is no token of any text
    assert llama_tok.batch_decode(ids) == texts
    plain = [t for t in texts if "\u2581" not in t]
    assert [llama_tok.encode(t) for t in plain] == sp.encode(plain)
    assert llama_tok.encode("hello", add_bos=True, add_eos=True) == [1, *sp.encode("hello"), 2]
    assert llama_tok.decode([1, *sp.encode("hi"), 2], skip_special_tokens=False) == "<s>hi</s>"
    batch = llama_tok(["a", "a longer text"], add_bos=True, return_tensors="np")
    assert batch["input_ids"][0, 0] == 1 and (batch["input_ids"][0][batch["attention_mask"][0] == 0] == 0).all()


def test_llama_style_save_and_load_pretrained(llama_tok, tmp_path):
    llama_tok.save_pretrained(tmp_path)
    again = VishwamAITokenizer.from_pretrained(tmp_path)
    assert (again.pad_id, again.unk_id, again.bos_id, again.eos_id) == (0, 0, 1, 2)
    assert again.fingerprint == llama_tok.fingerprint
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert sorted(config["added_tokens_decoder"]) == ["0", "1", "2"]
    assert VishwamAITokenizer.from_pretrained(tmp_path, pad_token="</s>").pad_id == 2


def test_lossy_or_byteless_model_is_rejected(tmp_path):
    fixed_ids = {f"{name}_id": i for i, name in enumerate(["pad", "unk", "bos", "eos"])}
    fixed_ids.update({f"{name}_piece": f"[{name.upper()}]" for name in ["pad", "unk", "bos", "eos"]})
    lossy = _raw_model(tmp_path, **fixed_ids)  # sentencepiece's default nmt_nfkc normaliser
    with pytest.raises(ValueError, match="normaliser changes text"):
        VishwamAITokenizer(lossy)
    identity = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False}
    no_bytes = _raw_model(tmp_path, **fixed_ids, **identity)
    with pytest.raises(ValueError, match="no byte-fallback pieces"):
        VishwamAITokenizer(no_bytes)


def test_non_string_input(tok):
    with pytest.raises(TypeError, match="12345"):
        tok.encode(12345)
    with pytest.raises(TypeError, match="12345"):
        tok.batch_encode(["fine", 12345])
    with pytest.raises(TypeError, match="bytes"):
        tok.batch_encode([b"raw bytes"])
    with pytest.raises(TypeError):
        tok.batch_encode("a single string")
    with pytest.raises(TypeError, match="12345"):
        tok(["fine", 12345])
    with pytest.raises(TypeError, match="float"):
        tok.decode(np.array([1.5, 2.0]))
    with pytest.raises(TypeError, match="'\u2581a'"):
        tok.decode(["\u2581a"])  # a piece, not an id
    with pytest.raises(TypeError, match="int"):
        tok.batch_decode([5, 6])  # one sequence where a batch belongs
    with pytest.raises(ValueError, match="token id 800 is outside the vocabulary"):
        tok.decode([5, 800])
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
        tok.batch_decode([[5], [-1]])


def test_max_length_too_small(tok):
    with pytest.raises(ValueError, match=r"max_length=2 is too small to hold BOS and EOS.*max_length>=3"):
        VishwamAITokenizer(tok.model_path, max_length=2, add_bos_token=True, add_eos_token=True)
    with pytest.raises(ValueError, match="max_length=1 is too small to hold BOS or EOS"):
        tok(["x"], max_length=1, add_bos=True)
    with pytest.raises(ValueError, match="max_length=0"):
        VishwamAITokenizer(tok.model_path, max_length=0)
    assert tok(["x y z"], max_length=2, add_bos=True)["input_ids"] == [[2, tok.encode("x y z")[0]]]


def test_bad_call_options(tok):
    with pytest.raises(ValueError, match="padding must be"):
        tok(["x"], padding="bad")
    with pytest.raises(ValueError, match="return_tensors must be"):
        tok(["x"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding_side"):
        VishwamAITokenizer(tok.model_path, padding_side="middle")


def test_bad_training_input(tmp_path):
    out = tmp_path / "bad.model"
    with pytest.raises(ValueError, match="training input is empty"):
        VishwamAITokenizer.train([], out, vocab_size=300)
    with pytest.raises(ValueError, match="training input is empty"):
        VishwamAITokenizer.train(["", "  \n\t"], out, vocab_size=300)
    with pytest.raises(TypeError, match="training input item 1 is int"):
        VishwamAITokenizer.train(iter(["some text", 7]), out, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        VishwamAITokenizer.train([tmp_path / "missing.txt"], out, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="pass a list of documents"):
        VishwamAITokenizer.train("one document, not a path", out, vocab_size=300)
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        VishwamAITokenizer.train([not_utf8], out, vocab_size=300)
    not_utf8.unlink()
    with pytest.raises(ValueError, match=r"vocab_size=270 is too small: .* at least \d+"):
        VishwamAITokenizer.train(MIXED * 5, out, vocab_size=270)
    with pytest.raises(ValueError, match=r"\['pad_id'\] are fixed"):
        VishwamAITokenizer.train(MIXED, out, vocab_size=300, pad_id=5)
    with pytest.raises(ValueError, match="already a special token"):
        VishwamAITokenizer.train(MIXED, out, vocab_size=300, user_symbols=["[PAD]"])
    with pytest.raises(ValueError, match="model_type"):
        VishwamAITokenizer.train(MIXED, out, vocab_size=300, model_type="word")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_training_progress_bar_goes_to_stderr_and_changes_nothing(tmp_path, capsys):
    documents = MIXED * 20
    quiet = VishwamAITokenizer.train(documents, tmp_path / "quiet.model", vocab_size=400, hard_vocab_limit=False)
    assert capsys.readouterr().err == ""
    shown = VishwamAITokenizer.train(documents, tmp_path / "shown.model", vocab_size=400, hard_vocab_limit=False,
                                     progress=True)
    err = capsys.readouterr().err
    lines = sum(1 for d in documents for line in d.split("\n") if line.strip())
    assert "tokenizer: training on the lines read" in err and f"{lines} lines" in err
    assert shown.fingerprint == quiet.fingerprint


def test_prepend_scheme_files_and_round_trip(tok, llama_tok, tmp_path):
    from vishwam.hf import load_hf_tokenizer

    # Our own tokenizer keeps SentencePiece's ids (lossless) through save_pretrained and both loaders.
    assert tok.prepend_scheme is None and tok.decode(tok.encode("  two")) == "  two"
    tok.save_pretrained(tmp_path / "own")
    config = json.loads((tmp_path / "own" / "tokenizer_config.json").read_text())
    assert config["vishwam_prepend_scheme"] is None and config["legacy"] is True
    for again in (VishwamAITokenizer.from_pretrained(tmp_path / "own"), load_hf_tokenizer(tmp_path / "own")):
        assert again.prepend_scheme is None and again.fingerprint == tok.fingerprint
        assert again.batch_encode(MIXED + TRICKY) == tok.batch_encode(MIXED + TRICKY)
    # transformers' rules: one leading space less on the round trip, another fingerprint.
    sp = spm.SentencePieceProcessor(model_file=str(llama_tok.model_path))
    hf = VishwamAITokenizer(llama_tok.model_path, prepend_scheme="first")
    assert hf.encode("  two") == sp.encode(" two") and hf.decode(hf.encode("  two")) == " two"
    assert hf.encode("hello") == sp.encode("hello") and hf.fingerprint != llama_tok.fingerprint
    assert hf.encode("\u2581x") == sp.encode("x")  # a literal U+2581 reads as a space
    never = VishwamAITokenizer(llama_tok.model_path, prepend_scheme="never")
    always = VishwamAITokenizer(llama_tok.model_path, prepend_scheme="always")
    assert never.encode("x y") == never.encode("x") + sp.encode("y") and never.decode(never.encode(" x")) == " x"
    # Special-token text is the special id; "first" puts no space after it, "always" does.
    assert hf.encode("<s>x") == [1, *never.encode("x")] and always.encode("<s>x") == [1, *sp.encode("x")]
    assert hf.decode([1, *sp.encode("x"), 2], skip_special_tokens=False) == "<s> x</s>"
    for scheme, files in (("first", {"legacy": False}), ("never", {"legacy": True, "add_prefix_space": False})):
        VishwamAITokenizer(llama_tok.model_path, prepend_scheme=scheme).save_pretrained(tmp_path / scheme)
        config = json.loads((tmp_path / scheme / "tokenizer_config.json").read_text())
        assert {key: config.get(key) for key in files} == files and config["vishwam_prepend_scheme"] == scheme
        assert VishwamAITokenizer.from_pretrained(tmp_path / scheme).prepend_scheme == scheme
        assert load_hf_tokenizer(tmp_path / scheme).prepend_scheme == scheme
    with pytest.raises(ValueError, match=r"prepend_scheme must be None .* got 'sometimes'"):
        VishwamAITokenizer(llama_tok.model_path, prepend_scheme="sometimes")
    config_path = tmp_path / "first" / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "vishwam_prepend_scheme": "both"}))
    with pytest.raises(ValueError, match=r"vishwam_prepend_scheme is 'both', expected null or one of"):
        VishwamAITokenizer.from_pretrained(tmp_path / "first")
    with pytest.raises(ValueError, match=r"vishwam_prepend_scheme is 'both', expected null or one of"):
        load_hf_tokenizer(tmp_path / "first")
