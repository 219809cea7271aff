"""Packing (peer/codec.py): round trips, the header, and hostile bytes.

Payloads are built here with ``struct`` and ``zlib`` directly rather than with the
codec's own helpers, so these tests pin the wire format as documented, and can forge
payloads whose checksum is valid but whose contents are not.
"""

from __future__ import annotations

import math
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from locod.peer.codec import (
    HEADER_SIZE,
    CodecError,
    WireFormat,
    decode,
    encode,
    max_encoded_size,
    raw_body_len,
    read_header,
)
from locod.peer.quantize import CODECS, ROUNDINGS, dequantize, quantize

CODEC_IDS = {"fp4": 1, "int8": 2, "bf16": 3, "fp32": 4}
_PREFIX = struct.Struct("<2sBBBBIQI")  # the header up to, not including, the crc32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _frame(
    *,
    codec_id: int,
    block_size: int,
    numel: int,
    body_len: int,
    transmitted: bytes,
    flags: int = 0,
    reserved: int = 0,
    magic: bytes = b"LQ",
    version: int = 1,
) -> bytes:
    """A payload with any header fields and a valid checksum over header and body."""
    prefix = _PREFIX.pack(magic, version, codec_id, flags, reserved, block_size, numel, body_len)
    crc = zlib.crc32(transmitted, zlib.crc32(prefix))
    return prefix + struct.pack("<I", crc) + transmitted


def _fields(payload: bytes) -> dict[str, object]:
    magic, version, codec_id, flags, reserved, block_size, numel, body_len = _PREFIX.unpack_from(
        payload
    )
    return {
        "magic": magic,
        "version": version,
        "codec_id": codec_id,
        "flags": flags,
        "reserved": reserved,
        "block_size": block_size,
        "numel": numel,
        "body_len": body_len,
        "transmitted": payload[HEADER_SIZE:],
    }


def _reframe(payload: bytes, **changes: object) -> bytes:
    """``payload`` with some header fields (or the body) replaced and the crc recomputed."""
    fields = _fields(payload)
    fields.update(changes)
    return _frame(**fields)  # type: ignore[arg-type]


def _body(payload: bytes) -> bytes:
    """The uncompressed body of a valid payload."""
    f = _fields(payload)
    transmitted = f["transmitted"]
    assert isinstance(transmitted, bytes)
    if f["flags"]:
        return zstandard.ZstdDecompressor().decompress(transmitted)
    return transmitted


def _with_body(payload: bytes, body: bytes) -> bytes:
    """``payload`` carrying ``body`` instead (uncompressed), with a valid crc."""
    return _reframe(payload, flags=0, transmitted=body, body_len=len(body))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("zstd_level", [0, 3])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 1001])
def test_round_trip_matches_the_maths_bit_for_bit(
    codec: str, zstd_level: int, rounding: str, n: int
) -> None:
    x = torch.randn(n, generator=_gen(n)) * 10.0 ** torch.randint(-30, 30, (n,), generator=_gen(1))
    fmt = WireFormat(codec=codec, block_size=64, zstd_level=zstd_level, rounding=rounding)
    payload = encode(x, fmt, generator=_gen(9))
    decoded = decode(payload, expected_numel=n, expected_codec=codec)
    q = quantize(x, codec, block_size=64, rounding=rounding, generator=_gen(9))
    assert _same_bits(decoded, dequantize(q))
    assert len(payload) <= max_encoded_size(n, fmt)


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=200),
    codec=st.sampled_from(CODECS),
    block_size=st.sampled_from([2, 4, 64, 65536]),
    zstd_level=st.sampled_from([0, 1, 19]),
)
def test_round_trip_any_values(
    values: list[float], codec: str, block_size: int, zstd_level: int
) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    fmt = WireFormat(codec=codec, block_size=block_size, zstd_level=zstd_level)
    decoded = decode(encode(x, fmt))
    assert _same_bits(decoded, dequantize(quantize(x, codec, block_size=block_size)))


def test_fp32_is_exact() -> None:
    x = torch.randn(1000) * 1e-20
    x[::7] = -0.0
    assert _same_bits(decode(encode(x, WireFormat(codec="fp32"))), x)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    x = torch.randn(100)
    payload = encode(x, WireFormat())
    expected = decode(payload)
    assert torch.equal(decode(bytearray(payload)), expected)
    assert torch.equal(decode(memoryview(payload)), expected)
    # A view into a larger buffer, as a receiver that reassembles chunks might hold.
    assert torch.equal(decode(memoryview(b"xx" + payload)[2:]), expected)


