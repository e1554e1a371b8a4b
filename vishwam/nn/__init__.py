"""Neural-network building blocks: Equinox modules holding parameters, the maths in free functions.

    Linear / TPUGEMMLinear      a linear layer over any leading dims (`use_fp8=True`: fp8 GEMMs)
    parallel_linears            several linear layers of one input as one product (q/k/v)
    RMSNorm, TPULayerNorm       normalisation layers (`LayerNorm` is `TPULayerNorm`)
    TPUMultiHeadAttention       GQA attention with RoPE, sliding window and a KV cache
    MultiHeadLatentAttention    DeepSeek's multi-head latent attention and its compressed cache (`vishwam.nn.mla`)
    positions_from_segments     RoPE positions restarting at each packed document
    apply_rope                  rotary position embedding of queries or keys
    MLP                         the SwiGLU MLP
    MoE                         routed experts (`vishwam.nn.moe`: Routing, Experts, route,
                                load_balancing_loss, router_z_loss and the dispatches)
    Block                       one pre-norm transformer layer (dense MLP or MoE)
    Precision                   the mixed-precision policy (parameter / compute dtypes)

Stacked layers (init, scan/unroll, remat, layer numbers) live in `vishwam.nn.stack`.
"""

from .attention import TPUMultiHeadAttention as TPUMultiHeadAttention
from .attention import positions_from_segments as positions_from_segments
from .block import Block as Block
from .linear import Linear as Linear
from .linear import TPUGEMMLinear as TPUGEMMLinear
from .linear import parallel_linears as parallel_linears
from .mla import MultiHeadLatentAttention as MultiHeadLatentAttention
from .mlp import MLP as MLP
from .moe import Experts as Experts
from .moe import MoE as MoE
from .moe import Routing as Routing
from .moe import load_balancing_loss as load_balancing_loss
from .moe import route as route
from .moe import router_z_loss as router_z_loss
from .norm import LayerNorm as LayerNorm
from .norm import RMSNorm as RMSNorm
from .norm import TPULayerNorm as TPULayerNorm
from .precision import Precision as Precision
from .rope import apply_rope as apply_rope
