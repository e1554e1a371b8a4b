"""MoE layer: dispatches against the dense oracle, the capacity drop rule, router options."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vishwam.nn.moe as moe_module
import vishwam.nn.moe.layer as moe_layer
from vishwam import ModelConfig, VishwamAI
from vishwam.nn.moe import (
    MoE,
    Routing,
    assign_blocks,
    dispatch_capacity,
    dispatch_dense,
    dispatch_grouped,
    dispatch_ragged,
    dispatch_split,
    expert_capacity,
    grouped_block_size,
    grouped_num_blocks,
    load_balancing_loss,
    resolve_dispatch,
    route,
    split_experts,
)

T, D, F, E, K = 48, 16, 24, 8, 2


@pytest.fixture(scope="module")
def layer():
    return MoE(D, F, E, K, key=jax.random.key(0))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (T, D))


def _routing(indices, seed=0) -> Routing:
    indices = jnp.asarray(indices, jnp.int32)
    weights = jax.random.uniform(jax.random.key(seed), indices.shape, minval=0.1, maxval=1.0)
    probs = jnp.full((indices.shape[0], E), 1.0 / E)
    return Routing(weights, indices, probs)


def _distinct_pairs(rng, choices, first=None):
    """T rows of K distinct experts drawn from `choices` (first column fixed if given)."""
    rows = []
    for _ in range(T):
        pool = [c for c in choices if c != first]
        rest = list(rng.choice(pool, K - (first is not None), replace=False))
        rows.append(([first] if first is not None else []) + rest)
    return np.array(rows)


ROUTINGS = {
    "random": lambda rng: _distinct_pairs(rng, range(E)),
    "empty_experts": lambda rng: _distinct_pairs(rng, [1, 4, 6]),  # 5 experts get nothing
    "all_on_one_expert": lambda rng: _distinct_pairs(rng, range(E), first=3),  # every token uses 3
}


def _values_and_grads(dispatch, x, experts, weights, indices):
    def loss(x, experts, weights):
        y, dropped = dispatch(x, experts, Routing(weights, indices, jnp.zeros((x.shape[0], E))))
        return jnp.sum(jnp.sin(3 * y)), (y, dropped)

    (_, (y, dropped)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, experts, weights)
    return y, dropped, grads


@pytest.fixture(scope="module")
def all_dispatches():
    """One compiled function: every dispatch's output, dropped fraction and gradients."""
    fns = {"dense": dispatch_dense, "capacity": dispatch_capacity, "ragged": dispatch_ragged,
           "grouped": dispatch_grouped}
    return jax.jit(lambda x, ex, w, i: {n: _values_and_grads(f, x, ex, w, i) for n, f in fns.items()})


def _assert_trees_close(a, b, **tol):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


@pytest.mark.parametrize("case", sorted(ROUTINGS))
def test_every_dispatch_equals_dense_values_and_grads(case, layer, x, all_dispatches):
    routing = _routing(ROUTINGS[case](np.random.default_rng(0)))
    out = all_dispatches(x, layer.experts, routing.weights, routing.indices)
    y_ref, _, grads_ref = out["dense"]
    assert float(jnp.max(jnp.abs(y_ref))) > 1e-3  # a non-trivial comparison
    for name in ("capacity", "ragged", "grouped"):
        y, dropped, grads = out[name]
        assert float(dropped) == 0.0
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6, err_msg=name)
        _assert_trees_close(grads, grads_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ grouped dispatch
def test_assign_blocks_on_a_hand_example():
    # 3 experts, blocks of 2: expert 0 has 3 assignments (2 blocks, 1 padding row),
    # expert 1 has 2 (1 block), expert 2 has 1 (1 block, 1 padding row).
    indices = jnp.array([[0, 1], [0, 2], [1, 0]], jnp.int32)
    assert grouped_num_blocks(6, 3, 2) == (6 + 3 * 1) // 2 == 4
    blocks = jax.jit(assign_blocks, static_argnums=(1, 2))(indices, 3, 2)
    pad = 3  # = tokens
    np.testing.assert_array_equal(blocks.source, [0, 1, 2, pad, 0, 2, 1, pad])
    np.testing.assert_array_equal(blocks.row, [[0, 4], [1, 6], [5, 2]])
    np.testing.assert_array_equal(blocks.expert, [0, 0, 1, 2])
    np.testing.assert_array_equal(blocks.ends, [2, 3, 4])  # expert e's blocks: ends[e-1] .. ends[e]-1


def test_grouped_block_size_shrinks_for_few_tokens():
    assert grouped_block_size(4096 * 2, 8) == 256  # the Mixtral training shape: the default
    assert grouped_block_size(48 * 2, 8) == 16  # 12 per expert -> next power of two
    assert grouped_block_size(1 * 2, 8) == 1  # decoding one token: only its k rows
    assert grouped_num_blocks(2, 8, 1) == 2
    assert grouped_block_size(4096 * 2, 8, block_size=32) == 32


def _grouped_cases(rng):
    """(name, x, routing, block_size): odd counts, top-1, one busy expert, empty experts, decode."""
    def case(name, tokens, indices, block_size=128, seed=0):
        x = jax.random.normal(jax.random.key(20 + seed), (tokens, D))
        weights = jax.random.uniform(jax.random.key(40 + seed), indices.shape, minval=0.1, maxval=1.0)
        return name, x, Routing(weights, jnp.asarray(indices, jnp.int32), jnp.zeros((tokens, E))), block_size

    top1 = rng.integers(0, E, (7, 1))
    one_expert = np.stack([np.full(33, 5), (5 + rng.integers(1, E, 33)) % E], axis=1)
    empty = np.stack([rng.choice([2, 6], 33), np.full(33, 7)], axis=1)  # 5 experts unused
    return [
        case("top1_odd_tokens", 7, top1, seed=1),
        case("all_on_expert_5_blocks_of_4", 33, one_expert, block_size=4, seed=2),
        case("empty_experts_blocks_of_8", 33, empty, block_size=8, seed=3),
        case("decode_one_token", 1, np.array([[3, 0]]), seed=4),
    ]


def test_grouped_equals_dense_values_and_grads_on_odd_shapes(layer):
    cases = _grouped_cases(np.random.default_rng(3))

    @jax.jit
    def run(experts, inputs):
        out = []
        for (_, _, routing, block_size), (x, weights) in zip(cases, inputs, strict=True):
            grouped = lambda x, ex, r, b=block_size: dispatch_grouped(x, ex, r, block_size=b)  # noqa: E731
            out.append([_values_and_grads(f, x, experts, weights, routing.indices)
                        for f in (dispatch_dense, grouped)])
        return out

    results = run(layer.experts, [(x, routing.weights) for _, x, routing, _ in cases])
    for (name, *_), ((y_ref, _, grads_ref), (y, dropped, grads)) in zip(cases, results, strict=True):
        assert float(jnp.max(jnp.abs(y_ref))) > 1e-4, name
        assert float(dropped) == 0.0, name
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-7, err_msg=name)
        _assert_trees_close(grads, grads_ref, rtol=1e-5, atol=1e-7)


