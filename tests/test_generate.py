import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam import ModelConfig, VishwamAI
from vishwam.generation import generate, generate_stream, generate_without_cache, sample_logits
from vishwam.nn.moe import Experts, SplitExperts

# init_std above the default so attention and routing move the logits well past
# the 1e-5 tolerance: a wrong cache slot or mask would show.
CONFIGS = {
    "dense": ModelConfig.preset("tiny", num_experts=1, experts_per_token=1, init_std=0.1),
    "moe": ModelConfig.preset("tiny", init_std=0.1),
    # More experts than `SPLIT_EXPERTS_MAX`: decoded over the stacked experts (`grouped`).
    "finegrained": ModelConfig.preset("tiny", num_experts=24, experts_per_token=4, moe_ffn_dim=16, init_std=0.1),
    # Mistral's sliding window: the dense model's weights, each token sees the 8 before it and itself
    # (2 layers reach back 14 positions: the first-token check below still sees a change).
    "window": ModelConfig.preset("tiny", num_experts=1, experts_per_token=1, init_std=0.1, sliding_window=8),
    # Cached attention in blocks of 4 of the 13 cache slots (the last block moved back to end at
    # slot 12) with a window of 5: decode steps start past block 0 and skip the blocks after a row.
    "window_blocks": ModelConfig.preset("tiny", init_std=0.1, sliding_window=5,
                                        attention_block_size=4),
    # q/k norms over the whole width (OLMoE) and Llama 3.1's RoPE scaling (pretrained on 4 positions).
    "qk_norm_llama3": ModelConfig.preset("tiny", init_std=0.1, qk_norm="full", rope_scaling="llama3",
                                         rope_factor=8.0, rope_original_max_seq_len=4),
}
NEW = 8
LENGTHS = np.array([6, 3, 3], np.int32)  # rows 1 and 2 share a width alone: one compile less
PAD = 0


@eqx.filter_jit
def forward(model, tokens):
    return model(tokens, inference=True)[0]


@pytest.fixture(scope="module")
def prompts():
    # Junk (not pad) past each length: generation must ignore it.
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 6), 4, 256), np.int32)
    return tokens, LENGTHS


