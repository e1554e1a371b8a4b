"""flash_attention: pallas (interpret mode) and xla against the naive reference;
grouped_swiglu against an einsum over each token's experts.

Each case is one compiled function per implementation (values and dq/dk/dv
together); the reference result of a case is computed once and shared. The
cases cover the issue's grid pairwise rather than as a full product, to keep
compile time (the cost of Pallas interpret mode) within budget.
"""

import dataclasses
import functools
import warnings
import zlib

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from vishwam.kernels import _masking, flash, flash_attention, flash_pallas, flash_tpu, flash_xla, grouped_swiglu


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    mask: str | None = None  # which dims the mask has: "b1qk", "bhqk", "b11k"
    segments: str | None = None  # "single" | "pair"
    dtype: str = "float32"
    dropout: float = 0.0
    batch: int = 2
    block: int = 16
    window: int | None = None  # causal sliding window


CASES = [
    # lengths not divisible by the block, causal, plain MHA
    Case("causal-mha-d64", 40, 40, 4, 4, 64, causal=True),
    # mask per (batch, q, kv), GQA 2, q_len != kv_len, head_dim 128
    Case("mask-gqa2-d128", 24, 40, 4, 2, 128, mask="b1qk"),
    # packed documents, causal, GQA 4
    Case("segments-gqa4", 33, 33, 4, 1, 64, causal=True, segments="single"),
    # decode-style: few queries at the end of a longer cache, key-padding mask per head
    Case("decode-mask-gqa2", 8, 40, 4, 2, 32, causal=True, mask="bhqk"),
    # more queries than keys: the first rows see nothing (zeros); head_dim not a power of two
    Case("q-longer-than-kv-d80", 40, 24, 2, 2, 80, causal=True, mask="b11k"),
    # dropout: the same hashed mask as the reference, forward and backward
    Case("dropout-gqa2", 40, 40, 4, 2, 64, causal=True, dropout=0.25),
    # bf16 inputs, fp32 accumulation; segment pair with q_len != kv_len
    Case("bf16-segpair-d128", 24, 48, 4, 2, 128, causal=True, segments="pair", dtype="bfloat16"),
    # pallas: forward tiles of 128, backward tiles of 64 (one fully padded q/kv tile)
    Case("big-tiles-segments-d256", 100, 100, 2, 1, 256, causal=True, segments="single", batch=1, block=128),
]
# Sliding windows (Mistral), against the reference with an explicit band mask: a window
# shorter than a tile (whole tiles skipped before the band), and decode-style queries at the
# end of a longer cache with segments and a key mask on top.
WINDOW_CASES = [
    Case("window7-gqa2", 40, 40, 4, 2, 32, causal=True, window=7),
    Case("window5-decode-segpair-mask", 8, 40, 4, 2, 32, causal=True, window=5, segments="pair", mask="b11k"),
]
EMPTY_ROW = 3  # in "b1qk" masks, batch 0's query 3 sees no key


