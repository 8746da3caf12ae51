"""Attacks on the token layer, over real HTTP, on every authenticated endpoint.

Each attack is one row of :data:`ATTACKS` (also the table in docs/security.md, which
a test keeps in step): how the token is forged and the answer expected -- status
AND JSON error code -- on each endpoint it applies to. Around every attack a real
session of org A is live, and the test checks afterwards that it is still live and
unchanged, so a refused request provably touched nothing.

Further down: positive controls (HS256, ES256 and EdDSA tokens that must work),
cross-organisation and cross-session use, consent (403 and nothing stored or
spooled), the server's header limit, and key rotation through the keys file
(polling and SIGHUP) without a restart, plus the key store's own rules.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import telemetry.auth as auth
import telemetry.auth.keys as auth_keys
from domain.pose_batch import CONTENT_TYPE
from storage.blobs import blob_key
from telemetry.auth import (
    SERVICE_TYP,
    SESSION_TYP,
    AuthError,
    KeyStore,
    KeyStoreError,
    TokenVerifier,
)
from telemetry.config import Settings
from tests.support.payloads import batch_body
from tests.support.service import Running, running_service

ROOT = Path(__file__).resolve().parents[2]
JSON = "application/json"
ORG_A, SESS = "org-a", "sess-1"


# -- keys and token forging ------------------------------------------------------------


def _pem(key: Any) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class Keys:
    ec: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey
    attacker_ec: ec.EllipticCurvePrivateKey
    attacker_ed: ed25519.Ed25519PrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate(),
                ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
def asettings(settings: Settings, keys: Keys) -> Settings:
    """The test settings plus an ES256 kid and an EdDSA kid next to HMAC ``dev-1``."""
    return dataclasses.replace(settings, jwt_public_keys={"ec-1": _pem(keys.ec),
                                                          "ed-1": _pem(keys.ed)})


def b64(data: bytes | dict[str, Any]) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any],
              sign: Callable[[bytes], bytes] | None) -> str:
    """A JWS built by hand, so any header and any signature can be forged."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    sig = b64(sign(signing_input.encode())) if sign else ""
    return f"{signing_input}.{sig}"


