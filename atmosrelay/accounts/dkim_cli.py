"""Operator commands for DKIM keys and domain removal: ``domain rotate-dkim``,
``operator rotate-dkim``, ``operator records``, ``domain remove`` (two-phase rotation:
atmosrelay/accounts/domains.py)."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import attrs

from atmosrelay.accounts import dkim_keys, domains
from atmosrelay.accounts._cli_common import Refused, check_dns, common_options, out, with_store
from atmosrelay.accounts.store import Store
from atmosrelay.config import Config
from atmosrelay.queue.cli import read_queue
from atmosrelay.queue.state import domain_of


def operator_records(args: argparse.Namespace, config: Config, store: Store) -> None:
    """The operator domain's records, at any time (its key made now if the relay never ran)."""
    operator, _ = dkim_keys.ensure_operator_key(config.dkim_dir, config.operator.domain)
    recs = domains.operator_records(operator, config.smtp.hostname)
    lines = [r.zone_line() + (f"    ; {r.note}" if r.note else "") for r in recs]
    out(
        args,
        [attrs.asdict(r) for r in recs],
        f"publish these records for {operator.domain}:\n" + "\n".join("  " + x for x in lines),
    )


def domain_rotate_dkim(args: argparse.Namespace, config: Config, store: Store) -> None:
    """Two phases: make and print the next pair; after publishing, ``--activate`` it."""
    name = domains.normalize_domain(args.domain)
    if not args.activate:
        d = domains.start_rotation(store, name)
        assert d.dkim_next_stem is not None
        records = domains.next_dkim_records(d)
        lines = "\n".join("  " + r.zone_line() for r in records)
        out(
            args,
            {
                "domain": d.name,
                "signing": d.dkim_selector_stem,
                "next": d.dkim_next_stem,
                "records": [attrs.asdict(r) for r in records],
            },
            f"new DKIM keys for {d.name} (selectors {d.dkim_next_stem}r, {d.dkim_next_stem}e); "
            f"the relay keeps signing with {d.dkim_selector_stem}r/e until they are activated.\n"
            f"publish these records, then run 'atmosrelay domain rotate-dkim {d.name} --activate':"
            f"\n{lines}",
        )
        return
    d = store.domain(name)
    records = domains.next_dkim_records(d)
    if not records:
        raise Refused(
            f"no DKIM rotation of {name} to activate; start one with "
            f"'atmosrelay domain rotate-dkim {name}'"
        )
    check_dns(
        args,
        config,
        partial(domains.check_published, records=records),
        skipped=f"activating {name}'s new DKIM keys WITHOUT checking that DNS serves them "
        "(--without-dns); receivers will fail every signature until it does",
        refused=f"not activated, {name} still signs with the old keys",
        then=f"publish the records 'atmosrelay domain records {name}' marks as the "
        "rotation's, then activate again",
    )
    old = d.dkim_selector_stem
    d = store.activate_next_dkim(name)
    out(
        args,
        {"domain": d.name, "signing": d.dkim_selector_stem, "retired": old},
        f"{d.name} now signs with {d.dkim_selector_stem}r/e (a running relay within seconds); "
        f"the keys of {old}r/e are deleted. Keep their records published for a week (mail in "
        f"transit and forwarded mail is checked against them), then remove them.",
    )


def domain_remove(args: argparse.Namespace, config: Config, store: Store) -> None:
    """Remove a domain and its DKIM keys; refused while mail from it is queued."""
    name = domains.normalize_domain(args.domain)
    d = store.domain(name)
    messages = read_queue(config)
    if isinstance(messages, int):
        raise Refused(
            "cannot read the queue to check for mail from it (said above); repair the "
            "journal first, or add --force",
            messages,
        )
    queued = [
        m.id for m in messages.values() if not m.terminal and domain_of(m.record.sender) == name
    ]
    if queued and not args.force:
        raise Refused(
            f"{len(queued)} queued message(s) from {name} (e.g. {queued[0]}); wait for them, "
            f"delete them ('atmosrelay queue delete --domain {name}'), or add --force "
            "(they go out signed by the operator's domain only)"
        )
    store.remove_domain(name)
    out(
        args,
        {"domain": name, "did": d.did, "removed": True, "queued": len(queued)},
        f"{name} removed from {d.did}; its DKIM keys are deleted"
        + (
            f"; {len(queued)} queued message(s) from it go out with the operator's signature only"
            if queued
            else ""
        ),
    )