def _inputs(case: Case):
    """Fresh random inputs per case (numpy RNG: no per-op compiles)."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    b, lq, lk = case.batch, case.q_len, case.kv_len

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(case.dtype)

    q = normal(b, lq, case.heads, case.head_dim)
    k = normal(b, lk, case.kv_heads, case.head_dim)
    v = normal(b, lk, case.kv_heads, case.head_dim)
    kwargs = {}
    if case.mask is not None:
        shape = {"b1qk": (b, 1, lq, lk), "bhqk": (b, case.heads, lq, lk), "b11k": (b, 1, 1, lk)}[case.mask]
        mask = rng.random(shape) < 0.75
        if case.mask == "b1qk":
            mask[0, :, EMPTY_ROW] = False  # a query that sees nothing
        kwargs["mask"] = jnp.asarray(mask)
    if case.segments is not None:
        ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, lk)), axis=1).astype(np.int32))
        kwargs["segment_ids"] = ids if case.segments == "single" else (ids[:, lk - lq :], ids)
    if case.dropout > 0.0:
        kwargs["dropout_rate"] = case.dropout
        kwargs["key"] = jax.random.key(zlib.crc32(case.id.encode()))
    return (q, k, v), kwargs, normal(*q.shape)


def _band(case: Case) -> np.ndarray:
    """The sliding window as a plain boolean mask `[1, 1, q_len, kv_len]`."""
    q_pos = np.arange(case.q_len)[:, None] + case.kv_len - case.q_len
    return (np.arange(case.kv_len)[None, :] > q_pos - case.window)[None, None]


@functools.cache
def _result(case: Case, implementation: str):
    """Output and grads; implementation "band-mask" is the reference with the window as a mask."""
    (q, k, v), kwargs, cotangent = _inputs(case)

    arrays = {n: x for n, x in kwargs.items() if n != "dropout_rate"}
    window = case.window
    if implementation == "band-mask":
        implementation, window = "reference", None
        arrays["mask"] = jnp.asarray(_band(case)) & arrays.get("mask", True)

    @jax.jit
    def run(q, k, v, arrays, cotangent):
        def f(q, k, v):
            return flash_attention(
                q,
                k,
                v,
                block_size=case.block,
                causal=case.causal,
                dropout_rate=case.dropout,
                implementation=implementation,
                window=window,
                **arrays,
            )

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cotangent)

    out, grads = run(q, k, v, arrays, cotangent)
    return [np.asarray(x.astype(jnp.float32)) for x in (out, *grads)]


def _assert_matches(case: Case, implementation: str):
    got, want = _result(case, implementation), _result(case, "reference" if case.window is None else "band-mask")
    tol = 1e-5 if case.dtype == "float32" else 1e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        scale = max(1.0, float(np.abs(b).max())) if case.dtype == "float32" else float(np.abs(b).max())
        err = float(np.abs(a - b).max()) / scale
        assert err <= tol, f"{case.id}: {implementation} {name} differs from reference by {err:.2e} (tol {tol})"


@pytest.mark.parametrize("case", CASES + WINDOW_CASES, ids=lambda c: c.id)
def test_xla_matches_reference(case):
    _assert_matches(case, "xla")


@pytest.mark.parametrize("case", CASES + WINDOW_CASES, ids=lambda c: c.id)
def test_pallas_matches_reference(case):
    _assert_matches(case, "pallas")


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: c.id)
def test_reference_window_matches_band_mask(case):
    _assert_matches(case, "reference")
    # The window really hides keys: without it the output differs.
    full = dataclasses.replace(case, window=None)
    assert np.abs(_result(case, "reference")[0] - _result(full, "reference")[0]).max() > 1e-2


@pytest.mark.parametrize("lq,lk,bq,bk,window", [(40, 40, 16, 16, 7), (8, 40, 16, 8, 12), (33, 65, 16, 32, 20),
                                                (40, 40, 8, 16, 100)])
def test_window_tile_bounds_skip_only_invisible_tiles(lq, lk, bq, bk, window):
    offset = lk - lq
    nq, nk = -(-lq // bq), -(-lk // bk)
    rows, cols = np.arange(nq * bq)[:, None], np.arange(nk * bk)[None, :]
    vis = (cols < lk) & (cols <= rows + offset) & (cols > rows + offset - window) & (rows < lq)
    some = vis.reshape(nq, bq, nk, bk).any(axis=(1, 3))
    common = dict(block_q=bq, block_k=bk, offset=offset, window=window)
    for i in range(nq):
        start = int(_masking.window_kv_start(jnp.int32(i), **common))
        assert not some[i, :start].any() and (start == nk or some[i, start] or not some[i].any())
    for j in range(nk):
        stop = int(_masking.window_q_stop(jnp.int32(j), nq=nq, **common))
        assert not some[stop:, j].any() and (stop == 0 or some[stop - 1, j] or not some[:, j].any())


def test_reference_matches_jax_nn():
    (q, k, v), _, _ = _inputs(CASES[1])  # GQA 2: jax.nn gets repeated k/v
    k, v = k[:, :24], v[:, :24]  # jax.nn's causal diagonal is top-left: use q_len == kv_len

    @jax.jit
    def both(q, k, v):
        ours = [flash_attention(q, k, v, causal=c, implementation="reference") for c in (False, True)]
        kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        return ours, [jax.nn.dot_product_attention(q, kr, vr, is_causal=c) for c in (False, True)]

    ours, theirs = both(q, k, v)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas"])
def test_empty_rows_are_zero_with_zero_finite_grads(implementation):
    # A row hidden by the mask (case mask-gqa2-d128) ...
    out, dq, dk, dv = _result(CASES[1], implementation)
    assert np.all(out[0, EMPTY_ROW] == 0.0) and np.all(dq[0, EMPTY_ROW] == 0.0)
    assert np.abs(out[0, EMPTY_ROW + 1]).max() > 0.0
    # ... and rows causally before every key (case q-longer-than-kv: 40 queries, 24 keys).
    case = CASES[4]
    out, dq, dk, dv = _result(case, implementation)
    hidden = case.q_len - case.kv_len
    assert np.all(out[:, :hidden] == 0.0) and np.all(dq[:, :hidden] == 0.0)
    assert np.abs(out[:, hidden:]).max() > 0.0
    assert all(np.isfinite(x).all() for x in (dq, dk, dv))


def test_dropout_is_deterministic_per_key_and_keeps_the_right_fraction():
    case = CASES[5]
    (q, k, v), kwargs, _ = _inputs(case)
    f = jax.jit(lambda key: flash_attention(q, k, v, causal=True, dropout_rate=0.25, key=key, implementation="xla"))
    a, b, c = f(kwargs["key"]), f(kwargs["key"]), f(jax.random.key(99))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-2

    @jax.jit
    def keep_mask(key):
        seed = _masking.dropout_seed(key)
        row, col = jnp.arange(4 * 512)[:, None], jnp.arange(512)[None, :]
        return _masking.dropout_keep(seed[0], seed[1], row, col, _masking.dropout_threshold(0.3))

    keep = np.asarray(keep_mask(jax.random.key(5)))
    assert abs(keep.mean() - 0.7) < 0.005
    # Neighbouring rows and columns are uncorrelated (a weak hash would stripe).
    assert abs((keep[1:] == keep[:-1]).mean() - (0.7**2 + 0.3**2)) < 0.01
    assert abs((keep[:, 1:] == keep[:, :-1]).mean() - (0.7**2 + 0.3**2)) < 0.01


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk,bq,bk", [(40, 40, 16, 16), (8, 40, 16, 8), (40, 24, 8, 16), (33, 65, 16, 32), (5, 5, 16, 16)])
def test_tile_ranges_classify_every_tile_exactly(lq, lk, bq, bk, causal):
    offset = lk - lq
    nq, nk = -(-lq // bq), -(-lk // bk)
    rows, cols = np.arange(nq * bq)[:, None], np.arange(nk * bk)[None, :]
    vis = (cols < lk) & ((cols <= rows + offset) if causal else np.ones_like(rows, bool))
    tile = vis.reshape(nq, bq, nk, bk)
    # Padded query rows are discarded, but they must not make a tile look visible.
    real = (np.arange(nq * bq) < lq).reshape(nq, bq)[:, :, None, None]
    full = tile.all(axis=(1, 3))
    some = (tile & real).any(axis=(1, 3))
    common = dict(block_q=bq, block_k=bk, kv_len=lk, offset=offset, causal=causal, masked_everywhere=False)
    for i in range(nq):
        full_hi, hi = (int(x) for x in _masking.kv_tile_range(jnp.int32(i), nk=nk, **common))
        assert full[i, :full_hi].all() and not some[i, hi:].any()
        assert not full[i, full_hi:hi].any()  # masked only where needed
    for j in range(nk):
        lo, full_lo = (int(x) for x in _masking.q_tile_range(jnp.int32(j), nq=nq, **common))
        assert not some[:lo, j].any() and full[full_lo:, j].all()
        assert not full[lo:full_lo, j].any()


def _temp_bytes(implementation, length):
    x = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)

    def loss(q, k, v):
        return flash_attention(q, k, v, block_size=128, causal=True, implementation=implementation).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_xla_memory_grows_linearly_with_length():
    small, large = _temp_bytes("xla", 1024), _temp_bytes("xla", 2048)
    assert large < 2.5 * small, (small, large)
    assert large < _temp_bytes("reference", 2048) / 4


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[6], WINDOW_CASES[0]], ids=lambda c: c.id)
def test_pallas_lowers_to_triton_without_a_gpu(case):
    """Export for CUDA lowers all three kernels to Triton IR on this CPU-only machine."""
    (q, k, v), kwargs, _ = _inputs(case)
    arrays = {n: x for n, x in kwargs.items() if n != "dropout_rate"}

    def grads(q, k, v, arrays):
        def loss(q, k, v):
            out = flash_attention(
                q, k, v, block_size=128, causal=case.causal, dropout_rate=case.dropout, implementation="pallas",
                window=case.window, **arrays
            )
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    # On this CPU host the dispatcher would pick interpret mode: pretend to be a GPU.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "default_backend", lambda: "gpu")
        exported = jax.export.export(
            jax.jit(grads),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(q, k, v, arrays)
    assert exported.mlir_module().count("@__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv


# ------------------------------------------------------------------ errors


@pytest.fixture
def no_jaxtyping(monkeypatch):
    """Shape errors are caught by jaxtyping in tests; check our own messages too."""
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)


def _qkv(b=1, lq=8, lk=8, h=4, hk=2, d=16):
    return jnp.zeros((b, lq, h, d)), jnp.zeros((b, lk, hk, d)), jnp.zeros((b, lk, hk, d))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (*_qkv(h=4, hk=3), {}), "multiple of kv heads"),
        (lambda: (_qkv()[0], jnp.zeros((2, 8, 2, 16)), jnp.zeros((2, 8, 2, 16)), {}), "disagree on batch"),
        (lambda: (_qkv()[0], _qkv()[1], jnp.zeros((1, 9, 2, 16)), {}), "same shape"),
        (lambda: (*_qkv(), {"mask": jnp.ones((1, 3, 8, 8), bool)}), "does not broadcast"),
        (lambda: (*_qkv(), {"mask": jnp.ones((1, 1, 8, 8), jnp.int32)}), "must be boolean"),
        (lambda: (*_qkv(lq=4), {"segment_ids": jnp.zeros((1, 8), jnp.int32)}), "needs q_len == kv_len"),
        (lambda: (*_qkv(), {"segment_ids": jnp.zeros((1, 7), jnp.int32)}), "segment ids have shape"),
        (lambda: (*_qkv(), {"dropout_rate": 0.1}), "needs a PRNG"),
        (lambda: (*_qkv(), {"implementation": "cuda"}), "unknown implementation"),
        (lambda: (*_qkv(), {"block_size": 0}), "positive int"),
        (lambda: (*_qkv(), {"window": 4}), "pass causal=True with it"),
        (lambda: (*_qkv(), {"window": 0, "causal": True}), "`window` must be None or a positive int"),
    ],
)
def test_clear_errors(no_jaxtyping, make, match):
    q, k, v, kwargs = make()
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kwargs)


def test_jaxtyping_rejects_mismatched_head_dim():
    q, k, v = _qkv()
    with pytest.raises(Exception, match="head_dim"):
        flash_attention(q, k[..., :8], v[..., :8])


# ---------------------------------------------------------------- dispatch
# Dispatch happens at trace time: jax.eval_shape checks it without compiling
# (through a fresh lambda each time, so no cached trace hides the dispatch).


def _spy(monkeypatch, module):
    calls = []
    real = module.attention
    monkeypatch.setattr(module, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_auto_on_cpu_is_xla(monkeypatch):
    calls = _spy(monkeypatch, flash_xla)
    jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, causal=True), *_qkv())
    assert calls == [1]


def test_pallas_on_unsupported_backend_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "metal")
    with pytest.raises(ValueError, match="not backend 'metal'"):
        jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, implementation="pallas"), *_qkv())
    calls = _spy(monkeypatch, flash_xla)
    jax.eval_shape(lambda *a: flash_attention(*a), *_qkv())
    assert calls == [1]


def test_tpu_chooses_the_mosaic_kernel(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    mosaic = _spy(monkeypatch, flash_tpu)
    for implementation in ("auto", "pallas", "pallas_tpu"):
        jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, implementation=implementation), *_qkv())
    assert mosaic == [1, 1, 1]


def test_windowed_calls_stay_off_the_mosaic_kernel(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    flash._warn_once.cache_clear()
    mosaic, xla = _spy(monkeypatch, flash_tpu), _spy(monkeypatch, flash_xla)
    with pytest.raises(ValueError, match="take no sliding `window`"):
        jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, causal=True, window=4, implementation="pallas_tpu"),
                       *_qkv())
    with pytest.warns(UserWarning, match="no sliding window yet; using 'xla'"):
        jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, causal=True, window=4), *_qkv())
    assert mosaic == [] and xla == [1]


def test_pallas_tpu_refuses_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="'pallas_tpu' runs on TPU .* not backend 'gpu'"):
        jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, implementation="pallas_tpu"), *_qkv())


def test_gpu_auto_falls_back_to_xla_once_when_pallas_does_not_compile(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    flash._pallas_lowering_error.cache_clear()
    flash._warn_once.cache_clear()

    def broken(*args, **kwargs):
        raise NotImplementedError("no Triton rule for this op")

    monkeypatch.setattr(flash_pallas, "attention", broken)
    case = CASES[0]
    with pytest.warns(UserWarning, match="does not compile.*using 'xla'.*no Triton rule") as caught:
        got = _result.__wrapped__(case, "auto")
    assert sum("using 'xla'" in str(w.message) for w in caught) == 1
    for a, b in zip(got, _result(case, "xla"), strict=True):
        np.testing.assert_array_equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same configuration again: no second warning
        jax.eval_shape(
            lambda q, k, v: flash_attention(q, k, v, block_size=case.block, causal=True), *_inputs(case)[0]
        )


def test_gpu_auto_is_pallas(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    flash._pallas_lowering_error.cache_clear()
    calls = []  # the kernel itself cannot lower without a GPU: record how it is called
    monkeypatch.setattr(flash_pallas, "attention", lambda q, *a, interpret, **kw: calls.append(interpret) or q)
    flash_attention(*_qkv())
    assert calls == [False, False]  # the compile probe, then the call


# ----------------------------------------------------------- grouped swiglu


def test_grouped_swiglu_equals_an_einsum_in_values_and_grads():
    """Every token's k experts through a plain einsum against the block loops, with blocks of 4
    over 5 experts: expert 1 unused, expert 3 chosen by every token (several blocks), padding
    rows in every run, unused trailing blocks; values and the gradients of the tokens, the
    routing weights and the three weight stacks. The forward over per-expert arrays
    (`SplitExperts`, inference) gives the same values."""
    from vishwam.kernels.grouped_swiglu import grouped_swiglu_forward
    from vishwam.nn.moe import assign_blocks

    rng = np.random.default_rng(0)
    tokens, k, experts, d, f, block = 11, 2, 5, 8, 16, 4
    indices = np.stack([np.full(tokens, 3), rng.choice([0, 2, 4], tokens)], axis=1).astype(np.int32)
    layout = assign_blocks(jnp.asarray(indices), experts, block)
    assert int(layout.ends[-1]) * block < layout.source.shape[0]  # trailing blocks nobody uses
    shapes = ((tokens, d), (experts, d, f), (experts, d, f), (experts, f, d), (tokens, d))
    x, gate, up, down, ct = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (tokens, k)), jnp.float32)

    def reference(x, weights, gate, up, down):
        g, u, dn = gate[indices], up[indices], down[indices]  # (T, k, ...)
        h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, g)) * jnp.einsum("td,tkdf->tkf", x, u)
        return jnp.einsum("tkf,tkfd,tk->td", h, dn, weights)

    def kernel(x, weights, gate, up, down):
        return grouped_swiglu(x, weights, layout.source, layout.row, layout.ends, gate, up, down, block)

    def values_and_grads(fn):
        loss = lambda *args: jnp.sum(fn(*args) * ct)  # noqa: E731
        return fn(x, weights, gate, up, down), jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, weights, gate, up, down)

    got, want = jax.jit(values_and_grads, static_argnums=0)(kernel), values_and_grads(reference)
    assert float(jnp.max(jnp.abs(want[0]))) > 1e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got[1][2][1]))  # the unused expert gets a zero gradient
    split = [tuple(w[e] for e in range(experts)) for w in (gate, up, down)]
    y_split, _ = jax.jit(functools.partial(grouped_swiglu_forward, block=block, save=False))(
        x, weights, layout.source, layout.row, layout.ends, *split)
    np.testing.assert_allclose(y_split, want[0], rtol=1e-5, atol=1e-5)