def hs256(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda msg: hmac.new(secret, msg, hashlib.sha256).digest()


def session_claims(s: Settings, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "iss": s.jwt_issuer, "aud": s.jwt_audience, "typ": SESSION_TYP, "sub": "patient-x1",
        "org_id": ORG_A, "sid": SESS, "iat": now, "exp": now + 600,
        "consent": {"biometric": True, "analytics": True}, "ex": {"kind": "squat"}}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def service_claims(s: Settings, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "iss": s.jwt_issuer, "aud": s.admin_audience, "typ": SERVICE_TYP, "sub": "ops",
        "scope": "telemetry:admin", "iat": now, "exp": now + 600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


@dataclass(frozen=True)
class Ctx:
    s: Settings
    keys: Keys
    kind: str  # "session" (ingest endpoints) or "service" (admin endpoints)

    def claims(self, **over: Any) -> dict[str, Any]:
        return (session_claims if self.kind == "session" else service_claims)(self.s, **over)

    def hs(self, claims: dict[str, Any] | None = None, kid: str = "dev-1",
           alg: str = "HS256", secret: str | None = None, **headers: Any) -> str:
        key = secret if secret is not None else self.s.jwt_keys["dev-1"]
        return jwt.encode(claims if claims is not None else self.claims(), key, algorithm=alg,
                          headers={"kid": kid, **headers})


def bearer(token: str) -> str:
    return f"Bearer {token}"


def _tamper(c: Ctx) -> str:
    head, _, sig = c.hs().split(".")
    forged = c.claims(org_id="org-b") if c.kind == "session" else c.claims(
        scope="telemetry:admin telemetry:root")
    return bearer(f"{head}.{b64(forged)}.{sig}")


def _strip_signature(c: Ctx) -> str:
    head, payload, _ = c.hs().split(".")
    return bearer(f"{head}.{payload}.")


def _confusion(c: Ctx, kid: str, private: Any) -> str:
    # The classic: HS256 "signed" with the verifier's own public key as the secret.
    pem = _pem(private).encode()
    return bearer(raw_token({"alg": "HS256", "typ": "JWT", "kid": kid}, c.claims(), hs256(pem)))


def _jwk_injection(c: Ctx) -> str:
    # Attacker embeds their own public key in the header and signs with its private key.
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(c.keys.attacker_ec.public_key()))
    return bearer(jwt.encode(c.claims(), c.keys.attacker_ec, algorithm="ES256",
                             headers={"kid": "ec-1", "jwk": jwk,
                                      "jku": "http://127.0.0.1:9/keys.json"}))


def _oversized(c: Ctx) -> str:
    return bearer(c.hs(c.claims(pad="x" * 5000)))


@dataclass(frozen=True)
class Attack:
    name: str
    forge: Callable[[Ctx], str | None]  # the Authorization header value (None: absent)
    status: int
    code: str
    kinds: tuple[str, ...] = ("session", "service")


ATTACKS: list[Attack] = [
    Attack("no_token", lambda c: None, 401, "missing_token"),
    Attack("basic_auth_scheme", lambda c: "Basic b3BzOm9wcw==", 401, "malformed_token"),
    Attack("not_a_jwt", lambda c: bearer("not-a-jwt"), 401, "malformed_token"),
    Attack("alg_none", lambda c: bearer(raw_token({"alg": "none", "kid": "dev-1"}, c.claims(),
                                                  None)), 401, "bad_algorithm"),
    Attack("alg_none_without_kid", lambda c: bearer(raw_token({"alg": "none"}, c.claims(), None)),
           401, "unknown_kid"),
    Attack("confusion_hs256_with_ec_public_key",
           lambda c: _confusion(c, "ec-1", c.keys.ec), 401, "bad_algorithm"),
    Attack("confusion_hs256_with_ed25519_public_key",
           lambda c: _confusion(c, "ed-1", c.keys.ed), 401, "bad_algorithm"),
    Attack("es256_header_on_hmac_kid",
           lambda c: bearer(jwt.encode(c.claims(), c.keys.attacker_ec, algorithm="ES256",
                                       headers={"kid": "dev-1"})), 401, "bad_algorithm"),
    Attack("rs256_header_on_hmac_kid",
           lambda c: bearer(raw_token({"alg": "RS256", "kid": "dev-1"}, c.claims(),
                                      lambda m: os.urandom(256))), 401, "bad_algorithm"),
    Attack("eddsa_header_on_es256_kid",
           lambda c: bearer(jwt.encode(c.claims(), c.keys.attacker_ed, algorithm="EdDSA",
                                       headers={"kid": "ec-1"})), 401, "bad_algorithm"),
    Attack("hs384_outside_allowlist", lambda c: bearer(c.hs(alg="HS384")), 401, "bad_algorithm"),
    Attack("wrong_hmac_key", lambda c: bearer(c.hs(secret="attacker-secret-" + "x" * 40)),
           401, "bad_signature"),
    Attack("wrong_ec_key",
           lambda c: bearer(jwt.encode(c.claims(), c.keys.attacker_ec, algorithm="ES256",
                                       headers={"kid": "ec-1"})), 401, "bad_signature"),
    Attack("wrong_ed25519_key",
           lambda c: bearer(jwt.encode(c.claims(), c.keys.attacker_ed, algorithm="EdDSA",
                                       headers={"kid": "ed-1"})), 401, "bad_signature"),
    Attack("embedded_jwk_and_jku", _jwk_injection, 401, "bad_signature"),
    Attack("tampered_payload", _tamper, 401, "bad_signature"),
    Attack("signature_stripped", _strip_signature, 401, "bad_signature"),
    Attack("expired", lambda c: bearer(c.hs(c.claims(iat=int(time.time()) - 720,
                                                     exp=int(time.time()) - 120))),
           401, "expired"),
    Attack("nbf_in_future", lambda c: bearer(c.hs(c.claims(nbf=int(time.time()) + 600))),
           401, "not_yet_valid"),
    Attack("iat_in_future", lambda c: bearer(c.hs(c.claims(iat=int(time.time()) + 600,
                                                           exp=int(time.time()) + 900))),
           401, "not_yet_valid"),
    Attack("wrong_audience", lambda c: bearer(c.hs(c.claims(aud="restartix-core-api"))),
           401, "wrong_audience"),
    Attack("audience_list_with_ours_and_another",
           lambda c: bearer(c.hs(c.claims(aud=[c.s.jwt_audience, c.s.admin_audience]))),
           401, "wrong_audience"),
    Attack("wrong_issuer", lambda c: bearer(c.hs(c.claims(iss="https://evil.example"))),
           401, "wrong_issuer"),
    *[Attack(f"missing_{claim}", partial(lambda c, claim: bearer(c.hs(c.claims(**{claim: None}))),
                                         claim=claim), 401, "missing_claim")
      for claim in ("exp", "iat", "aud", "iss", "sub")],
    *[Attack(f"missing_{claim}", partial(lambda c, claim: bearer(c.hs(c.claims(**{claim: None}))),
                                         claim=claim), 401, "missing_claim", ("session",))
      for claim in ("sid", "org_id")],
    Attack("missing_typ_on_service_token", lambda c: bearer(c.hs(c.claims(typ=None))),
           401, "wrong_token_type", ("service",)),
    Attack("missing_scope", lambda c: bearer(c.hs(c.claims(scope=None))),
           403, "insufficient_scope", ("service",)),
    Attack("lifetime_over_max",
           lambda c: bearer(c.hs(c.claims(exp=int(time.time()) + int(c.s.jwt_max_lifetime_s)
                                          + 60))), 401, "lifetime_too_long"),
    Attack("unknown_kid", lambda c: bearer(c.hs(kid="kid-from-nowhere")), 401, "unknown_kid"),
    Attack("missing_kid", lambda c: bearer(jwt.encode(c.claims(), c.s.jwt_keys["dev-1"],
                                                      algorithm="HS256")), 401, "unknown_kid"),
    Attack("kid_path_traversal", lambda c: bearer(c.hs(kid="../../../../etc/passwd")),
           401, "unknown_kid"),
    Attack("unknown_crit_extension", lambda c: bearer(c.hs(crit=["urn:x-attack"])),
           401, "malformed_token"),
    Attack("oversized_token", _oversized, 401, "oversized_token"),
    Attack("oversized_authorization_header", lambda c: bearer("A" * 16_000),
           401, "oversized_token"),
    Attack("path_traversal_in_id_claim",
           lambda c: bearer(c.hs(c.claims(sid="../org-b/sess-1"))), 401, "invalid_claim",
           ("session",)),
    Attack("session_token_on_admin", lambda c: bearer(c.hs(session_claims(c.s))),
           403, "wrong_audience", ("service",)),
    Attack("admin_audience_with_session_typ",
           lambda c: bearer(c.hs(c.claims(typ=SESSION_TYP))), 401, "wrong_token_type",
           ("service",)),
    Attack("bus_token_on_admin", lambda c: bearer(c.hs(c.claims(scope="telemetry:sink"))),
           403, "insufficient_scope", ("service",)),
    Attack("service_token_on_ingest", lambda c: bearer(c.hs(service_claims(c.s))),
           401, "wrong_audience", ("session",)),
    Attack("session_audience_with_service_typ",
           lambda c: bearer(c.hs(c.claims(typ=SERVICE_TYP))), 401, "wrong_token_type",
           ("session",)),
]


@dataclass(frozen=True)
class Endpoint:
    kind: str
    method: str
    path: str
    body: bytes | None = None
    ctype: str | None = None


MEDIA_BODY = json.dumps({"media_id": "ex-squat-01", "view_id": "v1", "media_duration_s": 120,
                         "events": [{"id": "e1", "type": "session_start", "t_ms": 1000}]}).encode()
ENDPOINTS = [
    Endpoint("session", "POST", "/v1/pose/frames", batch_body(1), CONTENT_TYPE),
    Endpoint("session", "POST", "/v1/media/events", MEDIA_BODY, JSON),
    Endpoint("session", "POST", f"/v1/sessions/{SESS}/end"),
    Endpoint("service", "GET", "/v1/admin/sessions"),
    Endpoint("service", "GET", f"/v1/admin/sessions/{SESS}"),
    Endpoint("service", "POST", f"/v1/admin/sessions/{SESS}/end"),
]


async def call(svc: Running, ep: Endpoint, authorization: str | None) -> Any:
    headers = {} if authorization is None else {"Authorization": authorization}
    if ep.ctype:
        headers["Content-Type"] = ep.ctype
    return await svc.client.request(ep.method, ep.path, content=ep.body, headers=headers)


def admin_header(s: Settings) -> dict[str, str]:
    return {"Authorization": bearer(jwt.encode(service_claims(s), s.jwt_keys["dev-1"],
                                               algorithm="HS256", headers={"kid": "dev-1"}))}


async def start_victim(svc: Running, s: Settings) -> str:
    """Org A's live session with one batch; returns its legitimate token."""
    tok = jwt.encode(session_claims(s), s.jwt_keys["dev-1"], algorithm="HS256",
                     headers={"kid": "dev-1"})
    r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                              headers={"Authorization": bearer(tok), "Content-Type": CONTENT_TYPE})
    assert r.status_code == 202, r.text
    return tok


