"""``atmosrelay inbound list``: what the inbound listener received, newest first.

It reads the account store's inbound log (a second reader beside a running relay is
safe: SQLite, WAL), so it works whether the relay runs or not.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import attrs

from atmosrelay._text import print_error, printable
from atmosrelay.accounts.store import Store
from atmosrelay.config import ConfigError, load_config
from atmosrelay.inbound.processor import KINDS

EXIT_USAGE = 64


def cmd_list(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print_error(str(exc))
        return EXIT_USAGE
    store = Store(config.accounts_db)
    try:
        rows = store.inbound(kind=args.kind, did=args.did, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps([attrs.asdict(r, filter=_no_bytes) for r in rows], indent=2))
        return 0
    if not rows:
        print("nothing received" + (f" of kind {args.kind}" if args.kind else ""))
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.received_at))
        who = f" {r.did}" if r.did else ""
        print(
            f"{r.id}  {when}Z  {r.kind:<11} from <{printable(r.sender)}>{who}: "
            f"{printable(r.summary)}"
        )
    return 0


def _no_bytes(attribute: Any, value: object) -> bool:
    return bool(attribute.name != "message")


def register(sub: Any) -> None:
    inbound = sub.add_parser("inbound", help="what the inbound listener received")
    ins = inbound.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ins.add_parser("list", help="bounces, complaints, replies and the rest, newest first")
    p.add_argument("--kind", choices=KINDS, help="only this kind")
    p.add_argument("--did", help="only what was attributed to this member")
    p.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    p.add_argument("--config", help="TOML config file (default: $ATMOSRELAY_CONFIG)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
