"""docs/policy.md's refusal table says what atmosrelay/refusals.py does, row for row."""

from __future__ import annotations

from pathlib import Path

from atmosrelay.refusals import TABLE, Code

DOC = Path(__file__).resolve().parents[1] / "docs" / "policy.md"


def test_the_documented_refusal_table_is_the_code() -> None:
    text = DOC.read_text()
    start = text.index("<!-- refusal-table")
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text[start:].splitlines()[3:]
        if line.startswith("| ")
    ]
    rows = rows[: len(Code)]
    documented = {r[0]: (r[1], int(r[2]), r[3] == "yes") for r in rows}
    actual = {
        code.value: (
            f"{e.reply.code} {e.reply.enhanced}" if e.smtp else "HTTP only",
            e.http_status,
            e.retryable,
        )
        for code, e in TABLE.items()
    }
    assert documented == actual
