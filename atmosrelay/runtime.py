"""run_relay(config): startup order, signals, drain.

The nursery tree grows with the relay (ARCHITECTURE.md section 6). Today it is its root:

    trio.run(run_relay)
    └── journal (recovery finishes before anything else starts; closes last)
        (before it: the operator's DKIM key is generated if missing)
        └── signal watcher (SIGTERM/SIGINT -> shut down)

Later issues add the delivery dispatcher, the SMTP listeners and the HTTP API inside the
journal's block, so that on shutdown they stop first and the journal closes last.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import trio

from atmosrelay.accounts.dkim_keys import ensure_operator_key
from atmosrelay.config import Config
from journal import Journal, RecoveryReport, open_journal

log = logging.getLogger("atmosrelay")

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def describe_recovery(directory: str, report: RecoveryReport) -> str:
    text = (
        f"journal at {directory}: {report.segments} segment(s), {report.records} record(s), "
        f"{report.bytes} bytes"
    )
    if report.torn is not None:
        text += (
            f"; repaired a torn tail in segment {report.torn.segment} at offset "
            f"{report.torn.offset} ({report.torn.length} bytes never acknowledged, "
            f"saved to {report.broken_path})"
        )
    return text


async def run_relay(
    config: Config,
    *,
    announce: Callable[[str], None] = print,
    task_status: trio.TaskStatus[Journal] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down in order.

    Raises ``journal.CorruptJournalError`` (before anything listens) when the journal holds
    damaged acknowledged records, and ``journal.JournalFatalError`` when the disk fails.
    """
    directory = str(config.journal_dir)
    operator, created = await trio.to_thread.run_sync(
        ensure_operator_key, config.dkim_dir, config["operator.domain"]
    )
    if created:
        announce(
            f"generated the operator DKIM key for d={operator.domain}; publish "
            f"{operator.selector}._domainkey.{operator.domain} TXT "
            f'"v=DKIM1; k=rsa; p={operator.key.public_b64}"'
        )
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        async with open_journal(
            directory,
            segment_size=config["journal.segment_size"],
            max_record_size=config["journal.max_record_size"],
        ) as journal:
            announce(describe_recovery(directory, journal.recovery))
            announce("ready; SIGTERM or Ctrl-C stops")
            task_status.started(journal)
            async for signum in signals:
                announce(f"{signal.Signals(signum).name} received; shutting down")
                break
    announce("journal closed; stopped")
