"""`ModelConfig`: everything that fixes a `VishwamAI` model's shapes and arithmetic, and its presets."""

import dataclasses
import typing
from typing import Any, Literal

from ..errors import InvalidValueError
from ._parsing import JsonConfig

NormType = Literal["rms", "layer"]
RematPolicy = Literal["none", "full", "dots_saveable", "save_attention_output", "offload_dots"]
AttentionImpl = Literal["auto", "pallas", "pallas_tpu", "xla", "reference"]
MoEDispatch = Literal["auto", "dense", "capacity", "ragged", "grouped"]
RouterType = Literal["softmax", "sigmoid"]
LoadBalanceLoss = Literal["switch", "sequence", "hf"]
CapacityPriority = Literal["position", "score"]
DType = Literal["float32", "bfloat16", "float16"]
Fp8Target = Literal["none", "attention", "mlp", "all"]
Fp8Scaling = Literal["tensor", "block"]
QkNorm = Literal["none", "head", "full"]
RopeScalingType = Literal["none", "linear", "dynamic", "llama3", "yarn"]
AttentionType = Literal["gqa", "mla"]

# Choice fields are annotated `str` on the dataclass so that a bad value reaches
# `_validate` (a ValueError naming the field) rather than a run-time type checker.
_CHOICES = {
    "norm_type": NormType,
    "remat_policy": RematPolicy,
    "attention_impl": AttentionImpl,
    "moe_dispatch": MoEDispatch,
    "router_type": RouterType,
    "load_balance_loss": LoadBalanceLoss,
    "capacity_priority": CapacityPriority,
    "param_dtype": DType,
    "compute_dtype": DType,
    "fp8": Fp8Target,
    "fp8_scaling": Fp8Scaling,
    "qk_norm": QkNorm,
    "rope_scaling": RopeScalingType,
    "attention": AttentionType,
}


