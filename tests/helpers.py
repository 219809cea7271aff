"""Small builders shared by tests (kept out of the product packages)."""

from __future__ import annotations

import numpy as np

from locod.peer.data import Corpus


def random_text_corpus(size: int = 200_000, seed: int = 0) -> Corpus:
    """A synthetic corpus of printable bytes: fast, and enough for the maths tests."""
    rng = np.random.default_rng(seed)
    words = [bytes(rng.integers(97, 123, size=rng.integers(2, 8))) for _ in range(300)]
    chunks, total = [], 0
    while total < size:
        word = words[int(rng.integers(0, len(words)))]
        chunks.append(word + b" ")
        total += len(word) + 1
    data = np.frombuffer(b"".join(chunks)[:size], dtype=np.uint8)
    cut = size * 9 // 10
    return Corpus(
        train=data[:cut],
        heldout=data[cut:],
        train_files=1,
        heldout_files=1,
        description="synthetic",
    )


SIMULATION_RESULT_KEYS = {
    "method",
    "peers",
    "steps",
    "model",
    "parameters",
    "fragments",
    "inner_steps",
    "overlap",
    "alpha",
    "wire",
    "tokens",
    "train_loss",
    "eval_loss",
    "eval_loss_replicas",
    "eval_loss_replica_average",
    "bytes_sent_per_peer",
    "peak_bytes_per_sync",
    "rounds",
    "wall_s",
    "eval_curve",
}
"""What ``locod simulate --json`` prints, by name."""
