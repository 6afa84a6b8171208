"""The SMTP protocol, sans-IO: bytes in, events out; events in, bytes out.

No trio, socket, ssl, time or logging here (tests/test_architecture.py enforces it). The trio
code that drives these objects lives in ``atmosrelay.server`` and ``atmosrelay.delivery``.
"""

from atmosrelay.smtp import _replies as replies
from atmosrelay.smtp._client import ClientConnection
from atmosrelay.smtp._dotstuff import whole_content
from atmosrelay.smtp._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from atmosrelay.smtp._events import *  # noqa: F403 - the event vocabulary is the API
from atmosrelay.smtp._events import __all__ as _event_names
from atmosrelay.smtp._extensions import (
    Address,
    AddressError,
    Capabilities,
    MailParams,
    RcptParams,
    ServerCapabilities,
    parse_path,
)
from atmosrelay.smtp._replies import Reply
from atmosrelay.smtp._server import ServerConnection, permissive_reply
from atmosrelay.smtp._states import State

__all__ = [
    "Address",
    "AddressError",
    "Capabilities",
    "ClientConnection",
    "LocalProtocolError",
    "MailParams",
    "ProtocolError",
    "RcptParams",
    "RemoteProtocolError",
    "Reply",
    "ServerCapabilities",
    "ServerConnection",
    "State",
    "parse_path",
    "permissive_reply",
    "replies",
    "whole_content",
    *_event_names,
]
