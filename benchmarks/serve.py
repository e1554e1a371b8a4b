"""Serving throughput and latency: `vishwam-serve` (continuous batching) against `vishwam.generate`
one request at a time and against transformers' continuous batching, on the same weights.

    pip install -e '.[serve,compare]'      # starlette/uvicorn, torch==2.13.0 (CPU), transformers 5
    python benchmarks/serve.py                       # 32 requests, a 6-layer 8-expert MoE, 16 slots
    python benchmarks/serve.py --dense               # the same with one expert per layer
    python benchmarks/serve.py --shape preset        # the `small` preset's own (tiny) shape
    python benchmarks/serve.py --requests 4 --preset tiny --shape preset --vocab 400 --max-len 64 \
        --max-prompt 16 --min-new 4 --max-new 8 --rate 20 --slots 4 --smoke     # minutes: does it run

The workload: `--requests` requests (default 32) with prompt lengths uniform in
[`--min-prompt`, `--max-prompt`] and output lengths uniform in [`--min-new`, `--max-new`],
greedy, every request generating all its tokens (EOS ignored). Two arrival patterns: all at
once (`burst`), and a Poisson stream of `--rate` requests/s (`poisson`; the same seeded
arrival times for every system). Systems, each in its own process, one after the other:

- `serve`: `scripts/serve.py` on a saved pipeline (a SentencePiece tokenizer trained on
  synthetic text, random weights of `--preset` at `--shape`, see `SHAPES`), driven over loopback HTTP by an asyncio client
  streaming `/v1/completions` (server-sent events); a token's time is its event's arrival
  (an event may carry two tokens when a multi-byte character completes late).
- `generate`: `vishwam.generate` on one request at a time (greedy, the whole loop one
  compiled call), after an untimed pass that compiles every shape; requests are served in
  arrival order, so its Poisson latencies come from the measured service times (a FIFO queue).
  A request's tokens all arrive when its call returns.
- `transformers`: the same weights exported with `vishwam.hf.save_hf_checkpoint`, loaded
  by transformers (fp32), run by its `ContinuousBatchingManager` (`init_continuous_batching`,
  greedy, per-token timestamps), after its warm-up and an untimed request.

Printed per system and pattern: generated tokens/s (all tokens / first arrival to last
token), time to first token p50/p99, time per output token after the first (TPOT, a
request's mean; p50/p99 over requests) and the gaps between a request's token arrivals
(serve streams tokens in groups of up to `--decode-steps`, default 8; 1: token by token). Goals: `serve` >= 3x
`generate` one at a time (burst tokens/s) and >= 1.2x transformers' continuous batching.
Run it on a quiet machine; the load is printed before each system.
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from vishwam.cli import skip_absent_tpu

skip_absent_tpu()  # before JAX starts: no accelerator-plugin start-up noise on a machine without one

ROOT = Path(__file__).resolve().parents[1]


# The default model is larger than the `small` preset's own shape (hidden 256, 4 layers, 4 experts),
# where a step is so cheap that per-row costs (attention over the cache, routing) dominate. What
# batching buys on a 2-core CPU (in-process probes, 2026-12-06, load ~3): XLA:CPU's [16, 512] x
# [512, 1024] products cost 2.6x the [1, 512] ones (11 vs 29 GB/s of weights), so 16 rows give
# ~2.6x the tokens/s of one at a time for `medium --dense`, and ~1.6x for `medium` (MoE: one row
# reads its 2 experts of 8, sixteen rows read all 8).
SHAPES = {"medium": {"hidden_size": 512, "ffn_dim": 1024, "num_layers": 6, "num_experts": 8,
                     "experts_per_token": 2, "num_heads": 8, "num_kv_heads": 2},
          "preset": {}}


# ------------------------------------------------------------------------ workload
def workload(args) -> list[dict]:
    """The requests: prompt ids, output length and arrival time (Poisson), seeded."""
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / args.rate, args.requests)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    return [{"prompt": rng.integers(300, args.vocab, int(rng.integers(args.min_prompt, args.max_prompt + 1))).tolist(),
             "new": int(rng.integers(args.min_new, args.max_new + 1)), "arrival": float(arrivals[i])}
            for i in range(args.requests)]


def synthetic_texts(count: int, seed: int) -> list[str]:
    """Sentences of made-up words: enough distinct pieces for a SentencePiece vocabulary."""
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + ["th", "sh", "ng", "qu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(count)]


def build(args, folder: Path) -> None:
    """Save the pipeline (`folder/pipeline`) and its HF export (`folder/hf`)."""
    import jax

    from vishwam import ModelConfig, VishwamAI
    from vishwam.hf import save_hf_checkpoint
    from vishwam.pipeline import VishwamAIPipeline
    from vishwam.tokenizer import VishwamAITokenizer

    tokenizer = VishwamAITokenizer.train(synthetic_texts(4000, args.seed), folder / "tok.model",
                                         vocab_size=args.vocab)
    shape = dict(SHAPES[args.shape])
    if args.dense:
        shape.update(num_experts=1, experts_per_token=1)
    config = ModelConfig.preset(args.preset, vocab_size=tokenizer.vocab_size, max_seq_len=args.max_len, **shape)
    model = VishwamAI(config, key=jax.random.key(args.seed))
    VishwamAIPipeline(model, tokenizer, config, add_bos=False).save(folder / "pipeline")
    with warnings.catch_warnings():  # the aux-loss definition does not matter for inference
        warnings.simplefilter("ignore")
        save_hf_checkpoint(model, config, folder / "hf")


# --------------------------------------------------------------------- statistics
def summarise(records: list[dict]) -> dict:
    """records: per request `arrival`, `times` (token arrival times, same clock), `tokens`."""
    start = min(r["arrival"] for r in records)
    end = max(r["times"][-1] for r in records)
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["times"][0] - r["arrival"] for r in records]
    # Time per output token after the first, per request (a request's tokens can arrive in groups).
    tpot = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in records
            if r["tokens"] > 1 and len(r["times"]) > 1]
    gaps = [b - a for r in records for a, b in zip(r["times"], r["times"][1:], strict=False)]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")
    return {"tokens": tokens, "seconds": end - start, "tokens_per_s": tokens / (end - start),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "gap_p50": pct(gaps, 50), "gap_p99": pct(gaps, 99)}


# ------------------------------------------------------------------------- systems
async def _client(port: int, requests: list[dict], poisson: bool) -> list[dict]:
    try:
        import httpx2 as httpx
    except ModuleNotFoundError:
        import httpx

    records = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=None,
                                 limits=httpx.Limits(max_connections=len(requests) + 4)) as http:
        start = time.perf_counter()

        async def one(request):
            if poisson:
                await asyncio.sleep(max(0.0, start + request["arrival"] - time.perf_counter()))
            arrival = time.perf_counter()
            body = {"model": "bench", "prompt": request["prompt"], "max_tokens": request["new"], "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            times, tokens = [], 0
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif event["choices"] and event["choices"][0]["text"]:
                        times.append(time.perf_counter())
            records.append({"arrival": arrival, "times": times or [time.perf_counter()], "tokens": tokens})

        await asyncio.gather(*(one(r) for r in requests))
    return records


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of process `pid`, summed by thread name (Linux /proc; {} elsewhere):
    to see what the server spends beside XLA's own threads."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return out


def _timed_client(port: int, requests: list[dict], poisson: bool, server_pid: int) -> dict:
    """The pattern's summary, with the CPU seconds the client and each server thread spent on it."""
    before, client = thread_cpu(server_pid), time.process_time()
    summary = summarise(asyncio.run(_client(port, requests, poisson=poisson)))
    after = thread_cpu(server_pid)
    server = {name: round(after[name] - before.get(name, 0.0), 2) for name in after
              if after[name] - before.get(name, 0.0) >= 0.05}
    return {**summary, "cpu_client_s": round(time.process_time() - client, 2), "cpu_server_s": server}


