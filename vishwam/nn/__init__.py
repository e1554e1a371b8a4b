"""Neural-network building blocks (Equinox modules; maths in free functions)."""

from .attention import TPUMultiHeadAttention as TPUMultiHeadAttention
from .attention import positions_from_segments as positions_from_segments
from .block import Block as Block
from .linear import Linear as Linear
from .linear import TPUGEMMLinear as TPUGEMMLinear
from .mlp import MLP as MLP
from .moe import MoE as MoE
from .moe import Experts as Experts
from .moe import Routing as Routing
from .moe import load_balancing_loss as load_balancing_loss
from .moe import route as route
from .moe import router_z_loss as router_z_loss
from .norm import LayerNorm as LayerNorm
from .norm import RMSNorm as RMSNorm
from .norm import TPULayerNorm as TPULayerNorm
from .precision import Precision as Precision
from .rope import apply_rope as apply_rope