def test_split_experts_equal_dense_values_and_grads_and_skip_unused_experts(layer, x):
    """The decode dispatch over per-expert arrays, on few tokens (`split_all_rows`: each chosen
    expert on every row): dense's values and gradients (those of the split weights are the
    stacked ones' rows), for E / K tokens under each routing, empty experts and one token."""
    rng = np.random.default_rng(5)
    few = E // K
    assert moe_module.split_all_rows(few, K, E) and not moe_module.split_all_rows(few + 1, K, E)
    cases = [_routing(ROUTINGS[name](rng)[:few], seed=i) for i, name in enumerate(sorted(ROUTINGS))]
    cases.append(_routing(np.array([[3, 0]]), seed=9))
    inputs = [x[:few]] * len(ROUTINGS) + [x[:1]]
    split = split_experts(layer.experts)

    @jax.jit
    def run(experts, split, weights):
        return [(_values_and_grads(dispatch_dense, xi, experts, w, r.indices),
                 _values_and_grads(dispatch_split, xi, split, w, r.indices))
                for xi, w, r in zip(inputs, weights, cases, strict=True)]

    for (y_ref, _, grads_ref), (y, dropped, grads) in run(layer.experts, split, [r.weights for r in cases]):
        assert float(jnp.max(jnp.abs(y_ref))) > 1e-4 and float(dropped) == 0.0
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        dx, d_split, dw = grads
        d_experts = tuple(jnp.stack(w) for w in (d_split.gate, d_split.up, d_split.down))
        _assert_trees_close((dx, d_experts, dw), (grads_ref[0], (grads_ref[1].gate, grads_ref[1].up,
                                                                  grads_ref[1].down), grads_ref[2]),
                            rtol=1e-5, atol=1e-6)
    # An expert nobody chose is never run: its weights may be anything.
    poisoned = eqx.tree_at(lambda s: s.gate[5], split, jnp.full_like(split.gate[5], jnp.nan))
    one = cases[-1]  # experts 3 and 0
    y, _ = jax.jit(dispatch_split)(x[:1], poisoned, one)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_split_experts_over_many_tokens_equal_dense(layer):
    """Past `split_all_rows` (a batch of decode rows, prefill) each expert loops over its own
    blocks: values equal dense (this path is inference-only: its loops have run-time bounds,
    so no gradients). From E / K + 1 tokens (the first past the rule) to 59."""
    split = split_experts(layer.experts)
    cases = [(name, x, routing, block) for name, x, routing, block in _grouped_cases(np.random.default_rng(6))
             if not moe_module.split_all_rows(*routing.indices.shape, E)]
    rng = np.random.default_rng(7)
    for tokens in (E // K + 1, 59):
        x = jax.random.normal(jax.random.key(tokens), (tokens, D))
        for name in sorted(ROUTINGS):
            indices = np.concatenate([ROUTINGS[name](rng), ROUTINGS[name](rng)])[:tokens]
            cases.append((f"{name}, {tokens} tokens", x, _routing(indices), 16))
    run = jax.jit(lambda x, ex, sp, r, b: (dispatch_dense(x, ex, r)[0], dispatch_split(x, sp, r, block_size=b)[0]),
                  static_argnums=4)
    for name, xs, routing, block in cases:
        assert not moe_module.split_all_rows(*routing.indices.shape, E), name
        ref, y = run(xs, layer.experts, split, routing, block)
        assert float(jnp.max(jnp.abs(ref))) > 1e-4, name
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_split_experts_refuse_training(layer, x):
    split_layer = eqx.tree_at(lambda m: m.experts, layer, split_experts(layer.experts))
    np.testing.assert_allclose(split_layer(x, inference=True)[0], layer(x, inference=True)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inference only"):
        split_layer(x)


def test_grouped_in_bfloat16_matches_dense_in_bfloat16(layer, x):
    routing = _routing(ROUTINGS["random"](np.random.default_rng(4)))
    experts = jax.tree_util.tree_map(lambda w: w.astype(jnp.bfloat16), layer.experts)

    @jax.jit
    def both(x, experts, weights):
        return [_values_and_grads(f, x, experts, weights, routing.indices) for f in (dispatch_dense, dispatch_grouped)]

    (y_ref, _, grads_ref), (y, _, grads) = both(x.astype(jnp.bfloat16), experts, routing.weights)
    assert y.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(y_ref.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=2e-2 * scale)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)


# ------------------------------------------------------------------ auto dispatch
@pytest.mark.parametrize(("factor", "inference", "backend", "use_fp8", "expected"), [
    (1.25, False, "cpu", False, "capacity"),  # training with a factor: capacity everywhere
    (1.25, False, "gpu", False, "capacity"),
    (1.25, False, "tpu", True, "capacity"),
    (None, False, "cpu", False, "grouped"),  # dropless
    (1.25, True, "cpu", False, "grouped"),  # inference is always dropless
    (None, False, "gpu", False, "ragged"),
    (1.25, True, "tpu", False, "ragged"),
    (None, False, "gpu", True, "grouped"),  # ragged has no fp8 path
])
def test_auto_dispatch_resolves_as_documented(factor, inference, backend, use_fp8, expected):
    assert resolve_dispatch("auto", factor, inference=inference, backend=backend, use_fp8=use_fp8) == expected
    for name in ("dense", "capacity", "ragged", "grouped"):  # asked for by name: kept
        assert resolve_dispatch(name, factor, inference=inference, backend=backend, use_fp8=use_fp8) == name


def test_config_default_dispatch_is_auto_and_tiny_runs_grouped_on_cpu():
    assert ModelConfig().moe_dispatch == "auto"
    tiny = ModelConfig.preset("tiny")
    assert tiny.capacity_factor is None
    assert resolve_dispatch(tiny.moe_dispatch, tiny.capacity_factor) == "grouped"  # tests run on CPU


def test_auto_layer_drops_in_training_with_a_factor_and_is_dense_otherwise(x, monkeypatch):
    common = dict(key=jax.random.key(13))
    dense = MoE(D, F, E, K, dispatch="dense", **common)
    capped = MoE(D, F, E, K, dispatch="auto", capacity_factor=0.5, **common)
    dropless = MoE(D, F, E, K, dispatch="auto", capacity_factor=None, **common)
    assert capped.dispatch == "auto"  # resolved per call, not at construction
    grouped_calls = []

    def counting(*args, **kwargs):
        grouped_calls.append(1)
        return dispatch_grouped(*args, **kwargs)

    monkeypatch.setattr(moe_layer, "dispatch_grouped", counting)
    (y_dense, _), (_, aux_train), (y_infer, aux_infer), (y_dropless, aux_dropless) = eqx.filter_jit(
        lambda d, c, n, x: (d(x), c(x), c(x, inference=True), n(x)))(dense, capped, dropless, x)
    assert len(grouped_calls) == 2  # inference and dropless; training with a factor used capacity
    assert float(aux_train["dropped_fraction"]) >= 0.5 - 1e-6
    for y, aux in ((y_infer, aux_infer), (y_dropless, aux_dropless)):
        assert float(aux["dropped_fraction"]) == 0.0
        np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-6)


