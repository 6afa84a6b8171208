"""``atmosrelay queue list|show|retry|delete``.

``list`` and ``show`` read the journal without repairing anything, so they work beside a
running relay (a message being written may not show yet) and on a journal the relay refused
to open. ``retry`` and ``delete`` change the queue, so they ask the running relay, which owns
the journal, over its control socket (``atmosrelay/control.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import attrs

from atmosrelay._text import print_error
from atmosrelay.config import ConfigError, load_config
from atmosrelay.control import ControlError, call, socket_path
from atmosrelay.queue.state import QueuedMessage, fold
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
    directory = str(config.journal_dir)
    try:
        records = read_records(directory, max_record_size=config["journal.max_record_size"])
    except FileNotFoundError:
        return {}
    except CorruptJournalError as exc:
        print(f"atmosrelay: {exc}; see 'atmosrelay journal check {directory}'", file=sys.stderr)
        return 2
    return fold(records).messages


def cmd_list(args: argparse.Namespace) -> int:
    messages = _load(args)
    if isinstance(messages, int):
        return messages
    rows = sorted((_row(m) for m in messages.values()), key=lambda r: r["accepted_at"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("the queue is empty")
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
        print(f"atmosrelay: no message {args.id} in the queue or the status index", file=sys.stderr)
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
        "record": attrs.asdict(m.record),
        "history": [attrs.asdict(d) for d in m.history],
        "next_attempt": m.next_at,
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


def _control(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any] | int:
    try:
        config = load_config(args.config)
        return call(socket_path(config.data_dir), request)
    except ConfigError as exc:
        print_error(str(exc))
        return 64
    except ControlError as exc:
        print_error(str(exc))
        return 1


def cmd_retry(args: argparse.Namespace) -> int:
    if bool(args.id) == args.all:
        print("atmosrelay: give a queue id or --all (not both)", file=sys.stderr)
        return 64
    reply = _control(args, {"cmd": "retry", "id": args.id, "all": args.all})
    if isinstance(reply, int):
        return reply
    if args.json:
        print(json.dumps(reply))
    else:
        print(f"{reply['recipients']} recipient(s) due now")
        if not reply.get("delivering"):
            print("note: delivery is disabled (delivery.enabled = false)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    reply = _control(args, {"cmd": "delete", "id": args.id, "reason": args.reason})
    if isinstance(reply, int):
        return reply
    print(json.dumps(reply) if args.json else f"{args.id} deleted")
    return 0


def register(sub: Any) -> None:
    queue = sub.add_parser("queue", help="the mail queue")
    qs = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = qs.add_parser("retry", help="make a message (or --all) due now (running relay)")
    p.add_argument("id", nargs="?")
    p.add_argument("--all", action="store_true", help="every queued message")
    p = qs.add_parser("delete", help="remove a message, with a record (running relay)")
    p.add_argument("id")
    p.add_argument("--reason", default="deleted by the operator")
    for name, fn in (("retry", cmd_retry), ("delete", cmd_delete)):
        p = qs.choices[name]
        p.add_argument("--config", help="TOML config file (default: $ATMOSRELAY_CONFIG)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)
    for name, fn, helptext in (
        ("list", cmd_list, "every queued message"),
        ("show", cmd_show, "one message"),
    ):
        p = qs.add_parser(name, help=helptext)
        if name == "show":
            p.add_argument("id")
        p.add_argument("--config", help="TOML config file (default: $ATMOSRELAY_CONFIG)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)
