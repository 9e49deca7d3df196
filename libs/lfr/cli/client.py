"""gRPC clients for a running system (found through its state folder's endpoints.json)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lfr.pb import (
    audit_pb2_grpc,
    detection_pb2_grpc,
    embedding_pb2_grpc,
    identification_pb2_grpc,
    ingest_pb2_grpc,
    match_pb2_grpc,
    watchlist_pb2_grpc,
)
from lfr.runtime.access import Access, AccessError
from lfr.runtime.paths import state_dir


def _image_suffixes() -> frozenset[str]:
    """File name endings of the formats the services decode (lfr.models.images.ACCEPTED_FORMATS: JPEG, PNG,
    WebP, BMP, GIF, TIFF), as Pillow registers them."""
    from PIL import Image

    from lfr.models.images import ACCEPTED_FORMATS

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in ACCEPTED_FORMATS)


IMAGE_SUFFIXES = _image_suffixes()
IMAGE_FORMATS_TEXT = "JPEG, PNG, WebP, BMP, GIF or TIFF"


@dataclass
class Clients:
    ingest: ingest_pb2_grpc.IngestServiceStub
    detection: detection_pb2_grpc.DetectionServiceStub
    embedding: embedding_pb2_grpc.EmbeddingServiceStub
    watchlist: watchlist_pb2_grpc.WatchlistServiceStub
    match: match_pb2_grpc.MatchServiceStub
    audit: audit_pb2_grpc.AuditServiceStub
    identification: identification_pb2_grpc.IdentificationServiceStub
    channels: list

    @classmethod
    def connect(cls, endpoints: dict, aio: bool = False, access: Access | None = None) -> Clients:
        """Stubs for the seven services; ``access`` gives the TLS certificate and tokens (plaintext if None)."""
        access = access or Access.insecure()
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        chans = {s: access.channel(endpoints[s], aio=aio, options=opts) for s in
                 ("ingest", "detection", "embedding", "watchlist", "match", "audit", "identification")}
        return cls(
            ingest=ingest_pb2_grpc.IngestServiceStub(chans["ingest"]),
            detection=detection_pb2_grpc.DetectionServiceStub(chans["detection"]),
            embedding=embedding_pb2_grpc.EmbeddingServiceStub(chans["embedding"]),
            watchlist=watchlist_pb2_grpc.WatchlistServiceStub(chans["watchlist"]),
            match=match_pb2_grpc.MatchServiceStub(chans["match"]),
            audit=audit_pb2_grpc.AuditServiceStub(chans["audit"]),
            identification=identification_pb2_grpc.IdentificationServiceStub(chans["identification"]),
            channels=list(chans.values()),
        )

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


def subject_images(folder: str | Path) -> dict[str, list[Path]]:
    """A watchlist folder: `<subject>/<image>` files, or loose images named after their subject."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"watchlist folder not found: {folder}")
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            imgs = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if imgs:
                out[p.name] = imgs
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            out.setdefault(p.stem, []).append(p)
    return out


def state_dir_of(args) -> Path:
    return state_dir(getattr(args, "state_dir", ""))


def cli_access(args) -> Access:
    """The CLI's credentials. With a production token (LFR_TOKEN / LFR_TOKEN_FILE, plus LFR_TLS_DIR) the token
    names the caller and ``--as`` is refused; against an embedded system, ``--as NAME`` (or $LFR_ACTOR) obtains
    a short-lived token for a user of its development identity provider. Raises AccessError saying what to do."""
    actor = getattr(args, "actor", None)
    if os.environ.get("LFR_TOKEN") or os.environ.get("LFR_TOKEN_FILE"):
        if actor:
            raise AccessError("--as is refused with an identity provider's token: the token names the caller")
        return Access.from_env()
    state = state_dir_of(args)
    if (state / "security").is_dir():
        actor = actor or os.environ.get("LFR_ACTOR") or None
        if actor is None:
            from lfr.runtime.devidp import find_dev_idp

            idp = find_dev_idp(state)
            names = ", ".join(sorted(idp.users())) if idp else "?"
            raise AccessError(f"say who is acting: --as NAME (development users: {names})")
        args.actor = actor
        return Access.dev(state, user=actor)
    return Access.from_env()
