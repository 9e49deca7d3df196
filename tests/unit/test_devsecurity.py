"""Development PKI (lfr.runtime.pki), development identity provider (lfr.runtime.devidp), `lfr certs dev`,
and a real mutual-TLS gRPC handshake with the generated certificates."""

from __future__ import annotations

import ipaddress
import json
import time
from concurrent import futures
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lfr.cli.main import main as lfr_main
from lfr.runtime.devidp import DEFAULT_USERS, DevIdP, UnknownUserError, create_dev_security, find_dev_idp
from lfr.runtime.embedded import SERVICES
from lfr.runtime.pki import cert_common_name, create_dev_pki


def load(folder: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes())


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return create_dev_pki(tmp_path_factory.mktemp("pki") / "tls", ["audit", "client"],
                          hosts=("localhost", "127.0.0.1", "10.0.0.7", "lfr.example"))


def test_ca_and_leaf_certificates(pki):
    ca = load(pki, "ca")
    assert cert_common_name((pki / "ca.pem").read_bytes()).startswith("LFR development CA ")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert mode(pki) == 0o700 and mode(pki / "ca.key") == 0o600

    leaf = load(pki, "audit")
    assert cert_common_name((pki / "audit.pem").read_bytes()) == "audit"
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["audit", "localhost", "lfr.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                        ipaddress.ip_address("10.0.0.7")]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert mode(pki / "audit.key") == 0o600 and mode(pki / "client.key") == 0o600

    # the full path-validation of cryptography's verifier, as a server and as a client certificate
    store = Store([ca])
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName("audit")).verify(leaf, [])
    PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))) \
        .verify(leaf, [])
    PolicyBuilder().store(store).build_client_verifier().verify(load(pki, "client"), [])


