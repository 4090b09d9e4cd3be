"""Feature-map codecs for tensors crossing a link: one implementation of each.

A codec is named ``QUANT[+PACK]``:

- ``QUANT``: ``none`` (raw bytes, lossless), ``fp16`` (half precision), ``int8`` (affine,
  one scale and zero point per tensor) or ``int8c`` (affine per channel, axis 1);
- ``PACK`` (optional): ``zstd`` / ``zstd-N`` (level N, default 1) or ``lz4``, applied to
  the quantised bytes; lossless.

So ``none`` and ``none+zstd`` are lossless, ``int8+zstd-1`` is JALAD-style. Quantisation
applies to floating-point tensors only; integer and bool tensors always travel as ``none``
whatever the link's codec says.

Payload layout (little-endian), after any PACK step is undone:

- ``none``, ``fp16``: the elements, C order;
- ``int8``: float32 scale, float32 zero point, then one uint8 per element;
- ``int8c``: C float32 scales, C float32 zero points (C = shape[1]), then uint8 elements.

``decode(encode(x, c), c, x.shape, x.dtype)`` restores ``x`` exactly for lossless codecs;
for the others ``Codec.max_error(x)`` bounds the absolute error of every element.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from partc.errors import PartcError

_NAME = re.compile(r"^(none|fp16|int8|int8c)(?:\+(zstd(?:-(\d+))?|lz4))?$")


@dataclass(frozen=True)
class Codec:
    """A parsed codec name.

    Attributes:
        name: the canonical name (``int8+zstd-1``).
        quant: ``none``, ``fp16``, ``int8`` or ``int8c``.
        pack: ``zstd``, ``lz4`` or "" (none).
        level: zstd level.
    """

    name: str
    quant: str
    pack: str
    level: int

    @property
    def lossless(self) -> bool:
        """Whether decoding restores the tensor exactly."""
        return self.quant == "none"

    @property
    def quant_fraction(self) -> float:
        """Bytes the QUANT step writes per raw float32 byte: 1, 0.5 or 0.25 (int8's scales aside)."""
        return {"none": 1.0, "fp16": 0.5}.get(self.quant, 0.25)

    def max_error(self, array: np.ndarray) -> float:
        """The largest absolute error decoding may show on ``array`` (0 if lossless).

        fp16 keeps 11 significant bits: half a unit in the last place, at most 2**-11 of the
        largest magnitude (inf if a value overflows fp16's 65504). int8 rounds to 255 steps of
        the tensor's (int8c: each channel's) range: half a step, plus float32 rounding (of the
        values, and of a step so small it is subnormal: at most 2**-149 per step, 255 steps).
        """
        if self.lossless or array.size == 0 or array.dtype.kind != "f":
            return 0.0
        largest = float(np.abs(array).max())
        if self.quant == "fp16":
            return float("inf") if largest > 65504 else largest * 2.0**-11 + 2.0**-25
        low, high = _ranges(array, per_channel=self.quant == "int8c")
        return float((high - low).max()) / 255 * 0.5 + largest * 2.0**-22 + 255 * 2.0**-149


def parse_codec(name: str) -> Codec:
    """Parse a codec name.

    Raises:
        PartcError: for an unknown name; the message lists the grammar.
    """
    match = _NAME.match(name.strip())
    if not match:
        raise PartcError(
            f"unknown codec {name!r}; use none, fp16, int8 or int8c, optionally followed by +zstd, "
            "+zstd-LEVEL or +lz4 (e.g. int8+zstd-1)"
        )
    quant, pack, level = match.group(1), match.group(2) or "", int(match.group(3) or 1)
    if pack.startswith("zstd"):
        if not 1 <= level <= 22:
            raise PartcError(f"codec {name!r}: zstd level must be 1..22")
        pack = "zstd"
    canonical = quant + (f"+zstd-{level}" if pack == "zstd" else f"+{pack}" if pack else "")
    return Codec(canonical, quant, pack, level if pack == "zstd" else 0)


@dataclass(frozen=True)
class LinkCodec:
    """The codec one link's tensors cross with, as ``compress-cut-tensors`` chose and priced it.

    Attributes:
        codec: the codec's name (``none``: tensors cross raw).
        ratio: raw bytes / wire bytes, measured on the tensors the plan sends (1.0 for ``none``).
        encode_bytes_per_s: raw bytes encoded per second on the link's sending tier's target, as
            the cost model prices it (``partc.costmodel.codec_rates``; None: free), not measured on
            the compiling host.
        decode_bytes_per_s: likewise for decoding, on the receiving tier's target.
        agreement: top-1 agreement with the uncompressed model on the calibration inputs
            (None: lossless, or not checked).
        samples: how many calibration inputs the figures were measured on.
    """

    codec: str = "none"
    ratio: float = 1.0
    encode_bytes_per_s: float | None = None
    decode_bytes_per_s: float | None = None
    agreement: float | None = None
    samples: int = 0

    @property
    def lossless(self) -> bool:
        """Whether tensors cross this link exactly."""
        return parse_codec(self.codec).lossless

    def effective_bandwidth(self, bandwidth: float) -> float:
        """Return the raw bytes per second a link of ``bandwidth`` bytes/s moves with this codec.

        ``1 / (1 / (ratio * bandwidth) + 1 / encode + 1 / decode)``: the wire carries ``1/ratio``
        of the bytes, and encoding and decoding run one after the other with the transfer (a
        speed of None is free). For codec ``none`` this is exactly ``bandwidth``.
        """
        if self.codec == "none":
            return bandwidth
        return 1 / (1 / (self.ratio * bandwidth) + self.coding_seconds_per_byte)

    @property
    def coding_seconds_per_byte(self) -> float:
        """Encode plus decode seconds per raw byte (a speed of None is free)."""
        return sum(1 / speed for speed in (self.encode_bytes_per_s, self.decode_bytes_per_s) if speed is not None)

    def to_json(self) -> dict:
        """Return the manifest form (``cluster.links[].codec``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, entry: Mapping) -> LinkCodec:
        """Return the codec of a manifest's ``cluster.links[].codec``.

        Raises:
            KeyError, TypeError: for a missing or unexpected key (the manifest reader names it).
        """
        return cls(**entry)


NO_CODEC = LinkCodec()  # a link whose tensors cross raw


def encode(array: np.ndarray, codec: Codec) -> bytes:
    """Encode ``array`` with ``codec``; the result holds no shape or dtype (the header does)."""
    array = np.ascontiguousarray(array)
    quant = codec.quant if array.dtype.kind == "f" else "none"
    if quant == "none":
        payload = array.tobytes()
    elif quant == "fp16":
        payload = array.astype(np.float16).tobytes()
    else:
        low, high = _ranges(array, per_channel=quant == "int8c")
        scale = np.where(high > low, (high - low) / 255, 1).astype(np.float32)
        q = np.rint((array - _broadcast(array, low)) / _broadcast(array, scale))
        payload = scale.tobytes() + low.astype(np.float32).tobytes() + np.clip(q, 0, 255).astype(np.uint8).tobytes()
    return pack(payload, codec)


def decode(data: bytes | memoryview, codec: Codec, shape: tuple[int, ...], dtype: str | np.dtype) -> np.ndarray:
    """Decode what ``encode`` produced for a tensor of ``shape`` and ``dtype``.

    The size the tensor needs is known before anything is decoded: a packed payload is
    decompressed into at most that many bytes, so a small payload that inflates to
    gigabytes (a decompression bomb) costs no more memory than an honest one.

    Raises:
        PartcError: if the payload does not have the size the shape implies, or does not
            decompress to exactly that size.
    """
    dtype = np.dtype(dtype)
    quant = codec.quant if dtype.kind == "f" else "none"
    size = payload_size(codec, shape, dtype)
    count = math.prod(shape)
    payload = unpack(data, codec, size)
    _expect(payload, size, codec)
    if quant in ("int8", "int8c"):
        channels = shape[1] if quant == "int8c" else 1
        scale = np.frombuffer(payload, np.float32, channels)
        low = np.frombuffer(payload, np.float32, channels, offset=4 * channels)
        q = np.frombuffer(payload, np.uint8, count, offset=8 * channels).reshape(shape)
        if quant == "int8":
            return (q * scale[0] + low[0]).astype(dtype)
        view = (1, channels) + (1,) * (len(shape) - 2)
        return (q * scale.reshape(view) + low.reshape(view)).astype(dtype)
    stored = np.dtype(np.float16) if quant == "fp16" else dtype
    return np.frombuffer(payload, stored, count).reshape(shape).astype(dtype, copy=quant == "fp16")


def payload_size(codec: Codec, shape: tuple[int, ...], dtype: str | np.dtype) -> int:
    """Return the bytes ``encode`` writes for a tensor of ``shape`` and ``dtype`` before any PACK step.

    Raises:
        PartcError: if the shape has a negative dimension, or ``int8c`` meets a tensor
            without a channel axis.
    """
    dtype = np.dtype(dtype)
    if any(d < 0 for d in shape):
        raise PartcError(f"codec {codec.name}: shape {list(shape)} has a negative dimension")
    quant = codec.quant if dtype.kind == "f" else "none"
    count = math.prod(shape)
    if quant == "int8c" and len(shape) < 2:
        raise PartcError(f"codec int8c needs a tensor with a channel axis, got shape {list(shape)}")
    if quant in ("int8", "int8c"):
        return 8 * (shape[1] if quant == "int8c" else 1) + count
    return count * (2 if quant == "fp16" else dtype.itemsize)


def _ranges(array: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    if array.size == 0:
        shape = (array.shape[1],) if per_channel else (1,)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    if per_channel:
        if array.ndim < 2:
            raise PartcError(f"codec int8c needs a tensor with a channel axis, got shape {array.shape}")
        axes = tuple(i for i in range(array.ndim) if i != 1)
        return array.min(axis=axes).astype(np.float32), array.max(axis=axes).astype(np.float32)
    return np.array([array.min()], np.float32), np.array([array.max()], np.float32)


def _broadcast(array: np.ndarray, per: np.ndarray) -> np.ndarray:
    if per.size == 1:
        return per[0]
    return per.reshape((1, per.size) + (1,) * (array.ndim - 2))


def pack(payload: bytes, codec: Codec) -> bytes:
    """Apply ``codec``'s PACK step (if any) to the quantised ``payload``."""
    if codec.pack == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=codec.level).compress(payload)
    if codec.pack == "lz4":
        import lz4.frame

        return lz4.frame.compress(payload)
    return payload


