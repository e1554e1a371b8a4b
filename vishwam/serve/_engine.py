"""`Engine`: continuous batching over a fixed set of KV-cache slots, on one background thread.

The cache holds `slots` rows of `max_len` positions. Each turn of the engine's loop first
admits waiting requests into free slots, one prefill each (a request's prompt, right-padded
to the next shape bucket, written into its slot's cache row), until `prefill_budget` padded
prompt tokens have been prefilled this turn; then runs decode steps over the occupied slots,
each at its own position (`vishwam.generation.decode_step`): one step when a request waits
for a free slot, else up to `max_decode_steps` in one compiled call (no more than the request
nearest its `max_tokens` needs; tokens after a stop are dropped). Requests join and leave
between calls, so a long completion never holds the others back and a new request waits for
at most one turn's prefills and one call before its own prefill.

The running requests are kept in the lowest slots (when one leaves, the request in the
highest occupied slot moves into its place, cache row and all), so a decode call runs only
the first `rows` slots, `rows` the smallest row bucket (4, 8, 16, ... and `slots`) that holds
them: as a burst of requests drains, the calls get cheaper instead of computing empty rows
(a prefill of one request at a time is not batched: on the CPU a prefill costs what its
tokens do, and 4 prompts in one call measured no faster).

Compiled programs: one prefill per bucket (`min_bucket` times powers of two and the
halfway points, up to `max_len`), one decode call per power of two up to `max_decode_steps`
and row bucket, and one row move, all of fixed shapes, so no request compiles anything
(`start` compiles them up front). Each program samples with `vishwam.generation.sample_rows`
(per-slot temperature, top-k, top-p and seed) or, when every row is greedy, a plain argmax
(a `lax.cond`, one program). The cache is donated to every call: updated in place.

MoE layers run their inference dispatch (dropless), as in `vishwam.generate`; rows of a
batch do not influence each other, so a request's greedy completion does not depend on
what else is running.
"""

import functools
import queue
import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InvalidValueError
from ..generation import cached_decode_layers, decode_step, prefill, sample_rows
from ..model import KVCache
from ..pipeline import VishwamAIPipeline
from ._text import IncrementalText

FinishReason = str  # "stop", "length", "cancelled" or "error"


@dataclass(frozen=True)
class SamplingParams:
    """How one request is completed.

    Attributes:
        max_tokens: new tokens at most (>= 1).
        temperature: 0 decodes greedily.
        top_k: sample among the `top_k` best tokens only (None: all).
        top_p: nucleus sampling mass in (0, 1] (None: off).
        stop: strings that end the completion (not included in its text).
        stop_token_ids: token ids that end it, besides the model's EOS ids.
        seed: the request's sampling seed (None: a random one).
        ignore_eos: keep going past the model's EOS ids.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Output:
    """What a request produced since its previous `Output` (one per engine call that gave
    it tokens; the last one has a `finish_reason`). `text` joins, over a request's outputs,
    to its completion; `token_ids` likewise to its tokens (a stop token included)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Sink = Callable[[Output], None]


@dataclass(eq=False)
class Request:
    """A submitted completion; `cancel()` frees its slot at the next turn of the engine."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    sink: Sink
    seed: int
    cancelled: bool = False
    text: IncrementalText | None = None
    generated: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # accepted, not yet emitted

    def cancel(self) -> None:
        self.cancelled = True


class _Collect:
    """A sink that gathers a request's outputs for `Engine.complete`."""

    def __init__(self):
        self.outputs: queue.Queue[Output] = queue.Queue()

    def __call__(self, output: Output) -> None:
        self.outputs.put(output)


