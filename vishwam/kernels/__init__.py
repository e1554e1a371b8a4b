"""Kernels: attention implementations and the grouped expert GEMM, each with a pure-JAX reference.

- `flash_attention`: scaled dot-product attention, implementation chosen per platform (`flash`).
- `target_platform`: the platform the current trace compiles for.
- `grouped_swiglu`: each expert's SwiGLU MLP over its own routed rows (gathered and combined in the
  loop), with its own backward.
"""

from .flash import flash_attention as flash_attention
from .flash import target_platform as target_platform
from .grouped_swiglu import grouped_swiglu as grouped_swiglu
