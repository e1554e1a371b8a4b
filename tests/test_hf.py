"""HF interop: hand-built Llama/Mixtral checkpoints (written with safetensors.numpy)
against an independent numpy forward pass, exact round trips, sharded indexes,
both RoPE config forms, and every refusal. No torch or transformers needed, except by
the training-loss test against transformers, which skips without them."""

import importlib.util
import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from vishwam import ModelConfig, VishwamAI
from vishwam.hf import (
    config_from_hf,
    config_to_hf,
    is_hf_checkpoint,
    load_hf_checkpoint,
    load_hf_pipeline,
    load_hf_tokenizer,
    save_hf_checkpoint,
)
from vishwam.parallel.mesh import make_mesh
from vishwam.parallel.sharding import partition_spec, path_string

V, D, L, H, KV, F = 64, 32, 2, 4, 2, 48
LLAMA_HEAD_DIM = 16  # != D / H: q_proj is [64, 32], o_proj [32, 64]
E, TOP_K = 4, 2
PT = {"format": "pt"}

forward = eqx.filter_jit(lambda model, tokens: model(tokens)[0])


# ------------------------------------------------------------- hand-built checkpoints
def _llama_hf_config(**changes):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
            "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
            "head_dim": LLAMA_HEAD_DIM, "hidden_act": "silu", "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 5000.0, "rope_scaling": None, "tie_word_embeddings": False,
            "torch_dtype": "float32", **changes}


def _mixtral_hf_config(**changes):
    # transformers 5 style: `dtype`, `rope_parameters`, no head_dim.
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V, "hidden_size": D,
            "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
            "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 2000.0, "rope_type": "default"}, "num_local_experts": E,
            "num_experts_per_tok": TOP_K, "router_aux_loss_coef": 0.02, "sliding_window": None,
            "tie_word_embeddings": True, "dtype": "float32", **changes}


def _linear(rng, out, inp):
    return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)


def _norm(rng):
    return (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)


def _llama_tensors(seed=0, hd=LLAMA_HEAD_DIM, qkv_bias=False, tied=False):
    """A dense checkpoint's tensors: Llama, Mistral, or with `qkv_bias` Qwen2."""
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32),
         "model.norm.weight": _norm(rng), "lm_head.weight": _linear(rng, V, D)}
    for n in range(L):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": _norm(rng), p + "post_attention_layernorm.weight": _norm(rng),
                  p + "self_attn.q_proj.weight": _linear(rng, H * hd, D),
                  p + "self_attn.k_proj.weight": _linear(rng, KV * hd, D),
                  p + "self_attn.v_proj.weight": _linear(rng, KV * hd, D),
                  p + "self_attn.o_proj.weight": _linear(rng, D, H * hd),
                  p + "mlp.gate_proj.weight": _linear(rng, F, D), p + "mlp.up_proj.weight": _linear(rng, F, D),
                  p + "mlp.down_proj.weight": _linear(rng, D, F)})
        if qkv_bias:
            for name, out in (("q", H * hd), ("k", KV * hd), ("v", KV * hd)):
                t[f"{p}self_attn.{name}_proj.bias"] = rng.standard_normal(out).astype(np.float32)
    if tied:
        del t["lm_head.weight"]
    return t


def _qwen2_hf_config(**changes):
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": V, "hidden_size": D,
            "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
            "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 3000.0,
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21,
            "tie_word_embeddings": True, "torch_dtype": "float32", **changes}


MISTRAL_WINDOW = 5  # < len(TOKENS[0]) = 12: the window hides keys


def _mistral_hf_config(**changes):
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": V, "hidden_size": D,
            "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
            "head_dim": LLAMA_HEAD_DIM, "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 1e4, "sliding_window": MISTRAL_WINDOW, "tie_word_embeddings": False,
            "torch_dtype": "float32", **changes}


def _mixtral_tensors(seed=1):
    rng = np.random.default_rng(seed)
    hd = D // H
    t = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32), "model.norm.weight": _norm(rng)}
    for n in range(L):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": _norm(rng), p + "post_attention_layernorm.weight": _norm(rng),
                  p + "self_attn.q_proj.weight": _linear(rng, H * hd, D),
                  p + "self_attn.k_proj.weight": _linear(rng, KV * hd, D),
                  p + "self_attn.v_proj.weight": _linear(rng, KV * hd, D),
                  p + "self_attn.o_proj.weight": _linear(rng, D, H * hd),
                  p + "block_sparse_moe.gate.weight": 3 * _linear(rng, E, D)})
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": _linear(rng, F, D), q + "w3.weight": _linear(rng, F, D),
                      q + "w2.weight": _linear(rng, D, F)})
    return t


