"""Start N local processes of one program as one multi-process JAX job (trying multi-host on one machine).

    python -m vishwam.launch -n 2 --cpu-devices 4 -- scripts/train.py --preset tiny --mesh data=2,expert=4

Each process gets the environment `jax.distributed.initialize` needs, which
`scripts/train.py` reads as the defaults of `--coordinator`, `--num-processes`
and `--process-id`:

- `JAX_COORDINATOR_ADDRESS=127.0.0.1:<a free port>` (or `--port`);
- `JAX_NUM_PROCESSES=N` and `JAX_PROCESS_ID=i`;
- with `--cpu-devices K`: `JAX_PLATFORMS=cpu` and `--xla_force_host_platform_device_count=K`
  in `XLA_FLAGS`, so the processes together simulate `N * K` devices.

A program ending in `.py` runs under this Python; anything else runs as given.
The children share this terminal's output and start in their own session, so a
Ctrl-C reaches them once, through the launcher: SIGINT, SIGTERM and SIGHUP sent
to the launcher are forwarded to every child (the trainer checkpoints and stops).
When a child fails (non-zero exit or killed by a signal) the others cannot finish
their collectives, so they get SIGTERM and, after `--grace` seconds, SIGKILL.
The launcher exits with the worst exit code of its children, a death by signal
`s` counting as `128 + s`.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: Mapping[str, str], *, coordinator: str, num_processes: int, process_id: int,
              cpu_devices: int | None) -> dict[str, str]:
    """The environment of process `process_id` (see the module docstring)."""
    env = dict(base)
    env.update({"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(num_processes),
                "JAX_PROCESS_ID": str(process_id)})
    if cpu_devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def exit_code(returncode: int) -> int:
    """A child's status as a shell reports it: a death by signal `s` is `128 + s`."""
    return 128 - returncode if returncode < 0 else returncode


def launch(command: list[str], num_processes: int, *, port: int | None = None, cpu_devices: int | None = None,
           grace: float = 10.0) -> int:
    """Runs `command` as processes `0 .. num_processes - 1`; returns the worst exit code (see module docstring)."""
    if command and command[0].endswith(".py"):
        command = [sys.executable, *command]
    coordinator = f"127.0.0.1:{port or free_port()}"
    children: list[subprocess.Popen] = []

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        for i in range(num_processes):
            env = child_env(os.environ, coordinator=coordinator, num_processes=num_processes, process_id=i,
                            cpu_devices=cpu_devices)
            children.append(subprocess.Popen(command, env=env, start_new_session=True))
            print(f"launch: process {i} of {num_processes} is pid {children[-1].pid} "
                  f"(coordinator {coordinator})", file=sys.stderr, flush=True)
        failed_at = None
        while any(child.poll() is None for child in children):
            if failed_at is None and any(child.poll() not in (None, 0) for child in children):
                failed_at = time.monotonic()
                bad = [i for i, child in enumerate(children) if child.poll() not in (None, 0)]
                print(f"launch: process {bad} exited with {[exit_code(children[i].returncode) for i in bad]}; "
                      f"stopping the others (SIGKILL after {grace:g} s)", file=sys.stderr, flush=True)
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > grace:
                forward(signal.SIGKILL, None)
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    codes = [exit_code(child.returncode) for child in children]
    print(f"launch: exit codes {codes}", file=sys.stderr, flush=True)
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("error: put the program after '--', e.g. python -m vishwam.launch -n 2 -- scripts/train.py ...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m vishwam.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-processes", type=int, required=True, help="processes to start")
    p.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--cpu-devices", type=int, help="simulated CPU devices per process (sets JAX_PLATFORMS=cpu)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL for the others once a process failed")
    args = p.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        p.error("no program after '--'")
    if args.num_processes < 1:
        p.error(f"-n must be >= 1, got {args.num_processes}")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        p.error(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    return launch(command, args.num_processes, port=args.port, cpu_devices=args.cpu_devices, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
