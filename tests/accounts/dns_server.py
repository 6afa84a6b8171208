"""A small authoritative DNS server for tests: dnspython on 127.0.0.1, port 0, in a thread.

    with DnsServer() as dns:
        dns.txt("_atproto.alice.test", "did=did:plc:...")
        dns.txt("long.test", ("first part", "second part"))   # one record, several strings
        dns.a("alice.test", "127.0.0.1")
        dns.silent("slow.test")                                # never answers: a timeout
        ... resolver at dns.address

Unknown names get NXDOMAIN; a known name asked for another type gets an empty answer.
A thread (not trio) so that CLI tests in subprocesses can use it too.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self) -> None:
        self._records: dict[tuple[str, str], list[str]] = {}
        self._silent: set[str] = set()
        self._servfail: set[str] = set()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.address: tuple[str, int] = self._sock.getsockname()
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def spec(self) -> str:
        """As the config's dns.nameservers wants it."""
        return f"{self.address[0]}:{self.address[1]}"

    def _key(self, name: str) -> str:
        return name.lower().rstrip(".") + "."

    def txt(self, name: str, value: str | tuple[str, ...]) -> None:
        parts = (value,) if isinstance(value, str) else value
        text = " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
        with self._lock:
            self._records.setdefault((self._key(name), "TXT"), []).append(text)

    def a(self, name: str, address: str) -> None:
        with self._lock:
            self._records.setdefault((self._key(name), "A"), []).append(address)

    def mx(self, name: str, preference: int, exchange: str) -> None:
        with self._lock:
            self._records.setdefault((self._key(name), "MX"), []).append(f"{preference} {exchange}")

    def aaaa(self, name: str, address: str) -> None:
        with self._lock:
            self._records.setdefault((self._key(name), "AAAA"), []).append(address)

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(self._key(name))

    def clear(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._records if k[0] == self._key(name)]:
                del self._records[key]

    def silent(self, name: str) -> None:
        with self._lock:
            self._silent.add(self._key(name))

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype))
            if name in self._silent:
                return None
            if name in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            values = self._records.get((name, rdtype))
            exists = any(k[0] == name for k in self._records)
        if values:
            rrset = dns.rrset.from_text(name, 60, "IN", rdtype, *values)
            response.answer.append(rrset)
        elif not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                response = self._answer(dns.message.from_wire(data))
            except Exception:  # a malformed query: drop it, as a server would
                continue
            if response is not None:
                self._sock.sendto(response.to_wire(), peer)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
