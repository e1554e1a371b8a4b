"""Encoding a stream of document chunks in worker processes, one core each, order kept.

SentencePiece's own threads scale a batch call to about 1.75x on two cores, and the
Python work around it (ids to arrays, document hashes) runs on one core between calls.
A worker process per core does all of a chunk's work (encode with one thread, EOS
after every document, arrays, hashes) while the parent only reads the source and
writes the results, so every core encodes all the time.

Workers are ``python -c`` processes that load this module without the rest of
vishwam (no JAX: a worker starts in ~0.2 s) and rebuild the tokenizer from a JSON
spec; the parent checks the rebuilt tokenizer's fingerprint. Parent and worker speak
length-prefixed frames of raw bytes over the worker's stdin/stdout (no pickle):

- spec:     u64 length, UTF-8 JSON (`VishwamAITokenizer._worker_spec()` plus dtype/add_bos);
- ready:    u64 length, UTF-8 fingerprint;
- request:  u64 documents n, u64 bytes b; int64[n] byte lengths; b bytes of UTF-8 text;
- response: u64 n, u64 tokens t; int64[n] document lengths (EOS included);
  uint64[n] document hashes; t token ids in the agreed dtype.

A worker exits when its stdin closes (the parent finished, failed or died); it ignores
SIGINT, which the parent handles for the whole group.
"""

import hashlib
import itertools
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import InvalidValueError

_U64 = struct.Struct("<Q")
_PAIR = struct.Struct("<QQ")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_spec(tokenizer: object) -> dict[str, Any] | None:
    """What a worker needs to rebuild `tokenizer` exactly, or None when it cannot be."""
    spec = getattr(tokenizer, "_worker_spec", None)
    return spec() if callable(spec) else None


