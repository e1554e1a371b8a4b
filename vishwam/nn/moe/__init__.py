"""Mixture-of-Experts: routing, experts, dispatch and the layer (the table of dispatches is in `dispatch`).

routing:   Routing (top-k experts and weights), route, group_limited_scores (DeepSeek-V3's group
           limit), expert_fractions, load_balancing_loss (Switch), sequence_balance_loss
           (DeepSeek-V3), BalanceSums / balance_sums / pooled_balance_loss (transformers' loss,
           pooled over layers), BALANCE_LOSS_CHOICES, CAPACITY_PRIORITIES, router_z_loss,
           combine_matrix (dense weights)
experts:   Experts (stacked SwiGLU experts), SplitExperts / split_experts (one array per expert),
           Fp8Spec, expert_ffn
dispatch:  dispatch_dense (the oracle), dispatch_capacity, dispatch_ragged, dispatch_grouped,
           dispatch_split, resolve_dispatch (the `auto` rule), DISPATCHES, DISPATCH_CHOICES;
           grouped blocks: Blocks, assign_blocks, grouped_block_size, grouped_num_blocks,
           GROUPED_BLOCK_SIZE, split_all_rows (which path `dispatch_split` takes)
layer:     MoE, the module (router, experts, gated shared experts, aux-free selection bias)
Re-exported: grouped_swiglu (`vishwam.kernels`), assign_slots, position_priority, gather_buffers,
combine_buffers and expert_capacity (`vishwam.parallel.expert`). Under `jax.set_mesh` with an
`expert` axis > 1 the layer runs `vishwam.parallel.expert_parallel_dispatch`.
"""

from ...kernels.grouped_swiglu import grouped_swiglu as grouped_swiglu
from ...parallel.expert import assign_slots as assign_slots
from ...parallel.expert import combine_buffers as combine_buffers
from ...parallel.expert import expert_capacity as expert_capacity
from ...parallel.expert import gather_buffers as gather_buffers
from ...parallel.expert import position_priority as position_priority
from .dispatch import DISPATCH_CHOICES as DISPATCH_CHOICES
from .dispatch import DISPATCHES as DISPATCHES
from .dispatch import GROUPED_BLOCK_SIZE as GROUPED_BLOCK_SIZE
from .dispatch import Blocks as Blocks
from .dispatch import assign_blocks as assign_blocks
from .dispatch import dispatch_capacity as dispatch_capacity
from .dispatch import dispatch_dense as dispatch_dense
from .dispatch import dispatch_grouped as dispatch_grouped
from .dispatch import dispatch_ragged as dispatch_ragged
from .dispatch import dispatch_split as dispatch_split
from .dispatch import grouped_block_size as grouped_block_size
from .dispatch import grouped_num_blocks as grouped_num_blocks
from .dispatch import resolve_dispatch as resolve_dispatch
from .dispatch import split_all_rows as split_all_rows
from .experts import Experts as Experts
from .experts import Fp8Spec as Fp8Spec
from .experts import SplitExperts as SplitExperts
from .experts import expert_ffn as expert_ffn
from .experts import split_experts as split_experts
from .layer import MoE as MoE
from .routing import BALANCE_LOSS_CHOICES as BALANCE_LOSS_CHOICES
from .routing import CAPACITY_PRIORITIES as CAPACITY_PRIORITIES
from .routing import BalanceSums as BalanceSums
from .routing import Routing as Routing
from .routing import balance_sums as balance_sums
from .routing import combine_matrix as combine_matrix
from .routing import expert_fractions as expert_fractions
from .routing import group_limited_scores as group_limited_scores
from .routing import load_balancing_loss as load_balancing_loss
from .routing import pooled_balance_loss as pooled_balance_loss
from .routing import route as route
from .routing import router_z_loss as router_z_loss
from .routing import sequence_balance_loss as sequence_balance_loss
