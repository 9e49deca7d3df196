"""structlog JSON logging to stdout, with a processor that strips biometric data and secrets.

Logging is not audit: audit events are protobuf messages on their stream.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

from lfr.runtime import metrics

LOG_DROPS = metrics.Counter("lfr_log_writes_dropped_total", "log lines (or their flushes) that could not be "
                            "written to the service's output: its file on a full or read-only disk, a closed pipe",
                            registry=metrics.REGISTRY)

# Keys whose values are biometric or personal and must never reach a log line.
_REDACT = {"image", "images", "frame", "chip", "chips", "crop", "crop_jpeg", "probe_jpeg", "vector",
           "vectors", "embedding", "embeddings", "values", "rgb", "name", "names", "token", "password",
           "authorization", "secret", "api_key", "private_key", "credentials"}
# A JWT anywhere in a string (e.g. an exception message quoting a header): three base64url parts, "eyJ..." first.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def strip_biometrics(_logger, _method, event_dict: dict) -> dict:
    for key in list(event_dict):
        value = event_dict[key]
        if key in _REDACT:
            event_dict[key] = "[stripped]"
        elif isinstance(value, (bytes, bytearray, memoryview)):
            event_dict[key] = f"[{len(value)} bytes stripped]"
        elif hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / torch arrays
            event_dict[key] = "[array stripped]"
        elif isinstance(value, (list, tuple)) and len(value) > 16:
            event_dict[key] = f"[{len(value)} items stripped]"
        elif isinstance(value, str) and "eyJ" in value:
            event_dict[key] = _JWT.sub("[token stripped]", value)
    return event_dict


class Unfailing:
    """An output that never raises: a log line that cannot be written (its file on a full or read-only disk, a
    closed pipe) is dropped and counted (lfr_log_writes_dropped_total), and the service goes on."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):
            LOG_DROPS.inc()
            return 0

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            LOG_DROPS.inc()


def setup_logging(service: str, level: str = "info") -> structlog.stdlib.BoundLogger:
    out = sys.stdout if isinstance(sys.stdout, Unfailing) else Unfailing(sys.stdout)
    logging.basicConfig(format="%(message)s", stream=out, level=level.upper(), force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            strip_biometrics,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger()


def get_logger(**context) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger().bind(**context)
