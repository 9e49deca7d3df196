"""The client side of security: how the CLI, tests and other systems reach the services.

Every channel is mutual TLS with a client certificate (``<tls_dir>/<cert>.pem``), and every call carries a
bearer token. Where the token comes from:

- production: ``LFR_TOKEN`` or ``LFR_TOKEN_FILE`` (issued by the force's identity provider); ``--as`` is refused;
- the embedded default: its development identity provider (``<state>/security/idp``) mints a short-lived token
  for a user of its users file (``--as builder``); with ``follow_actor`` a call made for a request whose ``actor``
  names someone is made with that person's token (the CLI and tests act as the person the request names).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from lfr.runtime import security

TOKEN_TTL_S = 900


class AccessError(RuntimeError):
    """No way to authenticate as asked (the message says what to set)."""


class Access:
    def __init__(self, tls_dir: str | Path | None, cert: str = "client",
                 token_for: Callable[[str | None], str | None] | None = None, follow_actor: bool = False):
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.cert = cert
        self.token_for = token_for
        self.follow_actor = follow_actor

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def insecure(cls) -> Access:
        return cls(None)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Access:
        """Production callers: LFR_TLS_DIR (ca.pem + LFR_CLIENT_CERT, default 'client') and LFR_TOKEN[_FILE]."""
        env = dict(os.environ if env is None else env)
        token = env.get("LFR_TOKEN", "")
        if not token and env.get("LFR_TOKEN_FILE"):
            try:
                token = Path(env["LFR_TOKEN_FILE"]).read_text().strip()
            except OSError:
                raise AccessError("LFR_TOKEN_FILE: cannot read the file") from None
        if env.get("LFR_INSECURE", "").lower() in ("1", "true", "yes", "on"):
            return cls(None, token_for=(lambda _s: token) if token else None)
        if not env.get("LFR_TLS_DIR"):
            raise AccessError("no credentials: set LFR_TLS_DIR and LFR_TOKEN (or LFR_TOKEN_FILE), or name a "
                              "running embedded system's --state-dir")
        if not token:
            raise AccessError("LFR_TOKEN or LFR_TOKEN_FILE: a bearer token from the identity provider is required")
        return cls(env["LFR_TLS_DIR"], env.get("LFR_CLIENT_CERT", "client"), token_for=lambda _s: token)

    @classmethod
    def dev(cls, state_dir: str | Path, user: str | None = None, follow_actor: bool = False,
            roles: Iterable[str] | None = None) -> Access:
        """An embedded system's development identity: tokens minted by its dev IdP for ``user`` (a name in
        its users file). ``roles`` (tests only) grants those roles to any subject instead of the users file."""
        from lfr.runtime.devidp import find_dev_idp

        state_dir = Path(state_dir)
        idp = find_dev_idp(state_dir)
        tls_dir = state_dir / "security" / "tls"
        if idp is None or not tls_dir.is_dir():
            raise AccessError(f"--as works only with an embedded system's development identity provider; none "
                              f"under {state_dir / 'security'} (use LFR_TOKEN in production)")
        fixed_roles = sorted(roles) if roles is not None else None
        known = idp.users()
        if user is not None and fixed_roles is None and user not in known:
            raise AccessError(f"unknown user {user!r}; the development users are: {', '.join(sorted(known))}")
        cache: dict[str, tuple[str, float]] = {}
        lock = threading.Lock()

        def token_for(subject: str | None) -> str | None:
            subject = subject or user
            if subject is None:
                return None  # calls go without a token (health checks); the services refuse the rest
            if fixed_roles is None and subject not in known:
                raise AccessError(f"{subject!r} is not a development user ({', '.join(sorted(known))})")
            with lock:
                hit = cache.get(subject)
                if hit and hit[1] > time.time() + 60:
                    return hit[0]
                tok = idp.mint(subject, ttl_s=TOKEN_TTL_S, roles=fixed_roles)
                cache[subject] = (tok, time.time() + TOKEN_TTL_S)
                return tok

        return cls(tls_dir, "client", token_for, follow_actor=follow_actor)

    # -- channels -------------------------------------------------------------------------------------------------
    def channel(self, target: str, aio: bool = False, options: list | None = None):
        opts = list(options or [])
        if self.tls_dir is None:
            ch = (grpc.aio.insecure_channel(target, options=opts, interceptors=self._aio_interceptors()) if aio
                  else grpc.insecure_channel(target, options=opts))
        else:
            creds = security.channel_credentials(self.tls_dir, self.cert)
            ch = (grpc.aio.secure_channel(target, creds, options=opts, interceptors=self._aio_interceptors())
                  if aio else grpc.secure_channel(target, creds, options=opts))
        if not aio and self.token_for is not None:
            ch = grpc.intercept_channel(ch, _SyncTokens(self))
        return ch

    def _aio_interceptors(self):
        if self.token_for is None:
            return None
        return [_AioUnaryUnary(self), _AioUnaryStream(self), _AioStreamUnary(self)]

    def metadata(self, request=None) -> tuple[tuple[str, str], ...]:
        if self.token_for is None:
            return ()
        subject = None
        if self.follow_actor and request is not None:
            fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
            if "actor" in fields and request.actor.strip():
                subject = request.actor.strip()
        token = self.token_for(subject)
        return (("authorization", f"Bearer {token}"),) if token else ()


def _with_auth(details, extra):
    return details._replace(metadata=tuple(details.metadata or ()) + tuple(extra))


class _SyncTokens(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, access: Access):
        self.access = access

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_auth(details, self.access.metadata(request)), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_auth(details, self.access.metadata(request)), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_auth(details, self.access.metadata()), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_auth(details, self.access.metadata()), request_iterator)


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, access: Access):
        self.access = access

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_auth(details, self.access.metadata(request)), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, access: Access):
        self.access = access

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_auth(details, self.access.metadata(request)), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, access: Access):
        self.access = access

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_auth(details, self.access.metadata()), request_iterator)