def test_idempotent_and_renewal(tmp_path):
    folder = create_dev_pki(tmp_path / "tls", ["watchlist"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    create_dev_pki(folder, ["watchlist", "match"])
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {k: after[k] for k in before} == before  # same CA, same certificate and key
    assert {"match.pem", "match.key"} <= set(after)

    # a certificate not signed by the current CA is replaced
    other = create_dev_pki(tmp_path / "other", ["watchlist"])
    (folder / "watchlist.pem").write_bytes((other / "watchlist.pem").read_bytes())
    create_dev_pki(folder, ["watchlist"])
    load(folder, "watchlist").verify_directly_issued_by(load(folder, "ca"))
    # one about to expire is replaced too
    create_dev_pki(tmp_path / "short", ["x"], days=1)
    first = (tmp_path / "short" / "x.pem").read_bytes()
    create_dev_pki(tmp_path / "short", ["x"], days=1)
    assert (tmp_path / "short" / "x.pem").read_bytes() != first


@pytest.mark.parametrize("name", ["", "a b", "../x", "x.y", "ca"])
def test_bad_names(tmp_path, name):
    with pytest.raises(ValueError):
        create_dev_pki(tmp_path, [name])


def verify(idp: DevIdP, token: str) -> dict:
    kid = jwt.get_unverified_header(token)["kid"]
    key = (idp.keys_dir / f"{kid}.pem").read_bytes()
    return jwt.decode(token, key, algorithms=["ES256"], audience="lfr", issuer="lfr-dev-idp")


def test_idp_mint_and_rotate(tmp_path):
    idp = DevIdP(tmp_path / "idp").ensure()
    kid = idp.current_kid()
    assert idp.ensure().current_kid() == kid  # idempotent
    assert idp.users() == DEFAULT_USERS
    doc = json.loads((idp.folder / "users.json").read_text())
    assert (doc["issuer"], doc["audience"]) == ("lfr-dev-idp", "lfr")
    assert mode(idp.signing_dir / f"{kid}.key") == 0o600

    token = idp.mint("operator", ttl_s=60)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": kid, "typ": "JWT"}
    claims = verify(idp, token)
    assert claims["sub"] == "operator" and claims["roles"] == ["operator", "engagement_officer"]
    assert claims["exp"] == claims["iat"] + 60 and abs(claims["iat"] - time.time()) < 5
    assert claims["nbf"] == claims["iat"] and claims["jti"] != verify(idp, idp.mint("operator"))["jti"]
    assert verify(idp, idp.mint("nobody", roles=["auditor"]))["roles"] == ["auditor"]

    new = idp.rotate()
    assert new != kid and idp.current_kid() == new == (idp.folder / "current").read_text().strip()
    assert sorted(p.stem for p in idp.keys_dir.glob("*.pem")) == sorted([kid, new])
    assert verify(idp, token)["sub"] == "operator"  # issued before the rotation, still verifies
    assert jwt.get_unverified_header(idp.mint("auditor"))["kid"] == new
    with pytest.raises(jwt.InvalidSignatureError):  # the old key does not verify new tokens
        jwt.decode(idp.mint("auditor"), (idp.keys_dir / f"{kid}.pem").read_bytes(), algorithms=["ES256"],
                   audience="lfr")


def test_unknown_user(tmp_path):
    idp = DevIdP(tmp_path / "idp").ensure()
    with pytest.raises(UnknownUserError) as err:
        idp.mint("mallory")
    assert isinstance(err.value, KeyError)
    assert "mallory" in str(err.value) and "builder" in str(err.value) and "auditor" in str(err.value)


def test_create_dev_security_and_find(tmp_path):
    assert find_dev_idp(tmp_path) is None
    paths = create_dev_security(tmp_path, SERVICES)
    assert paths == {"tls_dir": str(tmp_path / "security" / "tls"),
                     "auth_keys_dir": str(tmp_path / "security" / "idp" / "keys"),
                     "idp_dir": str(tmp_path / "security" / "idp")}
    for name in (*SERVICES, "nats", "client", "ca"):
        assert (tmp_path / "security" / "tls" / f"{name}.key").is_file()
    idp = find_dev_idp(tmp_path)
    assert idp is not None and idp.folder == tmp_path / "security" / "idp"
    assert list(idp.keys_dir.glob("*.pem"))


def test_cli_certs_dev(tmp_path, capsys):
    out = tmp_path / "sec"
    lfr_main(["certs", "dev", "--out", str(out), "--host", "192.168.1.5", "--days", "7"])
    printed = capsys.readouterr().out
    assert f"LFR_TLS_DIR={out / 'tls'}" in printed and f"LFR_AUTH_KEYS_DIR={out / 'idp' / 'keys'}" in printed
    for name in (*SERVICES, "nats", "client"):
        cert = load(out / "tls", name)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address("192.168.1.5") in sans.get_values_for_type(x509.IPAddress)
        assert 6 < (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 7
    assert (out / "idp" / "users.json").is_file() and (out / "idp" / "current").is_file()


def test_cli_certs_dev_default_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LFR_STATE_DIR", str(tmp_path / "state"))
    lfr_main(["certs", "dev"])
    assert (tmp_path / "state" / "security" / "tls" / "ca.pem").is_file()
    assert str(tmp_path / "state" / "security" / "idp") in capsys.readouterr().out


def test_mutual_tls_grpc(pki, tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials([((pki / "audit.key").read_bytes(), (pki / "audit.pem").read_bytes())],
                                              root_certificates=(pki / "ca.pem").read_bytes(),
                                              require_client_auth=True)
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        def check(folder: Path) -> health_pb2.HealthCheckResponse:
            creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(),
                                                 (folder / "client.key").read_bytes(),
                                                 (folder / "client.pem").read_bytes())
            with grpc.secure_channel(f"localhost:{port}", creds) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

        assert check(pki).status == health_pb2.HealthCheckResponse.SERVING
        stranger = create_dev_pki(tmp_path / "stranger", ["client"])  # an unrelated CA
        with pytest.raises(grpc.RpcError) as err:
            check(stranger)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