async def victim_view(svc: Running, s: Settings, org: str = ORG_A) -> dict[str, Any]:
    r = await svc.client.get(f"/v1/admin/sessions/{SESS}", params={"org_id": org},
                             headers=admin_header(s))
    assert r.status_code == 200, r.text
    view = r.json()
    return {k: view[k] for k in ("org_id", "session_id", "batches", "frames", "ending",
                                 "media_views")}


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
async def test_attack_is_refused_on_every_endpoint(
    attack: Attack, asettings: Settings, keys: Keys
) -> None:
    async with running_service(asettings) as svc:
        await start_victim(svc, asettings)
        await trio.sleep(0.05)
        before = await victim_view(svc, asettings)
        assert before["batches"] == 1 and before["ending"] is None
        checked = 0
        for ep in ENDPOINTS:
            if ep.kind not in attack.kinds:
                continue
            authz = attack.forge(Ctx(asettings, keys, ep.kind))
            r = await call(svc, ep, authz)
            assert (r.status_code, r.json()["error"]["code"]) == (attack.status, attack.code), (
                f"{attack.name} on {ep.method} {ep.path}: {r.status_code} {r.text}")
            assert r.json()["error"]["message"]
            checked += 1
        assert checked == sum(ep.kind in attack.kinds for ep in ENDPOINTS) >= 3
        await trio.sleep(0.05)
        # org A's session is untouched: same batches, not ending, nothing else live
        assert await victim_view(svc, asettings) == before
        r = await svc.client.get("/v1/admin/sessions", headers=admin_header(asettings))
        assert r.json()["count"] == 1


