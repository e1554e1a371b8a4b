"""The serving engine and the OpenAI-compatible server, driven by the real `openai` client."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the dev extra's openai client is not installed")
try:  # the openai client's transport: httpx2 in its recent releases, httpx before
    import httpx2 as httpx
except ModuleNotFoundError:
    httpx = pytest.importorskip("httpx", reason="neither httpx2 nor httpx is installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn) is not installed")

from vishwam import ModelConfig, VishwamAI
from vishwam.pipeline import VishwamAIPipeline
from vishwam.serve import (
    ChatTemplate,
    Engine,
    SamplingParams,
    find_chat_template,
    make_app,
)
from vishwam.serve._text import IncrementalText
from vishwam.tokenizer import VishwamAITokenizer

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 64  # prompt buckets 16, 24, 32, 48, 64, and decode calls of 1, 2 and 4 steps
SLOTS = 6  # fewer than the concurrent requests: some wait for a slot
PROMPTS = ["the quick brown", "the lazy dog jumps over the quick brown fox", "héllo wörld ✓",
           "fox", "the quick brown fox jumps over the lazy dog 7 times"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    texts = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
    texts += ["héllo wörld ✓ ünïcode"] * 10
    tokenizer = VishwamAITokenizer.train(texts, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=320)
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.1, max_seq_len=MAX_LEN)
    return VishwamAIPipeline(VishwamAI(config, key=jax.random.key(0)), tokenizer, config, add_bos=True)


@pytest.fixture(scope="module")
def engine(pipeline):
    engine = Engine(pipeline, slots=SLOTS, max_decode_steps=4).start()
    yield engine
    engine.shutdown(drain=False)


@pytest.fixture(scope="module")
def server(engine):
    """The app on uvicorn in a thread of this process, on a free loopback port."""
    app = make_app(engine, model_name="tiny")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_greedy_completions_equal_generate(pipeline, client):
    expected = pipeline(PROMPTS, 12, temperature=0.0)  # vishwam.generate on the padded batch
    for prompt, text in zip(PROMPTS, expected, strict=True):
        response = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        choice = response.choices[0]
        assert choice.text == text
        assert choice.finish_reason in ("stop", "length")
        assert response.usage.completion_tokens >= 1


def _requests():
    """16 requests of mixed prompt and output lengths, greedy and seeded sampling."""
    out = []
    for i in range(16):
        prompt = PROMPTS[i % len(PROMPTS)] + " dog" * (i % 3)
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.9, "seed": i,
                                                           "extra_body": {"top_k": 20 + i}}
        out.append(dict(prompt=prompt, max_tokens=3 + (5 * i) % 12, **sampling))
    return out


def test_concurrent_streams_equal_one_at_a_time(engine, client):
    requests = _requests()
    alone = [client.completions.create(model="tiny", **r).choices[0].text for r in requests]
    compiled = engine.compiled_programs()

    def stream(request):
        pieces, reasons = [], []
        for chunk in client.completions.create(model="tiny", stream=True, **request):
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        assert reasons[-1] in ("stop", "length") and not any(reasons[:-1])
        return "".join(pieces)

    before, moves = dict(engine.calls_by_rows), engine.moves
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(stream, requests))
    assert together == alone
    # The running requests were kept in the lowest slots: as the burst drained, calls ran on
    # the first 4 of the 6 slots (requests moved between slots on the way, texts unchanged).
    assert engine.row_buckets == (4, SLOTS) and engine.calls_by_rows[SLOTS] > before.get(SLOTS, 0)
    assert engine.calls_by_rows[4] > before.get(4, 0) and engine.moves > moves
    assert any(alone) and len(set(alone)) > 4  # the texts differ: the rows did not leak into each other
    # A fixed set: the prefills, a decode call per step count and row bucket, the row move.
    fixed = len(engine.buckets) + len(engine.step_sizes) * len(engine.row_buckets) + 1
    assert engine.compiled_programs() == compiled == fixed


def test_chat_completions_stream_and_not(client, pipeline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    prompt = "system: be brief\nuser: the quick brown\nassistant:"
    assert whole.choices[0].message.content == pipeline([prompt], 8, temperature=0.0)[0]
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]
    unbounded = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                               extra_body={"ignore_eos": True})  # no max_tokens: the context's rest
    assert unbounded.usage.prompt_tokens + unbounded.usage.completion_tokens == MAX_LEN
    assert unbounded.choices[0].finish_reason == "length"


def test_stop_strings_and_ids(client, pipeline, engine):
    prompt_ids = pipeline.tokenizer.encode("the quick", add_bos=True)
    full, ids, reason = engine.complete(prompt_ids, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert reason == "length" and len(ids) == 16 and len(full) > 4
    ask = {"model": "tiny", "prompt": "the quick", "max_tokens": 16, "temperature": 0}
    assert client.completions.create(**ask, extra_body={"ignore_eos": True}).choices[0].text == full
    stop = full[2:4]
    cut = client.completions.create(**ask, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    k = next(k for k in range(1, 16) if ids[k] not in ids[:k])
    before, _, _ = engine.complete(prompt_ids, SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True))
    by_id = client.completions.create(**ask, extra_body={"ignore_eos": True, "stop_token_ids": [ids[k]]})
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].text == before


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    def error_of(response):
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return response.status_code, body

    with httpx.Client(base_url=server, timeout=30) as http:
        status, body = error_of(http.post("/v1/completions", content=b"{not json"))
        assert status == 400 and "JSON" in body["message"]
        status, body = error_of(http.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}))
        assert status == 400 and body["param"] == "max_tokens"
        status, body = error_of(http.post("/v1/completions", json={"prompt": 3}))
        assert status == 400 and body["param"] == "prompt"
        status, body = error_of(http.post("/v1/chat/completions", json={"messages": "hi"}))
        assert status == 400 and body["param"] == "messages"
        status, body = error_of(http.get("/v1/nowhere"))
        assert status == 404
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=MAX_LEN)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="the quick", max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="the quick", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="the quick")
    assert client.completions.create(model="tiny", prompt="the quick", max_tokens=3).choices[0].finish_reason


def test_a_disconnect_mid_stream_frees_its_slot(server, engine, client):
    body = {"model": "tiny", "prompt": "the quick", "max_tokens": MAX_LEN - 8, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.Client(base_url=server, timeout=30) as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert engine.active == 1
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0
    steps = engine.steps
    time.sleep(0.2)
    assert engine.steps == steps  # nothing decodes for the client that left
    assert client.completions.create(model="tiny", prompt="the quick", max_tokens=3).choices[0].finish_reason


def test_api_key(engine):
    from starlette.testclient import TestClient

    with TestClient(make_app(engine, model_name="tiny", api_key="sesame")) as http:
        refused = http.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert http.get("/health").status_code == 200


def test_engine_checks_requests(engine):
    from vishwam.errors import InvalidValueError

    for prompt, params in [([], SamplingParams()), ([1] * 60, SamplingParams(max_tokens=5)),
                           ([1], SamplingParams(max_tokens=0)), ([10_000], SamplingParams()),
                           ([1], SamplingParams(top_p=0.0)), ([1], SamplingParams(stop=("",)))]:
        with pytest.raises(InvalidValueError):
            engine.check(prompt, params)


class _Letters:
    """A tokenizer whose ids are characters (enough to test the text bookkeeping)."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_incremental_text_holds_back_a_possible_stop_string():
    text = IncrementalText(_Letters(), [ord(c) for c in "ab"], stop=["xyz"])
    shown = []
    for c in "hello x":
        text.add(ord(c))
        shown.append(text.pop(final=False))
    assert "".join(shown) == "hello "  # "x" may start "xyz"
    text.add(ord("y"))
    assert text.pop(final=False) == "" and not text.stopped
    text.add(ord("z"))
    assert text.stopped and text.pop(final=True) == ""  # the stop string never shows
    assert text.text == "hello "


