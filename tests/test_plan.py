"""Sharded construction, a train step that keeps its shardings, and AOT plans for TPU topologies.

The TPU cases compile for abstract `v5e:2x2` chips with libtpu (installed by `.[dev]`):
in CI they must run; elsewhere a missing libtpu skips them with the reason.
"""

import importlib.util
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam import ModelConfig
from vishwam.config import TrainConfig
from vishwam.parallel import make_mesh, shard_batch, tree_shardings
from vishwam.plan import (
    abstract_train_state,
    candidate_meshes,
    fresh_train_state,
    init_sharded_state,
    plan,
    search_plans,
    tpu_devices,
)
from vishwam.train.step import make_train_step

MODEL = ModelConfig.preset("tiny", moe_dispatch="capacity", capacity_factor=2.0)
# eps=1e-6: see tests/test_step.py (Adam magnifies summation-order noise by lr / eps)
TRAIN = TrainConfig(batch_size=8, seq_len=16, warmup_steps=0, total_steps=10, learning_rate=1e-3, seed=3, eps=1e-6)

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU and not os.environ.get("CI"),
                                  reason="libtpu is not installed (pip install 'jax[tpu]'); CI installs it")


def arrays_of(tree):
    return eqx.filter(tree, eqx.is_array)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=2, expert=2)


@pytest.fixture(scope="module")
def sharded_state(mesh):
    return init_sharded_state(MODEL, TRAIN, mesh)


def test_sharded_init_has_the_abstract_layout_and_the_eager_values(mesh, sharded_state):
    abstract = abstract_train_state(MODEL, TRAIN, mesh)
    eager = fresh_train_state(MODEL, TRAIN)
    one_device = init_sharded_state(MODEL, TRAIN, None)
    got = jax.tree_util.tree_leaves_with_path(arrays_of(sharded_state))
    want = jax.tree_util.tree_leaves(eqx.filter(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct)))
    values = jax.tree_util.tree_leaves(arrays_of(eager))
    unsharded = jax.tree_util.tree_leaves(arrays_of(one_device))
    assert len(got) == len(want) == len(values) == len(unsharded) > 10
    sharded_leaves = 0
    for (path, leaf), spec, value, same in zip(got, want, values, unsharded):
        name = jax.tree_util.keystr(path)
        assert (leaf.shape, leaf.dtype) == (spec.shape, spec.dtype), name
        assert leaf.sharding.is_equivalent_to(spec.sharding, leaf.ndim), name
        sharded_leaves += not leaf.sharding.is_fully_replicated
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf, value, same = (jax.random.key_data(x) for x in (leaf, value, same))
        # bit for bit the single-device init; the eager (op-by-op) init rounds `std * normal`
        # without XLA's fusion, so it may differ in the last bit
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(same), err_msg=name)
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(value), rtol=3e-7, atol=0, err_msg=name)
    # fsdp/expert actually split the big weights (and their moments)
    assert sharded_leaves >= 10


def test_sharded_init_never_holds_a_full_copy_on_one_device(mesh, sharded_state):
    experts = sharded_state.model.stages[0].blocks[0].mlp.experts.gate
    shard = experts.addressable_shards[0].data
    assert shard.shape[1] == experts.shape[1] // 2  # experts axis over expert=2
    assert shard.shape[2] == experts.shape[2] // 2  # hidden over fsdp=2


def batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, (TRAIN.batch_size, TRAIN.seq_len + 1)).astype(np.int32)
    mask = (rng.random((TRAIN.batch_size, TRAIN.seq_len)) > 0.2).astype(np.float32)
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask)


def test_sharded_step_keeps_every_leaf_in_its_sharding_and_equals_one_device(mesh, sharded_state):
    step = make_train_step(MODEL, TRAIN)
    expected = tree_shardings(arrays_of(sharded_state), mesh)
    single = jax.device_put(fresh_train_state(MODEL, TRAIN), jax.devices()[0])
    state = jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, sharded_state)
    for i in range(2):
        single, m_single = step(single, {k: jnp.asarray(v) for k, v in batch(i).items()})
        with jax.set_mesh(mesh):
            state, m_sharded = step(state, shard_batch({k: jnp.asarray(v) for k, v in batch(i).items()}, mesh))
        for name in ("loss", "grad_norm", "tokens"):
            np.testing.assert_allclose(float(m_sharded[name]), float(m_single[name]), rtol=1e-5, err_msg=name)
    leaves = jax.tree_util.tree_leaves_with_path(arrays_of(state))
    for (path, leaf), want in zip(leaves, jax.tree_util.tree_leaves(expected)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), jax.tree_util.keystr(path)
    for a, b in zip(jax.tree_util.tree_leaves(arrays_of(state.model)),
                    jax.tree_util.tree_leaves(arrays_of(single.model))):
        # Adam moves every weight by up to lr per step whatever the gradient's size, so the
        # summation-order noise of tiny gradients shows at a small fraction of lr (a wrong
        # gradient would show at ~lr = 1e-3).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


