"""The inner loop: the optimizer each peer runs on its own data every step.

AdamW with linear warmup and cosine decay, weight decay on matrices only, and gradient
clipping; bf16 autocast when training on CUDA. Plain SGD is offered for the special cases
of DESIGN §1 (H = 1 with inner SGD is data-parallel SGD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from locod.peer.model import LanguageModel

INNER_OPTIMIZERS = ("adamw", "sgd")


@dataclass(kw_only=True, slots=True)
class InnerConfig:
    """The inner optimizer and the batches it sees."""

    optimizer: str = "adamw"
    """``adamw`` (the papers') or ``sgd`` (for exactness tests)."""
    lr: float = 4e-4
    """Peak inner learning rate."""
    warmup_steps: int = 100
    """Linear warmup from 0 to ``lr``."""
    decay_steps: int = 0
    """Cosine decay to ``min_lr_ratio·lr`` at this step; 0 keeps ``lr`` after warmup."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay, as a fraction of ``lr``."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices (not on norms or biases)."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this; 0 disables clipping."""
    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 8
    """Sequences per inner step on this peer."""
    seq_len: int = 128
    """Tokens (bytes, for byte models) per sequence."""

    def __post_init__(self) -> None:
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(
                f"inner optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, "
                f"got {self.optimizer!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("warmup_steps", "decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be 0 or more")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(
                f"batch_size and seq_len must be at least 1, got {self.batch_size}, {self.seq_len}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def learning_rate(step: int, cfg: InnerConfig) -> float:
    """Learning rate for inner step ``step`` (counting from 1)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if not cfg.decay_steps:
        return cfg.lr
    span = max(1, cfg.decay_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: InnerConfig) -> torch.optim.Optimizer:
    """AdamW or plain SGD, weight decay on matrices only, at the warmup's first rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def require_language_model(model: nn.Module) -> LanguageModel:
    """``model`` itself, once checked to have ``loss(inputs, targets)``; else a TypeError."""
    if not isinstance(model, LanguageModel):
        raise TypeError(
            f"{type(model).__name__} has no loss(inputs, targets) method; locod trains modules "
            "that return their mean next-token cross-entropy from it (see peer.model)"
        )
    return model


class InnerTrainer:
    """One peer's model, optimizer and step counter.

    ``backward`` and ``optimizer_step`` are separate so that a data-parallel baseline can
    average gradients between them; ``train_step`` does both. Any ``nn.Module`` with a
    ``loss(inputs, targets)`` method (:class:`peer.model.LanguageModel`) can be trained.
    """

    def __init__(self, model: nn.Module, cfg: InnerConfig, *, device: torch.device) -> None:
        require_language_model(model)
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.optimizer = build_optimizer(self.model, cfg)
        self.step = 0
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = require_language_model(
            self.model
        ).loss
        """What ``backward`` differentiates: the model's loss, or a wrapper of it that
        synchronizes gradients between ranks (a DistributedDataParallel module)."""

    def backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward on one batch; gradients are left in ``.grad``. Returns the loss."""
        self.model.train()
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        ):
            loss = self.loss_fn(inputs, targets)
        loss.backward()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        """Clip, step at the scheduled rate, clear gradients, count the step."""
        self.step += 1
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        rate = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        loss = self.backward(inputs, targets)
        self.optimizer_step()
        return loss


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> float:
    """Mean loss over fixed held-out batches (any :class:`peer.model.LanguageModel`)."""
    language_model = require_language_model(model)
    was_training = model.training
    model.eval()
    total = 0.0
    for inputs, targets in batches:
        with torch.autocast(
            device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        ):
            total += float(language_model.loss(inputs.to(device), targets.to(device)))
    model.train(was_training)
    return total / max(1, len(batches))