def _expected_keep(indices, weights, capacity):
    """The documented rule, by hand: per expert keep the `capacity` assignments with
    the largest weight, ties to the earlier token, then the earlier choice."""
    indices, weights = np.asarray(indices), np.asarray(weights)
    keep = np.zeros(indices.shape, bool)
    for e in range(E):
        members = [(-weights[t, j], t, j) for t in range(indices.shape[0]) for j in range(indices.shape[1])
                   if indices[t, j] == e]
        for _, t, j in sorted(members)[:capacity]:
            keep[t, j] = True
    return keep


def test_capacity_drops_exactly_the_documented_assignments(layer, x):
    rng = np.random.default_rng(1)
    indices = _distinct_pairs(rng, [0, 1, 2, 5])  # 4 busy experts: heavy overflow
    # Coarse weights so that ties occur and the tie-break is exercised.
    weights = jnp.asarray(rng.integers(1, 4, indices.shape) / 4, jnp.float32)
    routing = Routing(weights, jnp.asarray(indices, jnp.int32), jnp.zeros((T, E)))
    capacity = expert_capacity(T, K, E, 1.0)
    assert capacity == T * K // E == 12
    keep = _expected_keep(indices, weights, capacity)
    assert 0 < keep.sum() < keep.size

    def capacity_loss(x, experts):
        y, dropped = dispatch_capacity(x, experts, routing, capacity=capacity)
        return jnp.sum(jnp.sin(3 * y)), (y, dropped)

    def oracle_loss(x, experts):  # dense with the dropped assignments' weights zeroed
        y, _ = dispatch_dense(x, experts, routing._replace(weights=weights * keep))
        return jnp.sum(jnp.sin(3 * y)), y

    @jax.jit
    def both(x, experts):
        return (jax.value_and_grad(capacity_loss, argnums=(0, 1), has_aux=True)(x, experts),
                jax.value_and_grad(oracle_loss, argnums=(0, 1), has_aux=True)(x, experts))

    ((_, (y, dropped)), grads), ((_, y_ref), grads_ref) = both(x, layer.experts)
    np.testing.assert_allclose(float(dropped), 1 - keep.mean(), rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    _assert_trees_close(grads, grads_ref, rtol=1e-5, atol=1e-6)


def test_capacity_rule_on_a_hand_example(layer):
    # Expert 0 gets four assignments, capacity 2: keeps the 0.9 (token 2) and the
    # earlier of the two 0.7s (token 0 beats token 3); drops token 3 and token 1.
    indices = jnp.array([[0, 1], [2, 0], [0, 3], [0, 4]], jnp.int32)
    weights = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.7, 0.3]])
    routing = Routing(weights, indices, jnp.zeros((4, E)))
    xs = jax.random.normal(jax.random.key(2), (4, D))
    keep = np.array([[1, 1], [1, 0], [1, 1], [0, 1]], bool)
    (y, dropped), (y_ref, _) = jax.jit(lambda xs, experts: (
        dispatch_capacity(xs, experts, routing, capacity=2),
        dispatch_dense(xs, experts, routing._replace(weights=weights * keep))))(xs, layer.experts)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-7)
    assert float(dropped) == pytest.approx(2 / 8)


def test_expert_capacity_formula():
    assert expert_capacity(100, 2, 8, 1.25) == 32  # ceil(100 * 2 / 8 * 1.25) = ceil(31.25)
    assert expert_capacity(100, 2, 8, None) == 100  # dropless worst case
    assert expert_capacity(4, 2, 2, 10.0) == 4  # never more rows than tokens


