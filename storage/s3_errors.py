"""Reading botocore's failures: which are worth retrying, which mean "no such object",
and how to name one in a message or log line without leaking the object key.

Pure functions of an exception; no I/O.
"""

from __future__ import annotations

from typing import Final

import botocore.exceptions as bexc

TRANSIENT_CODES: Final = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "PriorRequestNotComplete",
    }
)
TRANSIENT_EXCEPTIONS: Final = (
    bexc.ConnectionError,
    bexc.HTTPClientError,
    bexc.IncompleteReadError,
    bexc.FlexibleChecksumError,
)
NOT_FOUND_CODES: Final = frozenset({"NoSuchKey", "NotFound", "404"})


def error_code(e: BaseException) -> str:
    if isinstance(e, bexc.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def safe_reason(e: BaseException) -> str:
    """``e`` for a message or log line: the error code of an S3 reply, the type of
    anything else. Never ``str(e)``: botocore puts the request URL, object key
    included, into some of its messages (EndpointConnectionError), and keys are
    ``{org_id}/{session_id}.bin.gz``."""
    code = error_code(e)
    return f"{type(e).__name__} {code}" if code else type(e).__name__


def is_transient(e: BaseException) -> bool:
    """Worth retrying: network trouble, timeouts, 5xx and throttling replies."""
    if isinstance(e, TRANSIENT_EXCEPTIONS):
        return True
    if isinstance(e, bexc.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_code(e) in TRANSIENT_CODES or status in (500, 502, 503, 504)
    return False
