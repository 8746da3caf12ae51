"""The HTTP side of the service, shared by every route and both transports.

* :mod:`telemetry.http.state`: :class:`AppState`, what the handlers share;
* :mod:`telemetry.http.answers`: the two tables that turn the exception tree
  (:mod:`domain.errors`) into an answer, one per transport;
* :mod:`telemetry.http.pipeline`: the request primitives (headers, capped body,
  drain, JSON error, Retry-After, request id, counting and logging).

The Quart routes (:mod:`telemetry.app`), the raw-ASGI pose POST
(:mod:`telemetry.lean`) and the pose stream (:mod:`telemetry.stream`) all answer
through these; none of them imports another's internals.
"""
