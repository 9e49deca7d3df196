"""Hostile-input checks shared by the services: sizes before decoding, per-request counts, file inputs confined
to the media roots, network sources restricted to rtsp(s) on allowed hosts.

Every refusal is an :class:`InputError` (a domain error of lfr.errors) whose ``code`` names the gRPC status the
edge answers with:

- :class:`InputInvalid` -> INVALID_ARGUMENT: malformed (not a decodable image, a relative path, a bad URL)
- :class:`InputTooLarge` -> RESOURCE_EXHAUSTED: over a limit (encoded bytes, declared pixels, items per request)
- :class:`InputNotAllowed` -> PERMISSION_DENIED: a path outside LFR_MEDIA_ROOTS, a scheme or host not allowed
- :class:`InputNotFound` -> NOT_FOUND: a path inside the media roots that does not exist

Messages name the limit and the configuration key, never the data (no image bytes, no URL credentials).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from lfr.errors import Invalid, NotFound, PermissionDenied, Refused, ResourceExhausted
from lfr.models.images import ImageError, decode_image, image_header
from lfr.runtime.config import Config

# Per-request caps (a request holding more is refused whole with RESOURCE_EXHAUSTED).
MAX_IMAGES_PER_REQUEST = 256  # enrolment, reference and gallery images
MAX_CHIPS_PER_REQUEST = 256  # Embed
MAX_PROBES_PER_REQUEST = 256  # Search
MAX_REFS_PER_REQUEST = 256  # AddFromReference subject refs
MAX_DIGESTS_PER_REQUEST = 10_000  # FindGalleryImages
MAX_MEDIA_PER_JOB = 256  # paths and URLs named by one retrospective job
MAX_ITEMS_PER_JOB = 100_000  # files a job's folders may expand to
MAX_QUEUED_JOBS = 64  # retrospective jobs waiting to run
MAX_SOURCES = 32  # pulled sources running at once in one ingest service

NETWORK_SCHEMES = ("rtsp", "rtsps")
# Statuses of detection's Detect that refuse the image itself (callers report them per image, not as a failure).
IMAGE_REFUSALS = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")


class InputError(Refused, ValueError):
    """Refused caller input (a domain error, lfr.errors); ``code`` is the gRPC status name the edge answers with."""

    code = "INVALID_ARGUMENT"


class InputInvalid(InputError, Invalid):
    code = "INVALID_ARGUMENT"


class InputTooLarge(InputError, ResourceExhausted):
    code = "RESOURCE_EXHAUSTED"


class InputNotAllowed(InputError, PermissionDenied):
    code = "PERMISSION_DENIED"


class InputNotFound(InputError, NotFound):
    code = "NOT_FOUND"


_LIMIT_REASONS = {"too_large", "too_many_pixels"}


def image_error(exc: ImageError, what: str = "image") -> InputError:
    """The typed error of a refused image: over a limit -> InputTooLarge, anything else -> InputInvalid."""
    cls = InputTooLarge if exc.reason in _LIMIT_REASONS else InputInvalid
    return cls(f"{what} refused ({exc.reason}): {exc.message}")


def check_count(n: int, limit: int, what: str) -> None:
    """Refuse a request carrying more than `limit` items."""
    if n > limit:
        raise InputTooLarge(f"{n} {what} in one request; at most {limit} are accepted")


def timestamp_ns(ts, field: str = "captured_at") -> int:
    """A request's timestamp in ns (0 when unset); one outside years 1-9999 is refused, never an internal error."""
    try:
        return ts.ToNanoseconds() if ts.seconds or ts.nanos else 0
    except ValueError:
        raise Invalid(f"{field}: not a valid time (years 0001 to 9999 UTC)") from None


def images_captured(request) -> list[int]:
    """Checks a request's ``images`` (at least one, at most the per-request limit) and returns their capture
    dates from ``captured_at``: none, one for all, or one per image."""
    n = len(request.images)
    if not n:
        raise Invalid("at least one image is required")
    check_count(n, MAX_IMAGES_PER_REQUEST, "images")
    stamps = request.captured_at
    if not stamps:
        return [0] * n
    if len(stamps) == 1:
        return [timestamp_ns(stamps[0])] * n
    if len(stamps) == n:
        return [timestamp_ns(t) for t in stamps]
    raise Invalid("captured_at: give none, one for all images, or one per image")


def check_image_bytes(data: bytes, config: Config, what: str = "image") -> None:
    """The encoded size, before anything is parsed (LFR_MAX_IMAGE_BYTES)."""
    if not data:
        raise InputInvalid(f"{what} refused (empty): no image data")
    if len(data) > config.max_image_bytes:
        raise InputTooLarge(f"{what} refused (too_large): {len(data)} bytes exceeds the limit of "
                            f"{config.max_image_bytes} bytes (LFR_MAX_IMAGE_BYTES)")


def check_image(data: bytes, config: Config, formats: tuple[str, ...] | None = None,
                what: str = "image") -> tuple[str, int, int]:
    """Size, then the header alone: (format, width, height). Refuses a declared width x height over
    LFR_MAX_IMAGE_PIXELS (a decompression bomb) without decompressing anything."""
    check_image_bytes(data, config, what)
    try:
        return image_header(data, config.max_image_bytes, config.max_image_pixels, formats=formats)
    except ImageError as exc:
        raise image_error(exc, what) from None


