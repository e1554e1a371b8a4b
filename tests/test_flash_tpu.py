"""The TPU (Mosaic) flash attention: interpret mode against the reference on this
CPU, and ahead-of-time compiles for an abstract TPU topology (libtpu).

Compiling for `v5e:2x2` runs the real XLA TPU compiler and Mosaic; each compile
test asserts that the program holds the three Mosaic calls (forward, dq, dk/dv),
so a silent fallback to `xla` cannot pass.
"""

import dataclasses
import functools
import importlib.util
import os
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vishwam import ModelConfig, VishwamAI, plan
from vishwam.kernels import flash_attention, target_platform
from vishwam.parallel import make_mesh

MOSAIC_CALL = "tpu_custom_call"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    mask: str | None = None  # which dims the mask has: "b1qk", "bhqk"
    segments: str | None = None  # "single" | "pair"
    dtype: str = "float32"
    dropout: float = 0.0
    batch: int = 1
    block: int = 128


CASES = [
    # 3 x 3 tiles: causally hidden tiles skipped, the diagonal masked, padded keys; dropout
    Case("causal-gqa2-d128-dropout", 300, 300, 4, 2, 128, causal=True, dropout=0.25),
    # packed documents in bf16, plain multi-head
    Case("bf16-segments-d64", 200, 200, 2, 2, 64, causal=True, segments="single", dtype="bfloat16", batch=2),
    # decode-style: one short q tile at the end of a longer cache, GQA 4, a mask with an empty row
    Case("decode-mask-gqa4", 40, 260, 4, 1, 64, causal=True, mask="b1qk"),
    # more queries than keys, a mask per head, not causal; head_dim 192 is padded to 256
    Case("q-longer-mask-d192", 150, 140, 2, 1, 192, mask="bhqk"),
    # segment pair with q_len != kv_len, bf16, kv tiles of 256
    Case("bf16-segpair-block256", 100, 270, 4, 2, 128, causal=True, segments="pair", dtype="bfloat16", block=256),
]
EMPTY_ROW = 3  # in masks, batch 0's query 3 sees no key


def _inputs(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    b, lq, lk = case.batch, case.q_len, case.kv_len

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(case.dtype)

    q = normal(b, lq, case.heads, case.head_dim)
    k, v = normal(b, lk, case.kv_heads, case.head_dim), normal(b, lk, case.kv_heads, case.head_dim)
    kwargs = {}
    if case.mask is not None:
        mask = rng.random({"b1qk": (b, 1, lq, lk), "bhqk": (b, case.heads, lq, lk)}[case.mask]) < 0.75
        mask[0, :, EMPTY_ROW] = False
        kwargs["mask"] = jnp.asarray(mask)
    if case.segments is not None:
        ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, lk)), axis=1).astype(np.int32))
        kwargs["segment_ids"] = ids if case.segments == "single" else (ids[:, lk - lq :], ids)
    if case.dropout > 0.0:
        kwargs["key"] = jax.random.key(zlib.crc32(case.id.encode()))
    return (q, k, v), kwargs, normal(*q.shape)


@functools.cache
def _result(case: Case, implementation: str):
    (q, k, v), kwargs, cotangent = _inputs(case)

    @jax.jit
    def run(q, k, v, kwargs, cotangent):
        def f(q, k, v):
            return flash_attention(
                q,
                k,
                v,
                block_size=case.block,
                causal=case.causal,
                dropout_rate=case.dropout,
                implementation=implementation,
                **kwargs,
            )

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(cotangent)

    out, grads = run(q, k, v, kwargs, cotangent)
    return [np.asarray(x.astype(jnp.float32)) for x in (out, *grads)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_interpret_matches_reference(case):
    got, want = _result(case, "pallas_tpu"), _result(case, "reference")
    tol = 1e-5 if case.dtype == "float32" else 1e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        scale = max(1.0, float(np.abs(b).max())) if case.dtype == "float32" else float(np.abs(b).max())
        err = float(np.abs(a - b).max()) / scale
        assert err <= tol, f"{case.id}: pallas_tpu {name} differs from reference by {err:.2e} (tol {tol})"
    if case.mask is not None:  # the row that sees nothing: zero output, zero dq
        assert np.all(got[0][0, EMPTY_ROW] == 0.0) and np.all(got[1][0, EMPTY_ROW] == 0.0)


MESH_CASE = Case(
    "mesh-gqa2-mask-segments-dropout", 130, 130, 4, 2, 64, causal=True, mask="bhqk", segments="single", dropout=0.25,
    batch=2,
)


def test_interpret_under_a_mesh_matches_reference():
    """Under a mesh the kernel runs in shard_map: batch over data=2, heads over tensor=2
    (dropout hashes global batch rows and heads, so each shard must know its offsets)."""
    mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    want = _result(MESH_CASE, "reference")
    (q, k, v), kwargs, cotangent = _inputs(MESH_CASE)
    replicated = NamedSharding(mesh, P())
    q, k, v, kwargs, cotangent = jax.device_put((q, k, v, kwargs, cotangent), replicated)

    def f(q, k, v):
        return flash_attention(
            q, k, v, block_size=128, causal=True, dropout_rate=0.25, implementation="pallas_tpu", **kwargs
        )

    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v))
        out, vjp = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v))(q, k, v)
        got = [np.asarray(x) for x in (out, *jax.jit(vjp)(cotangent))]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))
        assert err <= 1e-5, f"under a mesh: pallas_tpu {name} differs from reference by {err:.2e}"