@pytest.fixture(scope="module")
def models():
    return {name: VishwamAI(cfg, key=jax.random.key(0)) for name, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def greedy(models, prompts):
    """Greedy cached generation of every model, with the logits of every step."""
    tokens, lengths = prompts
    return {name: generate(m, tokens, NEW, temperature=0.0, prompt_lengths=lengths, pad_id=PAD, return_logits=True)
            for name, m in models.items()}


def completion(tokens, prompt_len, end):
    return np.asarray(tokens)[prompt_len:end].tolist()


def eos_after_first_step(row_tokens, prompt_len):
    """An EOS id that stops this greedy row early: the first token (after step 0) not produced before."""
    produced = completion(row_tokens, prompt_len, prompt_len + NEW)
    step = next(t for t in range(1, NEW) if produced[t] not in produced[:t])
    return int(produced[step]), step


@pytest.mark.parametrize("name", CONFIGS)
def test_step_logits_equal_full_forward(models, greedy, prompts, name):
    model, (tokens, lengths, logits) = models[name], greedy[name]
    assert tokens.shape == (3, 6 + NEW) and logits.shape == (3, NEW, 256)
    np.testing.assert_array_equal(lengths, LENGTHS + NEW)  # no EOS: every row runs to the end
    full = forward(model, tokens)
    for i, n in enumerate(LENGTHS):
        np.testing.assert_allclose(logits[i], full[i, n - 1:n - 1 + NEW], atol=1e-5, rtol=0)
        # The oracle is sensitive: changing the first token (with a window of 5: one the last
        # logits can still see) moves the last logits by far more than 1e-5.
        probe = n + NEW - 6 if name == "window_blocks" else 0
        changed = tokens.at[i, probe].set((tokens[i, probe] + 1) % 256)
        moved = jnp.abs(forward(model, changed)[i, n - 2 + NEW] - full[i, n - 2 + NEW]).max()
        assert moved > 1e-3


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_with_cache_equals_recompute(models, greedy, prompts, name):
    tokens, lengths = prompts
    cached_tokens, cached_lengths, cached_logits = greedy[name]
    ref_tokens, ref_lengths, ref_logits = generate_without_cache(
        models[name], tokens, NEW, temperature=0.0, prompt_lengths=lengths, pad_id=PAD, return_logits=True)
    np.testing.assert_array_equal(cached_tokens, ref_tokens)
    np.testing.assert_array_equal(cached_lengths, ref_lengths)
    np.testing.assert_allclose(cached_logits, ref_logits, atol=1e-5, rtol=0)


def test_decode_over_split_layers_equals_the_scan_over_stacked_weights(models, prompts):
    """`generate` decodes over `decode_layers()` on CPU; the scan path (other backends) must agree.
    A MoE of few experts decodes over split experts, one of many over the stacked ones."""
    tokens, lengths = prompts
    for name, split_type in (("dense", None), ("moe", SplitExperts), ("finegrained", Experts)):
        model = models[name]
        if split_type is not None:
            assert all(type(layer.mlp.experts) is split_type for layer in model.decode_layers())
        cache = model.init_cache(3, 10)
        positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (3, 6))
        _, cache = eqx.filter_jit(lambda m, t, p, c: m.decode(t, p, c))(model, jnp.asarray(tokens), positions, cache)
        step = eqx.filter_jit(lambda m, t, p, c, layers: m.decode(t, p, c, layers))
        args = (jnp.asarray(tokens[:, :1]), jnp.asarray(lengths)[:, None], cache)
        scanned, split = step(model, *args, None), step(model, *args, model.decode_layers())
        _assert_trees_close(split, scanned)
        # The new keys went into each row's own slot and nowhere else.
        changed = np.any(np.asarray(split[1].k != cache.k), axis=(0, 2, 4))  # (batch, slots)
        np.testing.assert_array_equal(changed, np.arange(10)[None, :] == np.asarray(lengths)[:, None])


def test_prefill_runs_the_head_on_each_rows_last_token_only(models, prompts):
    """The logits of a prefill are those of `decode` at each row's last prompt token, and its
    program holds no `[batch, width, vocab]` array (the head runs on `batch` rows only)."""
    from vishwam.generation import prefill

    model = models["moe"]
    tokens, lengths = prompts
    vocab = model.config.vocab_size
    run = lambda m, t, n, c: prefill(m, None, t, n, c)  # noqa: E731
    args = (jnp.asarray(tokens), jnp.asarray(lengths), model.init_cache(3, 10))
    logits, cache = eqx.filter_jit(run)(model, *args)
    positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (3, 6))
    full, full_cache = eqx.filter_jit(lambda m, t, p, c: m.decode(t, p, c))(model, args[0], positions, args[2])
    _assert_trees_close((logits, cache), (np.asarray(full)[np.arange(3), lengths - 1], full_cache))
    shapes = [v.aval.shape for eqn in eqx.filter_make_jaxpr(run)(model, *args)[0].jaxpr.eqns for v in eqn.outvars]
    assert (3, vocab) in shapes and not any(len(s) == 3 and s[-1] == vocab for s in shapes)


def _assert_trees_close(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-5, rtol=0)


def test_window_changes_what_decoding_sees(greedy):
    # Same weights as "dense"; the window hides keys once a row is longer than 8 tokens.
    dense, window = greedy["dense"][2], greedy["window"][2]
    np.testing.assert_allclose(window[:, 0], dense[:, 0], atol=1e-5, rtol=0)  # row 0: 6 tokens, nothing hidden
    assert float(jnp.abs(window[:, -1] - dense[:, -1]).max()) > 1e-3


