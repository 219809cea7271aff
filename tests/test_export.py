"""Export θ_g from a checkpoint, load it back (transformers or locod's layout), sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hf_helpers import llama_folder, tokens, train_tokenizer, write_checkpoint, write_text_files

from locod.daemon.checkpoint import load_checkpoint
from locod.daemon.cli import locod
from locod.peer.export import ExportError, export_model, global_model, load_export
from locod.peer.fragments import derive_fragments, flatten
from locod.peer.hf import HFCausalLM
from locod.peer.inner import evaluate
from locod.peer.model import ByteTransformer, CausalLM, build_model
from locod.peer.sampling import sample, sample_text
from locod.peer.tokenizer import ByteTokenizer, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
VOCAB = 300


def _run_config(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "seed": 5,
        "inner_steps": 3,
        "fragments": 3,
        "layout": "strided",
    } | extra


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A state dir whose checkpoint trained a tiny Llama on a BPE tokenizer's ids."""
    root = tmp_path_factory.mktemp("hf-run")
    tokenizer = train_tokenizer(write_text_files(root / "text"), root / "tokenizer.json", VOCAB)
    folder = llama_folder(root / "llama", VOCAB)
    run = _run_config(f"hf:{folder}", tokenizer=str(tokenizer))
    local, theta_g = write_checkpoint(root / "state", run, vocab_size=VOCAB)
    return {"root": root, "state": root / "state", "local": local, "theta_g": theta_g}


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("byte-run")
    local, theta_g = write_checkpoint(root / "state", _run_config("tiny"), vocab_size=None)
    return {"root": root, "state": root / "state", "local": local, "theta_g": theta_g}


def _eval_batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batch = tokens((2, 33), vocab, seed=99)
    return [(batch[:, :-1], batch[:, 1:])]


def _global_flat(model: CausalLM) -> list[torch.Tensor]:
    return [flatten(f.params) for f in derive_fragments(model, 3)]


def test_global_model_holds_theta_g_not_the_local_theta(hf_run: dict[str, Any]) -> None:
    checkpoint = load_checkpoint(hf_run["state"])
    assert checkpoint is not None
    model, tokenizer = global_model(checkpoint)
    assert tokenizer is not None and tokenizer.vocab_size == VOCAB
    for mine, expected in zip(_global_flat(model), hf_run["theta_g"], strict=True):
        assert torch.equal(mine, expected)
    local = _global_flat(hf_run["local"])
    assert any(not torch.equal(a, b) for a, b in zip(local, hf_run["theta_g"], strict=True))


