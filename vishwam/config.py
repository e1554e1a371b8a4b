"""Model configuration: one frozen dataclass, presets, validation, JSON round trip."""

import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

NormType = Literal["rms", "layer"]
RematPolicy = Literal["none", "full", "dots_saveable", "save_attention_output", "offload_dots"]
AttentionImpl = Literal["auto", "pallas", "pallas_tpu", "xla", "reference"]
MoEDispatch = Literal["auto", "dense", "capacity", "ragged", "grouped"]
RouterType = Literal["softmax", "sigmoid"]
DType = Literal["float32", "bfloat16", "float16"]
Fp8Target = Literal["none", "attention", "mlp", "all"]
Fp8Scaling = Literal["tensor", "block"]

# Choice fields are annotated `str` on the dataclass so that a bad value reaches
# `_validate` (a ValueError naming the field) rather than a run-time type checker.
_CHOICES = {
    "norm_type": NormType,
    "remat_policy": RematPolicy,
    "attention_impl": AttentionImpl,
    "moe_dispatch": MoEDispatch,
    "router_type": RouterType,
    "param_dtype": DType,
    "compute_dtype": DType,
    "fp8": Fp8Target,
    "fp8_scaling": Fp8Scaling,
}


def _field_kinds(annotation: Any) -> tuple[type, bool]:
    """`(base type, accepts None)` of a config field's annotation (`int`, `float | None`, a Literal)."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, (annotation,) = True, args
    if typing.get_origin(annotation) is Literal:
        annotation = str
    return annotation, optional


def _type_error(cls_name: str, name: str, value: Any, kind: type, optional: bool, default: Any) -> str | None:
    """Why `value` does not fit a field of type `kind`, or None. Bools are not numbers
    here, ints are not floats' only stand-ins the other way round: 2.0 is no int."""
    if value is None:
        return None if optional else f"{cls_name}.{name}: must be set, got None; give a {kind.__name__}."
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return f"{cls_name}.{name}: must be a finite number, got {value!r}."
    else:
        ok = isinstance(value, kind)
    if ok:
        return None
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
    return (f"{cls_name}.{name}: expected {expected}{' or null' if optional else ''}, got {value!r} "
            f"({type(value).__name__}); write e.g. {name}={_example(kind, default)}.")


def _example(kind: type, default: Any) -> str:
    """A value of the right type to show in a message: the field's default where it has one."""
    if default is not None and default is not dataclasses.MISSING:
        return json.dumps(default)
    return {bool: "true", int: "2", float: "0.5", str: '"value"'}.get(kind, "...")


def _parse_text(cls_name: str, name: str, text: str, kind: type, optional: bool, default: Any) -> Any:
    lowered = text.strip().lower()
    if optional and lowered in ("none", "null"):
        return None
    try:
        if kind is bool:
            if lowered in ("true", "false"):
                return lowered == "true"
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ValueError(f"{cls_name}.{name}: expected {expected}{' or none' if optional else ''}, got {text!r}; "
                         f"write e.g. {name}={_example(kind, default)}.") from None
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


