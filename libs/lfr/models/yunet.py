"""YuNet face detector (face_detection_yunet_2023mar) as a torch module, built from the ONNX weights.

The network and the post-processing reproduce OpenCV's ``cv2.FaceDetectorYN``: the image is padded at
the bottom/right with zeros to a multiple of 32, fed as float 0..255 (OpenCV feeds BGR; we take RGB and
swap the input channels of the first convolution instead), the per-stride heads (8, 16, 32) are decoded
on the anchor grid (score = sqrt(cls * obj), both clipped to [0, 1]) and non-maximum suppression runs on
the integer-truncated (x, y, w, h) boxes as ``cv::dnn::NMSBoxes`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .device import cpu_optimised, resolve_device
from .onnx_weights import OnnxGraph, OnnxWeightsError
from .types import Face
from .weights import weight_path

STRIDES = (8, 16, 32)
DIVISOR = 32
_HEADS = ("cls", "obj", "bbox", "kps")  # fused head channel order: 1 + 1 + 4 + 10 = 16
_TRUNK_CONVS = 29  # convolutions of backbone + neck, in graph order


def _conv_from(graph: OnnxGraph, node, weights: dict[str, np.ndarray]) -> nn.Conv2d:
    """An ``nn.Conv2d`` configured from an ONNX Conv node and loaded with its (float) weights."""
    a = graph.attrs(node)
    w = weights[node.input[1]]
    b = weights[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise OnnxWeightsError(f"{graph.path}: asymmetric padding {pads} in {node.name!r}")
    groups = int(a.get("group", 1))
    conv = nn.Conv2d(
        w.shape[1] * groups,
        w.shape[0],
        kernel_size=tuple(w.shape[2:]),
        stride=tuple(a.get("strides", [1, 1])),
        padding=tuple(pads[:2]),
        dilation=tuple(a.get("dilations", [1, 1])),
        groups=groups,
        bias=True,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.array(w)))
        conv.bias.copy_(torch.from_numpy(np.array(b)) if b is not None else torch.zeros(w.shape[0]))
    return conv


class _DPUnit(nn.Module):
    """YuNet's depthwise unit: 1x1 conv (no activation), depthwise 3x3 conv, ReLU."""

    def __init__(self, pw: nn.Conv2d, dw: nn.Conv2d):
        super().__init__()
        self.pw = pw
        self.dw = dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dw(self.pw(x)), inplace=True)


