"""peer.model: presets, seeded construction, shapes, causality, initial loss, validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from locod.peer.model import (
    MODEL_PRESETS,
    VOCAB_SIZE,
    ByteTransformer,
    ModelConfig,
    build_model,
    count_parameters,
    model_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> ByteTransformer:
    return build_model(model_config("tiny"), seed=0)


def _tokens(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, shape, generator=generator)


def _meta_parameters(name: str) -> int:
    # The big presets are built on the meta device: shapes only, no memory, no time.
    with torch.device("meta"):
        model = build_model(model_config(name), seed=0)
    assert next(model.parameters()).device.type == "meta"
    return count_parameters(model)


def test_tiny_has_a_fraction_of_a_million_parameters(tiny: ByteTransformer) -> None:
    assert 100_000 <= count_parameters(tiny) <= 300_000


def test_small_has_a_few_million_parameters() -> None:
    assert 2_000_000 <= count_parameters(build_model(model_config("small"), seed=0)) <= 9_000_000


def test_base_has_about_125m_parameters() -> None:
    assert 115_000_000 <= _meta_parameters("base") <= 135_000_000


def test_1b_has_the_streaming_diloco_1b_shape() -> None:
    cfg = model_config("1b")
    assert (cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.n_heads) == (24, 2048, 8192, 32)
    assert 1_000_000_000 <= _meta_parameters("1b") <= 1_400_000_000


def test_every_preset_is_byte_level_and_named() -> None:
    assert set(MODEL_PRESETS) == {"tiny", "small", "base", "1b"}
    assert all(cfg.vocab_size == VOCAB_SIZE == 256 for cfg in MODEL_PRESETS.values())


def test_model_config_lists_the_presets_for_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'nope'") as caught:
        model_config("nope")
    for name in MODEL_PRESETS:
        assert name in str(caught.value)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    cfg = model_config("tiny")
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    for (name, x), (_, y), (_, z) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(x, y), name
        if "norm" not in name:  # norms start at exactly 1 and 0 whatever the seed
            assert not torch.equal(x, z), name


def test_build_model_leaves_the_global_rng_where_it_was() -> None:
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    build_model(model_config("tiny"), seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    after_build = torch.rand(4)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(4), after_build)


def test_forward_gives_logits_over_bytes_for_every_position(tiny: ByteTransformer) -> None:
    logits = tiny(_tokens((3, 17)))
    assert logits.shape == (3, 17, VOCAB_SIZE)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_a_future_byte_does_not_change_earlier_logits(tiny: ByteTransformer) -> None:
    tokens = _tokens((2, 32))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % VOCAB_SIZE
    with torch.no_grad():
        before, after = tiny(tokens), tiny(changed)
    torch.testing.assert_close(before[:, :20], after[:, :20], rtol=0, atol=1e-6)
    assert (before[:, 20:] - after[:, 20:]).abs().amax(dim=-1).min() > 1e-6


def test_initial_loss_is_about_ln_256(tiny: ByteTransformer) -> None:
    with torch.no_grad():
        loss = tiny.loss(_tokens((4, 64), seed=1), _tokens((4, 64), seed=2))
    assert loss.shape == ()
    assert abs(float(loss) - math.log(256)) < 0.1


def test_a_sequence_longer_than_the_position_embedding_is_refused(tiny: ByteTransformer) -> None:
    longest = tiny.cfg.max_seq_len
    assert tiny(_tokens((1, longest))).shape == (1, longest, VOCAB_SIZE)
    with pytest.raises(ValueError, match=f"sequence length {longest + 1} exceeds the model's"):
        tiny(_tokens((1, longest + 1)))


_VALID: dict[str, Any] = {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"d_model": 0}, "model d_model must be at least 1, got 0"),
        ({"n_layers": -1}, "model n_layers must be at least 1, got -1"),
        ({"n_heads": 0}, "model n_heads must be at least 1, got 0"),
        ({"d_ff": 0}, "model d_ff must be at least 1, got 0"),
        ({"max_seq_len": 0}, "model max_seq_len must be at least 1, got 0"),
        ({"n_heads": 3}, r"d_model \(64\) must be a multiple of n_heads \(3\)"),
        ({"vocab_size": 100}, "vocab_size must be at least 256 .one id per byte., got 100"),
    ],
)
def test_invalid_model_config_says_what_is_wrong(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**_VALID, **override})


def test_a_valid_custom_config_builds() -> None:
    model = build_model(ModelConfig(**_VALID), seed=0)
    assert len(model.blocks) == 2
    assert model(_tokens((1, 8))).shape == (1, 8, VOCAB_SIZE)
