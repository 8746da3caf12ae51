"""Personal data never reaches a log line: keyed pseudonyms and truncated IPs.

A pseudonym is an HMAC-SHA256 of the identifier under a key from configuration
(``TELEMETRY_PSEUDONYM_KEY``): stable within a deployment so one patient's lines
can be correlated, useless to anyone without the key, and changed by rotating it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress


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