def run_serve(args, folder: Path, requests: list[dict]) -> dict:
    port = args.port
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), str(folder / "pipeline"),
                               "--port", str(port), "--slots", str(args.slots), "--model-name", "bench",
                               "--decode-steps", str(args.decode_steps)],
                              stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(_wait_health(port, server))
        asyncio.run(_client(port, requests[:2], poisson=False))  # untimed: connections, first dispatches
        return {pattern: _timed_client(port, requests, pattern == "poisson", server.pid)
                for pattern in ("burst", "poisson")}
    finally:
        server.terminate()
        server.wait(60)


async def _wait_health(port: int, server) -> None:
    try:
        import httpx2 as httpx
    except ModuleNotFoundError:
        import httpx
    deadline = time.monotonic() + 600
    async with httpx.AsyncClient() as http:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/health", timeout=1)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up in 10 minutes")
            await asyncio.sleep(0.2)


def run_generate(args, folder: Path, requests: list[dict]) -> dict:
    import jax

    from vishwam.generation import generate
    from vishwam.pipeline import VishwamAIPipeline

    model = VishwamAIPipeline.load(folder / "pipeline").model

    def one(request):
        tokens, _ = generate(model, np.asarray([request["prompt"]], np.int32), request["new"], temperature=0.0)
        jax.block_until_ready(tokens)

    for request in requests:  # compiles every (prompt width, new tokens) shape
        one(request)
    service = []
    for request in requests:
        begin = time.perf_counter()
        one(request)
        service.append(time.perf_counter() - begin)
    results = {}
    for pattern in ("burst", "poisson"):
        clock, records = 0.0, []
        for request, seconds in zip(requests, service, strict=True):
            arrival = 0.0 if pattern == "burst" else request["arrival"]
            clock = max(clock, arrival) + seconds
            records.append({"arrival": arrival, "times": [clock], "tokens": request["new"]})
        results[pattern] = summarise(records)
    return results


