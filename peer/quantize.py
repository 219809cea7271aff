"""The maths of the wire formats: a float32 vector in, codes and scales out, and back.

Outer gradients travel as **FP4 E3M0** (DESIGN §1): 1 sign bit and 3 exponent bits, no
mantissa, so every value is ±scale·2^-k. One fp32 scale per block of ``block_size`` values
is the block's largest magnitude, which the format then represents exactly. int8, bf16 and
fp32 are offered too so the paper's ablation can be repeated.

This module only computes; it never builds bytes. :mod:`peer.codec` packs a
:class:`Quantized` into a framed payload and checks untrusted input. Keeping the two apart
lets the tests hold the maths to its error bounds (:func:`error_bound`) and the packing to
round trips and garbage, separately (STYLE: "Split a codec into maths and packing").

Formats (``numel`` values, ``nb = ceil(numel / block_size)`` blocks):

* ``fp4`` — ``scales``: ``nb`` fp32, the block's max |x|. ``codes``: uint8, two 4-bit codes
  per byte, element 2i in the low nibble and 2i+1 in the high one, ``ceil(numel / 2)`` bytes.
  A nibble is ``sign << 3 | c``; magnitude code ``c = 0`` is 0 and ``c = k ≥ 1`` is
  ``scale·2^(k-7)``, i.e. the levels 0, scale·2^-6, …, scale·2^0. The encoder never sets the
  sign of a zero.
* ``int8`` — ``scales``: ``nb`` fp32, about max |x| / 127; ``codes``: int8 in [-127, 127]
  (-128 is never emitted, so the format is symmetric).
* ``bf16`` — ``codes``: bfloat16; no scales. Values beyond bf16's range are clamped to its
  largest finite value (fp32 has a slightly larger range) instead of becoming Inf.
* ``fp32`` — ``codes``: the values themselves; no scales. Exact.

Rounding is ``nearest`` or ``stochastic``. Stochastic rounding picks one of the two
neighbouring representable values with the probabilities that make the expected value
exactly the input, so averaging many peers' quantized gradients does not accumulate a
bias. It draws from ``generator`` (or torch's global generator), hence is deterministic
given the generator's seed. fp32 is exact under both.

Every function works on whole tensors at once; there is no Python loop over elements.
The fp4 quantizer reads exponents and mantissas straight from the float32 bit patterns
and looks nibbles up in small tables: exact, and a handful of passes over memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

CODECS = ("fp4", "int8", "bf16", "fp32")
"""The wire formats, cheapest first."""

ROUNDINGS = ("nearest", "stochastic")
"""How a value between two representable ones is rounded."""

FP4_LEVELS = 7
"""Non-zero magnitude codes of FP4 E3M0: scale·2^-6 … scale·2^0."""

_INT8_MAX = 127
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)
_BF16_MAX_BITS = 0x7F7F0000  # bit pattern of _BF16_MAX as float32

# Error slack (see error_bound): relative, for the fp32 division and products inside the
# quantizers, and absolute, for results that land among fp32/bf16 subnormals, whose spacing
# is absolute. 2^-133 is bf16's subnormal spacing, about 9e-41: nothing a gradient notices.
_REL_SLACK = 2.0**-14
_ABS_SLACK = 2.0**-133


@dataclass(frozen=True, slots=True)
class Quantized:
    """A vector in one of the wire formats; see the module docstring for the layouts.

    It never shares memory with the tensor it was made from, so the caller may go on
    changing its parameters while the codes wait to be packed.
    """

    codec: str
    """One of :data:`CODECS`."""
    numel: int
    """Number of values represented (the codes of ``fp4`` may carry one nibble of padding)."""
    block_size: int
    """Values per scale (``fp4`` and ``int8``); carried but unused by ``bf16`` and ``fp32``."""
    codes: torch.Tensor
    """uint8 (fp4, packed), int8, bfloat16 or float32, 1-D."""
    scales: torch.Tensor | None
    """float32 per block (fp4, int8), else None."""


def num_blocks(numel: int, block_size: int) -> int:
    """Number of scales that ``numel`` values need (the last block may be partial)."""
    return -(-numel // block_size)


def codes_len(codec: str, numel: int) -> int:
    """Number of elements of ``Quantized.codes`` for ``numel`` values."""
    _check_codec(codec)
    return (numel + 1) // 2 if codec == "fp4" else numel


def quantize(
    x: torch.Tensor,
    codec: str,
    *,
    block_size: int = 64,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> Quantized:
    """Quantize the 1-D float32 tensor ``x`` to ``codec``.

    Raises ``ValueError`` if ``x`` holds NaN or ±Inf: a peer must never send those, and
    quantizing them would hide the fault inside a plausible-looking scale.
    """
    _check_codec(codec)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    x = _check_input(x)
    stochastic = rounding == "stochastic"
    if codec in ("bf16", "fp32"):
        _check_finite(x)
    if codec == "fp4":
        return _quantize_fp4(x, block_size, stochastic, generator)
    if codec == "int8":
        return _quantize_int8(x, block_size, stochastic, generator)
    if codec == "bf16":
        codes = _to_bf16_stochastic(x, generator) if stochastic else _to_bf16_nearest(x)
        return Quantized("bf16", x.numel(), block_size, codes, None)
    return Quantized("fp32", x.numel(), block_size, x.clone(), None)


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 values that ``q`` represents, in a new tensor of length ``q.numel``."""
    _check_quantized(q)
    if q.codec == "fp4":
        return _dequantize_fp4(q)
    if q.codec == "int8":
        return _dequantize_int8(q)
    return q.codes.to(torch.float32, copy=True)


