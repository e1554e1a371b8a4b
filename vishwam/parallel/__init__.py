"""Device meshes, sharding rules and expert parallelism.

    make_mesh, check_mesh, AXES     a named mesh (`data`, `fsdp`, `expert`, `tensor`) and its checks
    DEFAULT_RULES, partition_spec   parameter path -> `PartitionSpec` rules
    tree_specs, tree_shardings      the specs / `NamedSharding`s of a whole pytree
    shard_model                     place (or constrain) a model or optimiser state by the rules
    batch_spec, shard_batch         the batch's spec and placement over the batch axes
    batch_shards                    how many pieces the batch axes split a batch into
    make_global_batch               one global array from each process's rows (multi-host)
    per_device_bytes                bytes each device holds of a sharded tree
    expert_parallel_dispatch        routed experts over the `expert` axis (`shard_map` + `all_to_all`)
    use_expert_parallel             whether the mesh in context has an `expert` axis > 1
"""

from .expert import expert_parallel_dispatch as expert_parallel_dispatch
from .expert import use_expert_parallel as use_expert_parallel
from .mesh import AXES as AXES
from .mesh import check_mesh as check_mesh
from .mesh import make_mesh as make_mesh
from .sharding import DEFAULT_RULES as DEFAULT_RULES
from .sharding import batch_shards as batch_shards
from .sharding import batch_spec as batch_spec
from .sharding import make_global_batch as make_global_batch
from .sharding import partition_spec as partition_spec
from .sharding import per_device_bytes as per_device_bytes
from .sharding import shard_batch as shard_batch
from .sharding import shard_model as shard_model
from .sharding import tree_shardings as tree_shardings
from .sharding import tree_specs as tree_specs