def test_chat_template_from_tokenizer_config(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    found, tokens = find_chat_template(tmp_path)
    assert found == template and tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    rendered = ChatTemplate(found, tokens).render([{"role": "user", "content": "hi"}])
    assert rendered == "<s><|user|>hi<|assistant|>"
    assert find_chat_template(tmp_path / "missing") == (None, {})


def test_serve_script_drains_on_sigterm(pipeline, tmp_path):
    """The command on a saved pipeline: a stream in flight when SIGTERM arrives completes,
    then the process exits cleanly."""
    directory = pipeline.save(tmp_path / "pipe")
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), str(directory), "--port",
                                str(port), "--slots", "2", "--max-len", "32", "--decode-steps", "1"], env=env, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        body = {"model": "pipe", "prompt": "the quick", "max_tokens": 24, "stream": True, "ignore_eos": True,
                "temperature": 0}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        events = [json.loads(line[5:]) for line in [first, *rest[:-1]]]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_command_refuses_bad_input(tmp_path, capsys):
    from vishwam.commands.serve import main

    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path), "--slots", "0"]) == 2
    errors = capsys.readouterr().err
    assert "missing" in errors and "--slots 0" in errors and "Traceback" not in errors


def test_sample_rows_applies_each_rows_settings():
    import jax.numpy as jnp
    import numpy as np

    from vishwam.generation import sample_rows

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 50)), jnp.float32)
    rows = 64
    many = jnp.broadcast_to(logits, (rows, 50))
    seeds, steps = jnp.arange(rows, dtype=jnp.uint32), jnp.zeros(rows, jnp.int32)

    def draw(temperature, top_k, top_p):
        return np.asarray(jax.jit(sample_rows)(many, seeds, steps, jnp.full(rows, temperature, jnp.float32),
                                               jnp.full(rows, top_k, jnp.int32), jnp.full(rows, top_p, jnp.float32)))

    best = int(jnp.argmax(logits))
    assert (draw(0.0, 0, 1.0) == best).all()
    assert (draw(1.0, 1, 1.0) == best).all()  # top-k 1
    assert (draw(1.0, 0, 1e-6) == best).all()  # the nucleus of the best token alone
    top3 = set(np.argsort(-np.asarray(logits[0]))[:3].tolist())
    assert set(draw(2.0, 3, 1.0).tolist()) <= top3
    free = draw(2.0, 0, 1.0)
    assert len(set(free.tolist())) > 5  # different seeds, different draws
    assert (free == draw(2.0, 0, 1.0)).all()  # the same seeds, the same draws


