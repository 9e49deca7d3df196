"""Who may do what on NATS: one user per service, with subject permissions derived from `subjects`.

A service may publish only its own outputs and subscribe only to its inputs; its JetStream rights are limited
to the streams it writes, reads or declares; replies reach it on its own inbox prefix (`_INBOX_<user>`, set by
`Bus.connect`), which no other user may subscribe to. Everything not allowed is refused by the server
(`Permissions Violation`), so a compromised detection cannot read alerts, forge an audit record or purge a
stream.

Streams are declared (created, updated) by the audit service only: it is the record keeper of all three. The
publishers' outboxes retry until the streams exist.

`ADMIN` is the operator's and tests' user: it reads the durable facts (stream info, consumers, direct gets,
the durable subjects) but never the biometric flow, publishes nothing on `lfr.v1.>` and cannot create, update
or delete a stream. It may send purge and message-delete requests, which the streams refuse themselves
(`deny_purge`, `deny_delete`), so that a check can show that refusal; deploy/k8s denies them (`PROTECTED`) to
every user explicitly as well.

The embedded default (`EmbeddedSystem`) writes random passwords with `write_credentials` and starts nats-server
with `server_auth_config`; deploy/k8s/base/nats/permissions.conf is `k8s_authorization()`, with the passwords
taken from a Secret through the server's environment.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lfr.runtime import subjects
from lfr.runtime.subjects import Stream

API = "$JS.API"
ADMIN = "admin"
_PASSWORD_OK = re.compile(r"^[A-Za-z0-9_.~+/=-]{16,256}$")
_VARIABLE = re.compile(r"^\$[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    declares: tuple[str, ...] = ()  # names of the streams it creates / updates at start


def inbox_prefix(user: str) -> str:
    """The reply inbox prefix of a user's connection (only that user may subscribe under it)."""
    return f"_INBOX_{user}"


def _declares(*streams: Stream) -> list[str]:
    return [f"{API}.STREAM.{op}.{s.name}" for s in streams for op in ("CREATE", "UPDATE", "INFO")]


def _reads(stream: Stream, durable: bool) -> list[str]:
    """Create pull consumers on `stream` and fetch from them: ephemeral ones (no acks), or durable ones too
    (looked up by name first, and acknowledged)."""
    n = stream.name
    out = [f"{API}.STREAM.INFO.{n}", f"{API}.CONSUMER.CREATE.{n}.>", f"{API}.CONSUMER.MSG.NEXT.{n}.*"]
    if durable:
        out += [f"{API}.CONSUMER.INFO.{n}.*", f"{API}.CONSUMER.DURABLE.CREATE.{n}.*", f"$JS.ACK.{n}.>"]
    return out


def _service(user: str, publish: Iterable[str], subscribe: Iterable[str] = (),
             declares: Sequence[Stream] = ()) -> Permissions:
    # every service records who called its API (lfr.v1.access.<service>), as itself only
    pub = [*publish, subjects.access(user)]
    return Permissions(publish=tuple(dict.fromkeys(pub)),
                       subscribe=(*subscribe, f"{inbox_prefix(user)}.>"),
                       declares=tuple(s.name for s in declares))


_FACTS = (subjects.ALERTS, subjects.EVENTS, subjects.AUDIT)