def test_attack_table_is_documented() -> None:
    doc = (ROOT / "docs" / "security.md").read_text()
    for attack in ATTACKS:
        row = re.search(rf"^\| `{re.escape(attack.name)}` \|.*$", doc, re.MULTILINE)
        assert row, f"docs/security.md lacks a row for {attack.name}"
        assert f"{attack.status} `{attack.code}`" in row.group(0), row.group(0)


# -- positive controls: the forging helpers are right, so the refusals mean something ------


async def test_valid_hs256_es256_and_eddsa_tokens_are_accepted(
    asettings: Settings, keys: Keys
) -> None:
    async with running_service(asettings) as svc:
        c = Ctx(asettings, keys, "session")
        sessions = {
            "hs": c.hs(c.claims(sid="ok-hs")),
            "es": jwt.encode(c.claims(sid="ok-es"), keys.ec, algorithm="ES256",
                             headers={"kid": "ec-1"}),
            "ed": jwt.encode(c.claims(sid="ok-ed"), keys.ed, algorithm="EdDSA",
                             headers={"kid": "ed-1"}),
        }
        for tok in sessions.values():
            r = await svc.client.post("/v1/pose/frames", content=batch_body(0), headers={
                "Authorization": bearer(tok), "Content-Type": CONTENT_TYPE})
            assert r.status_code == 202, r.text
        a = Ctx(asettings, keys, "service")
        for tok in (a.hs(), jwt.encode(a.claims(), keys.ec, algorithm="ES256",
                                       headers={"kid": "ec-1"}),
                    jwt.encode(a.claims(), keys.ed, algorithm="EdDSA", headers={"kid": "ed-1"})):
            r = await svc.client.get("/v1/admin/sessions", headers={"Authorization": bearer(tok)})
            assert r.status_code == 200 and r.json()["count"] == 3, r.text
        # leeway: expired 10 s ago is still inside the configured 30 s
        now = int(time.time())
        late = c.hs(c.claims(sid="ok-hs", iat=now - 600, exp=now - 10))
        r = await svc.client.post("/v1/sessions/ok-hs/end", headers={"Authorization": bearer(late)})
        assert r.status_code == 200 and r.json()["pose"]["frames"] == 30


