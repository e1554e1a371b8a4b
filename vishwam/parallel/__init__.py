"""Meshes, sharding rules and expert parallelism (see each module's docstring)."""

from .expert import expert_parallel_dispatch as expert_parallel_dispatch
from .expert import use_expert_parallel as use_expert_parallel
from .mesh import AXES as AXES
from .mesh import check_mesh as check_mesh
from .mesh import make_mesh as make_mesh
from .sharding import DEFAULT_RULES as DEFAULT_RULES
from .sharding import batch_spec as batch_spec
from .sharding import make_global_batch as make_global_batch
from .sharding import partition_spec as partition_spec
from .sharding import per_device_bytes as per_device_bytes
from .sharding import shard_batch as shard_batch
from .sharding import shard_model as shard_model
from .sharding import tree_shardings as tree_shardings
from .sharding import tree_specs as tree_specs
