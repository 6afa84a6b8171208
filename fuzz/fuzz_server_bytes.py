"""Fuzz the SMTP server side: arbitrary client bytes into a ServerConnection.

Invariant (fuzz/README.md): every input yields only events, or a RemoteProtocolError that
carries the reply to send; nothing else escapes; and splitting the same input differently
never changes the events or the reply bytes. The first input byte chooses the split; the
rest is the client's stream.

One outcome is normalised: plaintext after STARTTLS. If it arrived before the switch the
protocol core refuses it (injection); if after, it would reach the TLS handshake and fail
there. Both mean the same thing, "never executed as SMTP", and are recorded the same way.
"""

from __future__ import annotations

from atmosrelay.smtp import (
    NEED_DATA,
    PAUSED,
    AuthChallenge,
    AuthCredentials,
    Capabilities,
    ChunkEnd,
    CommandError,
    ConnectionClosed,
    EndOfMessage,
    Event,
    Greet,
    Hello,
    MessageData,
    MessageRejected,
    RemoteProtocolError,
    Reply,
    ServerConnection,
    TLSReady,
)
from atmosrelay.smtp import replies as R
from fuzz._harness import atheris_main, same_however_split

CAPS = Capabilities(starttls=True, auth=("PLAIN", "LOGIN"), size=4096)
_SIMPLE = {
    "StartTLS": R.READY_TO_START_TLS,
    "MailFrom": R.SENDER_OK,
    "RcptTo": R.RECIPIENT_OK,
    "Data": R.START_DATA,
    "Rset": R.OK,
    "Noop": R.OK,
    "Quit": R.CLOSING,
    "Vrfy": R.VRFY_CANNOT,
    "Expn": R.EXPN_DISABLED,
    "Help": R.HELP,
}


def _reply(conn: ServerConnection, event: Event) -> Reply | None:
    if isinstance(event, (CommandError, AuthChallenge, MessageRejected)):
        return event.reply
    if isinstance(event, Greet):
        return R.GREETING.format(hostname="mx.fuzz")
    if isinstance(event, Hello):
        return conn.ehlo_reply("mx.fuzz")
    if isinstance(event, AuthCredentials):
        return R.AUTH_SUCCESS if event.password == "secret" else R.AUTH_FAILED
    if isinstance(event, EndOfMessage):
        return R.QUEUED.format(queue_id="F1")
    if isinstance(event, ChunkEnd):
        return R.CHUNK_OK.format(size=event.size)
    return _SIMPLE.get(type(event).__name__)


INJECTED = ("error", "plaintext after STARTTLS")


def run(chunks: list[bytes]) -> tuple[list[object], bytes]:
    conn = ServerConnection(capabilities=CAPS, max_text_line=200, max_errors=50)
    events: list[object] = []
    out = bytearray()
    feed = iter([*chunks, b""])
    for _ in range(100_000):  # bounded: every step consumes input or produces a reply
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            events.append(INJECTED if "STARTTLS" in str(exc) else ("error", str(exc)))
            if exc.reply is not None:
                out += conn.send(exc.reply)
            break
        if event is NEED_DATA:
            conn.receive_data(next(feed))
            continue
        assert event is not PAUSED
        if isinstance(event, MessageData) and events and isinstance(events[-1], MessageData):
            events[-1] = MessageData(events[-1].data + event.data)
            continue
        events.append(event)
        if isinstance(event, TLSReady) and any(feed):  # bytes left for the TLS handshake
            events[-1] = INJECTED
        if isinstance(event, (ConnectionClosed, TLSReady)):
            break
        reply = _reply(conn, event)  # type: ignore[arg-type]
        if reply is not None:
            out += conn.send(reply)
    else:  # pragma: no cover - the failure we hunt
        raise AssertionError("server loop did not terminate")
    return events, bytes(out)


def check_one(data: bytes) -> None:
    same_however_split(run, data, 17)


if __name__ == "__main__":  # pragma: no cover
    atheris_main(check_one)
