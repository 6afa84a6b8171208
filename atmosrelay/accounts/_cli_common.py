"""What the operator commands share: exit statuses, the refusal they raise, output, the
store around each command, the DNS check with its --without-dns escape."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from atmosrelay._text import print_error
from atmosrelay.accounts import domains
from atmosrelay.accounts.identity import DnsSettings, InvalidDID, make_resolver, validate_did
from atmosrelay.accounts.store import Store, StoreError
from atmosrelay.config import Config, ConfigError, load_config

EXIT_REFUSED = 1
EXIT_USAGE = 64
EXIT_INVALID = 65


class Refused(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def dns_settings(config: Config) -> DnsSettings:
    return DnsSettings(nameservers=config.dns.nameservers, timeout=config.dns.timeout)


def did_of(text: str) -> str:
    try:
        return validate_did(text)
    except InvalidDID as exc:
        raise Refused(f"invalid DID {exc}", EXIT_INVALID) from None


def out(args: argparse.Namespace, data: object, human: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else human)


def check_dns(
    args: argparse.Namespace,
    config: Config,
    check: Callable[[Any], Awaitable[None]],
    *,
    skipped: str,
    refused: str,
    then: str,
) -> None:
    """Run a DNS check (``check(resolver)``) unless ``--without-dns`` (then warn with
    ``skipped``); a failed check is refused as ``refused: what DNS said; then``."""
    if args.without_dns:
        print(f"warning: {skipped}", file=sys.stderr)
        return
    resolver = make_resolver(dns_settings(config))
    try:
        trio.run(check, resolver)
    except domains.DomainError as exc:
        raise Refused(f"{refused}: {exc}; {then}") from None


def with_store(
    handler: Callable[[argparse.Namespace, Config, Store], None],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print_error(str(exc))
            return EXIT_USAGE
        store = Store(config.accounts_db)
        try:
            handler(args, config, store)
        except Refused as exc:
            print_error(str(exc))
            return exc.code
        except domains.DomainError as exc:  # a malformed domain or address in the arguments
            print_error(str(exc))
            return EXIT_INVALID
        except StoreError as exc:
            print_error(str(exc))
            return EXIT_REFUSED
        finally:
            store.close()
        return 0

    return run


def common_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="TOML config file (default: $ATMOSRELAY_CONFIG)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p