def _write(folder: Path, hf_config: dict, tensors: dict, shards: int = 1) -> Path:
    """An HF directory; with `shards > 1`, layer-aligned shards and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata=PT)
        return folder
    groups = [[] for _ in range(shards)]
    for name in tensors:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        groups[(layer + 1) % shards].append(name)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file), metadata=PT)
        weight_map.update({n: file for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ------------------------------------------------------------- numpy reference model
def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):  # x: (T, heads, hd); HF rotate-half
    t, _, hd = x.shape
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.arange(t)[:, None] * inv[None, :]
    emb = np.concatenate([angles, angles], axis=-1)[:, None, :]  # (T, 1, hd)
    rotated = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def _attention(x, w, p, hd, theta, window=None):
    t = x.shape[0]

    def project(name):  # Qwen2's q/k/v carry a bias
        y = x @ w[f"{p}self_attn.{name}_proj.weight"].T
        return (y + w.get(f"{p}self_attn.{name}_proj.bias", 0.0)).reshape(t, -1, hd)

    q, k, v = project("q"), project("k"), project("v")
    q, k = _rope(q, theta), _rope(k, theta)
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # HF repeat_kv
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    allowed = np.tril(np.ones((t, t), bool))
    if window is not None:  # Mistral: query i sees keys i - window < j <= i
        allowed &= np.arange(t)[None, :] > np.arange(t)[:, None] - window
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(t, -1)
    return out @ w[p + "self_attn.o_proj.weight"].T


def _swiglu(x, gate, up, down):
    g = x @ gate.T
    return (g / (1 + np.exp(-g)) * (x @ up.T)) @ down.T


def _moe(x, w, p, chosen):
    logits = x @ w[p + "block_sparse_moe.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        top = np.argsort(-probs[i])[:TOP_K]
        chosen.append(tuple(sorted(top)))
        weights = probs[i, top] / probs[i, top].sum()
        for e, weight in zip(top, weights):
            q = f"{p}block_sparse_moe.experts.{e}."
            out[i] += weight * _swiglu(x[i], w[q + "w1.weight"], w[q + "w3.weight"], w[q + "w2.weight"])
    return out


def reference_logits(tensors, hf_config, tokens):
    """Llama/Mistral/Qwen2/Mixtral forward in float64 numpy, from the HF tensors as stored."""
    w = {k: v.astype(np.float64) for k, v in tensors.items()}
    eps = hf_config["rms_norm_eps"]
    theta = hf_config.get("rope_theta") or hf_config["rope_parameters"]["rope_theta"]
    hd = hf_config.get("head_dim") or D // H
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    window = hf_config.get("sliding_window") if hf_config["model_type"] in ("mistral", "mixtral") else None
    rows, chosen = [], []
    for row in tokens:
        x = w["model.embed_tokens.weight"][row]
        for n in range(hf_config["num_hidden_layers"]):
            p = f"model.layers.{n}."
            x = x + _attention(_rms(x, w[p + "input_layernorm.weight"], eps), w, p, hd, theta, window)
            h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            if p + "mlp.gate_proj.weight" in w:
                x = x + _swiglu(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
            else:
                x = x + _moe(h, w, p, chosen)
        rows.append(_rms(x, w["model.norm.weight"], eps) @ head.T)
    return np.stack(rows), chosen


# ----------------------------------------------------------------------- fixtures
TOKENS = np.random.default_rng(5).integers(0, V, size=(2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("llama"), _llama_hf_config(), _llama_tensors())


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("mixtral"), _mixtral_hf_config(), _mixtral_tensors(), shards=3)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_hf_checkpoint(llama_dir)


@pytest.fixture(scope="module")
def mixtral(mixtral_dir):
    return load_hf_checkpoint(mixtral_dir)


# -------------------------------------------------------------------------- tests
def test_llama_forward_matches_numpy_reference(llama):
    model, config = llama
    assert (config.num_experts, config.kv_heads, config.dim_per_head, config.rope_theta, config.norm_eps) == (
        1, KV, LLAMA_HEAD_DIM, 5000.0, 1e-5)
    expected, _ = reference_logits(_llama_tensors(), _llama_hf_config(), TOKENS)
    np.testing.assert_allclose(forward(model, jnp.asarray(TOKENS)), expected, rtol=1e-4, atol=1e-4)


def test_mixtral_forward_matches_numpy_reference(mixtral):
    model, config = mixtral
    assert (config.num_experts, config.experts_per_token, config.rope_theta, config.tie_embeddings) == (
        E, TOP_K, 2000.0, True)
    assert config.router_aux_loss_coef == 0.02 and model.lm_head is None
    expected, chosen = reference_logits(_mixtral_tensors(), _mixtral_hf_config(), TOKENS)
    assert len(set(chosen)) >= 3  # the routing really varies between tokens
    np.testing.assert_allclose(forward(model, jnp.asarray(TOKENS)), expected, rtol=1e-4, atol=1e-4)


QWEN2_TENSORS = dict(seed=2, hd=D // H, qkv_bias=True, tied=True)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_forward_match_numpy_reference(family, tmp_path):
    tensors = _llama_tensors(**QWEN2_TENSORS) if family == "qwen2" else _llama_tensors(seed=3)
    hf_config = _qwen2_hf_config() if family == "qwen2" else _mistral_hf_config()
    model, config = load_hf_checkpoint(_write(tmp_path / family, hf_config, tensors))
    if family == "qwen2":
        assert config.qkv_bias and config.sliding_window is None and config.tie_embeddings
        assert model.stages[0].blocks[0].attn.o_proj.bias is None
        np.testing.assert_array_equal(np.asarray(model.stages[0].blocks[0].attn.k_proj.bias[1]),
                                      tensors["model.layers.1.self_attn.k_proj.bias"])
        sharded, _ = load_hf_checkpoint(tmp_path / family, mesh=make_mesh(data=2, fsdp=2, tensor=2))
        bias = sharded.stages[0].blocks[0].attn.q_proj.bias  # [layers, heads * head_dim]: split over heads
        assert bias.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
        np.testing.assert_array_equal(np.asarray(bias), np.asarray(model.stages[0].blocks[0].attn.q_proj.bias))
    else:
        assert config.sliding_window == MISTRAL_WINDOW and not config.qkv_bias
    expected, _ = reference_logits(tensors, hf_config, TOKENS)
    np.testing.assert_allclose(forward(model, jnp.asarray(TOKENS)), expected, rtol=1e-4, atol=1e-4)
    if family == "mistral":  # the window matters: full attention gives other logits
        full, _ = reference_logits(tensors, {**hf_config, "sliding_window": None}, TOKENS)
        assert np.abs(full - expected).max() > 1e-2
    # Back out as the same architecture, tensor for tensor.
    save_hf_checkpoint(model, config, tmp_path / "out")
    saved = json.loads((tmp_path / "out/config.json").read_text())
    assert saved["architectures"] == hf_config["architectures"]
    assert config_from_hf(saved) == config
    stored = load_file(str(tmp_path / "out/model.safetensors"))
    assert stored.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)


def test_qwen2_and_mistral_config_rules():
    assert config_from_hf(_mistral_hf_config(sliding_window=None)).sliding_window is None
    absent = {k: v for k, v in _mistral_hf_config(max_position_embeddings=8192).items() if k != "sliding_window"}
    assert config_from_hf(absent).sliding_window == 4096  # transformers' Mistral default
    assert config_from_hf(_mistral_hf_config(sliding_window=64)).sliding_window is None  # hides nothing
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        config_from_hf(_qwen2_hf_config(use_sliding_window=True))
    with pytest.raises(ValueError, match="Qwen2-MoE has one gated shared expert"):  # MoE + qkv_bias: Qwen2-MoE
        config_to_hf(ModelConfig.preset("tiny", qkv_bias=True))
    with pytest.raises(ValueError, match="sliding_window=5 with qkv_bias=True"):
        config_to_hf(ModelConfig.preset("tiny", qkv_bias=True, num_experts=1, experts_per_token=1, sliding_window=5))


def _moe_hf_config(model_type, **changes):
    architecture = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                    "olmoe": "OlmoeForCausalLM"}[model_type]
    return {"architectures": [architecture], "model_type": model_type, "vocab_size": V, "hidden_size": D,
            "intermediate_size": F, "num_hidden_layers": 4, "num_attention_heads": H, "num_key_value_heads": KV,
            "num_experts": E, "num_experts_per_tok": TOP_K, "moe_intermediate_size": 16, **changes}


def test_moe_family_config_rules():
    # Qwen's MoE layers: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    every = config_from_hf(_moe_hf_config("qwen3_moe", decoder_sparse_step=2))
    assert (every.first_dense_layers, every.moe_every, [every.layer_is_moe(i) for i in range(4)]) == (
        0, 2, [False, True, False, True])
    prefix = config_from_hf(_moe_hf_config("qwen2_moe", mlp_only_layers=[0, 1]))
    assert (prefix.first_dense_layers, prefix.moe_every, prefix.shared_expert_ffn_dim) == (2, 1, 5632)
    hf = config_to_hf(prefix)
    assert (hf["architectures"], hf["mlp_only_layers"], hf["decoder_sparse_step"]) == (
        ["Qwen2MoeForCausalLM"], [0, 1], 1)
    assert config_from_hf(hf) == prefix
    assert config_from_hf(_moe_hf_config("olmoe")).qk_norm == "full"
    # transformers 5 writes num_local_experts.
    local = {k: v for k, v in _moe_hf_config("qwen3_moe", num_local_experts=8).items() if k != "num_experts"}
    assert config_from_hf(local).num_experts == 8
    for bad, match in ((_moe_hf_config("qwen3_moe", mlp_only_layers=[2]), r"mlp_only_layers=\[2\]"),
                       (_moe_hf_config("qwen2_moe", use_sliding_window=True), "use_sliding_window=true"),
                       (_moe_hf_config("olmoe", clip_qkv=8.0), "clip_qkv=8.0"),
                       (_moe_hf_config("olmoe", head_dim=16), "head_dim=16"),
                       (_moe_hf_config("qwen3_moe", num_experts=1), "num_experts >= 2")):
        with pytest.raises(ValueError, match=match):
            config_from_hf(bad)
    with pytest.raises(ValueError, match="no HF family.*dense model with qk_norm='full'"):
        config_to_hf(ModelConfig.preset("tiny", num_experts=1, experts_per_token=1, qk_norm="full"))
    with pytest.raises(ValueError, match="qkv_bias=True \\(Qwen3's projections have no biases\\)"):
        config_to_hf(ModelConfig.preset("tiny", num_experts=1, experts_per_token=1, qk_norm="head", qkv_bias=True))
    with pytest.raises(ValueError, match="num_shared_experts=1 \\(Qwen3-MoE has none\\).*qkv_bias=True"):
        config_to_hf(ModelConfig.preset("tiny", qk_norm="head", num_shared_experts=1, qkv_bias=True))
    with pytest.raises(ValueError, match="router_type='sigmoid'.*moe_ffn_dim=16"):
        config_to_hf(ModelConfig.preset("tiny", qk_norm="full", router_type="sigmoid", moe_ffn_dim=16))


def test_llama_round_trip_is_byte_identical(llama, llama_dir, tmp_path):
    model, config = llama
    save_hf_checkpoint(model, config, tmp_path / "a")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (llama_dir / "model.safetensors").read_bytes()
    again, again_config = load_hf_checkpoint(tmp_path / "a")
    assert again_config == config
    save_hf_checkpoint(again, again_config, tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    np.testing.assert_array_equal(forward(again, jnp.asarray(TOKENS)), forward(model, jnp.asarray(TOKENS)))


def test_mixtral_training_loss_equals_transformers(mixtral, mixtral_dir):
    """An imported Mixtral's training loss (CE + router_aux_loss_coef x aux) is transformers' `loss`
    with `output_router_logits=True` on the same padded batch: the `hf` balance loss pools both
    layers' non-padding tokens, as `load_balancing_loss_func` does with an attention mask."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vishwam.config import TrainConfig
    from vishwam.train import init_train_state, make_train_step

    model, config = mixtral
    assert config.load_balance_loss == "hf" and config.router_z_loss_coef == 0.0
    hf_model = transformers.MixtralForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32).eval()
    ids = TOKENS.astype(np.int64)
    real = np.ones(ids.shape, bool)
    real[1, 8:] = False  # row 1: 8 tokens and 4 of padding
    labels = np.where(real, ids, -100)
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(real.astype(np.int64)),
                       labels=torch.from_numpy(labels), output_router_logits=True)

    batch = {"tokens": jnp.asarray(ids, jnp.int32),
             "targets": jnp.asarray(np.pad(ids[:, 1:], ((0, 0), (0, 1))), jnp.int32),
             "loss_mask": jnp.asarray(np.pad(real[:, 1:], ((0, 0), (0, 1))), jnp.float32),
             "segment_ids": jnp.asarray(real, jnp.int32)}
    train_config = TrainConfig(batch_size=2, seq_len=ids.shape[1], warmup_steps=0, total_steps=10)
    own = jax.tree_util.tree_map(lambda a: jnp.array(a) if eqx.is_array(a) else a, model)  # the step donates it
    _, metrics = make_train_step(config, train_config)(init_train_state(own, train_config, key=jax.random.key(0)),
                                                       batch)
    aux_loss = float(out.aux_loss)
    assert aux_loss > 1.5  # transformers' loss counts both of the top-2 slots: about 2, not 1
    np.testing.assert_allclose(float(metrics["aux"]), config.router_aux_loss_coef * aux_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(out.loss), rtol=0, atol=1e-5)