def test_batch_of_different_lengths_equals_rows_alone(models, greedy, prompts):
    tokens, lengths = prompts
    batch_tokens, batch_lengths, _ = greedy["moe"]
    # Rows 1 and 2 are the padded ones (row 0 fills the width); alone they share one compile.
    for i in (1, 2):
        n = lengths[i]
        alone, alone_len = generate(models["moe"], tokens[i:i + 1, :n], NEW, temperature=0.0, pad_id=PAD)
        assert int(alone_len[0]) == int(batch_lengths[i]) == n + NEW
        np.testing.assert_array_equal(alone[0], batch_tokens[i, :n + NEW])
        # The input's junk after the prompt is replaced by the prompt's continuation, then pad.
        np.testing.assert_array_equal(batch_tokens[i, :n], tokens[i, :n])
        assert np.all(np.asarray(batch_tokens[i, n + NEW:]) == PAD)


def test_eos_stops_each_row_and_pads(models, greedy, prompts):
    tokens, lengths = prompts
    full_tokens = np.asarray(greedy["moe"][0])
    eos, step = eos_after_first_step(full_tokens[0], lengths[0])
    out, out_lengths, _ = generate(models["moe"], tokens, NEW, temperature=0.0, prompt_lengths=lengths,
                                   eos_id=eos, pad_id=PAD, return_logits=True)
    out = np.asarray(out)
    for i, n in enumerate(lengths):
        reference = completion(full_tokens[i], n, n + NEW)
        stop = reference.index(eos) + 1 if eos in reference else NEW
        assert int(out_lengths[i]) == n + stop
        assert completion(out[i], n, n + stop) == reference[:stop]
        assert np.all(out[i, n + stop:] == PAD)
    assert int(out_lengths[0]) == lengths[0] + step + 1


def test_a_list_of_eos_ids_stops_each_row_at_the_first_of_them(models, greedy, prompts):
    tokens, lengths = prompts
    full_tokens = np.asarray(greedy["moe"][0])
    eos_a, step_a = eos_after_first_step(full_tokens[0], lengths[0])
    eos_b, step_b = eos_after_first_step(full_tokens[1], lengths[1])
    assert eos_a != eos_b
    out, out_lengths = generate(models["moe"], tokens, NEW, temperature=0.0, prompt_lengths=lengths,
                                eos_id=[eos_a, eos_b], pad_id=PAD)
    out = np.asarray(out)
    for i, n in enumerate(lengths):
        reference = completion(full_tokens[i], n, n + NEW)
        stop = min([reference.index(e) + 1 for e in (eos_a, eos_b) if e in reference], default=NEW)
        assert int(out_lengths[i]) == n + stop
        assert completion(out[i], n, n + stop) == reference[:stop]
        assert np.all(out[i, n + stop:] == PAD)
    assert int(out_lengths[1]) <= lengths[1] + step_b + 1  # row 1 stopped at the second id (or earlier)


SAMPLING = dict(temperature=1.0, top_k=50, top_p=0.9, prompt_lengths=LENGTHS, pad_id=PAD, return_logits=True)


@pytest.fixture(scope="module")
def sampled(models, prompts):
    return generate(models["moe"], prompts[0], NEW, key=jax.random.key(7), **SAMPLING)


def test_sampling_is_reproducible_per_key_and_respects_top_k_top_p(models, prompts, sampled):
    tokens, lengths = prompts
    a, _, logits = sampled
    b, _, _ = generate(models["moe"], tokens, NEW, key=jax.random.key(7), **SAMPLING)
    c, _, _ = generate(models["moe"], tokens, NEW, key=jax.random.key(8), **SAMPLING)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    logits = np.asarray(logits)
    for i, n in enumerate(lengths):
        for t, token in enumerate(completion(a[i], n, n + NEW)):
            order = np.argsort(-logits[i, t])
            rank = int(np.nonzero(order == token)[0][0])
            probs = np.asarray(jax.nn.softmax(logits[i, t][order[:50]]))
            assert rank < 50 and probs[:rank].sum() < 0.9 + 1e-6  # inside top-k, then inside the nucleus


