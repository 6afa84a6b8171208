"""Who a message may claim to be from, and whom it may go to.

Envelope sender (at MAIL): its domain must be one of the member's *verified* domains,
exactly (an enrolled, unverified one gets a reply naming the command that verifies it),
and not paused.

Header ``From:`` (at the end of DATA): exactly one field with exactly one address, whose
domain is a verified domain of the member or a subdomain of one; ``Sender:``, if present,
likewise. This is what the recipient sees, and what the relay signs with the operator's
key: without it any member could send as anyone.

Suppression: an address suppressed for a hard bounce, a complaint or by the operator is
refused at RCPT whatever the category; one suppressed by unsubscribe only for bulk mail,
which is known at the end of DATA (``unsubscribed``).
"""

from __future__ import annotations

import email.utils
import re
from typing import Final

from atmosrelay.policy.member import MemberSnapshot, SuppressionSource
from atmosrelay.refusals import Code, Refusal, refuse
from atmosrelay.smtp import replies as R


def check_member(member: MemberSnapshot) -> Refusal | None:
    if member.suspended:
        return refuse(Code.MEMBER_SUSPENDED, log=member.suspension_reason)
    return None


def check_sender_domain(member: MemberSnapshot, domain: str) -> Refusal | None:
    domain = domain.lower()
    if domain in member.paused:
        reason = member.paused[domain]
        return refuse(
            Code.DOMAIN_PAUSED,
            log=f"domain {domain} paused: {reason}",
            domain=domain,
            reason=reason,
        )
    if domain in member.verified:
        return None
    if domain in member.pending:
        return refuse(
            Code.DOMAIN_MISMATCH,
            reply=R.DOMAIN_NOT_VERIFIED,
            log=f"domain {domain} enrolled, not verified",
            domain=domain,
        )
    return refuse(Code.DOMAIN_MISMATCH, log=f"domain {domain} not enrolled", domain=domain)


# "local@domain" or "Display Name <local@domain>" made of RFC 5322 atext, dots and blanks
# only: most From fields. Everything else goes to the standard library's full parser.
_ATEXT: Final = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_ADDR: Final = rf"[{_ATEXT}.]+@[A-Za-z0-9.-]+"
_SIMPLE: Final = re.compile(rf"[ \t]*(?:[{_ATEXT}. \t]*<({_ADDR})>|({_ADDR}))[ \t]*")


def addresses(value: str) -> list[str]:
    """The addr-specs in a From/Sender value (groups and empty ones dropped)."""
    simple = _SIMPLE.fullmatch(value)
    if simple is not None:
        return [simple.group(1) or simple.group(2)]
    return [a for _, a in email.utils.getaddresses([value]) if a]


def _allowed(member: MemberSnapshot, domain: str) -> bool:
    domain = domain.lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in member.verified)


def check_header_addresses(
    member: MemberSnapshot, from_values: list[str], sender_values: list[str]
) -> Refusal | None:
    """``from_values``/``sender_values``: the unfolded values of every From:/Sender: field."""
    for name, values, required in (("From", from_values, True), ("Sender", sender_values, False)):
        if not values and not required:
            continue
        if len(values) != 1:
            detail = f"The message must have exactly one {name} header, not {len(values)}"
            return refuse(Code.FROM_NOT_ALLOWED, log=detail, detail=detail)
        found = addresses(values[0])
        if len(found) != 1 or "@" not in found[0]:
            detail = f"The {name} header must hold exactly one address"
            return refuse(Code.FROM_NOT_ALLOWED, log=detail, detail=detail)
        domain = found[0].rpartition("@")[2]
        if not _allowed(member, domain):
            detail = (
                f"{name} header domain {domain} is not one of this account's verified "
                "sending domains (or a subdomain of one)"
            )
            return refuse(Code.FROM_NOT_ALLOWED, log=detail, detail=detail)
    return None


def check_recipient(member: MemberSnapshot, address: str) -> Refusal | None:
    """At RCPT: refused when suppressed for a reason that blocks every category."""
    source = member.suppressed.get(address.lower())
    if source is not None and source.blocks_transactional:
        return refuse(
            Code.RECIPIENT_SUPPRESSED,
            log=f"recipient suppressed ({source.value})",
            reason=source.value,
        )
    return None


def unsubscribed(member: MemberSnapshot, address: str) -> bool:
    """At the end of DATA, for bulk mail: the recipient unsubscribed from this member."""
    return member.suppressed.get(address.lower()) is SuppressionSource.UNSUBSCRIBE
