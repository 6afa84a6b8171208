"""``atmosrelay queue list|show|retry|delete``.

``list`` shows the live messages (a recipient not yet sent, bounced or suppressed); ``--all``
adds the finished ones the journal still holds; ``--state``, ``--did``, ``--domain`` (the
sender's), ``--since`` and ``--limit`` narrow it. ``retry`` and ``delete`` take one id or the
same filters; more than one message needs a yes (``--yes`` in scripts).

``list`` and ``show`` read the journal without repairing anything, so they work beside a
running relay (a message being written may not show yet) and on a journal the relay refused
to open. ``retry`` and ``delete`` change the queue, so they ask the running relay, which owns
the journal, over its control socket (``atmosrelay/control.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Final

import attrs
from tqdm import tqdm

from atmosrelay._text import print_error
from atmosrelay.config import Config, ConfigError, load_config
from atmosrelay.control import ControlError, call, socket_path
from atmosrelay.queue.records import RecipientState, as_dict
from atmosrelay.queue.state import QueuedMessage, domain_of, fold
from atmosrelay.queue.status import StatusIndex
from journal import CorruptJournalError, read_records


def _row(m: QueuedMessage) -> dict[str, Any]:
    r = m.record
    return {
        "id": r.id,
        "accepted_at": r.accepted_at,
        "did": r.did,
        "sender": r.sender,
        "recipients": [{"address": a, "state": s} for a, s in m.recipient_states.items()],
        "category": r.category,
        "size": r.size,
        "position": str(m.position),
    }


def _load(args: argparse.Namespace) -> dict[str, QueuedMessage] | int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print_error(str(exc))
        return 64
    return read_queue(config)


def read_queue(config: Config) -> dict[str, QueuedMessage] | int:
    """The queue as the journal holds it (read-only), or an exit status after saying why."""
    directory = str(config.journal_dir)
    try:
        records = read_records(directory, max_record_size=config.journal.max_record_size)
    except FileNotFoundError:
        return {}
    except CorruptJournalError as exc:
        print(f"atmosrelay: {exc}; see 'atmosrelay journal check {directory}'", file=sys.stderr)
        return 2
    return fold(records).messages


_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """``--since``: a duration back from now (``90s``, ``30m``, ``2h``, ``7d``) or a UTC date
    or time (``2026-11-27``, ``2026-11-27T08:00``). Raises ValueError saying what it takes."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if found:
        return now - float(found.group(1)) * _UNITS[found.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a duration (90s, 30m, 2h, 7d) or a UTC date or time "
            "(2026-11-27, 2026-11-27T08:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def select(
    messages: dict[str, QueuedMessage], args: argparse.Namespace, now: float
) -> list[QueuedMessage]:
    """The messages the filters name, oldest first (``--limit`` keeps the oldest)."""
    since = parse_since(args.since, now) if args.since else None
    everything = args.all or args.state is not None
    domain = args.domain.lower().rstrip(".") if args.domain else None
    chosen = [
        m
        for m in messages.values()
        if (everything or not m.terminal)
        and (args.state is None or args.state in m.recipient_states.values())
        and (args.did is None or m.record.did == args.did)
        and (domain is None or domain_of(m.record.sender) == domain)
        and (since is None or m.record.accepted_at >= since)
    ]
    chosen.sort(key=lambda m: m.record.accepted_at)
    return chosen[: args.limit] if args.limit else chosen


def cmd_list(args: argparse.Namespace) -> int:
    messages = _load(args)
    if isinstance(messages, int):
        return messages
    try:
        chosen = select(messages, args, time.time())
    except ValueError as exc:
        print_error(str(exc))
        return 64
    rows = [_row(m) for m in chosen]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(
            "the queue is empty"
            if not messages
            else "no message matches (finished ones are shown with --all)"
        )
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["accepted_at"]))
        rcpts = ", ".join(f"{x['address']} ({x['state']})" for x in r["recipients"])
        print(f"{r['id']}  {when}  {r['sender']} -> {rcpts}  {r['size']} bytes")
    return 0


def _show_from_index(args: argparse.Namespace) -> int:
    """A message the journal no longer holds (finished and compacted): the status index
    remembers it for ``http.status_retention``."""
    config = load_config(args.config)
    found = None
    if config.status_db.exists():
        index = StatusIndex(config.status_db)
        try:
            found = index.lookup(args.id)
        finally:
            index.close()
    if found is None:
        print(
            f"atmosrelay: no message {args.id} in the queue or the status index "
            "('atmosrelay queue list --all' lists what there is)",
            file=sys.stderr,
        )
        return 1
    data = attrs.asdict(found)
    if args.json:
        print(json.dumps({**data, "source": "status index"}, indent=2))
        return 0
    print(f"message {found.id} (finished; from the status index, the journal no longer holds it)")
    for key in ("did", "sender", "category", "size", "status"):
        print(f"  {key}: {data[key]}")
    for address, state in found.recipients.items():
        print(f"  recipient {address}: {state}")
    for a in found.attempts:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a.at))
        print(f"  {stamp} {a.recipient}: {a.status} via {a.mta or '-'}: {a.reply or a.code}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    messages = _load(args)
    if isinstance(messages, int):
        return messages
    m = messages.get(args.id)
    if m is None:
        return _show_from_index(args)
    data = {
        **_row(m),
        "record": as_dict(m.record),
        "history": as_dict(m.history),
        "next_attempt": dict(m.next_at),
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"message {m.id}")
    for key in ("did", "sender", "category", "size", "position"):
        print(f"  {key}: {data[key]}")
    print(f"  tags: {', '.join(m.record.tags) or '-'}")
    print(f"  client: {m.record.client}")
    for x in data["recipients"]:
        retry = m.next_at.get(x["address"])
        when = (
            f", next attempt {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(retry))}"
            if retry
            else ""
        )
        print(f"  recipient {x['address']}: {x['state']}{when}")
    for d in m.history:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.at))
        for o in d.outcomes:
            print(
                f"  {stamp} {o.recipient} attempt {o.attempt}: {o.outcome} "
                f"via {d.mta or '-'}: {o.reply or o.status}"
            )
    return 0