# -- cross-organisation, cross-session, consent --------------------------------------------


async def test_cross_organisation_never_touches_the_other_org(asettings: Settings) -> None:
    async with running_service(asettings) as svc:
        await start_victim(svc, asettings)
        await trio.sleep(0.05)
        before = await victim_view(svc, asettings)
        # org B's token names the same session id on every session endpoint
        b = jwt.encode(session_claims(asettings, org_id="org-b", sub="patient-b"),
                       asettings.jwt_keys["dev-1"], algorithm="HS256", headers={"kid": "dev-1"})
        hb = {"Authorization": bearer(b)}
        r = await svc.client.post("/v1/pose/frames", content=batch_body(0),
                                  headers={**hb, "Content-Type": CONTENT_TYPE})
        assert r.status_code == 202  # lands in org B's own session
        r = await svc.client.post("/v1/media/events", content=MEDIA_BODY,
                                  headers={**hb, "Content-Type": JSON})
        assert r.status_code == 202
        r = await svc.client.post(f"/v1/sessions/{SESS}/end", headers=hb)
        assert r.status_code == 200
        ended_b = r.json()
        assert ended_b["org_id"] == "org-b" and ended_b["pose"]["frames"] == 30
        assert ended_b["blob"]["key"] == blob_key("org-b", SESS)
        await trio.sleep(0.05)
        # org A's session: still live, not ending, its batch count unchanged
        assert await victim_view(svc, asettings) == before
        assert not await svc.storage.store.exists(blob_key(ORG_A, SESS))
        # and when org A ends it, it has exactly its own data
        tok_a = jwt.encode(session_claims(asettings), asettings.jwt_keys["dev-1"],
                           algorithm="HS256", headers={"kid": "dev-1"})
        r = await svc.client.post(f"/v1/sessions/{SESS}/end",
                                  headers={"Authorization": bearer(tok_a)})
        a = r.json()
        assert (a["org_id"], a["pose"]["frames"], a["media"]) == (ORG_A, 30, [])
        assert a["blob"]["key"].startswith(f"{ORG_A}/")


async def test_cross_session_is_scope_mismatch(asettings: Settings) -> None:
    async with running_service(asettings) as svc:
        await start_victim(svc, asettings)
        await trio.sleep(0.05)
        before = await victim_view(svc, asettings)
        other = jwt.encode(session_claims(asettings, sid="sess-2"), asettings.jwt_keys["dev-1"],
                           algorithm="HS256", headers={"kid": "dev-1"})
        r = await svc.client.post(f"/v1/sessions/{SESS}/end",
                                  headers={"Authorization": bearer(other)})
        assert (r.status_code, r.json()["error"]["code"]) == (401, "scope_mismatch")
        assert await victim_view(svc, asettings) == before