def decode(data: bytes, config: Config, formats: tuple[str, ...] | None = None, what: str = "image",
           min_side: int | None = None) -> np.ndarray:
    """:func:`lfr.models.images.decode_image` under the configured limits, refusals typed."""
    check_image_bytes(data, config, what)
    kw = {} if min_side is None else {"min_side": min_side}
    try:
        return decode_image(data, config.max_image_bytes, config.max_image_pixels, formats=formats, **kw)
    except ImageError as exc:
        raise image_error(exc, what) from None


def check_pixels(width: int, height: int, max_pixels: int, what: str = "video") -> None:
    """Frame dimensions of a video stream, before frames are decoded or converted."""
    if width * height > max_pixels:
        raise InputTooLarge(f"{what} frames of {width}x{height} = {width * height} pixels are over the limit "
                            f"of {max_pixels} (LFR_MAX_IMAGE_PIXELS)")


def read_image_file(path: str | os.PathLike, config: Config) -> bytes:
    """The bytes of an image file already confined (`confine_path`), read without following a link put in its
    place since, and never more than LFR_MAX_IMAGE_BYTES (a huge file or a device is refused, not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputNotAllowed(f"{path} has been replaced by a link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputInvalid(f"{path} is not a regular file")
        data = f.read(config.max_image_bytes + 1)
    check_image_bytes(data, config, what=f"image file {Path(path).name}")
    return data


# Paths ---------------------------------------------------------------------------------------------------------
def media_roots(roots: str | Iterable[str | os.PathLike]) -> list[Path]:
    """LFR_MEDIA_ROOTS (os.pathsep separated) or a list, as absolute paths; empty entries ignored."""
    items = roots.split(os.pathsep) if isinstance(roots, str) else list(roots)
    return [Path(os.path.abspath(os.fspath(r))) for r in items if os.fspath(r).strip()]


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine_path(path: str | os.PathLike, roots: str | Iterable[str | os.PathLike]) -> Path:
    """The real path of `path` (symlinks resolved, strictly) if it lies in one of `roots`, else an InputError.

    Refused: no roots configured, a relative path or one with `..` components (INVALID_ARGUMENT / PERMISSION_DENIED),
    a path outside the roots as written, or one whose real path (after links) is outside them
    (PERMISSION_DENIED); a path inside that does not exist (NOT_FOUND). The containment test on the path as
    written comes before any file system access, so a refusal says nothing about files outside the roots.
    """
    allowed = media_roots(roots)
    if not allowed:
        raise InputNotAllowed("file inputs are disabled: no media root is configured (set LFR_MEDIA_ROOTS to "
                              "the folders media may be read from)")
    raw = os.fspath(path)
    if not raw or "\0" in raw:
        raise InputInvalid("a file path is required")
    if not os.path.isabs(raw):
        raise InputInvalid(f"give an absolute path: {raw!r} is relative")
    if ".." in Path(raw).parts:
        raise InputNotAllowed(f"{raw}: '..' is not allowed in a media path")
    written = Path(os.path.normpath(raw))
    real_roots = [Path(os.path.realpath(r)) for r in allowed]
    if not any(_within(written, r) for r in allowed + real_roots):
        raise InputNotAllowed(f"{raw} is outside the media roots (LFR_MEDIA_ROOTS)")
    try:
        real = written.resolve(strict=True)
    except FileNotFoundError:
        raise InputNotFound(f"{raw}: no such file or folder") from None
    except (OSError, RuntimeError) as exc:  # a link loop, a permission problem
        raise InputInvalid(f"{raw}: cannot resolve the path ({type(exc).__name__})") from None
    if not any(_within(real, r) for r in real_roots):
        raise InputNotAllowed(f"{raw} resolves (through a link) to a place outside the media roots "
                              "(LFR_MEDIA_ROOTS)")
    return real


# URLs ----------------------------------------------------------------------------------------------------------
def source_hosts(hosts: str | Iterable[str]) -> set[str]:
    items = hosts.split(",") if isinstance(hosts, str) else list(hosts)
    return {h.strip().lower().rstrip(".") for h in items if h.strip()}


def check_source_url(url: str, hosts: str | Iterable[str],
                     roots: str | Iterable[str | os.PathLike] = ()) -> str:
    """What may be opened for a media source: an rtsp:// or rtsps:// URL naming an allowed host (returned
    as given), or a file path confined to `roots` (returned resolved). Any other scheme (http, ftp, file://,
    ffmpeg pseudo-protocols) is refused."""
    if not url or not url.strip():
        raise InputInvalid("a source URL or file path is required")
    if any(ord(c) < 0x20 or c == "\x7f" for c in url):
        raise InputInvalid("the source URL holds control characters")
    if "://" not in url:
        return str(confine_path(url, roots))
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InputInvalid("not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in NETWORK_SCHEMES:
        raise InputNotAllowed(f"{scheme}:// sources are not allowed: give an rtsp:// or rtsps:// camera URL, "
                              "or a file as a path")
    if not host:
        raise InputInvalid(f"the {scheme}:// URL names no host")
    allowed = source_hosts(hosts)
    if not allowed:
        raise InputNotAllowed("network sources are disabled: no camera host is allowed (set LFR_SOURCE_HOSTS)")
    if host not in allowed:
        raise InputNotAllowed(f"host {host} is not an allowed camera host (LFR_SOURCE_HOSTS)")
    return url
