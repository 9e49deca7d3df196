"""Small helpers shared by gRPC adapters and clients."""

from __future__ import annotations

import grpc

from lfr.runtime.config import Config


def channel(target: str, config: Config | None = None) -> grpc.aio.Channel:
    limit = config.max_message_bytes if config else 8 * 1024 * 1024
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ])


async def abort(context: grpc.aio.ServicerContext, code: str, message: str):
    """Abort an RPC with a status named by string (the cores speak in names, not grpc objects)."""
    await context.abort(getattr(grpc.StatusCode, code), message)


def require(value, what: str) -> None:
    """Raise ValueError naming a missing required field (adapters turn it into INVALID_ARGUMENT)."""
    if not value:
        raise ValueError(f"{what} is required")