def test_mixtral_sharded_round_trip(mixtral, tmp_path):
    model, config = mixtral
    files = save_hf_checkpoint(model, config, tmp_path / "s", max_shard_size="40KB")
    shards = sorted(p.name for p in files if p.name.startswith("model-"))
    assert len(shards) > 2 and not (tmp_path / "s/model.safetensors").exists()
    index = json.loads((tmp_path / "s/model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    stored = {}
    for shard in shards:
        stored.update(load_file(str(tmp_path / "s" / shard)))
    original = _mixtral_tensors()
    assert stored.keys() == original.keys()  # tied: no lm_head.weight
    for name, value in original.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
    # A single-file re-save over the sharded one replaces the shards and the index.
    again, again_config = load_hf_checkpoint(tmp_path / "s")
    assert again_config == config
    save_hf_checkpoint(again, again_config, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(forward(again, jnp.asarray(TOKENS)), forward(model, jnp.asarray(TOKENS)))


def test_vishwam_model_round_trip_keeps_dtypes(tmp_path):
    config = ModelConfig.preset("tiny", param_dtype="bfloat16", compute_dtype="float32", moe_dispatch="capacity",
                                router_z_loss_coef=0.0, load_balance_loss="hf")
    model = VishwamAI(config, key=jax.random.key(3))
    save_hf_checkpoint(model, config, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.block_sparse_moe.gate.weight").get_dtype() == "F32"  # router stays fp32
    loaded, loaded_config = load_hf_checkpoint(tmp_path)
    assert loaded_config.param_dtype == "bfloat16"
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_array)),
                                 jax.tree_util.tree_leaves_with_path(eqx.filter(loaded, eqx.is_array))):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    upcast, upcast_config = load_hf_checkpoint(tmp_path, dtype="float32")
    assert upcast_config.param_dtype == upcast_config.compute_dtype == "float32"
    assert upcast.embed.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(upcast.embed), np.asarray(model.embed).astype(np.float32))


