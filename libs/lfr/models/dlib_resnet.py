"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch.

The network (dlib's ``anet_type``): a 7x7/2 stem conv, 3x3/2 max pool, 14 residual blocks
(3 x 32, 4 x 64, 3 x 128, 3 x 256 channels, then one more 256 down-sampling block), global average
and a 256 -> 128 linear layer without bias. Every conv is followed by a per-channel affine layer,
which is folded into the conv here. Down-sampling blocks use a 3x3 stride-2 conv *without padding*
and a 2x2 average-pool shortcut with no projection; the sum zero-pads the smaller operand (channels,
bottom rows, right columns), exactly like dlib's ``add_prev`` layer.

Input: aligned 150x150 RGB chips as cut by ``dlib.get_face_chip`` (see :mod:`lfr.models.dlib_chip`),
pixel values 0..255; the model subtracts dlib's channel means and divides by 256. Output: 128-d
descriptors, not normalised; dlib's same-person threshold is a Euclidean distance of 0.6.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfr.models.device import resolve_device
from lfr.models.dlib_format import LayerRecord, read_dnn

__all__ = ["DlibResNet", "load_dlib_resnet", "embed_chips"]

CHIP_SIZE = 150
DESCRIPTOR_DIM = 128
SAME_PERSON_DISTANCE = 0.6


def _pad_to(t: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """Zero-pad (N, C, H, W) at the end of the channel, row and column axes up to (c, h, w)."""
    _, tc, th, tw = t.shape
    if (tc, th, tw) == (c, h, w):
        return t
    return F.pad(t, (0, w - tw, 0, h - th, 0, c - tc))


def _dlib_add(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """dlib add_prev: the sum has the larger of each dimension, missing values count as 0."""
    c, h, w = (max(a, b) for a, b in zip(r.shape[1:], s.shape[1:]))
    return _pad_to(r, c, h, w).add_(_pad_to(s, c, h, w))


class _Block(nn.Module):
    """conv-affine-relu-conv-affine (+ shortcut) -> relu; affines folded into the convs."""

    def __init__(self, c_in: int, c_out: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv2(F.relu(self.conv1(x), inplace=True))
        s = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_dlib_add(r, s), inplace=True)


class DlibResNet(nn.Module):
    """ResNet-29 face descriptor, weights from dlib's file (see :func:`load_dlib_resnet`).

    ``forward`` takes pixel-scale (0..255) RGB chips as a float or uint8 tensor, NCHW ``(N, 3, 150, 150)``
    or NHWC ``(N, 150, 150, 3)``, and returns ``(N, 128)`` float32 descriptors.
    """

    # blocks per stage: (channels, number of blocks, first block down-samples)
    STAGES: tuple[tuple[int, int, bool], ...] = (
        (32, 3, False),
        (64, 4, True),
        (128, 3, True),
        (256, 3, True),
        (256, 1, True),
    )

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([122.782, 117.001, 104.298]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        blocks = []
        c_in = 32
        for c, n, first_down in self.STAGES:
            for i in range(n):
                blocks.append(_Block(c_in, c, down=first_down and i == 0))
                c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(256, DESCRIPTOR_DIM, bias=False)

    def convs(self) -> list[nn.Conv2d]:
        out = [self.stem]
        for b in self.blocks:
            out += [b.conv1, b.conv2]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D batch of chips, got shape {tuple(x.shape)}")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"chips must be 3 x {CHIP_SIZE} x {CHIP_SIZE}, got {tuple(x.shape[1:])}")
        x = x.to(dtype=torch.float32)
        x = (x - self.mean) / 256.0
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.stem(x), inplace=True), 3, 2)
        for b in self.blocks:
            x = b(x)
        return self.fc(x.mean(dim=(2, 3)))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"unexpected dlib ResNet layout: {msg}")


def load_state_from_records(model: DlibResNet, layers: Sequence[LayerRecord]) -> None:
    """Copy parameters from :func:`lfr.models.dlib_format.read_dnn` records into ``model``,
    folding each affine layer into the conv before it."""
    inp = layers[0]
    _check(inp.kind == "input" and inp.params.get("rows") == CHIP_SIZE, f"input block {inp}")
    convs = [lr for lr in layers if lr.kind == "con"]
    affines = [lr for lr in layers if lr.kind == "affine"]
    fcs = [lr for lr in layers if lr.kind == "fc"]
    pools = [lr for lr in layers if lr.kind == "avg_pool"]
    targets = model.convs()
    _check(len(convs) == len(targets) == len(affines), f"{len(convs)} convs, {len(affines)} affines")
    _check(len(fcs) == 1 and fcs[0].params["bias"] is None, "one bias-free fc layer")
    n_down = sum(1 for b in model.blocks if b.down)
    _check(len(pools) == n_down + 1, f"{len(pools)} avg pools for {n_down} down-sampling blocks")
    # each conv is immediately followed by its affine in the record list
    order = [lr.kind for lr in layers if lr.kind in ("con", "affine")]
    _check(order == ["con", "affine"] * len(convs), "conv/affine alternation")
    with torch.no_grad():
        for rec, aff, conv in zip(convs, affines, targets):
            p = rec.params
            w = p["weight"]
            _check(
                tuple(w.shape) == tuple(conv.weight.shape),
                f"conv shape {w.shape} vs {tuple(conv.weight.shape)}",
            )
            _check(
                tuple(p["stride"]) == conv.stride and tuple(p["padding"]) == conv.padding,
                f"conv stride/padding {p['stride']}/{p['padding']} vs {conv.stride}/{conv.padding}",
            )
            g = aff.params["gamma"].astype(np.float64)
            beta = aff.params["beta"].astype(np.float64)
            _check(g.shape == (w.shape[0],), "affine size")
            wf = w.astype(np.float64) * g[:, None, None, None]
            bf = p["bias"].astype(np.float64) * g + beta
            conv.weight.copy_(torch.from_numpy(wf.astype(np.float32)))
            conv.bias.copy_(torch.from_numpy(bf.astype(np.float32)))
        fw = fcs[0].params["weight"]
        _check(tuple(fw.shape) == tuple(model.fc.weight.shape), f"fc shape {fw.shape}")
        model.fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(fw)))
        model.mean.copy_(torch.tensor(inp.params["mean_rgb"], dtype=torch.float32).view(1, 3, 1, 1))