class YuNet(nn.Module):
    """YuNet 2023mar network. Input (N, 3, H, W) float RGB in 0..255 with H, W multiples of 32.

    ``forward`` returns, per stride 8 / 16 / 32, a tensor (N, 16, H/s, W/s) whose channels are
    [cls, obj] (after sigmoid), [dx, dy, log w, log h] and 5 × [kx, ky] (raw, in stride units).
    """

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        path = Path(path) if path is not None else weight_path("yunet")
        graph = OnnxGraph(path)
        weights = graph.weights()
        convs = list(graph.nodes("Conv"))
        trunk = [n for n in convs if not n.input[1].startswith("bbox_head.")]
        if len(trunk) != _TRUNK_CONVS or len(convs) != _TRUNK_CONVS + 24:
            raise OnnxWeightsError(
                f"{path}: expected {_TRUNK_CONVS} backbone/neck and 24 head convolutions, "
                f"found {len(trunk)} and {len(convs) - len(trunk)}"
            )
        t = [_conv_from(graph, n, weights) for n in trunk]
        # The graph feeds BGR (cv2.dnn.blobFromImage without swapRB); we take RGB.
        with torch.no_grad():
            t[0].weight.copy_(t[0].weight.flip(1))
        if t[0].stride != (2, 2) or t[0].in_channels != 3:
            raise OnnxWeightsError(f"{path}: unexpected first convolution {t[0]}")
        self.stem = t[0]
        self.stem_dp = _DPUnit(t[1], t[2])
        # model1 .. model5: two depthwise units each
        self.stages = nn.ModuleList(
            nn.Sequential(_DPUnit(t[3 + 4 * i], t[4 + 4 * i]), _DPUnit(t[5 + 4 * i], t[6 + 4 * i]))
            for i in range(5)
        )
        # neck lateral units for strides 8, 16, 32 (graph order is 32, 16, 8)
        self.lateral = nn.ModuleList([_DPUnit(t[27], t[28]), _DPUnit(t[25], t[26]), _DPUnit(t[23], t[24])])

        # Heads: per level four (1x1 conv -> depthwise 3x3 conv) pairs with no activation in between;
        # fuse them into one 1x1 conv (64 -> 16) and one depthwise 3x3 conv (16 channels).
        by_weight = {n.input[1]: n for n in convs}
        self.head_pw = nn.ModuleList()
        self.head_dw = nn.ModuleList()
        for level in range(3):
            pws, dws = [], []
            for head in _HEADS:
                pre = f"bbox_head.multi_level_{head}.{level}."
                n1 = [n for k, n in by_weight.items() if k.startswith(pre + "conv1.")]
                n2 = [n for k, n in by_weight.items() if k.startswith(pre + "conv2.")]
                if len(n1) != 1 or len(n2) != 1:
                    raise OnnxWeightsError(f"{path}: head convolutions {pre}conv1/conv2 not found")
                c1, c2 = _conv_from(graph, n1[0], weights), _conv_from(graph, n2[0], weights)
                if c2.groups != c2.out_channels or c2.in_channels != c1.out_channels:
                    raise OnnxWeightsError(f"{path}: head {pre}conv2 is not depthwise")
                pws.append(c1)
                dws.append(c2)
            cin = pws[0].in_channels
            cout = sum(c.out_channels for c in pws)
            pw = nn.Conv2d(cin, cout, 1)
            dw = nn.Conv2d(cout, cout, 3, padding=1, groups=cout)
            with torch.no_grad():
                pw.weight.copy_(torch.cat([c.weight for c in pws]))
                pw.bias.copy_(torch.cat([c.bias for c in pws]))
                dw.weight.copy_(torch.cat([c.weight for c in dws]))
                dw.bias.copy_(torch.cat([c.bias for c in dws]))
            self.head_pw.append(pw)
            self.head_dw.append(dw)
        self.path = path
        self.eval()

    compiled = None  # a frozen CPU copy (`lfr.models.device.cpu_optimised`), run in place of the module when set

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.compiled is not None:
            return list(self.compiled(x))
        x = F.relu(self.stem(x), inplace=True)
        x = F.max_pool2d(self.stem_dp(x), 2)
        x = self.stages[0](x)
        x = self.stages[1](x)
        x = F.max_pool2d(x, 2)
        c3 = self.stages[2](x)  # stride 8
        c4 = self.stages[3](F.max_pool2d(c3, 2))  # stride 16
        c5 = self.stages[4](F.max_pool2d(c4, 2))  # stride 32
        p5 = self.lateral[2](c5)
        p4 = self.lateral[1](c4 + F.interpolate(p5, scale_factor=2.0, mode="nearest"))
        p3 = self.lateral[0](c3 + F.interpolate(p4, scale_factor=2.0, mode="nearest"))
        outs = []
        for level, p in enumerate((p3, p4, p5)):
            y = self.head_dw[level](self.head_pw[level](p))
            outs.append(torch.cat([torch.sigmoid(y[:, :2]), y[:, 2:]], dim=1))
        return outs


_MALLOC_TUNED = False


