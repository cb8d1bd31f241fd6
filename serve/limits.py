"""Request-body limits enforced while the body streams in, before memory is spent on it.

``BodyLimit`` is a plain ASGI middleware used in two places with one behaviour:

- in Ray Serve's HTTP proxy (``proxy_middlewares``, installed through Serve's
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``), because the proxy reads a request's whole body
  into memory while the request waits for a replica: there the limit is the edge guard, and the
  budget bounds the bytes all requests in flight may hold (a request waits, its body still in
  the client's socket, until the budget has room for it);
- on the ingress's FastAPI app, with the app's own ``max_upload_mb``.

A body over the limit is answered 413 as soon as it is known: at once from Content-Length, or
when the counted bytes of a chunked body pass it; what follows is never read. A request holds
its declared length of the budget (a chunked one: the whole limit; one with neither header has
no body, RFC 9112 §6.3, whatever its method), waits for room at most ``wait_s`` (then 503 with
Retry-After), and a body that stops arriving for ``idle_s`` is answered 408. Every answer of the
limiter names where it acted (``X-MedSAM3-Limit: proxy`` or ``ingress``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# environment of the proxy processes (set where Ray is started: `medsam3 serve`, the RayService)
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
MAX_UPLOAD_ENV = "MEDSAM3_MAX_UPLOAD_MB"
BUFFER_ENV = "MEDSAM3_PROXY_BUFFER_MB"
WAIT_ENV = "MEDSAM3_BODY_WAIT_S"
IDLE_ENV = "MEDSAM3_BODY_IDLE_S"
MULTIPART_SLACK = 2**16  # form fields and part headers around the file
WAIT_S, IDLE_S = 30.0, 60.0  # defaults of the settings body_wait_s and body_idle_s
WHERE = b"x-medsam3-limit"


class BudgetTimeout(Exception):
    """No room in the budget within the deadline."""


def retry_after(wait_s: float) -> str:
    """The Retry-After seconds of a 503 given after waiting ``wait_s`` for room in a budget."""
    return str(max(1, round(wait_s)))


class Budget:
    """A pool of units (bytes, voxels) that requests in flight hold; a request waits for room, at
    most ``timeout`` seconds when given."""

    def __init__(self, total: int):
        self.total = int(total)
        self.free = int(total)
        self._changed: asyncio.Condition | None = None  # made in the serving event loop

    @asynccontextmanager
    async def hold(self, amount: int, timeout: float | None = None):
        amount = min(int(amount), self.total)  # a single request may take the whole pool
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.free >= amount), timeout)
            except TimeoutError as exc:
                raise BudgetTimeout(f"no room for {amount} of {self.total} within {timeout} s") from exc
            self.free -= amount
        try:
            yield
        finally:
            async with self._changed:
                self.free += amount
                self._changed.notify_all()


def too_large(limit: int, declared: int | None = None) -> dict[str, str]:
    what = f"a body of {declared} bytes" if declared is not None else "the body"
    return {"detail": f"upload too large: {what} exceeds the limit of {limit} bytes "
                      f"({limit / 2**20:.0f} MB including {MULTIPART_SLACK} bytes for the form)"}


async def send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A JSON answer sent straight from a middleware (the body, if any, is left unread)."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """ASGI middleware: at most ``max_bytes`` of body per request; with ``budget_bytes``, at most
    that many bytes reserved by all requests with a body at once (Content-Length, or ``max_bytes``
    when the body is chunked). ``where`` names the place in the answers it sends."""

    def __init__(self, app: Callable, max_bytes: int, budget_bytes: int | None = None, where: str = "ingress",
                 wait_s: float = WAIT_S, idle_s: float = IDLE_S):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.budget = Budget(max(int(budget_bytes), self.max_bytes)) if budget_bytes else None
        self.where = [(WHERE, where.encode())]
        self.wait_s, self.idle_s = float(wait_s), float(idle_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if b"content-length" in headers:
            try:
                reserve = int(headers[b"content-length"])
            except ValueError:
                return await send_json(send, 400, {"detail": "Content-Length is not a number"}, self.where)
            if reserve > self.max_bytes:
                return await send_json(send, 413, too_large(self.max_bytes, reserve), self.where)
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            reserve = self.max_bytes
        else:
            reserve = 0  # neither header: no body (RFC 9112 §6.3), whatever the method
        if self.budget is None or reserve == 0:
            return await self._limited(scope, receive, send)
        try:
            async with self.budget.hold(reserve, self.wait_s):
                return await self._limited(scope, receive, send)
        except BudgetTimeout:
            retry = retry_after(self.wait_s)
            return await send_json(send, 503, {"detail": "the server is receiving as many uploads as it can hold; "
                                                         f"retry in {retry} s"},
                                   [(b"retry-after", retry.encode()), *self.where])

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: dict[str, Any] = {"read": 0, "refused": None, "started": False, "complete": False}

        async def counted() -> Message:
            if state["refused"]:
                return {"type": "http.disconnect"}
            if state["complete"]:  # after the body the app only listens for the client going away
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                state["refused"] = (408, {"detail": f"the body stopped arriving for {self.idle_s:.0f} s"})
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["complete"] = not message.get("more_body", False)
                if state["read"] > self.max_bytes:
                    state["refused"] = (413, too_large(self.max_bytes))  # the app sees the client go away
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if state["refused"] and not state["started"]:
                return  # the app's answer to the cut body is replaced by the refusal below
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not state["refused"]:
                raise
        if state["refused"] and not state["started"]:
            await send_json(send, *state["refused"], self.where)


def upload_bytes(settings: dict[str, Any]) -> int:
    """The body limit of the app's ``max_upload_mb`` (the file plus the form around it)."""
    return int(float(settings.get("max_upload_mb", 512)) * 2**20) + MULTIPART_SLACK


def proxy_environment(settings: dict[str, Any]) -> dict[str, str]:
    """Environment that installs ``BodyLimit`` in Serve's HTTP proxies with these app settings
    (it must be in place when Ray starts the proxies)."""
    return {PROXY_CALLBACK: "serve.limits:proxy_middlewares",
            MAX_UPLOAD_ENV: str(settings.get("max_upload_mb", 512)),
            BUFFER_ENV: str(settings.get("proxy_buffer_mb", 2048)),
            WAIT_ENV: str(settings.get("body_wait_s", WAIT_S)),
            IDLE_ENV: str(settings.get("body_idle_s", IDLE_S))}


def proxy_middlewares() -> list:
    """Serve's proxy callback: ``BodyLimit`` with the limits in the proxy's environment."""
    from starlette.middleware import Middleware

    settings = {"max_upload_mb": os.environ.get(MAX_UPLOAD_ENV, "512")}
    buffer = int(float(os.environ.get(BUFFER_ENV, "2048")) * 2**20)
    return [Middleware(BodyLimit, max_bytes=upload_bytes(settings), budget_bytes=buffer, where="proxy",
                       wait_s=float(os.environ.get(WAIT_ENV, WAIT_S)), idle_s=float(os.environ.get(IDLE_ENV, IDLE_S)))]
