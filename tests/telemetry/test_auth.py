import base64
import dataclasses
import datetime
import json
import time
import types
from pathlib import Path

import jwt
import jwt.api_jwt
import pytest
from joserfc import jwk
from joserfc import jwt as jose_jwt

import telemetry.auth.verify as auth_verify
from telemetry.auth import (
    ADMIN_SCOPE,
    SESSION_CACHE_SIZE,
    AuthError,
    KeyStore,
    SessionClaims,
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


# -- aud as an array, minted by another library -----------------------------------
# joserfc stands in for the Core API's JWT library (Go's golang-jwt writes even a
# single audience as an array), so the tokens are not shaped by PyJWT's own habits.


def _jose_hs256(settings: Settings, claims: dict, kid: str = "dev-1") -> str:
    key = jwk.OctKey.import_key(settings.jwt_keys[kid])
    return jose_jwt.encode({"alg": "HS256", "kid": kid}, claims, key)


def _audience(settings: Settings, aud: object) -> object:
    """``aud`` with the placeholders SESSION and ADMIN replaced by the configured
    audiences, at any depth (the parameters are written before settings exist)."""
    if isinstance(aud, list):
        return [_audience(settings, m) for m in aud]
    if isinstance(aud, dict):
        return {_audience(settings, k): m for k, m in aud.items()}
    names = {"SESSION": settings.jwt_audience, "ADMIN": settings.admin_audience}
    return names.get(aud, aud) if isinstance(aud, str) else aud


def _service_claims(settings: Settings, **over: object) -> dict:
    now = int(time.time())
    c = {"iss": settings.jwt_issuer, "aud": settings.admin_audience,
         "typ": "telemetry-service", "sub": "ops", "scope": ADMIN_SCOPE,
         "iat": now, "exp": now + 600}
    c.update(over)
    return c


def test_session_token_with_array_audience_is_accepted(settings: Settings) -> None:
    v = TokenVerifier(settings)
    ours = settings.jwt_audience
    for aud in ([ours], [ours, ours]):  # a repeated member names no one else
        c = v.verify_session(_jose_hs256(settings, _claims(settings, aud=aud)))
        assert (c.org_id, c.session_id, c.patient_id) == ("org-a", "s1", "p1")


def test_es256_session_token_with_array_audience_is_accepted(settings: Settings) -> None:
    key = jwk.ECKey.generate_key("P-256")
    pem = key.as_pem(private=False).decode()
    es = dataclasses.replace(settings, jwt_public_keys={"ec-1": pem})
    token = jose_jwt.encode({"alg": "ES256", "kid": "ec-1"},
                            _claims(settings, aud=[settings.jwt_audience]), key)
    assert TokenVerifier(es).verify_session(token).session_id == "s1"


def test_service_token_with_array_audience_is_accepted(settings: Settings) -> None:
    token = _jose_hs256(settings, _service_claims(settings, aud=[settings.admin_audience]))
    c = TokenVerifier(settings).verify_service(token)
    assert (c.subject, c.scopes) == ("ops", frozenset({ADMIN_SCOPE}))


def test_array_audience_token_is_cached_like_any_other(settings: Settings,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    v = TokenVerifier(settings)
    token = _jose_hs256(settings, _claims(settings, aud=[settings.jwt_audience]))
    first = v.verify_session(token)
    assert list(v._cache) == [token]

    def no_full_check(*_: object) -> None:
        raise AssertionError("a cached token was checked again")

    monkeypatch.setattr(v, "_decode", no_full_check)
    assert v.verify_session(token) == first


@pytest.mark.parametrize(("aud", "reason"), [
    (["SESSION", "ADMIN"], "wrong_audience"),
    (["ADMIN", "SESSION"], "wrong_audience"),
    (["SESSION", "restartix-core-api"], "wrong_audience"),
    (["SESSION", "SESSION", "ADMIN"], "wrong_audience"),
    (["ADMIN"], "wrong_audience"),
    (["restartix-core-api"], "wrong_audience"),
    (["SESSION", 1], "wrong_audience"),
    (["SESSION", None], "wrong_audience"),
    ([["SESSION"]], "wrong_audience"),
    ({"SESSION": True}, "wrong_audience"),
    ("SESSION ADMIN", "wrong_audience"),
    ([], "missing_claim"),
    ("", "missing_claim"),
])
def test_session_token_with_a_foreign_audience_is_refused(
    settings: Settings, aud: object, reason: str
) -> None:
    token = _jose_hs256(settings, _claims(settings, aud=_audience(settings, aud)))
    v = TokenVerifier(settings)
    assert _outcome(v, token) == reason
    assert len(v._cache) == 0  # refusals are never cached


@pytest.mark.parametrize("aud", [
    ["ADMIN", "SESSION"],
    ["SESSION", "ADMIN"],
    ["ADMIN", "restartix-core-api"],
    ["SESSION"],
    ["ADMIN", 1],
])
def test_service_token_with_a_foreign_audience_is_refused(settings: Settings,
                                                          aud: list) -> None:
    token = _jose_hs256(settings, _service_claims(settings, aud=_audience(settings, aud)))
    with pytest.raises(AuthError) as info:
        TokenVerifier(settings).verify_service(token)
    assert (info.value.status, info.value.reason) == (401, "wrong_audience")


def test_bearer_header() -> None:
    assert bearer_token({"Authorization": "Bearer abc"}) == "abc"
    for bad in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "},
                {"Authorization": "Bearer " + "a" * 5000}):
        with pytest.raises(AuthError):
            bearer_token(bad)


# -- the verified-session-token cache ------------------------------------------------


class Clock:
    """Wall-clock time as both checks see it: ``telemetry.auth.verify`` (``time.time``) and
    PyJWT (``datetime.now``)."""

    def __init__(self, now: float) -> None:
        self.now = now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(float(int(time.time())))

    class FrozenDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            return datetime.datetime.fromtimestamp(c.now, tz)

    monkeypatch.setattr(auth_verify, "time", types.SimpleNamespace(time=lambda: c.now))
    monkeypatch.setattr(jwt.api_jwt, "datetime", FrozenDatetime)
    return c


def _outcome(verifier: TokenVerifier, token: str) -> SessionClaims | str:
    try:
        return verifier.verify_session(token)
    except AuthError as exc:
        return exc.reason


def test_cache_hit_returns_equal_claims(settings: Settings,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    v = TokenVerifier(settings)
    assert v._cache_size == SESSION_CACHE_SIZE
    token = _sign(settings, _claims(settings))
    first = v.verify_session(token)
    assert len(v._cache) == 1

    def no_full_check(*_: object) -> None:
        raise AssertionError("a cached token was checked again")

    monkeypatch.setattr(v, "_decode", no_full_check)
    assert v.verify_session(token) == first
    assert v.verify_session(token) == TokenVerifier(settings).verify_session(token)


@pytest.mark.parametrize("exp_offset", [600, 600.7])
def test_cached_token_expires_when_the_full_check_says_so(
    settings: Settings, clock: Clock, exp_offset: float
) -> None:
    # PyJWT: expired once int(exp) <= now - leeway. The cache must answer the same at
    # every instant, including a fractional exp (PyJWT truncates it).
    t0, leeway = clock.now, settings.jwt_leeway_s
    token = _sign(settings, _claims(settings, iat=int(t0), exp=t0 + exp_offset))
    cached = TokenVerifier(settings)
    assert isinstance(cached.verify_session(token), SessionClaims)
    edge = int(t0 + exp_offset) + leeway
    for dt in (-1.0, -0.5, -0.001, 0.0, 0.001, 0.3, 1.0, 5.0):
        clock.now = edge + dt
        expected = _outcome(TokenVerifier(settings), token)  # no cache: the full check
        assert _outcome(cached, token) == expected, dt
        assert (expected == "expired") == (dt >= 0), dt
    clock.now = edge + 10
    assert _outcome(cached, token) == "expired"
    assert token not in cached._cache


def test_cached_token_follows_not_before_when_the_clock_steps_back(
    settings: Settings, clock: Clock
) -> None:
    t0, leeway = clock.now, settings.jwt_leeway_s
    for claims in (_claims(settings, iat=int(t0), nbf=int(t0) + 100, exp=int(t0) + 600),
                   _claims(settings, iat=int(t0) + 100, exp=int(t0) + 600)):
        token = _sign(settings, claims)
        cached = TokenVerifier(settings)
        clock.now = t0 + 100
        assert isinstance(cached.verify_session(token), SessionClaims)
        for back in (0, 10, leeway - 0.01, leeway, leeway + 0.01, 90):
            clock.now = t0 + 100 - back
            assert _outcome(cached, token) == _outcome(TokenVerifier(settings), token), back
        assert _outcome(cached, token) == "not_yet_valid"


def _write_keys(path: Path, keys: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys))
    tmp.replace(path)


def test_key_reload_empties_the_cache(settings: Settings, tmp_path: Path) -> None:
    keyfile = tmp_path / "keys.json"
    a, b = "a-secret-" + "a" * 32, "b-secret-" + "b" * 32
    _write_keys(keyfile, {"k-a": a, "k-b": b})
    store = KeyStore(dataclasses.replace(settings, jwt_keys_file=keyfile))
    v = TokenVerifier(store)
    tok_a = _sign(settings, _claims(settings, sid="s-a"), key=a, kid="k-a")
    tok_b = _sign(settings, _claims(settings, sid="s-b"), key=b, kid="k-b")
    assert v.verify_session(tok_a).session_id == "s-a"
    assert v.verify_session(tok_b).session_id == "s-b"
    assert len(v._cache) == 2

    _write_keys(keyfile, {"k-b": b})  # revoke k-a
    assert store.reload()
    assert _outcome(v, tok_a) == "unknown_kid"
    assert v.verify_session(tok_b).session_id == "s-b"  # checked again, cached again
    assert list(v._cache) == [tok_b]

    # the same kid with a new secret: the old signature no longer verifies
    _write_keys(keyfile, {"k-b": "b2-secret-" + "c" * 32})
    assert store.reload()
    assert _outcome(v, tok_b) == "bad_signature"
    # a failed reload keeps the keys, so it need not (and does not) empty the cache
    tok_b2 = _sign(settings, _claims(settings, sid="s-b2"), key="b2-secret-" + "c" * 32,
                   kid="k-b")
    assert v.verify_session(tok_b2).session_id == "s-b2"
    keyfile.write_text("{broken")
    assert not store.reload()
    assert list(v._cache) == [tok_b2]


def test_reload_during_a_check_is_not_cached(settings: Settings) -> None:
    v = TokenVerifier(settings)
    full_check = v._verify_session

    def racing_reload(token: str) -> object:
        result = full_check(token)
        assert v.keystore.reload()  # the keyset moves on while this token is checked
        return result

    v._verify_session = racing_reload  # type: ignore[method-assign]
    token = _sign(settings, _claims(settings))
    assert v.verify_session(token).session_id == "s1"
    assert len(v._cache) == 0


def test_cache_is_bounded_and_evicts_least_recently_used(settings: Settings) -> None:
    v = TokenVerifier(settings, cache_size=3)
    tokens = [_sign(settings, _claims(settings, sid=f"s{i}")) for i in range(6)]
    for t in tokens[:3]:
        v.verify_session(t)
    v.verify_session(tokens[0])  # a hit makes it the most recently used
    v.verify_session(tokens[3])
    assert list(v._cache) == [tokens[2], tokens[0], tokens[3]]
    for t in tokens:
        assert v.verify_session(t).session_id == f"s{tokens.index(t)}"
        assert len(v._cache) <= 3
    assert list(v._cache) == tokens[3:]


def test_a_token_one_character_off_is_not_served_from_cache(settings: Settings) -> None:
    v = TokenVerifier(settings)
    token = _sign(settings, _claims(settings))
    v.verify_session(token)
    head, payload, sig = token.split(".")

    def flip(segment: str, i: int) -> str:
        return segment[:i] + ("A" if segment[i] != "A" else "B") + segment[i + 1:]

    # (The last character of a base64url segment can carry unused bits, so the flips
    # are mid-segment, where every character is significant.)
    forged = [f"{flip(head, len(head) // 2)}.{payload}.{sig}",
              f"{head}.{flip(payload, len(payload) // 2)}.{sig}",
              f"{head}.{payload}.{flip(sig, len(sig) // 2)}"]
    for bad in forged:
        assert _outcome(v, bad) in {"bad_signature", "malformed_token", "unknown_kid",
                                    "bad_algorithm", "invalid_token"}, bad
        assert _outcome(v, bad) == _outcome(TokenVerifier(settings), bad)
    assert list(v._cache) == [token]
    assert _outcome(v, f"{head}.{payload}.{flip(sig, len(sig) // 2)}") == "bad_signature"


def test_rejections_and_service_tokens_are_not_cached(settings: Settings) -> None:
    v = TokenVerifier(settings)
    wrong_aud = _sign(settings, _claims(settings, aud="other"))
    for _ in range(2):
        assert _outcome(v, wrong_aud) == "wrong_audience"
    assert _outcome(v, "x" * 5000) == "oversized_token"
    assert v.verify_service(mint_service_token(settings)).subject == "ops"
    assert len(v._cache) == 0


def test_expired_tokens_leave_the_cache(settings: Settings, clock: Clock) -> None:
    # Sessions that ended leave their tokens behind; each new entry sweeps up to two
    # expired ones from the least recently used end, so they do not pile up to the bound.
    t0 = clock.now
    v = TokenVerifier(settings)
    old = [_sign(settings, _claims(settings, sid=f"old{i}", iat=int(t0), exp=int(t0) + 60))
           for i in range(5)]
    for t in old:
        v.verify_session(t)
    clock.now = t0 + 60 + settings.jwt_leeway_s  # every old token has expired
    new = [_sign(settings, _claims(settings, sid=f"new{i}", iat=int(clock.now),
                                   exp=int(clock.now) + 600)) for i in range(3)]
    v.verify_session(new[0])
    assert list(v._cache) == [*old[2:], new[0]]
    v.verify_session(new[1])
    v.verify_session(new[2])
    assert list(v._cache) == new
    # a cache of size 0 caches nothing, and does not trip over its emptiness
    v0 = TokenVerifier(settings, cache_size=0)
    assert v0.verify_session(new[0]).session_id == "new0" and len(v0._cache) == 0