def test_moe_layer_capacity_drops_in_training_not_at_inference(x):
    common = dict(key=jax.random.key(3))
    dense = MoE(D, F, E, K, dispatch="dense", **common)
    capped = MoE(D, F, E, K, dispatch="capacity", capacity_factor=0.5, **common)
    (y_dense, aux_dense), (y_train, aux_train), (y_infer, aux_infer) = eqx.filter_jit(
        lambda dense, capped, x: (dense(x), capped(x), capped(x, inference=True)))(dense, capped, x)
    assert float(aux_train["dropped_fraction"]) >= 0.5 - 1e-6  # half the capacity of a balanced load
    assert float(aux_infer["dropped_fraction"]) == 0.0 == float(aux_dense["dropped_fraction"])
    np.testing.assert_allclose(y_infer, y_dense, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y_train, y_dense, atol=1e-4)
    for name in ("load_balancing_loss", "router_z_loss", "expert_load"):
        np.testing.assert_allclose(aux_train[name], aux_dense[name], rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["capacity", "grouped"])
def test_fp8_experts_are_close_to_full_precision(x, dispatch):
    common = dict(dispatch=dispatch, key=jax.random.key(4))

    @eqx.filter_jit
    def output_and_grads(m, x):
        return eqx.filter_value_and_grad(lambda m: jnp.sum(jnp.sin(300 * m(x)[0])))(m), m(x)[0]

    (_, g_ref), y_ref = output_and_grads(MoE(D, F, E, K, **common), x)
    for scaling, block in (("tensor", 128), ("block", 8)):
        fp8 = MoE(D, F, E, K, use_fp8=True, fp8_scaling=scaling, fp8_block_size=block, **common)
        (_, g_fp8), y_fp8 = output_and_grads(fp8, x)
        assert not np.array_equal(y_fp8, y_ref)  # really quantised
        rel = float(jnp.linalg.norm(y_fp8 - y_ref) / jnp.linalg.norm(y_ref))
        assert rel < 0.1, (scaling, rel)
        for name in ("gate", "up", "down"):
            a, b = getattr(g_fp8.experts, name), getattr(g_ref.experts, name)
            assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 0.2, (scaling, name)


# ------------------------------------------------------------------ router options
def test_sigmoid_router_scores_and_renormalisation():
    logits = jax.random.normal(jax.random.key(5), (T, E)) * 2
    bias = jnp.linspace(-0.3, 0.3, E)
    for renormalize in (True, False):
        r = route(logits, K, router_type="sigmoid", renormalize=renormalize, selection_bias=bias)
        scores = jax.nn.sigmoid(logits)
        expected_idx = jnp.argsort(-(scores + bias), axis=-1)[:, :K]
        np.testing.assert_array_equal(r.indices, expected_idx)
        w = jnp.take_along_axis(scores, expected_idx, axis=-1)  # the bias never enters the weights
        w = w / w.sum(-1, keepdims=True) if renormalize else w
        np.testing.assert_allclose(r.weights, w, rtol=1e-6)
        np.testing.assert_allclose(r.probs, scores / scores.sum(-1, keepdims=True), rtol=1e-6)


def test_selection_bias_has_no_gradient():
    logits = jax.random.normal(jax.random.key(6), (T, E))
    grad = jax.grad(lambda b: jnp.sum(route(logits, K, selection_bias=b).weights ** 2))(jnp.ones(E) * 0.1)
    assert np.all(np.asarray(grad) == 0.0)


def test_load_balancing_loss_is_one_when_uniform():
    indices = jnp.arange(E * K, dtype=jnp.int32).reshape(E, K) % E
    routing = Routing(jnp.full((E, K), 0.5), indices, jnp.full((E, E), 1.0 / E))
    assert float(load_balancing_loss(routing, E)) == pytest.approx(1.0)


def test_shared_experts_add_to_the_routed_output(x):
    layer = MoE(D, F, E, K, num_shared_experts=2, key=jax.random.key(7))
    plain = eqx.tree_at(lambda m: m.shared, layer, None, is_leaf=lambda v: v is None)
    y, y_routed, y_shared = eqx.filter_jit(lambda a, b, x: (a(x)[0], b(x)[0], a.shared(x)))(layer, plain, x)
    assert layer.shared.gate_proj.weight.shape == (D, 2 * F)
    np.testing.assert_allclose(y, y_routed + y_shared, rtol=1e-5, atol=1e-6)


def test_router_jitter_only_in_training_and_bounded(x):
    jitter = 0.1
    layer = MoE(D, F, E, K, jitter=jitter, key=jax.random.key(8))
    clean = x @ layer.router
    noisy = layer.router_logits(x, key=jax.random.key(9))
    assert not np.allclose(noisy, clean)
    bound = jitter * (jnp.abs(x) @ jnp.abs(layer.router))
    assert np.all(np.abs(noisy - clean) <= bound + 1e-6)
    np.testing.assert_array_equal(layer.router_logits(x, key=jax.random.key(9), inference=True), clean)
    np.testing.assert_array_equal(layer.router_logits(x), clean)


def test_aux_free_bias_updates_move_loads_toward_uniform():
    config = ModelConfig.preset("tiny", aux_free_bias=True, aux_free_bias_rate=0.01,
                                attention_impl="reference")
    model = VishwamAI(config, key=jax.random.key(10))
    # Skew every router: all hidden states share a direction u, and experts 0 and 1
    # score high along it, so nearly every token picks experts 0 and 1.
    u = jax.random.normal(jax.random.key(11), (config.hidden_size,))
    u = u / jnp.linalg.norm(u)
    model = eqx.tree_at(lambda m: m.embed, model, model.embed + 0.05 * u)
    skew = jnp.zeros((config.hidden_size, config.num_experts)).at[:, :2].set(u[:, None])
    router = lambda m: m.stages[0].blocks[0].mlp.router  # noqa: E731  [layers, hidden, experts]
    model = eqx.tree_at(router, model, router(model) + skew)
    tokens = jax.random.randint(jax.random.key(12), (4, 32), 0, config.vocab_size)

    @eqx.filter_jit
    def step(model):
        _, aux = model(tokens)
        return model.update_router_bias(aux["expert_load"]), aux["expert_load"]

    def imbalance(load):
        return float(jnp.max(jnp.abs(load - 1.0 / config.num_experts)))

    model, first = step(model)
    assert imbalance(first) > 0.2
    late = []
    for i in range(99):
        model, load = step(model)
        if i >= 89:
            late.append(imbalance(load))
    # Sign updates end in a small oscillation around balance: judge the last ten steps.
    assert np.mean(late) < 0.5 * imbalance(first), (first, late)
    bias = model.stages[0].blocks[0].mlp.selection_bias  # [repeats, experts]
    assert np.all(np.asarray(bias[:, :2]) < 0) and np.all(np.asarray(bias[:, 2:]) > 0)


