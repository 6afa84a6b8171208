"""The relay's MX: what comes back after delivery (docs/inbound.md).

addresses.py   the VERP return path, SRS, the unsubscribe mailto: tokens and checks
session.py     the inbound listener's SMTP session: only our own addresses, 250 after
               the INBOUND record's fsync
reports.py     what a message says (DSN, ARF, plain), with the standard library's parser
processor.py   from the durable record to events, suppressions, forwards and the log
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from atmosrelay.config import Config
from atmosrelay.inbound.addresses import ReturnPath, Srs, derive_key
from atmosrelay.inbound.processor import InboundProcessor
from atmosrelay.inbound.session import InboundSettings
from atmosrelay.queue.status import StatusIndex
from atmosrelay.queue.store import QueueStore
from atmosrelay.server.context import SessionContext


def return_path(config: Config, secret: bytes) -> ReturnPath:
    return ReturnPath(derive_key(secret, "verp"), config.operator.domain.lower())


def make_inbound(
    config: Config,
    ctx: SessionContext,
    status: StatusIndex,
    secret: bytes,
    commit_policy: Callable[[], Awaitable[None]],
) -> tuple[InboundSettings, InboundProcessor]:
    """The inbound sessions' settings and the processor, from the config."""
    domain = config.operator.domain.lower()
    settings = InboundSettings(
        operator_domain=domain,
        return_path=return_path(config, secret),
        srs=Srs(derive_key(secret, "srs"), domain),
        store=ctx.store,
        role_addresses=config.inbound.role_addresses,
        role_forward=config.inbound.role_forward,
        hourly_per_ip=config.inbound.hourly_per_ip,
    )
    assert isinstance(ctx.queue, QueueStore)  # inbound runs in the owner: the queue itself
    processor = InboundProcessor(
        ctx.queue,
        ctx.store,
        status,
        return_path=settings.return_path,
        srs=settings.srs,
        unsubscribe_secret=secret,
        hostname=config.smtp.hostname,
        commit_policy=commit_policy,
        members_changed=ctx.keys.changed,
        retention=config.inbound.retention,
    )
    return settings, processor
