"""The routes that are not a member's: one-click unsubscribe, metrics and health.

**Unsubscribe** (RFC 8058) at the URL the relay writes into ``List-Unsubscribe`` of every
bulk message: ``/unsubscribe?did=…&rcpt=…&t=…``, the token an HMAC of (DID, recipient) with
the relay's own key (``<data_dir>/unsubscribe.key``), so the link proves itself and needs
no table. ``POST`` with ``List-Unsubscribe=One-Click`` in the body (form-encoded, or
multipart as RFC 8058 allows) suppresses the recipient for that member (source
``unsubscribe``: it blocks the member's bulk mail, never its transactional mail) and answers
200 with no redirect. ``GET`` only shows a page with a button that makes that POST: mail
scanners fetch links, and a fetch must never unsubscribe anyone. A token that does not verify
gets 400 and changes nothing. Unsubscribing twice is the same as once.

**Health.** ``/healthz``: the process answers. ``/readyz``: 503 with the reasons when the
relay should get no traffic (journal poisoned, journal disk full, SMTP listeners not up or
closing). ``/metrics``: Prometheus text (api/metrics.py). These carry no member data; an
operator who exposes the API publicly should still keep them to the internal network at
the reverse proxy (docs/api.md).
"""

from __future__ import annotations

import email.policy
import hmac
import html
import logging
from email.parser import BytesParser
from typing import Final
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from atmosrelay.accounts.identity import InvalidDID, validate_did
from atmosrelay.accounts.store import NotFound
from atmosrelay.api.common import context, json_response
from atmosrelay.api.models import Health
from atmosrelay.message.headers import unsubscribe_token
from atmosrelay.policy.member import SuppressionSource
from atmosrelay.refusals import TABLE, Code

log = logging.getLogger("atmosrelay.http")

ONE_CLICK: Final = ("List-Unsubscribe", "One-Click")
MAX_FORM: Final = 4096

_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36em;margin:3em auto;padding:0 1em}}
button{{font-size:1.1em;padding:.5em 1.2em}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=html.escape(title), body=body),
        status,
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'",
            "X-Frame-Options": "DENY",
        },
    )


def _verified(request: Request) -> tuple[str, str] | None:
    """(did, recipient) when the link's token is the one the relay wrote."""
    q = request.query_params
    did, rcpt, token = q.get("did", ""), q.get("rcpt", ""), q.get("t", "")
    if not did or not rcpt or not token or len(rcpt) > 320:
        return None
    try:
        validate_did(did)
    except InvalidDID:
        return None
    expected = unsubscribe_token(context(request).unsubscribe_secret, did, rcpt)
    if not hmac.compare_digest(expected.encode(), token.encode("utf-8", "replace")):
        return None
    return did, rcpt


def _invalid() -> HTMLResponse:
    text = " ".join(TABLE[Code.INVALID_TOKEN].reply.lines)
    return _page(
        "Link not valid",
        f"<p>{html.escape(text)}</p><p><small>code {Code.INVALID_TOKEN.value}</small></p>",
        400,
    )


async def unsubscribe_page(request: Request) -> Response:
    found = _verified(request)
    if found is None:
        return _invalid()
    _, rcpt = found
    return _page(
        "Unsubscribe",
        f"<p>Stop this sender's mailings to <strong>{html.escape(rcpt)}</strong>?</p>"
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit" id="unsubscribe">Unsubscribe</button></form>',
    )


async def unsubscribe_post(request: Request) -> Response:
    found = _verified(request)
    if found is None:
        return _invalid()
    if not await _one_click(request):
        return _page(
            "Unsubscribe",
            "<p>This address expects <code>List-Unsubscribe=One-Click</code> (RFC 8058).</p>",
            400,
        )
    did, rcpt = found
    store = context(request).relay.store
    try:
        await store.run(
            store.sync.suppress,
            did,
            rcpt,
            SuppressionSource.UNSUBSCRIBE.value,
            "one-click unsubscribe",
        )
    except NotFound:
        log.info("unsubscribe for %s, a member no longer here: nothing to do", did)
    else:
        context(request).relay.keys.changed()  # members are reloaded: bulk mail stops now
        log.info("unsubscribed a recipient from %s (one-click)", did)
    return _page(
        "Unsubscribed",
        f'<p id="done"><strong>{html.escape(rcpt)}</strong> will get no more of this '
        "sender's mailings.</p>",
    )


async def _one_click(request: Request) -> bool:
    """The body says ``List-Unsubscribe=One-Click``, form-encoded or as multipart/form-data
    (read with the standard library's MIME parser), at most MAX_FORM bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return False
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
        parsed = BytesParser(policy=email.policy.HTTP).parsebytes(head + bytes(body))
        if not parsed.is_multipart():
            return False
        for part in parsed.iter_parts():
            value = part.get_payload(decode=True)
            if (
                part.get_param("name", header="content-disposition") == ONE_CLICK[0]
                and isinstance(value, bytes)
                and value.strip() == ONE_CLICK[1].encode()
            ):
                return True
        return False
    pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return ONE_CLICK in pairs


async def metrics(request: Request) -> Response:
    registry = context(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    return json_response(Health(status="ok"))


async def readyz(request: Request) -> Response:
    problems = context(request).problems()
    if problems:
        return json_response(Health(status="not ready", problems=problems), 503)
    return json_response(Health(status="ready"))
