"""The maths of the wire formats (peer/quantize.py): error bounds, edge cases, rounding.

Packing and hostile bytes are tests/test_codec.py's business; here every tensor is
honest and the question is only how far the decoded values may be from the input.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import locod.peer.quantize
from locod.peer.quantize import (
    CODECS,
    ROUNDINGS,
    Quantized,
    dequantize,
    error_bound,
    quantize,
)

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
BLOCK_SIZES = [1, 2, 3, 4, 7, 64, 256]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _round_trip(
    x: torch.Tensor, codec: str, block_size: int, rounding: str, seed: int = 0
) -> torch.Tensor:
    q = quantize(x, codec, block_size=block_size, rounding=rounding, generator=_gen(seed))
    return dequantize(q)


def _assert_within_bound(x: torch.Tensor, codec: str, block_size: int, rounding: str) -> None:
    y = _round_trip(x, codec, block_size, rounding)
    assert y.dtype == torch.float32
    assert y.shape == x.shape
    assert bool(torch.isfinite(y).all()), f"{codec}/{rounding} produced NaN or Inf"
    err = (y.double() - x.double()).abs()
    bound = error_bound(x, codec, block_size, rounding)
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{codec}/{rounding}/bs={block_size}: x={x[worst].item()!r} decoded to "
        f"{y[worst].item()!r}, error {err[worst].item()!r} > bound {bound[worst].item()!r}"
    )


# --- strategies -----------------------------------------------------------------------

# Any float32 value, subnormals and values near float32's maximum included.
any_float32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def vectors(draw: st.DrawFn) -> torch.Tensor:
    """A 1-D float32 tensor: either arbitrary float32 values, or Gaussian noise at one
    magnitude, or Gaussian noise spread over many magnitudes (the hard case for block
    scaling: a few large values next to many tiny ones)."""
    kind = draw(st.sampled_from(["floats", "normal", "spread"]))
    if kind == "floats":
        return torch.tensor(draw(st.lists(any_float32, min_size=1, max_size=300)))
    n = draw(st.integers(1, 700))
    g = _gen(draw(st.integers(0, 2**31)))
    if kind == "normal":
        exponent = torch.tensor(float(draw(st.integers(-44, 37))), dtype=torch.float64)
    else:
        exponent = torch.rand(n, generator=g, dtype=torch.float64) * 80 - 44
    x = torch.randn(n, generator=g, dtype=torch.float64) * 10.0**exponent
    return x.clamp(-FLOAT32_MAX, FLOAT32_MAX).float()


# --- error bounds ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    x=vectors(),
    codec=st.sampled_from(CODECS),
    block_size=st.sampled_from(BLOCK_SIZES),
    rounding=st.sampled_from(ROUNDINGS),
)
def test_error_bound_holds(x: torch.Tensor, codec: str, block_size: int, rounding: str) -> None:
    _assert_within_bound(x, codec, block_size, rounding)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_error_bound_holds_on_many_values(codec: str, rounding: str) -> None:
    """One large tensor, lengths not a multiple of the block, to cover what small
    hypothesis examples might miss (every fp4 level, both rounding directions)."""
    g = _gen(1)
    n = 64 * 300 + 37
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    for block_size in (2, 64, 1000):
        _assert_within_bound(x, codec, block_size, rounding)


def test_fp4_nearest_bound_is_tight() -> None:
    """The midpoint 1.5·2^-k·scale is the worst case: off by exactly |x|/3."""
    x = torch.tensor([1.0, 0.75, 0.375, 0.0078125])  # 0.75 = 1.5·2^-1, 2^-7 below 2^-6
    y = _round_trip(x, "fp4", 4, "nearest")
    assert y.tolist() == [1.0, 1.0, 0.5, 0.015625]  # ties go up in magnitude
    err = (y - x).abs()
    assert err[1].item() == pytest.approx(x[1].item() / 3)
    assert err[3].item() == 2.0**-7


# --- edge cases -----------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_all_zero_decodes_to_exact_zeros(codec: str, rounding: str, n: int) -> None:
    x = torch.zeros(n)
    x[::3] = -0.0
    q = quantize(x, codec, block_size=64, rounding=rounding, generator=_gen(0))
    if q.scales is not None:
        assert bool((q.scales == 0).all())
    if codec in ("fp4", "int8"):
        assert bool((q.codes == 0).all()), "zeros must not carry a sign or a code"
    assert torch.equal(dequantize(q), torch.zeros(n))


def test_empty_tensor() -> None:
    for codec in CODECS:
        q = quantize(torch.zeros(0), codec)
        assert q.numel == 0
        assert dequantize(q).shape == (0,)


HUGE_RANGE = [
    1e30,
    1e-30,
    3e38,
    -FLOAT32_MAX,
    FLOAT32_MAX,
    1e-45,  # the smallest subnormal
    -1e-40,
    3.3961e38,  # rounds to Inf in a plain float32 -> bf16 cast
    -(2.0**-126),
]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("block_size", [1, 2, 4, 64])
def test_huge_range_never_gives_nan_or_inf(codec: str, rounding: str, block_size: int) -> None:
    x = torch.tensor(HUGE_RANGE * 7)
    _assert_within_bound(x, codec, block_size, rounding)
    # Blocks made only of subnormals, and only of values near the maximum.
    for values in ([1e-45, -3e-45, 7e-44, 1e-40], [FLOAT32_MAX, -3.4e38, 3.39e38, 1.0]):
        _assert_within_bound(torch.tensor(values * 9), codec, block_size, rounding)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_refused(codec: str, bad: float) -> None:
    x = torch.ones(10)
    x[7] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, codec)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="1-D"):
        quantize(torch.zeros(2, 2), "fp4")
    with pytest.raises(ValueError, match="float32"):
        quantize(torch.zeros(4, dtype=torch.float64), "fp4")
    with pytest.raises(ValueError, match="codec"):
        quantize(torch.zeros(4), "fp8")
    with pytest.raises(ValueError, match="rounding"):
        quantize(torch.zeros(4), "fp4", rounding="up")
    with pytest.raises(ValueError, match="block_size"):
        quantize(torch.zeros(4), "fp4", block_size=0)


def test_quantized_never_aliases_input_and_dequantize_returns_new_memory() -> None:
    x = torch.randn(10)
    for codec in CODECS:
        q = quantize(x, codec)
        y = dequantize(q)
        assert q.codes.data_ptr() != x.data_ptr()
        assert y.data_ptr() not in (x.data_ptr(), q.codes.data_ptr())


@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 64])
def test_result_does_not_depend_on_chunking(
    monkeypatch: pytest.MonkeyPatch, block_size: int
) -> None:
    """The quantizers work through the tensor in chunks of whole blocks (to bound memory);
    where the chunks fall must not change a single bit of the nearest-rounded result."""
    x = torch.randn(1001, generator=_gen(4)) * torch.exp(torch.randn(1001, generator=_gen(5)) * 3)
    whole = {codec: quantize(x, codec, block_size=block_size) for codec in CODECS}
    monkeypatch.setattr(locod.peer.quantize, "_CHUNK", 128)  # about 8 chunks
    for codec in CODECS:
        q = quantize(x, codec, block_size=block_size)
        assert torch.equal(q.codes.view(torch.uint8), whole[codec].codes.view(torch.uint8))
        expected_scales = whole[codec].scales
        if q.scales is None or expected_scales is None:
            assert q.scales is expected_scales is None
        else:
            assert torch.equal(q.scales, expected_scales)
        assert torch.equal(dequantize(q), dequantize(whole[codec]))
        _assert_within_bound(x, codec, block_size, "stochastic")


# --- fp4 codes ------------------------------------------------------------------------


def _nibbles(q: Quantized) -> torch.Tensor:
    return torch.stack([q.codes & 0x0F, q.codes >> 4], dim=1).view(-1)


@settings(max_examples=100, deadline=None)
@given(
    x=vectors(),
    block_size=st.sampled_from([2, 4, 64]),
    rounding=st.sampled_from(ROUNDINGS),
)
def test_fp4_values_are_signed_powers_of_two_of_the_scale(
    x: torch.Tensor, block_size: int, rounding: str
) -> None:
    q = quantize(x, "fp4", block_size=block_size, rounding=rounding, generator=_gen(3))
    n = x.numel()
    assert q.codes.dtype == torch.uint8
    assert q.codes.numel() == (n + 1) // 2, "two 4-bit codes per byte"
    nibbles = _nibbles(q)
    if n % 2:
        assert nibbles[-1].item() == 0, "the padding nibble is zero"
    assert not bool((nibbles == 8).any()), "zero is never sent with a sign"
    assert q.scales is not None
    scale = q.scales.repeat_interleave(block_size)[:n].double()
    y = dequantize(q).double()
    # Check only blocks whose smallest level is a normal float32, where the product is exact.
    normal = scale * 2.0**-6 >= 2.0**-126
    rel = (y[normal] / scale[normal]).abs()
    levels = torch.tensor([0.0] + [2.0**-k for k in range(7)], dtype=torch.float64)
    assert bool(torch.isin(rel, levels).all())
    # The block's largest magnitude is its scale, and it is represented exactly.
    xs = x.double()
    at_max = (xs.abs() == scale) & (scale > 0)
    assert torch.equal(y[at_max], xs[at_max])


def test_fp4_hand_computed_example() -> None:
    """Blocks of 4: [1.0, -0.3, 0.05, 0.0] and [3.0, 1.6] (+ two zeros of padding).

    Block 0, scale 1.0 (= max |x|):
      1.0  = 2^0            -> code 7                              nibble 0x7
      -0.3 : 2^-2 = 0.25 <= 0.3 < 0.5, midpoint 0.375 -> 0.25 = 2^-2 -> code 5, signed
                                                                    nibble 0x8|5 = 0xD
      0.05 : 2^-5 = 0.03125 <= 0.05 < 0.0625, midpoint 0.046875 -> 0.0625 = 2^-4 -> code 3
      0.0  -> code 0
    Block 1, scale 3.0:
      3.0/3 = 1        -> code 7
      1.6/3 = 0.533: 0.5 <= . < 1, midpoint 0.75 -> 0.5 = 2^-1 -> code 6, decodes to 1.5
    Bytes, element 2i low nibble and 2i+1 high: (7, D) -> 0xD7, (3, 0) -> 0x03, (7, 6) -> 0x67.
    """
    x = torch.tensor([1.0, -0.3, 0.05, 0.0, 3.0, 1.6])
    q = quantize(x, "fp4", block_size=4)
    assert q.codes.tolist() == [0xD7, 0x03, 0x67]
    assert q.scales is not None
    assert q.scales.tolist() == [1.0, 3.0]
    assert dequantize(q).tolist() == [1.0, -0.25, 0.0625, 0.0, 3.0, 1.5]


def test_fp4_below_smallest_level() -> None:
    """Between 0 and scale·2^-6 = 1/64 the midpoint is 1/128; ties go up."""
    x = torch.tensor([1.0, 1 / 128, 1 / 129, -1 / 100, 1 / 64])
    assert _round_trip(x, "fp4", 8, "nearest").tolist() == [1.0, 1 / 64, 0.0, -1 / 64, 1 / 64]


def test_int8_hand_computed_example() -> None:
    """scale = 2.54/127 = 0.02; codes 2.54/0.02 = 127, -1/0.02 = -50, 0.5/0.02 = 25, 0."""
    x = torch.tensor([2.54, -1.0, 0.5, 0.0, 0.0, 0.07])
    q = quantize(x, "int8", block_size=4)
    assert q.codes.tolist() == [127, -50, 25, 0, 0, 127]
    assert q.scales is not None
    assert q.scales[0].item() == pytest.approx(0.02, rel=1e-6)
    assert q.scales[1].item() == pytest.approx(0.07 / 127, rel=1e-6)


def test_bf16_hand_computed_example() -> None:
    """bf16 keeps 8 significant bits: 1 + 2^-8 is a tie and goes to even (1.0);
    1 + 3·2^-8 is a tie between 1 + 2^-7 and 1 + 2^-6 and goes to even (1 + 2^-6)."""
    x = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-7)])
    assert _round_trip(x, "bf16", 64, "nearest").tolist() == [1.0, 1 + 2.0**-6, -(1 + 2.0**-7)]


@settings(max_examples=60, deadline=None)
@given(
    x=vectors(),
    codec=st.sampled_from(["fp4", "bf16", "fp32"]),
    block_size=st.sampled_from([2, 4, 64]),
)
def test_representable_values_round_trip_exactly(
    x: torch.Tensor, codec: str, block_size: int
) -> None:
    """Quantizing what the format already represents changes nothing, whatever the rounding.

    Not int8: its grid is max|x|/127 rounded to float32, and 127 times that is not max|x|
    again, so a second pass may pick a slightly different scale. Nor tiny blocks: where
    scale·2^-k is subnormal it is rounded, so it is no longer a power of two of the scale.
    """
    x = torch.where(x.abs() < 2.0**-100, 0.0, x)
    once = _round_trip(x, codec, block_size, "nearest")
    for rounding in ROUNDINGS:
        assert torch.equal(_round_trip(once, codec, block_size, rounding), once)


@settings(max_examples=60, deadline=None)
@given(x=vectors(), rounding=st.sampled_from(ROUNDINGS))
def test_int8_codes_are_symmetric(x: torch.Tensor, rounding: str) -> None:
    q = quantize(x, "int8", rounding=rounding, generator=_gen(0))
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= -127 if x.numel() else True


# --- stochastic rounding --------------------------------------------------------------


def _probe_block() -> torch.Tensor:
    """64 values whose magnitudes cover every fp4 level, the gap below the smallest level,
    exact levels and midpoints; the block's max is 1."""
    g = _gen(7)
    x = torch.exp2(-torch.rand(64, generator=g) * 9) * torch.sign(torch.randn(64, generator=g))
    x[0] = 1.0
    x[1:4] = torch.tensor([0.75, 2.0**-3, 0.001])
    return x


