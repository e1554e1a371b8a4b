"""Serving: a continuous-batching decode engine and an OpenAI-compatible HTTP server.

`Engine` keeps a KV cache of `slots` rows; requests join and leave between decode steps,
each with its own sampling (`SamplingParams`), and a fixed set of compiled programs serves
every request. `serve` puts the OpenAI API (`/v1/completions`, `/v1/chat/completions`,
streamed or not, `/v1/models`, `/health`) in front of it; `scripts/serve.py` (the
`vishwam-serve` command) serves a run, pipeline or HF directory. Needs the `serve` extra
(`pip install "vishwam[serve]"`: Starlette, uvicorn, Jinja2).

Public API:
    Engine          continuous batching over KV-cache slots, on a background thread.
    SamplingParams  one request's sampling: max_tokens, temperature, top_k, top_p, stop strings and ids, seed.
    Output          what a request produced since its previous output (text, token ids, finish reason).
    ChatTemplate    renders chat messages with a Jinja chat template (sandboxed).
    find_chat_template  the chat template and special tokens of a directory's tokenizer_config.json.
    make_app        the Starlette app of the OpenAI API over an engine.
    serve           start an engine for a pipeline and serve it over HTTP until SIGTERM (then drain).
"""

from ._app import make_app as make_app
from ._app import serve as serve
from ._chat import ChatTemplate as ChatTemplate
from ._chat import find_chat_template as find_chat_template
from ._engine import Engine as Engine
from ._engine import Output as Output
from ._engine import SamplingParams as SamplingParams

__all__ = ["ChatTemplate", "Engine", "Output", "SamplingParams", "find_chat_template", "make_app", "serve"]