def test_load_onto_a_mesh(mixtral, mixtral_dir):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = load_hf_checkpoint(mixtral_dir, mesh=mesh)
    plain = jax.tree_util.tree_leaves_with_path(eqx.filter(mixtral[0], eqx.is_array))
    spread = 0
    for (path, a), b in zip(plain, jax.tree_util.tree_leaves(eqx.filter(sharded, eqx.is_array))):
        assert b.sharding.spec == partition_spec(path_string(path), b.shape, mesh), path_string(path)
        spread += b.sharding.spec != jax.sharding.PartitionSpec()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert spread >= 5
    replicated, _ = load_hf_checkpoint(mixtral_dir, mesh=mesh, partition=lambda path, shape: jax.sharding.PartitionSpec())
    assert replicated.embed.sharding.is_fully_replicated and len(replicated.embed.sharding.device_set) == 8


def test_rope_config_forms_and_scaling():
    top = config_from_hf(_llama_hf_config(rope_theta=123.0))
    nested = config_from_hf({k: v for k, v in _llama_hf_config(
        rope_parameters={"rope_theta": 123.0, "rope_type": "default"}).items() if k != "rope_theta"})
    assert top.rope_theta == nested.rope_theta == 123.0 and top == nested
    assert config_from_hf(_mixtral_hf_config(rope_parameters=None)).rope_theta == 1e6  # Mixtral's default
    # transformers 4's rope_scaling with "type", and 5's rope_parameters, read alike.
    old = config_from_hf(_llama_hf_config(rope_scaling={"type": "linear", "factor": 2.0}))
    new = config_from_hf({k: v for k, v in _llama_hf_config(rope_parameters={
        "rope_theta": 5000.0, "rope_type": "linear", "factor": 2.0}).items() if k != "rope_theta"})
    assert old == new and (old.rope_scaling, old.rope_factor) == ("linear", 2.0)
    # yarn: factor from the context lengths when absent; DeepSeek's mscale pair gives the attention factor.
    yarn = config_from_hf(_llama_hf_config(rope_scaling={
        "rope_type": "yarn", "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.5}))
    scale = lambda m: 0.1 * m * np.log(4.0) + 1.0  # noqa: E731
    assert (yarn.rope_factor, yarn.rope_original_max_seq_len) == (4.0, 16)
    np.testing.assert_allclose(yarn.rope_attention_factor, scale(1.0) / scale(0.5))
    assert config_to_hf(yarn)["rope_scaling"]["attention_factor"] == yarn.rope_attention_factor
    for bad, match in (({"rope_parameters": {"rope_theta": 5e5, "rope_type": "longrope", "factor": 8.0}},
                        "RoPE type 'longrope'.*not implemented"),
                       ({"rope_scaling": {"type": "linear"}}, "needs a numeric 'factor'"),
                       ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5")):
        with pytest.raises(ValueError, match=match):
            config_from_hf(_llama_hf_config(**bad))
    with pytest.raises(ValueError, match="rope_original_max_seq_len=8 with dynamic RoPE"):
        config_to_hf(ModelConfig.preset("tiny", rope_scaling="dynamic", rope_factor=2.0, rope_original_max_seq_len=8))


def test_config_fields_and_export():
    config = config_from_hf(_mixtral_hf_config(sliding_window=32, router_jitter_noise=0.1, dtype=None,
                                               torch_dtype="bfloat16"))
    assert (config.sliding_window, config.max_seq_len, config.router_jitter, config.param_dtype,
            config.capacity_factor) == (32, 64, 0.1, "bfloat16", None)
    assert config.router_z_loss_coef == 0.0 and config.router_renormalize and config.router_type == "softmax"
    hf = config_to_hf(config_from_hf(_llama_hf_config()))
    for name, value in _llama_hf_config().items():
        assert hf[name] == value, name
    assert config_from_hf(hf) == config_from_hf(_llama_hf_config())
    with pytest.raises(ValueError, match="norm_type='layer'.*num_shared_experts=1"):
        config_to_hf(ModelConfig.preset("tiny", norm_type="layer", num_shared_experts=1))


def test_checkpoint_errors_name_the_tensor(tmp_path):
    base = _llama_tensors()
    cases = {
        "missing": ({k: v for k, v in base.items() if k != "model.layers.1.mlp.up_proj.weight"},
                    r"missing model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[48, 32\]\)"),
        "unexpected": ({**base, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)},
                       r"unexpected model\.layers\.0\.self_attn\.q_proj\.bias \[64\]"),
        "shape": ({**base, "model.layers.0.self_attn.k_proj.weight": np.zeros((16, 32), np.float32)},
                  r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \[16, 32\], expected \[32, 32\]"),
        "dtype": ({**base, "model.norm.weight": np.ones(D, np.int32)}, r"model\.norm\.weight has dtype I32"),
    }
    for name, (tensors, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            load_hf_checkpoint(_write(tmp_path / name, _llama_hf_config(), tensors))
    untied = {**_mixtral_tensors(), "lm_head.weight": np.zeros((V, D), np.float32)}
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_hf_checkpoint(_write(tmp_path / "tied", _mixtral_hf_config(), untied))
    old = {**base, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    assert load_hf_checkpoint(_write(tmp_path / "inv_freq", _llama_hf_config(), old))[1].num_layers == L


def test_file_and_config_errors(tmp_path, llama_dir):
    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(_llama_hf_config()))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles"):
        load_hf_checkpoint(pickled)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_hf_checkpoint(tmp_path / "nowhere")
    lost = _write(tmp_path / "lost", _mixtral_hf_config(), _mixtral_tensors(), shards=3)
    (lost / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors"):
        load_hf_checkpoint(lost)
    moved = _write(tmp_path / "moved", _mixtral_hf_config(), _mixtral_tensors(), shards=3)
    index = json.loads((moved / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00003-of-00003.safetensors"
    (moved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"maps \['model\.norm\.weight'\] to model-00003-of-00003"):
        load_hf_checkpoint(moved)
    bad_configs = {
        "unsupported architecture \\['GPT2LMHeadModel'\\]": {"architectures": ["GPT2LMHeadModel"]},
        "attention_bias=true": {"attention_bias": True},
        "hidden_act='gelu'": {"hidden_act": "gelu"},
        "Unsupported dtype 'int8'": {"torch_dtype": "int8"},
    }
    for message, change in bad_configs.items():
        with pytest.raises(ValueError, match=message):
            config_from_hf(_llama_hf_config(**change))
    model, config = load_hf_checkpoint(llama_dir)
    with pytest.raises(ValueError, match="differs from model.config"):
        save_hf_checkpoint(model, config.replace(norm_eps=1e-3), tmp_path / "x")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_hf_checkpoint(model, config, tmp_path / "x", max_shard_size="lots")


def test_tokenizer_and_pipeline(tmp_path, getkey):
    from vishwam.tokenizer import VishwamAITokenizer

    with pytest.raises(FileNotFoundError, match="neither a SentencePiece tokenizer.model nor a tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    text = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20
    tok = VishwamAITokenizer.train(text, tmp_path / "t.model", vocab_size=300, hard_vocab_limit=False)
    config = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_experts=1, experts_per_token=1)
    model = VishwamAI(config, key=getkey())
    save_hf_checkpoint(model, config, tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    assert load_hf_tokenizer(tmp_path / "hf").encode("the lazy fox") == tok.encode("the lazy fox")
    pipeline = load_hf_pipeline(tmp_path / "hf")
    assert pipeline.tokenizer.fingerprint == tok.fingerprint
    np.testing.assert_array_equal(np.asarray(pipeline.model.embed), np.asarray(model.embed))


def _convert_module():
    script = Path(__file__).resolve().parents[1] / "scripts" / "convert_hf.py"
    spec = importlib.util.spec_from_file_location("vishwam_convert_hf", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_script_both_ways(llama_dir, tmp_path):
    from vishwam.pipeline import load_model_weights

    convert = _convert_module()
    convert.main(["to-vishwam", str(llama_dir), str(tmp_path / "v")])
    assert is_hf_checkpoint(llama_dir) and not is_hf_checkpoint(tmp_path / "v")
    config = ModelConfig.from_json(tmp_path / "v" / "config.json")
    weights = load_model_weights(tmp_path / "v" / "model.safetensors", config)
    np.testing.assert_array_equal(np.asarray(weights.embed), _llama_tensors()["model.embed_tokens.weight"])
    assert convert.main(["to-vishwam", str(llama_dir), str(tmp_path / "v")]) == 2  # exists: refused
    convert.main(["to-hf", str(tmp_path / "v"), str(tmp_path / "back")])
    assert (tmp_path / "back/model.safetensors").read_bytes() == (llama_dir / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "back")


# ------------------------------------------------------------ foreign tokenizers, end to end
TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
         "héllo wörld ✓ ünïcode  two  spaces\tand a tab", "def f(x):\n    return x"] * 25
ROUND_TRIP = ["the lazy fox", "  leading and trailing  ", "emoji 😀 and 中文 (byte fallback)", "a\nb\n", ""]


def _llama_sp_dir(folder: Path) -> Path:
    """A Llama-style SentencePiece tokenizer (unk 0, bos 1, eos 2, no pad, byte fallback) with
    Llama's HF files: no pad in tokenizer_config.json, pad_token_id 0 in generation_config.json."""
    import io

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=buffer, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "model_max_length": int(1e30)}))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                                "pad_token_id": 0}))
    return folder


def _bpe_json_dir(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2 / Llama 3 style: no unk, a post-processor that
    prepends BOS) with a tokenizer_config.json naming BOS and EOS and no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXTS, trainer)
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "model_max_length": 64}))
    return folder


