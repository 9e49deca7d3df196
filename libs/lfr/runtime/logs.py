"""structlog JSON logging to stdout, with a processor that strips biometric data and secrets.

Logging is not audit: audit events are protobuf messages on their stream.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

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


def setup_logging(service: str, level: str = "info") -> structlog.stdlib.BoundLogger:
    logging.basicConfig(format="%(message)s", stream=sys.stdout, level=level.upper(), force=True)
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
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger()


def get_logger(**context) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger().bind(**context)
