"""The FastAPI application: routes, the error bodies of everything that goes wrong, and
the OpenAPI schema (``/openapi.json``) that documents each of them.

Every error a client can get, from a route or from the framework (a bad query parameter,
an unknown path, a wrong method), is ``{"error", "code", "retryable"}`` with a code of the
refusal table (atmosrelay/refusals.py); a bug is ``INTERNAL_ERROR`` with a traceback in the
operator's log and nothing of it in the answer.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from atmosrelay.api import member, pages, send
from atmosrelay.api.common import ApiContext, Shieldable, error_response, invalid
from atmosrelay.api.models import (
    Deliverability,
    Error,
    ForwardToOut,
    ForwardToRequest,
    Health,
    MemberStatusOut,
    MessageOut,
    MessagePage,
    SendRequest,
    SendResponse,
)
from atmosrelay.refusals import Code, refuse

log = logging.getLogger("atmosrelay.http")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "invalid request, or no credentials (AUTH_REQUIRED, INVALID_DID)",
        401: "bad key (AUTH_FAILED)",
        403: "suspended member, or a sender domain not enrolled, verified or paused",
        404: "no such message of this member (NOT_FOUND)",
        413: "body or message too large (MESSAGE_TOO_LARGE)",
        422: "Idempotency-Key reused for another body (IDEMPOTENCY_CONFLICT)",
        429: "rate limited (RATE_LIMITED); Retry-After says when",
        500: "a bug (INTERNAL_ERROR); nothing was queued",
        503: "journal full or failed (QUEUE_FULL, TEMPORARILY_UNAVAILABLE); Retry-After",
    }
    return {s: {"model": Error, "description": described[s]} for s in statuses}


AUTH_ERRORS = (400, 401, 403, 500)
SEND_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SendRequest.model_json_schema(by_alias=True)}},
    },
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "a retry with the same key and body returns the first answer "
            "(24 hours, across restarts)",
            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
        },
        *(
            {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
            for name in ("Authorization", "X-Atmos-DID")
        ),
    ],
}
HTML = {"content": {"text/html": {"schema": {"type": "string"}}}}


def _allowed(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for candidate in app.router.routes:
        match, _ = candidate.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= getattr(candidate, "methods", None) or set()
    return sorted(methods)


def make_app(ctx: ApiContext) -> Any:
    app = FastAPI(
        title="atmosrelay",
        version="1",
        description="Send mail and follow it (docs/api.md).",
        docs_url=None,
        redoc_url=None,
    )
    app.state.atmos = ctx
    route = app.add_api_route
    route(
        "/v1/send",
        send.send,
        methods=["POST"],
        response_model=SendResponse,
        responses=_errors(*AUTH_ERRORS, 413, 422, 429, 503),
        openapi_extra=SEND_BODY,
        summary="Send a message (200 only once it is on disk)",
    )
    route(
        "/v1/messages/{queue_id}",
        member.get_message,
        methods=["GET"],
        response_model=MessageOut,
        responses=_errors(*AUTH_ERRORS, 404),
        summary="One message: each recipient's status and attempts",
    )
    route(
        "/v1/messages",
        member.list_messages,
        methods=["GET"],
        response_model=MessagePage,
        responses=_errors(*AUTH_ERRORS),
        summary="The member's messages, newest first",
    )
    route(
        "/member/status",
        member.member_status,
        methods=["GET"],
        response_model=MemberStatusOut,
        responses=_errors(*AUTH_ERRORS),
    )
    route(
        "/member/forward-to",
        member.put_forward_to,
        methods=["PUT"],
        response_model=ForwardToOut,
        responses=_errors(*AUTH_ERRORS, 403),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ForwardToRequest.model_json_schema()}},
            }
        },
        summary="Forward replies to one of the member's domains (null stops it)",
    )
    route(
        "/member/deliverability",
        member.deliverability,
        methods=["GET"],
        response_model=Deliverability,
        responses=_errors(*AUTH_ERRORS),
    )
    unsubscribe_params = {
        "parameters": [
            {"name": n, "in": "query", "required": True, "schema": {"type": "string"}}
            for n in ("did", "rcpt", "t")
        ]
    }
    route(
        "/unsubscribe",
        pages.unsubscribe_page,
        methods=["GET"],
        response_class=Response,
        responses={200: HTML, 400: HTML},
        openapi_extra=unsubscribe_params,
        summary="A page with a button (a GET never unsubscribes)",
    )
    route(
        "/unsubscribe",
        pages.unsubscribe_post,
        methods=["POST"],
        response_class=Response,
        responses={200: HTML, 400: HTML},
        openapi_extra={
            **unsubscribe_params,
            "requestBody": {
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {"List-Unsubscribe": {"const": "One-Click"}},
                        }
                    }
                }
            },
        },
        summary="RFC 8058 one-click unsubscribe",
    )
    route(
        "/metrics",
        pages.metrics,
        methods=["GET"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    route("/healthz", pages.healthz, methods=["GET"], response_model=Health)
    route(
        "/readyz",
        pages.readyz,
        methods=["GET"],
        response_model=Health,
        responses={503: {"model": Health, "description": "not ready, and why"}},
    )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query") or "request"
        return error_response(invalid(f"{where}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(refuse(Code.NOT_FOUND, what="path", name=request.url.path[:60]))
        if exc.status_code == 405:
            refusal = invalid(f"{request.method[:10]} is not allowed here")
        else:
            refusal = invalid("the request was not understood")
        response = error_response(refusal)
        response.status_code = exc.status_code if 400 <= exc.status_code < 500 else 400
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:  # RFC 9110 15.5.6: every method the path has, all routes
            response.headers["Allow"] = ", ".join(_allowed(app, request))
        return response

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        log.error("http %s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(refuse(Code.INTERNAL_ERROR, log=type(exc).__name__))

    def count(scope: dict[str, Any], status: int) -> None:
        path = scope.get("route_path") or getattr(scope.get("route"), "path", "other")
        ctx.metrics.http_requests.labels(path, str(status)).inc()

    front = Shieldable(app, count, direct={("POST", "/v1/send"): send.send})
    front.stopping = lambda: ctx.stopping()
    return front