# The config classes check their own field types (`_check_types`: a ValueError naming the field,
# the value and the fix); `no_type_check` keeps a run-time type checker (jaxtyping's import hook
# in the tests) from refusing a bad value first with a generic TypeError.
@typing.no_type_check
class _JsonConfig:
    """JSON round trip shared by the config dataclasses (no pickle: configs are JSON)."""

    def _check_types(self) -> None:
        """Raise `ValueError` naming the first field whose value has the wrong type."""
        for field in dataclasses.fields(self):
            kind, optional = _field_kinds(field.type)
            message = _type_error(type(self).__name__, field.name, getattr(self, field.name), kind, optional,
                                  field.default)
            if message:
                raise ValueError(message)

    @classmethod
    def unknown_field_error(cls, name: str) -> ValueError:
        """The error for a field `cls` does not have, with the closest known name."""
        known = [f.name for f in dataclasses.fields(cls)]
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields are {', '.join(sorted(known))}."
        return ValueError(f"{cls.__name__}: unknown field {name!r}; {hint}")

    @classmethod
    def parse_override(cls, assignment: str) -> tuple[str, Any]:
        """`"FIELD=VALUE"` (a `--set` argument) as `(field, value)`, VALUE parsed with the field's type.

        Bools take `true`/`false`, optional fields `none`/`null`, strings are taken as written
        (quotes optional). Raises `ValueError` for a missing `=`, an unknown field (naming the
        closest one) or a value that does not parse as the field's type.
        """
        name, sep, text = assignment.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. --set num_layers=2.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise cls.unknown_field_error(name)
        kind, optional = _field_kinds(fields[name].type)
        return name, _parse_text(cls.__name__, name, text, kind, optional, fields[name].default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object of fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise cls.unknown_field_error(unknown[0])
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: "str | Path"):
        """Parse a JSON string, or read the file it names."""
        text, where = str(text_or_path), "the JSON string"
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise FileNotFoundError(f"{cls.__name__}.from_json: no such file {path}")
            where = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{cls.__name__}.from_json: {path} is not UTF-8 text ({error}).") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{cls.__name__}.from_json: {where} is not valid JSON ({error}).") from None
        return cls.from_dict(data)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def diff(self, other) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: `{name: (self_value, other_value)}`."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class ModelConfig(_JsonConfig):
    """Everything that fixes the shape and the arithmetic of a `VishwamAI` model.

    Defaults are the VishwamAI seed sizes; use `ModelConfig.preset("tiny")` and
    friends for runnable sizes.
    """

    vocab_size: int = 131072
    """Number of token ids (embedding rows and logits)."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    num_layers: int = 32
    """Number of transformer blocks."""
    num_heads: int = 32
    """Query heads per attention layer."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA). `None` means `num_heads` (plain multi-head attention)."""
    head_dim: int | None = None
    """Width of one head. `None` means `hidden_size // num_heads`."""
    ffn_dim: int = 16384
    """Inner width of each (SwiGLU) MLP and of each expert."""
    num_experts: int = 8
    """Experts per MoE layer; 1 makes every layer a dense MLP."""
    experts_per_token: int = 2
    """Top-k: experts each token is sent to."""
    first_dense_layers: int = 0
    """The first k layers use a dense MLP even when `num_experts > 1`."""
    moe_every: int = 1
    """After the dense prefix, every n-th layer is MoE (1 = all of them)."""
    capacity_factor: float | None = 1.25
    """Expert capacity = ceil(tokens * k / experts * factor) for the `capacity`
    dispatch during training. `None` means dropless (worst-case capacity)."""
    moe_dispatch: str = "auto"
    """How tokens reach experts: `dense` (every expert on every token: the oracle),
    `capacity` (buffers + einsum), `ragged` (sort + `jax.lax.ragged_dot`), `grouped`
    (sort into blocks + a scan of per-block GEMMs; the fast dropless one on CPU), or
    `auto`: `capacity` when training with a `capacity_factor`; dropless otherwise
    (`capacity_factor=None` and at inference): `grouped` on CPU, `ragged` on GPU/TPU,
    `grouped` with fp8 experts. See `vishwam.nn.moe.resolve_dispatch`."""
    router_type: str = "softmax"
    """Router scores: softmax over experts, or independent sigmoids."""
    router_renormalize: bool = True
    """Renormalise the top-k weights of each token to sum to one."""
    router_aux_loss_coef: float = 0.01
    """Weight of the Switch-style load-balancing loss."""
    router_z_loss_coef: float = 0.001
    """Weight of the router z-loss (mean squared log-sum-exp of router logits)."""
    router_jitter: float = 0.0
    """Multiplicative uniform noise on router inputs during training (0 = off)."""
    num_shared_experts: int = 0
    """Experts every token uses in addition to its routed ones."""
    aux_free_bias: bool = False
    """DeepSeek-style balancing: a per-expert bias added to scores for selection
    only, updated outside the gradient from the observed load."""
    aux_free_bias_rate: float = 0.001
    """Step size of the aux-free bias update."""
    norm_type: str = "rms"
    """RMSNorm or LayerNorm."""
    norm_eps: float = 1e-6
    """Epsilon inside the norms."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding."""
    max_seq_len: int = 4096
    """Longest sequence the model (and a KV cache) is built for."""
    sliding_window: int | None = None
    """Causal sliding-window attention (Mistral): each token attends to itself and the
    `sliding_window - 1` tokens before it. `None`: full causal attention."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2); the output projection has none."""
    dropout: float = 0.0
    """Dropout on the residual branches during training."""
    tie_embeddings: bool = False
    """Share the input embedding with the LM head."""
    init_std: float = 0.02
    """Std of the normal init; residual projections get `init_std / sqrt(2 * num_layers)`."""
    param_dtype: str = "float32"
    """Storage dtype of parameters, and so of the AdamW moments. Keep fp32 master weights
    for training (`bfloat16` halves the state's memory but rounds every update away
    once it is below a weight's bf16 resolution)."""
    compute_dtype: str = "float32"
    """Dtype of activations and matmul inputs (logits and losses are always fp32).
    `bfloat16` on GPU/TPU (the `seed` preset does); fp32 on CPU, where bf16 matmuls are slower."""
    remat_policy: str = "none"
    """Gradient checkpointing policy applied to each scanned block."""
    attention_impl: str = "auto"
    """Backend for `flash_attention`."""
    attention_block_size: int = 128
    """Block size of the blockwise attention kernels."""
    fp8: str = "none"
    """Which projections compute in fp8: none, attention, mlp (experts too) or all.
    The LM head and the router always stay in higher precision."""
    fp8_scaling: str = "tensor"
    """fp8 scaling mode: per-tensor current scaling or block-wise."""
    fp8_block_size: int = 128
    """Tile size of block-wise fp8 scaling."""
    scan_layers: bool = True
    """Run the stacked layers with `jax.lax.scan`; False unrolls (debugging)."""

    def __post_init__(self):
        self._validate()

    # ------------------------------------------------------------------ derived
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    def layer_is_moe(self, index: int) -> bool:
        if not self.is_moe or index < self.first_dense_layers:
            return False
        return (index - self.first_dense_layers) % self.moe_every == self.moe_every - 1

    @property
    def num_moe_layers(self) -> int:
        return sum(self.layer_is_moe(i) for i in range(self.num_layers))

    # --------------------------------------------------------------- validation
    def _validate(self):
        def fail(field: str, message: str):
            raise ValueError(f"ModelConfig.{field}: {message}")

        self._check_types()

        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            options = allowed.__args__
            if value not in options:
                fail(name, f"unknown value {value!r}; choose one of {', '.join(map(repr, options))}.")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim",
                     "num_experts", "experts_per_token", "max_seq_len", "moe_every",
                     "attention_block_size", "fp8_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}.")
        for name in ("num_kv_heads", "head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                fail(name, f"must be a positive integer or None, got {value!r}.")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            fail("hidden_size", f"{self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                 "change one of them or set head_dim explicitly.")
        if self.num_heads % self.kv_heads:
            fail("num_kv_heads", f"num_heads={self.num_heads} is not divisible by num_kv_heads="
                 f"{self.kv_heads}; pick a divisor of num_heads.")
        if self.dim_per_head % 2:
            fail("head_dim", f"rotary embeddings need an even head dimension, got {self.dim_per_head}.")
        if self.experts_per_token > self.num_experts:
            fail("experts_per_token", f"top-k={self.experts_per_token} exceeds num_experts="
                 f"{self.num_experts}; use at most num_experts.")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            fail("first_dense_layers", f"must be in [0, num_layers={self.num_layers}], "
                 f"got {self.first_dense_layers}.")
        if (self.num_layers - self.first_dense_layers) % self.moe_every:
            fail("moe_every", f"num_layers - first_dense_layers = {self.num_layers - self.first_dense_layers} "
                 f"is not a multiple of moe_every={self.moe_every}; adjust either so the MoE pattern repeats whole.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            fail("capacity_factor", f"must be > 0 or None (dropless), got {self.capacity_factor}.")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}.")
        if self.norm_eps <= 0:
            fail("norm_eps", f"must be > 0, got {self.norm_eps}.")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be > 0, got {self.rope_theta}.")
        if self.num_shared_experts < 0:
            fail("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}.")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter", "init_std",
                     "aux_free_bias_rate"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}.")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: compiles in a second or two on a 2-core CPU.
    "tiny": dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 ffn_dim=64, num_experts=4, experts_per_token=2, max_seq_len=128,
                 attention_block_size=16, capacity_factor=None),
    # Trains on a 2-core CPU in minutes (the default main job). MoE: `auto` dispatch trains
    # with capacity 1.25 and generates dropless (`grouped` on CPU).
    "small": dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                  ffn_dim=512, num_experts=4, experts_per_token=2, max_seq_len=256,
                  attention_block_size=64, capacity_factor=1.25, tie_embeddings=True),
    # The VishwamAI seed sizes, set up to train on accelerators: fp32 master weights and
    # moments with bf16 matmuls, capacity 1.25 in training (`auto` dispatch; expert-parallel
    # under a mesh with an `expert` axis), every block rematerialised (benchmarks/plan_seed.py).
    "seed": dict(vocab_size=131072, hidden_size=4096, num_layers=32, num_heads=32,
                 num_experts=8, experts_per_token=2, ffn_dim=16384, max_seq_len=4096,
                 capacity_factor=1.25, param_dtype="float32", compute_dtype="bfloat16", remat_policy="full"),
}


