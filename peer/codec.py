"""Packing: a quantized vector as one framed, self-describing, checksummed payload.

:mod:`peer.quantize` does the maths; this module turns its :class:`~peer.quantize.Quantized`
into bytes and back. Payloads come from other peers, so :func:`decode` trusts nothing: it
checks every header field against what the header itself implies and against what the
caller expects *before* allocating anything sized by the payload, and any fault at all
comes out as :class:`CodecError` (DESIGN §4: "every decode error is a clean rejection of
that contribution, never a crash").

Layout (all integers little-endian)::

    offset size field
         0    2 magic       b"LQ"
         2    1 version     1
         3    1 codec       1 fp4, 2 int8, 3 bf16, 4 fp32
         4    1 flags       bit 0: body is zstd-compressed; other bits 0
         5    1 reserved    0
         6    4 block_size  even, 2 … 65536 (carried even where the codec has no scales)
        10    8 numel       number of values
        18    4 body_len    length of the body before compression
        22    4 crc32       zlib.crc32 of bytes 0..21 followed by everything after byte 25
        26    … body        fp32 scales, then codes; one zstd frame of it when flag 0 is set

The body's length follows from (codec, numel, block_size) alone (:func:`raw_body_len`), so
``body_len`` is redundant on purpose: a header whose fields disagree is refused before
anything is decompressed. The checksum covers the header as well as the body, so a
flipped bit in a field that happens not to change the body's length (``block_size`` of a
bf16 payload, say) is caught too. It catches accidents, not forgery; a forger still has to
produce a payload that passes every other check, and values that decode to NaN or Inf do
not.

zstd compressors and decompressors are kept per thread: they are not safe to share, and
encode/decode run on an executor's threads.
"""

from __future__ import annotations

import math
import struct
import sys
import threading
import zlib
from dataclasses import dataclass

import torch
import zstandard

from locod.peer.quantize import (
    CODECS,
    ROUNDINGS,
    Quantized,
    codes_len,
    dequantize,
    num_blocks,
    quantize,
)

MAGIC = b"LQ"
VERSION = 1
CODEC_IDS = {"fp4": 1, "int8": 2, "bf16": 3, "fp32": 4}
"""Codec name → id byte in the header. Ids are never reused."""
FLAG_ZSTD = 0x01
MIN_BLOCK_SIZE = 2
MAX_BLOCK_SIZE = 65536
MAX_ZSTD_LEVEL = 22
MAX_BODY_LEN = 0xFFFFFFFF
"""``body_len`` is a u32: one payload carries at most 4 GiB before compression."""

_HEADER = struct.Struct("<2sBBBBIQII")
HEADER_SIZE = _HEADER.size
"""26 bytes."""
_CRC_OFFSET = HEADER_SIZE - 4

_CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
_CODE_DTYPES = {
    "fp4": torch.uint8,
    "int8": torch.int8,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
_SCALE_BYTES = 4


class CodecError(ValueError):
    """A payload is malformed, corrupt, or not what the caller expected.

    The only exception :func:`decode` raises for bad input; the message says what was
    wrong, for the log line that records the rejected contribution.
    """


@dataclass(frozen=True, slots=True)
class WireFormat:
    """How outer gradients travel: codec, block size, zstd level, rounding."""

    codec: str = "fp4"
    """One of ``fp4`` (the paper's FP4 E3M0), ``int8``, ``bf16``, ``fp32``."""
    block_size: int = 64
    """Values per fp32 scale (fp4, int8). Smaller: more accurate, more scale bytes."""
    zstd_level: int = 3
    """zstd level of the body, 1 … 22; 0 sends it uncompressed."""
    rounding: str = "nearest"
    """``nearest``, or ``stochastic`` (unbiased: the expected value is the input)."""

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"wire codec must be one of {', '.join(CODECS)}; got {self.codec!r}")
        if not MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE or self.block_size % 2:
            raise ValueError(
                f"wire block_size must be an even number from {MIN_BLOCK_SIZE} to "
                f"{MAX_BLOCK_SIZE} (64 is a good default); got {self.block_size}"
            )
        if not 0 <= self.zstd_level <= MAX_ZSTD_LEVEL:
            raise ValueError(
                f"wire zstd_level must be 0 (no compression) to {MAX_ZSTD_LEVEL}; "
                f"got {self.zstd_level}"
            )
        if self.rounding not in ROUNDINGS:
            raise ValueError(
                f"wire rounding must be one of {', '.join(ROUNDINGS)}; got {self.rounding!r}"
            )


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed-size header of a payload, as read by :func:`read_header`."""

    codec: str
    compressed: bool
    block_size: int
    numel: int
    body_len: int
    crc32: int


def raw_body_len(codec: str, numel: int, block_size: int) -> int:
    """Length of the uncompressed body: fp32 scales (fp4, int8), then the codes."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    scales = num_blocks(numel, block_size) * _SCALE_BYTES if codec in ("fp4", "int8") else 0
    return scales + codes_len(codec, numel) * _CODE_DTYPES[codec].itemsize


