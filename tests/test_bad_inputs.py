"""Every bad input a clear error, and no partial result left behind: a table of cases.

Each row is `(id, call or command, expected exception type or exit code, words the message
must contain)`. Library rows run in this process under `pytest.raises`; CLI rows run the
real scripts (`scripts/*.py` executed as `__main__` with `runpy`) in one subprocess per
batch, so that jax is imported once for dozens of commands, plus a few commands in a
process of their own to check the exit status the shell sees and `--debug`.

Every row also checks that nothing in the workspace changed: a refused command or call
writes no file, no directory and no temporary leftover (only the token cache, a cache,
may appear). A hypothesis property test at the end feeds random `ModelConfig` dicts:
construction succeeds and the model runs a forward pass, or it fails with a `ValueError`
naming a field, never another exception.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vishwam.config import ModelConfig, TrainConfig
from vishwam.data import TextFiles, as_source, default_corpus, make_datasets
from vishwam.files import atomic_directory, atomic_write_text
from vishwam.hf import load_hf_checkpoint
from vishwam.model import VishwamAI
from vishwam.pipeline import VishwamAIPipeline, load_model_weights
from vishwam.tokenizer import VishwamAITokenizer
from vishwam.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    IncompatibleConfigError,
    check_compatible,
    partition_arrays,
)
from vishwam.train.trainer import RunConfig, VishwamAITrainer

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CACHE = ".cache"  # runs/.cache/tokens: the token cache may appear; it is a cache, not a result


# ----------------------------------------------------------------------------- workspace
def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One CPU device per child, as a user's process has; same compile cache.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("VISHWAM_JAX_CACHE", str(jax.config.jax_compilation_cache_dir))
    return env


def _snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry under `root` (the token cache aside) with (is_dir, size, mtime_ns)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if CACHE in rel.parts:
            continue
        stat = path.lstat()
        found[str(rel)] = (path.is_dir(), 0 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return found


def _changes(before: dict, after: dict) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k] and not before[k][0])
    return [f"+{k}" for k in added] + [f"-{k}" for k in removed] + [f"~{k}" for k in changed]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Bad files of every kind, a tiny tokenizer, a finished tiny run, a pipeline, an HF directory."""
    root = tmp_path_factory.mktemp("bad_inputs")
    documents = default_corpus()[:12]
    with open(root / "corpus.jsonl", "w") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    (root / "corpus.txt").write_text("\n".join(documents))
    (root / "empty.txt").write_text("")
    (root / "wrong_column.jsonl").write_text('{"body": "a document"}\n')
    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (root / "a_directory").mkdir()
    import duckdb

    with duckdb.connect(str(root / "corpus.duckdb")) as con:
        con.execute("CREATE TABLE docs AS SELECT 'some text' AS text")
    (root / "invalid.json").write_text('{"model": {"num_layers": 2,')
    (root / "string_factor.json").write_text(json.dumps({"model": {**_tiny(), "capacity_factor": "1.25"}}))

    tokenizer = VishwamAITokenizer.train(documents, root / "scratch" / "tokenizer.model", vocab_size=400,
                                         hard_vocab_limit=False, input_kind="documents")
    tokenizer.save_pretrained(root / "tok")
    other = VishwamAITokenizer.train(documents[:6], root / "scratch" / "other.model", vocab_size=380,
                                     hard_vocab_limit=False, input_kind="documents")
    other.save_pretrained(root / "other_tok")
    shutil.copytree(root / "tok", root / "truncated_tok")
    data = (root / "tok" / "tokenizer.model").read_bytes()
    (root / "truncated_tok" / "tokenizer.model").write_bytes(data[: len(data) // 3])
    # SentencePiece's own defaults: ids unk=0, bos=1, eos=2, no pad, and nmt_nfkc normalisation.
    (root / "wrong_ids_tok").mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(documents), model_prefix=str(root / "wrong_ids_tok" / "tokenizer"),
                                   vocab_size=400, hard_vocab_limit=False, byte_fallback=True)
    (root / "wrong_ids_tok" / "tokenizer.vocab").unlink()
    shutil.copytree(root / "tok", root / "bad_json_tok")
    (root / "bad_json_tok" / "tokenizer_config.json").write_text("{")

    # A finished tiny run through the real CLI: `--set tie_embeddings=true` must tie them.
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "train.py"), *_train_args(root, "run"), "--steps", "2",
         "--checkpoint-every", "1", "--set", "tie_embeddings=true"],
        cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((root / "runs" / "run" / "config.json").read_text())
    assert saved["model"]["tie_embeddings"] is True

    pipeline = VishwamAIPipeline.load(root / "runs" / "run")
    pipeline.save(root / "pipeline")
    shutil.copytree(root / "pipeline", root / "truncated_pipeline")
    weights = (root / "pipeline" / "model.safetensors").read_bytes()
    (root / "truncated_pipeline" / "model.safetensors").write_bytes(weights[:6])
    _safetensors_variants(root, pipeline)
    # A run whose latest checkpoint lost the tail of its biggest file.
    shutil.copytree(root / "runs" / "run", root / "runs" / "truncated_run")
    latest = root / "runs" / "truncated_run" / "checkpoints" / "2"
    biggest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    (root / "runs" / "truncated_run" / "pipeline").rename(root / "truncated_run_pipeline")
    # HF directories: one with a broken config.json, one with a truncated weights file.
    (root / "hf_bad_config").mkdir()
    (root / "hf_bad_config" / "config.json").write_text("{ not json")
    (root / "hf_truncated").mkdir()
    (root / "hf_truncated" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 400, "hidden_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}))
    (root / "hf_truncated" / "model.safetensors").write_bytes(weights[:6])
    (root / "existing_target").mkdir()
    (root / "existing_target" / "keep.txt").write_text("the user's file")
    shutil.rmtree(root / "scratch")
    return root


def _tiny() -> dict[str, Any]:
    from vishwam.config import PRESETS

    return dict(PRESETS["tiny"])


def _train_args(root: Path, name: str) -> list[str]:
    return ["--preset", "tiny", "--tokenizer", str(root / "tok"), "--data", str(root / "corpus.jsonl"),
            "--batch", "2", "--seq-len", "16", "--eval-every", "0", "--eval-batches", "1", "--no-progress",
            "--val-fraction", "0.2", "--runs", str(root / "runs"), "--name", name]


def _safetensors_variants(root: Path, pipeline: VishwamAIPipeline) -> None:
    """vishwam weight files with a truncated header, a wrong dtype, a missing and an extra tensor."""
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(root / "pipeline" / "model.safetensors"))
    first = sorted(arrays)[0]
    (root / "weights").mkdir()
    (root / "weights" / "truncated_header.safetensors").write_bytes(
        (root / "pipeline" / "model.safetensors").read_bytes()[:20])
    save_file({**arrays, first: arrays[first].astype(np.float16)}, str(root / "weights" / "wrong_dtype.safetensors"))
    save_file({k: v for k, v in arrays.items() if k != first}, str(root / "weights" / "missing.safetensors"))
    save_file({**arrays, "extra_tensor": np.zeros(3, np.float32)}, str(root / "weights" / "extra.safetensors"))
    (root / "weights" / "config.json").write_text(pipeline.config.to_json())
    for name in ("missing", "wrong_dtype"):
        folder = root / f"vishwam_{name}"
        folder.mkdir()
        shutil.copy(root / "weights" / "config.json", folder / "config.json")
        shutil.copy(root / "weights" / f"{name}.safetensors", folder / "model.safetensors")