@pytest.mark.parametrize("endpoint", ["pose", "media"])
async def test_no_consent_is_403_and_nothing_is_stored_or_spooled(
    asettings: Settings, endpoint: str
) -> None:
    async with running_service(asettings) as svc:
        if endpoint == "pose":
            claims = session_claims(asettings, consent={"biometric": False, "analytics": True})
            path, body, ctype = "/v1/pose/frames", batch_body(0), CONTENT_TYPE
        else:
            claims = session_claims(asettings, consent={"biometric": True, "analytics": False})
            path, body, ctype = "/v1/media/events", MEDIA_BODY, JSON
        tok = jwt.encode(claims, asettings.jwt_keys["dev-1"], algorithm="HS256",
                         headers={"kid": "dev-1"})
        await trio.sleep(0.05)
        data_dir = Path(asettings.data_dir)
        before = files_under(data_dir)
        for _ in range(3):
            r = await svc.client.post(path, content=body, headers={
                "Authorization": bearer(tok), "Content-Type": ctype})
            assert (r.status_code, r.json()["error"]["code"]) == (403, "consent_required")
        r = await svc.client.get("/v1/admin/sessions", headers=admin_header(asettings))
        assert r.json()["count"] == 0
        assert not svc.supervisor.live()
        assert not await svc.storage.store.exists(blob_key(ORG_A, SESS))
        assert files_under(data_dir) == before  # nothing written: no blob, no spool entry
        assert svc.events == []


async def test_header_beyond_the_server_limit_never_reaches_the_app(
    asettings: Settings,
) -> None:
    async with running_service(asettings) as svc:
        await start_victim(svc, asettings)
        await trio.sleep(0.05)
        before = await victim_view(svc, asettings)
        r = await svc.client.post(f"/v1/sessions/{SESS}/end", headers={
            "Authorization": "Bearer " + "A" * 70_000})
        # hypercorn's h11 limit answers before any handler runs; not JSON, not ours.
        assert r.status_code == 431 and not r.content
        assert await victim_view(svc, asettings) == before


# -- key rotation without a restart ----------------------------------------------------


def write_keys(path: Path, keys: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys))
    os.replace(tmp, path)  # atomic, as a secrets agent would


def hs_token(s: Settings, kid: str, secret: str, **over: Any) -> str:
    return jwt.encode(session_claims(s, **over), secret, algorithm="HS256",
                      headers={"kid": kid})


OLD, NEW, NEWER = ("old-secret-" + "o" * 32), ("new-secret-" + "n" * 32), ("nr-" + "r" * 40)


async def wait_until(done: Callable[[], bool], limit_s: float = 10, step_s: float = 0.02) -> None:
    """Poll ``done`` (the key store reloads in a worker thread; there is no event to
    wait on from here) until true, failing after ``limit_s`` of Trio time."""
    with trio.fail_after(limit_s):
        while not done():  # noqa: ASYNC110
            await trio.sleep(step_s)


async def wait_for_generation(store: KeyStore, generation: int, limit_s: float = 10,
                              step_s: float = 0.02) -> None:
    await wait_until(lambda: store.generation >= generation, limit_s, step_s)


