"""`flash_attention`: one function in front of every attention implementation.

Implementations (`implementation=`):

- `"reference"`: naive softmax in fp32, O(q_len * kv_len) memory; the test oracle.
- `"xla"`: blockwise online softmax in pure JAX (`flash_xla`), O(length) memory. The CPU default.
- `"pallas"`: the target platform's Pallas kernels: Triton (`flash_pallas`) on GPU, Mosaic
  (`flash_tpu`) on TPU; on CPU the Triton kernels with `interpret=True` (correct but slow, for tests).
- `"pallas_tpu"`: the Mosaic kernels by name; on CPU with `interpret=True`.
- `"auto"`: pallas on GPU (xla with a warning, once per configuration, if the kernels do not
  compile), the Mosaic kernels on TPU, xla on CPU.

The target platform is `target_platform()`, so a program compiled ahead of time for TPU devices
from a CPU host gets the TPU kernels. Every implementation takes the same masks (`causal`, `mask`,
`segment_ids`, a causal `window`), computed from positions in `_masking`; the Mosaic kernels take
no window yet (refused by name; `auto` on TPU falls back to xla with a warning).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from vishwam.kernels import flash_pallas as _pallas
from vishwam.kernels import flash_tpu as _tpu
from vishwam.kernels import flash_xla as _xla
from vishwam.kernels import reference as _reference
from vishwam.kernels._masking import dropout_seed as _dropout_seed

from ..errors import InvalidValueError

_IMPLEMENTATIONS = ("auto", "pallas", "pallas_tpu", "xla", "reference")


def _fail(msg: str) -> None:
    raise InvalidValueError(f"flash_attention: {msg}")


def _normalise_mask(mask, batch, heads, q_len, kv_len):
    if mask is None:
        return None
    if mask.dtype != jnp.bool_:
        _fail(
            f"`mask` must be boolean (True = may attend), got dtype {mask.dtype}; "
            "pass `mask.astype(bool)` or build it with a comparison."
        )
    target = (batch, heads, q_len, kv_len)
    if mask.ndim > 4 or any(
        m not in (1, t) for m, t in zip(mask.shape[::-1], target[::-1], strict=False)
    ):
        _fail(
            f"`mask` of shape {mask.shape} does not broadcast to "
            f"[batch, heads, q_len, kv_len] = {list(target)}; each dimension must be 1 or the full size."
        )
    return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _normalise_segment_ids(segment_ids, batch, q_len, kv_len):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            _fail(f"`segment_ids` as a sequence must be a pair (q_ids, kv_ids), got {len(segment_ids)} items.")
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_len:
            _fail(
                f"a single `segment_ids` array needs q_len == kv_len, got q_len={q_len}, "
                f"kv_len={kv_len}; pass a pair (q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])."
            )
        q_seg = kv_seg = segment_ids
    for name, ids, length in (("q", q_seg, q_len), ("kv", kv_seg, kv_len)):
        if ids.shape != (batch, length):
            _fail(f"{name} segment ids have shape {ids.shape}, expected [batch, {name}_len] = [{batch}, {length}].")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            _fail(f"{name} segment ids must be integers, got dtype {ids.dtype}.")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            _fail(f"`{name}` must be [batch, len, heads, head_dim], got shape {x.shape}.")
    if k.shape != v.shape:
        _fail(f"k and v must have the same shape, got k {k.shape} and v {v.shape}.")
    if q.shape[0] != k.shape[0]:
        _fail(f"q and k/v disagree on batch: q {q.shape}, k {k.shape}.")
    if q.shape[3] != k.shape[3]:
        _fail(f"q and k/v disagree on head_dim: q {q.shape}, k {k.shape}.")
    if q.shape[2] % k.shape[2] != 0:
        _fail(
            f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}) for "
            f"grouped-query attention; q {q.shape}, k {k.shape}."
        )
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first.")


def target_platform() -> str:
    """The platform this trace compiles for: the mesh in context's (`jax.set_mesh`,
    also inside `jax.jit`), else `jax.default_backend()`. `"cpu"`, `"gpu"` or `"tpu"`."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


@functools.lru_cache(maxsize=256)
def _pallas_lowering_error(signature, kwargs_items) -> str | None:
    """Compile the GPU pallas path (forward and backward) for these shapes; the error text, or None."""
    kwargs = dict(kwargs_items)
    avals = [None if s is None else jax.ShapeDtypeStruct(*s) for s in signature]

    def loss(q, k, v, mask, q_seg, kv_seg, seed):
        out = _pallas.attention(
            q, k, v, mask, q_segment_ids=q_seg, kv_segment_ids=kv_seg, dropout_seed=seed, interpret=False, **kwargs
        )
        return jnp.sum(out.astype(jnp.float32))

    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*avals).compile()
    except Exception as e:  # noqa: BLE001 - any lowering failure means "use xla"
        return f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')}"
    return None


@functools.lru_cache(maxsize=256)
def _warn_once(message: str) -> None:
    # Cached: one warning per distinct configuration, not one per traced call.
    warnings.warn(message, stacklevel=4)