# ------------------------------------------------------------------ DeepSeek / Qwen-MoE options
def _brute_force_route(logits, bias, k, n_groups, topk_groups, router_type, renormalize, scale):
    """Routing by exhaustion, in numpy: the allowed groups are the `topk_groups` whose
    sum-of-best-two selection scores is largest; among their experts, every k-subset is
    tried and the one with the largest summed selection score wins."""
    import itertools

    logits = np.asarray(logits, np.float64)
    if router_type == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    selection = scores + np.asarray(bias)
    tokens, experts = logits.shape
    size = experts // n_groups
    indices, weights = [], []
    for t in range(tokens):
        groups = selection[t].reshape(n_groups, size)
        group_score = np.sort(groups, axis=-1)[:, -2:].sum(-1)
        allowed_groups = max(itertools.combinations(range(n_groups), topk_groups),
                             key=lambda gs: sum(group_score[g] for g in gs))
        allowed = [g * size + i for g in allowed_groups for i in range(size)]
        best = max(itertools.combinations(allowed, k), key=lambda es: sum(selection[t, e] for e in es))
        best = sorted(best, key=lambda e: -selection[t, e])
        w = scores[t, best]
        w = w / w.sum() if renormalize else w
        indices.append(best)
        weights.append(w * scale)
    return np.array(indices), np.array(weights)


@pytest.mark.parametrize(("router_type", "renormalize", "n_groups", "topk_groups", "scale"), [
    ("sigmoid", True, 4, 2, 2.5),  # DeepSeek-V3
    ("sigmoid", False, 8, 3, 1.0),
    ("softmax", False, 4, 1, 1.0),  # top-k within one group, raw softmax weights (norm_topk_prob=False)
    ("softmax", True, 1, 1, 1.0),  # no groups
])
def test_group_limited_routing_equals_brute_force(router_type, renormalize, n_groups, topk_groups, scale):
    tokens, experts, k = 24, 16, 3
    logits = jax.random.normal(jax.random.key(30), (tokens, experts)) * 2
    bias = jax.random.uniform(jax.random.key(31), (experts,), minval=-0.2, maxval=0.2)
    options = dict(router_type=router_type, renormalize=renormalize, selection_bias=bias,
                   n_groups=n_groups, topk_groups=topk_groups, routed_scaling_factor=scale)
    r = jax.jit(lambda l: route(l, k, **options))(logits)
    want_idx, want_w = _brute_force_route(logits, bias, k, n_groups, topk_groups, router_type, renormalize, scale)
    np.testing.assert_array_equal(r.indices, want_idx)
    np.testing.assert_allclose(r.weights, want_w, rtol=1e-5)
    if topk_groups < n_groups:  # every choice inside the token's allowed groups, not just any top-k
        plain = route(logits, k, router_type=router_type, selection_bias=bias)
        assert not np.array_equal(plain.indices, r.indices)

    # Gradients: the weights as plain functions of the logits at the brute-force choice.
    def reference(logits):
        scores = jax.nn.sigmoid(logits) if router_type == "sigmoid" else jax.nn.softmax(logits, axis=-1)
        w = jnp.take_along_axis(scores, jnp.asarray(want_idx), axis=-1)
        return (w / jnp.sum(w, -1, keepdims=True) if renormalize else w) * scale

    ct = jax.random.normal(jax.random.key(32), (tokens, k))
    grads = [jax.grad(lambda l, f=f: jnp.sum(f(l) * ct))(logits)
             for f in (lambda l: route(l, k, **options).weights, reference)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(grads[1]))) > 1e-3
    # The selection bias and the group limit choose; they never enter the weights' gradient.
    bias_grad = jax.grad(lambda b: jnp.sum(route(logits, k, **{**options, "selection_bias": b}).weights))(bias)
    assert np.all(np.asarray(bias_grad) == 0.0)


def test_group_limited_scores_on_a_hand_example():
    # Two groups of three. Row 0: group 0's best two sum to 1.0, group 1's to 0.9: group 0.
    # Row 1: group 0 holds the best expert (0.9) but its best two sum to 0.9 < 0.95: group 1.
    selection = np.array([[0.9, 0.1, 0.0, 0.5, 0.4, 0.3], [0.9, 0.0, 0.0, 0.5, 0.45, 0.3]], np.float32)
    out = moe_module.group_limited_scores(jnp.asarray(selection), 2, 1)
    want = np.where([[True] * 3 + [False] * 3, [False] * 3 + [True] * 3], selection, -np.inf)
    np.testing.assert_array_equal(out, want)


def _plain_sequence_loss(indices, probs, experts, k):
    """DeepSeek-V3 eq. 17-20 with loops: per sequence f_i = E/(K T) * count_i, P_i = mean of s'_i."""
    losses = []
    for seq_idx, seq_probs in zip(indices, probs):
        tokens = seq_idx.shape[0]
        f = [experts / (k * tokens) * sum(int(e in row) for row in seq_idx.tolist()) for e in range(experts)]
        p = [sum(seq_probs[t, e] for t in range(tokens)) / tokens for e in range(experts)]
        losses.append(sum(fi * pi for fi, pi in zip(f, p)))
    return sum(losses) / len(losses)


