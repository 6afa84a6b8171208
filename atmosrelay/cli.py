"""The ``atmosrelay`` command line.

    atmosrelay serve [--config FILE]           run the relay until SIGTERM/SIGINT
    atmosrelay journal check DIR [--json]      verify every frame (exit 0 ok, 1 torn, 2 corrupt)
    atmosrelay journal dump DIR [--json]       one line per record: seq, type, position, size
    atmosrelay config defaults                 print the embedded default config
    atmosrelay member|domain|key|suppression   operator commands (atmosrelay/accounts/cli.py)
    atmosrelay queue list|show ID [--json]     the queue, read from the journal (read-only)

Human output by default, ``--json`` for scripts. Every refusal is one line on stderr that says
what is wrong and what to do, with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import trio
from tqdm import tqdm

from atmosrelay import __version__, logs
from atmosrelay._files import DataDirLocked
from atmosrelay._text import print_error
from atmosrelay.accounts.cli import register as register_accounts
from atmosrelay.config import DEFAULTS_TOML, Config, ConfigError, load_config
from atmosrelay.crashtest import register as register_crashtest
from atmosrelay.delivery.forked import fork_couriers, release
from atmosrelay.inbound.cli import register as register_inbound
from atmosrelay.queue.checkpoint import CheckpointUnusable
from atmosrelay.queue.cli import register as register_queue
from atmosrelay.queue.records import RecordError
from atmosrelay.runtime import ListenError, run_relay
from atmosrelay.server.workers import fork_session_processes
from journal import CorruptJournalError, JournalError, check_journal, dump_journal

EXIT_USAGE = 64  # sysexits EX_USAGE: bad config or arguments
EXIT_CORRUPT = 2


_err = print_error


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [error]


def _run_unwrapped(config: Config) -> None:
    """Run the relay; an error that stopped it alone comes out of trio's exception groups as
    itself, so the handlers below can say what it means.

    The delivery processes are forked here, before the event loop and its threads exist:
    each starts with this process's modules loaded (delivery/forked.py)."""
    forked = fork_couriers(config.delivery.processes if config.delivery.enabled else 0)
    sessions = fork_session_processes(config)  # server/workers.py
    try:
        trio.run(
            lambda: run_relay(
                config, announce=logs.announce, forked=forked, session_processes=sessions
            )
        )
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from None
        raise
    finally:
        release([*sessions, *forked])  # the ones a failed start never took over


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    logs.configure(config.relay.log_level, config.relay.log_format)
    logs.announce(f"config: {config.source}; data directory {config.data_dir}")
    try:
        _run_unwrapped(config)
    except CorruptJournalError as exc:
        _err(f"{exc}")
        _err(
            f"refusing to start: acknowledged mail may be damaged. Inspect it with "
            f"'atmosrelay journal check {config.journal_dir}'; nothing was modified."
        )
        return EXIT_CORRUPT
    except RecordError as exc:
        _err(f"refusing to start: {exc}")
        _err(f"inspect it with 'atmosrelay journal dump {config.journal_dir}'")
        return EXIT_CORRUPT
    except JournalError as exc:
        _err(f"journal failure: {exc}")
        _err(
            "nothing acknowledged is lost; mend the cause (disk space, permissions on "
            f"{config.journal_dir}) and start again"
        )
        return 1
    except DataDirLocked as exc:
        _err(f"refusing to start: {exc}")
        return 1
    except CheckpointUnusable as exc:  # its chunks are decoded after delivery has begun
        _err(f"stopped: the queue checkpoint is unusable ({exc}); it was removed")
        _err("nothing is lost: start again, and the start folds the whole journal")
        return 1
    except ListenError as exc:
        _err(f"refusing to start: {exc}")
        return 1
    return 0


def cmd_journal_check(args: argparse.Namespace) -> int:
    # a bar on a terminal for a journal of many segments (tqdm is silent when not a TTY)
    with tqdm(unit="segment", disable=None, file=sys.stderr, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            report = check_journal(args.dir, progress=progress)
        except FileNotFoundError:
            report = None
    if report is None:
        _err(f"no journal directory at {args.dir} (a relay's is <data_dir>/journal)")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return report.exit_code
    print(f"journal {args.dir}")
    for seg in report.segments:
        seqs = "" if seg.first_seq is None else f" seq {seg.first_seq}..{seg.last_seq}"
        print(f"  segment {seg.number}: {seg.records} records, {seg.bytes} bytes{seqs}")
    print(
        f"  total: {len(report.segments)} segments, {report.records} records, {report.bytes} bytes"
    )
    if report.broken_files:
        print(f"  saved torn tails: {', '.join(report.broken_files)}")
    if report.corruption is not None:
        c = report.corruption
        print(f"CORRUPT: segment {c.segment} at offset {c.offset}: {c.reason}")
    elif report.torn is not None:
        t = report.torn
        print(
            f"TORN TAIL: segment {t.segment} at offset {t.offset}, {t.length} bytes never "
            "acknowledged; the next start saves them to .broken and truncates"
        )
    else:
        print("healthy")
    return report.exit_code


def cmd_journal_dump(args: argparse.Namespace) -> int:
    try:
        for line in dump_journal(args.dir):
            if args.json:
                print(
                    json.dumps(
                        {
                            "seq": line.seq,
                            "type": line.type,
                            "segment": line.position.segment,
                            "offset": line.position.offset,
                            "size": line.size,
                        }
                    )
                )
            else:
                print(f"{line.seq}\ttype={line.type}\t{line.position}\t{line.size}")
    except FileNotFoundError:
        _err(f"no journal directory at {args.dir} (a relay's is <data_dir>/journal)")
        return EXIT_USAGE
    except CorruptJournalError as exc:
        _err(f"{exc}; 'atmosrelay journal check {args.dir}' says what is damaged")
        return EXIT_CORRUPT
    return 0


def cmd_config_defaults(args: argparse.Namespace) -> int:
    print(DEFAULTS_TOML, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atmosrelay", description="SMTP submission relay for atproto identities."
    )
    parser.add_argument("--version", action="version", version=f"atmosrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the relay until SIGTERM or SIGINT")
    serve.add_argument("--config", help="TOML config file (default: $ATMOSRELAY_CONFIG)")
    serve.set_defaults(func=cmd_serve)

    journal = sub.add_parser("journal", help="inspect a journal directory (read-only)")
    jsub = journal.add_subparsers(dest="journal_command", required=True, metavar="ACTION")
    check = jsub.add_parser("check", help="verify every frame; exit 0 ok, 1 torn, 2 corrupt")
    check.add_argument("dir")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_journal_check)
    dump = jsub.add_parser("dump", help="one line per record: seq, type, position, size")
    dump.add_argument("dir")
    dump.add_argument("--json", action="store_true")
    dump.set_defaults(func=cmd_journal_dump)

    register_accounts(sub)
    register_queue(sub)
    register_inbound(sub)
    register_crashtest(sub)

    config = sub.add_parser("config", help="configuration helpers")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    defaults = csub.add_parser("defaults", help="print the embedded default config")
    defaults.set_defaults(func=cmd_config_defaults)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`queue list | head`): not an error, nothing to tell it.
        # Point stdout at /dev/null so the interpreter's own flush at exit stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
