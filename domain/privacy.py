"""Personal data never reaches a log line: keyed pseudonyms, truncated IPs, and
exception text with its literals and paths redacted.

A pseudonym is an HMAC-SHA256 of the identifier under a key from configuration
(``TELEMETRY_PSEUDONYM_KEY``): stable within a deployment so one patient's lines
can be correlated, useless to anyone without the key, and changed by rotating it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re


class Pseudonymiser:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _digest(self, kind: str, value: str) -> str:
        mac = hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256)
        return mac.hexdigest()[:16]

    def patient(self, patient_id: str) -> str:
        return "p_" + self._digest("patient", patient_id)

    def session(self, org_id: str, session_id: str) -> str:
        # Session ids are not personal data by themselves, but they join to a patient
        # in the Core API, so logs carry a pseudonym too.
        return "s_" + self._digest("session", f"{org_id}/{session_id}")


def truncate_ip(address: str | None) -> str:
    """Drop the host part: last octet of IPv4 (a /24), IPv6 to its /48."""
    if not address:
        return "-"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "invalid"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


REDACTED = "<redacted>"
# What carries an id in the text of an exception nobody wrote for a log: a quoted
# literal (a repr: KeyError('sx-1'), "key 'org/sx-1' ...") and anything path-like
# (a spool or blob key "org/session", a file path, a URL). A quote only opens a
# literal after a non-word character, so the apostrophe in "can't" does not.
_QUOTED = re.compile(r"""(?<!\w)(?:'[^'\n]*'|"[^"\n]*")""")
_PATHLIKE = re.compile(r"""[^\s'"]*[/\\][^\s'"]*""")
MAX_REDACTED_CHARS = 500


def redact(text: str) -> str:
    """``text`` fit for a log line when it may hold identifiers: quoted literals and
    path-like words become ``<redacted>``, and it is cut to 500 characters. Pattern
    based, so it cannot see a bare id in plain words: it is the second line of
    defence, behind messages that never name one (``docs/operations.md``)."""
    text = _PATHLIKE.sub(REDACTED, _QUOTED.sub(REDACTED, text))
    if len(text) > MAX_REDACTED_CHARS:
        text = text[:MAX_REDACTED_CHARS] + "..."
    return text


def exception_text(exc: BaseException) -> str:
    """An exception's message for a log line: an OSError by errno and strerror (its
    file names are paths built from ids), anything else through :func:`redact`."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else exc.strerror
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not lose the log line
        return "<unprintable>"
    return redact(text)
