import importlib.util
import json
import re
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from vishwam import ModelConfig, VishwamAI
from vishwam.pipeline import VishwamAIPipeline, load_model_weights
from vishwam.tokenizer import VishwamAITokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the quick brown", "héllo wörld ✓", ""]
NEW = 10
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
    texts += ["héllo wörld ✓ ünïcode"] * 10
    return VishwamAITokenizer.train(texts, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=320)


@pytest.fixture(scope="module")
def pipeline(tokenizer):
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.1)
    return VishwamAIPipeline(VishwamAI(config, key=jax.random.key(0)), tokenizer, config, add_bos=True)


@pytest.fixture(scope="module")
def completions(pipeline):
    return pipeline(PROMPTS, NEW, **SAMPLING)


def test_completions_are_text_of_the_generated_tokens(pipeline, completions):
    assert len(completions) == len(PROMPTS) and all(isinstance(c, str) for c in completions)
    assert any(completions)  # a random model stops at EOS rarely; empty everywhere would mean nothing ran
    assert pipeline(PROMPTS, NEW, **SAMPLING) == completions
    assert pipeline(PROMPTS, NEW, **{**SAMPLING, "seed": 4}) != completions


def test_completion_keeps_the_space_folded_into_its_first_piece(pipeline):
    tokenizer = pipeline.tokenizer
    prompt, full = tokenizer.encode("the quick", add_bos=True), tokenizer.encode("the quick brown fox", add_bos=True)
    assert full[:len(prompt)] == prompt  # the split falls on a piece boundary
    assert tokenizer.decode(full[len(prompt):]) == "brown fox"  # alone, the leading space is lost
    assert pipeline._completion_text(prompt, full[len(prompt):] + [tokenizer.eos_id]) == " brown fox"


def test_save_load_gives_same_weights_and_completions(pipeline, completions, tmp_path):
    directory = pipeline.save(tmp_path / "pipe")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "pipeline.json",
                                                           "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    loaded = VishwamAIPipeline.load(directory)
    assert loaded.config == pipeline.config and loaded.add_bos
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(pipeline.model, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(loaded.model, eqx.is_array)), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert loaded(PROMPTS, NEW, **SAMPLING) == completions
    with pytest.raises(FileExistsError, match="already exists"):
        pipeline.save(directory)
    assert pipeline.save(directory, overwrite=True) == directory


def test_callback_streams_the_same_completions(pipeline, completions):
    events = []
    streamed = pipeline(PROMPTS, NEW, **SAMPLING, callback=lambda row, token, text: events.append((row, token, text)))
    assert streamed == completions
    eos = pipeline.tokenizer.eos_id
    for row, completion in enumerate(completions):
        tokens = [token for r, token, _ in events if r == row]
        assert 1 <= len(tokens) <= NEW and eos not in tokens[:-1]
        prompt = pipeline.tokenizer.encode(PROMPTS[row], add_bos=True)
        assert pipeline.tokenizer.decode(prompt + tokens) == PROMPTS[row] + completion
        assert "".join(text for r, _, text in events if r == row) == completion


def test_vocab_mismatch_is_an_error_at_construction(tokenizer):
    model = VishwamAI(ModelConfig.preset("tiny"), key=jax.random.key(0))
    with pytest.raises(ValueError, match="tokenizer has vocab_size=320 but the model has vocab_size=256"):
        VishwamAIPipeline(model, tokenizer)
    with pytest.raises(ValueError, match="differs from model.config"):
        VishwamAIPipeline(model, tokenizer, ModelConfig.preset("tiny", vocab_size=320))


def test_bad_prompts(pipeline):
    no_bos = VishwamAIPipeline(pipeline.model, pipeline.tokenizer, add_bos=False)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        no_bos(["x", ""], 4, temperature=0.0)
    long_text = "the quick brown fox " * 40
    n = len(pipeline.tokenizer.encode(long_text, add_bos=True))
    with pytest.raises(ValueError, match=f"prompt 0 has {n} tokens; \\+ max_new_tokens 4 = {n + 4} exceeds "
                                         "the model's max_seq_len=128"):
        pipeline([long_text], 4)
    with pytest.raises(ValueError, match="give `seed` or `key`, not both"):
        pipeline("x", 4, seed=1, key=jax.random.key(1))