PERMISSIONS: dict[str, Permissions] = {
    "ingest": _service("ingest", [subjects.frames()], [subjects.lifecycle()]),
    "detection": _service("detection", [subjects.faces()], [subjects.frames(), subjects.evidence()]),
    # the server checks a publish after its subject mapping: embedding's vectors arrive partitioned
    "embedding": _service("embedding", [subjects.embeddings(), subjects.embeddings_partition()], [subjects.faces()]),
    # durable facts need only their subject: JetStream's ack comes back on the inbox
    "watchlist": _service("watchlist", [subjects.lifecycle(), subjects.watchlist()]),
    # its searches, jobs and gallery changes are audited as watchlist events (lfr.v1.watchlist.identification, or
    # .<deployment> for a search of a deployment's watchlist)
    "identification": _service("identification", [subjects.watchlist()]),
    "match": _service("match", [
        subjects.alerts(), subjects.matchstats(), subjects.adjudications(), subjects.alertflags(),
        subjects.retention(), subjects.evidence(),
        *_reads(subjects.ALERTS, durable=False),  # ReplayAlerts: ephemeral consumers
    ], [subjects.embeddings_partition(), subjects.lifecycle()]),  # its partitions of the embeddings
    "audit": _service("audit", [
        subjects.audit(),
        *_declares(*_FACTS),
        *_reads(subjects.ALERTS, durable=True), *_reads(subjects.EVENTS, durable=True),  # its durable consumers
        *_reads(subjects.AUDIT, durable=False),  # reading its own chain back
    ], declares=_FACTS),
    ADMIN: Permissions(
        publish=(f"{API}.INFO", f"{API}.STREAM.NAMES", f"{API}.STREAM.LIST", f"{API}.STREAM.INFO.*",
                 f"{API}.STREAM.MSG.GET.*", f"{API}.DIRECT.GET.>", f"{API}.CONSUMER.>", "$JS.ACK.>",
                 f"{API}.STREAM.PURGE.*", f"{API}.STREAM.MSG.DELETE.*"),
        subscribe=(*(s for stream in _FACTS for s in stream.subjects), f"{inbox_prefix(ADMIN)}.>"),
    ),
}
SERVICES = tuple(u for u in PERMISSIONS if u != ADMIN)
# Requests that would remove durable facts; no user is allowed them, and a server may deny them explicitly too.
PROTECTED = tuple(f"{API}.STREAM.{op}.{s.name}" for s in _FACTS for op in ("DELETE", "PURGE", "MSG.DELETE"))


def declarable(user: str, streams: Iterable[Stream]) -> list[Stream]:
    """The streams of `streams` that `user` declares; all of them for a user outside the table (no auth)."""
    perms = PERMISSIONS.get(user)
    return [s for s in streams if perms is None or s.name in perms.declares]


def _list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


def _password(value: str) -> str:
    if _VARIABLE.match(value):
        return value  # a variable the server substitutes from its environment (e.g. from a Secret)
    if not _PASSWORD_OK.match(value):
        raise ValueError("a NATS password must be 16-256 URL-safe characters (or a $VARIABLE)")
    return f'"{value}"'


def server_auth_config(passwords: dict[str, str], deny: Iterable[str] = ()) -> str:
    """The nats-server `authorization { users = [...] }` block for these users (names from PERMISSIONS).

    A password written as `$NAME` is left for the server to take from its environment. `deny`: publish subjects
    denied to every user (deny wins over allow), defined once as the variable DENIED_TO_ALL."""
    deny = list(deny)
    lines = [f"DENIED_TO_ALL = {_list(deny)}", ""] if deny else []
    lines += ["authorization {", "  users = ["]
    for user, password in passwords.items():
        perms = PERMISSIONS[user]
        lines += ["    {", f'      user: "{user}"', f"      password: {_password(password)}", "      permissions: {",
                  "        publish: {", f"          allow: {_list(perms.publish)}"]
        lines += ["          deny: $DENIED_TO_ALL"] if deny else []
        lines += ["        }", f"        subscribe: {{ allow: {_list(perms.subscribe)} }}", "      }", "    }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def password_variable(user: str) -> str:
    """The environment variable holding a user's password on a server that takes it from a Secret (k8s)."""
    return f"$NATS_PASSWORD_{user.upper()}"


def k8s_authorization() -> str:
    """The users block of deploy/k8s/base/nats/permissions.conf: every user, passwords from the environment,
    and the removal of durable facts denied to all explicitly."""
    return server_auth_config({u: password_variable(u) for u in PERMISSIONS}, deny=PROTECTED)


def password_file(folder: str | os.PathLike, user: str) -> Path:
    return Path(folder) / f"{user}.password"


def write_credentials(folder: str | os.PathLike, users: Iterable[str]) -> dict[str, Path]:
    """A random password per user in `<folder>/<user>.password` (mode 0600, folder 0700); existing ones are
    kept, so a restart with the same folder keeps its credentials. Returns {user: password file}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    out: dict[str, Path] = {}
    for user in users:
        if user not in PERMISSIONS:
            raise ValueError(f"unknown NATS user {user!r}")
        path = password_file(folder, user)
        if not (path.is_file() and _PASSWORD_OK.match(path.read_text().strip())):
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
            os.replace(tmp, path)
        os.chmod(path, 0o600)
        out[user] = path
    return out


def read_passwords(files: dict[str, Path]) -> dict[str, str]:
    return {user: path.read_text().strip() for user, path in files.items()}


if __name__ == "__main__":  # python -m lfr.runtime.natsauth: the k8s users block, to paste into permissions.conf
    print(k8s_authorization(), end="")
