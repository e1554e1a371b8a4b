"""What will run on NVIDIA GPUs, checked from programs compiled here for abstract H100s.

The compiles need JAX's CUDA plugin (`pip install -e ".[gpu-aot]"`, no GPU): CI installs it
and must run them; elsewhere a missing plugin skips them with the reason. The topology
parsing and the roofline's network term need no plugin.
"""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vishwam import ModelConfig
from vishwam.commands.plan import main as plan_main
from vishwam.errors import InvalidValueError
from vishwam.gpu_targets import (
    GPUS,
    cuda_plugin_installed,
    dot_operand_types,
    gpu_devices,
    gpu_target_config,
    pallas_calls,
    parse_gpu_topology,
)
from vishwam.kernels.flash_pallas import KERNEL_NAMES
from vishwam.model.flops import CHIPS, chip_of
from vishwam.nn.fp8 import fp8_matmul
from vishwam.nn.moe import resolve_dispatch
from vishwam.parallel import make_mesh
from vishwam.plan import (
    collective_seconds,
    network_axes,
    no_persistent_cache_unless_runnable,
    topology_devices,
    tpu_devices,
)

ROOT = Path(__file__).resolve().parents[1]
needs_cuda_plugin = pytest.mark.skipif(
    not cuda_plugin_installed() and not os.environ.get("CI"),
    reason="JAX's CUDA plugin is not installed (pip install -e '.[gpu-aot]'); CI installs it")


def test_gpu_topologies_are_whole_nodes_of_eight():
    assert parse_gpu_topology("h100:64") == ("h100", 8, 8)
    assert parse_gpu_topology("H200:8x8") == ("h200", 8, 8)
    assert parse_gpu_topology("b200:4") == ("b200", 1, 4)
    assert parse_gpu_topology("a100:2x6") == ("a100", 2, 6)
    with pytest.raises(InvalidValueError, match="whole hosts of 8"):
        parse_gpu_topology("h100:12")
    with pytest.raises(InvalidValueError, match="expected GPU:N"):
        parse_gpu_topology("h100")


def test_crossing_axes_go_over_the_network():
    chip = next(c for c in CHIPS if c.name == "H100")
    by_axis = {"fsdp": 1e9, "expert": 2e9, "data": 0.0, "tensor": 0.0}
    within = collective_seconds(by_axis, chip)
    across = collective_seconds(by_axis, chip, ("fsdp",))
    assert within == pytest.approx(3e9 / chip.ici_bandwidth)
    assert across == pytest.approx(1e9 / chip.network_bandwidth + 2e9 / chip.ici_bandwidth)


@needs_cuda_plugin
def test_every_shipped_gpu_description_parses_into_a_known_chip():
    for name in GPUS:
        devices = gpu_devices(f"{name}:16")
        assert len(devices) == 16 and {d.platform for d in devices} == {"gpu"}
        assert sorted({d.process_index for d in devices}) == [0, 1]  # two nodes of eight
        chip = chip_of(devices[0])
        assert chip is not None and chip.name.lower() == name, devices[0].device_kind
        assert chip.network_bandwidth and chip.ici_bandwidth > chip.network_bandwidth
    # Another description (--gpu-spec): any name, the GPU it describes.
    custom = topology_devices("mygpu:2", gpu_target_config("b200"))
    assert [d.device_kind for d in custom] == ["NVIDIA B200"] * 2


@needs_cuda_plugin
def test_mesh_axes_that_span_nodes_are_found():
    mesh = make_mesh({"fsdp": 2, "expert": 8}, devices=gpu_devices("h100:16"))
    assert network_axes(mesh) == ("fsdp",)  # the expert groups sit inside a node


@needs_cuda_plugin
def test_backend_choices_follow_the_gpus_compiled_for():
    mesh = make_mesh({"fsdp": 2}, devices=gpu_devices("h100:2"))
    assert resolve_dispatch("auto", None) == "grouped"  # this CPU host
    with jax.set_mesh(mesh):
        assert resolve_dispatch("auto", None) == "ragged"
        assert resolve_dispatch("auto", None, use_fp8=True) == "grouped"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None and not os.environ.get("CI"),
                    reason="libtpu is not installed (pip install 'jax[tpu]'); CI installs it")
def test_moe_auto_dispatch_follows_the_tpus_compiled_for():
    mesh = make_mesh({"fsdp": 4}, devices=tpu_devices("v5e:2x2"))
    with jax.set_mesh(mesh):
        assert resolve_dispatch("auto", None) == "ragged"


