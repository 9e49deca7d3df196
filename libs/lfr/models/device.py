"""Where the models run, and in what float precision on CUDA.

Every loader resolves its device here. On CUDA, convolutions and matrix products run in full float32 by
default: cuDNN's TF32 mode (torch's default for convolutions) rounds inputs to a 10-bit mantissa, which on
an H200 moved dlib descriptors up to 2.5e-4 from dlib's own (over the 1e-4 equivalence bound) while
roughly doubling dlib-ResNet throughput. A deployment that prefers the speed turns it on with
``allow_tf32(True)`` (the services do so for ``LFR_CUDA_TF32=on``); scores then differ from CPU ones in
the fourth decimal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_tf32 = False


def allow_tf32(enabled: bool) -> None:
    """Choose TF32 (faster, ~1e-4 off) or full float32 (the default) for CUDA work in this process."""
    global _tf32
    _tf32 = bool(enabled)
    if torch.cuda.is_available():
        _apply()


def _apply() -> None:
    torch.backends.cudnn.allow_tf32 = _tf32
    torch.backends.cuda.matmul.allow_tf32 = _tf32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> CUDA when available, else CPU; otherwise as given (CUDA must exist)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available")
        _apply()
    return dev


def cpu_optimised(model: torch.nn.Module, example: torch.Tensor):
    """A frozen TorchScript copy of ``model`` for CPU inference, with oneDNN convolutions
    (``torch.jit.optimize_for_inference``): the same outputs (within 1e-5 on SFace and YuNet) for less CPU per
    image (docs/benchmarks.md). Traced from ``example``; batch size and image size may differ later. ``None`` where it cannot be
    built or ``LFR_TORCH_JIT=0``: the caller then runs the module itself."""
    import os
    import warnings

    if os.environ.get("LFR_TORCH_JIT", "1") == "0":
        return None
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(model.eval(), example, check_trace=False))
            return torch.jit.optimize_for_inference(frozen)
    except Exception:  # noqa: BLE001 - an unusual torch build: the eager module is always correct
        return None


@contextlib.contextmanager
def own_layers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` running its own layers, not the frozen copy ``cpu_optimised`` put in its place (``compiled``): for
    what traces the network itself (an ONNX export, int8 quantisation). The frozen copy is back afterwards."""
    frozen = getattr(model, "compiled", None)
    object.__setattr__(model, "compiled", None)
    try:
        yield model
    finally:
        object.__setattr__(model, "compiled", frozen)