def error_bound(
    x: torch.Tensor, codec: str, block_size: int = 64, rounding: str = "nearest"
) -> torch.Tensor:
    """Per-element bound on ``|dequantize(quantize(x)) - x|`` that the format promises.

    With ``s`` the block's scale (fp4: the block's max |x|; int8: about max |x| / 127):

    * fp4, nearest: ``max(|x|/3, s·2^-7)``. Between two levels L and 2L the worst case is
      the midpoint 1.5·L, off by L/2 = |x|/3; below s·2^-6 the levels are 0 and s·2^-6.
    * fp4, stochastic: ``max(|x|, s·2^-6)``. The result is one of the two neighbours L and
      2L of ``x`` (or 0 and s·2^-6 below), at most L < |x| away; this is the supremum.
    * int8: ``s/2`` (nearest) or ``s`` (stochastic).
    * bf16: ``|x|·2^-8`` (nearest, half a unit in the last place) or ``|x|·2^-7``
      (stochastic, one unit).
    * fp32: 0.

    A relative slack of 2^-14 covers fp32 rounding inside the quantizer (the division by
    the scale, the product with it) and 2^-133 absolute covers subnormal results. The bound
    is returned as float64 so that adding slack to values near float32's maximum cannot
    overflow.
    """
    _check_codec(codec)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    x = _check_input(x)
    _check_finite(x)
    stochastic = rounding == "stochastic"
    mag = x.abs().double()
    if codec == "fp4":
        scale = _per_element(_absmax(_blocks(x, block_size)), block_size, x.numel()).double()
        if stochastic:
            core = torch.maximum(mag, scale * 2.0**-6)
        else:
            core = torch.maximum(mag / 3, scale * 2.0**-7)
    elif codec == "int8":
        scales = _int8_scales(_absmax(_blocks(x, block_size)))
        scale = _per_element(scales, block_size, x.numel()).double()
        core = scale if stochastic else scale / 2
    elif codec == "bf16":
        core = mag * (2.0**-7 if stochastic else 2.0**-8)
    else:
        return torch.zeros(x.numel(), dtype=torch.float64)
    return core * (1 + _REL_SLACK) + mag * _REL_SLACK + _ABS_SLACK


# --- checks ---------------------------------------------------------------------------


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"expected a 1-D tensor, got shape {tuple(x.shape)}; flatten it first")
    if x.dtype != torch.float32:
        raise ValueError(f"expected float32 values, got {x.dtype}; convert with .float()")
    return x.detach().contiguous()


def _check_finite(values: torch.Tensor) -> None:
    """Refuse NaN and ±Inf in one pass that allocates nothing: min and max propagate NaN."""
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise ValueError("refusing to quantize non-finite values (NaN or Inf)")