def test_sequence_balance_loss_equals_a_plain_loop():
    sequences, length, k = 3, 10, 2
    logits = jax.random.normal(jax.random.key(33), (sequences * length, E)) * 2
    r = route(logits, k, router_type="sigmoid")
    got = moe_module.sequence_balance_loss(r, E, sequences)
    want = _plain_sequence_loss(np.asarray(r.indices).reshape(sequences, length, k),
                                np.asarray(r.probs, np.float64).reshape(sequences, length, E), E, k)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # One sequence: the Switch loss. Several: not the Switch loss of the whole batch.
    np.testing.assert_allclose(moe_module.sequence_balance_loss(r, E, 1), load_balancing_loss(r, E), rtol=1e-6)
    assert abs(float(got) - float(load_balancing_loss(r, E))) > 1e-4

    # Gradient w.r.t. the logits: f is a count (no gradient), P the mean normalised sigmoid.
    counts = np.zeros((sequences, E))
    for s, rows in enumerate(np.asarray(r.indices).reshape(sequences, length, k)):
        for row in rows:
            counts[s, row] += 1

    def reference(logits):
        total = 0.0
        for s in range(sequences):
            scores = jax.nn.sigmoid(logits[s * length:(s + 1) * length])
            p = jnp.mean(scores / jnp.sum(scores, -1, keepdims=True), axis=0)
            total = total + jnp.sum(E / (k * length) * counts[s] * p)
        return total / sequences

    grad = jax.grad(lambda l: moe_module.sequence_balance_loss(route(l, k, router_type="sigmoid"), E, sequences))
    np.testing.assert_allclose(grad(logits), jax.grad(reference)(logits), rtol=1e-5, atol=1e-8)


def test_layer_reports_the_sequence_loss_per_row_of_its_batch():
    x3 = jax.random.normal(jax.random.key(34), (3, 16, D))
    common = dict(router_type="sigmoid", key=jax.random.key(35))
    switch, sequence = MoE(D, F, E, K, **common), MoE(D, F, E, K, balance_loss="sequence", **common)
    (y_a, aux_a), (y_b, aux_b) = eqx.filter_jit(lambda a, b, x: (a(x), b(x)))(switch, sequence, x3)
    np.testing.assert_array_equal(y_a, y_b)  # only the reported loss differs
    r = route(x3.reshape(-1, D) @ switch.router, K, router_type="sigmoid")
    np.testing.assert_allclose(aux_a["load_balancing_loss"], load_balancing_loss(r, E), rtol=1e-6)
    np.testing.assert_allclose(aux_b["load_balancing_loss"], moe_module.sequence_balance_loss(r, E, 3), rtol=1e-6)
    with pytest.raises(ValueError, match="balance_loss"):
        MoE(D, F, E, K, balance_loss="global", key=jax.random.key(0))
    with pytest.raises(ValueError, match="capacity_priority"):
        MoE(D, F, E, K, capacity_priority="random", key=jax.random.key(0))


def _swiglu(x, gate, up, down):
    return jnp.einsum("tf,fd->td", jax.nn.silu(jnp.einsum("td,df->tf", x, gate)) * jnp.einsum("td,df->tf", x, up),
                      down)


def test_gated_shared_experts_equal_an_einsum_reference(x):
    """Qwen2-MoE: y = routed(x) + sigmoid(x @ w) * shared(x), the shared experts one MLP of
    `num_shared_experts * shared_expert_ffn_dim`; values and gradients against einsums."""
    layer = MoE(D, F, E, K, num_shared_experts=2, shared_expert_ffn_dim=12, shared_gate=True,
                routed_scaling_factor=2.0, key=jax.random.key(36))
    assert layer.shared.gate_proj.weight.shape == (D, 24) and layer.shared_gate.shape == (D, 1)
    assert layer.experts.gate.shape == (E, D, F)

    def reference(layer, x):
        routing = route(x @ layer.router, K, routed_scaling_factor=2.0)
        routed = jnp.einsum("te,etd->td", moe_module.combine_matrix(routing, E),
                            jnp.stack([_swiglu(x, *(w[e] for w in (layer.experts.gate, layer.experts.up,
                                                                   layer.experts.down))) for e in range(E)]))
        s = layer.shared
        shared = _swiglu(x, s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight)
        return routed + jax.nn.sigmoid(x @ layer.shared_gate) * shared

    def values_and_grads(fn):
        loss = lambda m, x: jnp.sum(jnp.sin(3 * fn(m, x)))  # noqa: E731
        return fn(layer, x), eqx.filter_grad(loss)(layer, x), jax.grad(loss, argnums=1)(layer, x)

    got, want = eqx.filter_jit(lambda: (values_and_grads(lambda m, x: m(x)[0]), values_and_grads(reference)))()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    _assert_trees_close(got[1:], want[1:], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(got[1].shared_gate))) > 1e-4
    with pytest.raises(ValueError, match="num_shared_experts >= 1"):
        MoE(D, F, E, K, shared_gate=True, key=jax.random.key(0))


def test_shared_experts_default_width_and_init_unchanged_without_the_gate():
    plain = MoE(D, F, E, K, num_shared_experts=2, key=jax.random.key(37))
    wide = MoE(D, F, E, K, num_shared_experts=2, shared_expert_ffn_dim=F, key=jax.random.key(37))
    assert plain.shared_gate is None and plain.shared.gate_proj.weight.shape == (D, 2 * F)
    _assert_trees_close(plain, wide, rtol=0, atol=0)


@pytest.mark.parametrize(("n_groups", "topk_groups", "message"), [
    (3, 1, "n_groups=3 must be a positive divisor"),
    (4, 5, r"topk_groups=5 must be in \[1, n_groups=4\]"),
    (8, 1, "leave 1 eligible, fewer than top_k=2"),
])
def test_group_options_are_checked(n_groups, topk_groups, message):
    with pytest.raises(ValueError, match=message):
        MoE(D, F, E, K, n_groups=n_groups, topk_groups=topk_groups, key=jax.random.key(0))


def _count_dots(jaxpr) -> int:
    return str(jaxpr).count("dot_general")


