"""Connect tokens are standard JWTs: minted by any backend's JWT library (here PyJWT directly, as
another service would), HS256 with CONNECT_SECRET or RS256/ES256 with CONNECT_PUBLIC_KEY; forged,
expired, unsigned (alg none) or exp-less tokens are refused before accept; sub names the client in logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scripts.redis_server import PrivateRedis
from service.config import Settings, SettingsError
from service.gate import TokenError, Verifier, verify_claims
from tests.support.clients import recv_ack, recv_json, recv_publication
from tests.support.commands import command
from tests.support.servers import Service
from tests.support.waits import wait_until

SECRET = "jwt-connect-secret-0123456789abcdef"  # 35 bytes: at least HMAC-SHA256's 32


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pyjwt_token(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256") -> str:
    """A token as another backend mints it: its own JWT library, none of our code."""
    return jwt.encode(claims, key, algorithm=algorithm)


def unsigned_token(claims: dict[str, Any]) -> str:
    """``alg: none``: no signature at all (the classic JWT forgery)."""
    return f"{_b64(orjson.dumps({'alg': 'none', 'typ': 'JWT'}))}.{_b64(orjson.dumps(claims))}."


def _pem_public(private: Any) -> str:
    return str(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode())


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def soon(seconds: float = 3600) -> int:
    return int(time.time() + seconds)


# --- verification, in process -----------------------------------------------------------------------


def test_a_token_minted_by_pyjwt_directly_is_accepted_with_its_sub() -> None:
    token = pyjwt_token({"sub": "user-42", "channels": ["news", "sport"], "exp": soon(), "iat": int(time.time())})
    claims = verify_claims(SECRET, token)
    assert claims.channels == {"news", "sport"} and claims.sub == "user-42" and claims.exp > time.time()
    # A fractional exp (NumericDate allows it) and claims we do not know are fine.
    assert verify_claims(SECRET, pyjwt_token({"channels": ["*"], "exp": time.time() + 60.5, "role": "x"})).allows("a")


def test_forged_expired_unsigned_and_incomplete_tokens_are_refused() -> None:
    good = {"channels": ["news"], "exp": soon()}
    cases = {
        "wrong secret": (pyjwt_token(good, key="another-secret-0123456789abcdef0123"), "bad signature"),
        "expired": (pyjwt_token({**good, "exp": int(time.time()) - 5}), "expired"),
        "alg none": (unsigned_token(good), "algorithm 'none' is not accepted"),
        "no exp": (pyjwt_token({"channels": ["news"]}), "exp claim is required"),
        "no channels": (pyjwt_token({"exp": soon()}), "channels must be a list"),
        "channels not a list": (pyjwt_token({"exp": soon(), "channels": "news"}), "channels must be a list"),
        "HS512": (pyjwt_token(good, algorithm="HS512"), "algorithm 'HS512' is not accepted"),
        "not a JWT": ("garbage", "not a JWT"),
    }
    for what, (token, message) in cases.items():
        with pytest.raises(TokenError, match=message):
            verify_claims(SECRET, token)
            pytest.fail(f"{what}: accepted")


def test_rs256_and_es256_with_a_public_key_and_no_algorithm_confusion(rsa_key: Any) -> None:
    rsa_pem = _pem_public(rsa_key)
    verifier = Verifier(public_key_pem=rsa_pem)
    token = pyjwt_token({"sub": "svc", "channels": ["news"], "exp": soon()}, key=rsa_key, algorithm="RS256")
    assert verifier.verify(token).sub == "svc"
    # The public key used as an HMAC secret (the classic RS256 -> HS256 confusion) is refused.
    # (PyJWT refuses to mint that itself, so it is signed by hand.)
    signing_input = f"{_b64(orjson.dumps({'alg': 'HS256'}))}.{_b64(orjson.dumps({'channels': ['*'], 'exp': soon()}))}"
    signature = hmac.new(rsa_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    confused = f"{signing_input}.{_b64(signature)}"
    with pytest.raises(TokenError, match="'HS256' is not accepted"):
        verifier.verify(confused)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TokenError, match="bad signature"):
        verifier.verify(pyjwt_token({"channels": ["news"], "exp": soon()}, key=other, algorithm="RS256"))

    ec_key = ec.generate_private_key(ec.SECP256R1())
    es = Verifier(secret=SECRET, public_key_pem=_pem_public(ec_key))
    assert sorted(es.keys) == ["ES256", "HS256"]  # both at once: e.g. while moving from one to the other
    assert es.verify(pyjwt_token({"channels": ["a"], "exp": soon()}, key=ec_key, algorithm="ES256")).allows("a")
    assert es.verify(pyjwt_token({"channels": ["a"], "exp": soon()})).allows("a")


def test_connect_public_key_inline_or_from_a_file_and_invalid_ones_stop_start_up(
    rsa_key: Any, tmp_path: Path
) -> None:
    pem = _pem_public(rsa_key)
    assert Settings.from_env({"CONNECT_PUBLIC_KEY": pem}).connect_public_key == pem.strip()
    path = tmp_path / "connect.pub"
    path.write_text(pem)
    settings = Settings.from_env({"CONNECT_PUBLIC_KEY": str(path)})
    assert settings.connect_public_key == pem.strip()
    assert settings.public()["connect_public_key"] == "(set)"
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    for bad, shown in (
        (str(tmp_path / "missing.pem"), "missing.pem"),
        ("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----", "(an inline PEM block)"),
        (_pem_public(small), "(an inline PEM block)"),  # RSA under 2048 bits
    ):
        with pytest.raises(SettingsError, match="CONNECT_PUBLIC_KEY=") as caught:
            Settings.from_env({"CONNECT_PUBLIC_KEY": bad})
        assert shown in str(caught.value) and "PEM public key" in str(caught.value)


def test_token_command_mints_sub_and_rs256(rsa_key: Any, tmp_path: Path) -> None:
    env = {**os.environ, "CONNECT_SECRET": SECRET}
    done = command("token", "--channels", "news", "--ttl", "60", "--sub", "user-7", env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    decoded = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert decoded["sub"] == "user-7" and decoded["channels"] == ["news"] and decoded["exp"] <= time.time() + 61
    key_file = tmp_path / "connect.key"
    key_file.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    env.pop("CONNECT_SECRET")
    done = command("token", "--channels", "*", "--private-key", str(key_file), env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert jwt.get_unverified_header(done.stdout.strip())["alg"] == "RS256"
    assert Verifier(public_key_pem=_pem_public(rsa_key)).verify(done.stdout.strip()).allows("any")


# --- against the running service ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(rsa_key: Any) -> dict[str, Any]:
    return {"private": rsa_key, "public": _pem_public(rsa_key)}


@pytest.fixture(scope="module")
def service(redis_server: PrivateRedis, keys: dict[str, Any]) -> Iterator[Service]:
    with Service(redis_server.url, workers=1, connect_secret=SECRET, connect_public_key=keys["public"]) as svc:
        yield svc


async def _refused(service: Service, query: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        ws = await service.connect(query)
        await ws.close()
    response = caught.value.response
    return response.status_code, response.body.decode() if response.body else ""


async def test_the_service_admits_pyjwt_tokens_and_refuses_forgeries_before_accept(
    service: Service, keys: dict[str, Any]
) -> None:
    hs = pyjwt_token({"sub": "backend-a", "channels": ["news"], "exp": soon()})
    rs = pyjwt_token({"sub": "backend-b", "channels": ["*"], "exp": soon()}, key=keys["private"], algorithm="RS256")
    for token in (hs, rs):
        ws = await service.connect(f"?channels=news&token={token}")
        await recv_ack(ws, "news", timeout=10)
        assert service.publish("news", {"n": 1}).status_code == 202
        assert (await recv_publication(ws, 10))["data"] == {"n": 1}
        await ws.close()
    refusals = {
        "alg none": unsigned_token({"channels": ["news"], "exp": soon()}),
        "no exp": pyjwt_token({"channels": ["news"]}),
        "expired": pyjwt_token({"channels": ["news"], "exp": int(time.time()) - 5}),
        "wrong secret": pyjwt_token({"channels": ["news"], "exp": soon()}, key="x" * 40),
    }
    for what, token in refusals.items():
        status, body = await _refused(service, f"?channels=news&token={token}")
        assert status == 403, what
        assert "token" in body, (what, body)
    status, body = await _refused(service, f"?channels=sport&token={hs}")
    assert status == 403 and "'sport'" in body


async def test_the_token_expired_close_names_the_sub_in_the_log(service: Service) -> None:
    token = pyjwt_token({"sub": "user-4711", "channels": ["news"], "exp": int(time.time()) + 2})
    ws = await service.connect(f"?channels=news&token={token}")
    await recv_ack(ws, "news", timeout=10)
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            await recv_json(ws, timeout=15)
    assert caught.value.rcvd is not None and caught.value.rcvd.code == 3000
    line = wait_until(
        lambda: next((ln for ln in service.log().splitlines() if "token expired" in ln and "closed 3000" in ln), None),
        what="the expiry close in the log",
    )
    assert "sub 'user-4711'" in line
    assert token not in service.log()