async def test_rotation_through_the_keys_file_without_restart(
    asettings: Settings, tmp_path: Path
) -> None:
    keyfile = tmp_path / "jwt-keys.json"
    write_keys(keyfile, {"k-new": NEW, "k-old": OLD})
    s = dataclasses.replace(asettings, jwt_keys_file=keyfile)
    async with running_service(s) as svc, trio.open_nursery() as nursery:
        assert svc.state is not None
        store = svc.state.verifier.keystore
        await nursery.start(partial(store.watch, poll_s=0.05))

        async def pose(tok: str, seq: int = 0) -> Any:
            return await svc.client.post("/v1/pose/frames", content=batch_body(seq), headers={
                "Authorization": bearer(tok), "Content-Type": CONTENT_TYPE})

        old_tok = hs_token(s, "k-old", OLD, sid="rot-old")
        new_tok = hs_token(s, "k-new", NEW, sid="rot-new")
        assert (await pose(old_tok)).status_code == 202
        assert (await pose(new_tok)).status_code == 202
        # the file is authoritative: the development key in settings is not accepted
        dev = jwt.encode(session_claims(s), s.jwt_keys["dev-1"], algorithm="HS256",
                         headers={"kid": "dev-1"})
        r = await pose(dev)
        assert (r.status_code, r.json()["error"]["code"]) == (401, "unknown_kid")

        write_keys(keyfile, {"k-new": NEW})  # retire the old kid
        await wait_for_generation(store, 1)
        r = await pose(old_tok, 1)
        assert (r.status_code, r.json()["error"]["code"]) == (401, "unknown_kid")
        assert (await pose(new_tok, 1)).status_code == 202

        # a broken file keeps the current keys, and the service keeps serving
        keyfile.write_text("{not json")
        await wait_until(lambda: store.last_error is not None)
        assert "not valid JSON" in store.last_error and store.generation == 1
        assert (await pose(new_tok, 2)).status_code == 202
        # reusing a kid for a different key family is refused, old keys kept
        write_keys(keyfile, {"k-new": NEW, "ec-1": NEWER})
        await wait_until(lambda: "configured more than once" in (store.last_error or ""))
        assert store.kids == {"k-new", "ec-1", "ed-1"} and store.generation == 1
        nursery.cancel_scope.cancel()


async def test_sighup_reloads_the_keyset(asettings: Settings, tmp_path: Path) -> None:
    # A store of its own, watched with a poll period far beyond the test: only the
    # signal can cause the reload (a service's watcher would poll the file too).
    keyfile = tmp_path / "jwt-keys.json"
    write_keys(keyfile, {"k-new": NEW})
    s = dataclasses.replace(asettings, jwt_keys_file=keyfile)
    store = KeyStore(s)
    verifier = TokenVerifier(store)
    newer = hs_token(s, "k-newer", NEWER)
    with pytest.raises(AuthError, match="not recognised"):
        verifier.verify_session(newer)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(store.watch, poll_s=3600))
        write_keys(keyfile, {"k-new": NEW, "k-newer": NEWER})
        await trio.sleep(0.2)
        assert store.generation == 0  # the change alone did nothing yet
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for_generation(store, 1)
        nursery.cancel_scope.cancel()
    assert verifier.verify_session(newer).session_id == SESS
    assert store.kids == {"k-new", "k-newer", "ec-1", "ed-1"}


async def test_file_poll_runs_on_trio_time(
    settings: Settings, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time jumps only once the worker threads are idle, so the poll period is
    # measured in Trio time and the test takes no wall-clock seconds.
    autojump_clock.autojump_threshold = 0.05
    keyfile = tmp_path / "keys.json"
    write_keys(keyfile, {"a": NEW})
    store = KeyStore(dataclasses.replace(settings, jwt_keys_file=keyfile))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.watch)
        t0 = trio.current_time()
        write_keys(keyfile, {"a": NEW, "b": OLD})
        await wait_for_generation(store, 1, limit_s=60, step_s=0.5)
        assert 2.0 <= trio.current_time() - t0 <= 2.0 * auth.KEYS_FILE_POLL_S + 1
        assert store.kids == {"a", "b"}
        keyfile.unlink()  # a vanished file is a failed reload, not a crash
        await wait_until(lambda: store.last_error is not None, limit_s=60, step_s=1)
        assert store.kids == {"a", "b"} and "cannot read" in store.last_error
        nursery.cancel_scope.cancel()


# -- the key store's rules ---------------------------------------------------------------