def test_round_trip_from_many_threads() -> None:
    """encode/decode keep per-thread zstd contexts; concurrent use must agree with serial."""
    fmt = WireFormat(zstd_level=3)
    inputs = [torch.randn(5000, generator=_gen(i)) for i in range(16)]
    serial = [decode(encode(x, fmt)) for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda x: decode(encode(x, fmt)), inputs))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_encode_refuses_non_finite() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode(torch.tensor([1.0, math.nan]), WireFormat())


# --- header ---------------------------------------------------------------------------


def test_header_of_a_hand_computed_payload() -> None:
    """tests/test_quantize.py works out these codes by hand: scales [1.0, 3.0],
    codes 0xD7 0x03 0x67. The body is 2 scales × 4 bytes + 3 code bytes = 11 bytes."""
    x = torch.tensor([1.0, -0.3, 0.05, 0.0, 3.0, 1.6])
    payload = encode(x, WireFormat(codec="fp4", block_size=4, zstd_level=0))
    prefix = (
        b"LQ"
        + bytes([1, 1, 0, 0])  # version 1, codec fp4, no flags, reserved
        + (4).to_bytes(4, "little")  # block_size
        + (6).to_bytes(8, "little")  # numel
        + (11).to_bytes(4, "little")  # body_len
    )
    body = struct.pack("<ff", 1.0, 3.0) + bytes([0xD7, 0x03, 0x67])
    crc = zlib.crc32(prefix + body).to_bytes(4, "little")
    assert payload == prefix + crc + body
    header = read_header(payload)
    assert (header.codec, header.compressed, header.block_size) == ("fp4", False, 4)
    assert (header.numel, header.body_len) == (6, 11)
    assert decode(payload).tolist() == [1.0, -0.25, 0.0625, 0.0, 3.0, 1.5]


@pytest.mark.parametrize("codec", CODECS)
def test_header_fields(codec: str) -> None:
    n = 1000
    payload = encode(torch.randn(n), WireFormat(codec=codec, block_size=128, zstd_level=5))
    f = _fields(payload)
    assert f["magic"] == b"LQ"
    assert f["version"] == 1
    assert f["codec_id"] == CODEC_IDS[codec]
    assert f["flags"] == 1
    assert f["reserved"] == 0
    assert f["block_size"] == 128
    assert f["numel"] == n
    assert f["body_len"] == raw_body_len(codec, n, 128) == len(_body(payload))
    expected = {"fp4": 8 * 4 + 500, "int8": 8 * 4 + 1000, "bf16": 2000, "fp32": 4000}
    assert raw_body_len(codec, n, 128) == expected[codec]


def test_wire_format_validation_says_how_to_fix() -> None:
    with pytest.raises(ValueError, match="fp4"):
        WireFormat(codec="fp8")
    for bad in (0, 1, 3, 65537, 65538, -2):
        with pytest.raises(ValueError, match="even number from 2 to 65536"):
            WireFormat(block_size=bad)
    for bad in (-1, 23):
        with pytest.raises(ValueError, match="0 \\(no compression\\) to 22"):
            WireFormat(zstd_level=bad)
    with pytest.raises(ValueError, match="nearest, stochastic"):
        WireFormat(rounding="up")
    WireFormat(codec="int8", block_size=2, zstd_level=22, rounding="stochastic")


# --- garbage --------------------------------------------------------------------------


def _rejects(payload: bytes | bytearray, **kwargs: object) -> CodecError:
    """decode must raise CodecError, and nothing else, and never return."""
    try:
        result = decode(payload, **kwargs)  # type: ignore[arg-type]
    except CodecError as e:
        return e
    raise AssertionError(f"decode accepted a bad payload and returned {result!r}")


SMALL = torch.tensor([0.5, -1.0, 3.0, 1e-3, 0.0, -7.0, 2.0, 0.25, -0.125, 9.0, 1.0])
SMALL_PAYLOADS = {
    f"{codec}-zstd{level}": encode(SMALL, WireFormat(codec=codec, block_size=4, zstd_level=level))
    for codec in CODECS
    for level in (0, 3)
}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_rejected(data: bytes) -> None:
    _rejects(data)


@settings(max_examples=200, deadline=None)
@given(prefix=st.sampled_from(sorted(SMALL_PAYLOADS)), cut=st.integers(0, 26), tail=st.binary())
def test_valid_header_start_with_random_rest_is_rejected(
    prefix: str, cut: int, tail: bytes
) -> None:
    payload = SMALL_PAYLOADS[prefix]
    forged = payload[:cut] + tail
    if forged != payload:
        _rejects(forged)


@pytest.mark.parametrize("name", sorted(SMALL_PAYLOADS))
def test_every_truncation_is_rejected(name: str) -> None:
    payload = SMALL_PAYLOADS[name]
    decode(payload)
    for length in range(len(payload)):
        _rejects(payload[:length])