def _check_quantized(q: Quantized) -> None:
    """Shapes and dtypes must agree, so that a bug upstream fails here with a clear message."""
    _check_codec(q.codec)
    if q.numel < 0 or q.block_size < 1:
        raise ValueError(f"bad numel {q.numel} or block_size {q.block_size}")
    dtype = {
        "fp4": torch.uint8,
        "int8": torch.int8,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
    }[q.codec]
    if q.codes.dtype != dtype or q.codes.dim() != 1:
        raise ValueError(f"{q.codec} codes must be 1-D {dtype}, got {q.codes.dtype}")
    if q.codes.numel() != codes_len(q.codec, q.numel):
        raise ValueError(
            f"{q.codec} codes for {q.numel} values must have {codes_len(q.codec, q.numel)} "
            f"elements, got {q.codes.numel()}"
        )
    if q.codec in ("fp4", "int8"):
        nb = num_blocks(q.numel, q.block_size)
        if q.scales is None or q.scales.dtype != torch.float32 or q.scales.shape != (nb,):
            raise ValueError(f"{q.codec} needs {nb} float32 scales")
    elif q.scales is not None:
        raise ValueError(f"{q.codec} has no scales")


def _scales_of(q: Quantized) -> torch.Tensor:
    if q.scales is None:
        raise ValueError(f"{q.codec} needs scales")
    return q.scales