def test_commands_load_hf_directories(pipeline, tmp_path):
    """`vishwam-serve` (and `vishwam-generate`) take an HF checkpoint directory too."""
    import warnings

    import numpy as np

    from vishwam.commands.generate import load_pipeline
    from vishwam.hf import save_hf_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the balancing-loss definition, irrelevant here
        save_hf_checkpoint(pipeline.model, pipeline.config, tmp_path)
    pipeline.tokenizer.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    assert loaded.config.hidden_size == pipeline.config.hidden_size
    np.testing.assert_array_equal(np.asarray(loaded.model.embed), np.asarray(pipeline.model.embed))
    assert loaded.tokenizer.encode("the quick", add_bos=False) == pipeline.tokenizer.encode("the quick", add_bos=False)


def test_shutdown_drains_the_requests_in_flight(engine, pipeline):
    """Last in this file: it stops the module's engine. What SIGTERM does after uvicorn has
    drained the connections: every submitted request still completes."""
    from vishwam.errors import InvalidValueError

    sinks = []
    for i in range(SLOTS + 3):  # some running, some still waiting for a slot
        sink = []
        engine.submit(pipeline.tokenizer.encode("the quick", add_bos=True),
                      SamplingParams(max_tokens=20 + i, temperature=0.0, ignore_eos=True), sink.append)
        sinks.append(sink)
    engine.shutdown(drain=True)
    for i, sink in enumerate(sinks):
        assert sink[-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in sink) == 20 + i
    with pytest.raises(InvalidValueError):
        engine.submit([1], SamplingParams(), print)
