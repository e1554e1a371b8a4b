"""Meshes, sharding rules and expert parallelism on 8 simulated CPU devices."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import vishwam.nn.moe as moe_module
import vishwam.nn.moe.layer as moe_layer
from vishwam import ModelConfig, VishwamAI
from vishwam.config import TrainConfig
from vishwam.nn.moe import MoE, dispatch_capacity, expert_capacity
from vishwam.parallel import (
    AXES,
    batch_spec,
    check_mesh,
    expert_parallel_dispatch,
    make_global_batch,
    make_mesh,
    per_device_bytes,
    shard_batch,
    shard_model,
    use_expert_parallel,
)
from vishwam.train.step import init_train_state, make_train_step

MESHES = {
    "expert8": dict(expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2),
}
T, D, F, E, K = 64, 16, 32, 8, 2


@pytest.fixture(scope="module")
def meshes():
    return {name: make_mesh(sizes) for name, sizes in MESHES.items()}


@pytest.fixture
def ep_traces(monkeypatch):
    """Counts traces of the expert-parallel path, so a test knows it really ran."""
    calls = []
    original = moe_layer.expert_parallel_dispatch

    def counting(*args, **kwargs):
        calls.append(kwargs.get("capacity_factor"))
        return original(*args, **kwargs)

    monkeypatch.setattr(moe_layer, "expert_parallel_dispatch", counting)
    return calls


def _assert_trees_close(a, b, **tol):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for u, v in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


# ------------------------------------------------------------------------ meshes
def test_make_mesh_axes_types_and_fill():
    mesh = make_mesh({"data": 2}, expert=-1)
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh(data=-1).shape)["data"] == 8


@pytest.mark.parametrize("sizes, message", [
    (dict(data=3), "multiply to 3, but there are 8 devices; make the product 8, or set one axis to -1"),
    (dict(data=-1, expert=-1), "only one axis may be -1"),
    (dict(expert=3, data=-1), "cannot fill data=-1"),
    (dict(pipeline=2), "unknown axis name(s) ['pipeline']"),
    (dict(tensor=0), "tensor=0 must be a positive integer, or -1"),
])
def test_make_mesh_errors_name_the_fix(sizes, message):
    with pytest.raises(ValueError) as info:
        make_mesh(sizes)
    assert message in str(info.value)


def test_experts_not_divisible_by_expert_axis(meshes):
    config = ModelConfig.preset("tiny")  # 4 experts
    fix = "num_experts=4 is not divisible by the mesh's expert axis size 8"
    with pytest.raises(ValueError, match="Use an expert axis size in \\[1, 2, 4\\]") as info:
        check_mesh(config, meshes["expert8"])
    assert fix in str(info.value)
    model = eqx.filter_eval_shape(VishwamAI, config, key=jax.random.key(0))
    with pytest.raises(ValueError, match="not divisible by the mesh's expert axis"):
        shard_model(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), model), meshes["expert8"])
    check_mesh(config, meshes["data2_expert4"])  # 4 experts over 4 devices is fine


# ------------------------------------------------------------------ batches
def test_global_batch_from_process_local_data(meshes):
    mesh = meshes["data2_expert4"]
    local = {"tokens": np.arange(8 * 16, dtype=np.int32).reshape(8, 16)}
    batch = make_global_batch(local, mesh)
    np.testing.assert_array_equal(batch["tokens"], local["tokens"])  # one process: local == global
    assert batch["tokens"].sharding.spec == batch_spec(mesh) == P(("data", "fsdp", "expert"), None)
    rows = sorted(int(s.data[0, 0]) // 16 for s in batch["tokens"].addressable_shards)
    assert rows == list(range(8))  # each device holds one distinct row
    with pytest.raises(ValueError, match="not divisible by data=2 x fsdp=1 x expert=4 = 8"):
        shard_batch({"tokens": np.zeros((6, 16), np.int32)}, mesh)


# ------------------------------------------------------------ the expert-parallel layer
@pytest.fixture(scope="module")
def layer():
    return MoE(D, F, E, K, dispatch="dense", key=jax.random.key(0))


@pytest.fixture(scope="module")
def tokens_x():
    return jax.random.normal(jax.random.key(1), (8, T // 8, D))


def _layer_loss(layer, x):
    y, aux = layer(x)
    return jnp.sum(jnp.sin(3 * y)) + aux["load_balancing_loss"], y


def _layer_values_and_grads(layer, x):
    (_, y), grads = eqx.filter_value_and_grad(_layer_loss, has_aux=True)(layer, x)
    x_grad = jax.grad(lambda x: _layer_loss(layer, x)[0])(x)
    return y, grads, x_grad


@pytest.fixture(scope="module")
def layer_reference(layer, tokens_x):
    return eqx.filter_jit(_layer_values_and_grads)(layer, tokens_x)


@pytest.mark.parametrize("name", sorted(MESHES))
def test_expert_parallel_layer_equals_single_device_dense(name, meshes, layer, tokens_x, layer_reference, ep_traces):
    mesh = meshes[name]
    sharded, x = shard_model(layer, mesh), shard_batch(tokens_x, mesh)
    assert sharded.experts.gate.sharding.spec[0] == "expert"
    with jax.set_mesh(mesh):
        y, grads, x_grad = eqx.filter_jit(_layer_values_and_grads)(sharded, x)
    assert ep_traces and all(f is None for f in ep_traces)  # the dense dispatch stays dropless
    y_ref, grads_ref, x_grad_ref = layer_reference
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    _assert_trees_close(grads, grads_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_grad, x_grad_ref, rtol=1e-5, atol=1e-6)


def test_expert_parallel_capacity_drops_per_device(meshes, layer):
    # With a capacity factor each device ranks and drops its own tokens: the result
    # equals the single-device capacity dispatch run on each device's slice alone.
    mesh = meshes["data2_expert4"]
    x = jax.random.normal(jax.random.key(2), (T, D))
    routing = moe_module.route(x @ layer.router * 20, K)
    e = layer.experts
    with jax.set_mesh(mesh):
        y, dropped = jax.jit(lambda x, i, w: expert_parallel_dispatch(
            x, i, w, e.gate, e.up, e.down, ffn=moe_module.expert_ffn, capacity_factor=1.0))(
            x, routing.indices, routing.weights)
    local = T // 8
    capacity = expert_capacity(local, K, E, 1.0)
    parts = [dispatch_capacity(x[s * local:(s + 1) * local], e,
                               jax.tree_util.tree_map(lambda a: a[s * local:(s + 1) * local], routing),
                               capacity=capacity) for s in range(8)]
    np.testing.assert_allclose(y, jnp.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dropped, np.mean([p[1] for p in parts]), rtol=1e-6)
    assert float(dropped) > 0.1


def test_expert_parallel_only_when_the_mesh_asks_for_it(meshes):
    assert not use_expert_parallel(T)  # no mesh set
    assert use_expert_parallel(T, meshes["expert8"])
    assert not use_expert_parallel(4, meshes["expert8"])  # 4 tokens over 8 shards: local fallback
    assert not use_expert_parallel(T, make_mesh(data=8))
    with jax.set_mesh(meshes["data2_expert4"]):
        assert use_expert_parallel(T)
    with pytest.raises(ValueError, match="4 tokens do not split over 8 batch shards"):
        expert_parallel_dispatch(jnp.zeros((4, D)), jnp.zeros((4, K), jnp.int32), jnp.zeros((4, K)),
                                 jnp.zeros((E, D, F)), jnp.zeros((E, D, F)), jnp.zeros((E, F, D)),
                                 ffn=moe_module.expert_ffn, mesh=meshes["expert8"])


# --------------------------------------------------------------- whole-model sharding
@pytest.fixture(scope="module")
def model_config():
    return ModelConfig.preset("tiny", num_experts=8, attention_impl="reference")


@pytest.fixture(scope="module")
def train_config():
    # A large Adam eps keeps the first update linear in tiny gradients: with the
    # default 1e-8 it divides float rounding noise by ~eps and amplifies it.
    return TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, batch_size=8, seq_len=16,
                       weight_decay=0.0, eps=1e-4)


@pytest.fixture(scope="module")
def fresh_state(model_config, train_config):
    """A new, identical train state per call (the step donates its input state)."""
    @eqx.filter_jit
    def make():
        model = VishwamAI(model_config, key=jax.random.key(3))
        return init_train_state(model, train_config, key=jax.random.key(4))

    return make


@pytest.fixture(scope="module")
def batch(model_config):
    tokens = jax.random.randint(jax.random.key(5), (8, 17), 0, model_config.vocab_size)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((8, 16), jnp.float32)}


@pytest.fixture(scope="module")
def single_device_step(model_config, train_config, batch, fresh_state):
    state, metrics = make_train_step(model_config, train_config)(fresh_state(), batch)
    return jax.device_get((state, metrics))


@pytest.mark.parametrize("name", sorted(MESHES))
def test_expert_weights_split_over_expert_axis(name, meshes, model_config, fresh_state):
    mesh = meshes[name]
    ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
    state = shard_model(fresh_state(), mesh)
    experts = state.model.stages[0].blocks[0].mlp.experts
    moments = state.opt_state[1][0].mu.stages[0].blocks[0].mlp.experts
    for weight, moment in ((experts.gate, moments.gate), (experts.down, moments.down)):
        assert weight.shape[:2] == (model_config.num_layers, model_config.num_experts)  # [repeats, E, ...]
        assert weight.sharding.spec[1] == "expert"
        assert moment.sharding.spec == weight.sharding.spec  # optimiser state mirrors the params
        # ffn dim 64 splits over tensor too; each device holds 1/(ep*tp) of every expert weight.
        assert set(per_device_bytes(weight).values()) == {weight.nbytes // (ep * tp)}
    total = sum(per_device_bytes(experts).values())
    assert total == sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(experts)) * 8 // (ep * tp)
    # Dense weights: hidden dim over fsdp and expert together (ZeRO-3 over every batch axis but
    # data), heads over tensor; each device holds 1/(fsdp*ep*tp) of them.
    q = state.model.stages[0].blocks[0].attn.q_proj.weight
    zero = tuple(axis for axis in ("fsdp", "expert") if mesh.shape[axis] > 1)
    hidden = None if not zero else zero[0] if len(zero) == 1 else zero
    assert q.sharding.spec == P(None, hidden, *(("tensor",) if tp > 1 else ()))
    assert set(per_device_bytes(q).values()) == {q.nbytes // (mesh.shape["fsdp"] * ep * tp)}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_train_step_under_mesh_equals_single_device(name, meshes, model_config, train_config, batch,
                                                    fresh_state, single_device_step, ep_traces):
    mesh = meshes[name]
    state = shard_model(fresh_state(), mesh)
    step = make_train_step(model_config, train_config)
    with jax.set_mesh(mesh):
        new_state, metrics = step(state, shard_batch(batch, mesh))
    assert ep_traces  # the MoE layers went through all-to-all
    ref_state, ref_metrics = single_device_step
    for key in ("loss", "ce", "aux", "grad_norm", "expert_load"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-7, err_msg=key)
    moved = jax.tree_util.tree_map(lambda a, b: np.max(np.abs(np.asarray(a) - np.asarray(b))),
                                   eqx.filter(ref_state.model, eqx.is_array),
                                   eqx.filter(fresh_state().model, eqx.is_array))
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # the step did change the weights
    _assert_trees_close(eqx.filter(new_state.model, eqx.is_array), eqx.filter(ref_state.model, eqx.is_array),
                        rtol=1e-5, atol=1e-6)
    assert new_state.model.stages[0].blocks[0].mlp.experts.up.sharding.spec[1] == "expert"
