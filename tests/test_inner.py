"""peer.inner: the schedule by hand, weight decay, clipping, validation, and that it learns."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

from locod.peer.inner import InnerConfig, InnerTrainer, build_optimizer, evaluate, learning_rate
from locod.peer.model import VOCAB_SIZE, ByteTransformer, build_model, model_config

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny() -> ByteTransformer:
    return build_model(model_config("tiny"), seed=0)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # A learnable pattern: a repeated random 8-byte phrase.
    phrase = torch.randint(0, VOCAB_SIZE, (8,), generator=generator)
    tokens = phrase.repeat(2, 5)[:, :33]
    return tokens[:, :-1], tokens[:, 1:]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# -- learning rate -------------------------------------------------------------------------


def test_warmup_is_linear_from_zero() -> None:
    cfg = InnerConfig(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == 0.0
    assert learning_rate(1, cfg) == pytest.approx(0.1)
    assert learning_rate(5, cfg) == pytest.approx(0.5)
    assert learning_rate(10, cfg) == pytest.approx(1.0)


def test_cosine_decays_to_the_floor_at_decay_steps_and_stays() -> None:
    cfg = InnerConfig(lr=2.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    # floor 0.2; lr(t) = 0.2 + 1.8·½(1 + cos(π·(t − 10)/100)) after warmup.
    assert learning_rate(11, cfg) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi / 100)))
    assert learning_rate(35, cfg) == pytest.approx(0.2 + 0.9 * (1 + math.sqrt(0.5)))  # π/4
    assert learning_rate(60, cfg) == pytest.approx(1.1)  # halfway: π/2
    assert learning_rate(85, cfg) == pytest.approx(0.2 + 0.9 * (1 - math.sqrt(0.5)))  # 3π/4
    assert learning_rate(110, cfg) == pytest.approx(0.2)
    assert learning_rate(111, cfg) == pytest.approx(0.2)
    assert learning_rate(10_000, cfg) == pytest.approx(0.2)
    rates = [learning_rate(t, cfg) for t in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_cosine_without_warmup_starts_at_the_peak() -> None:
    cfg = InnerConfig(lr=1.0, warmup_steps=0, decay_steps=100, min_lr_ratio=0.0)
    assert learning_rate(0, cfg) == pytest.approx(1.0)
    assert learning_rate(50, cfg) == pytest.approx(0.5)
    assert learning_rate(100, cfg) == pytest.approx(0.0, abs=1e-12)


def test_decay_steps_zero_keeps_the_peak_after_warmup() -> None:
    cfg = InnerConfig(lr=0.01, warmup_steps=4, decay_steps=0)
    assert [learning_rate(t, cfg) for t in range(1, 5)] == pytest.approx(
        [0.0025, 0.005, 0.0075, 0.01]
    )
    assert learning_rate(5, cfg) == learning_rate(1_000_000, cfg) == 0.01
    assert learning_rate(1, InnerConfig(lr=0.01, warmup_steps=0, decay_steps=0)) == 0.01


def test_the_trainer_steps_at_the_scheduled_rate() -> None:
    cfg = InnerConfig(optimizer="sgd", lr=0.5, warmup_steps=4, weight_decay=0.0, grad_clip=0.0)
    trainer = InnerTrainer(_tiny(), cfg, device=CPU)
    for expected_step in (1, 2, 3):
        trainer.train_step(*_batch())
        assert trainer.step == expected_step
        assert {g["lr"] for g in trainer.optimizer.param_groups} == {0.125 * expected_step}


# -- weight decay --------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_applies_to_matrices_only(optimizer: str) -> None:
    cfg = InnerConfig(optimizer=optimizer, lr=0.1, weight_decay=0.5, warmup_steps=0, grad_clip=0.0)
    trainer = InnerTrainer(_tiny(), cfg, device=CPU)
    groups = {
        g["weight_decay"]: {id(p) for p in g["params"]} for g in trainer.optimizer.param_groups
    }
    before = _snapshot(trainer.model)
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient: only the decay moves anything
    trainer.optimizer_step()

    decayed = undecayed = 0
    for name, p in trainer.model.named_parameters():
        if p.ndim >= 2:
            assert id(p) in groups[0.5], name
            torch.testing.assert_close(p.detach(), before[name] * 0.95, rtol=1e-6, atol=0)
            decayed += 1
        else:
            assert id(p) in groups[0.0], name
            assert torch.equal(p.detach(), before[name]), name
            undecayed += 1
    assert decayed > 0 and undecayed > 0


def test_build_optimizer_covers_every_trainable_parameter_once() -> None:
    model = _tiny()
    optimizer = build_optimizer(model, InnerConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


# -- gradient clipping ---------------------------------------------------------------------


def _update_norm(grad_clip: float, grad_norm: float) -> float:
    """Norm of one SGD step (lr 1) taken on a crafted gradient of norm ``grad_norm``."""
    cfg = InnerConfig(
        optimizer="sgd", lr=1.0, warmup_steps=0, weight_decay=0.0, grad_clip=grad_clip
    )
    trainer = InnerTrainer(_tiny(), cfg, device=CPU)
    before = _snapshot(trainer.model)
    for p in trainer.model.parameters():
        p.grad = torch.zeros_like(p)
    head = trainer.model.head.weight
    assert head.grad is not None
    head.grad.fill_(grad_norm / math.sqrt(head.numel()))
    trainer.optimizer_step()
    moved = [p.detach() - before[name] for name, p in trainer.model.named_parameters()]
    return float(torch.cat([m.reshape(-1) for m in moved]).norm())


def test_grad_clip_scales_a_large_gradient_down_to_the_clip() -> None:
    assert _update_norm(grad_clip=0.0, grad_norm=10.0) == pytest.approx(10.0, rel=1e-4)
    assert _update_norm(grad_clip=1.0, grad_norm=10.0) == pytest.approx(1.0, rel=1e-4)
    assert _update_norm(grad_clip=2.5, grad_norm=10.0) == pytest.approx(2.5, rel=1e-4)


def test_grad_clip_leaves_a_small_gradient_alone() -> None:
    assert _update_norm(grad_clip=1.0, grad_norm=0.5) == pytest.approx(0.5, rel=1e-4)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"optimizer": "adam"}, "inner optimizer must be one of adamw, sgd, got 'adam'"),
        ({"lr": 0.0}, "lr must be positive, got 0.0"),
        ({"lr": float("nan")}, "lr must be positive, got nan"),
        ({"warmup_steps": -1}, "warmup_steps must be 0 or more, got -1"),
        ({"decay_steps": -5}, "decay_steps must be 0 or more, got -5"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\], got 1.5"),
        ({"weight_decay": -0.1}, "weight_decay and grad_clip must be 0 or more"),
        ({"grad_clip": -1.0}, "weight_decay and grad_clip must be 0 or more"),
        ({"beta1": 1.0}, r"beta1 and beta2 must be in \[0, 1\)"),
        ({"beta2": -0.1}, r"beta1 and beta2 must be in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size and seq_len must be at least 1, got 0, 128"),
        ({"seq_len": 0}, "batch_size and seq_len must be at least 1, got 8, 0"),
    ],
)
def test_invalid_inner_config_says_how_to_fix_it(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InnerConfig(**override)


def test_tokens_per_step() -> None:
    assert InnerConfig(batch_size=3, seq_len=50).tokens_per_step == 150


# -- it learns -----------------------------------------------------------------------------


def test_a_few_adamw_steps_lower_the_loss_on_a_fixed_batch() -> None:
    cfg = InnerConfig(lr=3e-3, warmup_steps=2, batch_size=2, seq_len=32)
    trainer = InnerTrainer(_tiny(), cfg, device=CPU)
    batch = _batch()
    start = evaluate(trainer.model, [batch], CPU)
    losses = [trainer.train_step(*batch) for _ in range(8)]
    end = evaluate(trainer.model, [batch], CPU)
    assert losses[0] == pytest.approx(start, rel=1e-5)  # train_step returns the loss before
    assert end < start - 1.0
    assert losses[-1] < losses[0]
    assert trainer.step == 8
    assert trainer.model.training  # evaluate restores the mode it found


def test_evaluate_averages_over_batches_without_touching_gradients() -> None:
    model = _tiny()
    a, b = _batch(1), _batch(2)
    with torch.no_grad():
        expected = (float(model.loss(*a)) + float(model.loss(*b))) / 2
    assert evaluate(model, [a, b], CPU) == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is None for p in model.parameters())
