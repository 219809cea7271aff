"""A decoder-only transformer over bytes: vocabulary 256, so no tokenizer to download.

Pre-norm blocks with scaled-dot-product attention. The model exposes ``blocks`` (its list
of transformer blocks); that is all the fragment code needs to know about a model, so any
model with such a list can be trained by locod.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 256


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelConfig:
    """Shape of the byte-level transformer."""

    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Attention heads; must divide ``d_model``."""
    d_ff: int
    """Width of the feed-forward layer."""
    max_seq_len: int = 1024
    """Longest sequence the position embedding covers."""
    vocab_size: int = VOCAB_SIZE
    """Bytes: always 256."""

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )
        if self.vocab_size < VOCAB_SIZE:
            raise ValueError(
                f"model vocab_size must be at least {VOCAB_SIZE} (one id per byte), "
                f"got {self.vocab_size}"
            )


MODEL_PRESETS: dict[str, ModelConfig] = {
    # For tests: a fraction of a second per step on one core.
    "tiny": ModelConfig(d_model=64, n_layers=4, n_heads=2, d_ff=256, max_seq_len=256),
    # The CPU default: a few million parameters.
    "small": ModelConfig(d_model=256, n_layers=6, n_heads=4, d_ff=1024, max_seq_len=512),
    # About 125M parameters (GPT-2 small's budget; with 256 byte embeddings the blocks hold it).
    "base": ModelConfig(d_model=768, n_layers=18, n_heads=12, d_ff=3072, max_seq_len=1024),
    # The shape of Streaming DiLoCo's 1B model.
    "1b": ModelConfig(d_model=2048, n_layers=24, n_heads=32, d_ff=8192, max_seq_len=2048),
}


def model_config(name: str) -> ModelConfig:
    """The preset called ``name``, or a ValueError listing the presets."""
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}"
        ) from None


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.mlp_norm = nn.LayerNorm(cfg.d_model)
        self.mlp_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.mlp_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, seq, width))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))


class ByteTransformer(nn.Module):
    """Decoder-only language model over bytes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps early training stable.
        for block in self.blocks:
            assert isinstance(block, Block)
            for proj in (block.attn_out, block.mlp_out):
                nn.init.normal_(proj.weight, std=0.02 / (2 * cfg.n_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab) for int64 ``tokens`` of shape (batch, seq)."""
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds the model's {self.cfg.max_seq_len}")
        positions = torch.arange(seq, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy in nats."""
        logits = self(tokens)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg: ModelConfig, *, seed: int) -> ByteTransformer:
    """A freshly initialised model; the same ``seed`` gives the same weights on every peer."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ByteTransformer(cfg)
    finally:
        torch.random.set_rng_state(generator_state)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
