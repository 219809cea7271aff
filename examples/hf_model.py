"""Train a Hugging Face causal LM with your own loop, with locod between the sites.

Everything here is plain transformers and tokenizers code; locod only sees the model and a
token count per step. Nothing is downloaded: the model comes from a local folder (its
config.json, randomly initialised, or a checkpoint with safetensors), the tokenizer from a
local tokenizer.json, the data from local text files.

    python examples/hf_model.py --model-dir my-llama --tokenizer tokenizer.json --data texts/
    python examples/hf_model.py ... --join 127.0.0.1:PORT --state-dir site-2

(needs the extra: pip install 'locod[hf]')
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

import locod


def load_model(folder: Path) -> torch.nn.Module:
    """The folder's checkpoint, or a model its config describes (same seed on every site)."""
    if any(folder.glob("*.safetensors")):
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def token_windows(ids: torch.Tensor, batch: int, context: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of random windows of the tokenized corpus."""
    rng = random.Random(seed)
    while True:
        starts = [rng.randrange(len(ids) - context) for _ in range(batch)]
        yield torch.stack([ids[s : s + context] for s in starts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a folder of .txt files")
    parser.add_argument("--run", default="hf-model")
    parser.add_argument("--join", action="append", default=[], help="HOST:PORT of a site")
    parser.add_argument("--state-dir", default="hf-model-state")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--min-peers", type=int, default=1)
    parser.add_argument("--linger", action="store_true", help="serve after the last step")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    texts = [p.read_text() for p in sorted(args.data.glob("*.txt"))]
    ids = torch.tensor([i for text in texts for i in tokenizer.encode(text).ids])
    model = load_model(args.model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
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
    with site:
        print(f"ADDRESS {site.listen_address}", flush=True)
        # The blocks (model.model.layers) are found; peers must share the tokenizer.
        outer = site.streaming_diloco(
            model, inner_steps=20, fragments=3, tokenizer=str(args.tokenizer)
        )
        batches = token_windows(ids, batch=8, context=32, seed=int.from_bytes(os.urandom(4), "big"))
        loss = torch.tensor(float("nan"))
        while outer.inner_step < args.steps and not stop.is_set():
            window = next(batches)
            loss = model(input_ids=window, labels=window).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            outer.step(tokens=window.numel(), loss=float(loss))
        outer.finish()
        print(f"FINISHED step {outer.inner_step} loss {float(loss):.3f}", flush=True)
        if args.linger:
            site.board.update(state="finished")
            stop.wait()


if __name__ == "__main__":
    main()