@pytest.mark.parametrize("name", sorted(SMALL_PAYLOADS))
def test_every_single_bit_flip_is_rejected(name: str) -> None:
    payload = SMALL_PAYLOADS[name]
    for bit in range(len(payload) * 8):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        _rejects(flipped)


@pytest.mark.parametrize("name", sorted(SMALL_PAYLOADS))
def test_oversized_payloads_are_rejected(name: str) -> None:
    payload = SMALL_PAYLOADS[name]
    _rejects(payload + b"\x00")
    # Extra bytes after the body, even with a checksum that covers them.
    e = _rejects(_reframe(payload, transmitted=payload[HEADER_SIZE:] + b"\x00" * 9))
    assert "follow the zstd frame" in str(e) or "header says" in str(e)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(SMALL_PAYLOADS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_forged_payloads_with_valid_checksum_never_crash(
    name: str, edits: list[tuple[int, int]]
) -> None:
    """Overwrite a few bytes anywhere, then fix the checksum, as a forger would: decode
    either refuses with CodecError or returns finite float32 values, as many as the
    header says. No other exception, ever."""
    forged = bytearray(SMALL_PAYLOADS[name])
    for position, value in edits:
        forged[position % len(forged)] = value
    forged_bytes = _reframe(bytes(forged))
    try:
        values = decode(forged_bytes)
    except CodecError:
        return
    assert values.dtype == torch.float32
    assert values.numel() == _fields(forged_bytes)["numel"]
    assert bool(torch.isfinite(values).all())


def test_mutated_header_fields_are_rejected() -> None:
    payload = encode(SMALL, WireFormat(codec="fp4", block_size=4, zstd_level=3))
    cases: dict[str, tuple[dict[str, object], str]] = {
        "magic": ({"magic": b"QL"}, "magic"),
        "version": ({"version": 2}, "version"),
        "codec 0": ({"codec_id": 0}, "unknown codec"),
        "codec 5": ({"codec_id": 5}, "unknown codec"),
        "codec 255": ({"codec_id": 255}, "unknown codec"),
        "flag bit 1": ({"flags": 3}, "flag"),
        "flag bit 7": ({"flags": 0x80}, "flag"),
        "reserved": ({"reserved": 1}, "reserved"),
        "block_size 0": ({"block_size": 0}, "block_size"),
        "block_size odd": ({"block_size": 5}, "block_size"),
        "block_size huge": ({"block_size": 2**32 - 2}, "block_size"),
        "numel 2^64-1": ({"numel": 2**64 - 1}, "exceeds"),
        "numel 2^40": ({"numel": 2**40}, "exceeds"),
        # 11 -> 12 would still fit the body (the padding nibble becomes a value): only
        # expected_numel can catch that. 13 needs a fourth block.
        "numel changed": ({"numel": 13}, "body_len"),
        "body_len short": ({"body_len": 17}, "body_len"),
        "body_len long": ({"body_len": 2**32 - 1}, "body_len"),
        "codec changed": ({"codec_id": CODEC_IDS["int8"]}, "body_len"),
        "not compressed": ({"flags": 0}, "header says"),
    }
    for name, (changes, message) in cases.items():
        e = _rejects(_reframe(payload, **changes))
        assert message in str(e), (name, str(e))


def test_numel_is_checked_against_the_limit_before_anything_is_allocated() -> None:
    payload = encode(torch.randn(100), WireFormat(zstd_level=0))
    _rejects(payload, max_numel=99)
    decode(payload, max_numel=100)


def test_expected_numel_and_codec() -> None:
    payload = encode(torch.randn(100), WireFormat(codec="int8"))
    decode(payload, expected_numel=100, expected_codec="int8")
    assert "expected 101" in str(_rejects(payload, expected_numel=101))
    assert "expected fp4" in str(_rejects(payload, expected_codec="fp4"))
    with pytest.raises(ValueError, match="expected_codec"):
        decode(payload, expected_codec="fp8")


def test_non_bytes_payload_is_rejected() -> None:
    _rejects("LQ" * 20)  # type: ignore[arg-type]
    _rejects(None)  # type: ignore[arg-type]


# --- zstd -----------------------------------------------------------------------------


def _fp32_payload(n: int) -> bytes:
    return encode(torch.ones(n), WireFormat(codec="fp32", zstd_level=3))


def test_zstd_bomb_is_rejected() -> None:
    """A header promising 400 bytes with a frame that inflates to far more."""
    payload = _fp32_payload(100)
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\x00" * 100_000)
    assert len(bomb) < 103  # small enough to pass the size bound on the compressed bytes
    e = _rejects(_reframe(payload, transmitted=bomb))
    assert "declares 100000" in str(e)
    # The same with a frame that does not declare its size.
    quiet = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"\0" * 100_000)
    _rejects(_reframe(payload, transmitted=quiet))
    # A big frame is refused by its size alone.
    noise = torch.randint(0, 256, (1000,), generator=_gen(0), dtype=torch.uint8)
    big = zstandard.ZstdCompressor(level=3).compress(noise.numpy().tobytes())
    assert "more than any zstd frame" in str(_rejects(_reframe(payload, transmitted=big)))


