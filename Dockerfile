# RestartiX Telemetry service image (Fargate task behind the ALB).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY telemetry ./telemetry
COPY actors ./actors
COPY storage ./storage
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 telemetry
COPY --from=build /install /usr/local
USER telemetry
ENV TELEMETRY_HOST=0.0.0.0 TELEMETRY_PORT=8080 TELEMETRY_DATA_DIR=/tmp/telemetry
EXPOSE 8080
# SIGTERM starts the ordered drain; TELEMETRY_SHUTDOWN_DEADLINE_S (25 s) stays well
# inside the task's stopTimeout (set 60 s in deploy/ecs-task.json; Fargate max 120 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["telemetry", "serve"]
