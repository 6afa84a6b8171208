"""What compose writes, read back by the standard library's email parser (and by the
relay's own header reader): every field and part comes back as given, every line fits."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmosrelay.api.compose import ComposeError, compose
from atmosrelay.api.models import SendRequest
from atmosrelay.message.headers import process

_chars = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"))
# Header values: any characters, long runs without a space, leading and repeated spaces,
# and text that looks like an RFC 2047 encoded word.
words = st.one_of(
    st.text(_chars, max_size=200),
    st.text(st.sampled_from("ab =?x"), max_size=300),
    st.text(st.sampled_from("x"), min_size=70, max_size=900),
    st.builds(
        lambda a, b: f"  {a}  =?utf-8?q?{b}?=  ",
        st.text(_chars, max_size=20),
        st.text(_chars, max_size=5),
    ),
)
names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters='<>"\\'),
    max_size=40,
).map(str.strip)
bodies = st.text(st.characters(blacklist_categories=("Cs",)), max_size=3000)
locals_ = st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,8}){0,2}", fullmatch=True)
tags = st.lists(st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True), max_size=10)
metadata = st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=8)


def _normal(text: str) -> str:
    """Line ends as a parser gives them back (CRLF written, LF read)."""
    return "".join(line + "\n" for line in text.splitlines())


@settings(max_examples=150, deadline=None)
@given(
    name=names,
    local=locals_,
    subject=words,
    text=st.none() | bodies,
    html=st.none() | bodies,
    tag_list=tags,
    meta=metadata,
    extra=words,
)
def test_what_compose_writes_parses_back_to_what_was_given(
    name: str,
    local: str,
    subject: str,
    text: str | None,
    html: str | None,
    tag_list: list[str],
    meta: dict[str, str],
    extra: str,
) -> None:
    if text is None and html is None:
        text = ""
    req = SendRequest.model_validate(
        {
            "from": f'"{name}" <{local}@example.org>' if name else f"{local}@example.org",
            "to": [f"{local}@example.net", "Second Person <second@example.net>"],
            "subject": subject,
            "text": text,
            "html": html,
            "headers": {"X-Extra": extra},
            "tags": tag_list,
            "metadata": meta if len(str(meta)) < 900 else {},
        }
    )
    composed = compose(req, hostname="mx.test")
    data = composed.message
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    assert data.isascii()
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Subject"] == subject
    assert parsed["X-Extra"] == extra
    assert parsed["From"].addresses[0].addr_spec == f"{local}@example.org"
    assert parsed["From"].addresses[0].display_name == name
    assert [a.addr_spec for a in parsed["To"].addresses] == [
        f"{local}@example.net",
        "second@example.net",
    ]
    assert parsed["Message-ID"] == composed.message_id
    for subtype, given_ in (("plain", text), ("html", html)):
        part = parsed.get_body((subtype,))
        if given_ is None:
            assert part is None or part.get_content_subtype() != subtype
        else:
            assert part is not None
            assert _normal(part.get_content()) == _normal(given_)
    read = process(data, did="did:plc:x", operator_domain="relay.test", hostname="h", now=0.0)
    assert read.tags == tuple(tag_list)
    assert read.metadata == req.metadata
    assert read.message_id == composed.message_id


@settings(max_examples=100, deadline=None)
@given(
    before=st.text(_chars, max_size=20),
    control=st.sampled_from([chr(c) for c in (*range(0, 9), *range(10, 32), 127)]),
    after=st.text(_chars, max_size=20),
    where=st.sampled_from(["subject", "header", "name"]),
)
def test_a_control_character_in_any_header_value_is_refused(
    before: str, control: str, after: str, where: str
) -> None:
    """A CR or LF would let a client write a header of its choosing (an X-Atmos-Category
    that turns bulk mail transactional, say); every C0 control but tab is refused."""
    value = before + control + after
    body: dict[str, object] = {"from": "a@example.org", "to": "b@example.net", "text": "t"}
    if where == "subject":
        body["subject"] = value
    elif where == "header":
        body["headers"] = {"X-Note": value}
    else:
        body["from"] = f"{value.replace('<', '').replace('>', '')} <a@example.org>"
    with pytest.raises(ComposeError, match="control character"):
        compose(SendRequest.model_validate(body), hostname="mx.test")