def tune_malloc_for_large_tensors(threshold_bytes: int = 256 << 20) -> bool:
    """Let glibc's malloc keep and reuse freed blocks up to ``threshold_bytes`` (process-wide; Linux only).

    PyTorch's CPU allocator has no cache, and glibc returns blocks above 32 MiB (a 1080p feature map of
    16 channels is 33 MiB) to the kernel on free, so every frame pays page faults to get them back:
    about 40 % of YuNet's time on a 1080p frame. Raising ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD``
    keeps that memory in the heap (the process keeps its peak working set, a few hundred MiB).
    Set ``LFR_NO_MALLOC_TUNING=1`` to leave malloc alone. Returns True when the settings were applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("LFR_NO_MALLOC_TUNING"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = bool(mallopt(m_mmap_threshold, int(threshold_bytes))) and bool(
        mallopt(m_trim_threshold, 2 * int(threshold_bytes))
    )
    _MALLOC_TUNED = ok
    return ok


class YuNetDetector:
    """Face detector reproducing ``cv2.FaceDetectorYN`` (YuNet 2023mar) with torch.

    ``detect`` takes RGB uint8 images (H, W, 3); images of the same size run as one batch.
    """

    def __init__(
        self, device=None, score_threshold: float = 0.6, nms_threshold: float = 0.3, top_k: int = 5000
    ):
        self.device = resolve_device(device)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        self.model = YuNet().to(self.device)
        if self.device.type == "cpu":
            tune_malloc_for_large_tensors()
            self.model = self.model.to(memory_format=torch.channels_last)
            example = torch.full((1, 3, 384, 640), 127.0).contiguous(memory_format=torch.channels_last)
            # kept outside the module's children (not in its state, not moved by .to())
            object.__setattr__(self.model, "compiled", cpu_optimised(self.model, example))
        self._priors: dict[tuple[int, int], torch.Tensor] = {}
        from torchvision.ops import nms  # noqa: F401 - imported now (seconds), not at the first frame with 2 faces
        self.max_batch = 16

    # --- helpers ---------------------------------------------------------------------------------
    def _prior_grid(self, ph: int, pw: int) -> torch.Tensor:
        """(A, 3) float32 [col, row, stride] for all anchors of a padded size, strides 8, 16, 32."""
        key = (ph, pw)
        grid = self._priors.get(key)
        if grid is None:
            parts = []
            for s in STRIDES:
                rows, cols = ph // s, pw // s
                r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
                parts.append(torch.stack([c.reshape(-1), r.reshape(-1), torch.full((rows * cols,), s)], 1))
            grid = torch.cat(parts).to(torch.float32).to(self.device)
            self._priors[key] = grid
        return grid

    def _to_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        h, w = images[0].shape[:2]
        ph = ((h - 1) // DIVISOR + 1) * DIVISOR
        pw = ((w - 1) // DIVISOR + 1) * DIVISOR
        one = images[0][None]
        if len(images) > 1 or not one.flags.writeable:  # torch wants writable memory; stack copies anyway
            one = np.stack(images)
        batch = torch.from_numpy(one)
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW view, NHWC memory
        fmt = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        x = torch.empty((len(images), 3, ph, pw), dtype=torch.float32, device=self.device, memory_format=fmt)
        x[:, :, h:, :].zero_()  # OpenCV pads bottom / right with zeros
        x[:, :, :h, w:].zero_()
        x[:, :, :h, :w] = batch
        return x

    def _decode(self, outs: list[torch.Tensor], ph: int, pw: int) -> list[list[Face]]:
        n = outs[0].shape[0]
        flat = torch.cat([o.permute(0, 2, 3, 1).reshape(n, -1, 16) for o in outs], dim=1)  # (N, A, 16)
        scores = torch.sqrt(flat[..., 0].clamp(0.0, 1.0) * flat[..., 1].clamp(0.0, 1.0))
        grid = self._prior_grid(ph, pw)
        keep_mask = scores >= self.score_threshold
        results: list[list[Face]] = []
        for i in range(n):
            idx = torch.nonzero(keep_mask[i]).squeeze(1)
            if idx.numel() == 0:
                results.append([])
                continue
            d = flat[i, idx]
            sc = scores[i, idx]
            g = grid[idx]
            cr, stride = g[:, :2], g[:, 2:3]
            centre = (cr + d[:, 2:4]) * stride
            wh = torch.exp(d[:, 4:6]) * stride
            tl = centre - wh / 2.0
            kps = (d[:, 6:16].reshape(-1, 5, 2) + cr[:, None, :]) * stride[:, None, :]
            if idx.numel() > 1:
                if sc.numel() > self.top_k:
                    sc, order = torch.topk(sc, self.top_k)
                    tl, wh, kps = tl[order], wh[order], kps[order]
                # cv::dnn::NMSBoxes on Rect2i(int(x), int(y), int(w), int(h)) (truncation toward zero)
                itl = torch.trunc(tl)
                iboxes = torch.cat([itl, itl + torch.trunc(wh)], dim=1)
                keep = _nms(iboxes, sc, self.nms_threshold)
                tl, wh, kps, sc = tl[keep], wh[keep], kps[keep], sc[keep]
            boxes = torch.cat([tl, tl + wh], dim=1).cpu().numpy()
            kps_np = kps.cpu().numpy().astype(np.float32)
            sc_np = sc.cpu().numpy()
            results.append(
                [
                    Face(box=tuple(float(v) for v in boxes[j]), landmarks=kps_np[j], score=float(sc_np[j]))
                    for j in range(len(sc_np))
                ]
            )
        return results

    # --- public API -------------------------------------------------------------------------------
    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Detect faces in RGB uint8 images; one list of :class:`Face` per image, by descending score."""
        results: list[list[Face] | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(
                    f"image {i}: expected an RGB uint8 array (H, W, 3), got {img.dtype} {img.shape}"
                )
            groups.setdefault(img.shape[:2], []).append(i)
        with torch.inference_mode():
            for members in groups.values():
                for start in range(0, len(members), self.max_batch):
                    chunk = members[start : start + self.max_batch]
                    x = self._to_input([np.ascontiguousarray(images[i]) for i in chunk])
                    outs = self.model(x)
                    for i, faces in zip(chunk, self._decode(outs, x.shape[2], x.shape[3])):
                        results[i] = faces
        return results  # type: ignore[return-value]

    def detect_one(self, image: np.ndarray) -> list[Face]:
        return self.detect([image])[0]


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices kept by greedy NMS (IoU > threshold suppresses), by descending score."""
    from torchvision.ops import nms

    return nms(boxes, scores, threshold)
