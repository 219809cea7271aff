"""``locod simulate`` with a transformers model and a BPE tokenizer, offline."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hf_helpers import llama_folder, train_tokenizer, write_text_files

from locod.daemon.cli import locod
from locod.peer.model import build_model, count_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 300


@pytest.fixture(autouse=True)
def _no_locod_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LOCOD_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("simulate-hf")
    files = write_text_files(root / "text", count=6)
    train_tokenizer(files, root / "tokenizer.json", VOCAB)
    llama_folder(root / "llama", VOCAB)
    return root


def _simulate(workdir: Path, *extra: str) -> Result:
    args = ["simulate", "--steps", "4", "--batch-size", "2", "--seq-len", "16"]
    args += ["--eval-batches", "2", "--inner-steps", "3", "--data", str(workdir / "text")]
    args += ["--cache-dir", str(workdir / "cache"), "--tokenizer", str(workdir / "tokenizer.json")]
    return CliRunner().invoke(locod, [*args, *extra])


def _json(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(parsed, dict)
    return parsed


def test_simulate_trains_an_hf_llama_on_bpe_tokens(workdir: Path) -> None:
    spec = f"hf:{workdir / 'llama'}"
    result = _simulate(workdir, "--model", spec, "--json")
    parsed = _json(result)
    assert parsed["model"] == spec
    assert parsed["parameters"] == count_parameters(build_model(spec, seed=0))
    assert parsed["fragments"] == 3  # the embeddings' fragment + ⌈4 layers / 3⌉
    assert parsed["rounds"] > 0
    # Four steps from a uniform start: the loss is about ln(300) and finite.
    assert math.isfinite(parsed["eval_loss"]) and parsed["eval_loss"] < math.log(VOCAB) + 0.1
    assert f"tokens of {workdir / 'tokenizer.json'} (300 ids)" in result.stderr


def test_a_preset_is_built_for_the_tokenizers_vocabulary(workdir: Path) -> None:
    parsed = _json(_simulate(workdir, "--model", "tiny", "--json"))
    assert parsed["parameters"] == count_parameters(build_model("tiny", seed=0, vocab_size=VOCAB))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "hf:/no/such/folder"], "hf model folder /no/such/folder does not exist"),
        (["--model", "huge"], "unknown model preset 'huge'"),
        (["--tokenizer", "/no/such/tokenizer.json"], "tokenizer file /no/such/tokenizer.json"),
    ],
)
def test_bad_models_and_tokenizers_are_usage_errors(
    workdir: Path, extra: list[str], message: str
) -> None:
    result = _simulate(workdir, "--model", "tiny", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
