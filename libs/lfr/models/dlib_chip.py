"""Aligned face chips exactly as ``dlib.get_face_chip(img, shape, size, padding)`` cuts them (numpy only).

Steps (dlib's ``get_face_chip_details`` + ``extract_image_chip``):

1. least-squares similarity transform from dlib's 5-point chip template to the image landmarks; the
   chip is the square of side ``size * scale`` centred on the mapped chip centre, rotated by the
   transform's angle;
2. if the chip would shrink the face by more than 2x, dlib crops a bounding box around it and builds a
   2x image pyramid of the crop (separable [1 4 6 4 1] filter, integer arithmetic) and samples from the
   smallest level that is still larger than the chip;
3. bilinear interpolation in double precision, truncated to uint8; samples whose 2x2 neighbourhood
   leaves the image are 0.

The result equals dlib's to within rounding noise of the last bit (a grey level in rare pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ChipDetails", "DLIB_5PT_TEMPLATE", "dlib_face_chip", "face_chip_details", "pyramid_down_2"]

# dlib's normalised 5-point template (x, y), in the order of its 5-point shape predictor
DLIB_5PT_TEMPLATE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class ChipDetails:
    """dlib ``chip_details``: a rotated rectangle in the image and the chip size."""

    rect: tuple[float, float, float, float]  # drectangle (left, top, right, bottom), inclusive
    angle: float  # radians
    rows: int
    cols: int


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity src -> dst (Umeyama closed form for 2-D): (2x2 matrix, translation)."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    sc, dc = src - ms, dst - md
    n = src.shape[0]
    sigma = float((sc * sc).sum() / n)
    tr = float((dc[:, 0] * sc[:, 0] + dc[:, 1] * sc[:, 1]).sum() / n)
    sk = float((dc[:, 1] * sc[:, 0] - dc[:, 0] * sc[:, 1]).sum() / n)
    if sigma == 0:
        a, b = 1.0, 0.0
    else:
        a, b = tr / sigma, sk / sigma
    m = np.array([[a, -b], [b, a]])
    return m, md - m @ ms


def face_chip_details(landmarks5: np.ndarray, size: int = 150, padding: float = 0.25) -> ChipDetails:
    """dlib's ``get_face_chip_details`` for a 5-point shape (points in dlib's 5-point order)."""
    pts = np.asarray(landmarks5, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] != 5:
        raise ValueError(f"need 5 landmarks in dlib's order, got {pts.shape[0]}")
    if size <= 0 or padding < 0:
        raise ValueError("size must be > 0 and padding >= 0")
    chip_pts = (padding + DLIB_5PT_TEMPLATE) / (2 * padding + 1) * size
    m, t = _similarity(chip_pts, pts)
    px, py = m[0, 0], m[1, 0]  # m * (1, 0)
    angle = math.atan2(py, px)
    scale = math.hypot(px, py)
    centre = m @ np.array([size / 2.0, size / 2.0]) + t
    w = size * scale - 1  # centered_drect
    h = size * scale - 1
    rect = (centre[0] - w / 2, centre[1] - h / 2, centre[0] + w / 2, centre[1] + h / 2)
    return ChipDetails(rect=rect, angle=angle, rows=int(size), cols=int(size))


# ----------------------------------------------------------------------------------------------------------
# drectangle helpers (dlib semantics: inclusive bounds, width = right - left + 1)


def _area(r: tuple[float, float, float, float]) -> float:
    left, top, right, bottom = r
    if top > bottom or left > right:
        return 0.0
    return (right - left + 1) * (bottom - top + 1)


def _rect_down(r: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    left, top, right, bottom = r
    return (left / 2.0 - 1.25, top / 2.0 - 0.75, right / 2.0 - 1.25, bottom / 2.0 - 0.75)


def _rotate(cx: float, cy: float, x: float, y: float, angle: float) -> tuple[float, float]:
    s, c = math.sin(angle), math.cos(angle)
    dx, dy = x - cx, y - cy
    return (c * dx - s * dy + cx, s * dx + c * dy + cy)


def _lround(v: float) -> int:
    """C's lround: halves away from zero."""
    return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))


