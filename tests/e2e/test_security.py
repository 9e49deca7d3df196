"""Security on the real embedded system: mutual TLS, bearer tokens, the role table, actor binding, rate limits,
and the audit of every decision. Callers are real gRPC clients with certificates and tokens made by the system's
own development CA and identity provider."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import jwt
import pytest
from google.protobuf import descriptor_pool

from lfr.pb import (  # noqa: F401  (registers the descriptors)
    audit_pb2,
    detection_pb2,
    embedding_pb2,
    identification_pb2,
    ingest_pb2,
    match_pb2,
    watchlist_pb2,
)
from lfr.runtime.access import Access
from lfr.runtime.devidp import find_dev_idp
from lfr.runtime.pki import create_dev_pki
from lfr.runtime.security import POLICY, ROLES, tls_files

SERVICE_OF = {"lfr.watchlist.v1.WatchlistService": "watchlist", "lfr.match.v1.MatchService": "match",
              "lfr.audit.v1.AuditService": "audit", "lfr.ingest.v1.IngestService": "ingest",
              "lfr.detection.v1.DetectionService": "detection", "lfr.embedding.v1.EmbeddingService": "embedding",
              "lfr.identification.v1.IdentificationService": "identification"}
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


def _methods():
    pool = descriptor_pool.Default()
    for full, svc in SERVICE_OF.items():
        for m in pool.FindServiceByName(full).methods:
            yield f"/{full}/{m.name}", svc, m.client_streaming, m.server_streaming


METHODS = sorted(_methods())


def ident(b: bytes) -> bytes:
    return b


def call_raw(channel, method: str, client_streaming: bool, server_streaming: bool, metadata=(), timeout=20.0):
    """Call a method with an empty message (bytes in, bytes out); return the status code."""
    try:
        if client_streaming:
            channel.stream_unary(method, ident, ident)(iter([]), timeout=timeout, metadata=metadata)
        elif server_streaming:
            for _ in channel.unary_stream(method, ident, ident)(b"", timeout=3, metadata=metadata):
                break
        else:
            channel.unary_unary(method, ident, ident)(b"", timeout=timeout, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def idp(system):
    return find_dev_idp(system.state_dir)


@pytest.fixture(scope="module")
def mtls_only(system):
    """Channels with the client certificate and no token (tokens are added per call)."""
    access = Access(system.state_dir / "security" / "tls", "client")
    chans = {s: access.channel(system.endpoint(s)) for s in SERVICE_OF.values()}
    yield chans
    for ch in chans.values():
        ch.close()


def test_every_method_is_in_the_role_table():
    missing = [m for m, *_ in METHODS if m not in POLICY]
    assert not missing, f"methods without a role entry (refused by default): {missing}"
    assert set(POLICY) <= {m for m, *_ in METHODS}


def test_each_role_against_each_method(mtls_only, idp):
    tokens = {role: idp.mint(f"role-{role}", roles=[role]) for role in ROLES}
    wrong = []
    for method, svc, cs, ss in METHODS:
        for role in ROLES:
            code = call_raw(mtls_only[svc], method, cs, ss, bearer(tokens[role]))
            allowed = role in POLICY[method]
            if allowed and code in REFUSED or not allowed and code != grpc.StatusCode.PERMISSION_DENIED:
                wrong.append((method, role, code.name))
    assert not wrong, wrong


def test_service_certificates_act_as_services_and_nothing_more(system):
    # the detection service's own certificate: may read deployments (as ingest/match do), may not adjudicate
    access = Access(system.state_dir / "security" / "tls", "detection")
    with access.channel(system.endpoint("watchlist")) as ch:
        assert call_raw(ch, "/lfr.watchlist.v1.WatchlistService/ListDeployments", False, False) == grpc.StatusCode.OK
    with access.channel(system.endpoint("match")) as ch:
        code = call_raw(ch, "/lfr.match.v1.MatchService/Adjudicate", False, False)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # the generic client certificate alone names nobody: a token is required
    with Access(system.state_dir / "security" / "tls", "client").channel(system.endpoint("watchlist")) as ch:
        code = call_raw(ch, "/lfr.watchlist.v1.WatchlistService/ListDeployments", False, False)
    assert code == grpc.StatusCode.UNAUTHENTICATED


def _status(ch, token: str) -> tuple[grpc.StatusCode, str]:
    stub = ch.unary_unary("/lfr.watchlist.v1.WatchlistService/ListDeployments", lambda b: b, lambda b: b)
    try:
        stub(b"", timeout=10, metadata=bearer(token))
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def test_expired_wrong_audience_tampered_and_foreign_tokens_are_refused(system, mtls_only, idp):
    ch = mtls_only["watchlist"]
    good = idp.mint("auditor")
    assert _status(ch, good)[0] == grpc.StatusCode.OK
    kid = idp.current_kid()
    key = (idp.signing_dir / f"{kid}.key").read_bytes()
    now = int(time.time())
    base = {"iss": "lfr-dev-idp", "aud": "lfr", "sub": "auditor", "roles": ["auditor"], "iat": now - 7200,
            "exp": now - 3600}
    expired = jwt.encode(base, key, algorithm="ES256", headers={"kid": kid})
    wrong_aud = jwt.encode({**base, "aud": "another-system", "iat": now, "exp": now + 600}, key, algorithm="ES256",
                           headers={"kid": kid})
    wrong_iss = jwt.encode({**base, "iss": "someone-else", "iat": now, "exp": now + 600}, key, algorithm="ES256",
                           headers={"kid": kid})
    head, payload, sig = good.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["roles"] = ["auditor", "authorising_officer"]  # privilege escalation attempt, signature kept
    tampered = ".".join([head, jwt.utils.base64url_encode(json.dumps(claims).encode()).decode(), sig])
    hs256 = jwt.encode({**base, "iat": now, "exp": now + 600}, "a-guessable-shared-secret-of-32-bytes!", algorithm="HS256",
                       headers={"kid": kid})
    unknown_kid = jwt.encode({**base, "iat": now, "exp": now + 600}, key, algorithm="ES256",
                             headers={"kid": "no-such-key"})
    cases = {"expired": (expired, "expired"), "wrong audience": (wrong_aud, "audience"),
             "wrong issuer": (wrong_iss, "issuer"), "tampered": (tampered, "signature"),
             "symmetric alg": (hs256, "algorithm"), "unknown kid": (unknown_kid, "unknown key"),
             "garbage": ("not-a-jwt", "malformed")}
    for name, (token, words) in cases.items():
        code, details = _status(ch, token)
        assert code == grpc.StatusCode.UNAUTHENTICATED and words in details, (name, code, details)
        assert token not in details
    # no token at all, and a non-bearer scheme
    code, details = _status(ch, "")
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_key_rotation_without_restart(system, mtls_only, idp):
    old = idp.mint("auditor")
    new_kid = idp.rotate()
    new = idp.mint("auditor")
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert _status(mtls_only["watchlist"], new)[0] == grpc.StatusCode.OK  # picked up from the keys folder
    assert _status(mtls_only["watchlist"], old)[0] == grpc.StatusCode.OK  # issued tokens live until they expire


def test_unknown_client_certificate_is_rejected_by_tls(system, tmp_path):
    foreign = create_dev_pki(tmp_path / "foreign", ["client"])
    ca, _, _ = tls_files(system.state_dir / "security" / "tls", "client")
    _, cert, key = tls_files(foreign, "client")
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    idp = find_dev_idp(system.state_dir)
    with grpc.secure_channel(system.endpoint("watchlist"), creds) as ch:
        code = call_raw(ch, "/lfr.watchlist.v1.WatchlistService/ListDeployments", False, False,
                        bearer(idp.mint("auditor")), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE  # the handshake fails: a valid token does not help
    # and no certificate at all
    with grpc.secure_channel(system.endpoint("watchlist"), grpc.ssl_channel_credentials(ca)) as ch:
        code = call_raw(ch, "/lfr.watchlist.v1.WatchlistService/ListDeployments", False, False,
                        bearer(idp.mint("auditor")), timeout=5)
    assert code == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(system.endpoint("watchlist")) as ch:
        assert call_raw(ch, "/lfr.watchlist.v1.WatchlistService/ListDeployments", False, False,
                        timeout=5) == grpc.StatusCode.UNAVAILABLE


def test_a_person_cannot_act_in_another_name(system, mtls_only, idp):
    stub = mtls_only["watchlist"].unary_unary("/lfr.watchlist.v1.WatchlistService/AuthoriseDeployment",
                                              watchlist_pb2.AuthoriseRequest.SerializeToString,
                                              watchlist_pb2.Deployment.FromString)
    with pytest.raises(grpc.RpcError) as err:
        stub(watchlist_pb2.AuthoriseRequest(deployment_id="x", actor="superintendent"), timeout=10,
             metadata=bearer(idp.mint("inspector")))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not the authenticated caller" in err.value.details()


def test_rate_limit_per_caller(system, mtls_only, idp):
    token = idp.mint("rate-test", roles=["auditor"])
    other = idp.mint("rate-other", roles=["auditor"])
    codes = []
    while grpc.StatusCode.RESOURCE_EXHAUSTED not in codes and len(codes) < 2000:
        codes.append(_status(mtls_only["watchlist"], token)[0])
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, set(codes)
    assert codes[:-1].count(grpc.StatusCode.OK) >= 100  # the burst (LFR_RATE_LIMIT_BURST) passes
    assert _status(mtls_only["watchlist"], other)[0] == grpc.StatusCode.OK  # another caller is unaffected


def test_decisions_are_audited_with_the_caller_and_no_token(system, mtls_only, idp):
    token = idp.mint("audit-probe", roles=["public"])
    assert _status(mtls_only["watchlist"], token)[0] == grpc.StatusCode.PERMISSION_DENIED
    auditor = Access.dev(system.state_dir, user="auditor")
    with auditor.channel(system.endpoint("audit")) as ch:
        stub = ch.unary_unary("/lfr.audit.v1.AuditService/Query", audit_pb2.QueryRequest.SerializeToString,
                              audit_pb2.QueryResponse.FromString)
        deadline, found, after = time.monotonic() + 30, [], 0
        while not found and time.monotonic() < deadline:
            recs = stub(audit_pb2.QueryRequest(type_prefix="access.watchlist", after_sequence=after), timeout=20).records
            found = [json.loads(r.summary_json) for r in recs if r.actor == "audit-probe"]
            if recs:
                after = recs[-1].sequence
            else:
                time.sleep(0.3)
    assert found, "the refused call is not in the audit"
    assert found[0]["decision"] == "ACCESS_DECISION_DENIED" and found[0]["roles"] == ["public"]
    assert found[0]["credential"].startswith("token:")
    logs = "".join(p.read_text() for p in (system.state_dir / "logs").glob("*.log"))
    assert token not in logs and token.split(".")[2] not in logs


def test_service_calls_are_audited_as_summaries_not_one_by_one(system):
    method = "/lfr.watchlist.v1.WatchlistService/GetPolicy"  # no other test calls it with this certificate
    with Access(system.state_dir / "security" / "tls", "detection").channel(system.endpoint("watchlist")) as ch:
        for _ in range(5):
            assert call_raw(ch, method, False, False) == grpc.StatusCode.OK
    auditor = Access.dev(system.state_dir, user="auditor")
    with auditor.channel(system.endpoint("audit")) as ch:
        stub = ch.unary_unary("/lfr.audit.v1.AuditService/Query", audit_pb2.QueryRequest.SerializeToString,
                              audit_pb2.QueryResponse.FromString)

        def records():
            out, after = [], 0
            while True:
                recs = stub(audit_pb2.QueryRequest(type_prefix=f"access.watchlist.{method}", after_sequence=after),
                            timeout=20).records
                if not recs:
                    return out
                out += [json.loads(r.summary_json) for r in recs if r.actor == "detection"]
                after = recs[-1].sequence

        deadline, found = time.monotonic() + 30, []
        while sum(int(r.get("count", 0)) for r in found) < 5 and time.monotonic() < deadline:
            time.sleep(1.0)
            found = records()
    assert sum(int(r.get("count", 0)) for r in found) == 5, found  # all five, in summaries
    assert all(int(r.get("count", 0)) >= 1 and r.get("since") for r in found)  # none recorded one by one


def test_cli_as_needs_a_development_user_and_is_refused_with_a_real_token(system):
    env = dict(os.environ, LFR_STATE_DIR=str(system.state_dir))
    lfr = [sys.executable, "-m", "lfr.cli.main", "deployment", "list"]
    r = subprocess.run([*lfr, "--as", "builder"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*lfr, "--as", "mallory"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown user 'mallory'" in r.stderr and "builder" in r.stderr
    token = find_dev_idp(system.state_dir).mint("builder")
    env.update(LFR_TOKEN=token, LFR_TLS_DIR=str(system.state_dir / "security" / "tls"))
    r = subprocess.run([*lfr, "--as", "builder"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--as is refused" in r.stderr
    r = subprocess.run(lfr, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # the token alone names the caller
    assert token not in r.stdout + r.stderr
