"""Protocol errors that say whose fault they are (after h11's Local/RemoteProtocolError)."""

from __future__ import annotations

from atmosrelay.smtp._replies import Reply


class ProtocolError(Exception):
    """Base class. ``reply`` is what to send the peer before closing, or None to just close."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """Our own code broke the protocol: a reply with nothing to answer, a command the server
    did not offer, bare line endings in data we were asked to send. A bug here."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol beyond what a reply can mend (STARTTLS injection, too many
    errors, a malformed reply stream). Send ``reply`` if any, then close."""
