"""The delivery side of the relay, made from its config: the dispatcher and the delivery
processes (``delivery.processes``; docs/delivery.md)."""

from __future__ import annotations

from collections.abc import Sequence

from atmosrelay.accounts.dkim_keys import OperatorKey
from atmosrelay.accounts.identity import DnsSettings
from atmosrelay.accounts.store import Store
from atmosrelay.config import Config
from atmosrelay.delivery.backoff import RetryPolicy
from atmosrelay.delivery.courier import CourierSettings, client_context
from atmosrelay.delivery.courier_link import CourierLink
from atmosrelay.delivery.dispatcher import DeliverySettings, Dispatcher
from atmosrelay.delivery.forked import Forked
from atmosrelay.delivery.prepare import Preparer
from atmosrelay.delivery.resolver import DnsResolver
from atmosrelay.inbound import return_path
from atmosrelay.queue.store import QueueStore
from journal import FS


def make_dispatcher(
    config: Config,
    store: Store,
    queue: QueueStore,
    operator: OperatorKey,
    unsubscribe_secret: bytes,
    couriers: CourierLink | None = None,
) -> Dispatcher:
    """The dispatcher; it carries attempts through ``couriers`` when given, else in this
    process."""
    hostname = config.smtp.hostname
    operator_domain = config.operator.domain
    unsubscribe_url = config.delivery.unsubscribe_url or f"https://{operator_domain}"
    settings = DeliverySettings(
        helo=config.delivery.helo or hostname,
        tls=client_context(config.delivery.tls_verify, config.delivery.ca_file),
        operator_domain=operator_domain,
        policy=RetryPolicy(
            initial=config.delivery.retry_initial,
            cap=config.delivery.retry_cap,
            max_age=config.delivery.max_age,
            delay_warning=config.delivery.delay_warning or None,
        ),
        concurrency=config.delivery.concurrency,
        require_tls=config.delivery.require_tls,
        chunking=config.delivery.chunking,
        idle=config.delivery.idle,
        restart_spread=config.delivery.restart_spread,
        return_path=return_path(config, unsubscribe_secret) if config.inbound.verp else None,
    )
    resolver = DnsResolver(
        DnsSettings(nameservers=config.dns.nameservers, timeout=config.dns.timeout),
        smarthost=config.delivery.smarthost,
        port=config.delivery.port,
    )
    prepare = Preparer(
        store,
        operator,
        unsubscribe_secret=unsubscribe_secret,
        unsubscribe_url=unsubscribe_url,
    )
    return Dispatcher(queue, resolver, settings, prepare=prepare, carrier=couriers)


def make_couriers(
    config: Config, fs: FS | None, forked: Sequence[Forked] = ()
) -> CourierLink | None:
    """The delivery processes ``delivery.processes`` asks for (none when the journal is on
    a file system of the caller's: only tests give one, and a delivery process reads the
    journal from disk); ``forked``: the ones the serve command forked for them."""
    if not (config.delivery.enabled and config.delivery.processes) or fs is not None:
        return None
    operator_domain = config.operator.domain
    return CourierLink(
        CourierSettings(
            journal_dir=str(config.journal_dir.resolve()),
            max_record_size=config.journal.max_record_size,
            accounts_db=str(config.accounts_db.resolve()),
            dkim_dir=str(config.dkim_dir.resolve()),
            operator_domain=operator_domain,
            unsubscribe_key=str((config.data_dir / "unsubscribe.key").resolve()),
            unsubscribe_url=config.delivery.unsubscribe_url or f"https://{operator_domain}",
            helo=config.delivery.helo or config.smtp.hostname,
            tls_verify=config.delivery.tls_verify,
            ca_file=config.delivery.ca_file,
            chunking=config.delivery.chunking,
            log_level=config.relay.log_level,
            log_format=config.relay.log_format,
        ),
        config.delivery.processes,
        forked,
    )