def test_grouped_program_does_not_grow_with_the_expert_count():
    """The grouped kernel loops over experts at run time: forward and backward trace to the
    same program for 8 and 64 experts (a per-expert Python loop would be 8 times larger)."""
    def program(experts):
        ex = moe_module.Experts(experts, D, 8, key=jax.random.key(0))
        xs = jnp.zeros((64, D))
        routing = Routing(jnp.ones((64, 8)), jnp.zeros((64, 8), jnp.int32), jnp.zeros((64, experts)))
        loss = lambda x, ex: jnp.sum(dispatch_grouped(x, ex, routing)[0])  # noqa: E731
        return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(xs, ex)

    small, large = _count_dots(program(8)), _count_dots(program(64))
    assert small == large > 0


def test_fine_grained_layer_with_every_option_equals_dense_grouped_and_expert_parallel():
    """64 experts top-8 of FFN 8 in 8 groups (top 3), sigmoid + bias, scaling 2.5, gated shared
    expert: the `grouped` dispatch and the expert-parallel path (dropless, `expert=8` mesh)
    equal the `dense` oracle in values and gradients."""
    from vishwam.parallel import make_mesh, shard_batch, shard_model

    experts, k = 64, 8
    common = dict(router_type="sigmoid", n_groups=8, topk_groups=3, routed_scaling_factor=2.5,
                  num_shared_experts=1, shared_gate=True, aux_free_bias=True, balance_loss="sequence",
                  key=jax.random.key(38))
    bias = jnp.linspace(-0.05, 0.05, experts)
    dense, grouped = (eqx.tree_at(lambda m: m.selection_bias, MoE(D, 8, experts, k, dispatch=d, **common), bias)
                      for d in ("dense", "grouped"))
    xs = jax.random.normal(jax.random.key(39), (8, 16, D))
    values_and_grads = eqx.filter_jit(lambda m, x: _layer_values_and_grads(m, x))
    want = values_and_grads(dense, xs)
    assert float(want[1]) > 0  # aux present
    _assert_trees_close(values_and_grads(grouped, xs), want, rtol=1e-5, atol=1e-6)
    mesh = make_mesh(expert=8)
    with jax.set_mesh(mesh):
        got = values_and_grads(shard_model(dense, mesh), shard_batch(xs, mesh))
    _assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def _layer_values_and_grads(layer, x):
    def loss(layer, x):
        y, aux = layer(x)
        return jnp.sum(jnp.sin(3 * y)) + aux["load_balancing_loss"], (y, aux["load_balancing_loss"])

    (_, (y, balance)), (grads, x_grad) = eqx.filter_value_and_grad(
        lambda lx: loss(*lx), has_aux=True)((layer, x))
    return y, balance, grads, x_grad


def test_tiny_model_with_every_option_trains():
    """Dense first layer of FFN 64, then MoE layers of 8 experts of FFN 16 in 4 groups (top 2),
    sigmoid + aux-free bias, scaling 2.5, sequence-wise loss, a gated shared expert of FFN 24:
    the train step lowers the loss on a fixed batch."""
    from vishwam.config import TrainConfig
    from vishwam.train import init_train_state, make_train_step

    config = ModelConfig.preset(
        "tiny", num_layers=3, first_dense_layers=1, num_experts=8, experts_per_token=2, moe_ffn_dim=16,
        n_groups=4, topk_groups=2, router_type="sigmoid", routed_scaling_factor=2.5, aux_free_bias=True,
        load_balance_loss="sequence", num_shared_experts=1, shared_expert_ffn_dim=24, shared_expert_gate=True,
        moe_dispatch="grouped", attention_impl="reference")
    model = VishwamAI(config, key=jax.random.key(40))
    block = model.stages[-1].blocks[0]
    assert block.is_moe and block.mlp.experts.gate.shape[-1] == 16 and block.mlp.shared_gate is not None
    assert not model.stages[0].blocks[0].is_moe and model.stages[0].blocks[0].mlp.gate_proj.weight.shape[-1] == 64
    train_config = TrainConfig(learning_rate=3e-3, warmup_steps=0, total_steps=20, batch_size=4, seq_len=16)
    state = init_train_state(model, train_config, key=jax.random.key(41))
    tokens = jax.random.randint(jax.random.key(42), (4, 17), 0, config.vocab_size)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((4, 16), jnp.float32)}
    step = make_train_step(config, train_config)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["ce"]))
        assert np.isfinite(float(metrics["aux"])) and float(metrics["aux"]) > 0
    assert losses[-1] < losses[0] - 0.1, losses
    bias = state.model.stages[-1].blocks[0].mlp.selection_bias
    assert float(jnp.max(jnp.abs(bias))) > 0  # the aux-free update ran


def test_position_priority_rule_on_a_hand_example(layer):
    # As `test_capacity_rule_on_a_hand_example`, ranked by position: expert 0 keeps its first
    # two tokens' assignments (tokens 0 and 1) and drops token 2's 0.9 and token 3's.
    assert moe_module.position_priority(2, 3).tolist() == [0, 2, 4, 1, 3, 5]  # position * rows + row
    indices = jnp.array([[0, 1], [2, 0], [0, 3], [0, 4]], jnp.int32)
    weights = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.7, 0.3]])
    routing = Routing(weights, indices, jnp.zeros((4, E)))
    xs = jax.random.normal(jax.random.key(2), (4, D))
    keep = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], bool)
    (y, dropped), (y_ref, _) = jax.jit(lambda xs, experts: (
        dispatch_capacity(xs, experts, routing, capacity=2, priority=moe_module.position_priority(1, 4)),
        dispatch_dense(xs, experts, routing._replace(weights=weights * keep))))(xs, layer.experts)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-7)
    assert float(dropped) == pytest.approx(2 / 8)


def _leak(logits_fn, a, b, row, t):
    """Largest change of row `row`'s outputs at positions <= t, and of every row's."""
    ya, yb = logits_fn(a), logits_fn(b)
    return float(jnp.max(jnp.abs(ya[row, :t + 1] - yb[row, :t + 1]))), float(jnp.max(jnp.abs(ya[:, :t + 1] -
                                                                                             yb[:, :t + 1])))