# ------------------------------------------------------------------------------ library rows
class Row(NamedTuple):
    id: str
    call: Callable[[Path], Any]
    expected: type[BaseException]
    words: tuple[str, ...]


def _tiny_config(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny", **changes)


def _trainer_with_mesh(root: Path, mesh: dict[str, int]) -> VishwamAITrainer:
    tokenizer = VishwamAITokenizer.from_pretrained(root / "tok")
    model = VishwamAI(_tiny_config(vocab_size=tokenizer.vocab_size), key=jax.random.key(0))
    return VishwamAITrainer(VishwamAIPipeline(model, tokenizer), TrainConfig(batch_size=8, seq_len=16), [],
                            run=RunConfig(run_dir=str(root / "runs" / "never"), mesh=mesh))


def _restore_into_other_config(root: Path):
    import equinox as eqx

    from vishwam.train.step import init_train_state

    saved = json.loads((root / "runs" / "run" / "config.json").read_text())
    config = ModelConfig.from_dict({**saved["model"], "num_layers": 1})
    target = eqx.filter_eval_shape(
        lambda: init_train_state(VishwamAI(config, key=jax.random.key(0)), TrainConfig.from_dict(saved["train"]),
                                 key=jax.random.key(0)))
    with Checkpointer(root / "runs" / "run" / "checkpoints", keep=None, async_save=False) as ckpt:
        ckpt.restore(None, partition_arrays(target)[0])


def _compare_with_other_tokenizer(root: Path):
    saved = json.loads((root / "runs" / "run" / "config.json").read_text())
    other = VishwamAITokenizer.from_pretrained(root / "other_tok")
    current = {"model": saved["model"], "train": saved["train"], "tokenizer": other.fingerprint, "teacher": None}
    with Checkpointer(root / "runs" / "run" / "checkpoints", keep=None, async_save=False) as ckpt:
        check_compatible(ckpt.read_meta().get("config"), current)


def _restore_truncated(root: Path):
    from vishwam.train.trainer import load_run_state

    load_run_state(root / "runs" / "truncated_run")


def _generate(root: Path, prompt: str = "the", **kwargs):
    pipeline = VishwamAIPipeline.load(root / "pipeline")
    return pipeline(prompt, **{"max_new_tokens": 2, **kwargs})


def _failed_directory(root: Path):
    with atomic_directory(root / "never_published") as staging:
        atomic_write_text(staging / "half.json", "{}")
        raise RuntimeError("the writer failed half-way")


def _overwrite_existing(root: Path):
    with atomic_directory(root / "existing_target") as staging:
        atomic_write_text(staging / "new.txt", "new")


NAN = float("nan")
LIBRARY_ROWS = [
    # configs: types
    Row("bool as string", lambda r: _tiny_config(tie_embeddings="False"), ValueError,
        ("ModelConfig.tie_embeddings", "'False'", "true or false")),
    Row("float as word", lambda r: _tiny_config(dropout="x"), ValueError, ("ModelConfig.dropout", "'x'", "number")),
    Row("float as string", lambda r: _tiny_config(capacity_factor="1.25"), ValueError,
        ("capacity_factor", "'1.25'", "capacity_factor=1.25")),
    Row("int as float", lambda r: _tiny_config(num_shared_experts=1.5), ValueError,
        ("num_shared_experts", "1.5", "integer")),
    Row("int as bool", lambda r: _tiny_config(num_kv_heads=True), ValueError, ("num_kv_heads", "True", "integer")),
    Row("int field as float", lambda r: _tiny_config(num_layers=2.0), ValueError, ("num_layers", "2.0")),
    Row("nan", lambda r: _tiny_config(norm_eps=NAN), ValueError, ("norm_eps", "finite")),
    Row("infinite theta", lambda r: _tiny_config(rope_theta=float("inf")), ValueError, ("rope_theta", "finite")),
    Row("choice", lambda r: _tiny_config(moe_dispatch="sparse"), ValueError, ("moe_dispatch", "'sparse'", "'dense'")),
    Row("choice type", lambda r: _tiny_config(norm_type=1), ValueError, ("norm_type", "string")),
    # configs: ranges and contradictions
    Row("zero width", lambda r: _tiny_config(hidden_size=0), ValueError, ("hidden_size", "positive")),
    Row("heads do not divide", lambda r: _tiny_config(num_heads=3, num_kv_heads=None), ValueError,
        ("hidden_size", "divisible", "num_heads=3")),
    Row("kv heads do not divide", lambda r: _tiny_config(num_kv_heads=3), ValueError, ("num_kv_heads", "divisor")),
    Row("top-k above experts", lambda r: _tiny_config(experts_per_token=5), ValueError,
        ("experts_per_token", "num_experts=4")),
    Row("dropout range", lambda r: _tiny_config(dropout=1.0), ValueError, ("dropout", "[0, 1)")),
    Row("odd head dim", lambda r: _tiny_config(head_dim=3), ValueError, ("head_dim", "even")),
    Row("dense prefix too long", lambda r: _tiny_config(first_dense_layers=3), ValueError,
        ("first_dense_layers", "num_layers=2")),
    Row("negative coefficient", lambda r: _tiny_config(router_aux_loss_coef=-1), ValueError,
        ("router_aux_loss_coef", ">= 0")),
    Row("accumulation", lambda r: TrainConfig(batch_size=8, accum_steps=3), ValueError,
        ("TrainConfig.accum_steps", "divisible")),
    Row("warm-up past the end", lambda r: TrainConfig(warmup_steps=100, total_steps=10), ValueError,
        ("warmup_steps", "total_steps=10")),
    Row("learning rate string", lambda r: TrainConfig(learning_rate="3e-4"), ValueError,
        ("TrainConfig.learning_rate", "'3e-4'")),
    Row("seed float", lambda r: TrainConfig(seed=1.0), ValueError, ("TrainConfig.seed", "integer")),
    Row("nan policy", lambda r: TrainConfig(nan_policy="ignore"), ValueError, ("nan_policy", "'ignore'", "'skip'")),
    # configs: unknown fields, JSON, --set parsing
    Row("unknown field", lambda r: ModelConfig.from_dict({**_tiny(), "hidden_siz": 3}), ValueError,
        ("'hidden_siz'", "did you mean 'hidden_size'")),
    Row("unknown train field", lambda r: TrainConfig.from_dict({"learning_rat": 1e-3}), ValueError,
        ("TrainConfig", "'learning_rate'")),
    Row("invalid JSON", lambda r: ModelConfig.from_json(r / "invalid.json"), ValueError,
        ("invalid.json", "not valid JSON")),
    Row("JSON not an object", lambda r: ModelConfig.from_dict([1, 2]), ValueError, ("JSON object",)),
    Row("missing config file", lambda r: ModelConfig.from_json(r / "nope.json"), FileNotFoundError, ("nope.json",)),
    Row("--set unknown", lambda r: ModelConfig.parse_override("tie_embedings=true"), ValueError,
        ("'tie_embedings'", "'tie_embeddings'")),
    Row("--set int", lambda r: ModelConfig.parse_override("num_layers=2.5"), ValueError,
        ("num_layers", "'2.5'", "integer")),
    Row("--set bool", lambda r: ModelConfig.parse_override("tie_embeddings=yes"), ValueError,
        ("tie_embeddings", "'yes'", "true or false")),
    Row("--set without =", lambda r: ModelConfig.parse_override("num_layers"), ValueError, ("FIELD=VALUE",)),
    Row("unknown preset", lambda r: ModelConfig.preset("huge"), ValueError, ("'huge'", "tiny")),
    # tokenizer files
    Row("tokenizer missing", lambda r: VishwamAITokenizer.from_pretrained(r / "nowhere"), FileNotFoundError,
        ("tokenizer.model", "not found")),
    Row("tokenizer truncated", lambda r: VishwamAITokenizer.from_pretrained(r / "truncated_tok"), ValueError,
        ("not a valid SentencePiece model",)),
    # SentencePiece's defaults: ids of its own (fine now: read from the model) but a lossy normaliser.
    Row("tokenizer lossy normaliser", lambda r: VishwamAITokenizer.from_pretrained(r / "wrong_ids_tok"),
        ValueError, ("normaliser changes text", "Re-train")),
    Row("tokenizer special id mismatch", lambda r: VishwamAITokenizer.from_pretrained(r / "tok", eos_token="[BOS]"),
        ValueError, ("eos_token='[BOS]' disagrees with the model", "eos_token='[EOS]'")),
    Row("tokenizer config JSON", lambda r: VishwamAITokenizer.from_pretrained(r / "bad_json_tok"), ValueError,
        ("tokenizer_config.json", "not valid JSON")),
    # data files
    Row("data missing", lambda r: as_source(r / "missing.txt").read(), FileNotFoundError, ("no files match",)),
    Row("data empty", lambda r: make_datasets(VishwamAITokenizer.from_pretrained(r / "tok"), r / "empty.txt",
                                              seq_len=8, batch_size=2), ValueError, ("no documents",)),
    Row("data wrong column", lambda r: as_source(r / "wrong_column.jsonl").read(), ValueError,
        ("no column 'text'", "'body'", "text_column")),
    Row("data non-UTF-8 table", lambda r: as_source(r / "latin1.jsonl").read(), ValueError, ("UTF-8",)),
    Row("data non-UTF-8 strict", lambda r: TextFiles(r / "latin1.txt", errors="strict").read(), ValueError,
        ("latin1.txt", "not valid utf-8")),
    Row("data directory", lambda r: as_source(r / "a_directory").read(), IsADirectoryError,
        ("is a directory", "glob")),
    Row("data DuckDB database", lambda r: as_source(r / "corpus.duckdb").read(), ValueError,
        ("DuckDB database", "COPY")),
    Row("data glob", lambda r: as_source(str(r / "nothing*.txt")).read(), FileNotFoundError,
        ("no files match", "nothing*.txt")),
    # safetensors
    Row("weights truncated header", lambda r: load_model_weights(
        r / "weights" / "truncated_header.safetensors", ModelConfig.from_json(r / "weights" / "config.json")),
        ValueError, ("truncated_header.safetensors", "not a readable safetensors")),
    Row("weights wrong dtype", lambda r: load_model_weights(
        r / "weights" / "wrong_dtype.safetensors", ModelConfig.from_json(r / "weights" / "config.json")),
        ValueError, ("different shape/dtype", "float16")),
    Row("weights missing tensor", lambda r: load_model_weights(
        r / "weights" / "missing.safetensors", ModelConfig.from_json(r / "weights" / "config.json")),
        ValueError, ("missing ['", "another config")),
    Row("weights extra tensor", lambda r: load_model_weights(
        r / "weights" / "extra.safetensors", ModelConfig.from_json(r / "weights" / "config.json")),
        ValueError, ("unexpected ['extra_tensor']",)),
    Row("pipeline incomplete", lambda r: VishwamAIPipeline.load(r / "weights"), FileNotFoundError,
        ("lacks", "pipeline.json")),
    Row("HF config JSON", lambda r: load_hf_checkpoint(r / "hf_bad_config"), ValueError, ("not valid JSON",)),
    Row("HF truncated weights", lambda r: load_hf_checkpoint(r / "hf_truncated"), ValueError,
        ("model.safetensors", "not a readable safetensors")),
    # checkpoints
    Row("checkpoint other config", _restore_into_other_config, CheckpointMismatchError,
        ("does not match", "different shape/dtype")),
    Row("checkpoint other tokenizer", _compare_with_other_tokenizer, IncompatibleConfigError,
        ("tokenizer: checkpoint=",)),
    Row("checkpoint truncated", _restore_truncated, CheckpointError, ("step 2", "truncated_run", "damaged")),
    # meshes
    Row("mesh too big", lambda r: _trainer_with_mesh(r, {"data": 16}), ValueError, ("needs 16 devices", "sees 8")),
    Row("mesh experts", lambda r: _trainer_with_mesh(r, {"data": 1, "expert": 3}), ValueError, ("expert",)),
    Row("mesh batch", lambda r: _trainer_with_mesh(r, {"data": 3}), ValueError, ("batch_size=8", "3")),
    # generation arguments
    Row("generate empty prompt", lambda r: _generate(r, ""), ValueError, ("prompt 0 is empty",)),
    Row("generate too long", lambda r: _generate(r, max_new_tokens=1000), ValueError, ("max_seq_len=128",)),
    Row("generate temperature", lambda r: _generate(r, temperature=-1.0), ValueError, ("temperature", ">= 0")),
    Row("generate top-p", lambda r: _generate(r, top_p=1.5), ValueError, ("top_p", "(0, 1]")),
    Row("generate top-k", lambda r: _generate(r, top_k=0), ValueError, ("top_k",)),
    # crash-safe writes
    Row("directory writer fails", _failed_directory, RuntimeError, ("half-way",)),
    Row("directory exists", _overwrite_existing, FileExistsError, ("existing_target", "overwrite")),
]


@pytest.mark.parametrize("row", LIBRARY_ROWS, ids=[r.id for r in LIBRARY_ROWS])
def test_library_refuses_bad_input_clearly(ws, row):
    before = _snapshot(ws)
    with pytest.raises(row.expected) as info:
        row.call(ws)
    message = str(info.value)
    missing = [w for w in row.words if w.lower() not in message.lower()]
    assert not missing, f"{row.id}: {missing} not in {message!r}"
    assert _changes(before, _snapshot(ws)) == []


def test_set_parses_with_the_field_type():
    assert ModelConfig.parse_override("tie_embeddings=False") == ("tie_embeddings", False)
    assert ModelConfig.parse_override("num_kv_heads=none") == ("num_kv_heads", None)
    assert ModelConfig.parse_override("capacity_factor=2") == ("capacity_factor", 2.0)
    assert ModelConfig.parse_override("moe_dispatch=capacity") == ("moe_dispatch", "capacity")
    assert ModelConfig.parse_override('norm_type="layer"') == ("norm_type", "layer")
    assert _tiny_config(capacity_factor=2, dropout=0).capacity_factor == 2  # ints are numbers


# --------------------------------------------------------------------------------- CLI rows
class Cli(NamedTuple):
    id: str
    script: str
    argv: tuple[str, ...]
    code: int
    words: tuple[str, ...]


def _cli(id: str, script: str, argv: str, code: int, *words: str) -> Cli:
    return Cli(id, script, tuple(argv.split()), code, words)


TRAIN = "--preset tiny --tokenizer tok --data corpus.jsonl --batch 2 --seq-len 16 --steps 1 --no-progress --runs runs"
RUN = "runs/run"
RESUME = f"{TRAIN} --steps 2 --checkpoint-every 1 --set tie_embeddings=true --max-steps 3"  # the fixture run's
CLI_ROWS = [
    # configs and flags
    _cli("set unknown", "train.py", f"{TRAIN} --name c1 --set tie_embedings=false", 2,
         "'tie_embedings'", "did you mean 'tie_embeddings'"),
    _cli("set value", "train.py", f"{TRAIN} --name c2 --set dropout=x", 2, "ModelConfig.dropout", "'x'"),
    _cli("set syntax", "train.py", f"{TRAIN} --name c3 --set num_layers", 2, "FIELD=VALUE"),
    _cli("set contradiction", "train.py", f"{TRAIN} --name c4 --set num_kv_heads=3", 2, "num_kv_heads", "divisor"),
    _cli("config missing", "train.py", "--config missing.json --runs runs --name c5", 2, "missing.json",
         "no such file"),
    _cli("config invalid", "train.py", "--config invalid.json --runs runs --name c6", 2, "not valid JSON"),
    _cli("config type", "train.py", "--config string_factor.json --tokenizer tok --runs runs --name c7", 2,
         "capacity_factor", "'1.25'"),
    _cli("preset", "train.py", "--preset huge --runs runs --name c8", 2, "'huge'", "tiny"),
    _cli("val fraction", "train.py", f"{TRAIN} --name c9 --val-fraction 2", 2, "--val-fraction"),
    _cli("seq len", "train.py", f"{TRAIN} --name c10 --seq-len 500", 2, "--seq-len 500", "max_seq_len=128"),
    _cli("steps", "train.py", f"{TRAIN} --name c11 --steps 0", 2, "--steps 0", "positive"),
    _cli("keep", "train.py", f"{TRAIN} --name c12 --keep 0", 2, "--keep 0"),
    _cli("int flag", "train.py", f"{TRAIN} --name c13 --batch two", 2, "invalid int value"),
    _cli("choice flag", "train.py", f"{TRAIN} --name c14 --nan-policy ignore", 2, "invalid choice"),
    _cli("accumulation", "train.py", f"{TRAIN} --name c15 --accum 3", 2, "accum_steps", "divisible"),
    _cli("warm-up", "train.py", f"{TRAIN} --name c16 --warmup 5", 2, "warmup_steps", "total_steps=1"),
    _cli("resume nothing", "train.py", f"{TRAIN} --name c17 --resume", 2, "--resume", "no checkpoints"),
    _cli("teacher missing", "train.py", f"{TRAIN} --name c18 --teacher nowhere", 2, "--teacher nowhere"),
    _cli("vocab mismatch", "train.py", f"{TRAIN} --name c19 --set vocab_size=999", 2, "vocab_size=999",
         "--vocab-size"),
    # meshes
    _cli("mesh syntax", "train.py", f"{TRAIN} --name c20 --mesh data", 2, "AXIS=SIZE"),
    _cli("mesh size", "train.py", f"{TRAIN} --name c21 --mesh data=16", 2, "needs 16 devices", "sees 1"),
    # data files
    _cli("data missing", "train.py", f"{TRAIN} --name c22 --data missing.txt", 2, "no files match"),
    _cli("data empty", "train.py", "--preset tiny --data empty.txt --steps 1 --runs runs --name c23", 2,
         "empty.txt", "no text"),
    _cli("data column", "train.py", f"{TRAIN} --name c24 --data wrong_column.jsonl", 2, "no column 'text'"),
    _cli("data non-UTF-8", "train.py", f"{TRAIN} --name c25 --data latin1.jsonl", 2, "UTF-8"),
    _cli("data directory", "train.py", f"{TRAIN} --name c26 --data a_directory", 2, "is a directory"),
    _cli("data DuckDB", "train.py", f"{TRAIN} --name c27 --data corpus.duckdb", 2, "DuckDB database"),
    _cli("data glob", "train.py", f"{TRAIN} --name c28 --data nothing*.txt", 2, "no files match"),
    # tokenizer files
    _cli("tokenizer missing", "train.py", f"{TRAIN} --name c29 --tokenizer nowhere", 2, "--tokenizer nowhere"),
    _cli("tokenizer truncated", "train.py", f"{TRAIN} --name c30 --tokenizer truncated_tok", 2,
         "not a valid SentencePiece model"),
    _cli("tokenizer lossy", "train.py", f"{TRAIN} --name c31 --tokenizer wrong_ids_tok", 2,
         "normaliser changes text"),
    # checkpoints: the finished run again with another optimiser, another tokenizer, a damaged checkpoint
    _cli("checkpoint other config", "train.py", f"{RESUME} --name run --lr 0.5", 2,
         "train.learning_rate", "now=0.5"),
    _cli("checkpoint other tokenizer", "train.py", f"{RESUME} --name run --tokenizer other_tok", 2,
         "tokenizer: checkpoint="),
    _cli("checkpoint truncated", "train.py", f"{RESUME} --name truncated_run", 2,
         "truncated_run", "damaged"),
    # generation
    _cli("generate nothing", "generate.py", "nowhere hello", 2, "nowhere", "no such directory"),
    _cli("generate not a run", "generate.py", "a_directory hello", 2, "neither a pipeline"),
    _cli("generate tokens", "generate.py", f"{RUN} hello --max-new-tokens 0", 2, "--max-new-tokens 0"),
    _cli("generate temperature", "generate.py", f"{RUN} hello --temperature -1", 2, "--temperature"),
    _cli("generate top-p", "generate.py", f"{RUN} hello --top-p 1.5", 2, "--top-p 1.5"),
    _cli("generate top-k", "generate.py", f"{RUN} hello --top-k 0", 2, "--top-k 0"),
    _cli("generate step", "generate.py", f"{RUN} hello --step 99", 2, "no checkpoint for step 99"),
    _cli("generate long", "generate.py", f"{RUN} hello --max-new-tokens 500", 2, "max_seq_len=128"),
    _cli("generate weights", "generate.py", "truncated_pipeline hello", 2, "not a readable safetensors"),
    _cli("generate checkpoint", "generate.py", "runs/truncated_run hello", 2, "truncated_run", "damaged"),
    # conversion
    _cli("convert missing", "convert_hf.py", "to-vishwam nowhere out_c1", 2, "nowhere", "not a directory"),
    _cli("convert config", "convert_hf.py", "to-vishwam hf_bad_config out_c2", 2, "not valid JSON"),
    _cli("convert weights", "convert_hf.py", "to-vishwam hf_truncated out_c3", 2, "not a readable safetensors"),
    _cli("convert exists", "convert_hf.py", "to-vishwam hf_truncated existing_target", 2, "already exists",
         "--overwrite"),
    _cli("convert missing tensor", "convert_hf.py", "to-hf vishwam_missing out_c5", 2, "missing ['"),
    # fails inside the staging directory: the existing target must survive --overwrite
    _cli("convert overwrite fails", "convert_hf.py", "to-hf pipeline existing_target --overwrite --max-shard-size 0",
         2, "max_shard_size"),
    _cli("convert shard size", "convert_hf.py", "to-hf pipeline out_c6 --max-shard-size lots", 2,
         "max_shard_size", "'lots'"),
    _cli("convert not vishwam", "convert_hf.py", "to-hf a_directory out_c7", 2, "lacks"),
    # tokenizer training, reports, distillation
    _cli("tokenizer input", "train_tokenizer.py", "--input missing.txt --output out_t1", 2, "missing.txt"),
    _cli("tokenizer vocab", "train_tokenizer.py", "--input corpus.txt --vocab-size 0 --output out_t2", 2,
         "--vocab-size 0"),
    _cli("tokenizer too big", "train_tokenizer.py", "--input corpus.txt --vocab-size 100000 --output out_t3", 2,
         "--soft-vocab-limit"),
    _cli("tokenizer output file", "train_tokenizer.py", "--input corpus.txt --output corpus.txt", 2, "is a file"),
    _cli("report missing", "report.py", "nowhere", 2, "nowhere"),
    _cli("report run id", "report.py", f"{RUN} --run nope --no-plot", 2, "no run 'nope'"),
    _cli("distill teacher", "distill.py", "--teacher nowhere", 2, "not found"),
    _cli("distill scale", "distill.py", f"--teacher {RUN} --scale 2", 2, "--scale 2"),
    _cli("plan mesh", "plan.py", "--topology v5p:2x2x1 --mesh fsdp", 2, "AXIS=SIZE"),
    _cli("plan config", "plan.py", "--topology v5p:2x2x1 --config invalid.json", 2, "not valid JSON"),
]

# Runs each (script, argv) as `__main__` in this process, in the workspace, and reports the exit
# code, the output and the workspace entries each command added, removed or changed.
DRIVER = textwrap.dedent("""
    import contextlib, io, json, os, runpy, sys, traceback
    from pathlib import Path

    cases, scripts, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

    def snapshot(root):
        found = {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            stat = path.lstat()
            found[str(rel)] = (path.is_dir(), 0 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
        return found

    results = []
    root = Path.cwd()
    for script, argv in cases:
        before = snapshot(root)
        stdout, stderr = io.StringIO(), io.StringIO()
        sys.argv = [str(scripts / script), *argv]
        code, uncaught = 0, None
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(str(scripts / script), run_name="__main__")
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                code, uncaught = None, traceback.format_exc()
        after = snapshot(root)
        changes = ([f"+{k}" for k in sorted(set(after) - set(before))]
                   + [f"-{k}" for k in sorted(set(before) - set(after))]
                   + [f"~{k}" for k in sorted(set(before) & set(after)) if before[k] != after[k] and not before[k][0]])
        results.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                        "uncaught": uncaught, "changes": changes})
    out.write_text(json.dumps(results))
""")


@pytest.fixture(scope="module")
def cli_results(ws) -> dict[str, dict]:
    out = ws.parent / "cli_results.json"
    cases = [[row.script, list(row.argv)] for row in CLI_ROWS]
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases), str(SCRIPTS), str(out)],
                            cwd=ws, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(zip([row.id for row in CLI_ROWS], json.loads(out.read_text()), strict=True))


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r.id for r in CLI_ROWS])
def test_scripts_refuse_bad_input_with_one_error_line(cli_results, row):
    got = cli_results[row.id]
    assert got["uncaught"] is None, got["uncaught"]
    err = got["stderr"]
    assert got["code"] == row.code, (row.code, got["code"], err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    # `error: ...` from vishwam.cli; argparse's own usage errors end `<script>: error: ...`.
    errors = [line for line in err.splitlines() if line.startswith("error: ") or ".py: error: " in line]
    assert errors, err[-2000:]
    missing = [w for w in row.words if w.lower() not in err.lower()]
    assert not missing, f"{missing} not in {err!r}"
    assert got["changes"] == [], got["changes"]  # nothing written, nothing half-written, nothing deleted


def test_overwrite_keeps_the_old_target_until_the_new_one_is_complete(ws, cli_results):
    assert (ws / "existing_target" / "keep.txt").read_text() == "the user's file"
    assert not [p for p in ws.iterdir() if ".tmp-" in p.name]


def test_exit_status_and_debug_as_the_shell_sees_them(ws):
    command = [sys.executable, str(SCRIPTS / "train.py"), "--config", "missing.json", "--runs", "runs"]
    plain = subprocess.run(command, cwd=ws, env=_env(), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr[-2000:]
    assert plain.stderr.splitlines()[0] == "error: --config missing.json: no such file."
    debug = subprocess.run(command + ["--debug"], cwd=ws, env=_env(), capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


# ------------------------------------------------------------------------ property: configs
_FIELDS = {
    "vocab_size": st.sampled_from([32, 0, 33.0]),
    "hidden_size": st.sampled_from([16, 24, 0, -8, 16.0]),
    "num_layers": st.sampled_from([1, 2, 0, True]),
    "num_heads": st.sampled_from([1, 2, 4, 3, 0]),
    "num_kv_heads": st.sampled_from([None, 1, 2, 3, 0, True, 1.5]),
    "head_dim": st.sampled_from([None, 4, 3, 8, -2]),
    "ffn_dim": st.sampled_from([8, 16, 0]),
    "num_experts": st.sampled_from([1, 2, 4, 0]),
    "experts_per_token": st.sampled_from([1, 2, 3]),
    "first_dense_layers": st.sampled_from([0, 1, 3, -1]),
    "moe_every": st.sampled_from([1, 2, 0]),
    "capacity_factor": st.sampled_from([None, 1.0, 2, 0.0, "1.25", float("nan")]),
    "moe_dispatch": st.sampled_from(["dense", "capacity", "ragged", "sparse"]),
    "router_type": st.sampled_from(["softmax", "sigmoid", "tanh"]),
    "router_renormalize": st.sampled_from([True, False, "False", 0]),
    "num_shared_experts": st.sampled_from([0, 1, 1.5, -1]),
    "aux_free_bias": st.sampled_from([False, True, "yes"]),
    "norm_type": st.sampled_from(["rms", "layer", "batch", 1]),
    "norm_eps": st.sampled_from([1e-6, 0.0, -1.0, float("inf")]),
    "max_seq_len": st.sampled_from([8, 16, 0]),
    "dropout": st.sampled_from([0.0, 0.1, 1.0, "0.1"]),
    "tie_embeddings": st.sampled_from([False, True, "False", None]),
    "attention_impl": st.sampled_from(["xla", "reference", "auto", "flash"]),
    "attention_block_size": st.sampled_from([4, 8, 0]),
    "scan_layers": st.sampled_from([True, False, 1]),
    "not_a_field": st.just(1),
}


@st.composite
def _config_dicts(draw) -> dict[str, Any]:
    names = draw(st.sets(st.sampled_from(sorted(_FIELDS)), max_size=8))
    base = {"vocab_size": 32, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 8, "num_experts": 2,
            "experts_per_token": 1, "max_seq_len": 8, "attention_block_size": 4, "attention_impl": "xla"}
    return {**base, **{name: draw(_FIELDS[name]) for name in names}}


def test_random_config_dicts_build_and_run_or_name_a_field():
    outcomes = {"built": 0, "refused": 0}

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=_config_dicts())
    def check(data):
        try:
            config = ModelConfig.from_dict(data)
        except ValueError as error:
            message = str(error)
            named = [name for name in data if f"'{name}'" in message or f"ModelConfig.{name}" in message]
            assert named, message
            outcomes["refused"] += 1
            return
        model = VishwamAI(config, key=jax.random.key(0))
        length = min(8, config.max_seq_len)
        tokens = (jnp.arange(length, dtype=jnp.int32) % config.vocab_size)[None]
        logits, _ = model(tokens)
        assert logits.shape == (1, length, config.vocab_size)
        assert bool(jnp.all(jnp.isfinite(logits)))
        outcomes["built"] += 1

    check()
    # Both branches were exercised (the draws are derandomised, so this is stable).
    assert outcomes["built"] >= 3 and outcomes["refused"] >= 3, outcomes


def test_run_script_tells_bad_input_from_system_errors_and_bugs(capsys):
    """Exit 2 for what validation refuses and for OS errors (a system one named as such); exit 1,
    "a bug", for any other exception, a plain ValueError from deep inside a dependency included."""
    import errno

    from vishwam.cli import run_script
    from vishwam.errors import InvalidValueError

    def failing(error):
        def main(argv):
            raise error
        return main

    cases = [(InvalidValueError("--steps 0: must be positive"), 2, "error: --steps 0: must be positive"),
             (FileNotFoundError("--config x.json: no such file."), 2, "error: --config x.json: no such file."),
             (OSError(errno.ENOSPC, "No space left on device"), 2, "error: OSError: [Errno 28] No space left"),
             (ValueError("operands could not be broadcast"), 1, "error: internal error: ValueError: operands"),
             (KeyError("oops"), 1, "error: internal error: KeyError")]
    for error, code, first_line in cases:
        assert run_script(failing(error), []) == code, error
        err = capsys.readouterr().err
        assert err.startswith(first_line), (error, err)
        assert ("this is a bug in vishwam" in err) == (code == 1)