@needs_cuda_plugin
def test_fp8_gemms_keep_f8_operands_forward_and_backward():
    mesh = make_mesh({"fsdp": 2}, devices=gpu_devices("h100:2"))
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P()))  # noqa: E731

    def loss(x, w):
        return jnp.sum(jnp.square(fp8_matmul(x, w).astype(jnp.float32)))

    with jax.set_mesh(mesh), no_persistent_cache_unless_runnable(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(spec(256, 512), spec(512, 256)).compile().as_text()
    dots = dot_operand_types(text)
    assert len(dots) == 3, dots  # y = x w, dx = g w^T, dw = x^T g
    assert all(t in ("f8e4m3fn", "f8e5m2") for operands in dots for t in operands), dots
    assert sum("f8e5m2" in operands for operands in dots) == 2  # the e5m2 gradient in both backward GEMMs


@pytest.fixture(scope="module")
def compiled_tiny(tmp_path_factory):
    """`vishwam-plan` on a tiny MoE model for 2 abstract H100s, its program dumped."""
    folder = tmp_path_factory.mktemp("gpu_plan")
    config = ModelConfig.preset("tiny", moe_dispatch="auto", capacity_factor=None)
    (folder / "model.json").write_text(json.dumps(config.to_dict()))
    hlo = folder / "step.hlo.txt"
    argv = ["--config", str(folder / "model.json"), "--topology", "h100:2", "--mesh", "fsdp=2", "--batch", "2",
            "--seq-len", "64", "--dump-hlo", str(hlo), "--json"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = plan_main(argv)
    return code, json.loads(buffer.getvalue().splitlines()[0]), hlo.read_text()


@needs_cuda_plugin
def test_the_train_step_fits_two_h100s(compiled_tiny):
    code, result, _ = compiled_tiny
    assert code == 0 and result["compiled"] and result["fits"] is True, result
    assert result["chip"] == "H100" and result["chips"] == 2 and result["hosts"] == 1
    assert 0 < result["per_chip_bytes"]["total"] < 0.8 * result["hbm_bytes"]


@needs_cuda_plugin
def test_attention_runs_as_triton_kernels_forward_and_backward(compiled_tiny):
    *_, text = compiled_tiny
    calls = pallas_calls(text, KERNEL_NAMES)
    for name in KERNEL_NAMES:  # forward, dk/dv and dq: each a Triton call, none interpreted
        assert calls[name]["triton"] >= 1 and calls[name]["interpreted"] == 0, calls


@needs_cuda_plugin
def test_the_moe_layers_run_the_gpu_dispatch(compiled_tiny):
    *_, text = compiled_tiny
    assert "moe_experts/ragged_dot_general" in text  # `auto` on GPU: ragged grouped GEMMs
    assert "grouped_swiglu" not in text  # the CPU host's choice never reaches the program


@needs_cuda_plugin
def test_a_bad_gpu_spec_is_one_error_line(tmp_path, capsys):
    spec = tmp_path / "bad.txtpb"
    spec.write_text("gpu_device_info { no_such_field: 1 }\n")
    code = plan_main(["--preset", "tiny", "--topology", "h100:2", "--gpu-spec", str(spec)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: topology 'h100:2': the CUDA plugin refused it"), err
    assert "Traceback" not in err


@needs_cuda_plugin
@pytest.mark.skipif(bool(list(Path("/dev").glob("nvidia[0-9]*"))), reason="this machine has an NVIDIA GPU")
def test_scripts_pin_the_cpu_when_the_cuda_plugin_finds_no_gpu():
    """With the CUDA plugin installed and no GPU, a JAX process left to choose prints a plugin
    traceback (cuInit fails); the scripts pin the CPU before JAX starts instead."""
    probe = ("import os; from vishwam.cli import skip_absent_tpu; skip_absent_tpu(); "
             "print(os.environ.get('JAX_PLATFORMS')); import jax; print(jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "cpu"]
    assert "Traceback" not in out.stderr and "configuration error" not in out.stderr, out.stderr


@needs_cuda_plugin
def test_gpu_check_compiles_its_kernels_for_an_h100():
    """benchmarks/gpu_check.py --compile-only at its smoke-test shapes (the train step it times is
    `compile_train_step`, checked above): every Pallas program runs Triton kernels, the fp8 GEMMs
    keep fp8 operands, the fine-grained MoE step compiles under each dispatch the GPU run times,
    one JSON line per figure and no traceback; the serve engine's decode call compiles too."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--compile-only", "--quick",
           "--only", "attention", "--only", "gemm", "--only", "moe_dispatch", "--only", "decode"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0] == {"figure": "device", "device_kind": "NVIDIA H100 80GB HBM3", "compile_only": True,
                        "jax": jax.__version__}
    pallas = [x for x in lines if x.get("impl") == "pallas" or x["figure"] == "attention_error"]
    assert len(pallas) == 3 and all(not x["interpreted_kernels"] for x in pallas), pallas
    assert all(set(x["triton_kernels"]) == set(KERNEL_NAMES) for x in pallas if x.get("direction") != "fwd")
    gemms = {x["kind"]: x["dot_operands"] for x in lines if x["figure"] == "gemm"}
    assert gemms == {"fp8_e4m3": ["f8e4m3fnxf8e4m3fn"], "bf16": ["bf16xbf16"],
                     "vishwam_fp8_matmul": ["f8e4m3fnxf8e4m3fn"]}
    steps = {x["preset"]: x for x in lines if x["figure"] == "train_step"}
    assert sorted(steps) == [f"finegrained-moe/{d}" for d in ("capacity@1.25", "dense", "grouped", "ragged")]
    assert all("error" not in x and x["compile_s"] > 0 and not x["interpreted_kernels"] for x in steps.values())
    decode = [x for x in lines if x["figure"] == "decode"]  # the serve engine's decode call, fp32
    assert [x["rows"] for x in decode] == [1, 4] and all("error" not in x and x["dot_operands"] == ["f32xf32"]
                                                         for x in decode), decode
