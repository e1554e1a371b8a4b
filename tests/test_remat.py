"""Remat policies on the scanned blocks: same gradients, less memory; the memory helper."""

import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vishwam import ModelConfig, VishwamAI
from vishwam.memory import REMAT_POLICIES, compiled_memory, next_token_loss, remat_memory


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 33), 0, 256)


# These tests compare values and buffer sizes, not speed: LLVM's optimisation level 0
# halves XLA:CPU compile time; every policy is compared with `none` compiled the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def gradients(config, tokens):
    model = VishwamAI(config, key=jax.random.key(0))
    step = eqx.filter_jit(eqx.filter_value_and_grad(next_token_loss))
    return step.lower(model, tokens).compile(compiler_options=FAST_COMPILE)(model, tokens)


def assert_same_gradients(got, want):
    (loss, grads), (loss_ref, grads_ref) = got, want
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    leaves, leaves_ref = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)
    assert len(leaves) == len(leaves_ref) > 0
    for a, b in zip(leaves, leaves_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * float(jnp.max(jnp.abs(b))) + 1e-12)


@pytest.fixture(scope="module")
def reference_gradients(tokens):
    return {fp8: gradients(ModelConfig.preset("tiny", attention_impl="reference", fp8=fp8), tokens)
            for fp8 in ("none", "all")}


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_gradients_of_none(policy, tokens, reference_gradients):
    # offload_dots compiles and runs on XLA:CPU too (there it moves nothing to
    # the host: the lowered program carries no host placement).
    config = ModelConfig.preset("tiny", attention_impl="reference", remat_policy=policy)
    assert_same_gradients(gradients(config, tokens), reference_gradients["none"])


def test_remat_recomputes_fp8_layers_exactly(tokens, reference_gradients):
    # Current scaling is a pure function of the inputs, so recomputing the
    # quantisation in the backward pass reproduces the saved fp8 operands.
    config = ModelConfig.preset("tiny", attention_impl="reference", fp8="all", remat_policy="full")
    assert_same_gradients(gradients(config, tokens), reference_gradients["all"])


def test_full_remat_needs_less_temporary_memory_than_none():
    config = ModelConfig.preset("tiny", num_layers=4, max_seq_len=512, attention_impl="reference")
    report = remat_memory(config, batch=1, seq_len=512, policies=("none", "full"),
                          compiler_options=FAST_COMPILE)
    assert 0 < report["full"]["temp_size_in_bytes"] < report["none"]["temp_size_in_bytes"]
    # Arguments (parameters, tokens) do not depend on the policy.
    assert report["full"]["argument_size_in_bytes"] == report["none"]["argument_size_in_bytes"]


class Scale(eqx.Module):
    weight: jax.Array
    power: int = eqx.field(static=True)

    def __call__(self, x):
        return (x * self.weight) ** self.power


# Two donated inputs, one output of their shape: XLA says it can use only one.
@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_compiled_memory_counts_arguments_outputs_and_donation():
    module = Scale(jnp.ones((256, 128)), power=2)
    x = jax.ShapeDtypeStruct((256, 128), jnp.float32)  # abstract: nothing allocated
    stats = compiled_memory(lambda m, x: m(x), module, x)
    assert stats["argument_size_in_bytes"] == 2 * 256 * 128 * 4
    assert stats["output_size_in_bytes"] == 256 * 128 * 4
    assert stats["alias_size_in_bytes"] == 0
    assert stats["total_size_in_bytes"] == (stats["argument_size_in_bytes"] + stats["output_size_in_bytes"]
                                           + stats["temp_size_in_bytes"])
    donated = compiled_memory(lambda m, x: m(x), module, x, donate=True)
    assert donated["alias_size_in_bytes"] == 256 * 128 * 4  # the output reuses a donated input
    assert donated["total_size_in_bytes"] < stats["total_size_in_bytes"]


def test_compiled_memory_sees_an_intermediate_grow():
    def outer_sum(v):  # a (n, n) temporary that XLA cannot avoid: it is returned twice
        m = v[:, None] * v[None, :]
        return jnp.sum(jnp.sin(m) @ m)

    small, large = (compiled_memory(outer_sum, jax.ShapeDtypeStruct((n,), jnp.float32))["temp_size_in_bytes"]
                    for n in (64, 512))
    assert large >= 512 * 512 * 4 > small


def test_remat_memory_rejects_unknown_policy():
    with pytest.raises(ValueError, match=r"unknown polic.*'everything'.*choose from"):
        remat_memory(ModelConfig.preset("tiny"), batch=1, seq_len=8, policies=("everything",))


_FAULTS_DRIVER = """
import resource, sys
import jax, jax.numpy as jnp
if sys.argv[1] == "keep":
    from vishwam.memory import keep_host_memory
    assert keep_host_memory()
# 16 + 32 MB of temporaries per call, a small output (large outputs are allocated apart
# from the temporaries, and fault in fresh whatever malloc does).
step = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x, axis=0))
x = jnp.ones((2048, 4096), jnp.float32) / 4096
step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt tuning is glibc's (Linux)")
def test_keep_host_memory_stops_xla_cpu_steps_from_page_faulting():
    # Each run of a compiled XLA:CPU program allocates its temporaries afresh; with glibc's
    # defaults they are fresh mappings that fault in page by page on every run.
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS_DRIVER, mode], capture_output=True, text=True,
                             check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        return int(out.stdout.strip().splitlines()[-1])

    default, kept = faults("default"), faults("keep")
    # 4 runs x 48 MB of temporaries: ~12 K faults a run in 4 KB pages (seen: ~37 K in all), still
    # ~24 a run where transparent huge pages are always on; kept: none after the first run (seen: 5).
    assert default > 40, default
    assert kept * 10 < default, (kept, default)
