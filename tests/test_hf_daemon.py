"""``locod start --model hf:PATH --tokenizer ...`` trains a transformers causal LM on
tokenized data, and ``locod export`` writes what ``from_pretrained`` loads with the very
eval loss the daemon measured for θ_g."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import llama_folder, train_tokenizer, write_text_files

from locod.peer.data import ReadSettings, heldout_batches, load_corpus
from locod.peer.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_a_daemon_trains_an_hf_model_and_its_export_loads_in_transformers(
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    data = tmp_path / "texts"
    files = write_text_files(data)
    tokenizer_path = train_tokenizer(files, tmp_path / "tokenizer.json")
    model_dir = llama_folder(tmp_path / "llama", vocab_size=300)
    state, cache = tmp_path / "state", tmp_path / "cache"
    args = [
        sys.executable, "-m", "locod", "start",
        "--model", f"hf:{model_dir}", "--tokenizer", str(tokenizer_path), "--data", str(data),
        "--batch-size", "4", "--seq-len", "32", "--inner-steps", "6", "--warmup-steps", "3",
        "--lr", "3e-3", "--max-steps", "18", "--eval-every", "18", "--eval-batches", "2",
        "--listen", "127.0.0.1:0", "--dht-listen", "/ip4/127.0.0.1/tcp/0", "--no-live",
        "--state-dir", str(state), "--cache-dir", str(cache),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    log = (state / "locod.log").read_text()
    assert run.returncode == 0, run.stderr[-3000:] + log[-3000:]
    logged = re.findall(r"step 18: eval loss of the outer parameters ([\d.]+)", log)
    assert logged, log[-3000:]

    out = tmp_path / "export"
    exported = subprocess.run(
        [sys.executable, "-m", "locod", "export", str(state), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = load_tokenizer(tokenizer_path)
    corpus = load_corpus([str(data)], cache_dir=cache, read=ReadSettings(tokenizer=tokenizer))
    batches = heldout_batches(corpus.heldout, batch_size=4, seq_len=32, num_batches=2)
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(
                model(input_ids=inputs).logits.float().reshape(-1, 300), targets.reshape(-1)
            )
            for inputs, targets in batches
        ]
    # The daemon logs its eval loss to 4 decimals.
    assert float(torch.stack(losses).mean()) == pytest.approx(float(logged[-1]), abs=1e-4)
