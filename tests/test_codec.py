import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from partc.codec import decode, encode, pack, parse_codec, payload_size, unpack
from partc.errors import PartcError

CODECS = [
    "none",
    "none+zstd",
    "none+lz4",
    "fp16",
    "fp16+zstd-3",
    "int8",
    "int8+zstd-1",
    "int8+lz4",
    "int8c",
    "int8c+zstd",
]


@settings(max_examples=60, deadline=None)
@given(
    codec=st.sampled_from(CODECS),
    array=arrays(
        np.float32,
        st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(0, 6), st.integers(1, 6)),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
)
def test_round_trip_within_the_declared_bound(codec, array):
    c = parse_codec(codec)
    out = decode(encode(array, c), c, array.shape, array.dtype)
    assert out.shape == array.shape and out.dtype == array.dtype
    if c.lossless:
        assert np.array_equal(out, array)
    else:
        assert np.abs(out.astype(np.float64) - array).max(initial=0) <= c.max_error(array)


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8", "bool"])
def test_integer_tensors_travel_losslessly_whatever_the_codec(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    c = parse_codec("int8+zstd")
    assert np.array_equal(decode(encode(array, c), c, array.shape, dtype), array)


def test_names_are_canonical():
    assert parse_codec("int8+zstd").name == "int8+zstd-1"
    assert parse_codec("fp16+lz4").name == "fp16+lz4"
    assert parse_codec("none").lossless and not parse_codec("int8c").lossless


@pytest.mark.parametrize(
    ("name", "message"),
    [("int4", "unknown codec 'int4'; use none, fp16, int8 or int8c"), ("int8+zstd-30", "zstd level must be 1..22")],
)
def test_bad_names(name, message):
    with pytest.raises(PartcError, match=message):
        parse_codec(name)


def test_corrupt_payloads_are_clear_errors():
    c = parse_codec("int8+zstd")
    data = encode(np.ones((1, 4, 8, 8), np.float32), c)
    with pytest.raises(PartcError, match=r"codec int8\+zstd-1: corrupt payload"):
        decode(data[:-3], c, (1, 4, 8, 8), "float32")
    with pytest.raises(PartcError, match=r"codec none: payload has 12 bytes, the tensor needs 16"):
        decode(b"\0" * 12, parse_codec("none"), (4,), "float32")


def test_compression_ratios_on_a_relu_feature_map():
    rng = np.random.default_rng(0)
    fmap = np.maximum(rng.standard_normal((1, 64, 28, 28), dtype=np.float32), 0)  # half zeros, like after ReLU
    size = {name: len(encode(fmap, parse_codec(name))) for name in ("none", "fp16", "int8", "int8+zstd-1")}
    assert size["none"] == fmap.nbytes
    assert size["fp16"] == fmap.nbytes // 2
    assert size["int8"] == fmap.nbytes // 4 + 8
    assert size["int8+zstd-1"] < size["int8"] * 0.8  # the zeros compress


@pytest.mark.parametrize("name", ["none+zstd-3", "fp16+lz4", "int8+zstd-1", "int8c+lz4"])
def test_stages_compose_and_quant_fraction_sizes_the_pack_input(name):
    """What the cost model prices a codec by: the QUANT step writes ``quant_fraction`` of the raw bytes
    (int8's scales aside), and the PACK step alone turns those bytes into the payload and back."""
    c = parse_codec(name)
    fmap = np.maximum(np.random.default_rng(0).standard_normal((1, 16, 8, 8), dtype=np.float32), 0)
    quantised = encode(fmap, parse_codec(c.quant))
    scales = 8 * (16 if c.quant == "int8c" else 1) if c.quant.startswith("int8") else 0
    assert len(quantised) == payload_size(c, fmap.shape, fmap.dtype) == c.quant_fraction * fmap.nbytes + scales
    assert encode(fmap, c) == pack(quantised, c)
    assert bytes(unpack(pack(quantised, c), c, len(quantised))) == quantised
