"""The Starlette app and the uvicorn server around an `Api` (see `vishwam.serve._server`).

Starlette + uvicorn: the ASGI pair most Python model servers are built on (vLLM and
FastAPI apps run on them). Starlette streams an async generator as a response and stops
it when the client goes away; uvicorn, on SIGTERM or SIGINT, stops accepting connections
and waits for the open ones (streams included) to finish before the app shuts down.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from ..pipeline import VishwamAIPipeline
from ._chat import ChatTemplate
from ._engine import Engine
from ._server import Api, BadRequest, _error_body, new_id


def make_app(engine: Engine, *, model_name: str, api_key: str | None = None,
             chat_template: ChatTemplate | None = None, on_shutdown: Callable[[], None] | None = None):
    """The Starlette application of the OpenAI API over a started `engine`.

    Arguments:
        engine: serves the requests.
        model_name: the model id `/v1/models` lists and responses carry.
        api_key: when set, `/v1` requests need `Authorization: Bearer <api_key>`.
        chat_template: renders chat messages (default: a plain "role: content" template).
        on_shutdown: runs once uvicorn has drained the open connections.
    """
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    api = Api(engine, model_name=model_name, api_key=api_key, chat_template=chat_template)

    def error(status: int, message: str, kind: str, param=None, code=None) -> JSONResponse:
        return JSONResponse(_error_body(message, kind, param, code), status_code=status)

    async def read_body(request: Request) -> dict:
        api.authorise(request.headers)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as failure:
            raise BadRequest(f"The request body is not valid JSON ({failure}).") from None
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.")
        return body

    async def until_disconnected(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def respond(request: Request, collect) -> JSONResponse:
        """Gather a non-streamed response; a client that leaves first cancels the request."""
        gather = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(until_disconnected(request))
        done, _ = await asyncio.wait({gather, watch}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        if gather not in done:
            gather.cancel()
            return error(499, "the client disconnected", "client_closed")
        return JSONResponse(gather.result())

    def sse(events: AsyncIterator[dict]) -> StreamingResponse:
        async def lines():
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def completions(request: Request):
        body = await read_body(request)
        prompts, params = api.completion_prompts(body)
        ident, created = new_id("cmpl"), int(time.time())

        def chunk(index: int, text: str, reason, use=None) -> dict:
            return {"id": ident, "object": "text_completion", "created": created, "model": api.model_name,
                    "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}],
                    **({"usage": use} if use is not None else {})}

        async def events():
            totals = [0, 0]
            for index, ids in enumerate(prompts):
                async for output in api.outputs(ids, params):
                    reason = _reason(output)
                    if output.text or reason is not None:
                        yield chunk(index, output.text, reason)
                    if reason is not None:
                        totals[0] += output.prompt_tokens
                        totals[1] += output.completion_tokens
            if _include_usage(body):
                yield {**chunk(0, "", None), "choices": [], "usage": usage(*totals)}

        if body.get("stream"):
            return sse(events())

        async def collect():
            choices, totals = [], [0, 0]
            for index, ids in enumerate(prompts):
                text, reason, out = await _gather(api.outputs(ids, params))
                choices.append({"index": index, "text": text, "finish_reason": reason, "logprobs": None})
                totals[0] += out.prompt_tokens
                totals[1] += out.completion_tokens
            return {**chunk(0, "", None), "choices": choices, "usage": usage(*totals)}

        return await respond(request, collect)

    async def chat(request: Request):
        body = await read_body(request)
        ids, params = api.chat_prompt(body)
        ident, created = new_id("chatcmpl"), int(time.time())

        def chunk(delta: dict, reason) -> dict:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": api.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

        async def events():
            yield chunk({"role": "assistant", "content": ""}, None)
            async for output in api.outputs(ids, params):
                reason = _reason(output)
                if output.text:
                    yield chunk({"content": output.text}, None)
                if reason is not None:
                    yield chunk({}, reason)
                    if _include_usage(body):
                        yield {**chunk({}, None), "choices": [],
                               "usage": usage(output.prompt_tokens, output.completion_tokens)}

        if body.get("stream"):
            return sse(events())

        async def collect():
            text, reason, out = await _gather(api.outputs(ids, params))
            return {"id": ident, "object": "chat.completion", "created": created, "model": api.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason, "logprobs": None}],
                    "usage": usage(out.prompt_tokens, out.completion_tokens)}

        return await respond(request, collect)

    async def models(request: Request):
        api.authorise(request.headers)
        return JSONResponse(api.models())

    async def health(request: Request):
        return JSONResponse({"status": "ok", "active": api.engine.active})

    async def bad_request(request: Request, failure: BadRequest):
        return error(failure.status, str(failure), failure.kind, failure.param, failure.code)

    async def http_error(request: Request, failure: HTTPException):
        return error(failure.status_code, str(failure.detail), "invalid_request_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={BadRequest: bad_request, HTTPException: http_error},
                     lifespan=lifespan)


def _reason(output) -> str | None:
    """OpenAI's finish reasons are "stop" and "length"; a cancelled or failed request ends as "stop"."""
    return None if output.finish_reason is None else ("length" if output.finish_reason == "length" else "stop")


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def _gather(outputs):
    """`(text, finish reason, last output)` of a request; an engine error becomes a 500."""
    parts = []
    async for output in outputs:
        parts.append(output.text)
        if output.finish_reason is not None:
            if output.finish_reason == "error":
                raise BadRequest(f"the engine failed: {output.error}", status=500, kind="server_error")
            return "".join(parts), _reason(output), output
    raise BadRequest("the request ended without a result", status=500, kind="server_error")


def serve(pipeline: VishwamAIPipeline, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 16,
          model_name: str = "vishwam", api_key: str | None = None, chat_template: ChatTemplate | None = None,
          max_len: int | None = None, max_decode_steps: int = 8, log_level: str = "warning") -> None:
    """Serve `pipeline` over HTTP until SIGTERM or SIGINT, then finish the requests in
    flight and return. Binds `host` (loopback by default: pass "0.0.0.0" to listen on every
    interface). Compiles the engine's programs before it listens; `slots`, `max_len` and
    `max_decode_steps` as for `Engine`."""
    import uvicorn

    engine = Engine(pipeline, slots=slots, max_len=max_len, max_decode_steps=max_decode_steps).start()
    app = make_app(engine, model_name=model_name, api_key=api_key, chat_template=chat_template,
                   on_shutdown=lambda: engine.shutdown(drain=True))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    try:
        server.run()
    except KeyboardInterrupt:
        # uvicorn drains on SIGTERM/SIGINT, then raises the signal again for the caller's
        # handler; a drained server has done what the signal asked.
        if not server.should_exit:
            raise
    finally:
        engine.shutdown(drain=False)