def test_candidate_meshes_cover_the_chips_and_respect_the_model():
    meshes = candidate_meshes(64, ModelConfig.preset("seed"))
    assert {"data": 1, "fsdp": 8, "expert": 8, "tensor": 1} in meshes
    for sizes in meshes:
        assert np.prod(list(sizes.values())) == 64
        assert 8 % sizes["expert"] == 0 and 32 % sizes["tensor"] == 0


# ---------------------------------------------------------------- TPU compiles
TPU_MODEL = ModelConfig.preset("tiny", moe_dispatch="capacity", compute_dtype="bfloat16", remat_policy="full",
                               attention_impl="xla")
# Long enough rows that the step's scratch does not all fit in on-chip scoped memory
# (with 16 tokens XLA:TPU reports zero temporaries).
TPU_TRAIN = TRAIN.replace(seq_len=128)


@needs_libtpu
def test_plan_compiles_the_whole_step_for_a_tpu_topology():
    result = plan(TPU_MODEL, TPU_TRAIN, "v5e:2x2", {"fsdp": 2, "expert": 2})
    assert result.error is None and result.compiled
    assert result.chips == 4 and result.mesh == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
    params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
        eqx.filter(abstract_train_state(TPU_MODEL, TPU_TRAIN, make_mesh(fsdp=2, expert=2,
                                                                    devices=tpu_devices("v5e:2x2"))).model,
                   lambda x: isinstance(x, jax.ShapeDtypeStruct))))
    per_chip = result.per_chip_bytes
    # fp32 params + two fp32 moments, spread over at most 4 chips
    assert per_chip["arguments"] >= 3 * params / 4
    assert per_chip["total"] >= per_chip["arguments"] and per_chip["temporaries"] > 0
    assert result.fits is True and result.hbm_bytes == 16 * 10**9
    assert result.model_flops_per_step > 0 and 0 < result.estimated_mfu <= 1
    assert result.estimated_step_s > result.model_flops_per_step / (4 * 197e12)  # remat: more than model FLOPs


@needs_libtpu
def test_search_compiles_the_fastest_and_sorts_by_estimate():
    results = search_plans(TPU_MODEL, TPU_TRAIN, "v5e:2x2", remat_policies=("full",), accum_steps=(1, 2),
                           compile_top=1)
    assert len(results) >= 4
    assert results[0].compiled and sum(r.compiled for r in results) == 1
    rest = [r.estimated_step_s for r in results[1:]]
    assert rest == sorted(rest)


@needs_libtpu
@pytest.mark.parametrize("topology, words", [("v5p", "GENERATION:SHAPE"), ("v9z:2x2", "not one libtpu knows"),
                                             ("v5e:2xq", "GENERATION:SHAPE")])
def test_bad_topologies_say_what_to_write(topology, words):
    with pytest.raises(ValueError, match=words):
        tpu_devices(topology)


@needs_libtpu
def test_a_mesh_that_does_not_fit_the_chips_or_the_batch_is_refused():
    with pytest.raises(ValueError, match="multiply to 8, but there are 4 devices"):
        plan(TPU_MODEL, TPU_TRAIN, "v5e:2x2", {"fsdp": 8}, compile=False)
    with pytest.raises(ValueError, match="does not split"):
        plan(TPU_MODEL, TPU_TRAIN.replace(batch_size=2), "v5e:2x2", {"fsdp": 4}, compile=False)


@needs_libtpu
def test_scripts_skip_the_tpu_probe_on_a_machine_without_tpus():
    """With libtpu installed, a script on a TPU-less machine pins JAX to the CPU before
    JAX starts (no seconds-long probe, no screen of warnings); a user's choice stands."""
    import subprocess
    import sys

    probe = ("import os, sys; from vishwam.cli import skip_absent_tpu; skip_absent_tpu(); "
             "print(os.environ.get('JAX_PLATFORMS')); import jax; print(jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "cpu"]
    assert "TPU" not in out.stderr  # libtpu's host-discovery warnings never printed
    keep = ("import os; from vishwam.cli import skip_absent_tpu; skip_absent_tpu(); "
            "print(repr(os.environ['JAX_PLATFORMS']))")
    chosen = subprocess.run([sys.executable, "-c", keep], env={**env, "JAX_PLATFORMS": ""},
                            capture_output=True, text=True, timeout=120)
    assert chosen.stdout.strip() == "''"  # "" = every platform: the user's choice, kept