def test_zstd_frame_that_lies_about_its_size_is_rejected() -> None:
    """A frame whose header claims exactly body_len bytes but whose blocks hold more."""
    payload = _fp32_payload(100)
    frame = bytearray(zstandard.ZstdCompressor(level=3).compress(b"\x01" * 1_000_000))
    descriptor = frame[4]
    assert descriptor >> 6 == 2, "expected a 4-byte content size field"
    offset = 5 + (0 if descriptor & 0x20 else 1) + [0, 1, 2, 4][descriptor & 3]
    frame[offset : offset + 4] = struct.pack("<I", 400)
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == 400
    assert "zstd:" in str(_rejects(_reframe(payload, transmitted=bytes(frame))))


def test_zstd_frame_without_declared_size_is_rejected() -> None:
    payload = _fp32_payload(100)
    body = _body(payload)
    quiet = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(body)
    assert "declares" in str(_rejects(_reframe(payload, transmitted=quiet)))


def test_two_zstd_frames_are_rejected() -> None:
    payload = _fp32_payload(100)
    body = _body(payload)
    c = zstandard.ZstdCompressor(level=3)
    two = c.compress(body[:200]) + c.compress(body[200:])
    _rejects(_reframe(payload, transmitted=two))
    whole = c.compress(body)
    _rejects(_reframe(payload, transmitted=whole + whole))
    decode(_reframe(payload, transmitted=whole))


# --- values that must not get through -------------------------------------------------


@pytest.mark.parametrize("level", [0, 3])
def test_nan_smuggled_in_fp32_body_is_rejected(level: int) -> None:
    payload = encode(torch.ones(10), WireFormat(codec="fp32", zstd_level=level))
    for bad in (math.nan, math.inf, -math.inf):
        body = bytearray(_body(payload))
        body[12:16] = struct.pack("<f", bad)
        forged = _with_body(payload, bytes(body))
        if level:
            forged = _reframe(
                forged, flags=1, transmitted=zstandard.ZstdCompressor().compress(bytes(body))
            )
        assert "NaN or Inf" in str(_rejects(forged))


def test_bad_scales_are_rejected() -> None:
    for codec in ("fp4", "int8"):
        payload = encode(SMALL, WireFormat(codec=codec, block_size=4, zstd_level=0))
        for bad in (math.nan, math.inf, -1.0, -math.inf):
            body = bytearray(_body(payload))
            body[4:8] = struct.pack("<f", bad)  # the second block's scale
            assert "scale" in str(_rejects(_with_body(payload, bytes(body))))


def test_int8_minus_128_is_rejected() -> None:
    payload = encode(SMALL, WireFormat(codec="int8", block_size=4, zstd_level=0))
    body = bytearray(_body(payload))
    body[3 * 4 + 5] = 0x80  # codes start after 3 scales
    assert "-128" in str(_rejects(_with_body(payload, bytes(body))))


def test_int8_overflow_to_inf_is_rejected() -> None:
    """A finite scale near float32's maximum times a large code overflows."""
    payload = encode(SMALL, WireFormat(codec="int8", block_size=4, zstd_level=0))
    body = bytearray(_body(payload))
    body[0:4] = struct.pack("<f", 3e38)
    assert "NaN or Inf" in str(_rejects(_with_body(payload, bytes(body))))


def test_bf16_inf_and_nan_are_rejected() -> None:
    payload = encode(SMALL, WireFormat(codec="bf16", zstd_level=0))
    for bits in (0x7F80, 0xFF80, 0x7FC0, 0x7F81):
        body = bytearray(_body(payload))
        body[2:4] = struct.pack("<H", bits)
        assert "NaN or Inf" in str(_rejects(_with_body(payload, bytes(body))))


def test_empty_payload_round_trip_and_forgery() -> None:
    for codec in CODECS:
        payload = encode(torch.zeros(0), WireFormat(codec=codec))
        assert decode(payload).shape == (0,)
        _rejects(_reframe(payload, transmitted=b""))  # flag says zstd, no frame