def test_kid_binds_one_algorithm_family(asettings: Settings) -> None:
    store = KeyStore(asettings)
    fam = {kid: (store.get(kid).family, store.get(kid).algorithms)  # type: ignore[union-attr]
           for kid in store.kids}
    assert fam == {"dev-1": ("HMAC", ("HS256",)), "ec-1": ("EC-P256", ("ES256",)),
                   "ed-1": ("Ed25519", ("EdDSA",))}
    # HMAC kids get the allowlisted HS algorithms their length supports (RFC 7518 3.2)
    wide = dataclasses.replace(asettings, jwt_algorithms=("HS256", "HS384", "HS512"),
                               jwt_keys={"short": "s" * 32, "long": "l" * 64})
    w = KeyStore(wide)
    assert w.get("short").algorithms == ("HS256",)  # type: ignore[union-attr]
    assert w.get("long").algorithms == ("HS256", "HS384", "HS512")  # type: ignore[union-attr]


@pytest.mark.parametrize("bad, message", [
    ({"jwt_keys": {"dev-1": "z" * 40}, "jwt_public_keys": {"dev-1": "EC"}},
     "configured more than once"),
    ({"jwt_public_keys": {"rsa-1": "RSA"}}, "only EC P-256"),
    ({"jwt_public_keys": {"p384": "P384"}}, "only EC P-256"),
    ({"jwt_public_keys": {"priv": "PRIVATE"}}, "private key"),
    ({"jwt_public_keys": {"junk": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}},
     "not a PEM public key"),
    ({"jwt_keys": {"pem-as-secret": "EC"}}, "PEM text where an HMAC secret belongs"),
    ({"jwt_keys": {"tiny": "t" * 16}}, "too short"),
    ({"jwt_keys": {}}, "keyset is empty"),
    ({"jwt_public_keys": {"ec-1": "EC"}, "jwt_algorithms": ("HS256", "EdDSA")},
     "allowlist"),
])
def test_unsafe_keysets_are_refused(
    settings: Settings, keys: Keys, bad: dict[str, Any], message: str
) -> None:
    pems = {
        "EC": _pem(keys.ec),
        "RSA": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "P384": _pem(ec.generate_private_key(ec.SECP384R1())),
        "PRIVATE": keys.ec.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode(),
    }

    def sub(m: dict[str, str]) -> dict[str, str]:
        return {k: pems.get(v, v) for k, v in m.items()}

    over = {k: sub(v) if isinstance(v, dict) else v for k, v in bad.items()}
    with pytest.raises(KeyStoreError, match=message):
        KeyStore(dataclasses.replace(settings, **over))


def test_unknown_kid_is_a_dict_miss(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = TokenVerifier(settings)

    def no_io(*args: object, **kw: object) -> None:
        raise AssertionError("verification must not load keys or open sockets")

    monkeypatch.setattr(auth_keys, "load_keyset", no_io)
    monkeypatch.setattr(auth_keys, "_read_keys_file", no_io)
    monkeypatch.setattr(socket.socket, "connect", no_io)
    c = session_claims(settings)
    t0 = time.perf_counter()
    for i in range(2000):
        tok = jwt.encode(c, "u" * 40, algorithm="HS256", headers={"kid": f"kid-{i}"})
        with pytest.raises(AuthError) as info:
            verifier.verify_session(tok)
        assert info.value.reason == "unknown_kid"
    assert time.perf_counter() - t0 < 5  # 2000 lookups, each a dict miss


def test_signing_follows_the_keys_file(settings: Settings, tmp_path: Path) -> None:
    keyfile = tmp_path / "k.json"
    write_keys(keyfile, {"file-1": NEW})
    s = dataclasses.replace(settings, jwt_keys_file=keyfile)
    tok = auth.mint_session_token(s, org_id="o", session_id="s")
    assert jwt.get_unverified_header(tok)["kid"] == "file-1"
    assert TokenVerifier(s).verify_session(tok).org_id == "o"
