#!/usr/bin/env python3
"""check-telemetry-bounds: HTTP handler modules reach storage only through interfaces.

The design's CI guard (``cmd/check-telemetry-bounds``): the Telemetry API's HTTP
layer must not import the Postgres or S3 drivers, nor the storage implementations,
directly; it uses the swap-point interfaces (``storage.blobs.BlobStore``,
``storage.bus.Bus``) and the factory ``telemetry.wiring``, which picks an
implementation from configuration.

Checked modules (the HTTP layer of the Telemetry API):
``telemetry/app.py`` (the handlers), ``telemetry/server.py`` (their host),
``telemetry/errors.py``, ``domain/pose_batch.py``, ``domain/media_batch.py``,
``telemetry/connection_close.py``, ``telemetry/auth/__init__.py``, ``domain/privacy.py``,
``telemetry/tls.py``.

Not checked, on purpose: ``telemetry/sink_app.py`` is the Core API side's bus
receiver (writing Postgres under RLS is its job, see docs/postgres.md), and
``telemetry/cli.py``/``demo.py`` are tools that build storage through
``telemetry.wiring``.

Two rules, both AST-based (no module is imported or executed):

1. **direct**: no ``import``/``from ... import`` of a forbidden module anywhere in
   a checked file -- module level, inside functions, under ``if TYPE_CHECKING`` --
   including relative imports, ``from storage import pg`` and
   ``importlib.import_module("...")``/``__import__("...")`` with a literal name;
2. **transitive**: no forbidden module reachable from a checked file through
   *module-level* imports of first-party modules (``telemetry``, ``actors``,
   ``storage``), so a handler cannot launder a driver import through a helper.
   Imports inside functions are deferred and belong to the factory
   (``telemetry.wiring`` imports ``storage.s3`` lazily), so they are not followed.

Usage: ``python scripts/check_bounds.py [--root DIR] [FILE ...]`` (files relative to
the root; default the list above). Exit 0 when clean; exit 1 listing every
violation as ``path:line: ...``; exit 2 if a checked file is missing or unparsable.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HTTP_LAYER = (
    "telemetry/app.py",
    "telemetry/server.py",
    "telemetry/errors.py",
    "domain/pose_batch.py",
    "domain/media_batch.py",
    "telemetry/connection_close.py",
    "telemetry/auth/__init__.py",  # keys, verify, mint: through its imports
    "domain/privacy.py",
    "telemetry/tls.py",
)
# Drivers and SDKs: a match on the top-level package name.
FORBIDDEN_PACKAGES = frozenset({
    "boto3", "botocore", "aiobotocore", "s3transfer", "moto",
    "psycopg", "psycopg2", "psycopg_pool", "asyncpg", "pgserver",
})
# Storage implementations: a match on the module or any submodule.
FORBIDDEN_MODULES = frozenset({
    "storage.s3", "storage.pg", "storage.sink", "storage.http_bus", "storage.migrate",
})
FIRST_PARTY = frozenset({"telemetry", "actors", "storage"})


@dataclass(frozen=True)
class Import:
    module: str
    line: int
    top_level: bool  # executed when the module is imported (not in a def/lambda)


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def forbidden(module: str) -> bool:
    top = module.split(".", 1)[0]
    if top in FORBIDDEN_PACKAGES:
        return True
    return any(module == m or module.startswith(m + ".") for m in FORBIDDEN_MODULES)


def module_name(root: Path, path: Path) -> str:
    rel = path.resolve().relative_to(root.resolve()).with_suffix("")
    parts = list(rel.parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, this_module: str, is_package: bool) -> Iterator[Import]:
    """Every import in ``tree`` as absolute module names (``from a import b`` yields
    ``a`` and ``a.b``, since ``b`` may be a submodule)."""
    package = this_module if is_package else this_module.rpartition(".")[0]

    def resolve(level: int, module: str | None) -> str:
        if level == 0:
            return module or ""
        base = package.split(".") if package else []
        if level > 1:
            base = base[: len(base) - (level - 1)]
        return ".".join([*base, *([module] if module else [])])

    def visit(node: ast.AST, top: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno, top)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.level, node.module)
            if base:
                yield Import(base, node.lineno, top)
            for alias in node.names:
                if alias.name != "*":
                    yield Import(f"{base}.{alias.name}" if base else alias.name, node.lineno, top)
        elif isinstance(node, ast.Call):
            func = node.func
            name = (func.id if isinstance(func, ast.Name)
                    else func.attr if isinstance(func, ast.Attribute) else "")
            if (name in ("import_module", "__import__") and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                yield Import(node.args[0].value, node.lineno, top)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            top = False
        for child in ast.iter_child_nodes(node):
            # `if TYPE_CHECKING:` bodies never run; only the direct rule sees them.
            child_top = top and not (isinstance(node, ast.If) and _is_type_checking(node.test)
                                     and child in node.body)
            yield from visit(child, child_top)

    yield from visit(tree, True)


def _source_of(root: Path, module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] not in FIRST_PARTY:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def check(root: Path, files: list[str]) -> list[Violation]:
    """All violations for the checked ``files`` (paths relative to ``root``).

    Raises ``FileNotFoundError`` for a missing checked file and ``SyntaxError`` for
    an unparsable one; first-party modules reached transitively that cannot be
    found (third-party or generated) are skipped."""
    violations: list[Violation] = []
    parsed: dict[Path, list[Import]] = {}

    def imports_of(path: Path) -> list[Import]:
        if path not in parsed:
            mod = module_name(root, path)
            parsed[path] = list(imports(_parse(path), mod, path.name == "__init__.py"))
        return parsed[path]

    for rel in files:
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"checked module {rel} does not exist under {root}")
        shown = path.relative_to(root).as_posix()
        reported: set[tuple[str, int]] = set()  # one report per offending statement
        for imp in imports_of(path):
            if forbidden(imp.module) and (shown, imp.line) not in reported:
                reported.add((shown, imp.line))
                violations.append(Violation(
                    shown, imp.line, f"imports {imp.module} directly; HTTP handlers use the "
                    "storage interfaces (storage.blobs, storage.bus, telemetry.wiring)"))
        # transitive, through module-level first-party imports; chain = (line, names)
        seen: set[Path] = {path}
        queue: list[tuple[Path, int, tuple[str, ...]]] = [(path, 0, ())]
        while queue:
            current, first_line, chain = queue.pop(0)
            for imp in imports_of(current):
                if not imp.top_level:
                    continue
                line = imp.line if current == path else first_line
                if current != path and forbidden(imp.module):
                    where = current.relative_to(root).as_posix()
                    if (where, imp.line) not in reported:
                        reported.add((where, imp.line))
                        violations.append(Violation(
                            shown, line, f"reaches {imp.module} through module-level imports "
                            f"{' -> '.join(chain)} ({where}:{imp.line})"))
                    continue
                # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
                parts = imp.module.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    src = _source_of(root, name)
                    if src is not None and src not in seen:
                        seen.add(src)
                        queue.append((src, line, (*chain, name)))
    return violations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="repository root (default: this script's parent's parent)")
    parser.add_argument("files", nargs="*", help="modules to check, relative to the root")
    args = parser.parse_args(argv)
    files = args.files or list(HTTP_LAYER)
    try:
        violations = check(args.root, files)
    except (OSError, SyntaxError) as exc:
        print(f"check-telemetry-bounds: {exc}", file=sys.stderr)
        return 2
    for v in violations:
        print(v)
    if violations:
        print(f"check-telemetry-bounds: {len(violations)} violation(s) in the HTTP layer",
              file=sys.stderr)
        return 1
    print(f"check-telemetry-bounds: ok ({len(files)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
