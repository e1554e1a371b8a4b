"""Data pipeline throughput vs. what a `small`-preset train step consumes.

Claim: the pipeline delivers tokens at least 20x faster than a train
step of `ModelConfig.preset("small")` consumes them, so it is never the bottleneck.

Measured in one process:
- cold: tokenise the corpus (writing the token cache), pack, and iterate one epoch;
- cached: rebuild from the cache (no tokenising) and iterate one epoch;
- steady: batches/s of an already-built iterator with its prefetch thread;
- train: one jitted forward + backward + AdamW step (`eqx.filter_jit`) on batches of
  the same shape, tokens/s = batch * seq_len / step time.

The corpus is the built-in one, repeated `--copies` times with a distinct first line
per copy (so the tokenizer's encode cache cannot answer from memory).

    python benchmarks/data.py [--copies 8 --batch-size 8 --seq-len 256 --steps 5]

Streaming preparation, with `--prepare-mb SIZE [SIZE ...]`: for each size, a
generated JSONL corpus of about SIZE MB of text (and the same rows as parquet) is
prepared by `scripts/prepare_data.py`-equivalent code (`vishwam.data.prepare_corpus`) in
a fresh subprocess each, reporting its peak RSS and its encoding workers' (goal <= 1.5 GB whatever the size) and
tokens/s, against single-threaded raw SentencePiece (`encode(list, num_threads=1)` over
the same JSONL, also in a subprocess) in the same run; then the time from a new process's
`load_prepared` to its first training batch (imports and tokenizer loading excluded
from every timing: importing vishwam imports jax).

    python benchmarks/data.py --prepare-mb 200 600 [--vocab-size 4096 --chunk-mb 1]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def pipeline_timings(tokenizer, texts, args, cache_dir):
    from vishwam import data

    def one_epoch():
        start = time.perf_counter()
        train, val = data.make_datasets(tokenizer, data.Texts(texts), seq_len=args.seq_len,
                                        batch_size=args.batch_size, cache_dir=cache_dir,
                                        process_index=0, process_count=1, prefetch=args.prefetch)
        with train:
            if val is not None:
                val.close()
            steps = -(-train.rows.num_rows // train.batch_size)
            for _ in range(steps):
                next(train)
            return train.rows, steps * train.tokens_per_batch, time.perf_counter() - start

    rows, tokens, cold = one_epoch()
    assert not rows.corpus.from_cache
    rows, tokens, cached = one_epoch()
    assert rows.corpus.from_cache
    with data.DataIterator(rows, batch_size=args.batch_size, process_index=0, process_count=1,
                           prefetch=args.prefetch) as it:
        next(it)
        n = max(50, 4 * -(-rows.num_rows // args.batch_size))
        start = time.perf_counter()
        for _ in range(n):
            next(it)
        steady = time.perf_counter() - start
    return {"tokens_per_epoch": tokens, "corpus_tokens": rows.corpus.num_tokens,
            "cold_tok_s": tokens / cold, "cold_s": cold, "cached_tok_s": tokens / cached,
            "cached_s": cached, "steady_tok_s": n * args.batch_size * args.seq_len / steady}


def train_step_timing(batch, vocab_size, args):
    try:
        from vishwam.model import VishwamAI
    except ImportError as e:
        return None, f"vishwam.model.VishwamAI unavailable ({e})"
    try:
        return _train_step_timing(VishwamAI, batch, vocab_size, args), None
    except Exception as e:  # noqa: BLE001 -- report the pipeline numbers, then why this part is missing
        return None, f"the small-preset train step failed: {type(e).__name__}: {e}"


def _train_step_timing(VishwamAI, batch, vocab_size, args):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    from vishwam.config import ModelConfig

    config = ModelConfig.preset("small", vocab_size=vocab_size)
    model = VishwamAI(config, key=jax.random.key(0))
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit(donate="all-except-first")
    def step(batch, model, opt_state):
        def loss_fn(model):
            logits, aux = model(batch["tokens"], segment_ids=batch["segment_ids"],
                                positions=batch["positions"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            mask = batch["loss_mask"]
            return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0) + \
                config.router_aux_loss_coef * aux["load_balancing_loss"]

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    start = time.perf_counter()
    model, opt_state, loss = step(batch, model, opt_state)
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model, opt_state, loss = step(batch, model, opt_state)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {"step_s": step_s, "compile_s": compile_s, "loss": float(loss), "device": str(jax.devices()[0]),
            "train_tok_s": args.batch_size * args.seq_len / step_s}


def write_corpus(path: Path, megabytes: float, seed: int) -> int:
    """JSONL of distinct documents (default-corpus paragraphs, shuffled, each with a unique first line)
    until about `megabytes` MB of text; returns the number of documents."""
    from vishwam.data import default_corpus

    paragraphs = [p for doc in default_corpus() for p in doc.split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    size, count = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            picks = rng.integers(0, len(paragraphs), size=int(rng.integers(2, 12)))
            text = f"document {count} ({seed})\n\n" + "\n\n".join(paragraphs[i] for i in picks)
            f.write(json.dumps({"text": text}) + "\n")
            size, count = size + len(text), count + 1
    return count


def _child(argv: list[str]) -> None:
    """Runs one measurement in this fresh process and prints it as a JSON line."""
    kind, corpus, tokenizer_dir, out = argv[:4]
    # Timed from after the imports and the tokenizer load (importing vishwam imports jax: seconds).
    if kind == "prepare":
        from vishwam.data import prepare_corpus
        from vishwam.tokenizer import VishwamAITokenizer

        tokenizer = VishwamAITokenizer.from_pretrained(tokenizer_dir)
        watcher = _WorkerMemory()
        start = time.perf_counter()
        result = prepare_corpus(corpus, tokenizer, out, chunk_chars=int(float(argv[4]) * 2**20),
                                workers=None if argv[5] == "auto" else int(argv[5]))
        tokens = result.num_tokens
        workers_rss = watcher.stop()
    elif kind == "raw":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer_dir) / "tokenizer.model"))
        start = time.perf_counter()
        tokens, batch = 0, []
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == 256:
                    tokens += sum(map(len, sp.encode(batch, num_threads=1))) + len(batch)
                    batch = []
        tokens += sum(map(len, sp.encode(batch, num_threads=1))) + len(batch)
    else:  # first batch from a prepared directory
        from vishwam.data import load_prepared, make_datasets
        from vishwam.tokenizer import VishwamAITokenizer

        tokenizer = VishwamAITokenizer.from_pretrained(Path(out) / "tokenizer")
        start = time.perf_counter()
        train, val = make_datasets(tokenizer, load_prepared(out, tokenizer), seq_len=256, batch_size=8,
                                   process_index=0, process_count=1)
        next(train)
        tokens = train.rows.num_tokens
    seconds = time.perf_counter() - start
    # VmHWM, not getrusage: Linux carries the parent's peak into ru_maxrss across fork + exec.
    with open("/proc/self/status") as f:
        peak_rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "tokens": tokens, "peak_rss": peak_rss,
                      "workers_rss": workers_rss if kind == "prepare" else 0}))


class _WorkerMemory:
    """Peak resident memory of this process's child processes (the encoding workers): each
    child's VmHWM as last read (every 20 ms while it lives), summed over the children. The
    last reading, not the largest: read between fork and exec, a child shows the parent's."""

    def __init__(self):
        import threading

        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        children = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
        while not self._stop.wait(0.02):
            try:
                pids = open(children).read().split()
            except OSError:
                return
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/status") as f:
                        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
                except (OSError, StopIteration):
                    continue
                self.peaks[int(pid)] = hwm

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return sum(self.peaks.values())


