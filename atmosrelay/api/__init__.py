"""The HTTP API (docs/api.md): FastAPI on hypercorn's trio worker, in the relay's own trio.run.

    server.py    the listeners: started with task_status, stopped with the SMTP ones
    app.py       the routes and the error body of everything that can go wrong
    send.py      POST /v1/send through the acceptance pipeline, 200 only after the fsync;
                 Idempotency-Key
    member.py    GET /v1/messages (the status index), /member/status, /member/deliverability
    pages.py     RFC 8058 one-click unsubscribe, /metrics, /healthz, /readyz
    compose.py   a send's JSON made into a message with the standard library's email package
    metrics.py   the Prometheus registry
    common.py    the context, credentials, client address, body limit, the shield

It depends on ``submission/`` (the same pipeline as SMTP), ``queue/status.py`` and the
account store; nothing depends on it.
"""
