"""A raw SMTP dialog over a blocking socket (optionally TLS): bytes out, reply lines back.
For tests that must send exactly what they choose (refusals, smuggling, injection)."""

from __future__ import annotations

import re
import socket
import ssl

_FINAL = re.compile(rb"^\d{3}(?: |$)")


class Dialog:
    def __init__(self, port: int, tls: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = (
            tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        )
        self.buf = b""

    def reply(self) -> bytes:
        """One whole reply (all its lines), CRLFs included; b"" if the server closed."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return out
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            out += line + b"\r\n"
            if _FINAL.match(line):
                return out

    def cmd(self, data: bytes) -> bytes:
        self.sock.sendall(data if data.endswith(b"\r\n") else data + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.cmd(b"STARTTLS").startswith(b"220 ")
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Dialog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