def test_stream_equals_generate_and_stops_rows_at_eos(models, prompts, sampled):
    tokens, lengths = prompts
    eos, step = eos_after_first_step(sampled[0][0], lengths[0])
    expected, expected_lengths, _ = generate(models["moe"], tokens, NEW, key=jax.random.key(7), eos_id=eos,
                                             **SAMPLING)
    opts = {k: v for k, v in SAMPLING.items() if k != "return_logits"}
    # A list of stop ids holding one that never comes stops at the same place.
    steps = list(generate_stream(models["moe"], tokens, NEW, key=jax.random.key(7), eos_id=[eos, 255], **opts))
    for i, n in enumerate(lengths):
        produced = [int(tok[i]) for tok, active in steps if active[i]]
        assert n + len(produced) == int(expected_lengths[i])
        assert produced == completion(expected[i], n, int(expected_lengths[i]))
    assert int(expected_lengths[0]) == lengths[0] + step + 1  # row 0 stopped at its EOS


def test_sample_logits_distribution_and_top_k_one_is_greedy():
    logits = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))
    batch = jnp.broadcast_to(logits, (20000, 5))
    key = jax.random.key(3)

    def freq(**kw):
        draws = np.asarray(sample_logits(batch, key, **kw))
        return np.bincount(draws, minlength=5) / draws.size

    np.testing.assert_allclose(freq(temperature=1.0), [0.4, 0.3, 0.15, 0.1, 0.05], atol=0.015)
    sharpened = np.array([0.4, 0.3, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(freq(temperature=0.5), sharpened / sharpened.sum(), atol=0.015)
    top_k = freq(top_k=2)
    np.testing.assert_allclose(top_k, [4 / 7, 3 / 7, 0, 0, 0], atol=0.015)
    assert np.all(top_k[2:] == 0)
    # Nucleus 0.8: 0.4 + 0.3 < 0.8, so the third token completes the set.
    nucleus = freq(top_p=0.8)
    np.testing.assert_allclose(nucleus, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)
    assert np.all(nucleus[3:] == 0)

    # top_k=1 is greedy at any temperature (`generate` runs this same function at every step).
    random_logits = jax.random.normal(jax.random.key(4), (64, 256))
    greedy = np.asarray(sample_logits(random_logits, temperature=0.0))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(random_logits), axis=-1))
    for temperature in (1.0, 3.0):
        np.testing.assert_array_equal(sample_logits(random_logits, key, temperature=temperature, top_k=1), greedy)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=123), "prompt length 6 + max_new_tokens 123 = 129 exceeds the model's max_seq_len=128"),
    (dict(prompt_lengths=np.array([6, 0, 3])), "prompt_lengths must lie in [1, 6]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=1.0), "needs a PRNG key"),
    (dict(top_k=0, key=jax.random.key(0)), "top_k must be None or an int in [1, vocab_size=256]"),
    (dict(top_p=0.0, key=jax.random.key(0)), "top_p must be None or in (0, 1]"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(eos_id=256), "eos_id must be None or an int in [0, vocab_size=256)"),
    (dict(eos_id=[3, 300]), "eos_id must be None or an int in [0, vocab_size=256) (or a non-empty list"),
    (dict(eos_id=[]), "eos_id must be None or an int in [0, vocab_size=256) (or a non-empty list"),
    (dict(pad_id=-1), "pad_id must be an int in [0, vocab_size=256)"),
    (dict(prompt_lengths=np.array([6, 3, 3]), tokens=np.array([[1] * 6, [1, 2, 256, 0, 0, 0], [5] * 6])),
     "prompt token ids span [1, 256], outside the model's vocabulary [0, 256)"),
])
def test_bad_arguments_fail_early(models, prompts, kwargs, message):
    kwargs = dict(dict(max_new_tokens=4, temperature=0.0, tokens=prompts[0]), **kwargs)
    tokens = kwargs.pop("tokens")
    with pytest.raises(ValueError) as err:
        generate(models["moe"], tokens, kwargs.pop("max_new_tokens"), **kwargs)
    assert message in str(err.value)


def test_empty_prompt_is_an_error(models):
    with pytest.raises(ValueError, match="empty prompt batch of shape"):
        generate(models["moe"], np.zeros((2, 0), np.int32), 4, temperature=0.0)
