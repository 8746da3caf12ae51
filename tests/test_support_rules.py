"""The test rules of tests/README.md that a program can check: helpers come from
tests/support only, and no module there is a test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, dotted name) of every module ``path`` (module ``module``, by default its
    place in the tree) imports, with relative imports resolved and ``from pkg import
    name`` counted as ``pkg.name`` too (it may be a module)."""
    package = (module or _module_of(path)).rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "tests" and (parts[-1].startswith("test_") or parts[-1] == "conftest")


def test_no_test_module_imports_another_test_module() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, name in _imports(path)
        if _is_test_module(name)
    ]
    assert not offenders, "helpers belong in tests/support/:\n" + "\n".join(offenders)


def test_helpers_come_from_tests_support_or_tests_data() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, name in _imports(path)
        if name.split(".")[0] == "tests" and name != "tests"
        and name.split(".")[1] not in ("support", "data")
        and not _is_test_module(name)  # reported by the test above
    ]
    assert not offenders, "\n".join(offenders)


def test_the_guard_sees_a_test_module_import(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    for text in ("from tests.telemetry.test_http import hdr\n",
                 "from .test_http import hdr\n", "from tests.telemetry import test_http\n",
                 "import tests.conftest\n", "from ..conftest import settings\n"):
        probe.write_text(text, encoding="utf-8")
        names = [name for _, name in _imports(probe, "tests.telemetry.test_probe")]
        assert any(_is_test_module(name) for name in names), (text, names)
    probe.write_text("from tests.support.payloads import hdr\nfrom . import x\n")
    names = [name for _, name in _imports(probe, "tests.telemetry.test_probe")]
    assert not any(_is_test_module(name) for name in names), names
