"""Autoregressive generation: KV-cache prefill + decode loop in one jit, and sampling.

`generate` runs prefill and the decode loop inside one `eqx.filter_jit`-compiled
`lax.while_loop` that stops once every row has produced an EOS; `generate_stream` yields
the same tokens step by step from Python; `generate_without_cache` recomputes the whole
sequence every step (the tests' oracle). Output `tokens [batch, prompt + max_new_tokens]`:
row `i` holds its prompt, its generated tokens right after it, then `pad_id`; `lengths[i]`
counts both, EOS included. Step `t` samples with `jax.random.fold_in(key, t)` (a row's draw
depends on the batch's shape; greedy decoding does not).

On one CPU device the decode steps run on `VishwamAI.decode_layers()` (per-layer arrays,
and per-expert ones in MoE layers of up to `vishwam.model.lm.SPLIT_EXPERTS_MAX` experts, kept
for the last model used: a second copy of the layer weights),
other backends scan over the stacked weights. A new compile happens per prompt width,
`max_new_tokens`, `top_k` and greedy-or-not; `temperature`, `top_p` and the EOS ids are traced.

The pieces are public for engines that schedule their own steps (`vishwam.serve`):
`prefill` (prompts into a cache), `decode_step` (one token per row at per-row positions),
`sample_rows` (per-row sampling settings, traced) and `cached_decode_layers`.
"""

import functools
import weakref
from collections.abc import Iterator, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt32

from .errors import InvalidValueError
from .model import KVCache, VishwamAI

_PromptLike = Int[Array, "batch prompt"] | Int[np.ndarray, "batch prompt"]
_LengthsLike = Int[Array, " batch"] | Int[np.ndarray, " batch"]


