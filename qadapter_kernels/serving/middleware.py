"""The API server's middleware that routes a request by its OpenAI ``model`` field.

``qadapter serve`` names every served adapter (and the base model, with ``--base-name``) as a served
model of vLLM's server, so clients choose one the OpenAI way (``model="strict"``) and vLLM refuses a
name it does not serve. vLLM does not pass that name on to the engine; this middleware copies it into
the request's ``vllm_xargs`` (``{"qadapter": name}``), which vLLM hands to the engine as
``SamplingParams.extra_args``, where ``serving.routing`` reads it. A pure ASGI middleware: it reads
the body of ``POST .../completions`` requests once, rewrites it, and replays it; everything else
passes untouched.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .settings import REQUEST_ADAPTER, served_routes

__all__ = ["RouteByModel", "routed_body"]

Message = MutableMapping[str, Any]
_ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


def routed_body(body: bytes, routes: dict[str, int]) -> bytes:
    """``body`` with ``vllm_xargs.qadapter`` set to its ``model`` when that is a served route; else as is."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body  # vLLM answers malformed JSON itself
    if not isinstance(request, dict) or request.get("model") not in routes:
        return body
    extra = request.get("vllm_xargs")
    if extra is not None and not isinstance(extra, dict):
        return body  # vLLM refuses it with its own message
    request["vllm_xargs"] = {**(extra or {}), REQUEST_ADAPTER: request["model"]}
    return json.dumps(request).encode()


class RouteByModel:
    """ASGI middleware (``--middleware qadapter_kernels.serving.middleware.RouteByModel``)."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app
        self.routes = served_routes() or {}

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _ROUTED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to route
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = routed_body(b"".join(chunks), self.routes)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers},
                       _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[Message], receive: Callable[[], Awaitable[Message]]) -> Callable[[], Awaitable[Message]]:
    """A ``receive`` that first gives ``messages``, then what ``receive`` gives."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
