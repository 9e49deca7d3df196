"""Who may call what: caller authentication, the one role table, and the transport security of every service.

Every gRPC connection is mutually authenticated TLS (certificates from ``LFR_TLS_DIR``): the six services know
each other by certificate, and a connection from anyone without a certificate from the configured CA never gets
as far as a method. On top of that, a person (or another police system acting for one) presents a bearer token:
a signed JWT (ES256 or RS256) whose issuer and audience are checked, whose key is named by ``kid`` and read from
``LFR_AUTH_KEYS_DIR/<kid>.pem`` (keys rotate by adding a file), and whose ``roles`` claim says what it may do.

The interceptor decides each call in one place, in this order: health checks pass (Kubernetes probes them);
identify the caller (token, else a service certificate, else UNAUTHENTICATED); look the method up in
``POLICY`` (a method missing from the table is refused: deny by default); apply the caller's rate limit; bind
the caller to the request's ``actor`` field (a person cannot act in another's name); run the handler under a
deadline. Every decision, allowed or refused, is published as an ``AccessEvent`` for the audit. Tokens and
their claims never reach a log, an error message or the audit; only the subject, roles and key id do. A request
body that is not a valid protobuf message is answered INVALID_ARGUMENT, after the caller has been checked (gRPC's
own answer would be UNKNOWN, naming the parser's exception, to anyone).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from lfr.runtime import metrics
from lfr.runtime.config import Config, ConfigError
from lfr.runtime.logs import get_logger

SERVICES = ("ingest", "detection", "embedding", "watchlist", "match", "audit", "identification")
ROLES = ("operator", "engagement_officer", "watchlist_manager", "authorising_officer", "investigator", "auditor",
         "public", "service")
HUMAN_ROLES = frozenset(ROLES) - {"service"}

_W, _M, _A = "/lfr.watchlist.v1.WatchlistService/", "/lfr.match.v1.MatchService/", "/lfr.audit.v1.AuditService/"
_I, _D, _E = "/lfr.ingest.v1.IngestService/", "/lfr.detection.v1.DetectionService/", \
    "/lfr.embedding.v1.EmbeddingService/"
_ID = "/lfr.identification.v1.IdentificationService/"


def _roles(*names: str) -> frozenset[str]:
    unknown = set(names) - set(ROLES)
    assert not unknown, unknown
    return frozenset(names)


_STAFF = _roles("operator", "engagement_officer", "watchlist_manager", "authorising_officer", "investigator",
                "auditor", "service")
_DEPLOYMENT_READERS = _roles("operator", "engagement_officer", "watchlist_manager", "authorising_officer",
                             "auditor", "service")

# The role table: every external method of the six services, and the roles that may call it (least privilege).
POLICY: dict[str, frozenset[str]] = {
    # watchlist: deployments and their governance
    _W + "CreateDeployment": _roles("watchlist_manager"),
    _W + "GetDeployment": _DEPLOYMENT_READERS,
    _W + "ListDeployments": _DEPLOYMENT_READERS,
    _W + "AuthoriseDeployment": _roles("authorising_officer"),
    _W + "StartDeployment": _roles("operator"),
    _W + "EndDeployment": _roles("operator", "authorising_officer"),
    _W + "CancelDeployment": _roles("operator", "authorising_officer"),
    _W + "ReembedWatchlist": _roles("watchlist_manager"),
    _W + "EnrollEntry": _roles("watchlist_manager"),
    _W + "AddFromReference": _roles("watchlist_manager"),
    _W + "RemoveEntry": _roles("watchlist_manager"),
    _W + "ListEntries": _roles("watchlist_manager", "authorising_officer", "auditor"),
    _W + "GetEntryImages": _roles("operator", "engagement_officer"),  # the reference beside an alert's probe
    _W + "AddReference": _roles("watchlist_manager"),
    _W + "ListReferences": _roles("watchlist_manager", "authorising_officer", "auditor"),
    _W + "GetPolicy": frozenset(ROLES),
    _W + "Search": _roles("service", "watchlist_manager"),
    _W + "GetWatchlistVectors": _roles("service"),  # match holds a live watchlist's vectors in memory
    # identification: galleries, operator-initiated and retrospective identification (case reference required)
    _ID + "AddGalleryImages": _roles("watchlist_manager"),
    _ID + "FindGalleryImages": _roles("watchlist_manager", "investigator"),
    _ID + "GetGallery": _roles("watchlist_manager", "investigator", "auditor"),
    _ID + "ListGalleries": _roles("watchlist_manager", "investigator", "auditor"),
    _ID + "ReembedGallery": _roles("watchlist_manager"),  # a model change: the gallery's images re-embedded (#17)
    _ID + "Identify": _roles("investigator"),
    _ID + "SubmitJob": _roles("investigator"),
    _ID + "GetJob": _roles("investigator", "auditor"),
    _ID + "ListJobs": _roles("investigator", "auditor"),
    _ID + "StreamResults": _roles("investigator"),
    _ID + "CancelJob": _roles("investigator"),
    # match: alerts for officers' devices and their adjudication
    _M + "StreamAlerts": _roles("operator", "engagement_officer"),
    _M + "GetStats": _roles("operator", "engagement_officer", "auditor"),
    _M + "GetAlert": _roles("operator", "engagement_officer", "auditor"),
    _M + "ListAlerts": _roles("operator", "engagement_officer", "auditor"),
    _M + "Adjudicate": _roles("engagement_officer"),
    # audit: the record, and what the public may read
    _A + "Query": _roles("auditor"),
    _A + "Verify": _roles("auditor"),
    _A + "DeploymentReport": _roles("auditor", "authorising_officer"),
    _A + "PublicRecords": frozenset(ROLES),
    _A + "Totals": frozenset(ROLES),
    # ingest: cameras' frames (a gateway is a service) and pulled sources
    _I + "PushFrames": _roles("service", "operator"),
    _I + "StartSource": _roles("operator"),
    _I + "StopSource": _roles("operator"),
    _I + "ListSources": _roles("operator", "engagement_officer", "auditor"),
    # detection and embedding: internal stages (biometric in, biometric out)
    _D + "Detect": _roles("service"),
    _E + "Embed": _roles("service"),
    _E + "GetModel": _STAFF,
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes and load balancers: status only, no data
AUTHENTICATED_PREFIXES = ("/grpc.reflection.",)  # any authenticated caller may list the API

CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("lfr_caller", default=None)


@dataclass(frozen=True)
class Identity:
    subject: str  # token subject, or the service's certificate name
    roles: frozenset[str]
    credential: str  # "token:<kid>", "certificate" or "insecure"

    @property
    def is_service(self) -> bool:
        return self.credential == "certificate"


class AuthError(Exception):
    """A refused caller: ``code`` is the gRPC status name; the message holds no secret."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def caller_name(default: str = "anonymous") -> str:
    """The authenticated caller of the current RPC (for audit records)."""
    ident = CALLER.get()
    return ident.subject if ident is not None else default


