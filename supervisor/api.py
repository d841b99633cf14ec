"""The HTTP surface: OpenAI routes, health and status, metrics, and the admin API."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .balancer import prefix_keys, priority_of
from .config import ServerConfig
from .daemon import Supervisor
from .metrics import Metrics
from .modelfile import request_defaults
from .openai_compat import error_body
from .proxy import Proxy, parse_json_object
from .reply import AiohttpReply, Reply, answer_error

logger = logging.getLogger(__name__)

_defaults = functools.lru_cache(maxsize=256)(request_defaults)  # Modelfiles are frozen

Reloader = Callable[[], Awaitable[dict[str, Any]]]

@dataclass(frozen=True)
class Completions:
    """What the completion routes need, whichever HTTP server took the request."""

    sup: Supervisor
    proxy: Proxy
    server: ServerConfig


SUPERVISOR = web.AppKey("supervisor", Supervisor)
COMPLETIONS = web.AppKey("completions", Completions)
SERVER = web.AppKey("server", ServerConfig)
METRICS = web.AppKey("metrics", Metrics)
RELOAD = web.AppKey[Reloader]("reload")
ACTIVE = web.AppKey[list[int]]("active")

PRIORITY_HEADER = "X-Priority"
ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text",
    "/v1/embeddings": "embeddings",
}
# The same routes without the /v1 prefix, as some clients send them.
KINDS = ROUTES | {path.removeprefix("/v1"): kind for path, kind in ROUTES.items()}
UPSTREAM_PATH = {kind: path for path, kind in ROUTES.items()}
REQUIRED = {"chat": "messages", "text": "prompt", "embeddings": "input"}


def json_error(status: int, message: str, *, code: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message, code=code), status=status,
                             headers=headers)


def bearer(authorization: str | None, api_key: str | None) -> str | None:
    """The token of `Authorization: Bearer ...`, else of `X-Api-Key`."""
    header = authorization or ""
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return api_key


def _bearer(request: web.Request) -> str | None:
    return bearer(request.headers.get("Authorization"), request.headers.get("X-Api-Key"))


def _matches(token: str | None, secrets: tuple[str, ...]) -> bool:
    """Constant-time comparison against every secret (no early exit)."""
    if token is None:
        return False
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(token.encode(), secret.encode())
    return ok


def api_key_ok(server: ServerConfig, token: str | None) -> bool:
    """Whether `token` may use the API (any key works where none is configured)."""
    if not server.api_keys:
        return True
    admin = (server.admin_token,) if server.admin_token else ()
    return _matches(token, server.api_keys + admin)


def _on_unix_socket(request: web.Request) -> bool:
    return isinstance(request.transport.get_extra_info("sockname") if request.transport
                      else None, str)


@web.middleware
async def guard(request: web.Request,
                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    """Auth, the connection limit, and OpenAI-shaped errors for everything."""
    server = request.app[SERVER]
    path = request.path
    admin = (server.admin_token,) if server.admin_token else ()
    if path.startswith("/admin/"):
        if not _on_unix_socket(request):
            if not admin:
                return json_error(403, "the admin API is disabled: set server.admin_token "
                                       "or use server.admin_socket")
            if not _matches(_bearer(request), admin):
                return json_error(401, "invalid or missing admin token")
    elif server.api_keys and (path.startswith("/v1/") or path in ("/status", "/metrics")
                              or path in KINDS):
        if not api_key_ok(server, _bearer(request)):
            return json_error(401, "invalid or missing API key", code="invalid_api_key")
    active = request.app[ACTIVE]
    if active[0] >= server.max_connections:
        return json_error(503, "too many concurrent requests", code="overloaded")
    active[0] += 1
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) \
            else exc.reason
        return json_error(exc.status, message or exc.reason)
    finally:
        active[0] -= 1


async def models(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    created = int(time.time() - (time.monotonic() - sup.started_at))
    data = [{"id": name, "object": "model", "created": created, "owned_by": "llm-supervisor",
             "ready_replicas": sum(1 for r in pool.replicas if r.accepts())}
            for name, pool in sup.pools.items()]
    return web.json_response({"object": "list", "data": data})


async def model(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    name = request.match_info["name"]
    if name not in sup.pools:
        return _unknown_model(sup, name)
    return web.json_response({"id": name, "object": "model", "owned_by": "llm-supervisor"})


def _unknown_model(sup: Supervisor, name: str) -> web.Response:
    return json_error(404, _unknown_model_message(sup, name), code="model_not_found")


def _unknown_model_message(sup: Supervisor, name: str) -> str:
    served = ", ".join(sorted(sup.pools)) or "none"
    return f"model {name!r} is not served here; served models: {served}"


def _with_defaults(sup: Supervisor, name: str, kind: str, body: dict[str, Any]) -> None:
    """Fill what the request leaves out from the model's Modelfile (PARAMETER, SYSTEM)."""
    mf = sup.prepared.modelfiles.get(name)
    if mf is None or kind == "embeddings":
        return
    for key, value in _defaults(mf).items():
        body.setdefault(key, value)
    if kind == "chat":
        messages = body["messages"]
        prefix: list[dict[str, Any]] = []
        if mf.system and not any(m.get("role") == "system" for m in messages):
            prefix.append({"role": "system", "content": mf.system})
        prefix += [{"role": role, "content": content} for role, content in mf.messages]
        if prefix:
            body["messages"] = prefix + messages


