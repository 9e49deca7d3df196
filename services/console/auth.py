"""Who is using the console, and the protections of its forms.

Two ways to know the person (LFR_CONSOLE_AUTH):

- ``proxy`` (production): the force's single sign-on sits in front of the console (for example an OIDC proxy)
  and forwards each request's access token as ``Authorization: Bearer <JWT>``. The console checks it with the
  same keys, issuer and audience as the services (so it can show the right pages), and passes the very same
  token on every gRPC call: the services decide and audit as that officer.
- ``dev``: a login page lists the users of the embedded system's development identity provider
  (``<state>/security/idp``) and mints a short-lived token for the one chosen.

A session lives in this process's memory only (a random id in an HttpOnly, SameSite=Strict cookie, Secure
except on loopback); it holds the person's name, roles, token (dev), a CSRF token that every form must echo,
one-shot messages, and for a minute the images of the alert being reviewed. Nothing is written to disk.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from lfr.runtime.config import Config, ConfigError
from lfr.runtime.security import POLICY, ROLES, AuthError, TokenVerifier

IDLE_S = 30 * 60
TOKEN_TTL_S = 900
IMAGE_TTL_S = 120
MAX_IMAGES = 64
MAX_SESSIONS = 5000
PENDING_TTL_S = 300


@dataclass
class Session:
    sid: str
    csrf: str
    user: str = ""
    roles: frozenset[str] = frozenset()
    token: str = ""
    token_exp: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)
    flash: list[dict] = field(default_factory=list)
    images: OrderedDict = field(default_factory=OrderedDict)  # key -> (bytes, expiry): memory only
    pending: dict = field(default_factory=dict)  # an enrollment waiting for its face choice: key -> (dict, expiry)

    def keep_pending(self, key: str, value: dict) -> None:
        now = time.monotonic()
        self.pending = {k: v for k, v in self.pending.items() if v[1] > now}
        self.pending[key] = (value, now + PENDING_TTL_S)

    def take_pending(self, key: str) -> dict | None:
        hit = self.pending.pop(key, None)
        return hit[0] if hit and hit[1] > time.monotonic() else None

    def keep_image(self, key: str, data: bytes) -> None:
        self.images.pop(key, None)
        self.images[key] = (data, time.monotonic() + IMAGE_TTL_S)
        while len(self.images) > MAX_IMAGES:
            self.images.popitem(last=False)

    def image(self, key: str, once: bool = False) -> bytes | None:
        """A kept image; ``once``: handed out a single time (an alert's images: each view asks the service)."""
        hit = self.images.pop(key, None) if once else self.images.get(key)
        if hit is None or hit[1] < time.monotonic():
            self.images.pop(key, None)
            return None
        return hit[0]

    def say(self, kind: str, text: str, **extra) -> None:
        self.flash.append({"kind": kind, "text": text, **extra})

    def take_flash(self) -> list[dict]:
        out, self.flash = self.flash, []
        return out


class Sessions:
    def __init__(self, idle_s: float = IDLE_S):
        self.idle_s = idle_s
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, sid: str | None) -> Session | None:
        now = time.monotonic()
        with self._lock:
            for key in [k for k, s in self._by_id.items() if now - s.last_seen > self.idle_s]:
                del self._by_id[key]
            s = self._by_id.get(sid or "")
            if s is not None:
                s.last_seen = now
            return s

    def new(self) -> Session:
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        with self._lock:
            while len(self._by_id) >= MAX_SESSIONS:  # bounded: the least recently used goes first
                del self._by_id[min(self._by_id, key=lambda k: self._by_id[k].last_seen)]
            self._by_id[s.sid] = s
        return s

    def drop(self, sid: str) -> None:
        with self._lock:
            self._by_id.pop(sid, None)


def csrf_ok(session: Session | None, sent: str | None) -> bool:
    return bool(session and sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())


def may(roles, service: str, method: str) -> bool:
    """Whether these roles may call the method: the services' own role table (lfr.runtime.security.POLICY)."""
    full = f"/lfr.{service}.v1.{service.capitalize()}Service/{method}"
    return bool(set(roles) & POLICY.get(full, frozenset()))


def roles_for(service: str, method: str) -> list[str]:
    full = f"/lfr.{service}.v1.{service.capitalize()}Service/{method}"
    return sorted(r for r in POLICY.get(full, frozenset()) if r != "service")


class DevLogin:
    """The development identity provider of an embedded system (LFR_CONSOLE_AUTH=dev)."""

    def __init__(self, state_dir: str):
        from lfr.runtime.devidp import find_dev_idp

        self.idp = find_dev_idp(state_dir) if state_dir else None
        if self.idp is None:
            raise ConfigError("LFR_CONSOLE_AUTH=dev needs LFR_STATE_DIR of an embedded system with a development "
                              "identity provider (<state>/security/idp)")

    def users(self) -> dict[str, list[str]]:
        return self.idp.users()

    def login(self, session: Session, user: str) -> None:
        users = self.users()
        if user not in users:
            raise AuthError("UNAUTHENTICATED", f"{user!r} is not a development user")
        session.user, session.roles = user, frozenset(r for r in users[user] if r in ROLES)
        self.refresh(session)

    def refresh(self, session: Session) -> str:
        if not session.token or session.token_exp < time.time() + 60:
            session.token = self.idp.mint(session.user, ttl_s=TOKEN_TTL_S)
            session.token_exp = time.time() + TOKEN_TTL_S
        return session.token


class ProxyTokens:
    """Tokens forwarded by the force's single sign-on (LFR_CONSOLE_AUTH=proxy), checked like the services do."""

    HEADERS = ("authorization", "x-forwarded-access-token")

    def __init__(self, cfg: Config):
        if not cfg.auth_keys_dir or not Path(cfg.auth_keys_dir).is_dir():
            raise ConfigError("LFR_AUTH_KEYS_DIR: required with LFR_CONSOLE_AUTH=proxy (the identity provider's "
                              "public keys, <kid>.pem)")
        self.verifier = TokenVerifier(cfg.auth_keys_dir, cfg.auth_issuer, cfg.auth_audience)

    def token_of(self, headers) -> str | None:
        for name in self.HEADERS:
            value = headers.get(name)
            if not value:
                continue
            scheme, _, rest = value.partition(" ")
            if name == "authorization":
                if scheme.lower() != "bearer" or not rest.strip():
                    raise AuthError("UNAUTHENTICATED", "the Authorization header is not 'Bearer <token>'")
                return rest.strip()
            return value.strip()
        return None

    def identify(self, headers):
        token = self.token_of(headers)
        if token is None:
            raise AuthError("UNAUTHENTICATED", "no bearer token: the console is reached through the force's "
                            "single sign-on, which forwards the officer's access token")
        return token, self.verifier.verify(token)
