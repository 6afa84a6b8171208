"""SIGHUP: apply what can change in a running relay, without dropping a connection.

What is applied (``config.RELOADABLE``):

- the TLS certificate and key, read again even when their names did not change (certbot's
  renewal writes new files under the same names): new handshakes, SMTP and HTTPS, use the
  new pair; sessions already encrypted keep theirs;
- ``relay.log_level``;
- the ``[policy]`` limits and rules (the counters stay: a member's hour so far counts
  against the new limits);
- the operator's DKIM key, after ``atmosrelay operator rotate-dkim --activate``.

Everything is read and checked before anything is applied, so a reload that fails (the
config file does not parse, a setting is invalid, the certificate is missing or does not
match its key) changes nothing: the relay keeps running as it was and says why. A change to
any other setting is named as needing a restart; the running value stays in force (and
stays what later reloads compare against).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from functools import partial

import attrs
import trio

from atmosrelay import logs, systemd
from atmosrelay.accounts.dkim_keys import ensure_operator_key
from atmosrelay.config import RELOADABLE, Config, ConfigError, changed_settings, load_config
from atmosrelay.delivery.prepare import Preparer
from atmosrelay.server.context import SessionContext
from atmosrelay.server.tls import certificate_files, context_for

log = logging.getLogger("atmosrelay.reload")


@attrs.define(eq=False)
class Reloader:
    config: Config  # what is in force now
    ctx: SessionContext
    announce: Callable[[str], None]
    http_tls: ssl.SSLContext | None = None  # the HTTPS listeners' context, reloaded in place
    # more to apply after the settings, each returning what it did (or None): the
    # operator's DKIM key after 'operator rotate-dkim --activate'
    also: list[Callable[[], str | None]] = attrs.field(factory=list)

    async def reload(self) -> bool:
        """Read, check, apply; returns whether anything was applied."""
        systemd.reloading()
        try:
            return await self._reload()
        finally:
            systemd.notify("READY=1")

    async def _reload(self) -> bool:
        try:
            new = await trio.to_thread.run_sync(self._read)
        except ConfigError as exc:
            self.announce(f"reload refused, nothing changed: {exc}")
            return False
        named = new.smtp.tls_cert or "(generated)"
        try:
            cert, key, _ = await trio.to_thread.run_sync(
                partial(
                    certificate_files,
                    new.smtp.tls_cert,
                    new.smtp.tls_key,
                    data_dir=self.config.data_dir,
                    hostname=self.config.smtp.hostname,
                )
            )
            tls = await trio.to_thread.run_sync(context_for, cert, key)
        except (OSError, ssl.SSLError) as exc:
            self.announce(
                f"reload refused, nothing changed: the TLS certificate {named} cannot be "
                f"used ({_reason(exc)}); the running one is kept"
            )
            return False
        if self.http_tls is not None:  # the same files, just checked: loaded in place
            self.http_tls.load_cert_chain(cert, key)
        self.ctx.tls_context = tls
        logs.set_level(new.relay.log_level)
        self.ctx.pipeline.policy.reload(new.policy)
        done = [
            f"TLS certificate {cert}",
            f"log level {new.relay.log_level}",
            "policy limits",
        ]
        for more in self.also:
            try:
                what = await trio.to_thread.run_sync(more)
            except OSError as exc:
                self.announce(f"reload: {exc.strerror or exc}; the rest was applied")
                continue
            if what:
                done.append(what)
        restart = [k for k in changed_settings(self.config, new) if k not in RELOADABLE]
        self.config = _in_force(self.config, new)
        self.announce(
            f"reloaded {self.config.path or 'the embedded defaults'}: {', '.join(done)}"
            + (f"; needs restart to apply: {', '.join(restart)}" if restart else "")
        )
        return True

    def _read(self) -> Config:
        if self.config.path is None:
            return self.config  # started on the embedded defaults: the certificate only
        return load_config(self.config.path)


def _in_force(old: Config, new: Config) -> Config:
    """``old`` with the reloadable settings taken from ``new``."""
    return old.evolve(**{dotted: new.value(dotted) for dotted in RELOADABLE})


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "not a PEM certificate and matching key"
    return exc.strerror or str(exc)


def operator_key(config: Config, prepare: Preparer) -> str | None:
    """SIGHUP: the operator's signing key again (a rotation may have been activated)."""
    operator, _ = ensure_operator_key(config.dkim_dir, config.operator.domain)
    if operator.selector == prepare.operator.selector:
        return None
    prepare.set_operator(operator)
    return f"operator DKIM selector {operator.selector}"