def test_export_round_trips_through_transformers(hf_run: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    result = CliRunner().invoke(locod, ["export", str(hf_run["state"]), str(out)])
    assert result.exit_code == 0, result.output
    assert "θ_g of step 8 written to" in result.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "locod_export.json"):
        assert (out / name).is_file(), name
    provenance = json.loads((out / "locod_export.json").read_text())
    assert provenance["step"] == 8 and provenance["weights"].startswith("θ_g")

    checkpoint = load_checkpoint(hf_run["state"])
    assert checkpoint is not None
    expected, _ = global_model(checkpoint)
    assert isinstance(expected, HFCausalLM)
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    # fp32 weights through safetensors come back bit for bit.
    for (name, a), (_, b) in zip(
        expected.hf.named_parameters(), loaded.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    batches = _eval_batches(VOCAB)
    with torch.no_grad():
        logits = loaded(input_ids=batches[0][0]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batches[0][1].reshape(-1))
    # Same weights, same kernels: equal up to fp32 rounding of the ~10 reductions involved.
    assert float(loss) == pytest.approx(evaluate(expected, batches, CPU), rel=1e-6)

    ours = load_tokenizer(hf_run["root"] / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (
        theirs("abc def", add_special_tokens=False)["input_ids"]
        == ours.encode_batch(["abc def"])[0]
    )
    # The export is itself a model spec: training can go on from it.
    again = build_model(f"hf:{out}", seed=123)
    assert all(
        torch.equal(a, b) for a, b in zip(expected.parameters(), again.parameters(), strict=True)
    )


def test_a_byte_model_exports_to_locods_layout_and_back(
    byte_run: dict[str, Any], tmp_path: Path
) -> None:
    checkpoint = load_checkpoint(byte_run["state"])
    assert checkpoint is not None
    model, tokenizer = global_model(checkpoint)
    assert tokenizer is None and isinstance(model, ByteTransformer)
    out = export_model(model, tmp_path / "out")
    meta = json.loads((out / "locod_model.json").read_text())
    assert meta["format"] == "locod-byte-transformer" and meta["version"] == 1
    assert meta["config"]["n_layers"] == 4 and meta["config"]["vocab_size"] == 256
    loaded, loaded_tokenizer = load_export(out)
    assert isinstance(loaded, ByteTransformer) and isinstance(loaded_tokenizer, ByteTokenizer)
    for mine, expected in zip(_global_flat(loaded), byte_run["theta_g"], strict=True):
        assert torch.equal(mine, expected)


def test_sample_prints_the_prompt_and_a_seeded_continuation(
    hf_run: dict[str, Any], tmp_path: Path
) -> None:
    args = ["sample", str(hf_run["state"]), "--prompt", "def ", "--max-new-tokens", "12"]
    first = CliRunner().invoke(locod, [*args, "--seed", "1"])
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("def ") and len(first.stdout.strip()) > len("def")
    again = CliRunner().invoke(locod, [*args, "--seed", "1"])
    assert again.stdout == first.stdout
    # The export folder gives the same text: the same θ_g, the same sampler.
    out = tmp_path / "out"
    assert CliRunner().invoke(locod, ["export", str(hf_run["state"]), str(out)]).exit_code == 0
    from_export = CliRunner().invoke(locod, ["sample", str(out), *args[2:], "--seed", "1"])
    assert from_export.exit_code == 0, from_export.output
    assert from_export.stdout == first.stdout


def test_sample_works_for_byte_models(byte_run: dict[str, Any]) -> None:
    result = CliRunner().invoke(
        locod, ["sample", str(byte_run["state"]), "--prompt", "x = ", "--max-new-tokens", "5"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("x = ")


def test_export_and_sample_start_no_network(byte_run: dict[str, Any], tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from locod.daemon.cli import locod\n"
        f"locod.main(['export', {str(byte_run['state'])!r}, {str(tmp_path / 'o')!r}],"
        " standalone_mode=False)\n"
        f"locod.main(['sample', {str(byte_run['state'])!r}, '--max-new-tokens', '2'],"
        " standalone_mode=False)\n"
        "bad = ('grpc', 'hivemind')\n"
        "print('LOADED:' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in bad)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "LOADED:"


# -- what goes wrong ------------------------------------------------------------------------


def test_a_state_dir_without_checkpoint_is_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(locod, ["export", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{tmp_path} holds no checkpoint" in result.output


def test_a_non_empty_target_is_left_alone(byte_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(locod, ["export", str(byte_run["state"]), str(out)])
    assert result.exit_code == 1 and "is not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    replaced = CliRunner().invoke(
        locod, ["export", str(byte_run["state"]), str(out), "--overwrite"]
    )
    assert replaced.exit_code == 0, replaced.output
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_checkpoint_of_another_model_is_refused(hf_run: dict[str, Any]) -> None:
    result = CliRunner().invoke(
        locod, ["export", str(hf_run["state"]), "/nonexistent/out", "--model", "tiny"]
    )
    assert result.exit_code == 1
    assert "does not fit model tiny" in result.output


def test_a_model_built_in_python_needs_its_spec(byte_run: dict[str, Any]) -> None:
    checkpoint = load_checkpoint(byte_run["state"])
    assert checkpoint is not None
    checkpoint["run_config"] = {**checkpoint["run_config"], "model": "custom"}
    with pytest.raises(ExportError, match="the run's model 'custom' cannot be rebuilt here"):
        global_model(checkpoint)
    model, _ = global_model(checkpoint, model_spec="tiny")
    assert isinstance(model, ByteTransformer)


def test_a_fingerprint_in_the_run_config_is_checked(hf_run: dict[str, Any]) -> None:
    checkpoint = load_checkpoint(hf_run["state"])
    assert checkpoint is not None
    checkpoint["run_config"] = {**checkpoint["run_config"], "model_fingerprint": "0" * 16}
    with pytest.raises(ExportError, match="is not the run's model: the fingerprints differ"):
        global_model(checkpoint)


# -- the sampler ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> CausalLM:
    return build_model("tiny", seed=0)


def test_greedy_sampling_takes_the_likeliest_token_each_step(tiny: CausalLM) -> None:
    prompt = [ord(c) for c in "def "]
    got = sample(tiny, prompt, 6, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt) :]
    assert sample(tiny, prompt, 6, temperature=1.0, top_k=1, seed=9) == got


def test_sampling_is_seeded_and_stays_in_the_vocabulary_limit(tiny: CausalLM) -> None:
    prompt = [10]
    a = sample(tiny, prompt, 30, temperature=1.5, seed=1, vocab_limit=20)
    assert a == sample(tiny, prompt, 30, temperature=1.5, seed=1, vocab_limit=20)
    assert a != sample(tiny, prompt, 30, temperature=1.5, seed=2, vocab_limit=20)
    assert all(0 <= i < 20 for i in a)
    assert sample(tiny, prompt, 0) == []


def test_sampling_crops_the_context_to_the_models_length(tiny: CausalLM) -> None:
    long_prompt = [65] * 300  # tiny takes 256
    assert len(sample(tiny, long_prompt, 3, temperature=0)) == 3


def test_bad_sampling_arguments_are_refused(tiny: CausalLM) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        sample(tiny, [], 3)
    with pytest.raises(ValueError, match=r"prompt ids must be in \[0, 256\)"):
        sample(tiny, [256], 3)
    with pytest.raises(ValueError, match="0 or more"):
        sample(tiny, [1], 3, temperature=-1)


def test_sample_text_decodes_the_continuation(tiny: CausalLM) -> None:
    text = sample_text(tiny, ByteTokenizer(), "", 8, temperature=0)
    expected = sample(tiny, [10], 8, temperature=0)
    assert text == bytes(expected).decode("utf-8", errors="replace")
