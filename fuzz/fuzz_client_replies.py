"""Fuzz the SMTP client side: arbitrary server bytes into a ClientConnection that runs a
fixed delivery script (EHLO, MAIL, RCPT, DATA, content, QUIT, with a STARTTLS and a BDAT);
where a reply makes the next step out of sequence (the client's transition table says so),
the script sends QUIT instead, as a real client gives up.

Invariant (fuzz/README.md): only ServerReply/TLSReady/ConnectionClosed events or a
RemoteProtocolError; never another exception (a LocalProtocolError would mean the client let
the peer push it into an illegal move); and the result does not depend on how the server's
bytes were split. The first input byte chooses the split. Server bytes after the STARTTLS
220 count as one outcome whether the client saw them (injection) or the TLS handshake would
have (see fuzz_server_bytes.py).
"""

from __future__ import annotations

from atmosrelay.smtp import (
    NEED_DATA,
    Address,
    Bdat,
    ClientConnection,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Greet,
    Hello,
    MailFrom,
    Quit,
    RcptTo,
    RemoteProtocolError,
    ServerReply,
    StartTLS,
    TLSReady,
)
from fuzz._harness import atheris_main, same_however_split

SCRIPT = [
    Hello("relay.fuzz", True),
    StartTLS(),
    MailFrom(Address("a", "example.org")),
    RcptTo(Address("b", "example.net")),
    Data(),
    MailFrom(Address("a", "example.org")),
    RcptTo(Address("c", "example.net")),
    Bdat(b"chunk\r\n", last=True),
    Quit(),
]


INJECTED = ("error", "plaintext after STARTTLS")


def run(chunks: list[bytes]) -> list[object]:
    client = ClientConnection()
    script = iter(SCRIPT)
    results: list[object] = []
    sent = bytearray()
    feed = iter([*chunks, b""])
    for _ in range(10_000):
        try:
            event = client.next_event()
        except RemoteProtocolError as exc:
            results.append(INJECTED if "STARTTLS" in str(exc) else ("error", str(exc)))
            break
        if event is NEED_DATA:
            client.receive_data(next(feed))
            continue
        results.append(event)
        if isinstance(event, TLSReady) and any(feed):  # bytes left for the TLS handshake
            results[-1] = INJECTED
        if isinstance(event, (TLSReady, ConnectionClosed)):
            break
        assert isinstance(event, ServerReply)
        if isinstance(event.command, Data) and event.reply.code == 354:
            sent += client.send_data(b"Subject: fuzz\r\n\r\n.dot\r\n") + client.end_data()
            continue
        if isinstance(event.command, (Greet, Hello, MailFrom, RcptTo, EndOfMessage, Bdat, Data)):
            command = next(script, None)
            if isinstance(command, StartTLS) and not (
                client.capabilities and client.capabilities.has("STARTTLS")
            ):
                command = next(script, None)
            if command is not None and not client.can_send(command):
                command = Quit()  # refused on the way (the table says so): give up politely
            if command is not None and client.can_send(command):
                sent += client.send(command)
    results.append(("sent", bytes(sent)))
    return results


def check_one(data: bytes) -> None:
    same_however_split(run, data, 13)


if __name__ == "__main__":  # pragma: no cover
    atheris_main(check_one)