def max_encoded_size(numel: int, fmt: WireFormat) -> int:
    """An upper bound on ``len(encode(x, fmt))`` for ``numel`` values, for transport limits.

    zstd can only make incompressible data slightly larger; the bound is zstd's own
    ``ZSTD_COMPRESSBOUND``.
    """
    body = raw_body_len(fmt.codec, numel, fmt.block_size)
    return HEADER_SIZE + (_zstd_bound(body) if fmt.zstd_level else body)


def encode(x: torch.Tensor, fmt: WireFormat, *, generator: torch.Generator | None = None) -> bytes:
    """Quantize the 1-D float32 ``x`` as ``fmt`` says and pack it into one payload.

    ``generator`` feeds stochastic rounding. Raises ``ValueError`` for non-finite values
    (a peer must not send them) or a tensor too large for one payload.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    body_len = raw_body_len(fmt.codec, x.numel(), fmt.block_size)
    if body_len > MAX_BODY_LEN:
        raise ValueError(
            f"{x.numel()} values make a {body_len}-byte body, over the {MAX_BODY_LEN}-byte "
            "limit of one payload; send the tensor in parts"
        )
    q = quantize(
        x, fmt.codec, block_size=fmt.block_size, rounding=fmt.rounding, generator=generator
    )
    # Views of the tensors' memory, not copies: the only copy of the body is the final join.
    parts: list[bytes | memoryview] = [_le_bytes(q.scales)] if q.scales is not None else []
    parts.append(_le_bytes(q.codes))
    flags = 0
    if fmt.zstd_level:
        # Streamed part by part; ``size`` puts the content size in the frame header,
        # which decode requires to equal body_len.
        zobj = _compressor(fmt.zstd_level).compressobj(size=body_len)
        parts = [*(zobj.compress(part) for part in parts), zobj.flush()]
        flags |= FLAG_ZSTD
    prefix = _HEADER.pack(
        MAGIC, VERSION, CODEC_IDS[fmt.codec], flags, 0, fmt.block_size, q.numel, body_len, 0
    )[:_CRC_OFFSET]
    crc = zlib.crc32(prefix)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([prefix, struct.pack("<I", crc), *parts])


def read_header(payload: bytes | bytearray | memoryview, *, max_numel: int = 1 << 31) -> Header:
    """Parse and check the header alone: every field known, valid and self-consistent.

    Cheap (no checksum, no decompression), so a receiver can refuse a payload of the wrong
    size or codec before reading the rest of it.
    """
    view = _byte_view(payload)
    if len(view) < HEADER_SIZE:
        raise CodecError(f"payload of {len(view)} bytes is shorter than the header")
    magic, version, codec_id, flags, reserved, block_size, numel, body_len, crc = (
        _HEADER.unpack_from(view)
    )
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a locod payload")
    if version != VERSION:
        raise CodecError(f"unsupported payload version {version}, this peer reads {VERSION}")
    codec = _CODEC_NAMES.get(codec_id)
    if codec is None:
        raise CodecError(f"unknown codec id {codec_id}")
    if flags & ~FLAG_ZSTD:
        raise CodecError(f"unknown flag bits {flags:#04x}")
    if reserved:
        raise CodecError(f"reserved byte is {reserved}, must be 0")
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % 2:
        raise CodecError(f"invalid block_size {block_size}")
    if numel > max_numel:
        raise CodecError(f"numel {numel} exceeds the limit of {max_numel}")
    expected_len = raw_body_len(codec, numel, block_size)
    if body_len != expected_len:
        raise CodecError(
            f"body_len {body_len} does not match {expected_len} for {numel} {codec} values "
            f"in blocks of {block_size}"
        )
    return Header(codec, bool(flags & FLAG_ZSTD), block_size, numel, body_len, crc)


def decode(
    payload: bytes | bytearray | memoryview,
    *,
    expected_numel: int | None = None,
    expected_codec: str | None = None,
    max_numel: int = 1 << 31,
) -> torch.Tensor:
    """The float32 values in ``payload``, or :class:`CodecError` saying why not.

    ``expected_numel`` and ``expected_codec`` are what the round agreed on; a payload
    that disagrees is refused, however well-formed. Every returned value is finite.
    """
    if expected_codec is not None and expected_codec not in CODECS:
        raise ValueError(f"expected_codec must be one of {CODECS}, got {expected_codec!r}")
    header = read_header(payload, max_numel=max_numel)
    if expected_numel is not None and header.numel != expected_numel:
        raise CodecError(f"payload holds {header.numel} values, expected {expected_numel}")
    if expected_codec is not None and header.codec != expected_codec:
        raise CodecError(f"payload codec is {header.codec}, expected {expected_codec}")
    view = _byte_view(payload)
    transmitted = view[HEADER_SIZE:]
    if header.compressed:
        if len(transmitted) > _zstd_bound(header.body_len):
            raise CodecError(
                f"{len(transmitted)} compressed bytes is more than any zstd frame of "
                f"{header.body_len} bytes takes"
            )
    elif len(transmitted) != header.body_len:
        raise CodecError(f"body is {len(transmitted)} bytes, header says {header.body_len}")
    crc = zlib.crc32(transmitted, zlib.crc32(view[:_CRC_OFFSET]))
    if crc != header.crc32:
        raise CodecError(
            f"checksum mismatch: payload has {header.crc32:#010x}, bytes give {crc:#010x}"
        )
    body = (
        _decompress(transmitted, header.body_len) if header.compressed else bytearray(transmitted)
    )
    q = _unpack(header, body)
    if q.scales is not None and q.numel:
        low, high = torch.aminmax(q.scales)
        if not (float(low) >= 0 and math.isfinite(float(high))):
            raise CodecError("a block scale is negative, NaN or Inf")
    if header.codec == "int8" and q.numel and int(q.codes.min()) == -128:
        raise CodecError("int8 code -128 is outside the format's symmetric range")
    # fp32 codes already sit in memory of their own (the body buffer): no second copy.
    values = q.codes if header.codec == "fp32" else dequantize(q)
    if values.numel():
        low, high = torch.aminmax(values)  # NaN anywhere makes both NaN
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            raise CodecError("payload decodes to NaN or Inf")
    return values


# --- helpers --------------------------------------------------------------------------

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level`` (zstd contexts must not be shared)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        # The content size goes in the frame header: decode requires it to equal body_len.
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def _zstd_bound(n: int) -> int:
    """ZSTD_COMPRESSBOUND(n): the largest frame zstd's one-shot compressor makes of n bytes."""
    small = ((128 << 10) - n) >> 11 if n < 128 << 10 else 0
    return n + (n >> 8) + small