def test_load_rejects_incomplete_or_mismatched_directories(pipeline, tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks"):
        VishwamAIPipeline.load(tmp_path)
    directory = pipeline.save(tmp_path / "pipe")
    other = ModelConfig.preset("tiny", vocab_size=320, ffn_dim=48)
    with pytest.raises(ValueError, match="does not fit the config") as err:
        load_model_weights(directory / "model.safetensors", other)
    assert ".mlp.experts.gate: file float32[2, 4, 32, 64], config float32[2, 4, 32, 48]" in str(err.value)
    settings = json.loads((directory / "pipeline.json").read_text())
    (directory / "pipeline.json").write_text(json.dumps({**settings, "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        VishwamAIPipeline.load(directory)


def _generate_script():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_script_loads_run_checkpoints_and_exported_pipelines(pipeline, tmp_path, capsys):
    from vishwam.config import TrainConfig
    from vishwam.train.checkpoint import Checkpointer, partition_arrays
    from vishwam.train.step import init_train_state

    script = _generate_script()
    run = tmp_path / "run"
    # A run directory as the trainer leaves it: config.json, tokenizer/, checkpoints/ (no pipeline/ yet).
    state = init_train_state(pipeline.model, TrainConfig(), key=jax.random.key(1))
    with Checkpointer(run / "checkpoints", async_save=False) as manager:
        manager.save(7, partition_arrays(state)[0], {"step": 7})
    (run / "config.json").write_text(json.dumps({"model": pipeline.config.to_dict(), "train": TrainConfig().to_dict()}))
    pipeline.tokenizer.save_pretrained(run / "tokenizer")

    def same_weights(loaded):
        return all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(eqx.filter(pipeline.model, eqx.is_array)),
            jax.tree_util.tree_leaves(eqx.filter(loaded.model, eqx.is_array)), strict=True))

    from_checkpoint = script.load_pipeline(run)
    assert same_weights(from_checkpoint) and not from_checkpoint.add_bos  # the tokenizer's own setting
    # Once the run exports pipeline/, that is what loads (the checkpoint stays reachable with step=).
    pipeline.save(run / "pipeline")
    assert VishwamAIPipeline.load(run).add_bos and script.load_pipeline(run).add_bos
    assert same_weights(script.load_pipeline(run, step=7)) and not script.load_pipeline(run, step=7).add_bos
    with pytest.raises(FileNotFoundError, match="No checkpoint for step 8"):
        script.load_pipeline(run, step=8)

    expected = pipeline(["the quick brown"], NEW, **SAMPLING)[0]
    assert script.main([str(run), "the quick brown", "--max-new-tokens", str(NEW), "--temperature", "0.8",
                        "--top-p", "0.95", "--seed", "3", "--no-stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "the quick brown" + expected + "\n"
    assert re.fullmatch(r"generated \d+ tokens in [\d.]+ s: .*first token after [\d.]+ s \(compiles included\)\n",
                        captured.err)
    assert script.main([str(run), "the quick brown", "--max-new-tokens", str(NEW), "--temperature", "0.8",
                        "--top-p", "0.95", "--seed", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "the quick brown" + expected + "\n" and captured.err == ""


def test_model_dirs_reads_a_weights_pair_and_refuses_what_it_cannot(pipeline, tmp_path):
    """`load_model_dir` beyond pipelines and runs (those are above): a config.json +
    model.safetensors pair is a model without a tokenizer, which `vishwam-generate` refuses
    by name; a step outside a run and an unknown directory are refused in one line each."""
    import shutil

    from vishwam.errors import InvalidValueError
    from vishwam.model_dirs import load_model_dir

    pipeline.save(tmp_path / "saved")
    model, loaded = load_model_dir(tmp_path / "saved")
    assert loaded is not None and loaded.model is model
    pair = tmp_path / "pair"
    pair.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "saved" / name, pair / name)
    model, loaded = load_model_dir(pair)
    assert loaded is None and model.config == pipeline.config
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(eqx.filter(pipeline.model, eqx.is_array)),
        jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)), strict=True))
    with pytest.raises(InvalidValueError, match="holds a model but no tokenizer"):
        _generate_script().load_pipeline(pair)
    with pytest.raises(InvalidValueError, match="step 3: .* is not a training run directory"):
        load_model_dir(tmp_path / "saved", step=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidValueError, match="is neither a pipeline directory .* nor a config.json"):
        load_model_dir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model_dir(tmp_path / "missing")
