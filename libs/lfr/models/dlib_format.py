"""Reader for dlib's binary serialisation format (the ``.dat`` model files).

Only what the dlib face models need is implemented:

* packed integers: one control byte (low nibble = number of magnitude bytes, 1..8; bit 0x80 = negative),
  then the magnitude little-endian;
* floating point: a packed 64-bit mantissa then a packed 16-bit exponent, value = mantissa * 2**exponent
  (exponents 32000 / 32001 / 32002 mean +inf / -inf / NaN);
* strings (packed length + bytes), bools (ASCII ``'0'``/``'1'``), std::vector (packed count + items),
  dlib matrices (packed -rows, -cols, then row-major floats), DNN tensors (version 2, n, k, rows, cols,
  raw little-endian float32) and alias tensors (version 1 + n, k, rows, cols);
* a whole DNN file (:func:`read_dnn`) and the regression-tree shape predictor
  (:func:`read_shape_predictor`).

Malformed or truncated data raises :class:`ValueError` naming the byte offset.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DlibReader",
    "LayerRecord",
    "ShapePredictorData",
    "decode_packed_int",
    "decode_float",
    "encode_packed_int",
    "encode_float",
    "read_dnn",
    "read_shape_predictor",
]

_FLOAT_INF, _FLOAT_NINF, _FLOAT_NAN = 32000, 32001, 32002


# ---------------------------------------------------------------------------------------------------------
# primitive codecs on plain bytes (exposed for tests and tools)


def decode_packed_int(data: bytes, offset: int = 0, *, max_bytes: int = 8) -> tuple[int, int]:
    """Decode one packed integer at ``offset``; return ``(value, next_offset)``.

    ``max_bytes`` is the width of the C++ type being read (8 for 64-bit, 2 for int16): wider encodings
    are rejected as dlib does.
    """
    n = len(data)
    if offset >= n:
        raise ValueError(f"truncated data: expected a packed integer at byte offset {offset} (size {n})")
    ctrl = data[offset]
    size = ctrl & 0x0F
    if ctrl & 0x70:
        raise ValueError(f"bad packed-integer control byte 0x{ctrl:02x} at byte offset {offset}")
    if size == 0 or size > max_bytes:
        raise ValueError(f"bad packed-integer length {size} (allowed 1..{max_bytes}) at byte offset {offset}")
    end = offset + 1 + size
    if end > n:
        raise ValueError(
            f"truncated data: packed integer at byte offset {offset} needs {size} more bytes (size {n})"
        )
    value = int.from_bytes(data[offset + 1 : end], "little")
    if ctrl & 0x80:
        value = -value
    return value, end


def decode_float(data: bytes, offset: int = 0) -> tuple[float, int]:
    """Decode one dlib float/double (mantissa, exponent) at ``offset``; return ``(value, next_offset)``."""
    if offset < len(data) and data[offset] & 0x70:
        raise ValueError(
            f"old text-format float (first byte 0x{data[offset]:02x}) at byte offset {offset} is not supported"
        )
    mantissa, pos = decode_packed_int(data, offset, max_bytes=8)
    exponent, pos = decode_packed_int(data, pos, max_bytes=2)
    return _make_float(mantissa, exponent), pos


def _make_float(mantissa: int, exponent: int) -> float:
    if exponent < _FLOAT_INF:
        return math.ldexp(float(mantissa), exponent)
    if exponent == _FLOAT_INF:
        return math.inf
    if exponent == _FLOAT_NINF:
        return -math.inf
    return math.nan


def encode_packed_int(value: int) -> bytes:
    """Encode an integer the way dlib's ``serialize`` does (smallest number of magnitude bytes)."""
    mag = abs(int(value))
    size = max(1, (mag.bit_length() + 7) // 8)
    if size > 8:
        raise ValueError(f"integer {value} does not fit in 8 bytes")
    ctrl = size | (0x80 if value < 0 else 0)
    return bytes([ctrl]) + mag.to_bytes(size, "little")


def encode_float(value: float) -> bytes:
    """Encode a double the way dlib does (53-bit mantissa with trailing zero bytes stripped)."""
    if math.isnan(value):
        return encode_packed_int(0) + encode_packed_int(_FLOAT_NAN)
    if math.isinf(value):
        return encode_packed_int(0) + encode_packed_int(_FLOAT_INF if value > 0 else _FLOAT_NINF)
    frac, exp = math.frexp(value)
    digits = 53
    mantissa = int(frac * (1 << digits))
    exponent = exp - digits
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
        if mantissa == 0:
            break
    if mantissa == 0:
        exponent = 0
    return encode_packed_int(mantissa) + encode_packed_int(exponent)


# ---------------------------------------------------------------------------------------------------------
# stream reader


class DlibReader:
    """Sequential reader over an in-memory dlib serialisation."""

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self.data = bytes(data)
        self.pos = 0
        self.name = name

    # -- helpers -------------------------------------------------------------------------------------
    def error(self, msg: str, offset: int | None = None) -> ValueError:
        off = self.pos if offset is None else offset
        return ValueError(f"{self.name}: {msg} at byte offset {off}")

    def _wrap(self, fn: Callable[..., tuple[Any, int]], *args: Any, **kw: Any) -> Any:
        try:
            value, self.pos = fn(self.data, self.pos, *args, **kw)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        return value

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"truncated data: need {n} bytes, {self.remaining()} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    # -- primitives ----------------------------------------------------------------------------------
    def read_int(self, max_bytes: int = 8) -> int:
        return self._wrap(decode_packed_int, max_bytes=max_bytes)

    def read_uint(self, max_bytes: int = 8) -> int:
        start = self.pos
        v = self.read_int(max_bytes)
        if v < 0:
            raise self.error(f"negative value {v} for an unsigned integer", start)
        return v

    def read_float(self) -> float:
        return self._wrap(decode_float)

    def read_string(self) -> str:
        start = self.pos
        n = self.read_uint()
        if n > self.remaining():
            raise self.error(
                f"truncated data: string of length {n} with {self.remaining()} bytes left", start
            )
        raw = self.take(n)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error("string is not ASCII", start) from None

    def read_bool(self) -> bool:
        start = self.pos
        b = self.take(1)[0]
        if b == 0x31:
            return True
        if b == 0x30:
            return False
        raise self.error(f"bad bool byte 0x{b:02x} (expected '0' or '1')", start)

    def read_matrix(self, dtype: Any = np.float64) -> np.ndarray:
        """A dlib::matrix of floating point values, returned as a 2-D array."""
        start = self.pos
        nr = self.read_int()
        nc = self.read_int()
        if (nr < 0) != (nc < 0) and nr != 0 and nc != 0:
            raise self.error(f"inconsistent matrix dimensions {nr} x {nc}", start)
        nr, nc = abs(nr), abs(nc)
        if nr * nc > self.remaining():
            raise self.error(f"matrix of {nr} x {nc} exceeds the remaining data", start)
        vals = [self.read_float() for _ in range(nr * nc)]
        return np.asarray(vals, dtype=dtype).reshape(nr, nc)

    def read_tensor(self) -> np.ndarray:
        """A dlib::resizable_tensor, returned as float32 of shape (n, k, rows, cols)."""
        start = self.pos
        version = self.read_int()
        if version != 2:
            raise self.error(f"unexpected tensor version {version}", start)
        dims = [self.read_int() for _ in range(4)]
        if any(d < 0 for d in dims):
            raise self.error(f"negative tensor dimensions {dims}", start)
        count = dims[0] * dims[1] * dims[2] * dims[3]
        raw = self.take(4 * count) if count else b""
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        start = self.pos
        version = self.read_int()
        if version != 1:
            raise self.error(f"unexpected alias_tensor version {version}", start)
        return tuple(self.read_int() for _ in range(4))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# DNN files


@dataclass
class LayerRecord:
    """One layer of a dlib DNN, in the order the layers see data (input first, loss last).

    kind: ``input``, ``con``, ``affine`` (bn_con/bn_fc blocks are converted to their affine form, the
    raw statistics kept in ``params``), ``relu``, ``add_prev``, ``max_pool``, ``avg_pool``, ``fc``,
    ``tag_or_skip`` (a tag or skip wrapper: no data, the file does not say which or which tag) or ``loss``.
    """

    kind: str
    version: str
    offset: int
    params: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # short: never dump arrays
        shown = {
            k: (f"array{tuple(v.shape)}" if isinstance(v, np.ndarray) else v) for k, v in self.params.items()
        }
        return f"LayerRecord({self.kind!r}, {self.version!r}, @{self.offset}, {shown})"


def _read_con(r: DlibReader, version: str) -> dict[str, Any]:
    params = r.read_tensor().reshape(-1)
    num_filters = r.read_int()
    nr, nc = r.read_int(), r.read_int()
    sy, sx = r.read_int(), r.read_int()
    py, px = r.read_int(), r.read_int()
    filt = r.read_alias_tensor()
    bias = r.read_alias_tensor()
    mults = [r.read_float() for _ in range(4)]
    use_bias = True
    if version in ("con_5", "con_6"):
        use_bias = r.read_bool()
    use_relu = False
    if version == "con_6":
        use_relu = r.read_bool()
    n_w = int(np.prod(filt))
    weight = params[:n_w].reshape(filt)
    b = params[n_w : n_w + int(np.prod(bias))].copy() if use_bias else np.zeros(num_filters, np.float32)
    if filt[0] != num_filters:
        raise r.error(f"{version}: filter tensor {filt} disagrees with num_filters {num_filters}")
    return {
        "weight": weight.copy(),
        "bias": b.reshape(-1),
        "num_filters": num_filters,
        "kernel": (nr, nc),
        "stride": (sy, sx),
        "padding": (py, px),
        "lr_mults": mults,
        "use_bias": use_bias,
        "use_relu": use_relu,
    }


def _read_affine(r: DlibReader, version: str) -> dict[str, Any]:
    if version in ("bn_con2", "bn_fc2"):
        params = r.read_tensor().reshape(-1)
        g_shape = r.read_alias_tensor()
        r.read_alias_tensor()  # beta shape == gamma shape
        r.read_tensor()  # means (of the last batch)
        r.read_tensor()  # invstds
        running_mean = r.read_tensor().reshape(-1)
        running_var = r.read_tensor().reshape(-1)
        num_updates = r.read_uint()
        window = r.read_uint()
        mults = [r.read_float() for _ in range(4)]
        eps = r.read_float()
        n = int(np.prod(g_shape))
        gamma, beta = params[:n], params[n : 2 * n]
        # dlib's affine_(bn_) conversion, in float32 as dlib does it
        g = (gamma / np.sqrt(running_var + np.float32(eps))).astype(np.float32)
        b = (beta - g * running_mean).astype(np.float32)
        return {
            "gamma": g,
            "beta": b,
            "mode": "conv" if version == "bn_con2" else "fc",
            "bn_gamma": gamma.copy(),
            "bn_beta": beta.copy(),
            "running_mean": running_mean,
            "running_var": running_var,
            "eps": eps,
            "num_updates": num_updates,
            "running_stats_window_size": window,
            "lr_mults": mults,
        }
    params = r.read_tensor().reshape(-1)
    g_shape = r.read_alias_tensor()
    r.read_alias_tensor()
    mode = r.read_int()
    disabled = r.read_bool() if version == "affine_2" else False
    n = int(np.prod(g_shape))
    return {
        "gamma": params[:n].copy(),
        "beta": params[n : 2 * n].copy(),
        "mode": "conv" if mode == 0 else "fc",
        "disabled": disabled,
    }


def _read_pool(r: DlibReader, version: str) -> dict[str, Any]:
    nr, nc = r.read_int(), r.read_int()
    sy, sx = r.read_int(), r.read_int()
    py, px = r.read_int(), r.read_int()
    return {"kernel": (nr, nc), "stride": (sy, sx), "padding": (py, px)}


def _read_fc(r: DlibReader, version: str) -> dict[str, Any]:
    num_outputs = r.read_uint()
    num_inputs = r.read_uint()
    params = r.read_tensor().reshape(-1)
    w_shape = r.read_alias_tensor()
    b_shape = r.read_alias_tensor()
    bias_mode = r.read_int()
    mults = [r.read_float() for _ in range(4)]
    use_bias = r.read_bool() if version == "fc_3" else True
    n_w = int(np.prod(w_shape))
    # stored as (inputs x outputs): transpose to (outputs, inputs) for y = W x
    weight = params[:n_w].reshape(num_inputs, num_outputs).T.copy()
    has_bias = bias_mode == 0 and use_bias
    bias = params[n_w : n_w + int(np.prod(b_shape))].copy() if has_bias else None
    return {
        "weight": weight,
        "bias": bias,
        "num_outputs": num_outputs,
        "num_inputs": num_inputs,
        "bias_mode": bias_mode,
        "lr_mults": mults,
    }


def _read_relu(r: DlibReader, version: str) -> dict[str, Any]:
    return {"disabled": r.read_bool() if version == "relu_2" else False}


def _read_input(r: DlibReader, version: str) -> dict[str, Any]:
    means = [r.read_float() for _ in range(3)]
    out: dict[str, Any] = {"mean_rgb": tuple(means)}
    if version == "input_rgb_image_sized":
        out["rows"] = r.read_uint()
        out["cols"] = r.read_uint()
    return out


def _read_loss(r: DlibReader, version: str) -> dict[str, Any]:
    if version == "loss_metric_2":
        return {"margin": r.read_float(), "distance_threshold": r.read_float()}
    return {"margin": 0.1, "distance_threshold": 0.75}


_LAYER_READERS: dict[str, tuple[str, Callable[[DlibReader, str], dict[str, Any]]]] = {
    "con_4": ("con", _read_con),
    "con_5": ("con", _read_con),
    "con_6": ("con", _read_con),
    "affine_": ("affine", _read_affine),
    "affine_2": ("affine", _read_affine),
    "bn_con2": ("affine", _read_affine),
    "bn_fc2": ("affine", _read_affine),
    "relu_": ("relu", _read_relu),
    "relu_2": ("relu", _read_relu),
    "add_prev_": ("add_prev", lambda r, v: {}),
    "max_pool_2": ("max_pool", _read_pool),
    "avg_pool_2": ("avg_pool", _read_pool),
    "fc_2": ("fc", _read_fc),
    "fc_3": ("fc", _read_fc),
}
_INPUT_READERS = {"input_rgb_image_sized": _read_input, "input_rgb_image": _read_input}
_LOSS_READERS = {"loss_metric_": _read_loss, "loss_metric_2": _read_loss}


def _read_details(r: DlibReader, table: dict[str, Any]) -> tuple[str, str, int, dict[str, Any]]:
    start = r.pos
    version = r.read_string()
    entry = table.get(version)
    if entry is None:
        raise r.error(f"unsupported layer block {version!r}", start)
    if isinstance(entry, tuple):
        kind, fn = entry
    else:
        kind, fn = None, entry
    return kind, version, start, fn(r, version)


def _peek_string_prefix(r: DlibReader, prefix: str) -> bool:
    """True when the next item is a string that starts with ``prefix`` (does not move the reader)."""
    save = r.pos
    try:
        n = r.read_uint()
        if n < len(prefix) or n > 64 or n > r.remaining():
            return False
        return r.data[r.pos : r.pos + len(prefix)] == prefix.encode()
    except ValueError:
        return False
    finally:
        r.pos = save


def read_dnn(source: str | os.PathLike[str] | bytes) -> list[LayerRecord]:
    """Parse a dlib DNN file (a loss layer over a chain of layers) into layer records.

    The list runs from the input layer to the loss layer. Tags and skips appear as ``tag_or_skip``
    records (the file does not record which kind or which tag id: the network definition does).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        r = DlibReader(bytes(source))
    else:
        r = DlibReader(Path(source).read_bytes(), name=str(source))

    start = r.pos
    loss_version = r.read_int()
    if loss_version != 1:
        raise r.error(f"unexpected loss-layer version {loss_version}", start)
    _, lver, loff, lparams = _read_details(r, _LOSS_READERS)
    loss = LayerRecord("loss", lver, loff, lparams)

    # chain of wrapper versions from the output end, until the input layer's block
    stack: list[tuple[int, int]] = []  # (version, offset)
    while True:
        off = r.pos
        v = r.read_int()
        if _peek_string_prefix(r, "input"):
            innermost = (v, off)
            break
        if v not in (1, 2):
            raise r.error(f"unexpected layer wrapper version {v}", off)
        stack.append((v, off))
        if len(stack) > 100000:
            raise r.error("layer chain too long", off)

    layers: list[LayerRecord] = []
    v_in, off_in = innermost
    if v_in not in (2, 3):
        raise r.error(f"unexpected input add_layer version {v_in}", off_in)
    _, iver, ioff, iparams = _read_details(r, _INPUT_READERS)
    layers.append(LayerRecord("input", iver, ioff, iparams))
    kind, ver, doff, params = _read_details(r, _LAYER_READERS)
    for _ in range(3):
        r.read_bool()
    for _ in range(3):  # x_grad, cached_output, grad_final
        r.read_tensor()
    if v_in >= 3:
        params["sample_expansion_factor"] = r.read_int()
    layers.append(LayerRecord(kind, ver, doff, params))

    for v, off in reversed(stack):
        if v == 1:
            layers.append(LayerRecord("tag_or_skip", "1", off))
            continue
        kind, ver, doff, params = _read_details(r, _LAYER_READERS)
        for _ in range(3):
            r.read_bool()
        for _ in range(3):  # x_grad, cached_output, params_grad
            r.read_tensor()
        layers.append(LayerRecord(kind, ver, doff, params))

    layers.append(loss)
    if not r.at_end():
        raise r.error(f"{r.remaining()} unexpected trailing bytes")
    return layers


# ---------------------------------------------------------------------------------------------------------
# shape predictor files


@dataclass
class ShapePredictorData:
    """Arrays of a dlib ``shape_predictor`` (C cascades, T trees, S splits, L = S+1 leaves, P parts,
    F feature pixels per cascade). Shapes are in box-normalised coordinates (box corners at 0 and 1)."""

    initial_shape: np.ndarray  # (2P,) float32, x0 y0 x1 y1 ...
    split_idx1: np.ndarray  # (C, T, S) int32
    split_idx2: np.ndarray  # (C, T, S) int32
    split_thresh: np.ndarray  # (C, T, S) float32
    leaf_values: np.ndarray  # (C, T, L, 2P) float32
    anchor_idx: np.ndarray  # (C, F) int32
    deltas: np.ndarray  # (C, F, 2) float32

    @property
    def num_parts(self) -> int:
        return self.initial_shape.shape[0] // 2


def _tokenize_sequential(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a buffer made only of packed integers into (values, byte offsets, magnitude sizes)."""
    vals: list[int] = []
    offs: list[int] = []
    pos, n = 0, len(data)
    fb = int.from_bytes
    while pos < n:
        c = data[pos]
        s = c & 0x0F
        if c & 0x70 or s == 0 or s > 8:
            raise ValueError(f"{name}: bad packed-integer control byte 0x{c:02x} at byte offset {pos}")
        end = pos + 1 + s
        if end > n:
            raise ValueError(f"{name}: truncated data: packed integer at byte offset {pos} runs past the end")
        v = fb(data[pos + 1 : end], "little")
        vals.append(-v if c & 0x80 else v)
        offs.append(pos)
        pos = end
    off = np.asarray(offs, dtype=np.int64)
    raw = np.frombuffer(data, np.uint8)
    return np.asarray(vals, dtype=np.int64), off, (raw[off] & 0x0F).astype(np.int64)


def _tokenize_packed_ints(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised version of :func:`_tokenize_sequential`.

    Every byte is taken as a possible control byte; chains of "next token" pointers started anywhere
    merge with the true chain within a few tokens, so the true token starts are the positions reached
    64 hops after some start (plus the first 64 tokens). The result is checked exactly (the starts must
    form one chain from byte 0 to the end); when the check fails the sequential tokenizer is used.
    """
    n = len(data)
    raw = np.frombuffer(data, np.uint8)
    if n < 4096:
        return _tokenize_sequential(data, name)
    hops = 64
    step = (raw & 0x0F).astype(np.int32) + 1
    nxt = np.minimum(np.arange(n, dtype=np.int32) + step, n).astype(np.int32)
    nxt = np.append(nxt, np.int32(n))
    jump = nxt
    for _ in range(6):  # 2**6 == hops
        jump = jump[jump]
    mark = np.zeros(n + 1, dtype=bool)
    mark[jump[:n]] = True
    p = 0
    for _ in range(hops):
        if p >= n:
            break
        mark[p] = True
        p = int(nxt[p])
    starts = np.flatnonzero(mark[:n])
    ok = starts.size > 0 and starts[0] == 0 and np.array_equal(nxt[starts[:-1]], starts[1:])
    if not ok:
        return _tokenize_sequential(data, name)
    ctrl = raw[starts]
    size = (ctrl & 0x0F).astype(np.int64)
    bad = np.flatnonzero((ctrl & 0x70) != 0)
    bad_size = np.flatnonzero((size == 0) | (size > 8))
    if bad.size or bad_size.size:
        i = min(bad[0] if bad.size else len(starts), bad_size[0] if bad_size.size else len(starts))
        raise ValueError(
            f"{name}: bad packed-integer control byte 0x{int(ctrl[i]):02x} at byte offset {int(starts[i])}"
        )
    last = int(starts[-1])
    if last + 1 + int(size[-1]) != n:
        raise ValueError(f"{name}: truncated data: packed integer at byte offset {last} runs past the end")
    mag = np.zeros(starts.size, dtype=np.uint64)
    for j in range(8):
        sel = np.flatnonzero(size > j)
        if sel.size == 0:
            break
        mag[sel] |= raw[starts[sel] + 1 + j].astype(np.uint64) << np.uint64(8 * j)
    if np.any(mag > np.uint64(2**63 - 1)):
        return _tokenize_sequential(data, name)
    vals = mag.astype(np.int64)
    neg = (ctrl & 0x80) != 0
    vals[neg] = -vals[neg]
    return vals, starts.astype(np.int64), size


class _Tokens:
    """Cursor over a tokenized all-integer serialisation, with byte offsets for error messages."""

    def __init__(self, vals: np.ndarray, offs: np.ndarray, sizes: np.ndarray, nbytes: int, name: str) -> None:
        self.vals, self.offs, self.sizes, self.nbytes, self.name = vals, offs, sizes, nbytes, name
        self.i = 0

    def offset(self, i: int | None = None) -> int:
        i = self.i if i is None else i
        return int(self.offs[i]) if i < len(self.offs) else self.nbytes

    def error(self, msg: str, i: int | None = None) -> ValueError:
        return ValueError(f"{self.name}: {msg} at byte offset {self.offset(i)}")

    def take(self, count: int) -> np.ndarray:
        if self.i + count > len(self.vals):
            raise ValueError(
                f"{self.name}: truncated data: expected {count} more values at byte offset "
                f"{self.offset()} (file has {self.nbytes} bytes)"
            )
        out = self.vals[self.i : self.i + count]
        self.i += count
        return out

    def uint(self, what: str) -> int:
        i = self.i
        v = int(self.take(1)[0])
        if v < 0:
            raise self.error(f"negative {what} {v}", i)
        return v

    def floats(self, count: int) -> np.ndarray:
        """``count`` dlib floats (mantissa/exponent pairs) as float64."""
        i = self.i
        pairs = self.take(2 * count).reshape(count, 2)
        exp_sizes = self.sizes[i + 1 : i + 2 * count : 2]
        if np.any(exp_sizes > 2):
            k = int(np.flatnonzero(exp_sizes > 2)[0])
            raise self.error("float exponent wider than 16 bits", i + 1 + 2 * k)
        m = pairs[:, 0].astype(np.float64)
        e = pairs[:, 1]
        out = np.ldexp(m, np.minimum(e, _FLOAT_INF - 1).astype(np.int32))
        if np.any(e >= _FLOAT_INF):
            out = out.copy()
            out[e == _FLOAT_INF] = np.inf
            out[e == _FLOAT_NINF] = -np.inf
            out[e >= _FLOAT_NAN] = np.nan
        return out

    def matrix_header(self) -> tuple[int, int]:
        nr, nc = (int(v) for v in self.take(2))
        return abs(nr), abs(nc)


def read_shape_predictor(source: str | os.PathLike[str] | bytes) -> ShapePredictorData:
    """Parse a dlib ``shape_predictor`` file (version 1).

    The format is made only of packed integers (floats are mantissa/exponent pairs), so the file is
    tokenized in one vectorised pass and then read structurally.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
    else:
        data, name = Path(source).read_bytes(), str(source)
    if not data:
        raise ValueError(f"{name}: empty data at byte offset 0")
    t = _Tokens(*_tokenize_packed_ints(data, name), nbytes=len(data), name=name)

    i0 = t.i
    version = int(t.take(1)[0])
    if version != 1:
        raise t.error(f"unexpected shape_predictor version {version}", i0)
    nr, nc = t.matrix_header()
    dim = nr * nc
    if dim == 0 or dim % 2:
        raise t.error(f"initial shape has odd or zero size {dim}")
    initial_shape = t.floats(dim).astype(np.float32)

    n_casc = t.uint("cascade count")
    n_trees_ref: int | None = None
    tree_shape: tuple[int, int] | None = None
    splits_all: list[np.ndarray] = []
    leaves_all: list[np.ndarray] = []
    for _c in range(n_casc):
        i0 = t.i
        n_trees = t.uint("tree count")
        if n_trees_ref is None:
            n_trees_ref = n_trees
        elif n_trees != n_trees_ref:
            raise t.error("cascades with different numbers of trees are not supported", i0)
        for _t in range(n_trees):
            i0 = t.i
            n_splits = t.uint("split count")
            s = t.take(4 * n_splits).reshape(n_splits, 4)
            n_leaves = t.uint("leaf count")
            if n_leaves != n_splits + 1:
                raise t.error(f"tree with {n_splits} splits has {n_leaves} leaves", i0)
            if tree_shape is None:
                tree_shape = (n_splits, n_leaves)
            elif tree_shape != (n_splits, n_leaves):
                raise t.error("trees of different depths are not supported", i0)
            i1 = t.i
            block = t.take(n_leaves * (2 + 2 * dim)).reshape(n_leaves, 2 + 2 * dim)
            if np.any(np.abs(block[:, 0]) * np.abs(block[:, 1]) != dim):
                k = int(np.flatnonzero(np.abs(block[:, 0]) * np.abs(block[:, 1]) != dim)[0])
                raise t.error(f"leaf vector size differs from {dim}", i1 + k * (2 + 2 * dim))
            splits_all.append(s)
            leaves_all.append(block[:, 2:])
    n_t = n_trees_ref or 0
    n_s, n_l = tree_shape or (0, 1)
    if splits_all:
        splits = np.stack(splits_all).reshape(n_casc, n_t, n_s, 4)
        leaf_pairs = np.stack(leaves_all).reshape(-1, 2)
    else:
        splits = np.zeros((n_casc, n_t, n_s, 4), np.int64)
        leaf_pairs = np.zeros((0, 2), np.int64)
    if np.any(splits[..., :2] < 0):
        raise ValueError(f"{name}: negative split feature index")
    thresh = np.ldexp(splits[..., 2].astype(np.float64), splits[..., 3].astype(np.int32))
    leaf_vals = np.ldexp(leaf_pairs[:, 0].astype(np.float64), leaf_pairs[:, 1].astype(np.int32))

    i0 = t.i
    n_a = t.uint("anchor list count")
    if n_a != n_casc:
        raise t.error(f"{n_a} anchor lists for {n_casc} cascades", i0)
    anchors = []
    for _c in range(n_a):
        n_f = t.uint("feature count")
        a = t.take(n_f)
        if np.any(a < 0):
            raise t.error("negative anchor index")
        anchors.append(a)
    i0 = t.i
    n_d = t.uint("delta list count")
    if n_d != n_casc:
        raise t.error(f"{n_d} delta lists for {n_casc} cascades", i0)
    deltas = []
    for _c in range(n_d):
        n_f = t.uint("feature count")
        deltas.append(t.floats(2 * n_f))
    if t.i != len(t.vals):
        raise t.error(f"{len(t.vals) - t.i} unexpected trailing values")

    n_f = len(anchors[0]) if anchors else 0
    if any(len(a) != n_f for a in anchors) or any(len(d) != 2 * n_f for d in deltas):
        raise ValueError(f"{name}: cascades with different numbers of feature pixels are not supported")
    anchor_arr = np.asarray(anchors, dtype=np.int64).reshape(n_casc, n_f)
    if anchor_arr.size and anchor_arr.max() >= dim // 2:
        raise ValueError(f"{name}: anchor index out of range")
    if splits.size and splits[..., :2].max() >= n_f:
        raise ValueError(f"{name}: split feature index out of range")
    return ShapePredictorData(
        initial_shape=initial_shape,
        split_idx1=splits[..., 0].astype(np.int32),
        split_idx2=splits[..., 1].astype(np.int32),
        split_thresh=thresh.astype(np.float32),
        leaf_values=leaf_vals.astype(np.float32).reshape(n_casc, n_t, n_l, dim),
        anchor_idx=anchor_arr.astype(np.int32),
        deltas=np.asarray(deltas, dtype=np.float64).astype(np.float32).reshape(n_casc, n_f, 2),
    )
