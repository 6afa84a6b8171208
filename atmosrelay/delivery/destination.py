"""Where a lane delivers: the hosts to try, in order, and their addresses.

Its own module, apart from the resolver that finds it: the delivery processes carry
attempts to a ``Destination`` they are handed and never resolve, so they need not import
the DNS library (80 ms of each one's start).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs


@attrs.frozen
class Destination:
    hosts: tuple[tuple[str, int], ...]  # (host, port) in the order to try
    implicit: bool = False  # no MX: the domain's own address records
    # host -> its addresses, looked up through the relay's own resolver (so connecting never
    # asks the system resolver); a host missing here is connected to by name
    addresses: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict, eq=False)

    @property
    def key(self) -> str:
        """The lane this destination belongs to: its MX hosts, sorted (MX rollup)."""
        return ",".join(sorted(f"{h}:{p}" for h, p in self.hosts))
