"""The shapes of the HTTP API: request and response bodies (pydantic, so the OpenAPI
schema FastAPI publishes is the one the code validates against)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TO = 50  # recipients per send (the reference relay's limit)

Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
Line = Annotated[str, Field(max_length=998)]  # one header line's worth (RFC 5322 2.1.1)
RecipientStatus = Literal["accepted", "deferred", "sent", "bounced", "suppressed"]


class SendRequest(BaseModel):
    """``POST /v1/send``. Unknown fields are refused (a misspelt ``cc`` would otherwise
    send the message to fewer people than meant, without a word)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Line = Field(alias="from", description='"addr@domain" or "Name <addr@domain>"')
    to: Line | Annotated[list[Line], Field(min_length=1, max_length=MAX_TO)] = Field(
        description=f"one address, or a list of at most {MAX_TO}"
    )
    subject: Line = ""
    text: str | None = Field(default=None, description="the text/plain part")
    html: str | None = Field(default=None, description="the text/html part")
    replyTo: Line | Annotated[list[Line], Field(max_length=MAX_TO)] | None = None
    headers: dict[str, Line] = Field(
        default_factory=dict,
        max_length=50,
        description="extra header fields; From, To, Subject, DKIM-Signature, "
        "List-Unsubscribe*, X-Atmos-* and the MIME structure's own are refused",
    )
    category: Tag | None = Field(
        default=None,
        description="transactional, login-link, password-reset, mfa-otp, verification: "
        "transactional (no unsubscribe header, suppression by unsubscribe bypassed); "
        "anything else, or none, is bulk",
    )
    tags: Annotated[list[Tag], Field(max_length=10)] = Field(default_factory=list)
    metadata: dict[str, str] = Field(
        default_factory=dict, description="string pairs, at most 1 KiB as JSON"
    )


class Rejected(BaseModel):
    recipient: str
    code: str
    reason: str


class AcceptedRecipient(BaseModel):
    recipient: str
    messageId: str


class SendResponse(BaseModel):
    id: str | None = Field(description="the queue id (null when nothing was queued)")
    messageId: str | None
    accepted: list[AcceptedRecipient]
    rejected: list[Rejected]


class Error(BaseModel):
    error: str
    code: str
    retryable: bool


class AttemptOut(BaseModel):
    at: float
    status: RecipientStatus
    code: str
    remote: str | None
    reply: str | None


class RecipientOut(BaseModel):
    recipient: str
    status: RecipientStatus
    attempts: list[AttemptOut] = Field(default_factory=list)


class MessageOut(BaseModel):
    id: str
    messageId: str
    status: RecipientStatus
    acceptedAt: float
    finishedAt: float | None
    deleted: str | None
    sender: str
    category: str
    tags: list[str]
    metadata: dict[str, str]
    size: int
    recipients: list[RecipientOut]


class MessagePage(BaseModel):
    messages: list[MessageOut]
    cursor: str | None = Field(description="pass as ?cursor= for the next page; null at the end")


class DomainOut(BaseModel):
    domain: str
    state: Literal["pending", "verified", "paused"]
    pausedReason: str | None = None


class ForwardToRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: str = Field(min_length=1, max_length=253)
    forward_to: str | None = Field(
        max_length=320,
        description="where replies to the domain go; null stops forwarding",
    )


class ForwardToOut(BaseModel):
    domain: str
    forward_to: str | None


class Window(BaseModel):
    limit: int
    used: int


class MemberStatusOut(BaseModel):
    did: str
    handle: str | None
    status: str
    reason: str | None
    labels: list[str]
    tier: str
    domains: list[DomainOut]
    hourly: Window
    daily: Window


class Deliverability(BaseModel):
    did: str
    status: str
    sent_14d: int
    bounced_14d: int
    complaints_14d: int
    bounce_rate: float
    daily_sends: list[int] = Field(description="14 days of sends, oldest first, today last")
    hourly_limit: int
    daily_limit: int
    labels: list[str]


class Health(BaseModel):
    status: str
    problems: list[str] = Field(default_factory=list)
