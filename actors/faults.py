"""Fault injection for tests only: kill the process at a named finalisation step.

OFF unless ``TELEMETRY_FAULT_KILL_AT`` is set; never set it in a deployment. It
names one or more steps (comma-separated) of :func:`actors.finalise.finalise`:

* ``upload``: the ``upload`` state is on disk, the blob is not yet written;
* ``after_upload``: the blob is stored and verified, the state still says ``upload``;
* ``after_publish``: the event is in the outbox, the state still says ``publish``;
* ``before_remove``: the ended summary is kept, the session's log and state are not
  yet removed.

:func:`maybe_die` at a named step writes one line to stderr and ends the process
with ``os._exit(137)``: no cleanup, no flush, no ``finally`` blocks, like SIGKILL
(exit status 128 + 9). The variable is read once, at import; an unknown step name
raises at import, so a typo cannot make a fault-injection test pass vacuously.
``tests/test_faults.py`` uses it.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["ENV", "STEPS", "maybe_die"]

ENV: Final = "TELEMETRY_FAULT_KILL_AT"
STEPS: Final = ("upload", "after_upload", "after_publish", "before_remove")
EXIT_STATUS: Final = 137


def _parse(value: str) -> frozenset[str]:
    steps = frozenset(s.strip() for s in value.split(",") if s.strip())
    unknown = steps - set(STEPS)
    if unknown:
        raise ValueError(f"{ENV}: unknown step(s) {sorted(unknown)}; known: {', '.join(STEPS)}")
    return steps


_KILL_AT: Final = _parse(os.environ.get(ENV, ""))


def maybe_die(step: str) -> None:
    """End the process at once if ``TELEMETRY_FAULT_KILL_AT`` names ``step``."""
    if step in _KILL_AT:
        os.write(2, f"fault injection: killed at {step}\n".encode())
        os._exit(EXIT_STATUS)
