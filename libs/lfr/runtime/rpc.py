"""Small helpers shared by gRPC adapters and clients."""

from __future__ import annotations

import grpc

from lfr.runtime.config import Config


def channel(target: str, config: Config | None = None, options: tuple = ()) -> grpc.aio.Channel:
    """A service's channel to another service: mutual TLS with its own certificate (it calls as `service`).
    `options`: more gRPC channel arguments."""
    limit = config.max_message_bytes if config else 8 * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit), *options]
    if config is not None and config.tls_dir:
        from lfr.runtime.security import channel_credentials

        return grpc.aio.secure_channel(target, channel_credentials(config.tls_dir, config.service), options=options)
    return grpc.aio.insecure_channel(target, options=options)


# A status message travels in a trailer, percent-encoded; a client refuses trailers over 8 KiB (at random between
# its soft and hard limits), which would turn a refusal that echoes a caller's huge id into RESOURCE_EXHAUSTED.
MAX_DETAILS_BYTES = 1024


def bounded(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """The message, cut to at most `limit` bytes of UTF-8 (plus a marker) if longer."""
    raw = message.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return message
    return raw[:limit].decode("utf-8", "ignore") + " ... (truncated)"


async def abort(context: grpc.aio.ServicerContext, code: str, message: str):
    """Abort an RPC with a status named by string, from an adapter (a core raises lfr.errors instead, which the
    shared ErrorInterceptor maps)."""
    await context.abort(getattr(grpc.StatusCode, code), bounded(message))