def _resolve(implementation: str, arrays, kwargs) -> str:
    """The implementation to run: "reference", "xla", "pallas" (Triton) or "pallas_tpu" (Mosaic)."""
    if implementation not in _IMPLEMENTATIONS:
        _fail(f"unknown implementation {implementation!r}; choose one of {_IMPLEMENTATIONS}.")
    if implementation in ("xla", "reference"):
        return implementation
    platform = target_platform()
    if implementation == "pallas_tpu" or platform == "tpu":
        if platform not in ("tpu", "cpu"):
            _fail(f"implementation='pallas_tpu' runs on TPU (and CPU in interpret mode), not backend {platform!r}.")
        if kwargs.get("window") is not None:
            if implementation != "auto":
                _fail(f"the Mosaic (TPU) kernels take no sliding `window` yet (window={kwargs['window']}); use "
                      "implementation='xla' or 'auto' (which picks xla for windowed calls on TPU).")
            _warn_once("flash_attention: the TPU kernels take no sliding window yet; using 'xla' for this call")
            return "xla"
        return "pallas_tpu"
    if platform == "gpu":
        if implementation == "pallas":
            return "pallas"
        signature = tuple(None if a is None else (a.shape, a.dtype) for a in arrays)
        error = _pallas_lowering_error(signature, tuple(sorted(kwargs.items())))
        if error is None:
            return "pallas"
        _warn_once(f"flash_attention: the Pallas kernel does not compile for these inputs, using 'xla' ({error})")
        return "xla"
    if platform == "cpu":
        # auto -> xla; an explicit "pallas" runs the kernels in interpret mode.
        return "xla" if implementation == "auto" else "pallas"
    if implementation == "auto":
        return "xla"
    _fail(
        f"implementation='pallas' supports GPU and TPU (and CPU in interpret mode), not backend {platform!r}; "
        "use 'xla'."
    )


def flash_attention(
    q: Float[Array, "batch q_len heads head_dim"],
    k: Float[Array, "batch kv_len kv_heads head_dim"],
    v: Float[Array, "batch kv_len kv_heads head_dim"],
    mask: Bool[Array, "..."] | None = None,
    block_size: int = 128,
    *,
    causal: bool = False,
    segment_ids: Int[Array, "batch seq"]
    | tuple[Int[Array, "batch q_len"], Int[Array, "batch kv_len"]]
    | None = None,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    key: PRNGKeyArray | None = None,
    implementation: str = "auto",
    window: int | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Scaled dot-product attention, `softmax(q k^T * sm_scale) v`, per head.

    Arguments:
        q: queries `[batch, q_len, heads, head_dim]`.
        k: keys `[batch, kv_len, kv_heads, head_dim]`; `heads` must be a multiple of
            `kv_heads` (grouped-query attention; k and v are never repeated).
        v: values, shaped as `k`.
        mask: optional boolean, True = may attend, broadcastable to
            `[batch, heads, q_len, kv_len]`.
        block_size: tile length along q and kv for the blockwise implementations.
        causal: query `i` sees keys `<= i + kv_len - q_len` (the queries are the last
            `q_len` positions, as when decoding with a cache).
        segment_ids: packed documents; tokens attend only within their segment. One int
            array `[batch, len]` when `q_len == kv_len`, or a pair
            `(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])`.
        sm_scale: logit scale, default `1 / sqrt(head_dim)`.
        dropout_rate: probability of dropping an attention weight (needs `key`); the
            mask is a hash of `(key, batch, head, q position, kv position)`, identical
            across implementations and between forward and backward.
        key: PRNG key for dropout.
        implementation: `"auto" | "pallas" | "pallas_tpu" | "xla" | "reference"` (see
            module docstring).
        window: sliding-window attention (Mistral), with `causal=True`: query position `p`
            sees only the keys `p - window < position <= p`. `None`: no window.

    Returns:
        `[batch, q_len, heads, head_dim]` in the dtype of `q`. Rows with no visible key
        are zero. Softmax statistics are accumulated in fp32 for any input dtype.
    """
    _check_qkv(q, k, v)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        _fail(f"`block_size` must be a positive int, got {block_size!r}.")
    if not 0.0 <= dropout_rate < 1.0:
        _fail(f"`dropout_rate` must be in [0, 1), got {dropout_rate}.")
    if dropout_rate > 0.0 and key is None:
        _fail(f"`dropout_rate={dropout_rate}` needs a PRNG `key=`; pass `key=jax.random.key(...)`.")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            _fail(f"`window` must be None or a positive int, got {window!r}.")
        if not causal:
            _fail(f"`window={window}` is a causal sliding window; pass causal=True with it.")
    mask4 = _normalise_mask(mask, batch, heads, q_len, kv_len)
    q_seg, kv_seg = _normalise_segment_ids(segment_ids, batch, q_len, kv_len)
    static = dict(
        causal=bool(causal),
        sm_scale=float(head_dim**-0.5 if sm_scale is None else sm_scale),
        dropout_rate=float(dropout_rate),
        window=window,
    )
    seed = _dropout_seed(key) if dropout_rate > 0.0 else None
    impl = _resolve(implementation, (q, k, v, mask4, q_seg, kv_seg, seed), dict(static, block_size=block_size))
    args = (q, k, v, mask4)
    kwargs = dict(static, q_segment_ids=q_seg, kv_segment_ids=kv_seg, dropout_seed=seed)
    if impl == "reference":
        return _reference.attention(*args, **kwargs)
    if impl == "xla":
        return _xla.attention(*args, block_size=block_size, **kwargs)
    interpret = target_platform() == "cpu"
    if impl == "pallas_tpu":
        kwargs.pop("window")  # None here: `_resolve` keeps windowed calls off the Mosaic kernels
        return _tpu.attention(*args, block_size=block_size, interpret=interpret, **kwargs)
    return _pallas.attention(*args, block_size=block_size, interpret=interpret, **kwargs)