def _validate(kind: str, body: dict[str, Any]) -> str | None:
    field = REQUIRED[kind]
    value = body.get(field)
    if value is None:
        return f"missing required parameter: {field!r}"
    if kind == "chat":
        if not isinstance(value, list) or not value:
            return "'messages' must be a non-empty array"
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return f"'messages[{i}]' must be an object with a string 'role'"
    elif not isinstance(value, str | list):
        return f"{field!r} must be a string or an array"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "'stream' must be a boolean"
    return None


async def completion(request: web.Request) -> web.StreamResponse:
    """Chat, text completion and embeddings on aiohttp: read the body, then as below."""
    server = request.app[SERVER]
    if request.content_length is not None and request.content_length > server.max_body_bytes:
        return await _too_large(request, server)  # on the declared length, without waiting
    limit = server.body_timeout
    try:
        if request.content.is_eof():  # the usual case: the whole body came with the head
            raw = await request.read()
        else:
            async with asyncio.timeout(limit):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked or compressed body grew too large
        return await _too_large(request, server)
    except TimeoutError:
        logger.info("closed a connection whose request body did not arrive within %gs", limit)
        slow = json_error(408, body_timeout_message(limit), code="request_timeout")
        slow.force_close()
        await slow.prepare(request)
        await slow.write_eof()
        # aiohttp would otherwise linger, reading the rest of the body for 10 s more.
        if request.transport is not None:
            request.transport.close()
        return slow
    reply = AiohttpReply(request)
    await serve_completion(request.app[COMPLETIONS], KINDS[request.path], raw,
                           request.headers.get(PRIORITY_HEADER), reply)
    assert reply.response is not None  # serve_completion always answers
    return reply.response


async def _too_large(request: web.Request, server: ServerConfig) -> web.StreamResponse:
    """413, then a half-close: the client sees the end at once, while aiohttp drops what
    it still sends for a while (closing with unread input could reset the answer away)."""
    refusal = json_error(413, too_large_message(server.max_body_bytes), code="request_too_large")
    refusal.force_close()
    await refusal.prepare(request)
    await refusal.write_eof()
    transport = request.transport
    if transport is not None and transport.can_write_eof():
        transport.write_eof()
    return refusal


def too_large_message(limit: int) -> str:
    return f"request body larger than server.max_body_bytes ({limit} bytes)"