def operator_rotate_dkim(args: argparse.Namespace, config: Config, store: Store) -> None:
    """The operator domain's key, in the same two phases as a member domain's."""
    directory, domain = config.dkim_dir, config.operator.domain
    current, _ = dkim_keys.ensure_operator_key(directory, domain)
    if not args.activate:
        stem = domains.next_stem(current.selector.removesuffix("r"))
        started = dkim_keys.start_operator_rotation(directory, domain, stem)
        record = domains.operator_records(started, config.smtp.hostname)[0]
        out(
            args,
            {
                "domain": domain,
                "signing": current.selector,
                "next": started.selector,
                "records": [attrs.asdict(record)],
            },
            f"a new operator DKIM key for {domain} (selector {started.selector}); the relay "
            f"keeps signing with {current.selector} until it is activated.\npublish this "
            f"record, then run 'atmosrelay operator rotate-dkim --activate':\n"
            f"  {record.zone_line()}",
        )
        return
    pending = dkim_keys.operator_rotation(directory, domain)
    if pending is None:
        raise Refused(
            "no operator DKIM rotation to activate; start one with "
            "'atmosrelay operator rotate-dkim'"
        )
    record = domains.operator_records(pending, config.smtp.hostname)[0]
    check_dns(
        args,
        config,
        partial(domains.check_published, records=[record]),
        skipped=f"activating the operator's new DKIM key WITHOUT checking that DNS serves "
        f"{record.name} (--without-dns)",
        refused=f"not activated, {domain} still signs with {current.selector}",
        then=f"publish {record.name} as 'atmosrelay operator records' shows it, then "
        "activate again",
    )
    new, old = dkim_keys.activate_operator_rotation(directory, domain)
    out(
        args,
        {"domain": domain, "signing": new.selector, "retired": old},
        f"{domain} signs with {new.selector} once the relay reloads ('systemctl reload "
        f"atmosrelay' or SIGHUP; a start does too); the key of {old} is deleted. Keep its "
        "record published for a week (mail in transit is checked against it), then remove it.",
    )


def register(ds: Any, ops: Any) -> None:
    """Their parsers, under ``domain`` (``ds``) and ``operator`` (``ops``)."""
    p = common_options(
        ds.add_parser("rotate-dkim", help="new DKIM keys in two phases: make, then --activate")
    )
    p.add_argument("domain")
    p.add_argument("--activate", action="store_true", help="sign with the published new keys")
    p.add_argument(
        "--without-dns", action="store_true", help="activate without checking DNS (testing)"
    )
    p.set_defaults(func=with_store(domain_rotate_dkim))
    p = common_options(ds.add_parser("remove", help="remove DOMAIN and its DKIM keys"))
    p.add_argument("domain")
    p.add_argument("--force", action="store_true", help="even while mail from it is queued")
    p.set_defaults(func=with_store(domain_remove))
    p = common_options(ops.add_parser("records", help="its DKIM, MX, SPF and DMARC records"))
    p.set_defaults(func=with_store(operator_records))
    p = common_options(
        ops.add_parser("rotate-dkim", help="a new DKIM key in two phases: make, then --activate")
    )
    p.add_argument("--activate", action="store_true", help="sign with the published new key")
    p.add_argument(
        "--without-dns", action="store_true", help="activate without checking DNS (testing)"
    )
    p.set_defaults(func=with_store(operator_rotate_dkim))