# --------------------------------------------------------------------------- sampling
def _sample(logits, key, temperature, top_p, *, greedy: bool, top_k: int | None, use_top_p: bool,
            top_k_limit=None):
    """Draw one token per row. Order: temperature, then top-k, then nucleus (top-p).
    `top_k_limit` (traced, with `top_k=None`): keep only that many best candidates."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is None and not use_top_p and top_k_limit is None:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    # Candidates sorted best first; nucleus filtering needs the sorted order anyway.
    values, indices = jax.lax.top_k(logits, logits.shape[-1] if top_k is None else top_k)
    if top_k_limit is not None:
        values = jnp.where(jnp.arange(values.shape[-1]) < top_k_limit, values, -jnp.inf)
    if use_top_p:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The best candidate always survives (mass_before = 0 < top_p).
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


_sample_jit = eqx.filter_jit(_sample)


def sample_rows(
    logits: Float[Array, "batch vocab"],
    seeds: UInt32[Array, " batch"],
    steps: Int[Array, " batch"],
    temperature: Float[Array, " batch"],
    top_k: Int[Array, " batch"],
    top_p: Float[Array, " batch"],
) -> Int[Array, " batch"]:
    """One token id per row, each row with its own settings (traceable: rows of a
    continuous batch belong to different requests). Row `i` is greedy when
    `temperature[i] == 0`, else a draw as in `sample_logits` with key
    `fold_in(key(seeds[i]), steps[i])`; `top_k[i] == 0` and `top_p[i] == 1` turn those
    filters off. Sorts the whole vocabulary per row; an all-greedy batch is cheaper
    as a plain argmax."""
    vocab = logits.shape[-1]

    def one(row, seed, step, temp, k, p):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return _sample(row[None], key, jnp.maximum(temp, 1e-30), p, greedy=False, top_k=None, use_top_p=True,
                       top_k_limit=jnp.where(k > 0, k, vocab))[0]

    drawn = jax.vmap(one)(logits, seeds, steps, temperature, top_k, top_p)
    return jnp.where(temperature == 0, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)


def _check_sampling(temperature, top_k, top_p, key, vocab_size: int, where: str):
    """Validate sampling options; returns the static flags `(greedy, top_k, use_top_p)`."""
    temperature = float(temperature)
    if not temperature >= 0:
        raise InvalidValueError(f"{where}: temperature must be >= 0 (0 = greedy), got {temperature}.")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab_size):
        raise InvalidValueError(f"{where}: top_k must be None or an int in [1, vocab_size={vocab_size}], got {top_k!r}.")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise InvalidValueError(f"{where}: top_p must be None or in (0, 1], got {top_p}.")
    greedy = temperature == 0.0
    if not greedy and key is None:
        raise InvalidValueError(f"{where}: sampling (temperature={temperature} > 0) needs a PRNG key; pass "
                                "key=jax.random.key(seed), or temperature=0 for greedy decoding.")
    return greedy, (None if greedy else top_k), (not greedy and top_p is not None and float(top_p) < 1.0)


def sample_logits(
    logits: Float[Array, "batch vocab"],
    key: PRNGKeyArray | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Int[Array, " batch"]:
    """One token id per row: greedy when `temperature == 0`, otherwise a draw from
    `softmax(logits / temperature)` restricted to the `top_k` best tokens and then to
    the smallest set of best tokens whose probability reaches `top_p`."""
    greedy, top_k, use_top_p = _check_sampling(temperature, top_k, top_p, key, logits.shape[-1], "sample_logits")
    return _sample_jit(logits, key, jnp.float32(max(temperature, 1e-30)),
                       jnp.float32(1.0 if top_p is None else top_p), greedy=greedy, top_k=top_k, use_top_p=use_top_p)


# ------------------------------------------------------------------------ validation
def _prepare(model: VishwamAI, prompt_tokens, max_new_tokens, prompt_lengths, temperature, top_k, top_p, key,
             eos_id, pad_id, where: str):
    """Check every argument eagerly (static shapes, concrete lengths) and build the traced inputs."""
    config = model.config
    prompt = jnp.asarray(prompt_tokens)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise InvalidValueError(f"{where}: prompt_tokens must be an integer array [batch, prompt_len], got "
                                f"shape {prompt.shape} and dtype {prompt.dtype}.")
    batch, width = prompt.shape
    if batch == 0 or width == 0:
        raise InvalidValueError(f"{where}: empty prompt batch of shape {prompt.shape}; every row needs at least "
                                "one token (e.g. the tokenizer's BOS id).")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidValueError(f"{where}: max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if width + max_new_tokens > config.max_seq_len:
        raise InvalidValueError(
            f"{where}: prompt length {width} + max_new_tokens {max_new_tokens} = {width + max_new_tokens} "
            f"exceeds the model's max_seq_len={config.max_seq_len} (the KV cache size); shorten the prompt "
            f"or ask for at most {config.max_seq_len - width} new tokens.")
    if prompt_lengths is None:
        lengths = np.full((batch,), width, np.int32)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
            raise InvalidValueError(f"{where}: prompt_lengths must be integers of shape ({batch},), got shape "
                                    f"{lengths.shape} and dtype {lengths.dtype}.")
        if lengths.min() < 1 or lengths.max() > width:
            raise InvalidValueError(f"{where}: prompt_lengths must lie in [1, {width}] (empty prompts are not "
                                    f"allowed; start a row with BOS instead), got {lengths.tolist()}.")
    eos_ids = _eos_ids(eos_id, config.vocab_size, where)
    if not (isinstance(pad_id, int) and 0 <= pad_id < config.vocab_size):
        raise InvalidValueError(f"{where}: pad_id must be an int in [0, vocab_size={config.vocab_size}), got {pad_id!r}.")
    # Only the prompts themselves: whatever fills the padding is replaced by pad_id.
    real = np.asarray(prompt)[np.arange(width)[None, :] < lengths[:, None]]
    if real.min() < 0 or real.max() >= config.vocab_size:
        raise InvalidValueError(f"{where}: prompt token ids span [{real.min()}, {real.max()}], outside the model's "
                                f"vocabulary [0, {config.vocab_size}).")
    greedy, top_k, use_top_p = _check_sampling(temperature, top_k, top_p, key, config.vocab_size, where)
    dynamic = dict(
        prompt=prompt.astype(jnp.int32),
        lengths=jnp.asarray(lengths, jnp.int32),
        temperature=jnp.float32(max(float(temperature), 1e-30)),
        top_p=jnp.float32(1.0 if top_p is None else top_p),
        # Token ids are >= 0, so -1 never stops a row.
        eos_id=jnp.asarray(eos_ids or (-1,), jnp.int32),
        key=jax.random.key(0) if key is None else key,
    )
    static = dict(max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, use_top_p=use_top_p, pad_id=pad_id)
    return dynamic, static


def _eos_ids(eos_id, vocab_size: int, where: str) -> tuple[int, ...]:
    """`eos_id` (None, an int, or a list of ints as in HF's generation_config.json) as a tuple."""
    if eos_id is None:
        return ()
    ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id) if isinstance(eos_id, (list, tuple)) else ()
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise InvalidValueError(f"{where}: eos_id must be None or an int in [0, vocab_size={vocab_size}) (or a non-empty "
                                f"list of such ints), got {eos_id!r}.")
    return ids


def _is_eos(tokens, eos_ids):
    """`[batch]` bool: the token is one of the `[n]` stop ids."""
    return jnp.any(tokens[:, None] == eos_ids[None, :], axis=-1)


