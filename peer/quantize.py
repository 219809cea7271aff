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
"""

from __future__ import annotations

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
    stochastic = rounding == "stochastic"
    mag = x.abs().double()
    if codec == "fp4":
        scale = _per_element(_block_absmax(x, block_size), block_size, x.numel()).double()
        if stochastic:
            core = torch.maximum(mag, scale * 2.0**-6)
        else:
            core = torch.maximum(mag / 3, scale * 2.0**-7)
    elif codec == "int8":
        scale = _per_element(_int8_scales(x, block_size), block_size, x.numel()).double()
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
    x = x.detach().contiguous()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"refusing to quantize {bad} non-finite value(s) (NaN or Inf)")
    return x


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


def _block_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    blocks = _blocks(x, block_size)
    if blocks.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=x.device)
    return blocks.abs().amax(dim=1)


def _per_element(per_block: torch.Tensor, block_size: int, numel: int) -> torch.Tensor:
    return per_block.repeat_interleave(block_size)[:numel]


def _safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """The scale, with 1 where it is 0 (all-zero blocks), so division never makes NaN.

    Values are divided by the scale rather than multiplied by its reciprocal: the
    reciprocal of a subnormal scale overflows to Inf, the quotient never does.
    """
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# --- fp4 ------------------------------------------------------------------------------

# Value of each nibble relative to the block's scale: codes 0..7, then the same negated.
# Nibble 8 (a "negative zero") is never emitted and decodes to +0.
_FP4_TABLE = [0.0] + [2.0 ** (k - FP4_LEVELS) for k in range(1, FP4_LEVELS + 1)]
_FP4_TABLE = _FP4_TABLE + [0.0] + [-v for v in _FP4_TABLE[1:]]

_MANTISSA_BITS = 23
_EXPONENT_BIAS = 127


def _quantize_fp4(
    x: torch.Tensor, block_size: int, stochastic: bool, generator: torch.Generator | None
) -> Quantized:
    n = x.numel()
    blocks = _blocks(x, block_size)
    mag = blocks.abs()
    scale = mag.amax(dim=1) if blocks.numel() else torch.zeros(0, device=x.device)
    # a in [0, 1]: the division is correctly rounded and |x| <= scale, so a never exceeds 1.
    a = mag / _safe_divisor(scale)[:, None]
    # Read floor(log2 a) and the mantissa straight from the float's bits: exact and cheap.
    bits = a.view(torch.int32)
    exponent = (bits >> _MANTISSA_BITS) - _EXPONENT_BIAS  # floor(log2 a) when a is normal
    smallest = 2.0 ** (1 - FP4_LEVELS)  # the level scale·2^-6, relative to the scale
    if stochastic:
        # Neighbours L = 2^e and 2L; P(2L) = (a - L) / L is the mantissa fraction, exactly.
        # Below the smallest level the neighbours are 0 and 2^-6: P(2^-6) = a / 2^-6.
        fraction = (bits & ((1 << _MANTISSA_BITS) - 1)).to(torch.float32) * 2.0**-_MANTISSA_BITS
        normal = a >= smallest
        p_up = torch.where(normal, fraction, a / smallest)
        up = torch.rand(a.shape, generator=generator, device=a.device) < p_up
        code = torch.where(normal, exponent + FP4_LEVELS, 0) + up.to(torch.int32)
    else:
        # Nearest in the linear domain: between L and 2L the midpoint is 1.5·L, i.e. round
        # up when the mantissa's top bit is set. Between 0 and 2^-6 the midpoint is 2^-7.
        # Ties go up in magnitude.
        up = (bits >> (_MANTISSA_BITS - 1)) & 1
        code = torch.where(a >= smallest / 2, (exponent + up + FP4_LEVELS).clamp(min=1), 0)
    code = code.clamp(0, FP4_LEVELS).to(torch.uint8)
    negative = (blocks < 0) & (code > 0)
    nibbles = (code | (negative.to(torch.uint8) << 3)).view(-1)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    packed = pairs[:, 0] | (pairs[:, 1] << 4)
    return Quantized("fp4", n, block_size, packed[: codes_len("fp4", n)].clone(), scale)


def _dequantize_fp4(q: Quantized) -> torch.Tensor:
    scales = _scales_of(q)
    nb = num_blocks(q.numel, q.block_size)
    nibbles = torch.zeros(nb * q.block_size + 1, dtype=torch.uint8, device=q.codes.device)
    unpacked = torch.stack([q.codes & 0x0F, q.codes >> 4], dim=1).view(-1)
    nibbles[: unpacked.numel()] = unpacked
    table = torch.tensor(_FP4_TABLE, dtype=torch.float32, device=q.codes.device)
    # Index with int64: indexing with a uint8 tensor would be read as a boolean mask.
    relative = table[nibbles[: nb * q.block_size].to(torch.int64)].view(nb, q.block_size)
    # A product with a power of two is exact (short of subnormals) and at most the scale,
    # so it cannot overflow.
    return (relative * scales[:, None]).view(-1)[: q.numel].clone()


# --- int8 -----------------------------------------------------------------------------


def _int8_scales(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """max|x| / 127 per block, nudged down by one ulp where 127·scale would exceed max|x|.

    The nudge keeps 127·scale ≤ max|x| ≤ float32's maximum, so dequantizing never
    overflows to Inf even for values near 3.4e38.
    """
    absmax = _block_absmax(x, block_size)
    scale = absmax / _INT8_MAX
    too_big = scale.double() * _INT8_MAX > absmax.double()
    return torch.where(too_big, torch.nextafter(scale, torch.zeros_like(scale)), scale)


def _quantize_int8(
    x: torch.Tensor, block_size: int, stochastic: bool, generator: torch.Generator | None
) -> Quantized:
    n = x.numel()
    blocks = _blocks(x, block_size)
    scale = _int8_scales(x, block_size)
    y = blocks / _safe_divisor(scale)[:, None]
    if stochastic:
        low = torch.floor(y)
        up = torch.rand(y.shape, generator=generator, device=y.device) < (y - low)
        y = low + up.to(torch.float32)
    else:
        y = torch.round(y)
    # A scale that underflowed to 0 (max|x| < ~9e-44) leaves its block at 0.
    y = torch.where((scale > 0)[:, None], y, torch.zeros_like(y))
    codes = y.clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8).view(-1)[:n].clone()
    return Quantized("int8", n, block_size, codes, scale)


def _dequantize_int8(q: Quantized) -> torch.Tensor:
    scales = _scales_of(q)
    nb = num_blocks(q.numel, q.block_size)
    values = torch.zeros(nb * q.block_size, dtype=torch.float32, device=q.codes.device)
    values[: q.numel] = q.codes
    values = values.view(nb, q.block_size).mul_(scales[:, None])
    return values.view(-1)[: q.numel]


# --- bf16 -----------------------------------------------------------------------------


def _to_bf16_nearest(x: torch.Tensor) -> torch.Tensor:
    # float32 values within half a bf16 ulp of float32's maximum would round to Inf.
    return x.clamp(-_BF16_MAX, _BF16_MAX).to(torch.bfloat16)


def _to_bf16_stochastic(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Round to bf16 up in magnitude with probability (dropped low 16 bits) / 2^16.

    bf16 is float32 with the low 16 mantissa bits cut off, so adding a uniform 16-bit
    integer to the magnitude's bits and truncating is exactly unbiased stochastic rounding,
    subnormals included. A carry out of the mantissa correctly bumps the exponent; the
    clamp stops it at bf16's largest finite value instead of Inf.
    """
    bits = x.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF  # finite input: at most 0x7F7FFFFF, so no int32 overflow
    noise = torch.randint(
        0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device
    )
    magnitude = ((magnitude + noise) & ~0xFFFF).clamp(max=_BF16_MAX_BITS)
    rounded = torch.where(bits < 0, magnitude | torch.iinfo(torch.int32).min, magnitude)
    return rounded.view(torch.float32).to(torch.bfloat16)
