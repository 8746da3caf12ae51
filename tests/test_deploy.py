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
DOCKERFILE = ROOT / "Dockerfile"

# Variables that hold credentials: only ever from Secrets Manager, never in plain env.
SECRET_VARIABLES = {"TELEMETRY_JWT_KEYS", "TELEMETRY_PSEUDONYM_KEY", "TELEMETRY_BUS_TOKEN",
                    "DATABASE_URL", "TELEMETRY_SINK_DATABASE_URL", "TELEMETRY_JWT_PUBLIC_KEYS"}
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
                 "TELEMETRY_PSEUDONYM_KEY": "p" * 32}
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


def test_task_environment_is_valid_configuration() -> None:
    env = task_env()
    unknown = set(env) - set(VARIABLES)
    assert not unknown, f"not configuration variables (typos?): {sorted(unknown)}"
    s = task_settings()  # raises ConfigError on any malformed value
    # Fargate task storage goes with the task: end sessions at SIGTERM (docs/affinity.md).
    assert s.shutdown_mode == "finalise"
    assert s.blob_store == "s3" and s.s3_bucket == bucket()["Bucket"]
    assert s.host == "0.0.0.0"
    assert [p["containerPort"] for p in container()["portMappings"]] == [s.port]


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
    assert cfg.directives(backend, "stick") == [["stick", "on", "req.hdr(x-session-id)"]]
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


if __name__ == "__main__":
    accepted, said = check_haproxy()
    print(said)
    sys.exit(0 if accepted else 1)