# ------------------------------------------------------------- per-layer weights
_DECODE_LAYERS: list = []  # [(weakref to the model, its decode_layers())]: the last model only


def cached_decode_layers(model: VishwamAI) -> tuple | None:
    """The model's `decode_layers()` for prefill and decode on a single CPU device, or None
    (other backends and sharded models scan over the stacked weights). Kept for the last
    model seen, so repeated calls copy the weights once; released with it."""
    if jax.default_backend() != "cpu" or len(model.embed.devices()) > 1:
        return None
    if _DECODE_LAYERS and _DECODE_LAYERS[0][0]() is model:
        return _DECODE_LAYERS[0][1]
    _DECODE_LAYERS.clear()
    layers = model.decode_layers()
    _DECODE_LAYERS.append((weakref.ref(model, lambda _: _DECODE_LAYERS.clear()), layers))
    return layers


# ----------------------------------------------------------------------- the loop
def _padded_buffer(prompt, lengths, total: int, pad_id: int):
    """`[batch, total]` output buffer: each prompt, then `pad_id` (over any padding of the input too)."""
    width = prompt.shape[1]
    prompt = jnp.where(jnp.arange(width)[None, :] < lengths[:, None], prompt, pad_id)
    return jnp.full((prompt.shape[0], total), pad_id, jnp.int32).at[:, :width].set(prompt)


def prefill(model: VishwamAI, layers, prompt: Int[Array, "batch width"], lengths: Int[Array, " batch"],
            cache: KVCache) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """Run the right-padded prompts through the model at positions `0..width-1` (over
    `layers` if given, see `VishwamAI.decode`), writing their keys and values into
    `cache` (rows as the prompts); the logits at each row's last token."""
    batch, width = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    # Padding writes junk at slots >= length; a row's decode step overwrites its slot before
    # reading it, and slots past a row's position are masked. The head runs on each row's last
    # token only (`decode_hidden`), not on all `width` positions.
    hidden, cache = model.decode_hidden(prompt, positions, cache, layers)
    return model.logits(hidden[jnp.arange(batch), lengths - 1]), cache


def decode_step(model: VishwamAI, layers, cache: KVCache, tokens: Int[Array, " batch"],
                positions: Int[Array, " batch"]) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """Feed one token per row at that row's own position (rows may sit at different
    lengths); the logits of the next token and the updated cache."""
    logits, cache = model.decode(tokens[:, None], positions[:, None], cache, layers)
    return logits[:, 0], cache


def _prefill(model: VishwamAI, layers, prompt, lengths, cache_len: int):
    """`prefill` into a fresh cache of `cache_len` slots."""
    return prefill(model, layers, prompt, lengths, model.init_cache(prompt.shape[0], cache_len))


