"""Sampling: continue a prompt with a trained model, to see what it learnt.

One token at a time, recomputing the whole context each step (no KV cache): a tool to
look at a model, not a server. Sampling is seeded and runs its generator on the CPU, so the
same model, prompt and seed give the same text on every machine whose arithmetic agrees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locod.peer.model import CausalLM
from locod.peer.tokenizer import TextTokenizer


@torch.no_grad()
def sample(
    model: CausalLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    vocab_limit: int | None = None,
) -> list[int]:
    """The ``max_new_tokens`` ids that follow ``prompt_ids`` (the prompt is not repeated).

    ``temperature`` 0 picks the likeliest id (greedy); otherwise logits are divided by it.
    ``top_k`` > 0 keeps only the k likeliest ids. ``vocab_limit`` keeps ids below it (the
    tokenizer's vocabulary, when the model has more rows than the tokenizer has ids). The
    context is the last ``model.max_seq_len`` ids.
    """
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0:
        raise ValueError("max_new_tokens, temperature and top_k must be 0 or more")
    limit = min(model.vocab_size, vocab_limit or model.vocab_size)
    if any(not 0 <= i < model.vocab_size for i in prompt_ids):
        raise ValueError(f"prompt ids must be in [0, {model.vocab_size})")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = ids[-model.max_seq_len :] if model.max_seq_len else ids
            tokens = torch.tensor([context], dtype=torch.int64, device=device)
            logits = model(tokens)[0, -1, :limit].float().cpu()
            if temperature == 0:
                choice = int(torch.argmax(logits))
            else:
                logits = logits / temperature
                if 0 < top_k < limit:
                    kth = torch.topk(logits, top_k).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                choice = int(torch.multinomial(probs, 1, generator=generator))
            ids.append(choice)
            new.append(choice)
    finally:
        model.train(was_training)
    return new


def sample_text(
    model: CausalLM,
    tokenizer: TextTokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """The text that follows ``prompt`` (an empty prompt starts a document: after a newline)."""
    prompt_ids = tokenizer.encode_batch([prompt or "\n"])[0]
    new = sample(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        vocab_limit=tokenizer.vocab_size,
    )
    return tokenizer.decode(new)
