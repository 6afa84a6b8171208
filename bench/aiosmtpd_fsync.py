"""The naive Python baseline for bench_accept: aiosmtpd with implicit TLS and AUTH, whose
handler writes each message to a file and fsyncs it before answering 250.

    python bench/aiosmtpd_fsync.py CERT_PEM DIRECTORY     prints "listening on PORT"
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class FsyncHandler:
    def __init__(self, directory: str) -> None:
        self.fd = os.open(
            os.path.join(directory, "messages"), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600
        )

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        data = envelope.original_content  # type: ignore[attr-defined]
        os.write(self.fd, len(data).to_bytes(4, "little") + data)
        os.fsync(self.fd)  # blocking, on the event loop: the naive way
        return "250 2.0.0 stored"


def authenticator(
    server: object, session: object, envelope: object, mechanism: str, data: object
) -> AuthResult:
    return AuthResult(
        success=isinstance(data, LoginPassword) and data.password == b"bench", handled=False
    )


async def main(cert: str, directory: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert)
    handler = FsyncHandler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler, authenticator=authenticator, auth_require_tls=False, hostname="baseline"
        ),
        "127.0.0.1",
        0,
        ssl=ctx,
    )
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