@pytest.mark.parametrize("codec", ["fp4", "int8", "bf16"])
def test_stochastic_rounding_is_unbiased(codec: str) -> None:
    """Average N independent roundings of the same block: the mean must be within 6
    standard errors of x. Each rounding lands on one of two neighbours at most `bound`
    apart, so its standard deviation is at most bound/2. Nearest rounding of the same
    data must fail the same test, or the test would prove nothing."""
    draws = 4000
    x = _probe_block()
    if codec == "bf16":
        x = x * (1 + 2.0**-10)  # off the bf16 grid, so that there is something to round
    tiled = x.repeat(draws)  # one block per draw: the same scale every time
    bound = error_bound(x, codec, 64, "stochastic")
    tolerance = 6 * bound / (2 * math.sqrt(draws)) + 1e-12
    for rounding, unbiased in (("stochastic", True), ("nearest", False)):
        y = _round_trip(tiled, codec, 64, rounding, seed=11).double().view(draws, 64)
        bias = (y.mean(dim=0) - x.double()).abs()
        assert bool((bias <= tolerance).all()) == unbiased, (rounding, (bias / tolerance).max())


@pytest.mark.parametrize("codec", ["fp4", "int8", "bf16"])
def test_stochastic_rounding_is_deterministic_given_the_seed(codec: str) -> None:
    x = torch.randn(1000, generator=_gen(0))
    a = quantize(x, codec, rounding="stochastic", generator=_gen(5))
    b = quantize(x, codec, rounding="stochastic", generator=_gen(5))
    c = quantize(x, codec, rounding="stochastic", generator=_gen(6))
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, c.codes)


def test_stochastic_rounding_only_picks_neighbours() -> None:
    """0.3 of a block with max 1 lies between 0.25 and 0.5: those are the only outcomes,
    0.5 with probability (0.3 - 0.25) / 0.25 = 0.2."""
    x = torch.tensor([1.0, 0.3] * 20000)
    y = _round_trip(x, "fp4", 2, "stochastic", seed=2)[1::2]
    assert set(y.unique().tolist()) == {0.25, 0.5}
    assert (y == 0.5).double().mean().item() == pytest.approx(0.2, abs=0.01)
