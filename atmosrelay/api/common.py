"""What every route shares: the context, the error body, the client address, the key check,
the body limit."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import orjson
import trio
from starlette.requests import Request
from starlette.responses import Response

from atmosrelay.accounts.api_keys import Verified
from atmosrelay.accounts.identity import InvalidDID, validate_did
from atmosrelay.api.metrics import RelayMetrics
from atmosrelay.api.models import Error
from atmosrelay.policy.member import MemberSnapshot, MemberStatus
from atmosrelay.queue.status import StatusIndex
from atmosrelay.refusals import TABLE, Code, Refusal, refuse
from atmosrelay.server.context import SessionContext

log = logging.getLogger("atmosrelay.http")

CLOSE: Final = (b"connection", b"close")
SHIELD: Final = "atmosrelay.shield"  # the request's cancel scope, in the ASGI scope
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.define(eq=False)
class ApiContext:
    relay: SessionContext  # the pipeline, the key checker, the stores, the queue
    status: StatusIndex
    metrics: RelayMetrics
    unsubscribe_secret: bytes
    problems: Callable[[], list[str]]  # why the relay is not ready ([] when it is)
    stopping: Callable[[], bool] = lambda: False  # the relay's stop has begun
    max_body: int = 1024 * 1024
    request_timeout: float = 30.0
    idempotency_ttl: float = 86400.0
    trusted_proxies: tuple[Network, ...] = ()
    # One send per (DID, Idempotency-Key) at a time: a retry waits for the first to answer.
    key_locks: dict[tuple[str, str], trio.Lock] = attrs.field(factory=dict)


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.atmos
    return ctx


def json_response(model: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(model.model_dump(mode="json", by_alias=True))
    return Response(body, status, headers=headers, media_type="application/json")


def error_response(refusal: Refusal) -> Response:
    """The refusal as ``{"error", "code", "retryable"}`` with its HTTP status (and
    ``Retry-After`` for 429 and 503)."""
    headers = {}
    if refusal.http_status in (429, 503):
        headers["Retry-After"] = refusal.retry_after_header or "60"
    body = Error(error=refusal.text, code=refusal.code.value, retryable=refusal.retryable)
    return json_response(body, refusal.http_status, headers)


INVALID_HTTP: Final = attrs.evolve(
    TABLE[Code.INVALID_REQUEST].reply, lines=("Invalid request: {detail}",)
)


def invalid(detail: str) -> Refusal:
    """INVALID_REQUEST naming what is wrong with the HTTP request itself."""
    detail = detail.replace("\r", " ").replace("\n", " ")
    return refuse(Code.INVALID_REQUEST, reply=INVALID_HTTP, log=detail, detail=detail)


def client_address(request: Request, proxies: tuple[Network, ...]) -> str:
    """The peer, or, when the peer is a trusted proxy, the nearest address in
    ``X-Forwarded-For`` that is not one (each proxy appends the address it saw)."""
    peer = request.client.host if request.client else "?"
    if not proxies or not _trusted(peer, proxies):
        return peer
    hops = [h.strip() for v in request.headers.getlist("x-forwarded-for") for h in v.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        if not _trusted(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a garbled header: believe the socket
    return peer


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


@attrs.frozen
class Caller:
    did: str
    member: MemberSnapshot
    ip: str


async def authenticate(request: Request, ctx: ApiContext) -> Caller | Refusal:
    """``Authorization: Bearer atmos_…`` and ``X-Atmos-DID`` (a DID or a handle)."""
    ip = client_address(request, ctx.trusted_proxies)
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    who = request.headers.get("x-atmos-did", "").strip()
    if scheme.lower() != "bearer" or not secret.strip() or not who:
        return refuse(Code.AUTH_REQUIRED, log="no Bearer key or no X-Atmos-DID")
    if who.startswith("did:"):
        try:
            validate_did(who)
        except InvalidDID:
            return refuse(Code.INVALID_DID, log="X-Atmos-DID is not a did:plc or did:web")
    result = await ctx.relay.keys.verify(who, secret.strip(), ip)
    if not isinstance(result, Verified):
        log.info("http auth-failed from %s: %s", ip, result.reason)
        return refuse(Code.AUTH_FAILED, log=result.reason)
    member = await ctx.relay.pipeline.member(result.did)
    if member is None or member.status is MemberStatus.REMOVED:
        return refuse(Code.AUTH_FAILED, log="member removed")
    if member.suspended:
        return refuse(Code.MEMBER_SUSPENDED, log=member.suspension_reason)
    return Caller(result.did, member, ip)


async def read_body(request: Request, limit: int) -> bytes | Refusal:
    """The body, refused with 413 as soon as it passes ``limit`` (never read whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return refuse(Code.MESSAGE_TOO_LARGE, log=f"Content-Length {declared}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            return refuse(Code.MESSAGE_TOO_LARGE, log=f"body over {limit} bytes")
    return bytes(data)


def shield_from_here(request: Request, seconds: float) -> None:
    """From now on the request finishes even if the server is shutting down (within
    ``seconds``): once a send has reached the journal, its answer is not cut off."""
    scope: trio.CancelScope | None = request.scope.get(SHIELD)
    if scope is not None:
        scope.shield = True
        scope.deadline = min(scope.deadline, trio.current_time() + seconds)


Handler = Callable[[Request], Awaitable[Response]]


class Shieldable:
    """The outermost ASGI layer. Each request runs in a cancel scope a route can shield;
    ``answered`` hears each request's route and status (for /metrics).

    ``direct`` maps (method, path) to an endpoint served here, without the framework's
    middleware and dependency layers: FastAPI still routes, validates and documents every
    operation (the schema has them all), but the send path, which takes the raw request
    and answers a ready Response anyway, skips 0.2 ms of per-request machinery that was a
    sixth of its cost (bench/bench_http.py). Its errors get the same INTERNAL_ERROR."""

    def __init__(
        self,
        app: Any,
        answered: Callable[[dict[str, Any], int], None],
        direct: dict[tuple[str, str], Handler] | None = None,
    ) -> None:
        self.app = app
        self.answered = answered
        self.direct = direct or {}
        self.stopping: Callable[[], bool] = lambda: False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.stopping():  # tell a keep-alive client not to send on this one
                    message = {**message, "headers": [*message["headers"], CLOSE]}
            await send(message)

        with trio.CancelScope() as cancel:
            scope[SHIELD] = cancel
            try:
                handler = self.direct.get((scope["method"], scope["path"]))
                if handler is None:
                    await self.app(scope, receive, sending)
                else:
                    scope["app"] = self.app
                    scope["route_path"] = scope["path"]
                    await self._direct(handler, scope, receive, sending)
            finally:
                self.answered(scope, status)

    async def _direct(
        self, handler: Handler, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except Exception as exc:  # a bug: the client learns only that; the log has the rest
            log.error("http %s %s failed", scope["method"], scope["path"], exc_info=exc)
            response = error_response(refuse(Code.INTERNAL_ERROR, log=type(exc).__name__))
        await response(scope, receive, send)
