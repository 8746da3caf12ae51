"""How one setting is declared, and the loading and checking that follow from it.

A setting is one field of the frozen ``Settings`` dataclass (telemetry/config.py) whose
default is :func:`setting`: the field holds the attribute name, type and default, and
its metadata the :class:`Spec` (variable, doc, parser, bounds, secrecy). Everything else
is derived from those fields: :func:`load` (environment -> constructor arguments),
:func:`validate` (bounds of any instance, however it was built), the Markdown tables and
``telemetry config`` (telemetry/config_report.py). This module names no setting.

Errors: parsers and checks raise :class:`ConfigError` whose message starts with the
variable's name; nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from domain.claims import is_safe_id

META = "telemetry.setting"


class ConfigError(ValueError):
    """A configuration variable is missing or malformed; the message names it."""


# A parser turns the variable's text into the attribute's value; a check refuses a value
# out of bounds. Both take the variable's name first, for the message.
Parse = Callable[[str, str], Any]
Check = Callable[[str, Any], None]


def text(name: str, raw: str) -> str:
    return raw


def path(name: str, raw: str) -> Path:
    return Path(raw)


def integer(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def number(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    # float() takes "inf" and "nan": an infinite leeway or lifetime would switch a check
    # off rather than bound it, so no setting accepts them.
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    return value


@dataclass(frozen=True)
class AtLeast:
    """A lower bound; NaN and infinities are refused too. ``str()`` is what the docs
    print."""

    minimum: float

    def __call__(self, name: str, value: Any) -> None:
        try:
            ok = value >= self.minimum
        except TypeError:  # a Settings built directly with a value of the wrong type
            raise ConfigError(f"{name}={value!r} is not a number") from None
        # Also for a Settings built directly (from_env's parser already refuses them).
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value} is not a finite number")
        if not ok:
            raise ConfigError(f"{name}={value} is below the minimum {self.minimum}")

    def __str__(self) -> str:
        return f">= {self.minimum:g}"


@dataclass(frozen=True)
class Between(AtLeast):
    """A lower and an upper bound, both inclusive."""

    maximum: float

    def __call__(self, name: str, value: Any) -> None:
        super().__call__(name, value)
        if value > self.maximum:
            raise ConfigError(f"{name}={value} is above the maximum {self.maximum}")

    def __str__(self) -> str:
        return f"{self.minimum:g} to {self.maximum:g}"


@dataclass(frozen=True)
class MinBytes:
    """A secret of at least ``minimum`` bytes. The message gives only its length."""

    minimum: int

    def __call__(self, name: str, value: Any) -> None:
        if not isinstance(value, bytes):
            raise ConfigError(f"{name} is a {type(value).__name__}, not bytes")
        if len(value) < self.minimum:
            raise ConfigError(f"{name} is {len(value)} bytes; at least {self.minimum} "
                              "are needed")

    def __str__(self) -> str:
        return f">= {self.minimum} bytes"


@dataclass(frozen=True)
class OneOf:
    """An enumeration; the first value is listed first in the docs, nothing more.
    ``unset_ok``: ``None`` (an optional setting left unset) is accepted too."""

    allowed: tuple[str, ...]
    unset_ok: bool = False

    def __call__(self, name: str, value: Any) -> None:
        if value is None and self.unset_ok:
            return
        if value not in self.allowed:
            raise ConfigError(f"{name}={str(value)[:20]!r}: must be one of {self.allowed}")

    def __str__(self) -> str:
        return "one of " + ", ".join(f"`{a}`" for a in self.allowed)


@dataclass(frozen=True)
class SafeId:
    """Empty (unset), or a safe id: ``[A-Za-z0-9_.-]``, 1-128 characters."""

    def __call__(self, name: str, value: Any) -> None:
        if value and not is_safe_id(str(value)):
            raise ConfigError(f"{name}={str(value)[:20]!r}: not a safe id "
                              "([A-Za-z0-9_.-], 1-128 characters)")

    def __str__(self) -> str:
        return "a safe id"


@dataclass(frozen=True)
class SubsetOf:
    """A non-empty tuple drawn from ``allowed``."""

    allowed: frozenset[str]

    def __call__(self, name: str, value: Any) -> None:
        if not value or not set(value) <= self.allowed:
            raise ConfigError(f"{name}={','.join(map(str, value or ()))!r}: "
                              f"only {sorted(self.allowed)} are supported")

    def __str__(self) -> str:
        return "some of " + ", ".join(f"`{a}`" for a in sorted(self.allowed))


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# libpq's other notation (psycopg takes it as DATABASE_URL): ``host=db password=pw``.
_CONNINFO = re.compile(r"\s*\w+\s*=")
# A keyword naming a password (``password``, ``sslpassword``) and its value: a single-quoted
# string with backslash escapes (unterminated: to the end) or a word, in which a backslash
# escapes the next character (a space too), as libpq reads them.
_CONNINFO_PASSWORD = re.compile(
    r"(?i)\b(\w*password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:\\.|[^\s\\])*\\?)")
HIDDEN = "(not a URL, hidden)"


def redact_url(value: str) -> str:
    """``value`` with any password in it (``user:PASSWORD@``, ``?password=``, libpq's
    ``password=`` keyword) replaced by ``***``; what is neither a ``scheme://`` URL nor
    ``keyword=value`` pairs is hidden whole rather than risk a secret (``user:pw@host``
    without a scheme parses as a URL without a password)."""
    if not _URL.match(value):
        if not _CONNINFO.match(value):
            return HIDDEN
        return _CONNINFO_PASSWORD.sub(r"\1***", value)
    try:
        parts = urlsplit(value)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{parts.username}:***@{host}")
        if "password" in parts.query.lower():
            query = [(k, "***" if k.lower().endswith("password") else v)
                     for k, v in parse_qsl(parts.query, keep_blank_values=True)]
            parts = parts._replace(query=urlencode(query, safe="*"))
        out = urlunsplit(parts)
    except ValueError:
        return HIDDEN
    # urlsplit lowercases the scheme; keep it as written (``NATS://`` is refused for it).
    scheme = len(parts.scheme)
    return value[:scheme] + out[scheme:] if out[:scheme] == value[:scheme].lower() else out


def masked_url(value: str | None) -> str:
    return "(unset)" if value is None else redact_url(value)


def plain(value: Any) -> str:
    """A value as ``telemetry config`` prints it: in the variable's own notation."""
    if value is None:
        return "(unset)"
    if value == "":
        return '""'
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(none)"
    if isinstance(value, Mapping):
        return "kids " + ", ".join(value) if value else "(none)"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return str(value)