def doc_hash(text: str) -> int:
    """A document's split key: 8 bytes of BLAKE2b of its UTF-8 text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def encode_chunk(tokenizer: Any, documents: list[str], add_bos: bool, eos_id: int,
                 dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's `(tokens, lengths, hashes)`: every document's ids then EOS, back to back,
    each document's length (EOS included) and its `doc_hash`.

    Raises:
        ValueError: an id outside `[0, tokenizer.vocab_size)` (checked before the cast to `dtype`).
    """
    ids = tokenizer.batch_encode(documents, add_bos=add_bos, add_eos=False)
    lengths = np.fromiter((len(row) + 1 for row in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(row + [eos_id] for row in ids), dtype=np.int64,
                       count=int(lengths.sum()))
    vocab_size = int(tokenizer.vocab_size)
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise InvalidValueError(f"the tokenizer produced ids in [{int(flat.min())}, {int(flat.max())}], outside its "
                                f"vocab_size={vocab_size}; the tokenizer model and its vocab_size disagree.")
    hashes = np.fromiter((doc_hash(d) for d in documents), dtype=np.uint64, count=len(ids))
    return flat.astype(dtype), lengths, hashes


class EncodePool:
    """`workers` processes encoding chunks for `imap`; use as a context manager.

    Raises:
        RuntimeError: a worker did not start, rebuilt another tokenizer, or died.
    """

    def __init__(self, tokenizer: Any, workers: int, *, add_bos: bool, dtype: np.dtype):
        spec = worker_spec(tokenizer)
        if spec is None:
            raise InvalidValueError(f"{type(tokenizer).__name__} cannot be rebuilt in a worker process (no _worker_spec).")
        self.dtype = np.dtype(dtype)
        spec = {**spec, "add_bos": bool(add_bos), "dtype": self.dtype.name}
        package_parent = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent,
                                                                           os.environ.get("PYTHONPATH")]))}
        self._procs: list[subprocess.Popen] = []
        self._logs: list[BinaryIO] = []
        self._outboxes: list[queue.Queue] = []
        self._writers: list[threading.Thread] = []
        try:
            for _ in range(workers):
                log = tempfile.TemporaryFile()
                self._logs.append(log)
                self._procs.append(subprocess.Popen([sys.executable, "-c", _BOOT, package_parent],
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                                    env=env))
            payload = json.dumps(spec).encode()
            for proc in self._procs:
                proc.stdin.write(_U64.pack(len(payload)) + payload)
                proc.stdin.flush()
            for i, proc in enumerate(self._procs):
                got = self._read(i, _U64.size)
                fingerprint = self._read(i, _U64.unpack(got)[0]).decode()
                if fingerprint != str(tokenizer.fingerprint):
                    raise RuntimeError(f"encoding worker {i} rebuilt another tokenizer (fingerprint {fingerprint}, "
                                       f"expected {tokenizer.fingerprint}); was the model file changed?")
            # A thread per worker writes its requests, so the next chunk can wait in the pipe
            # while the worker writes a result back (no deadlock on full pipes).
            for proc in self._procs:
                outbox: queue.Queue = queue.Queue()
                writer = threading.Thread(target=_write_frames, args=(outbox, proc.stdin), daemon=True,
                                          name="vishwam-encode-writer")
                writer.start()
                self._outboxes.append(outbox)
                self._writers.append(writer)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "EncodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers. Their results are no longer read, so a worker still writing one
        gets a broken pipe and exits; the rest exit at the end of their stdin."""
        for outbox in self._outboxes:
            outbox.put(None)
        for proc in self._procs:
            proc.stdout.close()
        for writer in self._writers:
            writer.join()
        for proc in self._procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        self._procs, self._logs, self._outboxes, self._writers = [], [], [], []

    def imap(self, chunks: Iterable[list[str]], depth: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`encode_chunk` of each chunk, in order. Chunks go to the workers in turn, `depth`
        in flight per worker (one encoding, the next waiting in its pipe); a worker whose
        result was read gets its next chunk before that result is handed to the caller."""
        chunks = iter(chunks)
        inflight: deque[int] = deque()
        for _ in range(depth):
            for i in range(len(self._procs)):
                chunk = next(chunks, None)
                if chunk is None:
                    break
                self._send(i, chunk)
                inflight.append(i)
        while inflight:
            i = inflight.popleft()
            result = self._receive(i)
            chunk = next(chunks, None)
            if chunk is not None:
                self._send(i, chunk)
                inflight.append(i)
            yield result

    def _send(self, i: int, documents: list[str]) -> None:
        raw = [d.encode("utf-8", "surrogatepass") for d in documents]
        lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        body = b"".join(raw)
        # A worker that died is reported by the read of its next result.
        self._outboxes[i].put((_PAIR.pack(len(raw), len(body)), lengths.tobytes(), body))

    def _receive(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, t = _PAIR.unpack(self._read(i, _PAIR.size))
        lengths = np.frombuffer(self._read(i, 8 * n), dtype=np.int64)
        hashes = np.frombuffer(self._read(i, 8 * n), dtype=np.uint64)
        tokens = np.frombuffer(self._read(i, t * self.dtype.itemsize), dtype=self.dtype)
        return tokens, lengths, hashes

    def _read(self, i: int, size: int) -> bytes:
        data = self._procs[i].stdout.read(size)
        if len(data) != size:
            raise self._died(i)
        return data

    def _died(self, i: int) -> RuntimeError:
        proc, log = self._procs[i], self._logs[i]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        log.seek(0)
        lines = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
        why = lines[-1] if lines else "no message"
        return RuntimeError(f"encoding worker {i} failed (exit code {code}): {why}")


def _write_frames(outbox: queue.Queue, stream: BinaryIO) -> None:
    """Writes the frames put in `outbox` to `stream` until None; stops quietly on a closed pipe."""
    while (frame := outbox.get()) is not None:
        try:
            for part in frame:
                stream.write(part)
            stream.flush()
        except OSError:  # the worker died: its reader reports it
            while outbox.get() is not None:
                pass
            return


# The worker's entry: this module loaded under a bare `vishwam` package (its __init__
# imports JAX, which a worker never needs).
_BOOT = """
import sys, types
package = types.ModuleType("vishwam")
package.__path__ = [sys.argv[1] + "/vishwam"]
sys.modules["vishwam"] = package
from vishwam.data.encode_pool import _worker_main
_worker_main()
"""


def _worker_main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the protocol stream

    def read(size: int) -> bytes | None:
        data = stdin.read(size)
        if len(data) != size:
            if data:
                raise SystemExit(f"truncated frame ({len(data)} of {size} bytes)")
            return None
        return data

    header = read(_U64.size)
    if header is None:
        return
    spec = json.loads(read(_U64.unpack(header)[0]))
    tokenizer = _rebuild(spec)
    add_bos, eos_id, dtype = spec["add_bos"], int(tokenizer.eos_id), np.dtype(spec["dtype"])
    fingerprint = str(tokenizer.fingerprint).encode()
    stdout.write(_U64.pack(len(fingerprint)) + fingerprint)
    stdout.flush()
    while (header := read(_PAIR.size)) is not None:
        n, size = _PAIR.unpack(header)
        lengths = np.frombuffer(read(8 * n) or b"", dtype=np.int64)
        body = read(size) if size else b""
        bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        documents = [body[a:b].decode("utf-8", "surrogatepass") for a, b in zip(bounds[:-1], bounds[1:])]
        tokens, counts, hashes = encode_chunk(tokenizer, documents, add_bos, eos_id, dtype)
        stdout.write(_PAIR.pack(n, len(tokens)))
        stdout.write(counts.tobytes())
        stdout.write(hashes.tobytes())
        stdout.write(tokens.tobytes())
        stdout.flush()


def _rebuild(spec: dict[str, Any]) -> Any:
    if spec.get("class") != "VishwamAITokenizer":
        raise SystemExit(f"cannot rebuild a {spec.get('class')!r} tokenizer")
    from vishwam.tokenizer import VishwamAITokenizer

    return VishwamAITokenizer(**spec["arguments"], cache_size=0, num_threads=1)
