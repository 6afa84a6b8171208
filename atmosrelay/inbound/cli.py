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

from atmosrelay._text import printable
from atmosrelay.accounts._cli_common import common_options, with_store
from atmosrelay.accounts.store import Store
from atmosrelay.config import Config
from atmosrelay.inbound.processor import KINDS


def inbound_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    rows = store.inbound(kind=args.kind, did=args.did, limit=args.limit)
    if args.json:
        print(json.dumps([attrs.asdict(r, filter=_no_bytes) for r in rows], indent=2))
        return
    if not rows:
        print("nothing received" + (f" of kind {args.kind}" if args.kind else ""))
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.received_at))
        who = f" {r.did}" if r.did else ""
        print(
            f"{r.id}  {when}Z  {r.kind:<11} from <{printable(r.sender)}>{who}: "
            f"{printable(r.summary)}"
        )


def _no_bytes(attribute: Any, value: object) -> bool:
    return bool(attribute.name != "message")


def register(sub: Any) -> None:
    inbound = sub.add_parser("inbound", help="what the inbound listener received")
    ins = inbound.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = common_options(
        ins.add_parser("list", help="bounces, complaints, replies and the rest, newest first")
    )
    p.add_argument("--kind", choices=KINDS, help="only this kind")
    p.add_argument("--did", help="only what was attributed to this member")
    p.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    p.set_defaults(func=with_store(inbound_list))