# ---------------------------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------------------------
class TokenVerifier:
    """Checks bearer JWTs against the public keys in a folder (``<kid>.pem``), re-reading it for a new kid."""

    ALGORITHMS = ("ES256", "RS256")

    def __init__(self, keys_dir: str | Path, issuer: str, audience: str, leeway_s: float = 30.0):
        self.keys_dir = Path(keys_dir)
        if not self.keys_dir.is_dir():
            raise ConfigError("LFR_AUTH_KEYS_DIR: not a folder of <kid>.pem public keys")
        self.issuer, self.audience, self.leeway_s = issuer, audience, leeway_s
        self._keys: dict[str, object] = {}
        self._dir_mtime = -1
        self._cache: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._scan()
        if not self._keys:
            raise ConfigError("LFR_AUTH_KEYS_DIR: holds no <kid>.pem public key")

    def _scan(self) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        keys = {}
        self._dir_mtime = self._mtime()
        for p in sorted(self.keys_dir.glob("*.pem")):
            try:
                keys[p.stem] = load_pem_public_key(p.read_bytes())
            except (ValueError, OSError):
                get_logger().warning("auth.key_unreadable", key_id=p.stem)
        self._keys = keys

    def _mtime(self) -> int:
        try:
            return self.keys_dir.stat().st_mtime_ns
        except OSError:
            return -1

    def _key(self, kid: str):
        if kid not in self._keys and self._mtime() != self._dir_mtime:
            self._scan()  # a rotated-in key appears without a restart (one stat per unknown kid)
        return self._keys.get(kid)

    def verify(self, token: str) -> Identity:
        import jwt

        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit[1] > now:
                return hit[0]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("UNAUTHENTICATED", "malformed bearer token") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("UNAUTHENTICATED", "bearer token names no key (kid)")
        if header.get("alg") not in self.ALGORITHMS:
            raise AuthError("UNAUTHENTICATED", "bearer token algorithm not accepted")
        key = self._key(kid)
        if key is None:
            raise AuthError("UNAUTHENTICATED", f"bearer token signed with an unknown key {kid[:64]!r}")
        try:
            claims = jwt.decode(token, key, algorithms=list(self.ALGORITHMS), audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway_s,
                                options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("UNAUTHENTICATED", "bearer token expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("UNAUTHENTICATED", "bearer token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("UNAUTHENTICATED", "bearer token from an untrusted issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("UNAUTHENTICATED", "bearer token signature invalid") from None
        except jwt.PyJWTError as exc:
            raise AuthError("UNAUTHENTICATED", f"bearer token rejected ({type(exc).__name__})") from None
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthError("UNAUTHENTICATED", "bearer token roles claim is not a list of names")
        subject = str(claims["sub"])
        if not subject.strip() or len(subject) > 256:
            raise AuthError("UNAUTHENTICATED", "bearer token subject is empty or too long")
        ident = Identity(subject, frozenset(r for r in roles if r in ROLES), f"token:{kid}")
        with self._lock:
            self._cache[digest] = (ident, float(claims["exp"]))
            while len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return ident


# ---------------------------------------------------------------------------------------------------------------
# transport
# ---------------------------------------------------------------------------------------------------------------
def tls_files(tls_dir: str | Path, name: str) -> tuple[bytes, bytes, bytes]:
    """(ca.pem, <name>.pem, <name>.key) from a TLS folder, or ConfigError naming what is missing."""
    folder = Path(tls_dir)
    out = []
    for fname in ("ca.pem", f"{name}.pem", f"{name}.key"):
        try:
            out.append((folder / fname).read_bytes())
        except OSError:
            raise ConfigError(f"LFR_TLS_DIR: cannot read {fname}") from None
    return out[0], out[1], out[2]


def transport_mode(config: Config) -> str:
    """"mtls" or "insecure"; ConfigError when neither TLS material nor the explicit insecure flag is set."""
    if config.tls_dir:
        return "mtls"
    if config.insecure:
        return "insecure"
    raise ConfigError("LFR_TLS_DIR: required (or set LFR_INSECURE=1 for plaintext development use)")


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    if transport_mode(config) == "insecure":
        return None
    ca, cert, key = tls_files(config.tls_dir, config.service)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(tls_dir: str | Path, name: str) -> grpc.ChannelCredentials:
    ca, cert, key = tls_files(tls_dir, name)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# ---------------------------------------------------------------------------------------------------------------
# the interceptor
# ---------------------------------------------------------------------------------------------------------------
class RateLimiter:
    """A token bucket per caller."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        tokens, last = self.buckets.pop(key, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self.buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self.buckets) > 10000:
            self.buckets.popitem(last=False)
        return ok


def _peer_service(context) -> str | None:
    """The service name in the peer's verified certificate, if it is one of the six."""
    try:
        names = (context.auth_context() or {}).get("x509_common_name") or []
    except Exception:
        return None
    for raw in names:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        if name in SERVICES:
            return name
    return None


def _bearer(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise AuthError("UNAUTHENTICATED", "authorization metadata is not 'Bearer <token>'")
    return None


class Guard:
    """The per-service decision: authenticate, authorise, rate-limit; records each decision."""

    def __init__(self, config: Config):
        self.config = config
        self.service = config.service
        self.mode = transport_mode(config)
        self.verifier = (TokenVerifier(config.auth_keys_dir, config.auth_issuer, config.auth_audience)
                         if config.auth_keys_dir else None)
        if self.mode == "mtls" and self.verifier is None:
            raise ConfigError("LFR_AUTH_KEYS_DIR: required with TLS (callers' tokens are checked against it)")
        self.limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst)
        self.publish: Callable[..., None] | None = None  # set once the bus is up
        self.service_calls: dict[tuple[str, str], int] = {}  # (caller service, method) -> allowed calls
        self.summary_since_ns = time.time_ns()
        self.log = get_logger(component="auth")
        if self.mode == "insecure":
            self.log.warning("security.insecure", detail="plaintext gRPC (LFR_INSECURE)"
                             + ("" if self.verifier else "; callers are not authenticated"))

    def identify(self, context) -> Identity:
        token = _bearer(context)
        if token is not None:
            if self.verifier is None:
                raise AuthError("UNAUTHENTICATED", "this service accepts no bearer tokens (no LFR_AUTH_KEYS_DIR)")
            return self.verifier.verify(token)
        svc = _peer_service(context)
        if svc is not None:
            return Identity(svc, frozenset({"service"}), "certificate")
        if self.mode == "insecure" and self.verifier is None:
            return Identity("anonymous", frozenset(ROLES), "insecure")
        raise AuthError("UNAUTHENTICATED", "a bearer token is required")

    def decide(self, method: str, context) -> Identity:
        ident = None
        try:
            ident = self.identify(context)
            if method.startswith(AUTHENTICATED_PREFIXES):
                allowed = frozenset(ROLES)
            else:
                allowed = POLICY.get(method, frozenset())
            if not ident.roles & allowed:
                raise AuthError("PERMISSION_DENIED", f"{ident.subject!r} (roles: "
                                f"{', '.join(sorted(ident.roles)) or 'none'}) may not call {method}")
            if not ident.is_service and not self.limiter.allow(ident.subject):
                raise AuthError("RESOURCE_EXHAUSTED", f"rate limit of {self.config.rate_limit_rps:g} requests/s "
                                f"exceeded for {ident.subject!r}")
        except AuthError as exc:
            self.record(method, context, ident, exc.code, str(exc))
            raise
        self.record(method, context, ident, "OK", "")
        return ident

    def record(self, method: str, context, ident: Identity | None, code: str, reason: str) -> None:
        decision = {"OK": "ALLOWED", "UNAUTHENTICATED": "UNAUTHENTICATED",
                    "RESOURCE_EXHAUSTED": "RATE_LIMITED"}.get(code, "DENIED")
        metrics.AUTH.labels(self.service, decision).inc()
        if decision != "ALLOWED":
            self.log.info("auth.refused", method=method, decision=decision, reason=reason,
                          caller=ident.subject if ident else "")
        if decision == "ALLOWED" and ident is not None and ident.is_service:
            key = (ident.subject, method)  # summarised (see flush): never a per-frame trace
            self.service_calls[key] = self.service_calls.get(key, 0) + 1
            return
        self._publish(method=method, ident=ident, decision=decision, reason=reason, peer=context.peer() or "")

    def _publish(self, **record) -> None:
        if self.publish is None:
            return
        try:
            self.publish(**record)
        except Exception as exc:  # never lose the call over the record; the outbox retries publishes
            self.log.error("auth.record_failed", error=type(exc).__name__)

    def flush(self) -> None:
        """Record the summary of allowed service-to-service calls since the last flush (one per caller and
        method), then start a new period."""
        calls, since = self.service_calls, self.summary_since_ns
        self.service_calls, self.summary_since_ns = {}, time.time_ns()
        for (caller, method), n in sorted(calls.items()):
            self._publish(method=method, ident=Identity(caller, frozenset({"service"}), "certificate"),
                          decision="ALLOWED", reason="", peer="", count=n, since_ns=since)


def bind_actor(request, ident: Identity) -> None:
    """A person acts in their own name: an empty ``actor`` becomes the caller, another name is refused."""
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
    if "actor" not in fields or ident.is_service or ident.credential == "insecure":
        return
    stated = (request.actor or "").strip()
    if stated and stated != ident.subject:
        raise AuthError("PERMISSION_DENIED", f"actor {stated[:80]!r} is not the authenticated caller "
                        f"{ident.subject!r}")
    request.actor = ident.subject


class _Malformed:
    """Stands for a request body that did not parse as the method's message type."""

    def __repr__(self) -> str:
        return "<malformed request>"


MALFORMED = _Malformed()


def lenient(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    """The method's deserializer, returning MALFORMED instead of raising on bytes that are not its message."""
    if deserializer is None:
        return None

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception:  # DecodeError (bad wire format, invalid UTF-8, too deep), or anything a parser raises
            return MALFORMED
    return parse


async def _refuse_malformed(context, method: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request is not a valid protobuf message for {method}")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs the Guard before every handler, binds the caller, and bounds unary calls by LFR_RPC_TIMEOUT_S."""

    def __init__(self, guard: Guard):
        self.guard = guard

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        guard, timeout = self.guard, self.guard.config.rpc_timeout_s

        async def admit(request, context) -> Identity:
            """The caller first (a stranger learns nothing, not even that the body was malformed), then the body."""
            try:
                ident = guard.decide(method, context)
                if request is not None and request is not MALFORMED:
                    bind_actor(request, ident)
            except AuthError as exc:
                await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
            if request is MALFORMED:
                await _refuse_malformed(context, method)
            CALLER.set(ident)
            return ident

        async def checked(request_iterator, context):
            async for item in request_iterator:
                if item is MALFORMED:
                    await _refuse_malformed(context, method)
                yield item

        def unary(fn):
            async def inner(request, context):
                await admit(request, context)
                try:
                    return await asyncio.wait_for(fn(request, context), timeout)
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"{method} ran longer than {timeout:g} s (LFR_RPC_TIMEOUT_S)")
            return inner

        def client_stream(fn):
            async def inner(request_iterator, context):
                await admit(None, context)
                return await fn(checked(request_iterator, context), context)
            return inner

        def server_stream(fn):
            async def inner(request, context):
                await admit(request, context)
                async for item in fn(request, context):
                    yield item
            return inner

        ser, de = handler.response_serializer, lenient(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), de, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(client_stream(handler.stream_unary), de, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(server_stream(handler.unary_stream), de, ser)
        if handler.stream_stream:  # reflection: authenticated callers only
            inner_fn = handler.stream_stream

            async def bidi(request_iterator, context):
                await admit(None, context)
                async for item in inner_fn(checked(request_iterator, context), context):
                    yield item
            return grpc.stream_stream_rpc_method_handler(bidi, de, ser)
        return handler