def _buckets(min_bucket: int, max_len: int) -> tuple[int, ...]:
    """Prompt widths: powers of two times `min_bucket` and the halfway points between them
    (16, 24, 32, 48, 64, ...: at most a third of a prefill is padding), up to `max_len`."""
    sizes, size = [], min_bucket
    while size < max_len:
        sizes += [size, size * 3 // 2]
        size *= 2
    return (*sorted({s for s in sizes if s < max_len}), max_len)


def _choose(logits, seeds, steps, temperature, top_k, top_p):
    """Each row's token: an argmax when every row is greedy, else `sample_rows`."""
    return jax.lax.cond(jnp.all(temperature == 0), lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                        lambda: sample_rows(logits, seeds, steps, temperature, top_k, top_p))


def _cache_rows(cache: KVCache, start, count: int) -> KVCache:
    """Rows `start .. start + count - 1` of every layer's keys and values."""
    return KVCache(*(jax.lax.dynamic_slice_in_dim(x, start, count, axis=1) for x in (cache.k, cache.v)))


def _put_cache_rows(cache: KVCache, rows: KVCache, start) -> KVCache:
    """`cache` with `rows` written over its rows from `start` on."""
    return KVCache(*(jax.lax.dynamic_update_slice_in_dim(x, r, start, axis=1)
                     for x, r in ((cache.k, rows.k), (cache.v, rows.v))))


def _prefill_slot(leaves, cache: KVCache, prompt, length, slot, seed, temperature, top_k, top_p, *, treedef):
    """Prefill one request's `[1, bucket]` prompt into cache row `slot`; its first token."""
    model, layers = jax.tree_util.tree_unflatten(treedef, leaves)
    logits, row = prefill(model, layers, prompt, length[None], _cache_rows(cache, slot, 1))
    cache = _put_cache_rows(cache, row, slot)
    token = _choose(logits, seed[None], jnp.zeros((1,), jnp.int32), temperature[None], top_k[None], top_p[None])
    return token[0], cache


def _row_buckets(slots: int) -> tuple[int, ...]:
    """Rows a decode call runs: 4, 8, 16, ... below `slots`, then `slots`."""
    sizes, size = [], 4
    while size < slots:
        sizes.append(size)
        size *= 2
    return (*sizes, slots)


def _step_slots(leaves, cache: KVCache, tokens, positions, seeds, steps, temperature, top_k, top_p, *, treedef,
                count: int):
    """`count` decode steps of the first `len(tokens)` slots: feed `tokens` at `positions`,
    choose the next ones, feed those at the next positions, ...; the `[count, rows]` tokens
    chosen. The other slots' cache rows are left as they are."""
    model, layers = jax.tree_util.tree_unflatten(treedef, leaves)
    rows = tokens.shape[0]
    every_slot = rows == cache.k.shape[1]
    part = cache if every_slot else _cache_rows(cache, 0, rows)

    def one(i, carry):
        part, fed, chosen = carry
        logits, part = decode_step(model, layers, part, fed, positions + i)
        token = _choose(logits, seeds, steps + i, temperature, top_k, top_p)
        return part, token, chosen.at[i].set(token)

    chosen = jnp.zeros((count, rows), jnp.int32)
    part, _, chosen = jax.lax.fori_loop(0, count, one, (part, tokens, chosen))
    return chosen, part if every_slot else _put_cache_rows(cache, part, 0)


def _move_row(cache: KVCache, source, target) -> KVCache:
    """Copy cache row `source` into row `target` (a request changing slots)."""
    return _put_cache_rows(cache, _cache_rows(cache, source, 1), target)


class Engine:
    """Continuous batching for a `VishwamAIPipeline` (see the module docstring).

    Arguments:
        pipeline: the model, its tokenizer and its EOS ids.
        slots: requests decoded together at most (rows of the KV cache).
        max_len: cache positions per slot, i.e. prompt + completion at most (default and
            upper bound: the model's `max_seq_len`).
        prefill_budget: padded prompt tokens prefilled per turn at most (at least one
            request per turn is admitted when a slot is free).
        min_bucket: the smallest prompt bucket.
        max_decode_steps: decode steps per compiled call at most (a power of two), taken
            while no request waits for a slot: fewer calls from Python, tokens streamed in
            groups of that many.
    """

    def __init__(self, pipeline: VishwamAIPipeline, *, slots: int = 16, max_len: int | None = None,
                 prefill_budget: int = 512, min_bucket: int = 16, max_decode_steps: int = 8):
        limit = pipeline.config.max_seq_len
        max_len = limit if max_len is None else max_len
        if not (isinstance(slots, int) and slots >= 1):
            raise InvalidValueError(f"Engine: slots must be an int >= 1, got {slots!r}.")
        if not (isinstance(max_len, int) and 2 <= max_len <= limit):
            raise InvalidValueError(f"Engine: max_len must be an int in [2, max_seq_len={limit}], got {max_len!r}.")
        if not (isinstance(max_decode_steps, int) and max_decode_steps >= 1):
            raise InvalidValueError(f"Engine: max_decode_steps must be an int >= 1, got {max_decode_steps!r}.")
        if not (isinstance(min_bucket, int) and min_bucket >= 1) or not prefill_budget >= 1:
            raise InvalidValueError(f"Engine: min_bucket and prefill_budget must be >= 1, got {min_bucket!r} and "
                                    f"{prefill_budget!r}.")
        self.pipeline = pipeline
        self.slots, self.max_len, self.prefill_budget = slots, max_len, prefill_budget
        self.buckets = _buckets(min(min_bucket, max_len), max_len)
        model = pipeline.model
        self._leaves, treedef = jax.tree_util.tree_flatten((model, cached_decode_layers(model)))
        self._prefill = jax.jit(functools.partial(_prefill_slot, treedef=treedef), donate_argnums=(1,))
        self.step_sizes = tuple(2**i for i in range(max_decode_steps.bit_length()) if 2**i <= max_decode_steps)
        self.row_buckets = _row_buckets(slots)
        # One jitted function per step count; each compiles once per row bucket.
        self._steps = {count: jax.jit(functools.partial(_step_slots, treedef=treedef, count=count),
                                      donate_argnums=(1,)) for count in self.step_sizes}
        self._move = jax.jit(_move_row, donate_argnums=(0,))
        self._cache = model.init_cache(slots, max_len)
        # Per-slot host state: the token fed next, its position, and the sampling settings.
        self._requests: list[Request | None] = [None] * slots
        self._tokens = np.zeros(slots, np.int32)
        self._positions = np.zeros(slots, np.int32)
        self._seeds = np.zeros(slots, np.uint32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._incoming: queue.Queue[Request | None] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = self._cancel_all = False
        self.steps = 0
        self.prefills = 0
        self.calls_by_rows: Counter[int] = Counter()  # decode calls per row bucket
        self.moves = 0  # requests moved to a lower slot

    # ------------------------------------------------------------------ checks
    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise `InvalidValueError` (one line, naming the fix) for a request that cannot run."""
        vocab = self.pipeline.config.vocab_size
        if not prompt_ids:
            raise InvalidValueError("the prompt is empty; give at least one token.")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidValueError(f"prompt token ids must lie in [0, {vocab}).")
        if not (isinstance(params.max_tokens, int) and params.max_tokens >= 1):
            raise InvalidValueError(f"max_tokens must be an integer >= 1, got {params.max_tokens!r}.")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise InvalidValueError(
                f"the prompt has {len(prompt_ids)} tokens; + max_tokens {params.max_tokens} = "
                f"{len(prompt_ids) + params.max_tokens} exceeds the context of {self.max_len} tokens; shorten the "
                f"prompt or ask for at most {max(self.max_len - len(prompt_ids), 0)} tokens.")
        if not params.temperature >= 0:
            raise InvalidValueError(f"temperature must be >= 0 (0 = greedy), got {params.temperature}.")
        if params.top_k is not None and not 1 <= params.top_k <= vocab:
            raise InvalidValueError(f"top_k must be in [1, {vocab}], got {params.top_k}.")
        if params.top_p is not None and not 0 < params.top_p <= 1:
            raise InvalidValueError(f"top_p must be in (0, 1], got {params.top_p}.")
        if any(not 0 <= i < vocab for i in params.stop_token_ids):
            raise InvalidValueError(f"stop token ids must lie in [0, {vocab}).")
        if any(not s for s in params.stop):
            raise InvalidValueError("stop strings must not be empty.")

    # --------------------------------------------------------------- lifecycle
    def start(self, *, warmup: bool = True) -> "Engine":
        """Start the engine thread; with `warmup`, compile every program first."""
        if self._thread is not None:
            raise InvalidValueError("Engine.start: the engine is already running.")
        if warmup:
            self.warmup()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vishwam-engine", daemon=True)
        self._thread.start()
        return self

    def warmup(self) -> None:
        """Compile every prefill bucket and decode call (greedy and sampling share them).
        `start` calls it; never call it while the engine runs (it uses the cache)."""
        one = lambda dtype, value=0: np.asarray(value, dtype)
        for bucket in self.buckets:
            _, self._cache = self._prefill(self._leaves, self._cache, np.zeros((1, bucket), np.int32),
                                           one(np.int32, 1), one(np.int32), one(np.uint32), one(np.float32),
                                           one(np.int32), one(np.float32, 1))
        for step in self._steps.values():
            for rows in self.row_buckets:
                tokens, self._cache = step(self._leaves, self._cache, *self._slot_arrays(rows, self._positions))
        self._cache = self._move(self._cache, one(np.int32), one(np.int32))
        jax.block_until_ready((tokens, self._cache))

    def compiled_programs(self) -> int:
        """How many programs the engine has compiled (fixed once warmed up)."""
        return (self._prefill._cache_size() + self._move._cache_size()
                + sum(step._cache_size() for step in self._steps.values()))

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the engine thread: after finishing every submitted request (`drain`), or at
        once, cancelling them. Waits up to `timeout` seconds for the thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._cancel_all = not drain
        self._incoming.put(None)
        self._thread.join(timeout)
        self._thread = None

    @property
    def active(self) -> int:
        """Requests holding a slot."""
        return sum(r is not None for r in self._requests)

    # ---------------------------------------------------------------- requests
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: Sink) -> Request:
        """Queue a request (checked first, see `check`); `sink(output)` is called on the
        engine thread for each of its outputs, the last with a `finish_reason`."""
        if self._thread is None or self._stopping:
            raise InvalidValueError("Engine.submit: the engine is not running; call start() first.")
        self.check(prompt_ids, params)
        seed = random.SystemRandom().randrange(2**31) if params.seed is None else int(params.seed) % 2**32
        request = Request(tuple(int(i) for i in prompt_ids), params, sink, seed)
        request.text = IncrementalText(self.pipeline.tokenizer, request.prompt_ids, params.stop)
        self._incoming.put(request)
        return request

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams) -> tuple[str, list[int], FinishReason]:
        """Submit and wait: `(text, token ids, finish_reason)`."""
        sink = _Collect()
        self.submit(prompt_ids, params, sink)
        text, ids = [], []
        while True:
            output = sink.outputs.get()
            text.append(output.text)
            ids.extend(output.token_ids)
            if output.finish_reason is not None:
                return "".join(text), ids, output.finish_reason

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            # Block for work only while idle and not stopping (the stop sentinel may be read already).
            busy = self.active > 0 or bool(self._waiting) or self._stopping
            try:
                item = self._incoming.get(block=not busy)
                while True:
                    if item is not None:
                        self._waiting.append(item)
                    item = self._incoming.get_nowait()
            except queue.Empty:
                pass
            if self._stopping and not self._waiting and self.active == 0:
                return
            try:
                self._drop_cancelled()
                self._compact()
                self._admit()
                if self.active:
                    self._decode()
            except Exception as error:  # noqa: BLE001  (the requests hear of it; the engine keeps serving)
                for slot, request in enumerate(self._requests):
                    if request is not None:
                        self._finish(slot, request, "error", error=f"{type(error).__name__}: {error}")

    def _drop_cancelled(self) -> None:
        if self._cancel_all:
            for request in [*self._waiting, *(r for r in self._requests if r is not None)]:
                request.cancel()
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            self._emit(request, "", (), "cancelled")
        for slot, request in enumerate(self._requests):
            if request is not None and request.cancelled:
                self._finish(slot, request, "cancelled")

    def _compact(self) -> None:
        """Move the requests in the highest occupied slots into the free slots below them,
        so that the running requests fill slots `0 .. active - 1`."""
        while True:
            free = [slot for slot, r in enumerate(self._requests) if r is None]
            last = max((slot for slot, r in enumerate(self._requests) if r is not None), default=-1)
            if not free or free[0] > last:
                return
            target = free[0]
            self._cache = self._move(self._cache, np.int32(last), np.int32(target))
            self.moves += 1
            self._requests[target] = self._requests[last]
            for values in (self._tokens, self._positions, self._seeds, self._temperature, self._top_k, self._top_p):
                values[target] = values[last]
            self._free(last)

    def _free(self, slot: int) -> None:
        """Empty `slot`: no request, greedy settings, token and position 0."""
        self._requests[slot] = None
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = 0.0, 0, 1.0
        self._tokens[slot] = self._positions[slot] = 0

    def _slot_arrays(self, rows: int, steps) -> tuple:
        """The per-slot inputs of a decode call over the first `rows` slots."""
        return (self._tokens[:rows], self._positions[:rows], self._seeds[:rows], steps[:rows],
                self._temperature[:rows], self._top_k[:rows], self._top_p[:rows])

    def _admit(self) -> None:
        spent = 0
        while self._waiting and None in self._requests:
            request = self._waiting[0]
            bucket = next(b for b in self.buckets if b >= len(request.prompt_ids))
            if spent and spent + bucket > self.prefill_budget:
                return
            self._waiting.popleft()
            spent += bucket
            slot = self._requests.index(None)
            params = request.params
            prompt = np.zeros((1, bucket), np.int32)
            prompt[0, :len(request.prompt_ids)] = request.prompt_ids
            self._seeds[slot] = request.seed
            self._temperature[slot] = params.temperature
            self._top_k[slot] = params.top_k or 0
            self._top_p[slot] = 1.0 if params.top_p is None else params.top_p
            try:
                token, self._cache = self._prefill(
                    self._leaves, self._cache, prompt, np.int32(len(request.prompt_ids)), np.int32(slot),
                    self._seeds[slot], self._temperature[slot], self._top_k[slot], self._top_p[slot])
            except Exception as error:
                self._emit(request, "", (), "error", f"{type(error).__name__}: {error}")
                raise
            self.prefills += 1
            self._requests[slot] = request
            self._positions[slot] = len(request.prompt_ids)
            self._accept(slot, request, int(token))
        self._flush()

    def _decode(self) -> None:
        running = [r for r in self._requests if r is not None]
        steps = np.array([len(r.generated) if r is not None else 0 for r in self._requests], np.int32)
        # Several steps per call when no one waits for a slot, at most as many as the request
        # nearest its max_tokens still needs (tokens past a stop string or EOS are dropped).
        count = 1
        if not (self._waiting and None in self._requests):
            left = min(r.params.max_tokens - len(r.generated) for r in running)
            count = max(c for c in self.step_sizes if c <= left)
        occupied = max(slot for slot, r in enumerate(self._requests) if r is not None) + 1
        rows = next(b for b in self.row_buckets if b >= occupied)
        tokens, self._cache = self._steps[count](self._leaves, self._cache, *self._slot_arrays(rows, steps))
        tokens = np.asarray(tokens)
        self.steps += count
        self.calls_by_rows[rows] += 1
        for row in tokens:
            for slot, request in enumerate(self._requests[:rows]):
                if request is not None:
                    self._positions[slot] += 1
                    self._accept(slot, request, int(row[slot]))
        self._flush()

    def _accept(self, slot: int, request: Request, token: int) -> None:
        """A slot's new token: emit its text, or finish the request."""
        params, text = request.params, request.text
        request.generated.append(token)
        stops = params.stop_token_ids if params.ignore_eos else (*self.pipeline.eos_ids, *params.stop_token_ids)
        if token in stops:
            self._finish(slot, request, "stop", token)
            return
        text.add(token)
        if text.stopped:
            self._finish(slot, request, "stop", token)
        elif len(request.generated) >= params.max_tokens:
            self._finish(slot, request, "length", token)
        else:
            self._tokens[slot] = token
            request.pending.append(token)

    def _flush(self) -> None:
        """One output per running request for the tokens of this call (not one per token:
        fewer hand-overs to the HTTP side, fewer events on the wire)."""
        for request in self._requests:
            if request is not None and request.pending:
                ids = tuple(request.pending)
                request.pending.clear()
                self._emit(request, request.text.pop(final=False), ids, None)

    def _finish(self, slot: int, request: Request, reason: FinishReason, token: int | None = None,
                error: str | None = None) -> None:
        self._free(slot)
        ids = (*request.pending, *(() if token is None else (token,)))
        request.pending.clear()
        self._emit(request, request.text.pop(final=True), ids, reason, error)

    def _emit(self, request: Request, text: str, token_ids: tuple[int, ...], reason: FinishReason | None,
              error: str | None = None) -> None:
        try:
            request.sink(Output(text, token_ids, reason, len(request.prompt_ids), len(request.generated), error))
        except Exception:  # noqa: BLE001  (a broken listener loses its own request, nobody else's)
            request.cancel()
