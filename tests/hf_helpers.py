"""Tiny transformers models, BPE tokenizers and checkpoints built offline, for tests.

Nothing here downloads: a Llama is made from a ``LlamaConfig`` written to a folder, a
tokenizer is trained on a few local text files. transformers and tokenizers are imported
inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locod.daemon.checkpoint import save_checkpoint
from locod.peer.config import OuterConfig
from locod.peer.fragments import derive_fragments
from locod.peer.inner import InnerConfig, InnerTrainer
from locod.peer.model import CausalLM, build_model
from locod.peer.simulator import InMemoryHub
from locod.peer.streaming import StreamingDiLoCo

TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def write_text_files(folder: Path, count: int = 4, seed: int = 0) -> list[Path]:
    """A few files of word-like text (a small vocabulary, so BPE has merges to learn)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = [
        "".join(chr(c) for c in rng.integers(97, 105, size=rng.integers(2, 6))) for _ in range(60)
    ]
    paths = []
    for i in range(count):
        picks = rng.integers(0, len(words), size=800)
        lines = [" ".join(words[k] for k in picks[j : j + 10]) for j in range(0, len(picks), 10)]
        path = folder / f"part{i}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def train_tokenizer(files: list[Path], out: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer trained on ``files``, saved as ``out`` (a tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(f) for f in files], trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return out


def llama_folder(folder: Path, vocab_size: int, **overrides: Any) -> Path:
    """A folder holding only a tiny Llama's config.json."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=vocab_size, **{**TINY_LLAMA, **overrides}).save_pretrained(folder)
    return folder


def tokens(shape: tuple[int, int], vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def write_checkpoint(
    state_dir: Path,
    run_config: dict[str, Any],
    *,
    vocab_size: int | None,
    steps: int = 8,
) -> tuple[CausalLM, list[torch.Tensor]]:
    """Train one peer a few steps with the real outer loop and checkpoint it as the daemon
    does (same keys); returns the trained local model and θ_g per fragment."""
    model = build_model(run_config["model"], seed=run_config["seed"], vocab_size=vocab_size)
    inner = InnerConfig(lr=3e-3, warmup_steps=0, batch_size=2, seq_len=16)
    outer = OuterConfig(
        inner_steps=run_config["inner_steps"],
        fragments=run_config["fragments"],
        layout=run_config["layout"],
        overlap=0,
        alpha=0.0,
    )
    trainer = InnerTrainer(model, inner, device=torch.device("cpu"))
    fragments = derive_fragments(model, outer.fragments, outer.layout)
    hub = InMemoryHub(1, outer.wire, seed=0)
    worker = StreamingDiLoCo(fragments, outer, hub.averager(0))
    for step in range(1, steps + 1):
        batch = tokens((2, 17), vocab_size or 256, seed=step)
        trainer.train_step(batch[:, :-1], batch[:, 1:])
        worker.add_tokens(inner.tokens_per_step)
        worker.prepare(step)
        worker.perform(step)
    state_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        state_dir,
        {
            "run_config": run_config,
            "step": steps,
            "tokens": steps * inner.tokens_per_step,
            "inner_step": trainer.step,
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "outer": worker.state_dict(),
            "sampler": {"seed": 0, "batches_drawn": steps},
        },
    )
    return model, [g.clone() for g in worker.global_params]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
