"""The OpenAI-compatible HTTP API over an `Engine`, as a Starlette (ASGI) app.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streamed as server-sent
events with `"stream": true`), `GET /v1/models`, `GET /health`. Handlers run on the event
loop and talk to the engine thread through queues (`Engine.submit` with a sink that hands
each output to the loop); a client that disconnects cancels its request, which frees its
slot at the engine's next turn. Errors have OpenAI's body, `{"error": {"message", "type",
"param", "code"}}`, with a 4xx status for bad requests.

Parameters besides OpenAI's: `top_k`, `stop_token_ids`, `ignore_eos` (as vLLM names them).
Not supported (400): `n > 1`, `best_of`, `echo`, `logprobs`, `suffix`, tools.
"""

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from ..errors import InvalidValueError
from ._chat import ChatTemplate
from ._engine import Engine, Output, SamplingParams


class BadRequest(Exception):
    """A request the API refuses: its status, message and the offending parameter."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ------------------------------------------------------------------ request parsing
def _field(body: dict, name: str, kinds, default=None, *, check=None, expect: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"'{name}' must be {expect}, got {value!r}.", param=name)
    if not isinstance(value, kinds) or (check is not None and not check(value)):
        raise BadRequest(f"'{name}' must be {expect}, got {json.dumps(value)[:80]}.", param=name)
    return value


def _sampling(body: dict, max_tokens_names: tuple[str, ...], default_max_tokens: int) -> SamplingParams:
    for name in ("suffix", "tools", "functions"):
        if body.get(name) is not None:
            raise BadRequest(f"'{name}' is not supported by this server.", param=name)
    if body.get("echo"):
        raise BadRequest("'echo' is not supported by this server.", param="echo")
    if body.get("logprobs") not in (None, False, 0):
        raise BadRequest("'logprobs' is not supported by this server.", param="logprobs")
    for name in ("n", "best_of"):
        if _field(body, name, int, 1, check=lambda v: v >= 1, expect="an integer >= 1") != 1:
            raise BadRequest(f"'{name}' must be 1: one choice per prompt on this server.", param=name)
    top_k = _field(body, "top_k", int, None, check=lambda v: v == -1 or v >= 1, expect="an integer >= 1 (-1: off)")
    max_tokens = default_max_tokens
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _field(body, name, int, check=lambda v: v >= 1, expect="an integer >= 1")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("'stop' must be a non-empty string or a list of them.", param="stop")
    number = (int, float)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", number, 1.0, check=lambda v: 0 <= v <= 2,
                                 expect="a number in [0, 2]")),
        top_p=float(_field(body, "top_p", number, 1.0, check=lambda v: 0 < v <= 1, expect="a number in (0, 1]")),
        top_k=None if top_k in (None, -1) else top_k,
        stop=tuple(stop or ()),
        stop_token_ids=tuple(_field(body, "stop_token_ids", list, [], check=lambda v: all(
            isinstance(i, int) and not isinstance(i, bool) for i in v), expect="a list of token ids")),
        seed=_field(body, "seed", int, None, expect="an integer"),
        ignore_eos=bool(_field(body, "ignore_eos", bool, False, expect="true or false")),
    )


class Api:
    """The routes' logic, over one engine.

    Arguments:
        engine: a started `Engine`.
        model_name: the id `/v1/models` lists and responses carry.
        api_key: when set, every `/v1` request needs `Authorization: Bearer <api_key>`.
        chat_template: renders chat messages (default: the plain template).
    """

    def __init__(self, engine: Engine, *, model_name: str, api_key: str | None = None,
                 chat_template: ChatTemplate | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.chat_template = chat_template or ChatTemplate()
        self.created = int(time.time())
        pipeline = engine.pipeline
        self.tokenizer, self.add_bos = pipeline.tokenizer, pipeline.add_bos

    # --------------------------------------------------------------------- checks
    def authorise(self, headers) -> None:
        if self.api_key is None:
            return
        given = headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise BadRequest("Incorrect API key provided; send 'Authorization: Bearer <key>'.", status=401,
                             code="invalid_api_key")

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                             param="model", status=404, code="model_not_found")

    def _encode(self, text: str, add_bos: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_bos=add_bos))

    def _checked(self, prompt_ids: list[int], params: SamplingParams, param: str) -> list[int]:
        try:
            self.engine.check(prompt_ids, params)
        except InvalidValueError as error:
            too_long = "exceeds the context" in str(error)
            raise BadRequest(str(error), param=param, code="context_length_exceeded" if too_long else None) from None
        return prompt_ids

    # ------------------------------------------------------------------- requests
    def completion_prompts(self, body: dict) -> tuple[list[list[int]], SamplingParams]:
        """The token ids of each prompt of a `/v1/completions` body, and its sampling."""
        self._check_model(body)
        params = _sampling(body, ("max_tokens",), 16)  # OpenAI's default for completions
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [self._encode(prompt, self.add_bos)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self._encode(p, self.add_bos) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            prompts = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise BadRequest("'prompt' must be a string, a list of strings, or token ids (a list of integers, "
                             "or a list of such lists).", param="prompt")
        return [self._checked(p, params, "prompt") for p in prompts], params

    def chat_prompt(self, body: dict) -> tuple[list[int], SamplingParams]:
        """The token ids of a `/v1/chat/completions` body's rendered messages, and its sampling."""
        self._check_model(body)
        # Chat has no default limit in OpenAI's API: the rest of the context (set below).
        params = _sampling(body, ("max_tokens", "max_completion_tokens"), 0)
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
            raise BadRequest("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects.",
                             param="messages")
        plain = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):  # content parts: only text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise BadRequest("only text content parts are supported.", param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise BadRequest("each message's 'content' must be a string.", param="messages")
            plain.append({**message, "content": content})
        try:
            text = self.chat_template.render(plain)
        except InvalidValueError as error:
            raise BadRequest(str(error), param="messages") from None
        bos = self.chat_template.special_tokens.get("bos_token")
        add_bos = self.add_bos and not (bos and text.startswith(bos))
        ids = self._encode(text, add_bos)
        if params.max_tokens == 0:
            params = dataclasses.replace(params, max_tokens=max(self.engine.max_len - len(ids), 1))
        return self._checked(ids, params, "messages"), params

    async def outputs(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        """The request's outputs as the engine produces them; leaving early cancels it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def sink(output: Output) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, output)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                request.cancel()

        try:
            request = self.engine.submit(prompt_ids, params, sink)
        except InvalidValueError as error:
            raise BadRequest(str(error), status=503, kind="server_error") from None
        try:
            while True:
                output = await outputs.get()
                while output.finish_reason is None and not outputs.empty():  # the loop fell behind: merge
                    later = outputs.get_nowait()
                    output = Output(output.text + later.text, output.token_ids + later.token_ids,
                                    later.finish_reason, later.prompt_tokens, later.completion_tokens, later.error)
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            request.cancel()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "vishwam"}]}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
