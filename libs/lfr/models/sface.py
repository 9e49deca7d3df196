"""SFace face embedder (face_recognition_sface_2021dec) as a torch module, plus its 112×112 alignment.

Reproduces OpenCV's ``cv2.FaceRecognizerSF``:

* :func:`sface_chip` = ``alignCrop``: a similarity transform from the 5 YuNet landmarks to a fixed
  112×112 template (OpenCV's own Umeyama variant, same float/double mix), then ``warpAffine`` with
  bilinear interpolation in OpenCV's fixed-point arithmetic (5 fractional bits per coordinate, 15-bit
  weights, zeros outside the image) — pure numpy, bit-identical to OpenCV in our tests;
* :class:`SFace` / :func:`embed_chips` = ``feature``: the network (a MobileFaceNet-style stack of
  conv + batch norm + PReLU, then a 7×7×1024 → 128 linear head) with every batch norm folded into the
  neighbouring conv / linear layer. Raw (unnormalised) 128-d features, as OpenCV returns them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .device import cpu_optimised, resolve_device
from .onnx_weights import OnnxGraph, OnnxWeightsError
from .weights import weight_path
from .yunet import tune_malloc_for_large_tensors

CHIP_SIZE = 112
# OpenCV's FaceRecognizerSF template (x, y) for: right eye, left eye, nose tip, right/left mouth corner.
SFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# OpenCV uses this fixed value as the template mean (not exactly the mean of the points above).
SFACE_TEMPLATE_MEAN = np.array([56.0262, 71.9008], dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------
def sface_transform(landmarks5: np.ndarray) -> np.ndarray:
    """2×3 float64 matrix mapping image points to the 112×112 chip (OpenCV ``alignCrop``'s estimate).

    Least-squares similarity (Umeyama) between the landmarks and :data:`SFACE_TEMPLATE`, with OpenCV's
    arithmetic: float32 means and de-meaned points, float32 products accumulated in float64.
    """
    src = np.asarray(landmarks5, dtype=np.float32).reshape(5, 2)
    f32 = np.float32
    # float32 sequential sums / 5, as the C++ code does
    mean = np.array(
        [
            f32(f32(f32(f32(src[0, k] + src[1, k]) + src[2, k]) + src[3, k]) + src[4, k]) / f32(5)
            for k in range(2)
        ],
        dtype=np.float32,
    )
    src_d = (src - mean).astype(np.float32)
    dst_d = (SFACE_TEMPLATE - SFACE_TEMPLATE_MEAN).astype(np.float32)

    def acc(a: np.ndarray, b: np.ndarray) -> float:
        s = 0.0
        for p in (a * b).astype(np.float32):  # float products, double accumulation
            s += float(p)
        return s / 5

    a = np.array(
        [
            [acc(dst_d[:, 0], src_d[:, 0]), acc(dst_d[:, 0], src_d[:, 1])],
            [acc(dst_d[:, 1], src_d[:, 0]), acc(dst_d[:, 1], src_d[:, 1])],
        ],
        dtype=np.float64,
    )
    d = np.array([1.0, 1.0])
    if a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0] < 0:
        d[1] = -1.0
    u, s, vt = np.linalg.svd(a)
    tol = max(s[0], s[1]) * 2 * np.finfo(np.float32).tiny
    rank = int(s[0] > tol) + int(s[1] > tol)
    if rank == 0:
        raise ValueError(f"degenerate landmarks {src.tolist()}")
    if rank == 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rot = u @ vt
        else:
            rot = u @ np.diag([d[0], -1.0]) @ vt
    else:
        rot = u @ np.diag(d) @ vt
    var = acc(src_d[:, 0], src_d[:, 0]) + acc(src_d[:, 1], src_d[:, 1])
    scale = 1.0 / var * (s[0] * d[0] + s[1] * d[1])
    ts = rot @ mean.astype(np.float64)
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = rot * scale
    m[:, 2] = SFACE_TEMPLATE_MEAN.astype(np.float64) - scale * ts
    return m


def _invert_affine(m: np.ndarray) -> np.ndarray:
    """OpenCV ``invertAffineTransform`` (double precision)."""
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22 = m[1, 1] * det, m[0, 0] * det
    a12, a21 = -m[0, 1] * det, -m[1, 0] * det
    b1 = -a11 * m[0, 2] - a12 * m[1, 2]
    b2 = -a21 * m[0, 2] - a22 * m[1, 2]
    return np.array([[a11, a12, b1], [a21, a22, b2]], dtype=np.float64)


def warp_affine_bilinear(image: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.warpAffine(image, m, size, INTER_LINEAR, BORDER_CONSTANT 0)`` for uint8 images, in numpy.

    Follows OpenCV's fixed-point scheme: source coordinates in 1/1024 steps rounded to 1/32 pixel,
    integer bilinear weights summing to 2**15, result rounded to nearest.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    out_w, out_h = size
    h, w = img.shape[:2]
    inv = _invert_affine(np.asarray(m, dtype=np.float64))
    ys = np.arange(out_h, dtype=np.float64)
    xs = np.arange(out_w, dtype=np.float64)
    # cvRound = round half to even, as np.rint
    x0 = np.rint((inv[0, 1] * ys + inv[0, 2]) * 1024).astype(np.int64)[:, None] + 16
    y0 = np.rint((inv[1, 1] * ys + inv[1, 2]) * 1024).astype(np.int64)[:, None] + 16
    xd = np.rint(inv[0, 0] * xs * 1024).astype(np.int64)[None, :]
    yd = np.rint(inv[1, 0] * xs * 1024).astype(np.int64)[None, :]
    gx = (x0 + xd) >> 5
    gy = (y0 + yd) >> 5
    ix, iy = gx >> 5, gy >> 5
    fx, fy = gx & 31, gy & 31
    # gather the 2×2 neighbourhood of each output pixel; corners outside the image read 0
    flat = img.reshape(h * w, img.shape[2])
    x1, y1 = ix + 1, iy + 1
    inx0, inx1 = (ix >= 0) & (ix < w), (x1 >= 0) & (x1 < w)
    iny0, iny1 = (iy >= 0) & (iy < h), (y1 >= 0) & (y1 < h)
    cx0, cx1 = np.clip(ix, 0, w - 1), np.clip(x1, 0, w - 1)
    ry0, ry1 = np.clip(iy, 0, h - 1) * w, np.clip(y1, 0, h - 1) * w

    def corner(row: np.ndarray, col: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return flat[row + col].astype(np.int32) * valid[..., None]

    p00 = corner(ry0, cx0, iny0 & inx0)
    p01 = corner(ry0, cx1, iny0 & inx1)
    p10 = corner(ry1, cx0, iny1 & inx0)
    p11 = corner(ry1, cx1, iny1 & inx1)
    fx, fy = fx.astype(np.int32), fy.astype(np.int32)
    w00 = ((32 - fx) * (32 - fy) * 32)[..., None]
    w01 = (fx * (32 - fy) * 32)[..., None]
    w10 = ((32 - fx) * fy * 32)[..., None]
    w11 = (fx * fy * 32)[..., None]
    acc = p00 * w00 + p01 * w01 + p10 * w10 + p11 * w11
    out = np.clip((acc + (1 << 14)) >> 15, 0, 255).astype(np.uint8)
    return out[..., 0] if squeeze else out


def sface_chip(image: np.ndarray, landmarks5: np.ndarray) -> np.ndarray:
    """The 112×112 RGB uint8 chip ``cv2.FaceRecognizerSF.alignCrop`` cuts for these YuNet landmarks: the warp by
    OpenCV's own ``warpAffine`` where it is installed (what :func:`warp_affine_bilinear` reproduces, pixel for pixel,
    in a fraction of the time: it is on the live path for every face embedded), else the numpy one."""
    m = sface_transform(landmarks5)
    img = np.asarray(image)
    if img.dtype == np.uint8 and img.ndim == 3:
        try:
            import cv2
        except ImportError:
            cv2 = None
        if cv2 is not None:
            return cv2.warpAffine(np.ascontiguousarray(img), m, (CHIP_SIZE, CHIP_SIZE), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return warp_affine_bilinear(img, m, (CHIP_SIZE, CHIP_SIZE))


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------
def _bn_scale_shift(graph: OnnxGraph, node, weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (weights[n].astype(np.float64) for n in node.input[1:5])
    eps = float(graph.attrs(node).get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


class SFace(nn.Module):
    """SFace network. Input (N, 3, 112, 112) float RGB in 0..255; output (N, 128) raw features."""

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        path = Path(path) if path is not None else weight_path("sface")
        graph = OnnxGraph(path)
        weights = graph.weights()
        nodes = [n for n in graph.nodes() if n.op_type not in ("DequantizeLinear", "Reshape", "Constant")]

        def fail(msg: str):
            raise OnnxWeightsError(f"{path}: {msg}")

        # input normalisation: Sub(data, mean) then Mul(., scale)
        if [n.op_type for n in nodes[:2]] != ["Sub", "Mul"]:
            fail(f"expected Sub, Mul at the input, found {[n.op_type for n in nodes[:2]]}")
        self.register_buffer("in_mean", torch.tensor(float(np.ravel(graph.value(nodes[0].input[1]))[0])))
        self.register_buffer("in_scale", torch.tensor(float(np.ravel(graph.value(nodes[1].input[1]))[0])))
        i = 2
        layers: list[nn.Module] = []
        while i < len(nodes) and nodes[i].op_type == "Conv":
            conv_n, bn_n, act_n = nodes[i : i + 3]
            if (bn_n.op_type, act_n.op_type) != ("BatchNormalization", "PRelu"):
                fail(
                    f"expected Conv, BatchNormalization, PRelu at node {i}, found {bn_n.op_type}, {act_n.op_type}"
                )
            a = graph.attrs(conv_n)
            w = weights[conv_n.input[1]].astype(np.float64)
            b = (
                weights[conv_n.input[2]].astype(np.float64)
                if len(conv_n.input) > 2 and conv_n.input[2]
                else 0.0
            )
            scale, shift = _bn_scale_shift(graph, bn_n, weights)
            groups = int(a.get("group", 1))
            pads = list(a.get("pads", [0, 0, 0, 0]))
            if pads[:2] != pads[2:]:
                fail(f"asymmetric padding {pads}")
            conv = nn.Conv2d(
                w.shape[1] * groups,
                w.shape[0],
                tuple(w.shape[2:]),
                stride=tuple(a.get("strides", [1, 1])),
                padding=tuple(pads[:2]),
                groups=groups,
                bias=True,
            )
            slope = weights[act_n.input[1]].reshape(-1)
            act = nn.PReLU(num_parameters=slope.size)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy((w * scale[:, None, None, None]).astype(np.float32)))
                conv.bias.copy_(torch.from_numpy((b * scale + shift).astype(np.float32)))
                act.weight.copy_(torch.from_numpy(slope.astype(np.float32)))
            layers += [conv, act]
            i += 3
        self.features = nn.Sequential(*layers)
        tail = [n.op_type for n in nodes[i:]]
        if tail != ["BatchNormalization", "Dropout", "Flatten", "Gemm", "BatchNormalization"]:
            fail(f"unexpected head {tail}")
        bn1, _, _, gemm, fc1 = nodes[i:]
        s1, t1 = _bn_scale_shift(graph, bn1, weights)  # per channel of the 1024×7×7 map
        ga = graph.attrs(gemm)
        wg = weights[gemm.input[1]].astype(np.float64)
        if not ga.get("transB", 0):
            wg = wg.T
        if ga.get("transA", 0) or float(ga.get("alpha", 1.0)) != 1.0 or float(ga.get("beta", 1.0)) != 1.0:
            fail(f"unsupported Gemm attributes {ga}")
        bg = weights[gemm.input[2]].astype(np.float64) if len(gemm.input) > 2 else np.zeros(wg.shape[0])
        s2, t2 = _bn_scale_shift(graph, fc1, weights)
        channels = s1.size
        spatial = wg.shape[1] // channels
        s1f, t1f = np.repeat(s1, spatial), np.repeat(t1, spatial)  # flatten order is C, H, W
        w_lin = (wg * s1f[None, :]) * s2[:, None]
        b_lin = (wg @ t1f + bg) * s2 + t2
        self.fc = nn.Linear(wg.shape[1], wg.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(w_lin.astype(np.float32)))
            self.fc.bias.copy_(torch.from_numpy(b_lin.astype(np.float32)))
        self.path = path
        self.eval()

    compiled = None  # a frozen CPU copy (`lfr.models.device.cpu_optimised`), run in place of the module when set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled(x)
        x = (x - self.in_mean) * self.in_scale
        x = self.features(x)
        return self.fc(torch.flatten(x, 1))


def load_sface(device=None) -> SFace:
    """The SFace network on ``device`` (default: CUDA when available, else CPU), in eval mode."""
    dev = resolve_device(device)
    model = SFace().to(dev)
    if dev.type == "cpu":
        tune_malloc_for_large_tensors()
        model = model.to(memory_format=torch.channels_last)
        example = torch.full((2, 3, CHIP_SIZE, CHIP_SIZE), 127.0).contiguous(memory_format=torch.channels_last)
        # kept outside the module's children (not in its state, not moved by .to())
        object.__setattr__(model, "compiled", cpu_optimised(model, example))
    return model


def embed_chips(model: SFace, chips: np.ndarray, flip: bool = False, batch_size: int = 64) -> np.ndarray:
    """(N, 128) float32 raw SFace features for (N, 112, 112, 3) uint8 RGB chips.

    ``flip=True`` averages the features of each chip and its horizontal mirror.
    """
    chips = np.asarray(chips)
    if chips.ndim == 3:
        chips = chips[None]
    if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3) or chips.dtype != np.uint8:
        raise ValueError(f"expected (N, 112, 112, 3) uint8 chips, got {chips.dtype} {chips.shape}")
    n = chips.shape[0]
    if n == 0:
        return np.zeros((0, 128), dtype=np.float32)
    param = next(model.parameters())
    dev = param.device
    cpu = dev.type == "cpu"
    out = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            part = torch.from_numpy(np.ascontiguousarray(chips[start : start + batch_size])).to(dev)
            x = part.permute(0, 3, 1, 2).to(torch.float32)  # NHWC memory = channels_last
            if not cpu:
                x = x.contiguous()
            if flip:
                m = x.shape[0]
                both = torch.cat([x, x.flip(3)])
                if cpu:
                    both = both.contiguous(memory_format=torch.channels_last)
                f2 = model(both)
                feats = (f2[:m] + f2[m:]) / 2
            else:
                feats = model(x)
            out.append(feats.float().cpu())
    return torch.cat(out).numpy().astype(np.float32, copy=False)