@pytest.fixture(scope="module")
def sp_hf_dir(tmp_path_factory):
    return _llama_sp_dir(tmp_path_factory.mktemp("sp_tok"))


@pytest.fixture(scope="module")
def json_hf_dir(tmp_path_factory):
    return _bpe_json_dir(tmp_path_factory.mktemp("json_tok"))


def test_llama_sentencepiece_tokenizer_from_hf_files(sp_hf_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_hf_dir / "tokenizer.model"))
    tok = load_hf_tokenizer(sp_hf_dir)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)  # pad: generation_config's 0 (= unk)
    assert tok.add_bos_token and tok.max_length == 512  # model_max_length 1e30 means no limit: our default
    assert tok.prepend_scheme == "always"  # legacy=True: transformers' Metaspace prepends to every part
    for text in TEXTS[:4] + ROUND_TRIP:
        # transformers adds no space before a text that begins with one: " x" gets sp's ids of "x"
        # (sp itself puts its dummy prefix before every text), and decoding drops one leading space.
        stripped = text[1:] if text.startswith(" ") else text
        assert tok.encode(text) == sp.encode(stripped), text
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == stripped
    assert tok("the lazy fox")["input_ids"] == [1, *sp.encode("the lazy fox")]
    assert tok("<s>the</s>")["input_ids"] == [1, 1, *sp.encode("the"), 2]  # special-token text: its id