# ----------------------------------------------------------------------------------------------------------


def pyramid_down_2(img: np.ndarray) -> np.ndarray:
    """dlib ``pyramid_down<2>``: 5x5 [1 4 6 4 1]^2 / 256 filter and 2x decimation, integer arithmetic.

    Output is ((H - 3) // 2, (W - 3) // 2); images with a side <= 8 give an empty result.
    """
    h, w = img.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0) + img.shape[2:], dtype=img.dtype)
    # uint16 is enough: a row sum is at most 16 * 255, the full 5x5 sum at most 256 * 255 = 65280
    # channel planes, uint16 (a row sum is at most 16 * 255, the full 5x5 sum 256 * 255 = 65280)
    a = img[None] if img.ndim == 2 else np.moveaxis(img, 2, 0)
    a = np.ascontiguousarray(a, dtype=np.uint16)
    nc = (w - 3) // 2
    nr = (h - 3) // 2
    tmp = (
        a[:, :, 0 : 2 * nc : 2]
        + 4 * a[:, :, 1 : 2 * nc + 1 : 2]
        + 6 * a[:, :, 2 : 2 * nc + 2 : 2]
        + 4 * a[:, :, 3 : 2 * nc + 3 : 2]
        + a[:, :, 4 : 2 * nc + 4 : 2]
    )
    out = (
        tmp[:, 0 : 2 * nr : 2]
        + 4 * tmp[:, 1 : 2 * nr + 1 : 2]
        + 6 * tmp[:, 2 : 2 * nr + 2 : 2]
        + 4 * tmp[:, 3 : 2 * nr + 3 : 2]
        + tmp[:, 4 : 2 * nr + 4 : 2]
    )
    out = (out >> 8).astype(np.uint8)
    return out[0] if img.ndim == 2 else np.ascontiguousarray(np.moveaxis(out, 0, 2))