# ------------------------------------------------------- TPU ahead of time


@pytest.fixture(scope="module")
def tpu_devices():
    """The 4 abstract TPU devices of a `v5e:2x2` topology."""
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("CI"):  # CI installs it: no skip there
        pytest.skip("needs libtpu for ahead-of-time TPU compiles (pip install 'jax[tpu]')")
    devices = plan.tpu_devices("v5e:2x2")
    # A TPU executable written to the persistent cache cannot be read back without
    # a TPU client (a warning, then a recompile): keep these compiles out of it.
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    yield devices
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


@pytest.fixture(scope="module")
def tpu_mesh(tpu_devices):
    return make_mesh(data=2, tensor=2, devices=tpu_devices)


def _abstract(mesh, x, spec):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))


def _compile_attention(mesh, case: Case, implementation: str):
    """Forward + backward of one case, compiled for the mesh's TPU devices; the HLO text."""
    (q, k, v), kwargs, _ = _inputs(case)
    batch = P("data")
    args = [_abstract(mesh, x, batch) for x in (q, k, v)]
    arrays = jax.tree.map(lambda x: _abstract(mesh, x, batch), {n: x for n, x in kwargs.items() if n != "key"})
    if "key" in kwargs:
        arrays["key"] = _abstract(mesh, kwargs["key"], P())
    platforms = []

    def loss(q, k, v, arrays):
        platforms.append(target_platform())
        out = flash_attention(
            q,
            k,
            v,
            block_size=case.block,
            causal=case.causal,
            dropout_rate=case.dropout,
            implementation=implementation,
            **arrays,
        )
        return jnp.sum(out.astype(jnp.float32))

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args, arrays).compile()
    assert platforms == ["tpu"]  # found from the mesh: jax.default_backend() is "cpu"
    return compiled.as_text()


COMPILE_CASES = [
    Case("compile-causal-gqa2-dropout", 512, 512, 4, 2, 128, causal=True, dtype="bfloat16", dropout=0.1, batch=2),
    Case("compile-segments-mask", 256, 384, 4, 4, 64, causal=True, mask="b1qk", segments="pair", batch=2),
]


@pytest.mark.parametrize(
    ("case", "implementation"), [(COMPILE_CASES[0], "pallas"), (COMPILE_CASES[1], "auto")], ids=["pallas", "auto"]
)
def test_compiles_for_tpu(tpu_mesh, case, implementation):
    assert jax.default_backend() == "cpu"
    hlo = _compile_attention(tpu_mesh, case, implementation)
    assert hlo.count(MOSAIC_CALL) == 3  # forward, dq, dk/dv


def test_target_platform_is_the_backend_without_a_mesh():
    assert target_platform() == jax.default_backend() == "cpu"


def test_model_forward_backward_compiles_for_tpu_with_the_mosaic_kernel(tpu_devices):
    # The seed layout in miniature: batch over fsdp x expert, experts over expert
    # (capacity dispatch, all-to-all); attention shard_map'd over the batch axes.
    mesh = make_mesh(fsdp=2, expert=2, devices=tpu_devices)
    config = ModelConfig.preset(
        "tiny", hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=128, attention_impl="auto",
        attention_block_size=128, max_seq_len=256, moe_dispatch="capacity", capacity_factor=1.25,
    )
    model = eqx.filter_eval_shape(VishwamAI, config, key=jax.random.key(0))
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    replicated = jax.tree.map(lambda x: _abstract(mesh, x, P()), params)
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=NamedSharding(mesh, P(("fsdp", "expert"))))

    def loss(params, tokens):
        logits, aux = eqx.combine(params, static)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux["load_balancing_loss"]

    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(replicated, tokens).compile().as_text()
    assert hlo.count(MOSAIC_CALL) >= 3  # forward, dq, dk/dv in the scanned layer body
    assert "all-to-all" in hlo