def _loop(first_logits, next_logits, state, prompt, lengths, temperature, top_p, eos_id, key, *, max_new_tokens: int,
          greedy: bool, top_k, use_top_p: bool, pad_id: int, return_logits: bool):
    """Sample `max_new_tokens` tokens per row; `next_logits(state, tokens, prev, positions) -> (logits, state)`
    gives the logits after feeding `prev` at `positions`."""
    batch = prompt.shape[0]
    rows = jnp.arange(batch)
    total = prompt.shape[1] + max_new_tokens
    sample = lambda logits, t: _sample(logits, jax.random.fold_in(key, t), temperature, top_p,  # noqa: E731
                                       greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    tokens = _padded_buffer(prompt, lengths, total, pad_id)
    first = sample(first_logits, 0)
    tokens = tokens.at[rows, lengths].set(first)
    saved = (jnp.zeros((batch, max_new_tokens, first_logits.shape[-1]), jnp.float32).at[:, 0].set(first_logits)
             if return_logits else None)
    carry = (jnp.int32(1), tokens, first, _is_eos(first, eos_id), jnp.ones((batch,), jnp.int32), state, saved)

    def cond(carry):
        t, _, _, done, _, _, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, tokens, prev, done, generated, state, saved = carry
        logits, state = next_logits(state, tokens, prev, lengths + t - 1)
        tok = jnp.where(done, pad_id, sample(logits, t))
        tokens = tokens.at[rows, lengths + t].set(tok)
        generated = generated + (~done).astype(jnp.int32)
        if return_logits:
            saved = saved.at[:, t].set(logits)
        return t + 1, tokens, tok, done | _is_eos(tok, eos_id), generated, state, saved

    _, tokens, _, _, generated, _, saved = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths + generated, saved


@eqx.filter_jit
def _generate_cached(model: VishwamAI, layers, prompt, lengths, temperature, top_p, eos_id, key, *,
                     return_logits: bool, **static):
    total = prompt.shape[1] + static["max_new_tokens"]
    # The last generated token is never fed back, so the cache needs total - 1 slots.
    first_logits, cache = _prefill(model, layers, prompt, lengths, total - 1)

    def next_logits(cache: KVCache, tokens, prev, positions):
        return decode_step(model, layers, cache, prev, positions)

    return _loop(first_logits, next_logits, cache, prompt, lengths, temperature, top_p, eos_id, key,
                 return_logits=return_logits, **static)


@eqx.filter_jit
def _generate_recompute(model: VishwamAI, prompt, lengths, temperature, top_p, eos_id, key, *,
                        return_logits: bool, **static):
    total = prompt.shape[1] + static["max_new_tokens"]
    rows = jnp.arange(prompt.shape[0])

    def full_forward_at(tokens, positions):
        logits, _ = model(tokens, inference=True)
        return logits[rows, positions]

    def next_logits(state, tokens, prev, positions):
        return full_forward_at(tokens, positions), state

    first_logits = full_forward_at(_padded_buffer(prompt, lengths, total, static["pad_id"]), lengths - 1)
    return _loop(first_logits, next_logits, None, prompt, lengths, temperature, top_p, eos_id, key,
                 return_logits=return_logits, **static)


def generate(
    model: VishwamAI,
    prompt_tokens: _PromptLike,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKeyArray | None = None,
    eos_id: int | Sequence[int] | None = None,
    prompt_lengths: _LengthsLike | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
) -> tuple[Int[Array, "batch total"], Int[Array, " batch"]] | tuple[
        Int[Array, "batch total"], Int[Array, " batch"], Float[Array, "batch new vocab"]]:
    """Complete a batch of prompts with a KV cache; the whole loop is one compiled call.

    Arguments:
        model: the language model (its MoE layers route dropless here).
        prompt_tokens: right-padded prompts `[batch, P]`, `P >= 1`.
        max_new_tokens: tokens generated per row (fewer when the row stops at EOS);
            `P + max_new_tokens` must not exceed `model.config.max_seq_len`.
        temperature: softmax temperature; `0` decodes greedily (no key needed).
        top_k: sample among the `top_k` most likely tokens only.
        top_p: nucleus sampling: among the fewest best tokens whose mass reaches `top_p`.
        key: PRNG key, required when `temperature > 0`.
        eos_id: a row stops after producing this token (or any of these tokens: a list, as
            in HF's `generation_config.json`); the rest of the row is `pad_id`.
        prompt_lengths: `[batch]` true prompt lengths in `[1, P]`; default: all `P`.
        pad_id: filler after each row's end (and over the input's padding).
        return_logits: also return the fp32 logits each token was drawn from.

    Returns:
        `(tokens [batch, P + max_new_tokens], lengths [batch])`, plus `logits
        [batch, max_new_tokens, vocab]` when `return_logits` (rows of steps after a row's
        EOS, or after the loop stopped, are meaningless: zeros or logits of pad steps).
    """
    dynamic, static = _prepare(model, prompt_tokens, max_new_tokens, prompt_lengths, temperature, top_k, top_p, key,
                               eos_id, pad_id, "generate")
    layers = cached_decode_layers(model)
    tokens, lengths, logits = _generate_cached(model, layers, **dynamic, return_logits=return_logits, **static)
    return (tokens, lengths, logits) if return_logits else (tokens, lengths)


def generate_without_cache(
    model: VishwamAI,
    prompt_tokens: _PromptLike,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKeyArray | None = None,
    eos_id: int | Sequence[int] | None = None,
    prompt_lengths: _LengthsLike | None = None,
    pad_id: int = 0,
    return_logits: bool = False,
) -> tuple[Int[Array, "batch total"], Int[Array, " batch"]] | tuple[
        Int[Array, "batch total"], Int[Array, " batch"], Float[Array, "batch new vocab"]]:
    """`generate` without a cache: every step runs the full forward pass over the whole
    `[batch, P + max_new_tokens]` buffer (causality makes the not-yet-written tail
    irrelevant). The oracle for `generate`, and the benchmark baseline."""
    dynamic, static = _prepare(model, prompt_tokens, max_new_tokens, prompt_lengths, temperature, top_k, top_p, key,
                               eos_id, pad_id, "generate_without_cache")
    tokens, lengths, logits = _generate_recompute(model, **dynamic, return_logits=return_logits, **static)
    return (tokens, lengths, logits) if return_logits else (tokens, lengths)


# --------------------------------------------------------------------- streaming
@eqx.filter_jit
def _stream_first(model: VishwamAI, layers, prompt, lengths, temperature, top_p, key, *, cache_len: int,
                  greedy: bool, top_k, use_top_p: bool):
    logits, cache = _prefill(model, layers, prompt, lengths, cache_len)
    tok = _sample(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy=greedy, top_k=top_k,
                  use_top_p=use_top_p)
    return tok, cache


def _stream_step_leaves(leaves, cache: KVCache, prev, lengths, t, *, treedef, greedy: bool, top_k,
                        use_top_p: bool):
    """Token `t` of every row: feed `prev` (token `t - 1`) at `lengths + t - 1`, sample.
    The fixed inputs (model, decode layers, sampling values) come as the flat leaves of
    `treedef`, flattened once per stream: the pytree of a whole model takes milliseconds
    to flatten in Python, as long as a small model's step."""
    model, layers, temperature, top_p, key = jax.tree_util.tree_unflatten(treedef, leaves)
    logits, cache = decode_step(model, layers, cache, prev, lengths + t - 1)
    tok = _sample(logits, jax.random.fold_in(key, t), temperature, top_p, greedy=greedy, top_k=top_k,
                  use_top_p=use_top_p)
    return tok, cache


_STREAM_STEPS: dict = {}  # (treedef, sampling flags) -> jitted step: no static arguments to hash per token


def _stream_step(treedef, *, greedy: bool, top_k, use_top_p: bool):
    """The jitted step for these fixed inputs (cache donated: updated in place)."""
    key = (treedef, greedy, top_k, use_top_p)
    if key not in _STREAM_STEPS:
        if len(_STREAM_STEPS) >= 8:
            _STREAM_STEPS.clear()
        _STREAM_STEPS[key] = jax.jit(functools.partial(_stream_step_leaves, treedef=treedef, greedy=greedy,
                                                       top_k=top_k, use_top_p=use_top_p), donate_argnums=(1,))
    return _STREAM_STEPS[key]


def _stream_fixed(model: VishwamAI, layers, temperature, top_p, key):
    """`(leaves, treedef)` of a stream's fixed inputs, for `_stream_step`."""
    leaves, treedef = jax.tree_util.tree_flatten((model, layers, temperature, top_p, key))
    return leaves, treedef


def generate_stream(
    model: VishwamAI,
    prompt_tokens: _PromptLike,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: PRNGKeyArray | None = None,
    eos_id: int | Sequence[int] | None = None,
    prompt_lengths: _LengthsLike | None = None,
    pad_id: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`generate`, one step at a time from Python: yields `(tokens [batch], active [batch])`
    per step, where `active[i]` says row `i` produced `tokens[i]` (it had not stopped
    before this step); inactive rows show `pad_id`. Stops after `max_new_tokens` steps
    or once every row has stopped. Same arguments and same tokens as `generate`
    (one jitted decode step per token, cache donated; slower than `generate`)."""
    dynamic, static = _prepare(model, prompt_tokens, max_new_tokens, prompt_lengths, temperature, top_k, top_p, key,
                               eos_id, pad_id, "generate_stream")
    sampling = dict(greedy=static["greedy"], top_k=static["top_k"], use_top_p=static["use_top_p"])
    stop_ids = _eos_ids(eos_id, model.config.vocab_size, "generate_stream")
    lengths = dynamic["lengths"]
    prompt = _padded_buffer(dynamic["prompt"], lengths, dynamic["prompt"].shape[1], pad_id)
    cache_len = prompt.shape[1] + max_new_tokens - 1
    layers = cached_decode_layers(model)
    tok, cache = _stream_first(model, layers, prompt, lengths, dynamic["temperature"], dynamic["top_p"],
                               dynamic["key"], cache_len=cache_len, **sampling)
    leaves, treedef = _stream_fixed(model, layers, dynamic["temperature"], dynamic["top_p"], dynamic["key"])
    step = _stream_step(treedef, **sampling)
    done = np.zeros(lengths.shape, bool)
    for t in range(max_new_tokens):
        # Token t+1 is dispatched before token t is read back, so the device computes it while
        # Python hands token t over (rows that stopped are fed junk: their output is replaced).
        following = step(leaves, cache, tok, lengths, np.int32(t + 1)) if t + 1 < max_new_tokens else None
        out = np.where(done, pad_id, np.asarray(tok))
        yield out, ~done
        if stop_ids:
            done = done | np.isin(out, stop_ids)
            if done.all():
                return
        if following is not None:
            tok, cache = following
