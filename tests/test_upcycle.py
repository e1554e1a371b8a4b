"""Upcycling (`vishwam.upcycle`, `vishwam-upcycle`, `vishwam-train --init-from`): the MoE computes
the dense model's function at initialisation, from a vishwam model and from transformers' own
Llama / Qwen2 / Mistral checkpoints; perturbations do what they say; the command's output trains."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vishwam
from vishwam import ModelConfig, VishwamAI
from vishwam.commands import train as train_command
from vishwam.commands import upcycle as upcycle_command
from vishwam.data import default_corpus
from vishwam.errors import InvalidValueError
from vishwam.hf import load_hf_checkpoint
from vishwam.pipeline import VishwamAIPipeline
from vishwam.tokenizer import VishwamAITokenizer
from vishwam.train import load_metrics
from vishwam.upcycling import load_dense, upcycle, upcycle_config, upcycle_model

DENSE = ModelConfig.preset("tiny", num_experts=1, experts_per_token=1)
TOKENS = jax.random.randint(jax.random.key(1), (2, 24), 0, DENSE.vocab_size)
logits = eqx.filter_jit(lambda model, tokens, key: model(tokens, key=key)[0])


@pytest.fixture(scope="module")
def dense():
    return VishwamAI(DENSE, key=jax.random.key(0))


@pytest.fixture(scope="module")
def dense_logits(dense):
    return np.asarray(logits(dense, TOKENS, None))


def _layer_mlps(model: VishwamAI) -> list:
    from vishwam.nn.stack import unstack_layers

    return [block.mlp for block in unstack_layers(model.stages)]


@pytest.mark.parametrize("settings", [
    {},                                                   # every layer MoE, 4 experts top-2
    {"experts_per_token": 3, "moe_every": 2, "aux_free_bias": True},  # layer 1 only, selection bias
    {"first_dense_layers": 1, "num_experts": 3},
])
def test_upcycled_model_computes_the_dense_function(dense, dense_logits, settings):
    settings = {"num_experts": 4, "experts_per_token": 2, **settings}
    moe = upcycle(dense, **settings, key=jax.random.key(7))
    config = moe.config
    assert (config.num_experts, config.experts_per_token) == (settings["num_experts"], settings["experts_per_token"])
    assert (config.router_renormalize, config.routed_scaling_factor, config.num_shared_experts) == (True, 1.0, 0)
    assert config.capacity_factor is None
    for n, (before, after) in enumerate(zip(_layer_mlps(dense), _layer_mlps(moe), strict=True)):
        if not config.layer_is_moe(n):
            assert eqx.tree_equal(before, after)
            continue
        for name, proj in (("gate", before.gate_proj), ("up", before.up_proj), ("down", before.down_proj)):
            copies = np.asarray(getattr(after.experts, name))
            assert copies.shape[0] == config.num_experts
            np.testing.assert_array_equal(copies, np.broadcast_to(np.asarray(proj.weight), copies.shape))
    # Inference and training (dropout off, dropless dispatch, router jitter off) alike.
    np.testing.assert_allclose(logits(moe, TOKENS, None), dense_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits(moe, TOKENS, jax.random.key(3)), dense_logits, rtol=1e-5, atol=1e-5)
    # Attention, norms, embeddings and head are the dense model's.
    assert np.array_equal(moe.embed, dense.embed) and eqx.tree_equal(moe.final_norm, dense.final_norm)


def test_perturbed_copies(dense, dense_logits):
    mlp = _layer_mlps(dense)[0]
    weight = np.asarray(mlp.gate_proj.weight)  # [hidden, ffn]
    noisy = upcycle(dense, 4, 2, noise=0.1, key=jax.random.key(2))
    gate = np.asarray(_layer_mlps(noisy)[0].experts.gate)
    relative = np.std(gate - weight, axis=(1, 2)) / np.std(weight)
    assert np.all(np.abs(relative - 0.1) < 0.02), relative  # each expert its own noise of 0.1 std
    assert not np.allclose(gate[0], gate[1])

    dropped = upcycle(dense, 4, 2, reinit_fraction=0.25, key=jax.random.key(2))
    experts = _layer_mlps(dropped)[0].experts
    gate, up, down = (np.asarray(getattr(experts, n)) for n in ("gate", "up", "down"))
    changed = np.any(gate != weight, axis=1)  # [experts, ffn]: the neurons re-drawn
    assert np.all(changed.sum(axis=1) == round(0.25 * weight.shape[1]))
    assert len({tuple(row) for row in changed}) == 4  # a different subset per expert
    # The same neurons are re-drawn in up (columns) and down (rows); the rest is an exact copy.
    np.testing.assert_array_equal(np.any(up != np.asarray(mlp.up_proj.weight), axis=1), changed)
    np.testing.assert_array_equal(np.any(down != np.asarray(mlp.down_proj.weight), axis=2), changed)
    for result in (noisy, dropped):
        assert np.max(np.abs(np.asarray(logits(result, TOKENS, None)) - dense_logits)) > 1e-4


def test_refusals(dense):
    with pytest.raises(InvalidValueError, match="already a MoE"):
        upcycle(VishwamAI(ModelConfig.preset("tiny"), key=jax.random.key(0)), 4, 2)
    with pytest.raises(InvalidValueError, match="num_experts must be an integer >= 2"):
        upcycle(dense, 1, 1)
    with pytest.raises(InvalidValueError, match="experts_per_token"):
        upcycle(dense, 4, 5)
    with pytest.raises(InvalidValueError, match="reinit_fraction"):
        upcycle(dense, 4, 2, reinit_fraction=1.5)
    with pytest.raises(InvalidValueError, match="differs from upcycle_config"):
        upcycle_model(dense, upcycle_config(DENSE, 4, 2).replace(router_renormalize=False), key=jax.random.key(0))
    assert vishwam.upcycle is upcycle


# ------------------------------------------------------------------ transformers checkpoints
HF_FAMILIES = {"llama": ("LlamaConfig", {}), "qwen2": ("Qwen2Config", {}),
               "mistral": ("MistralConfig", {"sliding_window": 8})}


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_upcycled_hf_checkpoint_computes_transformers_dense_function(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_class, fields = HF_FAMILIES[family]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_class)(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **fields)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():  # weights far from init, so that every MLP matters
        for p in hf_model.parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    hf_model.save_pretrained(tmp_path)
    tokens = np.asarray(TOKENS) % 64
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()

    moe = upcycle(tmp_path, 4, 2)  # no tokenizer files: the model
    assert isinstance(moe, VishwamAI) and moe.config.num_moe_layers == 2
    dense, _ = load_hf_checkpoint(tmp_path)
    got = np.asarray(logits(moe, jnp.asarray(tokens), None))
    np.testing.assert_allclose(got, np.asarray(logits(dense, jnp.asarray(tokens), None)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # the import's own agreement


# ------------------------------------------------------------------ the command and --init-from
@pytest.fixture(scope="module")
def dense_pipeline_dir(tmp_path_factory):
    """A dense tiny pipeline (its vocabulary the tokenizer's ~400 pieces) and a corpus."""
    root = tmp_path_factory.mktemp("upcycle")
    documents = default_corpus()[:16]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
    tokenizer = VishwamAITokenizer.train(documents, root / "scratch" / "tokenizer.model", vocab_size=400,
                                         hard_vocab_limit=False, input_kind="documents")
    model = VishwamAI(DENSE.replace(vocab_size=tokenizer.vocab_size), key=jax.random.key(4))
    VishwamAIPipeline(model, tokenizer).save(root / "dense")
    return root


def test_command_writes_a_pipeline_that_train_continues(dense_pipeline_dir, capsys):
    root = dense_pipeline_dir
    dense = VishwamAIPipeline.load(root / "dense").model
    assert upcycle_command.main([str(root / "dense"), str(root / "moe"), "--experts", "4", "--verify"]) == 0
    err = capsys.readouterr().err
    assert "2 MoE layers of 4 experts (top-2)" in err and "vishwam-train --init-from" in err
    difference = float(err.split("on random tokens: ")[1].split()[0])
    assert difference < 1e-5
    pipeline = VishwamAIPipeline.load(root / "moe")
    assert pipeline.config == upcycle_config(dense.config, 4, 2)
    np.testing.assert_allclose(logits(pipeline.model, TOKENS, None), logits(dense, TOKENS, None), rtol=1e-5, atol=1e-5)

    # Both runs start from their weights: the same validation loss at step 0, the dense model's.
    common = ["--data", str(root / "corpus.jsonl"), "--val-fraction", "0.25", "--steps", "1", "--batch", "8",
              "--seq-len", "32", "--eval-every", "1", "--eval-batches", "1", "--no-progress", "--runs", str(root / "runs")]
    assert train_command.main(["--init-from", str(root / "moe"), "--name", "moe", *common]) == 0
    assert train_command.main(["--init-from", str(root / "dense"), "--name", "dense", *common]) == 0
    val = {name: load_metrics(root / "runs" / name / "metrics.duckdb", names=["val_loss"])["val_loss"]
           for name in ("moe", "dense")}
    assert val["moe"][0][0] == 0 and val["dense"][0][0] == 0
    np.testing.assert_allclose(val["moe"][1][0], val["dense"][1][0], rtol=1e-5)
    saved = json.loads((root / "runs" / "moe" / "config.json").read_text())
    assert saved["model"]["num_experts"] == 4 and saved["init_from"] == str((root / "moe").absolute())
    # The run resumes from its own checkpoint without --init-from.
    assert train_command.main(["--run-dir", str(root / "runs" / "moe"), "--max-steps", "2", "--no-progress"]) == 0
    assert load_metrics(root / "runs" / "moe" / "metrics.duckdb", names=["ce"])["ce"][0].tolist() == [1, 2]


def test_command_and_init_from_refusals(dense_pipeline_dir, tmp_path, capsys):
    root = dense_pipeline_dir
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    (weights_only / "config.json").write_text(DENSE.to_json())
    assert upcycle_command.main([str(weights_only), str(tmp_path / "out"), "--experts", "4"]) == 2
    assert "has no tokenizer; pass --tokenizer DIR" in capsys.readouterr().err
    assert upcycle_command.main([str(root / "dense"), str(tmp_path / "out"), "--experts", "4", "--top-k", "5"]) == 2
    assert "--top-k 5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert train_command.main(["--init-from", str(root / "dense"), "--set", "hidden_size=64", "--data",
                               str(root / "corpus.jsonl"), "--runs", str(tmp_path / "runs"), "--no-progress"]) == 2
    assert "the flags change the weights' shapes (fields ['hidden_size'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_load_dense_reads_what_upcycle_accepts(dense_pipeline_dir):
    model, pipeline = load_dense(dense_pipeline_dir / "dense")
    assert not model.config.is_moe and pipeline is not None and pipeline.model is model
    result = upcycle(pipeline, 2, 1)
    assert isinstance(result, VishwamAIPipeline) and result.tokenizer is pipeline.tokenizer
    with pytest.raises(FileNotFoundError):
        load_dense(dense_pipeline_dir / "missing")
    with pytest.raises(InvalidValueError, match="is neither a pipeline directory"):
        load_dense(dense_pipeline_dir / "scratch")
