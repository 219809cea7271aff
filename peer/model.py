"""Models: the built-in byte-level transformer, and one builder for every model spec.

A *model spec* names what to train: a preset of the byte-level transformer (``tiny``,
``small``, ``base``, ``1b``: vocabulary 256, so no tokenizer to download) or ``hf:PATH``, a
transformers causal LM in a local folder (see :mod:`peer.hf`, imported only for such specs
so that byte-level runs never load transformers). :func:`build_model` builds either.

What the rest of locod needs of a model is small: the inner loop calls ``loss(inputs,
targets)`` (:class:`LanguageModel`); fragments need its repeated blocks, found by
``peer.fragments.find_blocks``; sampling and export need logits, the vocabulary size and
the longest sequence, which every model locod builds offers (:class:`CausalLM`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol, overload, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 256
HF_PREFIX = "hf:"
"""Model specs that start with this name a local transformers folder: ``hf:PATH``."""


class ModelError(ValueError):
    """A model spec cannot be built: the message names the spec and what to fix."""


@runtime_checkable
class LanguageModel(Protocol):
    """What the inner loop and evaluation need of a model (any ``nn.Module`` with it will do).

    ``loss`` is the mean next-token cross-entropy in nats of ``targets`` given ``inputs``
    (both int64, shape (batch, seq)), computed in fp32 whatever the autocast dtype.
    """

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


class CausalLM(nn.Module, abc.ABC):
    """A causal language model as locod builds them: logits, loss, vocabulary, longest input.

    ``forward(tokens)`` gives logits of shape (batch, seq, vocab); :meth:`loss` is the
    cross-entropy of those logits in fp32, the same for every model so that losses of a
    byte model and of a transformers model are comparable numbers (nats per token).
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Rows of the output layer: every id a batch may hold is below this."""

    @property
    @abc.abstractmethod
    def max_seq_len(self) -> int | None:
        """The longest sequence the model takes, or None if it has no fixed limit."""

    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """What defines the model's function besides its parameters' shapes (JSON values)."""

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats, computed in fp32."""
        logits = self(inputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


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
    """256 for bytes (every preset); a tokenizer's vocabulary when built for one."""

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


class ByteTransformer(CausalLM):
    """Decoder-only language model over bytes (or over a tokenizer's ids, if built for one)."""

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

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def architecture(self) -> dict[str, Any]:
        return {"class": "ByteTransformer", **asdict(self.cfg)}


def is_hf_spec(spec: str) -> bool:
    """Whether ``spec`` names a transformers folder (``hf:PATH``) rather than a preset."""
    return spec.startswith(HF_PREFIX)


def hf_path(spec: str) -> Path:
    """The folder of an ``hf:PATH`` spec; ModelError if the spec names no path."""
    path = spec.removeprefix(HF_PREFIX)
    if not is_hf_spec(spec) or not path.strip():
        raise ModelError(f"model spec {spec!r} must be hf:PATH, PATH a local transformers folder")
    return Path(path).expanduser()


def check_model_spec(spec: str) -> None:
    """Raise ModelError unless ``spec`` is a preset name or ``hf:PATH`` (the folder is read
    when the model is built, so a spec can be checked on a machine that lacks it)."""
    if is_hf_spec(spec):
        hf_path(spec)
    elif spec not in MODEL_PRESETS:
        raise ModelError(
            f"unknown model preset {spec!r}; choose one of {', '.join(MODEL_PRESETS)}, "
            "or hf:PATH for a local folder with a transformers config.json"
        )


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with the global CPU generator seeded, and put the generator back after:
    building a model must not change the random stream of whoever asked for it."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(generator_state)


@overload
def build_model(
    spec: ModelConfig, *, seed: int, vocab_size: int | None = None
) -> ByteTransformer: ...
@overload
def build_model(spec: str, *, seed: int, vocab_size: int | None = None) -> CausalLM: ...
def build_model(spec: str | ModelConfig, *, seed: int, vocab_size: int | None = None) -> CausalLM:
    """A freshly initialised model; the same ``seed`` gives the same weights on every peer.

    ``spec`` is a preset name, ``hf:PATH`` or a :class:`ModelConfig`. ``vocab_size`` is the
    vocabulary of the data (a tokenizer's, or 256 for bytes): a preset is built with that
    many embedding rows (at least 256, the preset's own), and a transformers model must have
    at least that many, or a ModelError says so. A spec that cannot be built raises
    ModelError naming what is missing.
    """
    if vocab_size is not None and vocab_size < 1:
        raise ModelError(f"vocab_size must be at least 1, got {vocab_size}")
    if isinstance(spec, str) and is_hf_spec(spec):
        from locod.peer.hf import build_hf_model

        with seeded(seed):
            return build_hf_model(hf_path(spec), vocab_size=vocab_size)
    if isinstance(spec, str):
        check_model_spec(spec)
        cfg = model_config(spec)
    else:
        cfg = spec
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        cfg = replace(cfg, vocab_size=max(VOCAB_SIZE, vocab_size))
    with seeded(seed):
        return ByteTransformer(cfg)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Sizes of the model a spec builds, known without building it for real."""

    parameters: int
    """Trainable scalars (tied weights once)."""
    blocks: int | None
    """Repeated blocks found by ``peer.fragments.find_blocks``; None if it finds none."""
    max_seq_len: int | None
    vocab_size: int


def model_shape(spec: str, *, vocab_size: int | None = None) -> ModelShape:
    """The sizes of ``build_model(spec, vocab_size=...)``, from the spec's config alone.

    Built on torch's meta device: no memory, no weights read, fast for any size; for
    checking settings (fragment count, sequence length) before the real model is built.
    ModelError as :func:`build_model`.
    """
    from locod.peer.fragments import find_blocks

    if is_hf_spec(spec):
        from locod.peer.hf import build_hf_model

        model: CausalLM = build_hf_model(hf_path(spec), vocab_size=vocab_size, shapes_only=True)
    else:
        with torch.device("meta"):
            model = build_model(spec, seed=0, vocab_size=vocab_size)
    blocks = find_blocks(model)
    return ModelShape(
        parameters=count_parameters(model),
        blocks=None if blocks is None else len(blocks),
        max_seq_len=model.max_seq_len,
        vocab_size=model.vocab_size,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