def unpack(data: bytes | memoryview, codec: Codec, size: int) -> bytes | memoryview:
    """Undo ``codec``'s PACK step, decompressing ``size`` + 1 bytes at most: one more tells a payload that
    is too big.

    Raises:
        PartcError: if ``data`` is corrupt or does not decompress to exactly ``size`` bytes.
    """
    if not codec.pack:
        return data
    try:
        if codec.pack == "zstd":
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                payload = reader.read(size + 1)
            complete = True  # a truncated zstd frame decompresses short
        else:
            import lz4.frame

            unpacker = lz4.frame.LZ4FrameDecompressor()
            payload = unpacker.decompress(data, max_length=size + 1)
            complete = unpacker.eof and not unpacker.unused_data
    except Exception as err:  # zstd and lz4 raise their own error types for corrupt input
        raise PartcError(f"codec {codec.name}: corrupt payload ({err})") from err
    if len(payload) > size:
        raise PartcError(f"codec {codec.name}: payload decompresses to more than the {size} bytes the tensor needs")
    if len(payload) < size or not complete:
        raise PartcError(f"codec {codec.name}: corrupt payload (decompresses to {len(payload)} bytes of a "
                         f"{size}-byte tensor, or has bytes after its frame)")
    return payload


def _expect(payload: bytes | memoryview, size: int, codec: Codec) -> None:
    if len(payload) != size:
        raise PartcError(f"codec {codec.name}: payload has {len(payload)} bytes, the tensor needs {size}")