def _control(path: Path, request: dict[str, Any], *, missing_ok: bool) -> dict[str, Any] | int:
    try:
        return call(path, request)
    except ControlError as exc:
        if missing_ok and str(exc).startswith("no message "):
            return {"ok": False, "error": str(exc)}
        print_error(str(exc))
        return 1


def _targets(args: argparse.Namespace, verb: str) -> list[str] | int:
    """The queue ids ``retry``/``delete`` act on: the one given, or the filters' selection
    (read from the journal), confirmed when more than one."""
    filters = any((args.all, args.state, args.did, args.domain, args.since, args.limit is not None))
    if bool(args.id) == filters:
        print_error(
            f"give a queue id, or filters (--all, --state, --did, --domain, --since, "
            f"--limit), not both; e.g. 'atmosrelay queue {verb} --domain example.org'"
        )
        return 64
    if args.id:
        return [args.id]
    messages = _load(args)
    if isinstance(messages, int):
        return messages
    try:
        chosen = [m.id for m in select(messages, args, time.time())]
    except ValueError as exc:
        print_error(str(exc))
        return 64
    if len(chosen) > 1 and not args.yes:
        if not sys.stdin.isatty():
            print_error(
                f"{len(chosen)} messages match; add --yes to {verb} them all without asking"
            )
            return 64
        answer = input(f"{verb} {len(chosen)} messages? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print_error("nothing done")
            return 1
    return chosen


def _each(args: argparse.Namespace, ids: list[str], request: dict[str, Any]) -> list[Any] | int:
    """One control call per id, with progress on a terminal; stops at the first error that
    is not "no such message" (which a message finishing meanwhile may give)."""
    try:
        path = socket_path(load_config(args.config).data_dir)
    except ConfigError as exc:
        print_error(str(exc))
        return 64
    replies: list[Any] = []
    with tqdm(ids, unit="msg", disable=None if len(ids) > 1 else True, file=sys.stderr) as bar:
        for queue_id in bar:
            reply = _control(path, {**request, "id": queue_id}, missing_ok=len(ids) > 1)
            if isinstance(reply, int):
                return reply
            replies.append(reply)
    return replies


def _nothing(args: argparse.Namespace) -> int:
    print(json.dumps({"ok": True, "messages": 0}) if args.json else "no message matches")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    ids = _targets(args, "retry")
    if isinstance(ids, int):
        return ids
    if not ids:
        return _nothing(args)
    replies = _each(args, ids, {"cmd": "retry"})
    if isinstance(replies, int):
        return replies
    done = [r for r in replies if r.get("ok")]
    count = sum(r["recipients"] for r in done)
    delivering = all(r.get("delivering") for r in done)
    if args.json:
        print(json.dumps({"ok": True, "messages": len(done), "recipients": count}))
    else:
        print(f"{count} recipient(s) of {len(done)} message(s) due now")
        if done and not delivering:
            print("note: delivery is disabled (delivery.enabled = false)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    ids = _targets(args, "delete")
    if isinstance(ids, int):
        return ids
    if not ids:
        return _nothing(args)
    replies = _each(args, ids, {"cmd": "delete", "reason": args.reason})
    if isinstance(replies, int):
        return replies
    deleted = [i for i, r in zip(ids, replies, strict=True) if r.get("ok")]
    if args.json:
        print(json.dumps({"ok": True, "deleted": deleted}))
    elif len(ids) == 1:
        print(f"{ids[0]} deleted")
    else:
        print(f"{len(deleted)} message(s) deleted")
    return 0


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="finished messages too")
    p.add_argument(
        "--state",
        choices=[str(s) for s in RecipientState],
        help="with a recipient in this state (finished ones included)",
    )
    p.add_argument("--did", help="from this member")
    p.add_argument("--domain", help="from this sender domain")
    p.add_argument("--since", help="accepted since: 2h, 7d, 2026-11-27, 2026-11-27T08:00")
    p.add_argument("--limit", type=int, help="at most this many (the oldest)")


def register(sub: Any) -> None:
    queue = sub.add_parser("queue", help="the mail queue")
    qs = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = qs.add_parser("retry", help="make messages due now (running relay)")
    p = qs.add_parser("delete", help="remove messages, with a record (running relay)")
    p.add_argument("--reason", default="deleted by the operator")
    for name, fn in (("retry", cmd_retry), ("delete", cmd_delete)):
        p = qs.choices[name]
        p.add_argument("id", nargs="?", help="one queue id (or filters)")
        _filters(p)
        p.add_argument("--yes", action="store_true", help="act on several without asking")
        p.add_argument("--config", help="TOML config file (default: $ATMOSRELAY_CONFIG)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)
    for name, fn, helptext in (
        ("list", cmd_list, "the live messages (--all: finished ones too)"),
        ("show", cmd_show, "one message"),
    ):
        p = qs.add_parser(name, help=helptext)
        if name == "show":
            p.add_argument("id")
        else:
            _filters(p)
        p.add_argument("--config", help="TOML config file (default: $ATMOSRELAY_CONFIG)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)