def hidden(value: Any) -> str:
    return "(hidden)" if value else "(unset)"


@dataclass(frozen=True)
class Spec:
    """Everything about a setting except its attribute name, type and default."""

    env: str  # the environment variable
    doc: str  # one sentence or two, Markdown, for the tables
    shown: str  # the default as the tables print it
    parse: Parse
    check: Check | None  # also run on every Settings built directly
    blank_is_unset: bool  # whether VAR= (empty) means the default
    secret: bool  # never printed: only whether it is set
    show: Callable[[Any], str]
    allowed: str  # the bounds, as the docs print them
    # When unset: computed from the other attributes (a lookup by attribute name).
    derive: Callable[[Callable[[str], Any]], Any] | None


def _shown(default: Any) -> str:
    if default is None or default == () or default == "":
        return "(none)"
    return plain(default)


def setting(env: str, default: Any = MISSING, *, doc: str, shown: str | None = None,
            factory: Callable[[], Any] | None = None, parse: Parse = text,
            check: Check | None = None, blank_is_unset: bool = False, secret: bool = False,
            show: Callable[[Any], str] | None = None,
            derive: Callable[[Callable[[str], Any]], Any] | None = None,
            allowed: str | None = None, in_repr: bool | None = None) -> Any:
    """A ``Settings`` field declared with everything the project derives from it.

    ``default`` (or ``factory`` for a mutable or random default) is the attribute's
    default; ``shown`` overrides how the tables print it. ``parse`` turns the variable's
    text into the value and ``check`` bounds it (``AtLeast``, ``OneOf``); ``allowed``
    describes what ``parse`` accepts when ``check`` does not say. ``derive`` computes the
    value when the variable is unset. A ``secret`` is kept out of ``repr`` and out of
    ``telemetry config``, which prints it with ``show`` (default: only whether it is set).
    """
    spec = Spec(env=env, doc=doc,
                shown=shown if shown is not None else _shown(default),
                parse=parse, check=check, blank_is_unset=blank_is_unset, secret=secret,
                show=show or (hidden if secret else plain),
                allowed=allowed if allowed is not None else str(check or ""), derive=derive)
    use_repr = not secret if in_repr is None else in_repr
    if factory is not None:
        return field(default_factory=factory, repr=use_repr, metadata={META: spec})
    return field(default=default, repr=use_repr, metadata={META: spec})


@cache
def specs(cls: type) -> tuple[tuple[Field[Any], Spec], ...]:
    """The declared settings of ``cls``, in declaration order."""
    return tuple((f, f.metadata[META]) for f in fields(cls) if META in f.metadata)


@cache
def _checks(cls: type) -> tuple[tuple[str, str, Check], ...]:
    return tuple((f.name, s.env, s.check) for f, s in specs(cls) if s.check is not None)


def validate(instance: Any) -> None:
    """Raise :class:`ConfigError` if an attribute of ``instance`` is out of its bounds.

    Only bounds and enumerations: contents that have their own owner (keysets: the key
    store; certificates: the TLS loader) are checked there, so a test can still build a
    deliberately broken one and watch that owner refuse it.
    """
    for attr, env, check in _checks(type(instance)):
        try:
            check(env, getattr(instance, attr))
        except ConfigError as exc:
            raise ConfigError(f"Settings.{attr}: {exc}") from None


def default_of(f: Field[Any]) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def is_set(spec: Spec, env: Mapping[str, str]) -> bool:
    raw = env.get(spec.env)
    return raw is not None and not (raw == "" and spec.blank_is_unset)


def source(spec: Spec, env: Mapping[str, str]) -> str:
    """Where a setting's value comes from: ``env``, ``derived`` or ``default``."""
    if is_set(spec, env):
        return "env"
    return "derived" if spec.derive is not None else "default"


def load(cls: type, env: Mapping[str, str]) -> dict[str, Any]:
    """Constructor arguments of ``cls`` for what ``env`` sets (and what derives from it);
    everything else is left to the field defaults. Raises :class:`ConfigError`."""
    by_name = {f.name: f for f, _ in specs(cls)}
    values: dict[str, Any] = {}

    def lookup(attr: str) -> Any:
        return values[attr] if attr in values else default_of(by_name[attr])

    for f, spec in specs(cls):
        if is_set(spec, env):
            value = spec.parse(spec.env, env[spec.env])
            if spec.check is not None:
                spec.check(spec.env, value)
            values[f.name] = value
        elif spec.derive is not None:
            values[f.name] = spec.derive(lookup)
    return values
