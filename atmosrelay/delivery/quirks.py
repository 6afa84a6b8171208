"""What the delivery client learned of remote hosts that offer an extension and then do not
understand it, so the next transaction to such a host does without.

One case today: a host that offers CHUNKING and answers BDAT as an unknown command (500,
502). Its transaction has no verdict (its accepted recipients are deferred, and the
connection is dropped: it may have read the content as commands), and every later message
would meet the same fate until ``delivery.chunking = false`` stopped BDAT for every host.
So the host is remembered, by name, for ``FORGET_AFTER`` seconds: the retry, and every
message to it meanwhile, goes by DATA; after that BDAT is tried again (the host may have
been fixed). Kept per delivery process, in memory (a restart tries BDAT again once).
"""

from __future__ import annotations

import logging
from typing import Final

log = logging.getLogger("atmosrelay.delivery")

FORGET_AFTER: Final = 6 * 3600.0
MAX_HOSTS: Final = 1024  # remembered at once; the oldest go first when full

_no_bdat: dict[str, float] = {}  # host -> the clock's time until which it gets DATA


def bdat_not_understood(host: str, now: float) -> None:
    """``host`` offered CHUNKING and did not understand BDAT: DATA to it for a while."""
    if _no_bdat.pop(host, None) is None:
        log.warning(
            "%s offers CHUNKING but did not understand BDAT: messages to it go by DATA "
            "for the next %g hours",
            host,
            FORGET_AFTER / 3600,
        )
    while len(_no_bdat) >= MAX_HOSTS:
        del _no_bdat[next(iter(_no_bdat))]
    _no_bdat[host] = now + FORGET_AFTER


def bdat_works(host: str, now: float) -> bool:
    """Whether BDAT may be sent to ``host`` (if it offers CHUNKING)."""
    until = _no_bdat.get(host)
    if until is None:
        return True
    if until <= now:
        del _no_bdat[host]
        return True
    return False


def forget_all() -> None:
    """Every host gets BDAT again (each test starts from nothing)."""
    _no_bdat.clear()