@pytest.mark.parametrize("priority", ["position", "score"])
def test_capacity_by_position_never_looks_at_later_tokens(priority):
    """Training with tokens dropped: changing row 1's tokens after position t changes no logits at
    positions <= t with `capacity_priority="position"`; with `"score"` (the largest weights first)
    it does, so the test can fail."""
    config = ModelConfig.preset("tiny", capacity_factor=0.5, moe_dispatch="capacity", capacity_priority=priority,
                                attention_impl="reference")
    model = VishwamAI(config, key=jax.random.key(50))
    run = eqx.filter_jit(lambda model, tokens: model(tokens))
    tokens = jax.random.randint(jax.random.key(51), (4, 16), 0, config.vocab_size)
    _, aux = run(model, tokens)
    assert float(aux["dropped_fraction"]) > 0.2
    leaks = []
    for t in (3, 8, 12):
        changed = tokens.at[1, t + 1:].set(jax.random.randint(jax.random.key(t), (15 - t,), 0, config.vocab_size))
        leaks.append(_leak(lambda x: run(model, x)[0], tokens, changed, 1, t))
    if priority == "position":
        assert max(max(pair) for pair in leaks) == 0.0, leaks
    else:
        assert max(own for own, _ in leaks) > 1e-3, leaks


def test_expert_parallel_capacity_by_position_is_the_per_device_rule_and_causal(layer):
    """Under an `expert=8` mesh each device ranks its own rows by position, as the single-device
    dispatch does on that slice; so changing a row's later tokens changes none of its earlier outputs."""
    from vishwam.parallel import make_mesh, shard_batch, shard_model

    capped = MoE(D, F, E, K, dispatch="capacity", capacity_factor=1.0, key=jax.random.key(52))
    rows, seq = 8, 16
    xs = jax.random.normal(jax.random.key(53), (rows, seq, D))
    mesh = make_mesh(expert=8)
    with jax.set_mesh(mesh):
        run = eqx.filter_jit(lambda m, x: m(x))
        sharded = shard_model(capped, mesh)
        y, aux = run(sharded, shard_batch(xs, mesh))
        changed = xs.at[2, 6:].set(jax.random.normal(jax.random.key(54), (seq - 6, D)))
        y_changed, _ = run(sharded, shard_batch(changed, mesh))
    assert float(aux["dropped_fraction"]) > 0
    np.testing.assert_array_equal(np.asarray(y_changed)[2, :6], np.asarray(y)[2, :6])
    np.testing.assert_array_equal(np.asarray(y_changed)[[0, 1, 3, 4, 5, 6, 7]], np.asarray(y)[[0, 1, 3, 4, 5, 6, 7]])
    # Each device holds one row: the single-device layer on that row alone.
    per_row = jax.vmap(lambda x: capped(x[None])[0][0])(xs)
    np.testing.assert_allclose(y, per_row, rtol=1e-5, atol=1e-6)


def _transformers_balance_loss(logits_per_layer, k, mask):
    """transformers' `load_balancing_loss_func` with an attention mask, transcribed to numpy."""
    experts = logits_per_layer[0].shape[-1]
    counts, probs, rows = np.zeros(experts), np.zeros(experts), 0.0
    for logits in logits_per_layer:
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1)[:, :k]
        for t in range(len(p)):
            counts[top[t]] += mask[t]
        probs += (p * mask[:, None]).sum(0)
        rows += mask.sum()
    return experts * np.sum(counts / rows * probs / rows)


def test_pooled_balance_loss_is_transformers_loss_over_all_layers():
    layers = [np.asarray(jax.random.normal(jax.random.key(55 + n), (30, E)) * 2, np.float32) for n in range(3)]
    mask = np.arange(30) % 7 != 3
    sums = [moe_module.balance_sums(*route(jnp.asarray(l), K)[1:], E, jnp.asarray(mask)) for l in layers]
    pooled = jax.tree_util.tree_map(lambda *xs: sum(xs), *sums)
    np.testing.assert_allclose(float(moe_module.pooled_balance_loss(pooled, E)),
                               _transformers_balance_loss(layers, K, mask.astype(np.float64)), rtol=1e-5)
    # Not the mean of the layers' own losses, and K times the Switch loss for one layer.
    own = [float(moe_module.pooled_balance_loss(s, E)) for s in sums]
    assert abs(np.mean(own) - float(moe_module.pooled_balance_loss(pooled, E))) > 1e-4
    r = route(jnp.asarray(layers[0]), K)
    np.testing.assert_allclose(own[0], K * float(load_balancing_loss(r, E, jnp.asarray(mask))), rtol=1e-5)


@pytest.mark.parametrize("balance", ["switch", "sequence", "hf"])
def test_moe_statistics_ignore_padding(balance):
    """Appending padding (segment 0: more positions, and a row of nothing else) leaves the balance
    loss, the router z-loss and `expert_load` unchanged when the model gets the token mask."""
    config = ModelConfig.preset("tiny", load_balance_loss=balance, attention_impl="reference")
    model = VishwamAI(config, key=jax.random.key(56))
    tokens = jax.random.randint(jax.random.key(57), (2, 12), 0, config.vocab_size)
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
    padded_tokens = jnp.zeros((3, 20), jnp.int32).at[:2, :12].set(tokens)
    padded_segments = jnp.zeros((3, 20), jnp.int32).at[:2, :12].set(segments)
    run = eqx.filter_jit(lambda m, t, s, mask: m(t, segment_ids=s, token_mask=mask)[1])
    want = run(model, tokens, segments, segments != 0)
    got = run(model, padded_tokens, padded_segments, padded_segments != 0)
    counted_padding = run(model, padded_tokens, padded_segments, None)
    for name in ("load_balancing_loss", "router_z_loss", "expert_load"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
        assert np.abs(np.asarray(counted_padding[name]) - np.asarray(want[name])).max() > 1e-4, name
