#!/usr/bin/env python3
"""check-bounds: the service's layers, enforced by directory (see docs/architecture.md).

The rules are declared once, below, by directory: ``LAYERS`` (what each package may
import), ``STORAGE_INTERFACES`` (the storage modules the actors may use), and
``WIRING_MODULES`` with ``HANDLER_FORBIDDEN`` (what the HTTP handlers must not reach).
Every ``.py`` file under ``domain/``, ``storage/``, ``actors/`` and ``telemetry/`` is
checked; a new module is covered the day it is created.

Four rules, all on the AST (no module is imported or executed):

``layer``
    A module imports a first-party module its directory may not import. Every import
    counts: module level, inside functions, under ``if TYPE_CHECKING``, relative,
    ``importlib.import_module("...")``/``__import__("...")`` with a literal name. A
    deferred import is still a dependency of the layer.
``driver``
    A module imports a third-party package its directory may not import (the domain
    does no I/O; the actors reach storage only through the interfaces).
``handler``
    An HTTP handler module (every ``telemetry/`` module except ``WIRING_MODULES``)
    imports a driver or a storage implementation, directly (any import, as above) or
    transitively through *module-level* first-party imports, so a helper cannot
    launder it. Imports inside functions are deferred and belong to the factory
    (``telemetry.wiring`` imports ``storage.s3`` lazily), so they are not followed.
``cycle``
    First-party modules import each other in a cycle. Every import is an edge,
    deferred ones included (a deferred import that closes a cycle only hides it);
    each strongly connected group is reported once, with one cycle through it.

Usage: ``python scripts/check_bounds.py [--root DIR]``. Exit 0 when clean; exit 1
listing every violation as ``path:line: rule: message``; exit 2 if a file is
unparsable or the root holds none of the layer directories.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# --- The rules ---------------------------------------------------------------------

# I/O drivers and SDKs (a match on the top-level package name): the databases, the
# object store, the bus transports.
DRIVERS = frozenset({
    "boto3", "botocore", "aiobotocore", "s3transfer", "moto",
    "psycopg", "psycopg2", "psycopg_pool", "asyncpg", "pgserver",
    "nats", "httpx",
})
# The async runtime and the web stack: the domain is pure data, codecs and rules.
IO_FRAMEWORKS = frozenset({
    "trio", "anyio", "asyncio", "hypercorn", "quart", "quart_trio", "werkzeug",
    "wsproto", "h11", "h2", "socket", "ssl",
})

# The storage modules the actors may import, and why each is an interface rather than
# an implementation. Everything else in storage/ is an adapter that only the wiring
# layer (telemetry/wiring.py and the entry points) constructs: storage.spool (the
# local Journal adapter), storage.outbox, storage.s3, storage.pg, storage.sink,
# storage.http_bus, storage.migrate, storage.fsutil (fsync helpers for adapters; an
# actor that needs to fsync is doing an adapter's job).
STORAGE_INTERFACES: dict[str, str] = {
    "storage.journal": "the Journal interface between admission and the spool",
    "storage.ownership": "fleet mode's Ownership and FencedJournal interfaces",
    "storage.blobs": "the BlobStore interface and the blob key scheme (its filesystem "
                     "adapter shares the module and needs only the standard library)",
    "storage.bus": "the Bus interface, the Event and its errors (the in-process bus "
                   "shares the module)",
    "storage.replay": "the replay blob format, encoded and decoded in memory",
    "storage.replay_codec": "the replay chunk codecs, pure format code",
}


@dataclass(frozen=True)
class Layer:
    may_import: tuple[str, ...]  # first-party modules, each with its submodules
    no_packages: frozenset[str]  # third-party top-level packages it must not import


# Bottom to top. A first-party import outside ``may_import`` is a ``layer`` violation.
LAYERS: dict[str, Layer] = {
    "domain": Layer(("domain",), DRIVERS | IO_FRAMEWORKS),
    "storage": Layer(("domain", "storage"), frozenset()),
    "actors": Layer(("domain", "actors", *STORAGE_INTERFACES), DRIVERS),
    "telemetry": Layer(("domain", "storage", "actors", "telemetry"), frozenset()),
}
# Project code outside the layers: nothing shipped may import it.
OTHER_FIRST_PARTY = frozenset({"bench", "tests", "scripts"})

# telemetry/ modules that wire storage or run beside the request path; a path ending
# in "/" covers a directory. Every other telemetry/ module is an HTTP handler module.
WIRING_MODULES = (
    "telemetry/wiring.py",    # the factory: picks and builds the storage adapters
    "telemetry/cli.py",       # the entry point
    "telemetry/sink_app.py",  # the Core API side's bus receiver: writes Postgres by design
    "telemetry/dev/",         # the demo, the synthetic generator, the plots
)
# What a handler must not reach: the drivers and the storage implementations.
HANDLER_FORBIDDEN_PACKAGES = DRIVERS
HANDLER_FORBIDDEN_MODULES = (
    "storage.s3", "storage.pg", "storage.sink", "storage.http_bus", "storage.migrate",
    "storage.jetstream", "storage.jetstream_client", "storage.jetstream_bridge",
)

# --- The machinery -------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement: ``import module`` (``names`` empty) or
    ``from module import names``, made absolute."""

    module: str
    names: tuple[str, ...]
    line: int
    top_level: bool  # executed when the module is imported (not in a def/lambda/TYPE_CHECKING)

    def candidates(self) -> list[str]:
        """Every name the statement may load (``from a import b``: ``a`` and ``a.b``,
        since ``b`` may be a submodule)."""
        return [self.module, *(f"{self.module}.{n}" for n in self.names)]


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.message}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, this_module: str, is_package: bool) -> Iterator[Import]:
    """Every import statement in ``tree``, with absolute module names."""
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
                yield Import(alias.name, (), node.lineno, top)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node.level, node.module)
            names = tuple(a.name for a in node.names if a.name != "*")
            if base:
                yield Import(base, names, node.lineno, top)
            else:  # `from . import x` at the top of the tree: each name is a module
                for name in names:
                    yield Import(name, (), node.lineno, top)
        elif isinstance(node, ast.Call):
            func = node.func
            name = (func.id if isinstance(func, ast.Name)
                    else func.attr if isinstance(func, ast.Attribute) else "")
            if (name in ("import_module", "__import__") and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                yield Import(node.args[0].value, (), node.lineno, top)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            top = False
        for child in ast.iter_child_nodes(node):
            # `if TYPE_CHECKING:` bodies never run; only the direct rules see them.
            child_top = top and not (isinstance(node, ast.If) and _is_type_checking(node.test)
                                     and child in node.body)
            yield from visit(child, child_top)

    yield from visit(tree, True)


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


class Tree:
    """The first-party modules under ``root``: their files and parsed imports.

    Raises ``SyntaxError``/``ValueError``/``OSError`` for an unparsable file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: dict[str, Path] = {}
        for package in LAYERS:
            if (root / package).is_dir():
                for path in sorted((root / package).rglob("*.py")):
                    self.modules[self._name(path)] = path
        self.imports = {m: self._parse(m, p) for m, p in self.modules.items()}

    def _name(self, path: Path) -> str:
        parts = list(path.relative_to(self.root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)

    def _parse(self, module: str, path: Path) -> list[Import]:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        return list(imports(tree, module, path.name == "__init__.py"))

    def rel(self, module: str) -> str:
        return self.modules[module].relative_to(self.root).as_posix()

    def targets(self, imp: Import) -> list[str]:
        """The first-party modules a statement names: ``from a import b`` is ``a.b``
        when that is a module, else ``a`` itself. A missing module keeps its written
        name (a layer rule still applies to it)."""
        if imp.module.split(".", 1)[0] not in (*LAYERS, *OTHER_FIRST_PARTY):
            return []
        found = [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in self.modules]
        if len(found) < len(imp.names) or not imp.names:
            found.insert(0, imp.module)
        return found


def check_layers(tree: Tree) -> Iterator[Violation]:
    for module, imps in tree.imports.items():
        layer_name = module.split(".", 1)[0]
        layer = LAYERS[layer_name]
        for imp in imps:
            top = imp.module.split(".", 1)[0]
            if top in layer.no_packages:
                yield Violation(tree.rel(module), imp.line, "driver",
                                f"{layer_name}/ imports {imp.module}; it may not import "
                                f"{', '.join(sorted(layer.no_packages))}")
            for target in tree.targets(imp):
                if not _within(target, layer.may_import):
                    yield Violation(tree.rel(module), imp.line, "layer",
                                    f"{layer_name}/ imports {target}; it may import only "
                                    f"{', '.join(layer.may_import)}")


def _handler_forbidden(name: str) -> bool:
    return (name.split(".", 1)[0] in HANDLER_FORBIDDEN_PACKAGES
            or _within(name, HANDLER_FORBIDDEN_MODULES))


def is_handler(rel: str) -> bool:
    return rel.startswith("telemetry/") and not any(
        rel.startswith(w) if w.endswith("/") else rel == w for w in WIRING_MODULES)


def check_handlers(tree: Tree) -> Iterator[Violation]:
    for start in tree.modules:
        shown = tree.rel(start)
        if not is_handler(shown):
            continue
        reported: set[tuple[str, int]] = set()  # one report per offending statement
        for imp in tree.imports[start]:
            bad = next((c for c in imp.candidates() if _handler_forbidden(c)), None)
            if bad and (shown, imp.line) not in reported:
                reported.add((shown, imp.line))
                yield Violation(shown, imp.line, "handler",
                                f"imports {bad}; HTTP handlers use the storage interfaces "
                                "(storage.blobs, storage.bus) built by telemetry.wiring")
        # transitive, through module-level first-party imports; chain = names followed
        seen = {start}
        queue: deque[tuple[str, int, tuple[str, ...]]] = deque([(start, 0, ())])
        while queue:
            current, first_line, chain = queue.popleft()
            for imp in tree.imports[current]:
                if not imp.top_level:
                    continue
                line = imp.line if current == start else first_line
                bad = next((c for c in imp.candidates() if _handler_forbidden(c)), None)
                if current != start and bad:
                    where = tree.rel(current)
                    if (where, imp.line) not in reported:
                        reported.add((where, imp.line))
                        yield Violation(shown, line, "handler",
                                        f"reaches {bad} through module-level imports "
                                        f"{' -> '.join(chain)} ({where}:{imp.line})")
                    continue
                for candidate in imp.candidates():
                    # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
                    parts = candidate.split(".")
                    for i in range(1, len(parts) + 1):
                        name = ".".join(parts[:i])
                        if name in tree.modules and name not in seen:
                            seen.add(name)
                            queue.append((name, line, (*chain, name)))


def import_graph(tree: Tree) -> dict[str, dict[str, int]]:
    """module -> {imported first-party module: line of the first such import}, every
    import counted (deferred and TYPE_CHECKING ones too)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in tree.modules}
    for module, imps in tree.imports.items():
        for imp in imps:
            for target in tree.targets(imp):
                if target in tree.modules and target != module:
                    graph[module].setdefault(target, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; the groups of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def check_cycles(tree: Tree) -> Iterator[Violation]:
    graph = import_graph(tree)
    for group in strongly_connected(graph):
        members = set(group)
        start = group[0]
        # the shortest cycle through `start` inside the group (breadth first)
        parent: dict[str, str] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                break
            for w in sorted(graph[v]):
                if w in members and w not in parent and w != start:
                    parent[w] = v
                    queue.append(w)
        path = [v]
        while path[-1] != start:
            path.append(parent[path[-1]])
        path.reverse()  # start ... v, and v imports start
        hops = [f"{b} ({tree.rel(a)}:{graph[a][b]})"
                for a, b in zip(path, [*path[1:], start], strict=True)]
        message = f"{start} -> {' -> '.join(hops)}"
        if len(group) > len(path):  # more to cut than this one cycle: every import inside
            edges = [f"{a} -> {b} ({tree.rel(a)}:{line})" for a in group
                     for b, line in sorted(graph[a].items()) if b in members]
            message += f"; the group {', '.join(group)} imports: {', '.join(edges)}"
        yield Violation(tree.rel(start), graph[start][path[1]], "cycle", message)


def check(root: Path) -> list[Violation]:
    """Every violation under ``root``, sorted. Raises ``FileNotFoundError`` if the
    root holds no layer directory, ``SyntaxError``/``ValueError`` for an unparsable
    file."""
    tree = Tree(root)
    if not tree.modules:
        raise FileNotFoundError(f"no module under {root}/{{{','.join(LAYERS)}}}")
    violations = [*check_layers(tree), *check_handlers(tree), *check_cycles(tree)]
    return sorted(violations, key=lambda v: (v.path, v.line, v.rule, v.message))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="repository root (default: this script's parent's parent)")
    args = parser.parse_args(argv)
    try:
        violations = check(args.root)
    except (OSError, SyntaxError, ValueError) as exc:
        print(f"check-bounds: {exc}", file=sys.stderr)
        return 2
    for v in violations:
        print(v)
    if violations:
        counts = {r: sum(v.rule == r for v in violations)
                  for r in ("layer", "driver", "handler", "cycle")}
        print(f"check-bounds: {len(violations)} violation(s): "
              + ", ".join(f"{n} {r}" for r, n in counts.items()), file=sys.stderr)
        return 1
    print("check-bounds: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