def _transformers_llama(model_file: Path, scheme: str):
    """A `tokenizers` Tokenizer built from `model_file` the way transformers' (5.x) LlamaTokenizer
    builds its backend: a BPE over the pieces (merges ranked by the merged piece's id, byte
    fallback), a Metaspace pre-tokenizer with `scheme` that does not split, the special pieces
    as added tokens, and a decoder that strips one leading space unless `scheme` is "never"."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    merges = sorted(((piece[:k], piece[k:]) for piece in vocab for k in range(1, len(piece))
                     if piece[:k] in vocab and piece[k:] in vocab),
                    key=lambda m: (vocab[m[0] + m[1]], len(m[0]), len(m[1]), vocab[m[0]], vocab[m[1]]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    strip = [decoders.Strip(content=" ", left=1)] if scheme != "never" else []
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    tk.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in ("<unk>", "<s>", "</s>")])
    return tk


@pytest.mark.parametrize("settings, scheme", [
    ({"legacy": True}, "always"), ({"legacy": False}, "first"), ({}, "first"),
    ({"legacy": True, "add_prefix_space": False}, "never"), ({"add_prefix_space": None}, "first")])
def test_sentencepiece_ids_are_transformers_ids(sp_hf_dir, tmp_path, settings, scheme):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(sp_hf_dir / "tokenizer.model", folder)
    config = {k: v for k, v in json.loads((sp_hf_dir / "tokenizer_config.json").read_text()).items() if k != "legacy"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    tok, oracle = load_hf_tokenizer(folder), _transformers_llama(folder / "tokenizer.model", scheme)
    assert tok.prepend_scheme == scheme
    texts = TEXTS[:4] + ROUND_TRIP + [" x", "   three", "\tx", "\u2581lit\u2581eral", " \u2581 x", "<s>", "a<s>b c",
                                      " <s> b", "<s>hello", "x</s>  y<unk>z", "<<s>>", "a <s>", "end</s>"]
    expected = [e.ids for e in oracle.encode_batch(texts, add_special_tokens=False)]
    assert tok.batch_encode(texts) == expected and [tok.encode(t) for t in texts] == expected
    assert tok(texts, padding=False)["input_ids"] == [[1, *ids] for ids in expected]
    for skip in (True, False):
        assert tok.batch_decode(expected, skip) == oracle.decode_batch(expected, skip_special_tokens=skip)
        assert [tok.decode([1, *ids, 2], skip) for ids in expected] == [
            oracle.decode([1, *ids, 2], skip_special_tokens=skip) for ids in expected]


def test_bpe_tokenizer_json_from_hf_files(json_hf_dir, tmp_path):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(json_hf_dir / "tokenizer.json"))
    tok = load_hf_tokenizer(json_hf_dir)
    bos, eos = raw.token_to_id("<|begin_of_text|>"), raw.token_to_id("<|end_of_text|>")
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (bos, eos, None)
    assert tok.pad_id == eos  # no pad and no unk: EOS (padding is marked by attention_mask, not by id)
    assert tok.add_bos_token and not tok.add_eos_token  # read off the post-processor
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) and tok.max_length == 64
    texts = TEXTS[:4] + ROUND_TRIP
    assert tok.batch_encode(texts) == [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    assert [tok.encode(t) for t in texts] == [raw.encode(t, add_special_tokens=False).ids for t in texts]
    assert tok.batch_decode(tok.batch_encode(texts, add_eos=True)) == texts
    # __call__ adds what transformers' post-processor adds, and pads to the longest with a mask.
    batch = tok(texts[:2], return_tensors="np")
    assert batch["input_ids"][0].tolist()[:int(batch["attention_mask"][0].sum())] == raw.encode(texts[0]).ids
    assert tok.cache_info()["hits"] >= len(texts)
    tok.save_pretrained(tmp_path)
    again = load_hf_tokenizer(tmp_path)
    assert again.fingerprint == tok.fingerprint and again.encode(texts[2]) == tok.encode(texts[2])
    assert (again.pad_id, again.bos_id, again.eos_id, again.add_bos_token) == (eos, bos, eos, True)
    with pytest.raises(ValueError, match=r"eos_token='</s>' is not in the vocabulary"):
        load_hf_tokenizer(json_hf_dir, eos_token="</s>")
    with pytest.raises(ValueError, match="token id 9999 is outside the vocabulary"):
        tok.decode([1, 9999])


def _hf_model_dir(folder: Path, tokenizer_dir: Path) -> Path:
    tok = load_hf_tokenizer(tokenizer_dir)
    config = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_experts=1, experts_per_token=1, init_std=0.1,
                                max_seq_len=64)
    ids = {"pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    save_hf_checkpoint(VishwamAI(config, key=jax.random.key(4)), config, folder, token_ids=ids)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_pipeline_over_each_tokenizer_stops_at_the_models_eos(kind, sp_hf_dir, json_hf_dir, tmp_path):
    from vishwam.generation import generate
    from vishwam.pipeline import VishwamAIPipeline

    source = sp_hf_dir if kind == "sentencepiece" else json_hf_dir
    folder = _hf_model_dir(tmp_path / "hf", source)
    pipeline = load_hf_pipeline(folder)
    assert pipeline.add_bos and pipeline.eos_ids == (pipeline.tokenizer.eos_id,)
    prompt = pipeline.tokenizer.encode("the lazy", add_bos=True)
    tokens, _ = generate(pipeline.model, np.array([prompt], np.int32), 8, temperature=0.0,
                         pad_id=pipeline.tokenizer.pad_id)
    produced = np.asarray(tokens)[0, len(prompt):].tolist()
    step = next(t for t in range(1, 8) if produced[t] not in produced[:t])
    # The model's own stop ids, a list as in Llama 3's generation_config.json.
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [produced[step], 2]}))
    pipeline = load_hf_pipeline(folder)
    assert pipeline.eos_ids == (produced[step], 2)
    seen = []
    [text] = pipeline("the lazy", 8, temperature=0.0, callback=lambda row, token, piece: seen.append(token))
    stop = min(produced.index(e) for e in pipeline.eos_ids if e in produced) + 1
    assert seen == produced[:stop] and stop <= step + 1
    head = pipeline.tokenizer.decode(prompt)
    assert text == pipeline.tokenizer.decode(prompt + produced[:stop - 1])[len(head):]
    assert pipeline("the lazy", 8, temperature=0.0) == [text]
    pipeline.save(tmp_path / "saved")
    again = VishwamAIPipeline.load(tmp_path / "saved")
    assert type(again.tokenizer) is type(pipeline.tokenizer) and again.eos_ids == pipeline.eos_ids
    assert again("the lazy", 8, temperature=0.0) == [text]


def test_packed_rows_keep_eos_in_the_loss_when_pad_is_eos(json_hf_dir):
    from vishwam.data import PackedRows, Texts, tokenize_source

    tok = load_hf_tokenizer(json_hf_dir)
    assert tok.pad_id == tok.eos_id  # this tokenizer has neither pad nor unk
    corpus = tokenize_source(Texts(["the lazy dog", "pack my box"]), tok)
    rows = PackedRows(corpus, seq_len=corpus.num_tokens + 5)  # one row, padded at the end
    batch = rows.batch(np.array([0]))
    targets, mask = batch["targets"][0], batch["loss_mask"][0]
    real = np.arange(len(targets)) < corpus.num_tokens - 1
    assert (targets[~real] == tok.pad_id).all() and (mask[~real] == 0).all()  # padding: out of the loss
    # Padding is masked by segment, not by id: the first document's EOS target stays in the loss.
    first_eos = int(corpus.offsets[1]) - 1
    assert targets[first_eos - 1] == tok.eos_id and mask[first_eos - 1] == 1


def test_progress_bars_count_the_bytes_read_and_written(llama_dir, tmp_path, capsys):
    model, config = load_hf_checkpoint(llama_dir)
    save_hf_checkpoint(model, config, tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    loaded, _ = load_hf_checkpoint(llama_dir, progress=True)
    save_hf_checkpoint(loaded, config, tmp_path / "shown", max_shard_size="40KB", progress=True)
    err = capsys.readouterr().err
    from tqdm import tqdm

    total = tqdm.format_sizeof(sum(t.nbytes for t in _llama_tensors().values()), divisor=1024)
    assert f"reading tensors: 100%|██████████| {total}/{total}" in err
    assert f"writing tensors: 100%|██████████| {total}/{total}" in err
    np.testing.assert_array_equal(np.asarray(loaded.embed), np.asarray(model.embed))


def test_convert_script_carries_a_tokenizer_json_and_the_stop_ids(json_hf_dir, tmp_path):
    from vishwam.pipeline import VishwamAIPipeline
    from vishwam.tokenizer import JsonTokenizer

    folder = _hf_model_dir(tmp_path / "hf", json_hf_dir)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    convert = _convert_module()
    convert.main(["to-vishwam", str(folder), str(tmp_path / "v"), "--no-progress"])
    pipeline = VishwamAIPipeline.load(tmp_path / "v")
    assert isinstance(pipeline.tokenizer, JsonTokenizer) and pipeline.eos_ids == (1, 5)
    convert.main(["to-hf", str(tmp_path / "v"), str(tmp_path / "back"), "--no-progress"])
    hf = json.loads((tmp_path / "back/config.json").read_text())
    tok = load_hf_tokenizer(tmp_path / "back")
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert tok.fingerprint == pipeline.tokenizer.fingerprint
    assert (tmp_path / "back/model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


# ----------------------------------------------- checkpoints made by transformers
# Tiny random models built by transformers (CPU torch) and saved with `save_pretrained`: logits
# within 1e-4 of transformers', greedy generation identical, and the export loads back in
# transformers with the same logits. Skipped without torch and transformers.
MOE_FAMILIES = {
    # Qwen2-MoE: shared expert with a sigmoid gate, a dense first layer, no top-k renormalisation.
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                         mlp_only_layers=[0], norm_topk_prob=False)),
    # Qwen3-MoE: per-head q/k norms, head_dim != hidden / heads, renormalised top-k.
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                         head_dim=16, norm_topk_prob=True)),
    # OLMoE: q/k norms over the whole projected width.
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
}
ROPE_SCALINGS = {  # Llama with each RoPE scaling; original context 8 < the 12 tokens of TOKENS
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, beta_fast=8.0, beta_slow=1.0),
    "linear": dict(rope_type="linear", factor=3.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
}
GENERATED = 6


def _transformers():
    torch = pytest.importorskip("torch")
    return torch, pytest.importorskip("transformers")


def _transformers_checkpoint(folder: Path, config_class: str, **fields):
    """A transformers model of `config_class` with random weights far from init (sharp routing,
    norms away from one), saved to `folder`; returns the model."""
    torch, transformers = _transformers()
    torch.manual_seed(0)
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                num_key_value_heads=KV, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config = getattr(transformers, config_class)(**{**base, **fields})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, (3.0 if name.endswith("mlp.gate.weight") else 1.0) / p.shape[-1] ** 0.5)
    model.save_pretrained(folder)
    return model


def _transformers_logits(model, tokens):
    torch, _ = _transformers()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _transformers_greedy(model, tokens):
    torch, _ = _transformers()
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        # An explicit mask: transformers would otherwise mask every prompt token equal to pad_token_id.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GENERATED, do_sample=False,
                             min_new_tokens=GENERATED, pad_token_id=0)
    return out.numpy()


def _check_against_transformers(hf_model, folder: Path, tmp_path: Path, widen_to: int | None = None):
    """vishwam's logits and greedy tokens equal transformers'; its export loads in transformers
    with the same logits. Returns the vishwam config."""
    from vishwam import generate

    _, transformers = _transformers()
    model, config = load_hf_checkpoint(folder)
    if widen_to is not None:  # a longer cache than the checkpoint's max_position_embeddings
        model = model.with_config(config.replace(max_seq_len=widen_to))
    expected = _transformers_logits(hf_model, TOKENS)
    np.testing.assert_allclose(forward(model, jnp.asarray(TOKENS)), expected, rtol=1e-4, atol=1e-4)
    tokens, _ = generate(model, jnp.asarray(TOKENS), GENERATED, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(tokens), _transformers_greedy(hf_model, TOKENS))
    model, config = load_hf_checkpoint(folder)
    save_hf_checkpoint(model, config, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    np.testing.assert_allclose(_transformers_logits(back, TOKENS), expected, rtol=1e-5, atol=1e-5)
    assert load_hf_checkpoint(tmp_path / "export")[1] == config
    return config


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_moe_family_matches_transformers(family, tmp_path):
    config_class, fields = MOE_FAMILIES[family]
    hf_model = _transformers_checkpoint(tmp_path / family, config_class, **fields)
    config = _check_against_transformers(hf_model, tmp_path / family, tmp_path)
    assert (config.num_experts, config.experts_per_token) == (fields["num_experts"], 2)
    assert config.router_renormalize == fields["norm_topk_prob"]
    assert config.qk_norm == {"qwen2_moe": "none", "qwen3_moe": "head", "olmoe": "full"}[family]
    if family == "qwen2_moe":
        assert (config.first_dense_layers, config.moe_every, config.qkv_bias) == (1, 1, True)
        assert (config.num_shared_experts, config.shared_expert_ffn_dim, config.shared_expert_gate) == (1, 24, True)
    if family != "olmoe":
        assert config.expert_ffn_dim == 16


def test_qwen3_dense_matches_transformers(tmp_path):
    # Qwen3: a dense model with per-head q/k norms and head_dim != hidden / heads.
    hf_model = _transformers_checkpoint(tmp_path / "qwen3", "Qwen3Config", head_dim=16)
    config = _check_against_transformers(hf_model, tmp_path / "qwen3", tmp_path)
    assert (config.is_moe, config.qk_norm, config.head_dim, config.qkv_bias) == (False, "head", 16, False)


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
def test_llama_rope_scaling_matches_transformers(scaling, tmp_path):
    max_positions = 8 if scaling == "dynamic" else 64  # dynamic scales past max_position_embeddings
    hf_model = _transformers_checkpoint(tmp_path / scaling, "LlamaConfig", head_dim=LLAMA_HEAD_DIM,
                                        max_position_embeddings=max_positions,
                                        rope_parameters={"rope_theta": 500.0, **ROPE_SCALINGS[scaling]})
    config = _check_against_transformers(hf_model, tmp_path / scaling, tmp_path,
                                         widen_to=64 if scaling == "dynamic" else None)
    assert (config.rope_scaling, config.rope_factor) == (scaling, ROPE_SCALINGS[scaling]["factor"])
    assert config.rope_original_max_seq_len == (None if scaling == "linear" else 8)