@typing.no_type_check
@dataclasses.dataclass(frozen=True)
class ModelConfig(JsonConfig):
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
    attention: str = "gqa"
    """The attention layer: `gqa` (q/k/v projections of `head_dim` per head, `num_kv_heads`
    key/value heads: multi-head, grouped-query or multi-query attention) or `mla` (DeepSeek-V2/V3's
    multi-head latent attention: low-rank q and kv projections, `q_lora_rank`, `kv_lora_rank`,
    `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`; its KV cache holds per token only the
    kv latent and the one shared RoPE key). `mla` ignores `num_kv_heads` and `head_dim`."""
    q_lora_rank: int | None = None
    """`mla`: rank of the query compression (`x -> q_a -> RMSNorm -> q_b`); `None` projects the
    queries straight from the hidden state (DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 512
    """`mla`: width of the kv latent (`x -> kv_a -> RMSNorm -> kv_b` gives every head's key and
    value); what the KV cache stores per token and layer, with the RoPE key."""
    qk_nope_head_dim: int = 128
    """`mla`: the part of each query and key head without RoPE (up-projected from the latents)."""
    qk_rope_head_dim: int = 64
    """`mla`: the rotary part of each query head, and of the one key every head shares
    (projected straight from the hidden state, not from the latent)."""
    v_head_dim: int = 128
    """`mla`: width of each value head."""
    rope_interleave: bool = False
    """`mla`: the rotary dimensions of q and k come from their projections as interleaved pairs
    `(x0, x1), (x2, x3), ...` (DeepSeek's checkpoints, HF `rope_interleave`) rather than halves."""
    rope_mscale_all_dim: float = 0.0
    """`mla` with `yarn`: DeepSeek's `mscale_all_dim`; the softmax scale is multiplied by
    `(0.1 * rope_mscale_all_dim * ln(rope_factor) + 1) ** 2` (0 = unchanged)."""
    num_kv_heads: int | None = None
    """Key/value heads (GQA). `None` means `num_heads` (plain multi-head attention)."""
    head_dim: int | None = None
    """Width of one head. `None` means `hidden_size // num_heads`."""
    ffn_dim: int = 16384
    """Inner width of each dense (SwiGLU) MLP, and of each expert unless `moe_ffn_dim` is set."""
    moe_ffn_dim: int | None = None
    """Inner width of each routed expert (HF `moe_intermediate_size`); `None` means `ffn_dim`.
    Fine-grained MoE (DeepSeek, Qwen-MoE, OLMoE) uses many experts much narrower than the
    dense layers of `first_dense_layers`."""
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
    capacity_priority: str = "position"
    """Which assignments an expert over capacity keeps: `position` (earlier positions first,
    the rows of a batch interleaved position by position, so whether a token is dropped never
    depends on later tokens of its sequence: the causal LM's rule, as in Switch and MaxText)
    or `score` (the largest router weights across the micro-batch, which looks ahead)."""
    moe_dispatch: str = "auto"
    """How tokens reach experts: `dense` (every expert on every token: the oracle),
    `capacity` (buffers + einsum), `ragged` (sort + `jax.lax.ragged_dot`), `grouped`
    (sorted blocks + per-expert GEMMs), or `auto` (chosen per backend and capacity
    setting by the rule `vishwam.nn.moe.resolve_dispatch` states)."""
    router_type: str = "softmax"
    """Router scores: softmax over experts, or independent sigmoids (DeepSeek-V3)."""
    router_renormalize: bool = True
    """Renormalise the top-k weights of each token to sum to one (HF `norm_topk_prob`);
    False keeps the raw scores of the chosen experts."""
    n_groups: int = 1
    """DeepSeek-V3's group-limited routing (HF `n_group`): the experts form `n_groups`
    contiguous groups, each scored per token by the sum of its two best (bias-shifted)
    scores; only the best `topk_groups` groups are eligible for the top-k. 1 = no groups."""
    topk_groups: int = 1
    """Groups eligible per token (HF `topk_group`); `topk_groups == n_groups` means no limit."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' combine weights, after any renormalisation
    (HF `routed_scaling_factor`; DeepSeek-V3 uses 2.5)."""
    load_balance_loss: str = "switch"
    """The load-balancing loss the model reports as aux `load_balancing_loss` (weighted by
    `router_aux_loss_coef`): `switch` (`E * sum_e f_e P_e` over all tokens of a batch) or
    `sequence` (DeepSeek-V3's sequence-wise loss: the same per row of the batch, averaged
    over rows; packed documents share their row) or `hf` (transformers' Mixtral loss:
    every layer's tokens pooled into one `E * sum_e f_e P_e`, with `f_e` summed over the
    top-k slots, so its minimum is `experts_per_token`). The train step counts no padding."""
    router_aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (`load_balance_loss`); DeepSeek-V3's `alpha`."""
    router_z_loss_coef: float = 0.001
    """Weight of the router z-loss (mean squared log-sum-exp of router logits)."""
    router_jitter: float = 0.0
    """Multiplicative uniform noise on router inputs during training (0 = off)."""
    num_shared_experts: int = 0
    """Experts every token uses in addition to its routed ones (run as one MLP
    `num_shared_experts` times as wide as one shared expert)."""
    shared_expert_ffn_dim: int | None = None
    """Inner width of each shared expert; `None` means the routed experts' (`moe_ffn_dim`,
    else `ffn_dim`). Qwen2-MoE's `shared_expert_intermediate_size` with `num_shared_experts=1`."""
    shared_expert_gate: bool = False
    """Qwen2-MoE's shared-expert gate: the shared experts' output is scaled per token by
    `sigmoid(x @ w)`, `w` a `[hidden, 1]` weight. Needs `num_shared_experts >= 1`."""
    aux_free_bias: bool = False
    """DeepSeek-style balancing (HF `e_score_correction_bias`): a per-expert bias added
    to the scores before the group limit and the top-k, so for selection only (the
    combine weights are the unbiased scores); updated outside the gradient from the
    observed load."""
    aux_free_bias_rate: float = 0.001
    """Step size of the aux-free bias update."""
    norm_type: str = "rms"
    """RMSNorm or LayerNorm."""
    norm_eps: float = 1e-6
    """Epsilon inside the norms."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding."""
    rope_scaling: str = "none"
    """Long-context RoPE scaling, as transformers' `rope_type`: `none`; `linear` (positions
    divided by `rope_factor`); `dynamic` (NTK: the base grows once the longest position of a
    call passes `rope_original_max_seq_len`); `llama3` (Llama 3.1: low frequencies divided by
    `rope_factor`, high ones kept, a ramp between, set by `rope_low_freq_factor` and
    `rope_high_freq_factor`); `yarn` (ramp between `rope_beta_fast` and `rope_beta_slow`
    rotations, cos and sin times `rope_attention_factor`)."""
    rope_factor: float = 1.0
    """The context extension factor of `rope_scaling`."""
    rope_original_max_seq_len: int | None = None
    """The context the model was pretrained on (HF `original_max_position_embeddings`; for
    `dynamic`, HF `max_position_embeddings`); `None` means `max_seq_len`."""
    rope_low_freq_factor: float = 1.0
    """`llama3`: wavelengths above `rope_original_max_seq_len / rope_low_freq_factor` are scaled."""
    rope_high_freq_factor: float = 4.0
    """`llama3`: wavelengths below `rope_original_max_seq_len / rope_high_freq_factor` are kept."""
    rope_beta_fast: float = 32.0
    """`yarn`: rotations where the ramp from extrapolation to interpolation begins."""
    rope_beta_slow: float = 1.0
    """`yarn`: rotations where the ramp ends."""
    rope_attention_factor: float | None = None
    """`yarn`: the factor on cos and sin (so on each of q and k); `None` means
    `0.1 * ln(rope_factor) + 1`."""
    rope_truncate: bool = True
    """`yarn`: round the ramp's ends to whole dimensions (transformers' default)."""
    max_seq_len: int = 4096
    """Longest sequence the model (and a KV cache) is built for."""
    sliding_window: int | None = None
    """Causal sliding-window attention (Mistral): each token attends to itself and the
    `sliding_window - 1` tokens before it. `None`: full causal attention."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2); the output projection has none."""
    qk_norm: str = "none"
    """RMSNorm of queries and keys before RoPE (eps `norm_eps`): `none`; `head` (over each
    head's `head_dim`, one weight shared by all heads: Qwen3); `full` (over the whole
    projected width, `num_heads * head_dim` for q and `num_kv_heads * head_dim` for k: OLMoE)."""
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
    mtp_depth: int = 0
    """DeepSeek-V3's multi-token prediction (HF `num_nextn_predict_layers`): the number of MTP
    modules trained beside the model. Module k combines module k-1's hidden states (the model's
    final ones for k = 1) with the embedding of the token k ahead, runs one block (of the kind of
    the model's last layer) and predicts the token k + 1 ahead through the model's own embedding
    and LM head (`vishwam.model.mtp`). The train step adds their loss; inference leaves them
    out. 0 = none (no parameters)."""
    mtp_loss_weight: float = 0.3
    """Weight of the MTP loss: `mtp_loss_weight` times the mean over depths of each depth's
    cross-entropy (DeepSeek-V3's lambda: 0.3, then 0.1 late in training)."""

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
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head: `dim_per_head`, or MLA's `qk_nope_head_dim + qk_rope_head_dim`."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.dim_per_head

    @property
    def value_head_dim(self) -> int:
        """Width of one value head: `dim_per_head`, or MLA's `v_head_dim`."""
        return self.v_head_dim if self.is_mla else self.dim_per_head

    @property
    def rope_head_dim(self) -> int:
        """The rotated width of a query/key head: `dim_per_head`, or MLA's `qk_rope_head_dim`."""
        return self.qk_rope_head_dim if self.is_mla else self.dim_per_head

    @property
    def expert_ffn_dim(self) -> int:
        """Inner width of each routed expert."""
        return self.ffn_dim if self.moe_ffn_dim is None else self.moe_ffn_dim

    @property
    def shared_mlp_dim(self) -> int:
        """Inner width of the one MLP that runs all shared experts (0 without any)."""
        each = self.expert_ffn_dim if self.shared_expert_ffn_dim is None else self.shared_expert_ffn_dim
        return self.num_shared_experts * each

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
            raise InvalidValueError(f"ModelConfig.{field}: {message}")

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
        for name in ("num_kv_heads", "head_dim", "sliding_window", "moe_ffn_dim", "shared_expert_ffn_dim"):
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
        if self.rope_scaling != "none":
            if not self.rope_factor > 0:
                fail("rope_factor", f"must be > 0, got {self.rope_factor}.")
            if self.rope_original_max_seq_len is not None and self.rope_original_max_seq_len <= 0:
                fail("rope_original_max_seq_len", f"must be a positive integer or None, got "
                     f"{self.rope_original_max_seq_len!r}.")
            if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
                fail("rope_high_freq_factor", f"llama3 needs rope_high_freq_factor > rope_low_freq_factor > 0, got "
                     f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}.")
            if self.rope_scaling == "dynamic" and self.rope_head_dim <= 2:
                fail("head_dim", f"dynamic RoPE scaling needs a rotated head width > 2, got {self.rope_head_dim}.")
            if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
                fail("rope_attention_factor", f"must be > 0 or None, got {self.rope_attention_factor}.")
        self._validate_mla(fail)
        if self.num_shared_experts < 0:
            fail("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}.")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            fail("shared_expert_gate", "gates the shared experts, but num_shared_experts=0; "
                 "set num_shared_experts >= 1 or shared_expert_gate=False.")
        if self.n_groups <= 0 or self.num_experts % self.n_groups:
            fail("n_groups", f"must be a positive divisor of num_experts={self.num_experts}, got {self.n_groups}.")
        if not 1 <= self.topk_groups <= self.n_groups:
            fail("topk_groups", f"must be in [1, n_groups={self.n_groups}], got {self.topk_groups}.")
        if self.topk_groups * (self.num_experts // self.n_groups) < self.experts_per_token:
            fail("topk_groups", f"{self.topk_groups} of {self.n_groups} groups leave "
                 f"{self.topk_groups * (self.num_experts // self.n_groups)} experts eligible, fewer than "
                 f"experts_per_token={self.experts_per_token}; raise topk_groups or lower n_groups.")
        if not self.routed_scaling_factor > 0:
            fail("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}.")
        if not 0 <= self.mtp_depth < self.max_seq_len:
            fail("mtp_depth", f"must be in [0, max_seq_len={self.max_seq_len}), got {self.mtp_depth}; "
                 "0 turns multi-token prediction off.")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter", "init_std",
                     "aux_free_bias_rate", "mtp_loss_weight"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}.")

    def _validate_mla(self, fail):
        if not self.is_mla:
            changed = [name for name in ("q_lora_rank", "rope_interleave", "rope_mscale_all_dim")
                       if getattr(self, name) != ModelConfig.__dataclass_fields__[name].default]
            if changed:
                fail(changed[0], "is an option of multi-head latent attention; set attention='mla' or leave it "
                     "at its default.")
            return
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}.")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail("q_lora_rank", f"must be a positive integer or None, got {self.q_lora_rank!r}.")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"rotary embeddings need an even width, got {self.qk_rope_head_dim}.")
        if self.kv_heads != self.num_heads:
            fail("num_kv_heads", f"multi-head latent attention has a key and value per head: leave num_kv_heads "
                 f"None (or {self.num_heads}), got {self.num_kv_heads}.")
        if self.qk_norm != "none" or self.qkv_bias:
            fail("qk_norm", f"qk_norm={self.qk_norm!r} and qkv_bias={self.qkv_bias} are options of attention='gqa'; "
                 "MLA normalises its latents instead: use 'none' and False.")
        if self.rope_mscale_all_dim < 0 or (self.rope_mscale_all_dim and self.rope_scaling != "yarn"):
            fail("rope_mscale_all_dim", f"must be >= 0 and needs rope_scaling='yarn', got {self.rope_mscale_all_dim} "
                 f"with {self.rope_scaling!r}.")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise InvalidValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
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
    # Published open MoE models at their real size (the shapes of their HF config.json, as
    # `vishwam.hf` reads them: dropless, no z-loss, transformers' balance loss), set up to train like `seed`.
    # Qwen3-30B-A3B: 128 fine-grained experts, top-8, per-head q/k norms; 30.5B total, 3.3B active.
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                          head_dim=128, ffn_dim=6144, moe_ffn_dim=768, num_experts=128, experts_per_token=8,
                          qk_norm="head", rope_theta=1e6, max_seq_len=40960, capacity_factor=None,
                          router_aux_loss_coef=0.001, router_z_loss_coef=0.0, load_balance_loss="hf",
                          param_dtype="float32", compute_dtype="bfloat16", remat_policy="full"),
    # OLMoE-1B-7B: 64 experts, top-8, no renormalisation, q/k norms over the whole width; 6.9B total, 1.3B active.
    "olmoe-1b-7b": dict(vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16, ffn_dim=1024,
                        num_experts=64, experts_per_token=8, router_renormalize=False, qk_norm="full",
                        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=4096, capacity_factor=None,
                        router_aux_loss_coef=0.01, router_z_loss_coef=0.0, load_balance_loss="hf",
                        param_dtype="float32", compute_dtype="bfloat16", remat_policy="full"),
    # Qwen2-57B-A14B: 64 experts, top-8, one gated shared expert, q/k/v biases; 57.4B total, 14.2B active.
    "qwen2-57b-a14b": dict(vocab_size=151936, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                           ffn_dim=18944, moe_ffn_dim=2560, num_experts=64, experts_per_token=8,
                           router_renormalize=False, num_shared_experts=1, shared_expert_ffn_dim=20480,
                           shared_expert_gate=True, qkv_bias=True, rope_theta=1e6, max_seq_len=32768,
                           capacity_factor=None, router_aux_loss_coef=0.001, router_z_loss_coef=0.0,
                           load_balance_loss="hf", param_dtype="float32", compute_dtype="bfloat16",
                           remat_policy="full"),
    # DeepSeek-V3: multi-head latent attention, 3 dense layers then 256 experts top-8 of FFN 2048
    # with one shared expert, sigmoid scores limited to 4 of 8 groups, scaled by 2.5, the aux-free
    # bias (as HF's e_score_correction_bias) and the sequence-wise balance loss (alpha 1e-4), yarn
    # RoPE (x40 over 4096); 671B total, 37B active (MTP modules not counted, as published).
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, ffn_dim=18432,
                        moe_ffn_dim=2048, num_experts=256, experts_per_token=8, first_dense_layers=3,
                        num_shared_experts=1, router_type="sigmoid", n_groups=8, topk_groups=4,
                        routed_scaling_factor=2.5, aux_free_bias=True, load_balance_loss="sequence",
                        router_aux_loss_coef=0.0001, router_z_loss_coef=0.0, attention="mla", q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        rope_interleave=True, rope_theta=10000.0, rope_scaling="yarn", rope_factor=40.0,
                        rope_original_max_seq_len=4096, rope_attention_factor=1.0, rope_mscale_all_dim=1.0,
                        max_seq_len=163840, capacity_factor=None, param_dtype="float32",
                        compute_dtype="bfloat16", remat_policy="full"),
    # DeepSeek-V2-Lite: MLA without query compression, 1 dense layer then 64 experts top-6 of FFN 1408
    # with two shared experts, softmax routing without renormalisation; 15.7B total, 2.4B active.
    "deepseek-v2-lite": dict(vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16, ffn_dim=10944,
                             moe_ffn_dim=1408, num_experts=64, experts_per_token=6, first_dense_layers=1,
                             num_shared_experts=2, router_renormalize=False, load_balance_loss="sequence",
                             router_aux_loss_coef=0.001, router_z_loss_coef=0.0, attention="mla",
                             q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, rope_interleave=True, rope_theta=10000.0, rope_scaling="yarn",
                             rope_factor=40.0, rope_original_max_seq_len=4096, rope_attention_factor=1.0,
                             rope_mscale_all_dim=0.707, max_seq_len=163840, capacity_factor=None,
                             param_dtype="float32", compute_dtype="bfloat16", remat_policy="full"),
}

