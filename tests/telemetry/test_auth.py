import base64
import dataclasses
import json
import time

import jwt
import pytest

from telemetry.auth import (
    ADMIN_SCOPE,
    AuthError,
    TokenVerifier,
    bearer_token,
    mint_service_token,
    mint_session_token,
)
from telemetry.config import Settings


def _claims(settings: Settings, **over: object) -> dict:
    now = int(time.time())
    c = {"iss": settings.jwt_issuer, "aud": settings.jwt_audience, "typ": "telemetry-session",
         "sub": "p1", "org_id": "org-a", "sid": "s1", "iat": now, "exp": now + 600,
         "consent": {"biometric": True, "analytics": False},
         "ex": {"kind": "bicep_curl", "side": "left", "target_reps": 12}}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _sign(settings: Settings, claims: dict, key: str | None = None, kid: str = "dev-1",
          alg: str = "HS256") -> str:
    key = key if key is not None else settings.jwt_keys[kid]
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def _reason(settings: Settings, token: str) -> str:
    with pytest.raises(AuthError) as info:
        TokenVerifier(settings).verify_session(token)
    return info.value.reason


def test_valid_session_token(settings: Settings) -> None:
    c = TokenVerifier(settings).verify_session(_sign(settings, _claims(settings)))
    assert (c.org_id, c.session_id, c.patient_id) == ("org-a", "s1", "p1")
    assert c.biometric_consent and not c.analytics_consent
    assert (c.exercise.kind, c.exercise.side, c.exercise.target_reps) == ("bicep_curl", "left", 12)


def test_minted_token_verifies(settings: Settings) -> None:
    tok = mint_session_token(settings, org_id="o", session_id="s")
    c = TokenVerifier(settings).verify_session(tok)
    assert c.exercise.kind == "squat"


@pytest.mark.parametrize("claim", ["exp", "iat", "aud", "iss", "sid", "org_id", "sub"])
def test_required_claims(settings: Settings, claim: str) -> None:
    assert _reason(settings, _sign(settings, _claims(settings, **{claim: None}))) == "missing_claim"


def test_attacks_rejected(settings: Settings) -> None:
    now = int(time.time())
    assert _reason(settings, _sign(settings, _claims(settings, exp=now - 120))) == "expired"
    assert _reason(settings, _sign(settings, _claims(settings, aud="other"))) == "wrong_audience"
    assert _reason(settings, _sign(settings, _claims(settings, iss="evil"))) == "wrong_issuer"
    assert _reason(settings, _sign(settings, _claims(settings), key="x" * 40)) == "bad_signature"
    assert _reason(settings, _sign(settings, _claims(settings), kid="nope", key="x" * 40)) == (
        "unknown_kid")
    assert _reason(settings, _sign(settings, _claims(settings, nbf=now + 600))) == "not_yet_valid"
    long = _claims(settings, exp=now + 10 * 3600)
    assert _reason(settings, _sign(settings, long)) == "lifetime_too_long"
    assert _reason(settings, "not-a-jwt") == "malformed_token"
    assert _reason(settings, _sign(settings, _claims(settings, sid="../etc"))) == "invalid_claim"


def test_alg_none_and_confusion_rejected(settings: Settings) -> None:
    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    none = f"{b64({'alg': 'none', 'kid': 'dev-1'})}.{b64(_claims(settings))}."
    assert _reason(settings, none) in {"bad_algorithm", "invalid_token"}
    # a token signed with an algorithm outside the configured allowlist
    hs384 = _sign(settings, _claims(settings), alg="HS384")
    assert _reason(settings, hs384) == "bad_algorithm"


def test_tampered_payload_rejected(settings: Settings) -> None:
    token = _sign(settings, _claims(settings))
    head, payload, sig = token.split(".")
    forged = base64.urlsafe_b64encode(
        json.dumps(_claims(settings, org_id="org-b")).encode()).rstrip(b"=").decode()
    assert _reason(settings, f"{head}.{forged}.{sig}") == "bad_signature"


def test_rotation_accepts_old_and_new_keys(settings: Settings) -> None:
    rotated = dataclasses.replace(
        settings, jwt_keys={"k2": "n" * 40, "dev-1": settings.jwt_keys["dev-1"]},
        jwt_signing_kid="k2")
    old = _sign(settings, _claims(settings))
    new = mint_session_token(rotated, org_id="o", session_id="s")
    v = TokenVerifier(rotated)
    assert v.verify_session(old).org_id == "org-a"
    assert v.verify_session(new).org_id == "o"


def test_session_and_service_tokens_do_not_stand_in(settings: Settings) -> None:
    v = TokenVerifier(settings)
    service = mint_service_token(settings)
    assert v.verify_service(service).subject == "ops"
    with pytest.raises(AuthError) as info:
        v.verify_session(service)
    assert info.value.reason in {"wrong_audience", "missing_claim"}
    with pytest.raises(AuthError) as info:
        v.verify_service(mint_session_token(settings, org_id="o", session_id="s"))
    assert info.value.status == 401
    with pytest.raises(AuthError) as info:
        v.verify_service(mint_service_token(settings, scope="telemetry:read"), ADMIN_SCOPE)
    assert (info.value.status, info.value.reason) == (403, "insufficient_scope")


def test_bearer_header() -> None:
    assert bearer_token({"Authorization": "Bearer abc"}) == "abc"
    for bad in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "},
                {"Authorization": "Bearer " + "a" * 5000}):
        with pytest.raises(AuthError):
            bearer_token(bad)
