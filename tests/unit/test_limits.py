"""Hostile input (lfr.runtime.limits): images refused by size and declared pixels before decoding, typed errors
with their gRPC status, file inputs confined to the media roots, network sources restricted to rtsp(s) on allowed
hosts. No services."""

from __future__ import annotations

import io
import os
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lfr.runtime import limits
from lfr.runtime.config import Config
from lfr.runtime.limits import InputInvalid, InputNotAllowed, InputNotFound, InputTooLarge

CFG = Config()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A greyscale PNG declaring width x height whose IDAT is zlib-compressed zero rows (all of them, or the
    first `rows`): tiny on the wire, width x height bytes once decoded."""
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + samples
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def encode(fmt: str = "JPEG", w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Images ---------------------------------------------------------------------------------------------------------
def test_statuses_of_the_error_types():
    assert (InputInvalid.code, InputTooLarge.code, InputNotAllowed.code, InputNotFound.code) == (
        "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "NOT_FOUND")
    assert issubclass(InputTooLarge, ValueError)


def test_too_many_bytes_refused_before_parsing():
    cfg = Config(max_image_bytes=1000)
    with pytest.raises(InputTooLarge, match="LFR_MAX_IMAGE_BYTES") as e:
        limits.check_image_bytes(b"\xff\xd8" + b"x" * 2000, cfg)
    assert "2002 bytes" in e.value.message
    with pytest.raises(InputTooLarge):
        limits.decode(encode("PNG", 200, 200), cfg)
    with pytest.raises(InputInvalid, match="empty"):
        limits.check_image(b"", CFG)


def test_png_decompression_bomb_refused_from_its_header_without_allocating():
    bomb = png_bomb(50_000, 50_000, rows=64)  # 2.5 Gpx declared, a few KB
    assert len(bomb) < 10_000
    before = maxrss_mb()
    with pytest.raises(InputTooLarge, match="too_many_pixels") as e:
        limits.decode(bomb, CFG)
    assert "limit of 40000000 pixels" in e.value.message
    with pytest.raises(InputTooLarge):
        limits.check_image(bomb, CFG)
    # a complete bomb: 9000 x 9000 zeros (81 MB decoded) in ~80 KB, well under the byte limit
    full = png_bomb(9_000, 9_000)
    assert len(full) < 200_000
    with pytest.raises(InputTooLarge, match="9000x9000"):
        limits.decode(full, CFG)
    assert maxrss_mb() - before < 100  # nothing near the decoded size was ever allocated


def test_pillow_own_bomb_limit_is_reported_as_too_large():
    cfg = Config(max_image_pixels=10**12)  # our limit out of the way: Pillow's own refusal must map the same
    with pytest.raises(InputTooLarge, match="too_many_pixels"):
        limits.decode(png_bomb(50_000, 50_000, rows=4), cfg)


def test_truncated_and_non_images_are_not_decodable():
    jpeg = encode("JPEG", 128, 128)
    with pytest.raises(InputInvalid, match="not a decodable image") as e:
        limits.decode(jpeg[: len(jpeg) // 2], CFG)
    assert "truncated" in e.value.message
    for junk in (b"not an image at all" * 10, b"\x89PNG\r\n\x1a\n" + b"\0" * 40):
        with pytest.raises(InputInvalid, match="not a decodable image"):
            limits.decode(junk, CFG)
    # formats outside the accepted set are never parsed (EPS would be handed to Ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"
    with pytest.raises(InputInvalid, match="not_an_image"):
        limits.check_image(eps, CFG)
    with pytest.raises(InputInvalid, match="GIF images are not accepted"):
        limits.check_image(encode("GIF"), CFG, formats=("JPEG", "PNG"))


def test_a_good_image_passes():
    assert limits.check_image(encode("JPEG"), CFG) == ("JPEG", 64, 48)
    assert limits.decode(encode("PNG"), CFG).shape == (48, 64, 3)


def test_request_counts_and_video_pixels():
    limits.check_count(limits.MAX_IMAGES_PER_REQUEST, limits.MAX_IMAGES_PER_REQUEST, "images")
    with pytest.raises(InputTooLarge, match="100000 chips in one request; at most 256"):
        limits.check_count(100_000, limits.MAX_CHIPS_PER_REQUEST, "chips")
    with pytest.raises(InputTooLarge, match="LFR_MAX_IMAGE_PIXELS"):
        limits.check_pixels(20_000, 20_000, CFG.max_image_pixels)


def test_video_with_frames_over_the_pixel_limit_is_refused_on_open(tmp_path):
    import av

    from lfr.media import open_container

    path = tmp_path / "v.mp4"
    with av.open(str(path), mode="w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(3):
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        out.mux(s.encode())
    with open_container(str(path), 64 * 48) as c:
        assert c.streams.video[0].codec_context.width == 64
    with pytest.raises(InputTooLarge, match="64x48"):
        open_container(str(path), 1000)


def test_image_file_read_is_bounded(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(50 << 20)  # sparse: 50 MB declared
    with pytest.raises(InputTooLarge, match="big.jpg"):
        limits.read_image_file(big, Config(max_image_bytes=1 << 20))
    good = tmp_path / "good.jpg"
    good.write_bytes(encode())
    assert limits.read_image_file(good, CFG) == good.read_bytes()
    link = tmp_path / "link.jpg"
    link.symlink_to(good)
    with pytest.raises(InputNotAllowed, match="link"):
        limits.read_image_file(link, CFG)


# Paths ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path) -> tuple[Path, Path]:
    """(root, outside): a media root holding a.jpg, and a folder outside it holding secret.jpg."""
    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    (outside / "secret.jpg").write_bytes(b"s")
    return root, outside


def test_a_file_inside_a_root_is_accepted(tree):
    root, _ = tree
    assert limits.confine_path(root / "a.jpg", [root]) == (root / "a.jpg").resolve()
    assert limits.confine_path(str(root / "a.jpg"), os.pathsep.join(["/nonexistent", str(root)])) == \
        (root / "a.jpg").resolve()
    assert limits.confine_path(root, [root]) == root.resolve()
    (root / "inner.jpg").symlink_to(root / "a.jpg")  # a link that stays inside is fine
    assert limits.confine_path(root / "inner.jpg", [root]) == (root / "a.jpg").resolve()


def test_dotdot_escape_refused(tree):
    root, outside = tree
    with pytest.raises(InputNotAllowed, match=r"'\.\.'"):
        limits.confine_path(f"{root}/../outside/secret.jpg", [root])
    with pytest.raises(InputNotAllowed):
        limits.confine_path(f"{root}/sub/../a.jpg", [root])  # no '..' at all, even one that stays inside


def test_absolute_path_outside_refused_without_looking_at_it(tree):
    root, outside = tree
    with pytest.raises(InputNotAllowed, match="outside the media roots"):
        limits.confine_path(outside / "secret.jpg", [root])
    with pytest.raises(InputNotAllowed):  # missing or not, outside is outside: no existence oracle
        limits.confine_path(outside / "missing.jpg", [root])
    with pytest.raises(InputNotAllowed):
        limits.confine_path("/etc/passwd", [root])
    evil = root.parent / "media-evil"  # a sibling sharing the root's name as a prefix
    evil.mkdir()
    (evil / "x.jpg").write_bytes(b"x")
    with pytest.raises(InputNotAllowed):
        limits.confine_path(evil / "x.jpg", [root])


def test_symlink_inside_a_root_pointing_outside_refused(tree):
    root, outside = tree
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    with pytest.raises(InputNotAllowed, match="link"):
        limits.confine_path(root / "escape.jpg", [root])
    (root / "dir").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputNotAllowed, match="link"):
        limits.confine_path(root / "dir" / "secret.jpg", [root])


def test_missing_relative_and_empty_roots(tree):
    root, _ = tree
    with pytest.raises(InputNotFound):
        limits.confine_path(root / "missing.mp4", [root])
    with pytest.raises(InputInvalid, match="absolute"):
        limits.confine_path("a.jpg", [root])
    for empty in ("", [], os.pathsep):
        with pytest.raises(InputNotAllowed, match="LFR_MEDIA_ROOTS"):
            limits.confine_path(root / "a.jpg", empty)


def test_a_root_reached_through_a_link_works(tree, tmp_path):
    root, _ = tree
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert limits.confine_path(alias / "a.jpg", [alias]) == (root / "a.jpg").resolve()
    assert limits.confine_path(root / "a.jpg", [alias]) == (root / "a.jpg").resolve()


def test_job_folders_confine_every_file(tree):
    from lfr.media import resolve_items

    root, outside = tree
    (root / "stills").mkdir()
    (root / "stills" / "b.jpg").write_bytes(b"b")
    (root / "stills" / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "stills" / "deeper").symlink_to(outside, target_is_directory=True)
    items = resolve_items([{"path": str(root / "stills")}, {"path": str(outside)},
                           {"url": "http://example.com/x.mp4"}], 2.0, str(root), "")
    by_name = {Path(i.location).name: i for i in items}
    assert not by_name["b.jpg"].error
    assert "link" in by_name["leak.jpg"].error
    assert "secret.jpg" not in by_name  # a linked folder is not searched
    assert "outside the media roots" in by_name["outside"].error
    assert "not allowed" in by_name["x.mp4"].error


# URLs -----------------------------------------------------------------------------------------------------------
def test_only_rtsp_sources_on_allowed_hosts(tree):
    hosts = "cam1.example, 10.0.0.7"
    for url in ("http://cam1.example/stream", "https://cam1.example/x", "ftp://cam1.example/v.mp4",
                "file:///etc/passwd", "udp://cam1.example:1234", "concat://x"):
        with pytest.raises(InputNotAllowed, match="not allowed"):
            limits.check_source_url(url, hosts)
    with pytest.raises(InputNotAllowed, match="cam9.example is not an allowed camera host .LFR_SOURCE_HOSTS"):
        limits.check_source_url("rtsp://cam9.example/live", hosts)
    with pytest.raises(InputNotAllowed, match="LFR_SOURCE_HOSTS"):
        limits.check_source_url("rtsp://cam1.example/live", "")
    for url in ("rtsp://cam1.example/live", "RTSP://user:pw@CAM1.example:8554/live", "rtsps://10.0.0.7/a"):
        assert limits.check_source_url(url, hosts) == url
    with pytest.raises(InputInvalid):
        limits.check_source_url("rtsp:///live", hosts)
    with pytest.raises(InputInvalid, match="control"):
        limits.check_source_url("rtsp://cam1.example/live\r\nX: y", hosts)


def test_source_paths_are_confined(tree):
    root, outside = tree
    assert limits.check_source_url(str(root / "a.jpg"), "", [root]) == str((root / "a.jpg").resolve())
    with pytest.raises(InputNotAllowed):
        limits.check_source_url(str(outside / "secret.jpg"), "", [root])
    with pytest.raises(InputInvalid):  # ffmpeg pseudo-protocols are not absolute paths
        limits.check_source_url("concat:/etc/passwd|/etc/hosts", "", [root])
