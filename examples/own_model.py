"""Train your own PyTorch model with locod: a complete, runnable example.

The model, the optimizer and the data loader below are ordinary PyTorch; locod only sees
the model (to average its fragments with the other sites) and a token count per step.

    python examples/own_model.py                          # found a run, print its address
    python examples/own_model.py --join 127.0.0.1:PORT --state-dir site-2   # join it
    torchrun --standalone --nproc-per-node 2 examples/own_model.py   # a site of 2 ranks (DDP)

Each site trains a small byte-level transformer on text of Python's standard library
(every machine with Python has it: nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import locod


class TinyByteLM(nn.Module):
    """A user's own model: embeddings, a stack of PyTorch encoder layers with a causal
    mask, and a head. Its repeated layers are what locod spreads over fragments."""

    def __init__(self, width: int = 64, depth: int = 4, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=4 * width, batch_first=True)
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        x = self.embed(tokens) + self.position[:seq]
        mask = nn.Transformer.generate_square_subsequent_mask(seq)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(x)


def text_batches(batch: int, context: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of byte windows from the standard library's source."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    data = torch.frombuffer(bytearray(b"".join(f.read_bytes() for f in files)), dtype=torch.uint8)
    rng = random.Random(seed)
    while True:
        starts = [rng.randrange(len(data) - context - 1) for _ in range(batch)]
        yield torch.stack([data[s : s + context + 1].long() for s in starts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="own-model")
    parser.add_argument("--join", action="append", default=[], help="HOST:PORT of a site")
    parser.add_argument("--state-dir", default="own-model-state")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--min-peers", type=int, default=1)
    parser.add_argument("--linger", action="store_true", help="serve after the last step")
    args = parser.parse_args()

    # Under torchrun this site has several ranks: your own DDP, locod between the sites.
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if ranks > 1 else 0
    torch.manual_seed(0)  # every site starts from the same weights (joiners download anyway)
    model = TinyByteLM()
    forward = DistributedDataParallel(model) if ranks > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    settings = {
        "state_dir": args.state_dir,
        "listen": "127.0.0.1:0",
        "dht_listen": "/ip4/127.0.0.1/tcp/0",
        "min_peers": args.min_peers,
    }
    site = (
        locod.join(run=args.run, join=args.join, **settings)
        if args.join
        else locod.found(run=args.run, **settings)
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with site:  # on every rank: rank 0 gets the site, the others take part in its syncs
        if rank == 0:
            print(f"ADDRESS {site.listen_address}", flush=True)
        outer = site.streaming_diloco(model, blocks=model.layers, inner_steps=20, fragments=3)
        loss = torch.tensor(float("nan"))
        batches = text_batches(batch=8, context=64, seed=int.from_bytes(os.urandom(4), "big"))
        # Every rank must stop at the same step: steps are counted the same on every rank.
        while outer.inner_step < args.steps and not (stop.is_set() and ranks == 1):
            window = next(batches)
            logits = forward(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            outer.step(tokens=window[:, 1:].numel(), loss=float(loss))
        outer.finish()
        if rank == 0:
            print(f"FINISHED step {outer.inner_step} tokens {outer.tokens}", flush=True)
        if args.linger and rank == 0:
            site.board.update(state="finished")
            stop.wait()


if __name__ == "__main__":
    main()
