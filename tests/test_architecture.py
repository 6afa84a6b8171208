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