def _measure(*argv: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {argv[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_benchmark(args) -> None:
    import duckdb

    from vishwam.data import default_corpus
    from vishwam.tokenizer import VishwamAITokenizer

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    isa = [f for f in ("avx2", "avx512f") if f" {f} " in flags]
    print(f"machine: {model}, {os.cpu_count()} cores, ISA {isa}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        tokenizer = VishwamAITokenizer.train(default_corpus(), tmp / "tok" / "tokenizer.model",
                                             vocab_size=args.vocab_size, hard_vocab_limit=False)
        tokenizer.save_pretrained(tmp / "tokenizer")
        rows = []
        for size in args.prepare_mb:
            jsonl, parquet = tmp / f"c{size}.jsonl", tmp / f"c{size}.parquet"
            docs = write_corpus(jsonl, size, seed=int(size))
            with duckdb.connect() as con:
                con.execute(f"COPY (SELECT text FROM read_json_auto('{jsonl}')) TO '{parquet}' (FORMAT parquet)")
            print(f"corpus {size} MB: {docs:,} documents; jsonl {jsonl.stat().st_size / 1e6:.0f} MB, "
                  f"parquet {parquet.stat().st_size / 1e6:.0f} MB", flush=True)
            if size == args.prepare_mb[0]:
                raw = _measure("raw", str(jsonl), str(tmp / "tokenizer"), "-")
                raw_rate = raw["tokens"] / raw["seconds"]
                print(f"  raw SentencePiece, 1 thread, jsonl: {raw_rate:,.0f} tok/s ({raw['seconds']:.1f} s, "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)
            for kind, path in (("jsonl", jsonl), ("parquet", parquet)):
                out = tmp / f"prepared-{size}-{kind}"
                m = _measure("prepare", str(path), str(tmp / "tokenizer"), str(out), str(args.chunk_mb), args.workers)
                first = _measure("first", "-", "-", str(out))
                rate = m["tokens"] / m["seconds"]
                rows.append((size, kind, m["tokens"], m["seconds"], rate, rate / raw_rate, m["peak_rss"],
                             m["workers_rss"], first["seconds"], os.getloadavg()[0]))
                print(f"  prepare {kind:>7}: {m['tokens']:,} tokens in {m['seconds']:.1f} s = {rate:,.0f} tok/s "
                      f"({rate / raw_rate:.2f}x raw 1-thread SP), peak RSS {m['peak_rss'] / 2**20:,.0f} MiB "
                      f"+ workers {m['workers_rss'] / 2**20:,.0f} MiB; "
                      f"first batch {first['seconds']:.2f} s (peak RSS {first['peak_rss'] / 2**20:,.0f} MiB); "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                import shutil

                shutil.rmtree(out)
            jsonl.unlink()
            parquet.unlink()
    print("\n| corpus | format | tokens | prepare (s) | tok/s | vs raw 1-thread SP | peak RSS | + workers | "
          "first batch | load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, kind, tokens, seconds, rate, ratio, rss, workers_rss, first, load in rows:
        print(f"| {size} MB | {kind} | {tokens:,} | {seconds:.1f} | {rate:,.0f} | {ratio:.2f}x | "
              f"{rss / 2**20:,.0f} MiB | {workers_rss / 2**20:,.0f} MiB | {first:.2f} s | {load:.1f} |")


def main():
    if sys.argv[1:2] == ["--child"]:
        return _child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--prepare-mb", type=float, nargs="+", metavar="SIZE",
                        help="streaming-preparation benchmark at these corpus sizes (MB of text) instead")
    parser.add_argument("--chunk-mb", type=float, default=1.0, help="preparation chunk (MB of text)")
    parser.add_argument("--workers", default="auto",
                        help="encoding processes for the preparation (default auto: one per core)")
    parser.add_argument("--workdir", help="where the generated corpora go (default: the system temp dir)")
    args = parser.parse_args()
    if args.prepare_mb:
        return prepare_benchmark(args)

    from vishwam.data import default_corpus
    from vishwam.tokenizer import VishwamAITokenizer

    docs = default_corpus()
    texts = [f"copy {i}: {doc}" for i in range(args.copies) for doc in docs]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tokenizer = VishwamAITokenizer.train(docs, Path(tmp) / "bench.model", vocab_size=args.vocab_size,
                                             hard_vocab_limit=False)
        print(f"tokenizer: vocab {tokenizer.vocab_size}, trained in {time.perf_counter() - start:.1f} s")
        print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters")
        pipe = pipeline_timings(tokenizer, texts, args, Path(tmp) / "cache")

    print(f"machine: {platform.machine()} {platform.node()}, batch {args.batch_size} x seq {args.seq_len}, "
          f"prefetch {args.prefetch}")
    print(f"corpus tokens {pipe['corpus_tokens']:,}; one epoch = {pipe['tokens_per_epoch']:,} input tokens")
    print(f"pipeline cold   (tokenise + cache + pack + 1 epoch): {pipe['cold_tok_s']:>12,.0f} tok/s "
          f"({pipe['cold_s']:.2f} s)")
    print(f"pipeline cached (load cache + pack + 1 epoch):       {pipe['cached_tok_s']:>12,.0f} tok/s "
          f"({pipe['cached_s']:.2f} s)")
    print(f"pipeline steady (prefetching iterator):              {pipe['steady_tok_s']:>12,.0f} tok/s",
          flush=True)

    from vishwam import data

    rows = data.PackedRows(data.tokenize_source(data.Texts(texts[:200]), tokenizer), seq_len=args.seq_len)
    batch = rows.batch(np.arange(args.batch_size) % rows.num_rows)
    train, missing = train_step_timing(batch, tokenizer.vocab_size, args)
    if train is None:
        print(f"train step: NOT MEASURED - {missing}")
        raise SystemExit(1)
    print(f"train step small preset on {train['device']}: {train['step_s'] * 1e3:.1f} ms/step "
          f"(compile {train['compile_s']:.1f} s, loss {train['loss']:.3f}) = {train['train_tok_s']:,.0f} tok/s")
    for name in ("cold", "cached", "steady"):
        ratio = pipe[f"{name}_tok_s"] / train["train_tok_s"]
        print(f"ratio {name:>6} pipeline / train step: {ratio:8.1f}x  (goal >= 20x: "
              f"{'met' if ratio >= 20 else 'NOT met'})")


if __name__ == "__main__":
    main()
