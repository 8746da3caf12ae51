# RestartiX Telemetry service image (Fargate task behind the session router and the ALB;
# deploy/aws/task-definition.json, docs/affinity.md).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY telemetry ./telemetry
COPY actors ./actors
COPY storage ./storage
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 telemetry \
 && mkdir -p /var/lib/telemetry \
 && chown telemetry /var/lib/telemetry \
 && chmod 0700 /var/lib/telemetry
COPY --from=build /install /usr/local
# The data directory (spool, outbox) is the only place the service writes, so the task
# runs with a read-only root filesystem and mounts a volume here. Fargate creates a bind
# mount root-owned 0755 unless the image declares the path as a VOLUME: then it takes
# this directory's owner and mode (ECS developer guide, "Use bind mounts").
VOLUME ["/var/lib/telemetry"]
USER telemetry
ENV TELEMETRY_HOST=0.0.0.0 TELEMETRY_PORT=8080 TELEMETRY_DATA_DIR=/var/lib/telemetry
EXPOSE 8080
# Liveness only (/v1/healthz): /v1/readyz turns 503 while draining, which must take the
# instance out of the router, not get the container killed. ECS runs the check in the
# task definition; this one serves `docker run` and compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/v1/healthz', timeout=3).status == 200 else 1)"]
# SIGTERM starts the ordered drain (telemetry/server.py): hypercorn's graceful timeout
# (10 s), then TELEMETRY_SHUTDOWN_DEADLINE_S (25 s) for the live sessions, then 3 s for
# the outbox; all inside the task's stopTimeout (60 s; Fargate allows at most 120 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["telemetry", "serve"]
