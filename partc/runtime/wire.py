"""The wire format: named tensors as raw bytes behind an explicit header, never pickle.

One message between two stages is a *frame*. All integers are little-endian; every
variable-length part is padded with zero bytes to a multiple of 8, so each tensor payload
starts 8-byte aligned within the frame and ``np.frombuffer`` views it without a copy.

Frame header, 32 bytes (``struct`` format ``<4sBBHQdIH2x``)::

    0   4s   magic            b"PCTF"
    4   u8   version          2
    5   u8   flags            0 (reserved)
    6   u16  n_tensors
    8   u64  request_id
    16  f64  elapsed          seconds the replying worker spent on the request (0 in requests)
    24  u32  n_measurements
    28  u16  plan             index of the build's plan the request runs (manifest ``plans``)
    30  2x   padding

then ``n_measurements`` measurements, then ``n_tensors`` tensors.

Measurement, 32 bytes (``<BBB5xdQQ``) + names::

    0   u8   kind             1 = compute (src: stage), 2 = link (src -> dst)
    1   u8   src_len
    2   u8   dst_len
    3   5x   padding
    8   f64  seconds
    16  u64  bytes_sent
    24  u64  bytes_received
    32       src (UTF-8), dst (UTF-8), padding to 8

Tensor, 16 bytes (``<HBBB3xQ``) + shape + names + payload::

    0   u16  name_len
    2   u8   codec_len
    3   u8   dtype            code in DTYPE_CODES (logical dtype, before the codec)
    4   u8   ndim             at most MAX_NDIM
    5   3x   padding
    8   u64  nbytes           payload length, as the codec wrote it
    16       shape: ndim x u64
             name (UTF-8), codec name (ASCII), padding to 8
             payload (nbytes), padding to 8

The codec named in a tensor's header (``partc.codec``: ``none``, ``fp16``,
``int8+zstd-1``...) turns the payload back into an array of the header's dtype and shape.
``none`` is the array's bytes, C order, little-endian: ``encode`` sends a view of the array
itself and ``decode`` returns a read-only view into the frame, so a raw tensor is copied
once, when the frame is joined into one bytes object (gRPC sends ``bytes``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from partc.codec import Codec, parse_codec
from partc.codec import decode as decode_payload
from partc.codec import encode as encode_payload
from partc.errors import PartcError, RunError
from partc.runtime.transport import MAX_MESSAGE

MAGIC = b"PCTF"
VERSION = 2
MAX_NDIM = 32

_FRAME = struct.Struct("<4sBBHQdIH2x")
_MEASUREMENT = struct.Struct("<BBB5xdQQ")
_TENSOR = struct.Struct("<HBBB3xQ")
_DIM = struct.Struct("<Q")
_PAD = bytes(8)

DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "float64": 3,
    "int64": 4,
    "int32": 5,
    "int16": 6,
    "int8": 7,
    "uint8": 8,
    "bool": 9,
}
_DTYPE_OF_CODE = {code: np.dtype(name).newbyteorder("<") for name, code in DTYPE_CODES.items()}
_KINDS = {"compute": 1, "link": 2}
_RAW: Codec = parse_codec("none")
_KIND_OF_CODE = {code: kind for kind, code in _KINDS.items()}


@dataclass(frozen=True)
class Measurement:
    """One timed step of a request, carried back to the driver in the reply.

    Attributes:
        kind: "compute" (a stage ran its function) or "link" (a frame crossed src -> dst
            and the reply came back; seconds exclude the time the receiver spent on it).
        src: the stage that computed, or the sending end of the link ("driver" for the
            driver).
        dst: the receiving stage of a link; "" for compute.
        seconds: wall-clock seconds.
        bytes_sent: frame bytes sent src -> dst (0 for compute).
        bytes_received: reply bytes sent back dst -> src (0 for compute).
    """

    kind: str
    src: str
    dst: str
    seconds: float
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class Frame:
    """Named tensors for one request, plus the measurements a reply carries back.

    Attributes:
        request_id: the driver's sequence number of the request.
        tensors: name -> array.
        measurements: compute and link timings, in the order they were taken.
        elapsed: seconds the replying worker spent on the request (0 in requests).
        plan: index of the plan the request runs; every stage serves it with that plan's route.
    """

    request_id: int
    tensors: Mapping[str, np.ndarray]
    measurements: tuple[Measurement, ...] = ()
    elapsed: float = 0.0
    plan: int = 0


def _padding(n: int) -> bytes:
    return _PAD[: -n % 8]


def _wire_array(name: str, array: np.ndarray) -> tuple[np.ndarray, int]:
    array = np.asarray(array)
    code = DTYPE_CODES.get(array.dtype.name)
    if code is None:
        raise RunError(
            f"tensor {name!r}: dtype {array.dtype} cannot be sent; supported dtypes: {', '.join(DTYPE_CODES)}"
        )
    if array.ndim > MAX_NDIM:
        raise RunError(f"tensor {name!r}: {array.ndim} dimensions, the wire format allows at most {MAX_NDIM}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)  # a 0-d array is always contiguous: it keeps its shape
    return array, code


def encode(frame: Frame, codecs: Mapping[str, str] | None = None) -> bytes:
    """Serialise ``frame`` into one bytes object (one copy of each raw payload).

    ``codecs`` maps tensor names to codec names (``partc.codec``); other tensors go
    as ``none``.

    Raises:
        PartcError: if a codec name is unknown.
        RunError: if a tensor has an unsupported dtype, too many dimensions, or a name too
            long for its header field.
    """
    if len(frame.tensors) > 0xFFFF:
        raise RunError(f"request {frame.request_id}: {len(frame.tensors)} tensors, a frame holds at most 65535")
    parts: list[bytes | np.ndarray] = [
        _FRAME.pack(MAGIC, VERSION, 0, len(frame.tensors), frame.request_id, frame.elapsed, len(frame.measurements),
                    frame.plan)
    ]
    for m in frame.measurements:
        src, dst = m.src.encode(), m.dst.encode()
        if len(src) > 0xFF or len(dst) > 0xFF:
            raise RunError(f"measurement {m.src!r} -> {m.dst!r}: stage names are limited to 255 bytes")
        parts.append(_MEASUREMENT.pack(_KINDS[m.kind], len(src), len(dst), m.seconds, m.bytes_sent, m.bytes_received))
        parts += [src, dst, _padding(len(src) + len(dst))]
    for name, value in frame.tensors.items():
        array, code = _wire_array(name, value)
        codec = _RAW if codecs is None or name not in codecs else parse_codec(codecs[name])
        # The raw payload is the array itself (the bytes codec 'none' would write), not a copy.
        payload = array.reshape(-1).view(np.uint8) if codec.name == "none" else encode_payload(array, codec)
        nbytes = len(payload)
        name_b, codec_b = name.encode(), codec.name.encode("ascii")
        if len(name_b) > 0xFFFF:
            raise RunError(f"tensor {name[:80]!r}...: name longer than 65535 bytes")
        parts.append(_TENSOR.pack(len(name_b), len(codec_b), code, array.ndim, nbytes))
        parts += [_DIM.pack(d) for d in array.shape]
        parts += [name_b, codec_b, _padding(len(name_b) + len(codec_b)), payload, _padding(nbytes)]
    return b"".join(parts)


def frame_limit(tensors: Iterable[tuple[str, int]]) -> int:
    """Return the most bytes a frame carrying ``tensors`` (name, bytes) can take, whatever their codecs.

    Each tensor gets its header, shape, name, codec name and padding, and its payload plus
    what packing can add to incompressible bytes (zstd and lz4 add well under 1/64); the
    frame its header and room for the measurements a reply collects along the chain.
    """
    tensor_room = sum(_TENSOR.size + 8 * MAX_NDIM + len(name.encode()) + 32 + n + n // 64 + 64 for name, n in tensors)
    return min(MAX_MESSAGE, _FRAME.size + tensor_room + 2**16)


class _Reader:
    """Bounds-checked reads from a frame; every failure names what was being read."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.offset = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.offset + n
        if end > len(self.data):
            raise RunError(
                f"malformed frame: truncated in {what}: needs {n} bytes at offset {self.offset}, "
                f"the frame has {len(self.data)}"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))

    def text(self, n: int, what: str, encoding: str = "utf-8") -> str:
        try:
            return bytes(self.take(n, what)).decode(encoding)
        except UnicodeDecodeError as err:
            raise RunError(f"malformed frame: {what} is not valid {encoding}: {err}") from err

    def skip_padding(self, n: int, what: str) -> None:
        self.take(-n % 8, what)