def _decompress(frame: memoryview, body_len: int) -> bytearray:
    """Exactly one zstd frame that declares, and holds, exactly ``body_len`` bytes.

    The one-shot ``decompress(max_output_size=...)`` trusts a size declared in the frame
    header over its limit and ignores trailing bytes, so it is not used. Here the
    declared size must equal ``body_len`` (already checked against the header), which
    bounds the output buffer; libzstd refuses a frame that decodes to more than it
    declares; and anything after the frame is refused.
    """
    try:
        params = zstandard.get_frame_parameters(frame)
        if params.content_size != body_len:
            raise CodecError(
                f"zstd frame declares {params.content_size} bytes, header says {body_len}"
            )
        if params.dict_id:
            raise CodecError("zstd frame needs a dictionary")
        dobj = _decompressor().decompressobj()
        out = dobj.decompress(frame)
        if not dobj.eof:
            raise CodecError("zstd frame is truncated")
        if dobj.unused_data:
            raise CodecError(f"{len(dobj.unused_data)} bytes follow the zstd frame")
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd: {e}") from e
    if len(out) != body_len:
        raise CodecError(f"zstd frame holds {len(out)} bytes, header says {body_len}")
    return bytearray(out)


def _unpack(header: Header, body: bytearray) -> Quantized:
    """Split the body into scales and codes (its length was checked to match)."""
    n = header.numel
    dtype = _CODE_DTYPES[header.codec]
    scales: torch.Tensor | None = None
    offset = 0
    if header.codec in ("fp4", "int8"):
        nb = num_blocks(n, header.block_size)
        scales = _from_le(body, torch.float32, nb, 0)
        offset = nb * _SCALE_BYTES
    codes = _from_le(body, dtype, codes_len(header.codec, n), offset)
    return Quantized(header.codec, n, header.block_size, codes, scales)


_BIG_ENDIAN = sys.byteorder == "big"


def _byte_view(payload: bytes | bytearray | memoryview) -> memoryview:
    """``payload`` as a flat memoryview of bytes, or CodecError for anything else."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    try:
        return memoryview(payload).cast("B")
    except TypeError as e:  # a strided or multi-dimensional view
        raise CodecError(f"payload must be contiguous bytes: {e}") from e


def _le_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian bytes, without a copy where possible."""
    raw = t.contiguous().view(torch.uint8)
    if _BIG_ENDIAN and t.element_size() > 1:
        raw = raw.view(-1, t.element_size()).flip(1).reshape(-1)
    return raw.numpy().data


def _from_le(buf: bytearray, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """``count`` little-endian elements of ``dtype`` at byte ``offset`` of ``buf``."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    itemsize = dtype.itemsize
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=count * itemsize, offset=offset)
    if _BIG_ENDIAN and itemsize > 1:
        raw = raw.view(-1, itemsize).flip(1).reshape(-1)
    return raw.view(dtype)
