# RestartiX Telemetry service image (Fargate task behind the session router and the ALB;
# deploy/aws/task-definition.json, docs/affinity.md). On a laptop, the whole distributed
# layout (service, sink, Postgres, S3, router): deploy/compose.yaml.
#
# The base image is pinned by digest (index digest of python:3.11-slim; the tag is for
# readers, the digest decides). It was taken from public Dockerfiles that build on it and
# could not be checked against Docker Hub from where it was written: verify, and move it
# deliberately, with `docker buildx imagetools inspect python:3.11-slim`.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml or
# constraints.txt change, not on every source edit. Exactly the versions in
# constraints.txt (the ones the tests ran with), and only the runtime dependencies: the
# extras (embedded = pgserver, plot = matplotlib, nats-server = the NATS binary, test)
# stay out of the image.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install --prefix=/install -c constraints.txt -r requirements.txt
# Then the source, installed without touching the dependencies resolved above.
COPY domain ./domain
COPY telemetry ./telemetry
COPY actors ./actors
COPY storage ./storage
RUN pip install --prefix=/install --no-deps .

FROM ${PYTHON_IMAGE}
# A numeric user and group, so the runtime (Kubernetes runAsNonRoot, the task
# definition's "user": "10001") can tell it is not root without reading /etc/passwd.
RUN groupadd --system --gid 10001 telemetry \
 && useradd --system --uid 10001 --gid 10001 --no-create-home telemetry \
 && mkdir -p /var/lib/telemetry \
 && chown 10001:10001 /var/lib/telemetry \
 && chmod 0700 /var/lib/telemetry
COPY --from=build /install /usr/local
# The Envoy router's discovery sidecar (standard library and boto3): the router task runs
# this image a second time as `python /opt/restartix/eds_sync.py ...` (deploy/aws/README.md).
COPY deploy/envoy/eds_sync.py /opt/restartix/eds_sync.py
# The data directory (spool, outbox) is the only place the service writes, so the task
# runs with a read-only root filesystem and mounts a volume here. Fargate creates a bind
# mount root-owned 0755 unless the image declares the path as a VOLUME: then it takes
# this directory's owner and mode (ECS developer guide, "Use bind mounts").
VOLUME ["/var/lib/telemetry"]
USER 10001:10001
# `docker build --build-arg BUILD_COMMIT=$(git rev-parse HEAD)`: telemetry_build_info.
ARG BUILD_COMMIT=unknown
ENV TELEMETRY_BUILD_COMMIT=${BUILD_COMMIT}
ENV TELEMETRY_HOST=0.0.0.0 TELEMETRY_PORT=8080 TELEMETRY_DATA_DIR=/var/lib/telemetry
EXPOSE 8080
# Liveness only (/v1/healthz): /v1/readyz turns 503 while draining, which must take the
# instance out of the router, not get the container killed. ECS runs the check in the
# task definition; this one serves `docker run` and compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/v1/healthz', timeout=3).status == 200 else 1)"]
# SIGTERM starts the ordered drain (telemetry/server.py): hypercorn's graceful timeout
# (5 s, GRACEFUL_TIMEOUT_S), then TELEMETRY_SHUTDOWN_DEADLINE_S (25 s) for the live
# sessions, then 3 s for the outbox; all inside the task's stopTimeout (60 s; Fargate
# allows at most 120 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["telemetry", "serve"]