def body_timeout_message(limit: float) -> str:
    return f"the request body did not arrive within {limit:g}s"


async def serve_completion(ctx: Completions, kind: str, raw: bytes, priority_header: str | None,
                           reply: Reply) -> None:
    """Validate a completion request, route it by model, relay it; always answers."""
    sup = ctx.sup
    if sup.draining:
        return await answer_error(reply, 503, "the server is shutting down",
                                  code="shutting_down")
    try:
        body = parse_json_object(raw)
    except ValueError as exc:
        return await answer_error(reply, 400, str(exc))
    name = body.get("model")
    if not isinstance(name, str) or not name:
        return await answer_error(reply, 400, "you must provide a 'model' parameter (a string)")
    pool = sup.pools.get(name)
    if pool is None:
        return await answer_error(reply, 404, _unknown_model_message(sup, name),
                                  code="model_not_found")
    problem = _validate(kind, body)
    if problem is not None:
        return await answer_error(reply, 400, problem, code="invalid_request")
    if ctx.server.log_prompts:
        logger.info("request for %s: %s", name, body)
    _with_defaults(sup, name, kind, body)
    keys = prefix_keys(body) if kind != "embeddings" else []
    await ctx.proxy.forward(reply, pool, body, UPSTREAM_PATH[kind], kind,
                            priority_of(priority_header), keys)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    if sup.ready() and not sup.draining:
        return web.json_response({"status": "ready"})
    missing = [name for name, pool in sup.pools.items()
               if not any(r.accepts() for r in pool.replicas)]
    return web.json_response({"status": "not ready", "models_without_ready_replica": missing},
                             status=503)


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SUPERVISOR].status())


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def admin_reload(request: web.Request) -> web.Response:
    try:
        diff = await request.app[RELOAD]()
    except Exception as exc:  # a bad config is refused; the running one stays
        return json_error(400, f"reload refused, the running config stays: {exc}",
                          code="reload_failed")
    return web.json_response({"status": "reloaded", **diff})


def _replica_id(request: web.Request) -> str:
    """`gemma3-270m/0` as is, or `gemma3-270m:0` (a model name may itself hold ':')."""
    rid = request.match_info["id"]
    if "/" not in rid and ":" in rid:
        model, _, index = rid.rpartition(":")
        if index.isdigit():
            return f"{model}/{index}"
    return rid


def _replica_command(kind: str, done: str) -> Callable[[web.Request],
                                                        Awaitable[web.Response]]:
    """An admin handler that sends one command to one replica."""

    async def handler(request: web.Request) -> web.Response:
        sup = request.app[SUPERVISOR]
        rid = _replica_id(request)
        if rid not in sup.replicas:
            return json_error(404, f"no replica {rid!r}; replicas: {', '.join(sup.replicas)}")
        await sup.replicas[rid].send(kind, "admin")
        return web.json_response({"status": done, "replica": rid})

    return handler


def build_app(sup: Supervisor, proxy: Proxy, server: ServerConfig, metrics_: Metrics,
              reload: Reloader) -> web.Application:
    """The aiohttp application with every route; lifecycle is the caller's."""
    app = web.Application(middlewares=[guard], client_max_size=server.max_body_bytes)
    app[SUPERVISOR] = sup
    app[COMPLETIONS] = Completions(sup, proxy, server)
    app[SERVER] = server
    app[METRICS] = metrics_
    app[RELOAD] = reload
    app[ACTIVE] = [0]
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{name}", model)
    for path in ROUTES:
        app.router.add_post(path, completion)
        app.router.add_post(path.removeprefix("/v1"), completion)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/admin/reload", admin_reload)
    app.router.add_post("/admin/replicas/{id:.+}/restart",
                        _replica_command("restart", "restarting"))
    app.router.add_post("/admin/replicas/{id:.+}/drain", _replica_command("drain", "drained"))
    return app