def decode(
    data: bytes | bytearray | memoryview, codecs: Collection[str] | None = None, max_bytes: int = MAX_MESSAGE
) -> Frame:
    """Parse a frame written by ``encode``. Raw tensors are read-only views into ``data``.

    Sizes are checked before anything is allocated: the tensors' sizes (shape x dtype, as
    their headers claim them) may add up to ``max_bytes`` at most, and a packed payload is
    decompressed into no more than its tensor's size (``partc.codec.decode``). So a frame
    costs at most ``max_bytes`` (plus the codecs' temporaries) whatever it claims or
    inflates to. ``codecs`` are the codec names (canonical, as ``partc.codec.parse_codec``
    gives them) a tensor may come with; None allows every codec.

    Raises:
        RunError: if the frame is truncated, has a bad magic or version, an unknown dtype
            or codec, a codec outside ``codecs``, tensors larger than ``max_bytes``, a
            payload that does not match its shape, a duplicate tensor name, or trailing
            bytes; the message names the tensor and the offset.
    """
    reader = _Reader(memoryview(data).cast("B"))
    magic, version, _flags, n_tensors, request_id, elapsed, n_meas, plan = reader.unpack(_FRAME, "the frame header")
    if magic != MAGIC:
        raise RunError(f"malformed frame: magic {bytes(magic)!r}, expected {MAGIC!r} (not a partc frame)")
    if version != VERSION:
        raise RunError(f"malformed frame: version {version}, this runtime reads version {VERSION}")
    measurements = []
    for i in range(n_meas):
        what = f"measurement {i}"
        kind, src_len, dst_len, seconds, sent, received = reader.unpack(_MEASUREMENT, what)
        if kind not in _KIND_OF_CODE:
            raise RunError(f"malformed frame: {what} has unknown kind {kind}")
        src, dst = reader.text(src_len, what), reader.text(dst_len, what)
        reader.skip_padding(src_len + dst_len, what)
        measurements.append(Measurement(_KIND_OF_CODE[kind], src, dst, seconds, sent, received))
    tensors: dict[str, np.ndarray] = {}
    total = 0
    for i in range(n_tensors):
        what = f"tensor {i}"
        name_len, codec_len, code, ndim, nbytes = reader.unpack(_TENSOR, f"the header of {what}")
        if ndim > MAX_NDIM:
            raise RunError(f"malformed frame: {what} has {ndim} dimensions, at most {MAX_NDIM} are allowed")
        shape = tuple(reader.unpack(_DIM, f"the shape of {what}")[0] for _ in range(ndim))
        name = reader.text(name_len, f"the name of {what}")
        what = f"tensor {i} ({name!r})"
        codec_name = reader.text(codec_len, f"the codec name of {what}", "ascii")
        reader.skip_padding(name_len + codec_len, what)
        if code not in _DTYPE_OF_CODE:
            raise RunError(f"malformed frame: {what} has unknown dtype code {code}")
        try:
            codec = parse_codec(codec_name)
        except PartcError as err:
            raise RunError(f"malformed frame: {what}: {err}") from None
        if codecs is not None and codec.name not in codecs:
            raise RunError(f"malformed frame: {what} comes with codec {codec.name!r}; this link carries "
                           f"{' or '.join(map(repr, sorted(codecs)))} only")
        if name in tensors:
            raise RunError(f"malformed frame: {what} appears twice")
        dtype = _DTYPE_OF_CODE[code]
        total += math.prod(shape) * dtype.itemsize
        if total > max_bytes:
            raise RunError(f"malformed frame: {what}, {dtype.name}{list(shape)}: the frame's tensors take more "
                           f"than {max_bytes} bytes, the most this end accepts")
        payload = reader.take(nbytes, f"the payload of {what}")
        reader.skip_padding(nbytes, f"the payload of {what}")
        try:
            tensors[name] = decode_payload(payload, codec, shape, dtype)
        except Exception as err:  # bytes from the network: whatever a codec trips on is a bad frame
            raise RunError(f"malformed frame: {what}, {dtype.name}{list(shape)}: {err}") from None
    if reader.offset != len(reader.data):
        raise RunError(f"malformed frame: {len(reader.data) - reader.offset} unexpected bytes after the last tensor")
    return Frame(request_id, tensors, tuple(measurements), elapsed, plan)