def load_dlib_resnet(
    device: str | torch.device | None = None, path: str | os.PathLike[str] | None = None
) -> DlibResNet:
    """Build :class:`DlibResNet` with dlib's weights (eval mode, channels_last) on ``device``
    (default: CUDA when available, else CPU)."""
    if path is None:
        from lfr.models.weights import weight_path

        path = weight_path("dlib_resnet")
    model = DlibResNet()
    load_state_from_records(model, read_dnn(path))
    model.eval()
    model = model.to(device=resolve_device(device), memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def embed_chips(
    model: DlibResNet,
    chips: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 32,
    flip: bool = False,
) -> np.ndarray:
    """Descriptors ``(N, 128)`` float32 for uint8 RGB chips ``(N, 150, 150, 3)`` (or one chip ``(150, 150, 3)``).

    Runs under ``torch.inference_mode()`` in batches of ``batch_size`` on the model's device.
    ``flip=True`` averages the descriptors of each chip and its mirror image (test-time augmentation;
    not what dlib does, so it is off by default).
    """
    if isinstance(chips, np.ndarray) and chips.ndim == 3:
        chips = chips[None]
    n = int(chips.shape[0])
    out = np.empty((n, DESCRIPTOR_DIM), np.float32)
    if n == 0:
        return out
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            part = chips[i : i + batch_size]
            x = torch.from_numpy(np.ascontiguousarray(part)) if isinstance(part, np.ndarray) else part
            if x.dim() == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
                x = x.permute(0, 3, 1, 2)
            x = x.to(device=device, non_blocking=True).to(torch.float32)  # uint8 over the bus
            if flip:
                m = x.shape[0]
                d = model(torch.cat([x, x.flip(3)], dim=0))
                d = (d[:m] + d[m:]) * 0.5
            else:
                d = model(x)
            out[i : i + len(part)] = d.float().cpu().numpy()
    return out