# --- blocks ---------------------------------------------------------------------------


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` zero-padded to whole blocks, as a (blocks, block_size) matrix."""
    n = x.numel()
    nb = num_blocks(n, block_size)
    if nb * block_size == n:
        return x.view(nb, block_size)
    padded = torch.zeros(nb * block_size, dtype=x.dtype, device=x.device)
    padded[:n] = x
    return padded.view(nb, block_size)


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| per block (row), refusing NaN and Inf on the way.

    ``aminmax`` reads the blocks once and allocates nothing their size; NaN or Inf
    anywhere in a block shows in its min or max, so the finiteness check costs one
    pass over the (64 times smaller) per-block results.
    """
    if blocks.numel() == 0:
        return torch.zeros(0, dtype=blocks.dtype, device=blocks.device)
    low, high = torch.aminmax(blocks, dim=1)
    _check_finite(torch.stack([low, high]))
    return torch.maximum(high, low.neg_())


def _per_element(per_block: torch.Tensor, block_size: int, numel: int) -> torch.Tensor:
    return per_block.repeat_interleave(block_size)[:numel]


def _divide_by_scales(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """blocks / scale, in a new tensor, with all-zero blocks (scale 0) left at 0.

    Values are divided by the scale rather than multiplied by its reciprocal: the
    reciprocal of a subnormal scale overflows to Inf, the quotient never does.
    """
    return blocks / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]


def _scale_rows_(values: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """Multiply ``values`` (flat, any length up to the padded one) in place, block by block."""
    n = values.numel()
    full = n // block_size
    if full:
        values[: full * block_size].view(full, block_size).mul_(scales[:full, None])
    if n > full * block_size:
        values[full * block_size :].mul_(scales[full])
    return values


_CHUNK = 1 << 20
"""Values per pass of the quantizers (4 MB of float32). Whole-tensor temporaries would
each be a fresh allocation as large as the input, several at once (a 1 GB fragment would
need gigabytes more); chunks keep the peak flat and the temporaries in cache. Much smaller
chunks (2^16) were no faster on an idle 2-core machine and several times slower on a busy
one: every torch op is an OpenMP parallel region that waits for any descheduled thread,
so fewer, larger ops degrade more gracefully."""


def _chunks(numel: int, block_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive pieces of whole blocks, each an even number of values
    (so fp4's two-per-byte packing never straddles two pieces)."""
    step = max(1, _CHUNK // block_size) * block_size
    step *= 2 if step % 2 else 1
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


# --- fp4 ------------------------------------------------------------------------------

_SIGN_MASK = -(1 << 31)  # bit 31 alone, as an int32
_MANTISSA_BITS = 23
_EXPONENT_BIAS = 127
_SMALLEST_LEVEL = 2.0 ** (1 - FP4_LEVELS)  # scale·2^-6, relative to the scale


def _nibble(negative: int, code: int) -> int:
    code = max(0, min(FP4_LEVELS, code))
    return code | (8 if negative and code else 0)


def _nearest_table() -> list[int]:
    """Nibble for each value of ``(bits(a) >> 22) & 0x3FF``: sign, biased exponent E and
    the mantissa's top bit m. a lies in [2^(E-127), 2^(E-126)); its nearest level in the
    linear domain is 2^(E-127) when m = 0 and the next power of two when m = 1 (the
    midpoint between L and 2L is 1.5·L). Below the smallest level 2^-6 the midpoint is
    2^-7 (E = 120): anything from there up to 2^-6 rounds to 2^-6. Ties go up."""
    table = []
    for index in range(1024):
        negative, exponent, top = index >> 9, (index >> 1) & 0xFF, index & 1
        code = exponent - _EXPONENT_BIAS + FP4_LEVELS + top
        table.append(_nibble(negative, max(code, 1) if exponent >= 120 else 0))
    return table


def _stochastic_table() -> list[int]:
    """Nibble for each ``sign << 9 | small << 8 | E'``, where E' is the biased exponent
    after the random carry (see :func:`_quantize_fp4`). For ``small`` values the input
    was shifted up by 2^-6 first, so E' = 121 means level 0 and E' = 122 means 2^-6."""
    table = []
    for index in range(1024):
        negative, small, exponent = index >> 9, (index >> 8) & 1, index & 0xFF
        if small:
            code = exponent - (_EXPONENT_BIAS - FP4_LEVELS + 1)
        else:
            code = exponent - _EXPONENT_BIAS + FP4_LEVELS
        table.append(_nibble(negative, code))
    return table


def _pair_table() -> list[list[float]]:
    """Both values of each code byte (low nibble first), relative to the scale.
    Nibble 8 (a zero with its sign set) is never emitted; it decodes to +0."""
    level = [0.0] + [2.0 ** (k - FP4_LEVELS) for k in range(1, FP4_LEVELS + 1)]
    value = level + [0.0] + [-v for v in level[1:]]
    return [[value[byte & 0x0F], value[byte >> 4]] for byte in range(256)]


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """A small lookup table, built once per device (dictionary writes are atomic)."""
    key = (name, device)
    if key not in _TABLES:
        if name == "pairs":
            _TABLES[key] = torch.tensor(_pair_table(), dtype=torch.float32, device=device)
        else:
            values = _nearest_table() if name == "nearest" else _stochastic_table()
            _TABLES[key] = torch.tensor(values, dtype=torch.uint8, device=device)
    return _TABLES[key]


def _quantize_fp4(
    x: torch.Tensor, block_size: int, stochastic: bool, generator: torch.Generator | None
) -> Quantized:
    n = x.numel()
    codes = torch.empty(codes_len("fp4", n), dtype=torch.uint8, device=x.device)
    scales = torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=x.device)
    for start, stop in _chunks(n, block_size):
        blocks = _blocks(x[start:stop], block_size)
        scale = _absmax(blocks)
        scales[start // block_size : start // block_size + scale.numel()] = scale
        # a in [-1, 1]: the division is correctly rounded and |x| <= scale, so |a| <= 1.
        a = _divide_by_scales(blocks, scale)
        nibbles = _fp4_stochastic_nibbles(a, generator) if stochastic else _fp4_nearest_nibbles(a)
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
        pairs = nibbles.view(-1, 2)
        packed = pairs[:, 1] << 4
        packed.bitwise_or_(pairs[:, 0])
        count = codes_len("fp4", stop - start)
        codes[start // 2 : start // 2 + count] = packed[:count]
    return Quantized("fp4", n, block_size, codes, scales)


def _fp4_nearest_nibbles(a: torch.Tensor) -> torch.Tensor:
    """Nibbles of ``a`` (in [-1, 1]; overwritten), by looking up sign, exponent and the
    mantissa's top bit: that bit says whether a lies above the midpoint 1.5·2^e."""
    index = a.view(torch.int32).bitwise_right_shift_(22).bitwise_and_(0x3FF)
    return torch.index_select(_table("nearest", a.device), 0, index.view(-1))


def _fp4_stochastic_nibbles(a: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Nibbles of ``a`` (in [-1, 1]; overwritten), rounded stochastically.

    Between neighbours L = 2^e and 2L, P(2L) = (|a| - L) / L, which is the mantissa
    fraction: adding a uniform 23-bit integer to the bit pattern carries into the exponent
    with exactly that probability. Below 2^-6 the neighbours are 0 and 2^-6 and
    P(2^-6) = |a| / 2^-6; shifting |a| up by 2^-6 first turns that into the same carry
    (the shift rounds |a| to a multiple of 2^-29, so P is exact to 2^-24).
    """
    bits = a.view(torch.int32)
    noise = torch.randint(
        0, 1 << _MANTISSA_BITS, a.shape, generator=generator, dtype=torch.int32, device=a.device
    )
    index = (bits >> 22).bitwise_and_(0x200)  # the sign, at bit 9
    a.abs_()
    small = a < _SMALLEST_LEVEL
    a.add_(small, alpha=_SMALLEST_LEVEL)
    bits.add_(noise).bitwise_right_shift_(_MANTISSA_BITS)  # the exponent, at most 127
    index.bitwise_or_(bits).bitwise_or_(small.to(torch.int32).bitwise_left_shift_(8))
    return torch.index_select(_table("stochastic", a.device), 0, index.view(-1))


def _dequantize_fp4(q: Quantized) -> torch.Tensor:
    scales = _scales_of(q)
    pairs_table = _table("pairs", q.codes.device)
    out = torch.empty(q.numel, dtype=torch.float32, device=q.codes.device)
    for start, stop in _chunks(q.numel, q.block_size):
        # One lookup per byte gives both of its values. Index with int32, not uint8: a
        # uint8 index tensor would be read as a boolean mask by other indexing functions.
        codes = q.codes[start // 2 : start // 2 + codes_len("fp4", stop - start)]
        pairs = torch.index_select(pairs_table, 0, codes.to(torch.int32))
        out[start:stop] = pairs.view(-1)[: stop - start]
        # A product with a power of two is exact (short of subnormals) and at most the
        # scale, so it cannot overflow.
        first = start // q.block_size
        _scale_rows_(out[start:stop], scales[first:], q.block_size)
    return out


# --- int8 -----------------------------------------------------------------------------


def _int8_scales(absmax: torch.Tensor) -> torch.Tensor:
    """max|x| / 127 per block, nudged down by one ulp where 127·scale would exceed max|x|.

    The nudge keeps 127·scale ≤ max|x| ≤ float32's maximum, so dequantizing never
    overflows to Inf even for values near 3.4e38.
    """
    scale = absmax / _INT8_MAX
    too_big = scale.double() * _INT8_MAX > absmax.double()
    return torch.where(too_big, torch.nextafter(scale, torch.zeros_like(scale)), scale)


def _quantize_int8(
    x: torch.Tensor, block_size: int, stochastic: bool, generator: torch.Generator | None
) -> Quantized:
    n = x.numel()
    codes = torch.empty(n, dtype=torch.int8, device=x.device)
    scales = torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=x.device)
    for start, stop in _chunks(n, block_size):
        blocks = _blocks(x[start:stop], block_size)
        scale = _int8_scales(_absmax(blocks))
        scales[start // block_size : start // block_size + scale.numel()] = scale
        y = _divide_by_scales(blocks, scale)
        if stochastic:
            low = torch.floor(y)
            fraction = y.sub_(low)  # P(round up)
            up = torch.rand(y.shape, generator=generator, device=y.device) < fraction
            y = low.add_(up)
        else:
            y.round_()
        if bool((scale == 0).any()):
            # A scale that underflowed to 0 (max|x| < ~9e-44) leaves its block at 0.
            y.mul_((scale > 0)[:, None])
        codes[start:stop] = y.clamp_(-_INT8_MAX, _INT8_MAX).view(-1)[: stop - start]
    return Quantized("int8", n, block_size, codes, scales)


def _dequantize_int8(q: Quantized) -> torch.Tensor:
    return _scale_rows_(q.codes.to(torch.float32), _scales_of(q), q.block_size)


# --- bf16 -----------------------------------------------------------------------------


def _to_bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    # float32 values within half a bf16 ulp of float32's maximum would round to Inf.
    if x.numel():
        low, high = torch.aminmax(x)
        if float(high) > _BF16_MAX or float(low) < -_BF16_MAX:
            x = x.clamp(-_BF16_MAX, _BF16_MAX)
    return x.to(torch.bfloat16)


def _to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Round to bf16 up in magnitude with probability (dropped low 16 bits) / 2^16.

    bf16 is float32 with the low 16 mantissa bits cut off, so adding a uniform 16-bit
    integer to the magnitude's bits and truncating is exactly unbiased stochastic rounding,
    subnormals included. A carry out of the mantissa correctly bumps the exponent; the
    clamp stops it at bf16's largest finite value instead of Inf.
    """
    out = torch.empty(x.numel(), dtype=torch.bfloat16, device=x.device)
    for start, stop in _chunks(x.numel(), 2):
        bits = x[start:stop].view(torch.int32)
        noise = torch.randint(
            0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32, device=x.device
        )
        sign = bits & _SIGN_MASK
        magnitude = bits & 0x7FFFFFFF  # finite: at most 0x7F7FFFFF, so no int32 overflow
        magnitude.add_(noise).bitwise_and_(~0xFFFF).clamp_(max=_BF16_MAX_BITS)
        out[start:stop] = magnitude.bitwise_or_(sign).view(torch.float32)
    return out