def _bilinear(src: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """dlib ``interpolate_bilinear`` at (xs, ys) (same shape), truncating to uint8, 0 outside."""
    h, w = src.shape[:2]
    nch = 1 if src.ndim == 2 else src.shape[2]
    left = np.floor(xs).ravel()
    top = np.floor(ys).ravel()
    ok = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    out = np.zeros((nch, xs.size), dtype=np.uint8)
    if ok.any():
        all_ok = bool(ok.all())
        sel = slice(None) if all_ok else ok
        x0 = left[sel].astype(np.intp)
        y0 = top[sel].astype(np.intp)
        fx = xs.ravel()[sel] - x0
        fy = ys.ravel()[sel] - y0
        gx, gy = 1 - fx, 1 - fy
        planes = (src[None] if src.ndim == 2 else np.moveaxis(src, 2, 0)).reshape(nch, h * w)
        idx = y0 * w + x0
        tl = np.take(planes, idx, axis=1).astype(np.float64)
        tr = np.take(planes, idx + 1, axis=1).astype(np.float64)
        bl = np.take(planes, idx + w, axis=1).astype(np.float64)
        br = np.take(planes, idx + w + 1, axis=1).astype(np.float64)
        # same operation order as dlib, in double; the cast truncates like static_cast<unsigned char>
        val = gy * (gx * tl + fx * tr) + fy * (gx * bl + fx * br)
        if all_ok:
            out[:] = val.astype(np.uint8)
        else:
            out[:, ok] = val.astype(np.uint8)
    if src.ndim == 2:
        return out[0].reshape(xs.shape)
    return np.ascontiguousarray(out.T).reshape(xs.shape + (nch,))


def extract_chip(img: np.ndarray, det: ChipDetails) -> np.ndarray:
    """dlib ``extract_image_chip`` with bilinear interpolation for one chip."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"image must be uint8 (H, W) or (H, W, C), got {img.dtype} {img.shape}")
    H, W = img.shape[:2]
    rows, cols = det.rows, det.cols
    rect = det.rect
    rl, rt, rr, rb = rect

    # no rotation or scaling: plain copy (dlib's basic_extract_image_chip)
    if det.angle == 0 and rows == (rb - rt + 1) and cols == (rr - rl + 1):
        L, T, R, B = (_lround(v) for v in rect)
        out = np.zeros((B - T + 1, R - L + 1) + img.shape[2:], dtype=np.uint8)
        y0, y1 = max(T, 0), min(B, H - 1)
        x0, x1 = max(L, 0), min(R, W - 1)
        if y0 <= y1 and x0 <= x1:
            out[y0 - T : y1 - T + 1, x0 - L : x1 - L + 1] = img[y0 : y1 + 1, x0 : x1 + 1]
        return out

    n_pix = rows * cols
    # pyramid depth and the crop around the (rotated) chip
    depth = 0
    grow = 2.0
    down = _rect_down(rect)
    while _area(down) > n_pix:
        down = _rect_down(down)
        depth += 1
        grow = grow * 2 + 2
    cx, cy = (rl + rr) / 2.0, (rt + rb) / 2.0
    corners = [_rotate(cx, cy, x, y, det.angle) for x, y in ((rl, rt), (rr, rt), (rl, rb), (rr, rb))]
    xs_c = [p[0] for p in corners]
    ys_c = [p[1] for p in corners]
    gl, gt = min(xs_c) - grow, min(ys_c) - grow
    gr, gb = max(xs_c) + grow, max(ys_c) + grow
    # intersect with the image, then dlib's drectangle -> rectangle conversion (lround)
    il, it, ir, ib = max(gl, 0.0), max(gt, 0.0), min(gr, W - 1.0), min(gb, H - 1.0)
    bl_, bt_, br_, bb_ = _lround(il), _lround(it), _lround(ir), _lround(ib)
    if bl_ > br_ or bt_ > bb_:  # chip entirely outside the image
        return np.zeros((rows, cols) + img.shape[2:], dtype=np.uint8)
    src = img[bt_ : bb_ + 1, bl_ : br_ + 1]

    # pick the pyramid level and express the chip rectangle in its coordinates
    q = (rl - bl_, rt - bt_, rr - bl_, rb - bt_)
    level = -1
    while _area(_rect_down(q)) > n_pix:
        level += 1
        q = _rect_down(q)
    for _ in range(level + 1):
        src = pyramid_down_2(src)

    # chip (c, r) -> source: affine through three corners
    ql, qt, qr, qb = q
    qcx, qcy = (ql + qr) / 2.0, (qt + qb) / 2.0
    p_tl = np.array(_rotate(qcx, qcy, ql, qt, det.angle))
    p_tr = np.array(_rotate(qcx, qcy, qr, qt, det.angle))
    p_bl = np.array(_rotate(qcx, qcy, ql, qb, det.angle))
    ex = (p_tr - p_tl) / (cols - 1) if cols > 1 else np.zeros(2)
    ey = (p_bl - p_tl) / (rows - 1) if rows > 1 else np.zeros(2)
    cc, rows_g = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    xs = ex[0] * cc + ey[0] * rows_g + p_tl[0]
    ys = ex[1] * cc + ey[1] * rows_g + p_tl[1]
    return _bilinear(src, xs, ys)


def dlib_face_chip(
    image: np.ndarray, landmarks5: np.ndarray, size: int = 150, padding: float = 0.25
) -> np.ndarray:
    """Aligned ``(size, size, 3)`` uint8 chip equal to ``dlib.get_face_chip(image, shape, size, padding)``.

    ``landmarks5``: (5, 2) points in dlib's 5-point order (as :class:`ShapePredictor` returns them; dlib
    uses whole-pixel points, pass rounded points for bit-exact agreement).
    """
    return extract_chip(np.asarray(image), face_chip_details(landmarks5, size, padding))
