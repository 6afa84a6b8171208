"""Promises about the code's shape that review alone would let slip."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_journal_knows_nothing_of_mail() -> None:
    files = sorted((ROOT / "journal").rglob("*.py"))
    assert len(files) >= 8
    offenders = [str(p.relative_to(ROOT)) for p in files if "atmosrelay" in _imports(p)]
    assert not offenders


def test_journal_core_imports_no_trio() -> None:
    # Only the group-commit facade touches trio; the core runs in CLI tools and threads.
    for name in ("_format.py", "_segment.py", "_log.py", "_fs.py", "_inspect.py", "testing.py"):
        assert "trio" not in _imports(ROOT / "journal" / name), name


def test_modules_stay_small() -> None:
    big = {
        str(p.relative_to(ROOT)): n
        for p in [*ROOT.glob("atmosrelay/**/*.py"), *ROOT.glob("journal/**/*.py")]
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not big, f"split these modules: {big}"


SANS_IO_FORBIDDEN = {
    "trio",
    "socket",
    "ssl",
    "time",
    "logging",
    "asyncio",
    "selectors",
    "threading",
    "subprocess",
}


def test_smtp_package_is_sans_io() -> None:
    files = sorted((ROOT / "atmosrelay" / "smtp").glob("*.py"))
    assert len(files) >= 8
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & SANS_IO_FORBIDDEN) for p in files}
    assert not {k: v for k, v in offenders.items() if v}


def test_state_changes_only_through_the_table() -> None:
    """Outside _states.py, ``self.state`` is set only from next_state(), to a terminal state
    (CLOSED/ERROR: EOF, a broken peer), or to the initial state in __init__."""
    allowed_names = {"CLOSED", "ERROR", "GREETING", "CONNECTED"}
    bad = []
    for path in (ROOT / "atmosrelay" / "smtp").glob("*.py"):
        if path.name == "_states.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Assign):
                continue
            targets = [
                t for t in node.targets if isinstance(t, ast.Attribute) and t.attr == "state"
            ]
            if not targets:
                continue
            value = node.value
            ok = (
                (
                    isinstance(value, ast.Call)
                    and isinstance(value.func, ast.Name)
                    and value.func.id == "next_state"
                )
                or (isinstance(value, ast.Attribute) and value.attr in allowed_names)
                or (
                    isinstance(value, ast.IfExp)
                    and all(
                        isinstance(v, ast.Attribute) and v.attr in allowed_names
                        for v in (value.body, value.orelse)
                    )
                )
            )
            if not ok:
                bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"state set outside the table: {bad}"


def test_policy_is_pure() -> None:
    """policy/ decides; it never reads the disk, the network or the clock (``now`` is an
    argument), so every rule is testable over a fake clock without sockets."""
    files = [
        *sorted((ROOT / "atmosrelay" / "policy").glob("*.py")),
        ROOT / "atmosrelay/refusals.py",
    ]
    assert len(files) >= 8
    forbidden = SANS_IO_FORBIDDEN | {"os", "sqlite3", "pathlib", "random"}
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & forbidden) for p in files}
    assert not {k: v for k, v in offenders.items() if v}
    for p in files:  # nor the store, the queue or the sessions
        imported = {
            node.module
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not {
            m
            for m in imported
            if m.startswith(
                (
                    "atmosrelay.accounts",
                    "atmosrelay.queue",
                    "atmosrelay.server",
                    "atmosrelay.submission",
                )
            )
        }, p


def test_the_queue_state_changes_only_by_folding_records() -> None:
    """Outside queue/, code only reads the queue state's messages: the schedule,
    postponements and retries live in queue/schedule.py, owned by delivery, and the fold
    steps are QueueStore's (this caught dispatcher.py and runtime.py calling
    ``state.schedule`` and ``state.retry_now``)."""
    offenders = []
    for p in ROOT.glob("atmosrelay/**/*.py"):
        if p.parent.name == "queue":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)):
                continue
            owner = node.value.value
            of_queue = (isinstance(owner, ast.Name) and owner.id == "queue") or (
                isinstance(owner, ast.Attribute) and owner.attr == "queue"
            )
            if node.value.attr == "state" and of_queue and node.attr != "messages":
                offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} state.{node.attr}")
    assert not offenders