def parameter_counts_closed_form(config: ModelConfig) -> dict[str, int]:
    """Total and active-per-token parameter counts from the formulae alone.

    Mirrors the modules in `vishwam.nn` (no biases on projections but the optional q/k/v ones, SwiGLU MLPs,
    norms with a scale only for RMSNorm and scale+bias for LayerNorm).
    """
    h, hd, nh, nkv = config.hidden_size, config.dim_per_head, config.num_heads, config.kv_heads
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + (nh * hd + 2 * nkv * hd if config.qkv_bias else 0)
    norm = h if config.norm_type == "rms" else 2 * h
    mlp = 3 * h * config.ffn_dim
    total = active = 0
    for i in range(config.num_layers):
        total += attn + 2 * norm
        active += attn + 2 * norm
        if config.layer_is_moe(i):
            router = h * config.num_experts
            shared = config.num_shared_experts * mlp
            total += router + config.num_experts * mlp + shared
            active += router + config.experts_per_token * mlp + shared
        else:
            total += mlp
            active += mlp
    embed = config.vocab_size * h
    head = 0 if config.tie_embeddings else config.vocab_size * h
    total += embed + head + norm
    active += embed + head + norm
    return {"total": total, "active": active}


NanPolicy = Literal["stop", "skip"]


@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class TrainConfig(_JsonConfig):
    """Everything that fixes one optimisation step: optimiser, schedule, batch, losses.

    `batch_size` is the global batch of one optimiser step; it is split into
    `accum_steps` micro-batches of `batch_size // accum_steps` rows each.
    """

    learning_rate: float = 3e-4
    """Peak learning rate, reached at the end of the warm-up."""
    warmup_steps: int = 100
    """Optimiser steps of linear warm-up from `learning_rate / warmup_steps` to the peak."""
    total_steps: int = 10000
    """Length of the whole schedule (warm-up included); the cosine decay ends here at
    `learning_rate * min_lr_ratio` and stays there afterwards."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay on matrices; never on norms, biases or vectors."""
    decay_embeddings: bool = False
    """Also decay the token embedding (the LM head is a matrix and always decayed)."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    grad_clip: float | None = 1.0
    """Clip gradients to this global L2 norm; `None` disables clipping."""
    accum_steps: int = 1
    """Micro-batches per optimiser step (gradient accumulation, `lax.scan`)."""
    batch_size: int = 8
    """Sequences per optimiser step, over all micro-batches and devices."""
    seq_len: int = 256
    """Tokens per sequence."""
    z_loss_coef: float = 0.0
    """Weight of the logit z-loss, mean of `logsumexp(logits)**2` over unmasked tokens
    (PaLM uses 1e-4; 0 = off)."""
    distill_alpha: float = 0.5
    """With a teacher: loss = `alpha * CE + (1 - alpha) * T**2 * KL(teacher || student)`."""
    distill_temperature: float = 2.0
    """Softmax temperature `T` of the distillation KL."""
    seed: int = 0
    """Seed of the training PRNG key (dropout, router jitter) and of the model init."""
    loss_chunk_size: int | None = 512
    """Sequence positions per chunk of the fused LM head + cross-entropy
    (`vishwam.train.losses.chunked_lse_and_target`): the train and eval steps never hold
    more than `[batch, chunk, vocab]` logits. `None` = one `[batch, seq, vocab]` logits
    array (also what distillation uses, since the KL needs the student's full logits)."""
    nan_policy: NanPolicy = "stop"
    """On a non-finite loss or gradient: `stop` applies the step and only reports it
    (the runner decides what to do); `skip` leaves the whole train state unchanged."""

    def __post_init__(self):
        def fail(field: str, message: str):
            raise ValueError(f"TrainConfig.{field}: {message}")

        self._check_types()

        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            fail("warmup_steps", f"must be a non-negative integer, got {self.warmup_steps!r}.")
        for name in ("total_steps", "accum_steps", "batch_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}.")
        if self.loss_chunk_size is not None and (not isinstance(self.loss_chunk_size, int)
                                                 or isinstance(self.loss_chunk_size, bool)
                                                 or self.loss_chunk_size <= 0):
            fail("loss_chunk_size", f"must be a positive integer or None (unchunked), got {self.loss_chunk_size!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            fail("seed", f"must be an integer, got {self.seed!r}.")
        if self.warmup_steps >= self.total_steps:
            fail("warmup_steps", f"{self.warmup_steps} leaves no decay before total_steps={self.total_steps}; "
                 "make total_steps larger than warmup_steps.")
        if self.batch_size % self.accum_steps:
            fail("accum_steps", f"batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}; "
                 "choose a divisor of batch_size.")
        if not self.learning_rate > 0:
            fail("learning_rate", f"must be > 0, got {self.learning_rate}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}.")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, f"must be in [0, 1), got {getattr(self, name)}.")
        if not self.eps > 0:
            fail("eps", f"must be > 0, got {self.eps}.")
        for name in ("weight_decay", "z_loss_coef"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            fail("grad_clip", f"must be > 0 or None (no clipping), got {self.grad_clip}.")
        if not 0.0 <= self.distill_alpha <= 1.0:
            fail("distill_alpha", f"must be in [0, 1], got {self.distill_alpha}.")
        if not self.distill_temperature > 0:
            fail("distill_temperature", f"must be > 0, got {self.distill_temperature}.")
        if self.nan_policy not in NanPolicy.__args__:
            fail("nan_policy", f"unknown value {self.nan_policy!r}; choose one of "
                 f"{', '.join(map(repr, NanPolicy.__args__))}.")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.accum_steps

