import struct

import numpy as np
import pytest

from partc.errors import PartcError, RunError
from partc.runtime.wire import DTYPE_CODES, Frame, Measurement, decode, encode

SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4)]
DTYPES = ["float32", "float16", "int64", "int32", "uint8", "bool", "float64", "int16", "int8"]


def sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_shape_round_trips(dtype):
    tensors = {f"t{i}": sample(dtype, shape, i) for i, shape in enumerate(SHAPES)}
    frame = decode(encode(Frame(7, tensors)))
    assert frame.request_id == 7 and list(frame.tensors) == list(tensors)
    for name, array in tensors.items():
        out = frame.tensors[name]
        assert out.dtype == array.dtype and out.shape == array.shape
        assert np.array_equal(out, array)
        assert out.flags.aligned


def test_supported_dtypes_cover_the_runtime_contract():
    assert {"float32", "float16", "int64", "int32", "uint8", "bool"} <= set(DTYPE_CODES)


def test_raw_payload_is_a_read_only_view_of_the_message():
    data = encode(Frame(0, {"x": np.arange(1000, dtype=np.float32)}))
    x = decode(data).tensors["x"]
    assert np.shares_memory(x, np.frombuffer(data, np.uint8))
    assert not x.flags.writeable


def test_non_contiguous_and_big_endian_arrays_round_trip():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tensors = {"t": base.T, "s": base[:, ::2], "be": base.astype(">i4")}
    out = decode(encode(Frame(1, tensors))).tensors
    assert np.array_equal(out["t"], base.T) and np.array_equal(out["s"], base[:, ::2])
    assert np.array_equal(out["be"], base.astype("<i4")) and out["be"].dtype == np.dtype("<i4")


def test_measurements_and_elapsed_round_trip():
    ms = (Measurement("compute", "edge.0", "", 0.25), Measurement("link", "edge.0", "cloud.0", 0.5, 10, 20))
    frame = decode(encode(Frame(2**40, {"ü-name": np.zeros(3, np.uint8)}, ms, elapsed=1.5)))
    assert frame.request_id == 2**40 and frame.measurements == ms and frame.elapsed == 1.5
    assert list(frame.tensors) == ["ü-name"]


def test_unsupported_dtype_is_named():
    with pytest.raises(RunError, match=r"tensor 'z': dtype complex64 cannot be sent; supported dtypes: float32"):
        encode(Frame(0, {"z": np.zeros(2, np.complex64)}))


def good_frame():
    return encode(Frame(3, {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "bb": np.ones(5, np.float32)}))


def test_every_truncation_gives_a_clear_error():
    data = good_frame()
    for n in range(len(data)):
        with pytest.raises(RunError, match="malformed frame"):
            decode(data[:n])


def test_truncated_payload_names_the_tensor_and_offsets():
    data = good_frame()
    with pytest.raises(RunError, match=r"truncated in the payload of tensor 1 \('bb'\): needs 20 bytes at offset \d+"):
        decode(data[:-10])


def test_bad_magic_version_dtype_trailing_bytes():
    data = bytearray(good_frame())
    with pytest.raises(RunError, match=r"magic b'XXXX', expected b'PCTF' \(not a partc frame\)"):
        decode(b"XXXX" + bytes(data[4:]))
    with pytest.raises(RunError, match="version 9, this runtime reads version 2"):
        decode(bytes(data[:4]) + b"\x09" + bytes(data[5:]))
    bad = bytearray(data)
    bad[32 + 3] = 200  # dtype code of the first tensor (right after the 32-byte frame header)
    with pytest.raises(RunError, match=r"tensor 0 \('a'\) has unknown dtype code 200"):
        decode(bytes(bad))
    with pytest.raises(RunError, match="8 unexpected bytes after the last tensor"):
        decode(bytes(data) + bytes(8))


def test_payload_that_does_not_match_the_shape():
    data = bytearray(good_frame())
    struct.pack_into("<Q", data, 32 + 16, 3)  # first shape dim of tensor 'a': 2 -> 3
    message = r"malformed frame: tensor 0 \('a'\), int32\[3, 3\]: codec none: payload has 24 bytes, the tensor needs 36"
    with pytest.raises(RunError, match=message):
        decode(bytes(data))


def test_duplicate_tensor_name_is_rejected():
    one = encode(Frame(0, {"a": np.zeros(1, np.uint8)}))
    header, body = bytearray(one[:32]), one[32:]
    struct.pack_into("<H", header, 6, 2)  # n_tensors = 2, the same record twice
    with pytest.raises(RunError, match=r"tensor 1 \('a'\) appears twice"):
        decode(bytes(header) + body + body)


def test_codecs_are_named_in_the_header_and_undone_on_decode():
    x = np.linspace(-1, 1, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    n = np.arange(5, dtype=np.int64)
    raw = encode(Frame(0, {"x": x, "y": x, "n": n}))
    packed = encode(Frame(0, {"x": x, "y": x, "n": n}), codecs={"x": "int8+zstd", "n": "fp16"})
    assert b"int8+zstd-1" in packed and len(packed) < len(raw) - x.nbytes // 2
    out = decode(packed).tensors
    assert out["x"].dtype == np.float32 and out["x"].shape == x.shape
    assert np.abs(out["x"] - x).max() <= 2 / 255 / 2 + 1e-6  # int8 over the range [-1, 1]
    assert np.array_equal(out["y"], x) and np.array_equal(out["n"], n)  # integers travel losslessly


def test_unknown_codec_names_are_clear_on_both_ends():
    with pytest.raises(PartcError, match="unknown codec 'int4'"):
        encode(Frame(0, {"x": np.zeros(3, np.float32)}), codecs={"x": "int4"})
    data = encode(Frame(0, {"x": np.zeros(4, np.float32)}), codecs={"x": "fp16"})
    with pytest.raises(RunError, match=r"malformed frame: tensor 0 \('x'\): unknown codec 'fp99'"):
        decode(data.replace(b"fp16", b"fp99"))


def test_a_codec_that_trips_on_a_forged_header_gives_a_clear_error():
    data = encode(Frame(0, {"x": np.zeros(4, np.float32)}), codecs={"x": "none+zstd-10"})
    forged = data.replace(b"none+zstd-10", b"int8c+zstd-1")  # same length; int8c needs a channel axis
    with pytest.raises(RunError, match=r"malformed frame: tensor 0 \('x'\), float32\[4\]: "):
        decode(forged)
