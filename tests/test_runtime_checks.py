"""Run-time type checks by a switch, and the cheap checks that hold without it.

The tests themselves run under jaxtyping's import hook (pyproject's `--jaxtyping-packages`), so
both modes are observed in fresh processes: one without any hook, one switched on by
`VISHWAM_RUNTIME_CHECKS=1`, one calling `enable_runtime_checks()` too late.
"""

import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, sys
    import vishwam

    if sys.argv[1] == "late":
        import vishwam.nn
        try:
            vishwam.enable_runtime_checks()
            print(json.dumps({"late": None}))
        except RuntimeError as error:
            print(json.dumps({"late": str(error)}))
        raise SystemExit

    import jax.numpy as jnp
    from vishwam import ModelConfig, VishwamAI, flash_attention
    from vishwam.nn import RMSNorm
    import jax

    def outcome(fn):
        try:
            fn()
            return None
        except Exception as error:  # the type and message are what the test reads
            return [type(error).__name__, str(error)]

    model = VishwamAI(ModelConfig.preset("tiny"), key=jax.random.key(0))
    q = jnp.ones((1, 8, 4, 8))
    print(json.dumps({
        "tokens_1d": outcome(lambda: model(jnp.zeros((8,), jnp.int32))),
        "tokens_float": outcome(lambda: model(jnp.zeros((1, 8), jnp.float32))),
        "norm_width": outcome(lambda: RMSNorm(8)(jnp.ones((2, 16)))),
        "norm_dtype": outcome(lambda: RMSNorm(8)(jnp.ones((2, 8), jnp.int32))),
        "attention_head_dim": outcome(lambda: flash_attention(q, jnp.ones((1, 8, 4, 6)), jnp.ones((1, 8, 4, 6)))),
        "fine": outcome(lambda: model(jnp.zeros((1, 8), jnp.int32))),
    }))
""")


def _probe(mode: str, **env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "VISHWAM_RUNTIME_CHECKS"}
    environment.update(JAX_PLATFORMS="cpu", **env)
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_cheap_checks_without_the_switch():
    got = _probe("off")
    assert got["fine"] is None
    for case in ("tokens_1d", "tokens_float"):
        kind, message = got[case]
        assert kind == "InvalidValueError" and "tokens must be integer ids [batch, seq]" in message, got[case]
    kind, message = got["norm_width"]
    assert kind == "InvalidValueError" and "(2, 16)" in message and "width 8" in message
    assert got["norm_dtype"] is None  # a dtype slip passes unchecked without the switch


def test_switch_checks_shapes_and_dtypes_of_annotated_code():
    got = _probe("on", VISHWAM_RUNTIME_CHECKS="1")
    assert got["fine"] is None
    kind, message = got["norm_dtype"]
    assert kind == "TypeCheckError" and "parameter 'x'" in message and "i32[2,8]" in message
    kind, message = got["attention_head_dim"]
    assert kind == "TypeCheckError" and "head_dim" in message and "f32[1,8,4,6]" in message
    kind, _ = got["tokens_float"]
    assert kind == "TypeCheckError"


def test_switching_on_too_late_is_refused():
    message = _probe("late")["late"]
    assert message and "are imported already (vishwam." in message and "VISHWAM_RUNTIME_CHECKS=1" in message
