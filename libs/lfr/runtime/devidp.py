"""Development identity provider: mints short-lived ES256 JWTs for named users with fixed roles.

Layout of its folder:
  signing/<kid>.key   EC P-256 private keys (0600); only the IdP reads them
  keys/<kid>.pem      the matching public keys: what services verify against (LFR_AUTH_KEYS_DIR)
  current             the kid new tokens are signed with
  users.json          {"issuer": ..., "audience": ..., "users": {name: [role, ...]}}

An embedded system keeps its development security material under <state>/security: tls/ (the development
PKI, see lfr.runtime.pki) and idp/ (this). For development and tests only; production uses a real IdP.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lfr.runtime.pki import create_dev_pki, key_pem, write_private

SECURITY_SUBDIR = "security"
TLS_SUBDIR = "tls"
IDP_SUBDIR = "idp"
ALGORITHM = "ES256"
DEFAULT_USERS: dict[str, list[str]] = {
    "builder": ["watchlist_manager"],
    "inspector": ["authorising_officer"],
    "superintendent": ["authorising_officer"],  # the second officer where a policy asks for two
    # both roles: may build a list and authorise another's, never one it built (separation of duties)
    "sergeant": ["watchlist_manager", "authorising_officer"],
    "operator": ["operator", "engagement_officer"],
    "investigator": ["investigator"],
    "auditor": ["auditor"],
    "public": ["public"],
}


class UnknownUserError(KeyError):
    """mint() was asked for a user that users.json does not list."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class DevIdP:
    """A development identity provider kept in one folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    @property
    def keys_dir(self) -> Path:
        """Public verification keys, <kid>.pem: the services' LFR_AUTH_KEYS_DIR."""
        return self.folder / "keys"

    @property
    def signing_dir(self) -> Path:
        return self.folder / "signing"

    def ensure(self, issuer: str = "lfr-dev-idp", audience: str = "lfr") -> DevIdP:
        """Create the folder, a signing key and users.json where missing; existing ones are kept as they are."""
        for d in (self.folder, self.signing_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self.keys_dir.mkdir(exist_ok=True)
        users = self.folder / "users.json"
        if not users.exists():
            doc = {"issuer": issuer, "audience": audience, "users": DEFAULT_USERS}
            write_private(users, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)
        kid = self.current_kid()
        if not kid or not (self.signing_dir / f"{kid}.key").is_file():
            self.rotate()
        return self

    def current_kid(self) -> str:
        """The kid new tokens are signed with ('' before ensure())."""
        try:
            return (self.folder / "current").read_text().strip()
        except FileNotFoundError:
            return ""

    def rotate(self) -> str:
        """Make a new key pair current and return its kid. Old public keys stay in keys_dir, so tokens
        already issued verify until they expire; delete keys/<kid>.pem to revoke a key."""
        kid = time.strftime("%Y%m%d") + "-" + secrets.token_hex(4)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        write_private(self.signing_dir / f"{kid}.key", key_pem(key))
        write_private(self.keys_dir / f"{kid}.pem", public, 0o644)
        write_private(self.folder / "current", (kid + "\n").encode(), 0o644)
        return kid

    def _config(self) -> dict:
        return json.loads((self.folder / "users.json").read_text())

    def users(self) -> dict[str, list[str]]:
        """User name -> roles, from users.json."""
        return {name: list(roles) for name, roles in self._config()["users"].items()}

    def add_user(self, user: str, roles: Iterable[str]) -> None:
        """Add (or change) a development user in users.json."""
        config = self._config()
        config["users"][user] = sorted(set(roles))
        tmp = self.folder / "users.json.tmp"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.folder / "users.json")

    def mint(self, user: str, ttl_s: int = 900, roles: Iterable[str] | None = None) -> str:
        """A signed token for user, valid ttl_s seconds, with the roles users.json gives the user. Explicit
        roles (for tests) replace that lookup, and then user need not be listed."""
        config = self._config()
        if roles is None:
            known = config["users"]
            if user not in known:
                raise UnknownUserError(f"unknown user {user!r}; known users: {', '.join(sorted(known))}")
            roles = known[user]
        kid = self.current_kid()
        if not kid:
            raise FileNotFoundError(f"{self.folder}: no current signing key (call ensure() first)")
        key = serialization.load_pem_private_key((self.signing_dir / f"{kid}.key").read_bytes(), password=None)
        now = int(time.time())
        claims = {"iss": config["issuer"], "aud": config["audience"], "sub": user, "roles": list(roles),
                  "iat": now, "nbf": now, "exp": now + int(ttl_s), "jti": secrets.token_hex(16)}
        return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid})


def find_dev_idp(state_dir: str | os.PathLike) -> DevIdP | None:
    """The development IdP of the embedded system using state_dir, or None if it has none."""
    folder = Path(state_dir) / SECURITY_SUBDIR / IDP_SUBDIR
    return DevIdP(folder) if folder.is_dir() else None


def setup_security_dir(folder: str | os.PathLike, services: Iterable[str],
                       hosts: Iterable[str] = ("localhost", "127.0.0.1"), days: int = 30) -> dict[str, str]:
    """In folder: tls/ (CA + a certificate per service, plus 'nats' and 'client', a generic client
    certificate for the CLI and tests) and idp/ (ensured). Idempotent. Returns the paths as strings."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    names = list(dict.fromkeys([*services, "nats", "client"]))
    tls = create_dev_pki(folder / TLS_SUBDIR, names, hosts=hosts, days=days)
    idp = DevIdP(folder / IDP_SUBDIR).ensure()
    return {"tls_dir": str(tls), "auth_keys_dir": str(idp.keys_dir), "idp_dir": str(idp.folder)}


def create_dev_security(state_dir: str | os.PathLike, services: Iterable[str],
                        hosts: Iterable[str] = ("localhost", "127.0.0.1"), days: int = 30) -> dict[str, str]:
    """setup_security_dir(<state_dir>/security, ...): the embedded system's layout."""
    return setup_security_dir(Path(state_dir) / SECURITY_SUBDIR, services, hosts=hosts, days=days)
