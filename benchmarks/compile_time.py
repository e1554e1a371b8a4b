"""Compile time of forward+backward for 2 vs 16 layers of the `tiny` preset.

With `jax.lax.scan` over stacked layers the compile time should barely depend on
depth (goal: 16-layer / 2-layer ratio < 1.5); the unrolled path is reported beside it.

    python benchmarks/compile_time.py
"""

import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from vishwam import ModelConfig, VishwamAI


def compile_seconds(num_layers: int, scan: bool) -> float:
    config = ModelConfig.preset("tiny", num_layers=num_layers, scan_layers=scan)
    model = VishwamAI(config, key=jax.random.key(0))
    tokens = jnp.zeros((2, 64), jnp.int32)

    def loss(m, t):
        logits, aux = m(t)
        return jnp.mean(logits) + aux["load_balancing_loss"]

    fn = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    start = time.perf_counter()
    fn.lower(model, tokens).compile()
    return time.perf_counter() - start


def main():
    jax.config.update("jax_enable_compilation_cache", False)
    print(f"jax {jax.__version__} on {platform.processor() or platform.machine()}, {jax.devices()[0].platform}")
    rows = []
    for scan in (True, False):
        t2 = compile_seconds(2, scan)
        t16 = compile_seconds(16, scan)
        rows.append((scan, t2, t16))
        print(f"{'scan    ' if scan else 'unrolled'}: 2 layers {t2:6.2f} s   16 layers {t16:6.2f} s   ratio {t16 / t2:5.2f}")
    scan_ratio = rows[0][2] / rows[0][1]
    print(f"goal: scanned ratio < 1.5 -> {'met' if scan_ratio < 1.5 else 'NOT met'} ({scan_ratio:.2f})")


if __name__ == "__main__":
    main()