def run_transformers(args, folder: Path, requests: list[dict]) -> dict:
    import threading

    import torch
    import transformers

    torch.set_grad_enabled(False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    config = transformers.GenerationConfig(max_new_tokens=args.max_new, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    results = {}
    manager = model.init_continuous_batching(generation_config=config)
    manager.warmup()
    manager.start()
    try:
        warm = manager.add_request(requests[0]["prompt"], max_new_tokens=4, record_timestamps=True)
        manager.get_result(warm, timeout=600)
        for pattern in ("burst", "poisson"):
            start, ids, arrivals = time.perf_counter(), [], {}

            def feed(pattern=pattern, start=start, ids=ids, arrivals=arrivals):
                for i, request in enumerate(requests):
                    if pattern == "poisson":
                        time.sleep(max(0.0, start + request["arrival"] - time.perf_counter()))
                    ident = f"{pattern}-{i}"
                    arrivals[ident] = time.perf_counter()
                    ids.append(manager.add_request(request["prompt"], request_id=ident,
                                                   max_new_tokens=request["new"], record_timestamps=True))

            feeder = threading.Thread(target=feed)
            feeder.start()
            records, done = [], 0
            while done < len(requests):
                result = manager.get_result(timeout=600)
                if result is None or not result.is_finished():
                    continue
                done += 1
                times = result.timestamps or [time.perf_counter()]
                records.append({"arrival": arrivals[result.request_id], "times": times,
                                "tokens": len(result.generated_tokens)})
            feeder.join()
            results[pattern] = summarise(records)
    finally:
        manager.stop(block=True, timeout=30)
    return results


SYSTEMS = {"serve": run_serve, "generate": run_generate, "transformers": run_transformers}


# ---------------------------------------------------------------------------- main
def background_load() -> float:
    """Runnable tasks besides this one, from /proc/loadavg (averaged over a second)."""
    if not os.path.exists("/proc/loadavg"):
        return float("nan")
    total = 0.0
    for _ in range(20):
        with open("/proc/loadavg") as f:
            total += max(int(f.read().split()[3].split("/")[0]) - 1, 0)
        time.sleep(0.05)
    return total / 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=2048, help="tokenizer and model vocabulary")
    parser.add_argument("--shape", default="medium", choices=sorted(SHAPES),
                        help="model shape over the preset (default medium: see SHAPES; preset: the preset's own)")
    parser.add_argument("--dense", action="store_true", help="one expert per layer (a dense Llama-like model)")
    parser.add_argument("--max-len", type=int, default=256, help="the model's max_seq_len (the cache per slot)")
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=96)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=8, help="the server's --decode-steps")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default="serve,generate,transformers")
    parser.add_argument("--smoke", action="store_true", help="tiny run: only checks that everything works")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_prompt + args.max_new > args.max_len:
        parser.error(f"--max-prompt + --max-new = {args.max_prompt + args.max_new} exceeds --max-len {args.max_len}")
    requests = workload(args)
    if args.child:
        print(json.dumps(SYSTEMS[args.child](args, Path(args.folder), requests)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(args, folder)
        results = {}
        for system in args.systems.split(","):
            print(f"{system}: background load {background_load():.2f} runnable tasks", file=sys.stderr, flush=True)
            child = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                                    "--child", system, "--folder", str(folder)], capture_output=True, text=True, check=False)
            if child.returncode != 0:
                print(f"{system} failed:\n{child.stderr[-3000:]}", file=sys.stderr)
                continue
            results[system] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\n{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, outputs "
          f"{args.min_new}-{args.max_new} tokens, preset {args.preset} shape {args.shape}{' dense' if args.dense else ''}, "
          f"{args.slots} slots, Poisson {args.rate}/s")
    print("TTFT in s; TPOT: a request's mean time per token after its first (p50/p99 over requests); "
          "gap: between arrivals of a request's token groups")
    print(f"{'system':<14}{'pattern':<9}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}"
          f"{'gap p50':>10}{'gap p99':>10}")
    ms = lambda x: f"{x * 1e3:>8.1f}ms"
    for system, by_pattern in results.items():
        for pattern, r in by_pattern.items():
            print(f"{system:<14}{pattern:<9}{r['tokens_per_s']:>9.1f}{r['ttft_p50']:>10.3f}{r['ttft_p99']:>10.3f}"
                  f"{ms(r['tpot_p50'])}{ms(r['tpot_p99'])}{ms(r['gap_p50'])}{ms(r['gap_p99'])}")
    for pattern, r in results.get("serve", {}).items():
        if "cpu_client_s" in r:
            busiest = sorted(r["cpu_server_s"].items(), key=lambda item: -item[1])
            threads = ", ".join(f"{name} {sec:.2f}" for name, sec in busiest)
            print(f"serve {pattern}: CPU seconds over its {r['seconds']:.2f} s: client {r['cpu_client_s']:.2f}; "
                  f"server threads: {threads}")
    if "serve" in results:
        for other, goal in (("generate", 3.0), ("transformers", 1.2)):
            if other in results:
                ratio = results["serve"]["burst"]["tokens_per_s"] / results[other]["burst"]["tokens_per_s"]
                print(f"serve / {other} (burst tokens/s): {ratio:.2f}x (goal >= {goal}x)")
    if args.smoke:
        print("smoke run: the numbers above mean nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
