"""dlib serialisation decoder on hand-made bytes (no model files needed)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from lfr.models.dlib_format import (
    DlibReader,
    decode_float,
    decode_packed_int,
    encode_float,
    encode_packed_int,
    read_dnn,
    read_shape_predictor,
)


@pytest.mark.parametrize(
    "raw, value",
    [
        (b"\x01\x00", 0),
        (b"\x01\x01", 1),
        (b"\x81\x01", -1),
        (b"\x01\xff", 255),
        (b"\x02\x00\x01", 256),
        (b"\x82\x34\x12", -0x1234),
        (b"\x04\x78\x56\x34\x12", 0x12345678),
        (b"\x08" + b"\xff" * 7 + b"\x7f", 2**63 - 1),
    ],
)
def test_packed_int_known_bytes(raw: bytes, value: int) -> None:
    assert decode_packed_int(raw) == (value, len(raw))
    assert encode_packed_int(value) == raw


def test_packed_int_offset_and_sequence() -> None:
    raw = b"\xaa" + encode_packed_int(7) + encode_packed_int(-300)
    v1, pos = decode_packed_int(raw, 1)
    v2, end = decode_packed_int(raw, pos)
    assert (v1, v2, end) == (7, -300, len(raw))


@pytest.mark.parametrize(
    "raw, offset_text",
    [
        (b"", "offset 0"),  # nothing at all
        (b"\x02\x01", "offset 0"),  # says 2 bytes, has 1
        (b"\x01\x05\x04\x01\x02", "offset 2"),  # second integer truncated
        (b"\x00", "offset 0"),  # zero-length magnitude is invalid
        (b"\x09" + b"\x00" * 9, "offset 0"),  # more than 8 bytes
        (b"\x11\x00", "offset 0"),  # reserved bits set
    ],
)
def test_packed_int_malformed(raw: bytes, offset_text: str) -> None:
    with pytest.raises(ValueError, match=offset_text):
        pos = 0
        while True:
            _, pos = decode_packed_int(raw, pos)
            if pos >= len(raw):
                raise AssertionError("decoded without error")


def test_float_known_bytes() -> None:
    # 3 * 2**-1 = 1.5
    assert decode_float(b"\x01\x03\x81\x01") == (1.5, 4)
    # -5 * 2**2 = -20
    assert decode_float(b"\x81\x05\x01\x02")[0] == -20.0
    assert decode_float(encode_packed_int(0) + encode_packed_int(32000))[0] == math.inf
    assert decode_float(encode_packed_int(0) + encode_packed_int(32001))[0] == -math.inf
    assert math.isnan(decode_float(encode_packed_int(0) + encode_packed_int(32002))[0])


def test_float_exponent_is_16_bit() -> None:
    with pytest.raises(ValueError, match="offset 2"):
        decode_float(b"\x01\x03\x03\x00\x00\x01")


def test_float_truncated() -> None:
    raw = encode_float(0.1)
    with pytest.raises(ValueError, match="truncated"):
        decode_float(raw[:-1])
    with pytest.raises(ValueError, match="offset"):
        decode_float(raw[:1])


def test_float_round_trip() -> None:
    rng = np.random.default_rng(0)
    values = [0.0, 1.0, -2.5, 1e-30, 3.4e38, 122.782, *rng.normal(size=50).tolist()]
    values += [float(np.float32(v)) for v in rng.normal(scale=100, size=50)]
    for v in values:
        raw = encode_float(v)
        got, end = decode_float(raw)
        assert end == len(raw)
        assert got == v


def test_reader_strings_bools_and_errors() -> None:
    raw = encode_packed_int(5) + b"con_4" + b"1" + b"0" + b"x"
    r = DlibReader(raw, name="t")
    assert r.read_string() == "con_4"
    assert r.read_bool() is True
    assert r.read_bool() is False
    with pytest.raises(ValueError, match=r"t: bad bool byte 0x78 .* at byte offset 9"):
        r.read_bool()
    r = DlibReader(encode_packed_int(10) + b"abc", name="t")
    with pytest.raises(ValueError, match="offset 0"):
        r.read_string()


def test_reader_matrix_and_tensor() -> None:
    mat = encode_packed_int(-2) + encode_packed_int(-1) + encode_float(0.5) + encode_float(-4.0)
    tensor = b"".join(encode_packed_int(v) for v in (2, 1, 2, 1, 2)) + struct.pack("<4f", 1, 2, 3, 4)
    r = DlibReader(mat + tensor)
    np.testing.assert_array_equal(r.read_matrix(), [[0.5], [-4.0]])
    t = r.read_tensor()
    assert t.shape == (1, 2, 1, 2) and t.dtype == np.float32
    np.testing.assert_array_equal(t.reshape(-1), [1, 2, 3, 4])
    assert r.at_end()
    r = DlibReader(tensor[:-3], name="t")
    with pytest.raises(ValueError, match="truncated"):
        r.read_tensor()


# --- whole-file structures built by hand ------------------------------------------------------------------


def _ints(*vals: int) -> bytes:
    return b"".join(encode_packed_int(v) for v in vals)


def _floats(*vals: float) -> bytes:
    return b"".join(encode_float(v) for v in vals)


def _string(s: str) -> bytes:
    return encode_packed_int(len(s)) + s.encode()


def _tiny_shape_predictor() -> bytes:
    """1 part, 1 cascade of 2 trees (depth 1), 2 feature pixels."""
    out = _ints(1)  # version
    out += _ints(-2, -1) + _floats(0.5, 0.25)  # initial shape (x, y)
    out += _ints(1)  # cascades
    out += _ints(2)  # trees in the cascade
    for thresh, leaves in ((3.0, (0.1, 0.2, -0.1, -0.2)), (-1.0, (0.5, 0.0, 0.0, 0.5))):
        out += _ints(1) + _ints(0, 1) + _floats(thresh)  # one split: idx1, idx2, thresh
        out += _ints(2)  # leaves
        out += _ints(-2, -1) + _floats(*leaves[:2])
        out += _ints(-2, -1) + _floats(*leaves[2:])
    out += _ints(1) + _ints(2, 0, 0)  # anchor_idx: 1 cascade of 2 features
    out += _ints(1) + _ints(2) + _floats(0.125, -0.125, 0.0, 0.375)  # deltas
    return out


def test_read_tiny_shape_predictor() -> None:
    sp = read_shape_predictor(_tiny_shape_predictor())
    np.testing.assert_array_equal(sp.initial_shape, np.float32([0.5, 0.25]))
    assert sp.split_idx1.shape == (1, 2, 1)
    np.testing.assert_array_equal(sp.split_idx2[0, :, 0], [1, 1])
    np.testing.assert_array_equal(sp.split_thresh[0, :, 0], np.float32([3.0, -1.0]))
    assert sp.leaf_values.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(sp.leaf_values[0, 0], np.float32([[0.1, 0.2], [-0.1, -0.2]]))
    np.testing.assert_array_equal(sp.anchor_idx, [[0, 0]])
    np.testing.assert_array_equal(sp.deltas[0], np.float32([[0.125, -0.125], [0.0, 0.375]]))


@pytest.mark.parametrize("cut", [1, 3, 10, 25, -1, -2])
def test_truncated_shape_predictor_names_offset(cut: int) -> None:
    raw = _tiny_shape_predictor()
    with pytest.raises(ValueError, match=r"(truncated|offset \d+)"):
        read_shape_predictor(raw[:cut])


def test_shape_predictor_trailing_and_bad_version() -> None:
    raw = _tiny_shape_predictor()
    with pytest.raises(ValueError, match="trailing"):
        read_shape_predictor(raw + _ints(0))
    with pytest.raises(ValueError, match="version 2 at byte offset 0"):
        read_shape_predictor(_ints(2) + raw[2:])


def _tiny_dnn() -> bytes:
    """loss_metric over fc(2 -> 3, no bias) over input_rgb_image_sized<150>."""
    out = _ints(1) + _string("loss_metric_2") + _floats(0.04, 0.6)
    out += _ints(3)  # innermost add_layer version (input layer inside)
    out += _string("input_rgb_image_sized") + _floats(122.782, 117.001, 104.298) + _ints(150, 150)
    weights = np.arange(6, dtype=np.float32)  # stored inputs x outputs
    params = _ints(2, 6, 1, 1, 1) + weights.astype("<f4").tobytes()
    out += _string("fc_2") + _ints(3, 2) + params
    out += _ints(1, 2, 3, 1, 1) + _ints(1, 0, 0, 0, 0)  # alias tensors: weights, (empty) biases
    out += _ints(1) + _floats(1, 1, 1, 0)  # bias mode FC_NO_BIAS, learning-rate multipliers
    out += b"110"  # three bools
    out += _ints(2, 0, 0, 0, 0) * 3  # three empty tensors
    out += _ints(1)  # sample expansion factor
    return out


def test_read_tiny_dnn() -> None:
    layers = read_dnn(_tiny_dnn())
    assert [lr.kind for lr in layers] == ["input", "fc", "loss"]
    assert layers[0].params["rows"] == 150
    np.testing.assert_allclose(layers[0].params["mean_rgb"], (122.782, 117.001, 104.298))
    fc = layers[1].params
    assert fc["bias"] is None and fc["num_outputs"] == 3
    np.testing.assert_array_equal(fc["weight"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
    assert layers[2].params["distance_threshold"] == pytest.approx(0.6)


def test_dnn_errors_name_offsets() -> None:
    raw = _tiny_dnn()
    with pytest.raises(ValueError, match="offset"):
        read_dnn(raw[:-5])
    bad = raw.replace(b"fc_2", b"fx_2")
    with pytest.raises(ValueError, match=r"unsupported layer block 'fx_2' at byte offset \d+"):
        read_dnn(bad)
