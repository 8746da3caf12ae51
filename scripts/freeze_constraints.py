#!/usr/bin/env python3
"""Write ``constraints.txt``: the exact version of every distribution the project installs.

Run with the interpreter of an environment that has the project installed with all its
extras (``python3 dev.py test`` makes one):

    .venv/bin/python scripts/freeze_constraints.py            # rewrite constraints.txt
    .venv/bin/python scripts/freeze_constraints.py --check    # exit 1 if it is stale

It is ``pip freeze --exclude-editable`` filtered to what ``pyproject.toml`` asks for:
the dependency closure of the project's requirements and all its extras, walked through
the installed distributions' own metadata with markers evaluated for this interpreter.
Tools that happen to be in the environment (pip, anything installed by hand) are left
out, so the file pins only what an install of the project resolves to.

The Dockerfile and dev.py install with ``pip install -c constraints.txt``. Upgrading a
dependency: install the new version into ``.venv``, run the tests, rerun this script.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints.txt"

HEADER = """\
# Exact versions of everything restartix-telemetry installs (all extras), for
# `pip install -c constraints.txt ...` in the Dockerfile and in dev.py.
# Generated on CPython {python} by scripts/freeze_constraints.py; do not edit by hand.
# Regenerate: .venv/bin/python scripts/freeze_constraints.py
# hypercorn is pinned on purpose: telemetry/wsdeflate.py and telemetry/connections.py
# patch its internals; upgrade it only together with tests/telemetry/test_stream.py.
"""


class MissingDistribution(RuntimeError):
    """A required distribution is not installed in this environment."""


def project_requirements(pyproject: Path = PYPROJECT) -> tuple[str, list[Requirement]]:
    """The project's name and its requirements, all extras included; self-references
    (``name[extra]`` inside an extra) are expanded, not followed as a distribution."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    name = canonicalize_name(project["name"])
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(Requirement(r) for r in extra)
    return name, [r for r in reqs if canonicalize_name(r.name) != name]


def closure(roots: list[Requirement]) -> dict[str, str]:
    """``{canonical name: installed version}`` for ``roots`` and everything they need."""
    pinned: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [(r, frozenset[str]()) for r in roots]
    while queue:
        req, parent_extras = queue.pop()
        env_ok = req.marker is None or any(
            req.marker.evaluate({"extra": e}) for e in (parent_extras or {""}))
        if not env_ok:
            continue
        key = canonicalize_name(req.name)
        extras = frozenset(canonicalize_name(e) for e in req.extras)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise MissingDistribution(f"{req.name} is required but not installed") from None
        pinned[key] = dist.version
        for raw in dist.requires or []:
            queue.append((Requirement(raw), extras))
    return pinned


def render(pins: dict[str, str]) -> str:
    python = ".".join(map(str, sys.version_info[:2]))
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    return HEADER.format(python=python) + "\n".join(lines) + "\n"


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``{canonical name: version}`` from a constraints file (``name==version`` lines)."""
    pins: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path.name}: not an exact pin: {raw!r}")
        pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def main(argv: list[str]) -> int:
    _, roots = project_requirements()
    try:
        text = render(closure(roots))
    except MissingDistribution as exc:
        print(f"freeze_constraints: {exc}; install the project with all extras first "
              "(python3 dev.py test)", file=sys.stderr)
        return 2
    if argv[:1] == ["--check"]:
        if CONSTRAINTS.read_text(encoding="utf-8") != text:
            print("constraints.txt is stale: rerun scripts/freeze_constraints.py",
                  file=sys.stderr)
            return 1
        return 0
    CONSTRAINTS.write_text(text, encoding="utf-8")
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)}: {text.count(chr(10)) - HEADER.count(chr(10))}"
          " pins")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
