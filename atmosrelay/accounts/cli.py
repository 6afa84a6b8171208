"""Operator commands: members, domains, API keys, suppressions.

    atmosrelay member add DID --handle HANDLE [--without-dns]
    atmosrelay member list | show DID | unsuspend DID
    atmosrelay member suspend DID --reason R | remove DID --reason R
    atmosrelay member limits DID [--hourly N] [--daily N] [--reset]
    atmosrelay member label add|remove DID LABEL
    atmosrelay domain add DID DOMAIN        prints the TXT challenge to publish
    atmosrelay domain verify DOMAIN [--without-dns]
    atmosrelay domain list [DID] | records DOMAIN | unpause DOMAIN
    atmosrelay key issue DID | list DID | revoke KEYID
    atmosrelay suppression list DID | add DID ADDRESS | remove DID ADDRESS

Every command takes ``--config`` and ``--json``. Every refusal is one line on stderr with a
non-zero exit: 65 for input that is malformed (a DID, handle, domain), 1 for a request the
state refuses (unknown member, domain taken or limit reached, DNS record missing or wrong,
revoked key), 64 for a bad config.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio

from atmosrelay.accounts import api_keys, domains
from atmosrelay.accounts._cli_common import (
    EXIT_INVALID,
    Refused,
    check_dns,
    common_options,
    did_of,
    dns_settings,
    out,
    with_store,
)
from atmosrelay.accounts.dkim_cli import register as register_dkim
from atmosrelay.accounts.identity import (
    HandleResolver,
    InvalidHandle,
    ResolutionError,
    normalize_handle,
)
from atmosrelay.accounts.store import Domain, Store
from atmosrelay.config import Config
from atmosrelay.policy.counters import Counters
from atmosrelay.policy.limits import DAY, HOUR, limits_for, recipients_key
from atmosrelay.policy.member import SHADOW_PREFIX
from atmosrelay.submission.members import load_snapshot

_LABEL = re.compile(r"(shadow:)?[A-Za-z0-9_-]{1,64}")


def _member_json(m: Any) -> dict[str, Any]:
    return attrs.asdict(m)


def domain_json(d: Domain) -> dict[str, Any]:
    return {k: v for k, v in attrs.asdict(d).items() if "private" not in k}


# -- members ------------------------------------------------------------------------------
def member_add(args: argparse.Namespace, config: Config, store: Store) -> None:
    did = did_of(args.did)
    try:
        handle = normalize_handle(args.handle)
    except InvalidHandle as exc:
        raise Refused(str(exc), EXIT_INVALID) from None
    if args.without_dns:
        print(f"warning: {handle} was not checked against DNS (--without-dns)", file=sys.stderr)
    else:
        resolver = HandleResolver(dns_settings(config), https=config.dns.https_handle_resolution)
        try:
            claimed = trio.run(resolver.resolve, handle)
        except ResolutionError as exc:
            raise Refused(
                f"cannot confirm {handle} belongs to {did}: {exc} "
                '(publish _atproto TXT "did=..." or use --without-dns for local testing)'
            ) from None
        if claimed != did:
            raise Refused(
                f"{handle} resolves to {claimed}, not {did}: check the handle, or add the "
                f"member {claimed} it names"
            )
    member = store.add_member(did, handle)
    out(args, _member_json(member), f"member {did} added with handle {handle}")


def member_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    members = store.members()
    lines = [f"{m.did}  {m.status:<9}  {', '.join(m.handles) or '-'}" for m in members] or [
        "no members yet"
    ]
    out(args, [_member_json(m) for m in members], "\n".join(lines))


def _standing(config: Config, store: Store, did: str) -> dict[str, Any]:
    """Where a member stands against its limits now: its tier, the limits, the recipients
    counted in the last hour and day (as the relay last wrote them, at most
    ``policy.counter_flush`` seconds ago)."""
    snapshot = load_snapshot(store, did)
    assert snapshot is not None
    settings = config.policy
    now = time.time()
    limits = limits_for(snapshot, now, settings)
    counters = Counters()
    for key, start, n in store.counts_since(now - DAY - counters.bucket, subject=did):
        counters.load(key, start, n)
    key = recipients_key(did)
    return {
        "tier": limits.tier,
        "hourly_limit": limits.hourly,
        "daily_limit": limits.daily,
        "custom_limits": limits.custom,
        "throttled": limits.throttled,
        "last_hour": counters.total(key, now, HOUR),
        "last_day": counters.total(key, now, DAY),
        "suspended": snapshot.suspended,
    }


def _domain_state(d: Domain) -> str:
    state = d.status
    if d.paused_reason is not None:
        state += f", paused: {d.paused_reason}"
    return state


def member_show(args: argparse.Namespace, config: Config, store: Store) -> None:
    m = store.member(did_of(args.did))
    doms = store.domains(m.did)
    keys = store.keys(m.did)
    standing = _standing(config, store, m.did)
    limits = (
        f"  limits: {standing['hourly_limit']}/hour, {standing['daily_limit']}/day "
        f"({standing['tier']}"
        + (", set by the operator" if standing["custom_limits"] else "")
        + (", halved: throttled" if standing["throttled"] else "")
        + ")"
    )
    human = "\n".join(
        [
            f"member {m.did}",
            f"  handles: {', '.join(m.handles) or '-'}",
            f"  status: {m.status}" + (f" ({m.status_reason})" if m.status_reason else ""),
            f"  labels: {', '.join(m.labels) or '-'}",
            limits,
            f"  sent: {standing['last_hour']} recipient(s) in the last hour, "
            f"{standing['last_day']} in the last day",
            f"  domains: {', '.join(f'{d.name} ({_domain_state(d)})' for d in doms) or '-'}",
            f"  keys: {sum(k.revoked_at is None for k in keys)} active, "
            f"{sum(k.revoked_at is not None for k in keys)} revoked",
        ]
    )
    data = {**_member_json(m), "standing": standing, "domains": [domain_json(d) for d in doms]}
    out(args, data, human)


def member_limits(args: argparse.Namespace, config: Config, store: Store) -> None:
    did = did_of(args.did)
    if args.reset:
        if args.hourly is not None or args.daily is not None:
            raise Refused(
                "--reset goes alone: it returns the member to its tier's limits", EXIT_INVALID
            )
        hourly, daily = None, None
    else:
        if args.hourly is None and args.daily is None:
            raise Refused("give --hourly N and/or --daily N (or --reset)", EXIT_INVALID)
        current = store.member(did)
        hourly = args.hourly if args.hourly is not None else current.hourly_limit
        daily = args.daily if args.daily is not None else current.daily_limit
    for name, value in (("--hourly", hourly), ("--daily", daily)):
        if value is not None and value < 1:
            raise Refused(
                f"{name} must be at least 1 (suspend the member to stop it)", EXIT_INVALID
            )
    m = store.set_limits(did, hourly, daily)
    standing = _standing(config, store, did)
    out(
        args,
        {**_member_json(m), "standing": standing},
        f"member {did}: {standing['hourly_limit']}/hour, {standing['daily_limit']}/day "
        f"({'set by the operator' if standing['custom_limits'] else standing['tier']}); "
        "a running relay applies it within a second",
    )


def member_label(args: argparse.Namespace, config: Config, store: Store) -> None:
    did = did_of(args.did)
    label = args.label.strip()
    if not _LABEL.fullmatch(label):
        raise Refused(
            f"{label!r} is not a label: letters, digits, '_', '-', optionally 'shadow:' first",
            EXIT_INVALID,
        )
    present = args.change == "add"
    m, changed = store.set_label(did, label, present)
    effect = _label_effect(label)
    verb = "added" if present else "removed"
    human = (
        f"label {label} {verb} for {did}"
        if changed
        else f"{did} already {'has' if present else 'lacks'} {label}"
    )
    out(args, {**_member_json(m), "changed": changed, "effect": effect}, f"{human}; {effect}")


def _label_effect(label: str) -> str:
    if label.startswith(SHADOW_PREFIX):
        return "a shadow label: recorded and shown, never enforced"
    return {
        "throttled": "halves the hourly limit",
        "highly_trusted": "skips the warming tiers",
        "auto_suspended": "suspends the member",
    }.get(label, "not a label the relay acts on: stored and shown only")


def _status(status: str, needs_reason: bool) -> Callable[[argparse.Namespace, Config, Store], None]:
    def run(args: argparse.Namespace, config: Config, store: Store) -> None:
        reason = (getattr(args, "reason", None) or "").strip() or None
        if needs_reason and not reason:
            raise Refused(
                f"give a --reason, e.g. 'atmosrelay member {args.action} {args.did} --reason "
                '"spam complaints"\': it is recorded and shown to the operator',
                EXIT_INVALID,
            )
        m = store.set_status(did_of(args.did), status, reason)
        out(args, _member_json(m), f"member {m.did} is now {m.status}")

    return run


# -- domains -------------------------------------------------------------------------------
def domain_add(args: argparse.Namespace, config: Config, store: Store) -> None:
    did = did_of(args.did)
    try:
        d = domains.enroll(
            store,
            did,
            args.domain,
            limit=config.accounts.max_domains_per_member,
            clock_now=store.clock(),
        )
    except domains.DomainError as exc:
        raise Refused(str(exc), EXIT_INVALID) from None
    name = domains.challenge_name(d.name)
    value = domains.VERIFY_PREFIX + d.challenge_token
    out(
        args,
        {**domain_json(d), "challenge": {"name": name, "type": "TXT", "value": value}},
        f"domain {d.name} enrolled for {did} (pending)\n"
        f"publish this record, then run 'atmosrelay domain verify {d.name}':\n"
        f'  {name}. IN TXT "{value}"',
    )


def _records(args: argparse.Namespace, config: Config, d: Domain) -> tuple[list[Any], str]:
    recs = domains.records_to_publish(d, spf_include=config.operator.spf_include or None)
    lines = [r.zone_line() + (f"    ; {r.note}" if r.note else "") for r in recs]
    return [attrs.asdict(r) for r in recs], "\n".join("  " + x for x in lines)


def domain_verify(args: argparse.Namespace, config: Config, store: Store) -> None:
    try:
        d = store.domain(domains.normalize_domain(args.domain))
    except domains.DomainError as exc:
        raise Refused(str(exc), EXIT_INVALID) from None
    check_dns(
        args,
        config,
        partial(domains.check_challenge, domain=d),
        skipped=f"{d.name} is marked verified WITHOUT a DNS check (--without-dns); "
        "use this only for local testing",
        refused=f"{d.name} not verified",
        then=f"publish {domains.challenge_name(d.name)} TXT "
        f'"{domains.VERIFY_PREFIX}{d.challenge_token}" and run this again (a resolver may '
        "keep the old answer for its TTL)",
    )
    d = store.mark_verified(d.name, without_dns=args.without_dns)
    data, lines = _records(args, config, d)
    how = " (without DNS)" if d.verified_without_dns else ""
    out(
        args,
        {**domain_json(d), "records": data},
        f"domain {d.name} verified{how} for {d.did}\npublish these records:\n{lines}",
    )


def domain_records(args: argparse.Namespace, config: Config, store: Store) -> None:
    name = args.domain.strip().lower()
    if name == config.operator.domain.lower():
        raise Refused(
            f"{name} is the operator's own domain: 'atmosrelay operator records' prints its records"
        )
    d = store.domain(name)
    data, lines = _records(args, config, d)
    rotating = domains.next_dkim_records(d)
    if rotating:
        data += [{**attrs.asdict(r), "note": "rotation: not signing yet"} for r in rotating]
        lines += "\n" + "\n".join(
            f"  {r.zone_line()}    ; the rotation's new key: publish, then "
            f"'atmosrelay domain rotate-dkim {d.name} --activate'"
            for r in rotating
        )
    out(args, data, lines)


def domain_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    ds = store.domains(did_of(args.did) if args.did else None)
    lines = [
        f"{d.name}  {_domain_state(d)}{' (without DNS)' if d.verified_without_dns else ''}  {d.did}"
        for d in ds
    ] or ["no domains yet"]
    out(args, [domain_json(d) for d in ds], "\n".join(lines))


# -- keys --------------------------------------------------------------------------------------
def key_issue(args: argparse.Namespace, config: Config, store: Store) -> None:
    issued = api_keys.issue(store, did_of(args.did), cost=config.auth.bcrypt_cost)
    out(
        args,
        {"key_id": issued.key_id, "did": issued.did, "key": issued.secret},
        f"key {issued.key_id} for {issued.did}:\n  {issued.secret}\n"
        "this is the only time it is shown; it is stored only as a bcrypt hash",
    )


def key_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    did = did_of(args.did)
    store.member(did)
    keys = store.keys(did)
    data = [{k: v for k, v in attrs.asdict(key).items() if k != "bcrypt_hash"} for key in keys]
    lines = [
        f"{k.key_id}  {'revoked' if k.revoked_at else 'active'}  created {k.created_at:.0f}"
        f"  last used {k.last_used_at or '-'}"
        for k in keys
    ] or [f"no keys for {did}"]
    out(args, data, "\n".join(lines))


def key_revoke(args: argparse.Namespace, config: Config, store: Store) -> None:
    # An operator may paste the whole key rather than its id: revoke by the id it carries.
    # Anything else that is not an id is refused without being echoed (it may be a secret).
    key_id = api_keys.key_id_of(args.key_id) or args.key_id
    if len(key_id) != api_keys.KEY_ID_LENGTH:
        raise Refused(
            "that is not a key id (8 characters, as 'atmosrelay key list DID' shows them); "
            "the argument is not repeated here in case it was a key",
            EXIT_INVALID,
        )
    key = store.revoke_key(key_id)
    out(args, {"key_id": key.key_id, "revoked_at": key.revoked_at}, f"key {key.key_id} revoked")


def domain_forward_to(args: argparse.Namespace, config: Config, store: Store) -> None:
    name = args.domain.strip().lower()
    if args.clear == bool(args.address):
        raise Refused("give an ADDRESS, or --clear (not both)", EXIT_INVALID)
    try:
        address = None if args.clear else domains.forward_address(args.address, name)
    except domains.DomainError as exc:
        raise Refused(str(exc), EXIT_INVALID) from None
    d = store.set_forward_to(name, address)
    out(
        args,
        domain_json(d),
        f"replies to {name} are forwarded to {address} (point {name}'s MX at the relay's "
        "inbound listener; docs/inbound.md)"
        if address
        else f"replies to {name} are no longer forwarded (550 5.1.1 at RCPT)",
    )


# -- suppressions ------------------------------------------------------------------------------
def domain_unpause(args: argparse.Namespace, config: Config, store: Store) -> None:
    name = args.domain.strip().lower()
    was = store.domain(name).paused_reason
    if was is None:
        raise Refused(
            f"domain {name} is not paused; nothing to do ('atmosrelay domain list' shows which are)"
        )
    d = store.set_paused(name, None)
    out(
        args,
        domain_json(d),
        f"domain {name} unpaused (it was paused: {was}); its bounce rate counts afresh from "
        "the pause; a running relay applies it within a second",
    )


def _address(text: str) -> str:
    local, at, domain = text.strip().rpartition("@")
    if not at or not local or not domain:
        raise Refused(f"{text!r} is not an email address", EXIT_INVALID)
    try:
        return f"{local}@{domains.normalize_domain(domain)}"
    except domains.DomainError as exc:
        raise Refused(str(exc), EXIT_INVALID) from None


def suppression_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    rows = store.suppressions(did_of(args.did))
    lines = [
        f"{r.address}  {r.source}  since {_when(r.created_at)}"
        + (f"  {r.detail}" if r.detail else "")
        for r in rows
    ] or ["no suppressed addresses"]
    out(args, [attrs.asdict(r) for r in rows], "\n".join(lines))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def suppression_add(args: argparse.Namespace, config: Config, store: Store) -> None:
    row = store.suppress(did_of(args.did), _address(args.address), "operator")
    out(args, attrs.asdict(row), f"{row.address} suppressed for {row.did}")


def suppression_remove(args: argparse.Namespace, config: Config, store: Store) -> None:
    address = _address(args.address)
    store.unsuppress(did_of(args.did), address)
    out(args, {"did": args.did, "address": address}, f"{address} no longer suppressed")


# -- wiring -----------------------------------------------------------------------------------
def register(sub: Any) -> None:
    """Add the member, domain, key and suppression commands to the CLI."""
    member = sub.add_parser("member", help="members (atproto DIDs) and their status")
    ms = member.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = common_options(ms.add_parser("add", help="add a member: DID --handle HANDLE"))
    p.add_argument("did")
    p.add_argument("--handle", required=True)
    p.add_argument(
        "--without-dns", action="store_true", help="do not check the handle's _atproto TXT"
    )
    p.set_defaults(func=with_store(member_add))
    common_options(ms.add_parser("list", help="all members")).set_defaults(
        func=with_store(member_list)
    )
    p = common_options(
        ms.add_parser("show", help="one member: status, limits, counts, domains, keys")
    )
    p.add_argument("did")
    p.set_defaults(func=with_store(member_show))
    p = common_options(ms.add_parser("limits", help="set a member's own hourly/daily limits"))
    p.add_argument("did")
    p.add_argument("--hourly", type=int, help="recipients per hour")
    p.add_argument("--daily", type=int, help="recipients per day")
    p.add_argument("--reset", action="store_true", help="back to the tier's limits")
    p.set_defaults(func=with_store(member_limits))
    p = common_options(ms.add_parser("label", help="add or remove a reputation label"))
    p.add_argument("change", choices=("add", "remove"))
    p.add_argument("did")
    p.add_argument("label", help="throttled, highly_trusted, auto_suspended, shadow:<label>, ...")
    p.set_defaults(func=with_store(member_label))
    for action, status, reason in (
        ("suspend", "suspended", True),
        ("unsuspend", "active", False),
        ("remove", "removed", True),
    ):
        p = common_options(ms.add_parser(action, help=f"mark a member {status}"))
        p.add_argument("did")
        if reason:  # checked by the handler: a missing reason is malformed input (65)
            p.add_argument("--reason", help="why (recorded, shown to the operator)")
        p.set_defaults(func=with_store(_status(status, reason)))

    domain = sub.add_parser("domain", help="sending domains and their DNS proof")
    ds = domain.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = common_options(ds.add_parser("add", help="enroll DOMAIN for DID; prints the TXT challenge"))
    p.add_argument("did")
    p.add_argument("domain")
    p.set_defaults(func=with_store(domain_add))
    p = common_options(
        ds.add_parser("verify", help="check the TXT challenge; print DKIM/SPF/DMARC")
    )
    p.add_argument("domain")
    p.add_argument(
        "--without-dns", action="store_true", help="local testing only: skip the DNS check"
    )
    p.set_defaults(func=with_store(domain_verify))
    p = common_options(ds.add_parser("records", help="the DNS records a domain must publish"))
    p.add_argument("domain")
    p.set_defaults(func=with_store(domain_records))
    p = common_options(ds.add_parser("unpause", help="let a paused domain send again"))
    p.add_argument("domain")
    p.set_defaults(func=with_store(domain_unpause))
    p = common_options(ds.add_parser("forward-to", help="forward replies to DOMAIN to ADDRESS"))
    p.add_argument("domain")
    p.add_argument("address", nargs="?")
    p.add_argument("--clear", action="store_true", help="stop forwarding")
    p.set_defaults(func=with_store(domain_forward_to))
    p = common_options(ds.add_parser("list", help="enrolled domains (of DID, if given)"))
    p.add_argument("did", nargs="?")
    p.set_defaults(func=with_store(domain_list))

    operator = sub.add_parser("operator", help="the operator's own domain")
    ops = operator.add_subparsers(dest="action", required=True, metavar="ACTION")
    register_dkim(ds, ops)

    key = sub.add_parser("key", help="API keys")
    ks = key.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = common_options(ks.add_parser("issue", help="a new key for DID, shown once"))
    p.add_argument("did")
    p.set_defaults(func=with_store(key_issue))
    p = common_options(ks.add_parser("list", help="a member's keys (ids only)"))
    p.add_argument("did")
    p.set_defaults(func=with_store(key_list))
    p = common_options(ks.add_parser("revoke", help="revoke a key by id"))
    p.add_argument(
        "key_id", help="as 'key list' shows it (an id starting with '-': put '--' first)"
    )
    p.set_defaults(func=with_store(key_revoke))

    supp = sub.add_parser("suppression", help="a member's suppressed recipients")
    ss = supp.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = common_options(ss.add_parser("list", help="suppressed addresses of DID"))
    p.add_argument("did")
    p.set_defaults(func=with_store(suppression_list))
    for action, fn in (("add", suppression_add), ("remove", suppression_remove)):
        p = common_options(ss.add_parser(action, help=f"{action} ADDRESS for DID"))
        p.add_argument("did")
        p.add_argument("address")
        p.set_defaults(func=with_store(fn))
