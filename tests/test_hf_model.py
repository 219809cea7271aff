"""peer.model's builder and peer.hf: transformers causal LMs from local folders, offline."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_helpers import llama_folder, tokens
from torch import nn

from locod.peer.hf import HFCausalLM
from locod.peer.inner import InnerConfig, InnerTrainer, evaluate
from locod.peer.model import (
    VOCAB_SIZE,
    ByteTransformer,
    ModelError,
    build_model,
    check_model_spec,
    count_parameters,
    model_config,
    model_shape,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
VOCAB = 300


@pytest.fixture(scope="module")
def config_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("llama"), VOCAB)


def test_config_alone_builds_a_seeded_random_model(config_only: Path) -> None:
    a = build_model(f"hf:{config_only}", seed=3)
    b = build_model(f"hf:{config_only}", seed=3)
    c = build_model(f"hf:{config_only}", seed=4)
    assert isinstance(a, HFCausalLM) and type(a.hf).__name__ == "LlamaForCausalLM"
    assert (a.vocab_size, a.max_seq_len) == (VOCAB, 64)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    for (name, x), (_, y), (_, z) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(x, y), name
        if "norm" not in name:  # RMSNorm weights start at exactly 1 whatever the seed
            assert not torch.equal(x, z), name


def test_building_leaves_the_global_rng_where_it_was(config_only: Path) -> None:
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    build_model(f"hf:{config_only}", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_blocks_are_the_decoder_layers_and_tied_weights_count_once(config_only: Path) -> None:
    model = build_model(f"hf:{config_only}", seed=0)
    assert isinstance(model, HFCausalLM)
    layers = list(model.hf.model.layers)
    assert len(model.blocks) == 4 and all(a is b for a, b in zip(model.blocks, layers, strict=True))
    # The plain list registers nothing twice: names are the transformers model's under "hf.".
    names = [name for name, _ in model.named_parameters()]
    assert all(name.startswith("hf.") for name in names)
    assert "hf.lm_head.weight" not in names  # tied to the embedding
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight
    assert not any(key.startswith("blocks") for key in model.state_dict())


def test_loss_is_the_fp32_cross_entropy_of_the_logits_about_ln_vocab(config_only: Path) -> None:
    model = build_model(f"hf:{config_only}", seed=0)
    inputs, targets = tokens((2, 16), VOCAB, seed=1), tokens((2, 16), VOCAB, seed=2)
    with torch.no_grad():
        loss = model.loss(inputs, targets)
        logits = model.hf(input_ids=inputs).logits.float()
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    # Initial weights of std 0.02 give near-uniform predictions.
    assert abs(float(loss) - math.log(VOCAB)) < 0.1


def test_a_sequence_longer_than_the_positions_is_refused(config_only: Path) -> None:
    model = build_model(f"hf:{config_only}", seed=0)
    with pytest.raises(ValueError, match="sequence length 65 exceeds the model's 64"):
        model(tokens((1, 65), VOCAB))


def test_inner_trainer_and_evaluate_train_an_hf_model(config_only: Path) -> None:
    model = build_model(f"hf:{config_only}", seed=0)
    phrase = tokens((1, 6), VOCAB, seed=5)[0]
    batch = phrase.repeat(2, 6)[:, :33]
    inputs, targets = batch[:, :-1], batch[:, 1:]
    trainer = InnerTrainer(model, InnerConfig(lr=1e-2, warmup_steps=0), device=CPU)
    before = evaluate(model, [(inputs, targets)], CPU)
    for _ in range(15):
        trainer.train_step(inputs, targets)
    after = evaluate(model, [(inputs, targets)], CPU)
    # A repeated 6-token phrase is learnt: from ln(300) ≈ 5.7 to well under half of it.
    assert before > 5.0 and after < before / 2


def test_a_checkpoint_folder_loads_its_weights_whatever_the_seed(
    config_only: Path, tmp_path: Path
) -> None:
    trained = build_model(f"hf:{config_only}", seed=11)
    assert isinstance(trained, HFCausalLM)
    trained.hf.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    loaded = build_model(f"hf:{tmp_path / 'ckpt'}", seed=0)
    for (name, x), (_, y) in zip(
        trained.named_parameters(), loaded.named_parameters(), strict=True
    ):
        assert torch.equal(x, y), name


def test_a_bf16_checkpoint_is_held_in_fp32(config_only: Path, tmp_path: Path) -> None:
    trained = build_model(f"hf:{config_only}", seed=11)
    assert isinstance(trained, HFCausalLM)
    trained.hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = build_model(f"hf:{tmp_path / 'bf16'}", seed=0)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    expected = trained.hf.model.embed_tokens.weight.float()
    assert isinstance(loaded, HFCausalLM)
    assert torch.equal(loaded.hf.model.embed_tokens.weight, expected)


# -- what goes wrong, said clearly ---------------------------------------------------------


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        ModelError, match=f"hf model folder {re.escape(str(tmp_path / 'no'))} does not exist"
    ):
        build_model(f"hf:{tmp_path / 'no'}", seed=0)


def test_a_folder_without_config_json_says_it_needs_one(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"has no config\.json"):
        build_model(f"hf:{tmp_path}", seed=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not a readable JSON file"),
        ('{"hidden_size": 4}', "has no model_type"),
        ('["llama"]', "has no model_type"),
        ('{"model_type": "bert"}', r"\(BertLMHeadModel\) is not causal"),
        ('{"model_type": "clip"}', "transformers cannot build a causal LM"),
        ('{"model_type": "no-such-architecture"}', "transformers cannot build a causal LM"),
    ],
)
def test_an_unusable_config_is_refused_with_the_reason(
    tmp_path: Path, content: str, message: str
) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelError, match=message):
        build_model(f"hf:{tmp_path}", seed=0)


def test_pickled_weights_are_refused(config_only: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((config_only / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelError, match=r"pickled weights \(pytorch_model.bin\)"):
        build_model(f"hf:{tmp_path}", seed=0)


def test_a_model_with_fewer_rows_than_the_tokenizer_has_ids_is_refused(
    config_only: Path,
) -> None:
    with pytest.raises(
        ModelError, match=f"has {VOCAB} vocabulary rows but the data's tokenizer has 301"
    ):
        build_model(f"hf:{config_only}", seed=0, vocab_size=VOCAB + 1)
    assert build_model(f"hf:{config_only}", seed=0, vocab_size=VOCAB - 50).vocab_size == VOCAB


@pytest.mark.parametrize("spec", ["hf:", "hf:  ", "huge", ""])
def test_a_malformed_spec_is_refused(spec: str) -> None:
    with pytest.raises(ModelError):
        check_model_spec(spec)


def test_a_preset_is_built_for_the_tokenizers_vocabulary() -> None:
    model = build_model("tiny", seed=0, vocab_size=1000)
    assert isinstance(model, ByteTransformer)
    assert model.vocab_size == 1000 and model.token_embedding.num_embeddings == 1000
    # Fewer ids than bytes still gets the preset's 256 rows; None keeps the preset.
    assert build_model("tiny", seed=0, vocab_size=100).vocab_size == VOCAB_SIZE
    plain = build_model("tiny", seed=0)
    same = build_model(model_config("tiny"), seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), same.parameters(), strict=True)
    )


def test_evaluate_and_the_trainer_refuse_a_module_without_loss() -> None:
    with pytest.raises(TypeError, match="Linear has no loss"):
        evaluate(nn.Linear(2, 2), [], CPU)
    with pytest.raises(TypeError, match="Linear has no loss"):
        InnerTrainer(nn.Linear(2, 2), InnerConfig(), device=CPU)


def test_any_module_with_a_loss_method_is_trained_and_evaluated() -> None:
    class Bigram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(16, 16)

        def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.table(inputs).reshape(-1, 16), targets.reshape(-1))

    model = Bigram()
    batch = torch.arange(16).repeat(2, 2)[:, :17]
    trainer = InnerTrainer(model, InnerConfig(lr=0.1, warmup_steps=0), device=CPU)
    before = evaluate(model, [(batch[:, :-1], batch[:, 1:])], CPU)
    for _ in range(20):
        trainer.train_step(batch[:, :-1], batch[:, 1:])
    assert evaluate(model, [(batch[:, :-1], batch[:, 1:])], CPU) < before / 2


def test_byte_level_modules_do_not_import_the_hf_extra(tmp_path: Path) -> None:
    """Building and training a preset on a byte corpus never loads transformers & co."""
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    script = (
        "import sys, torch, pathlib\n"
        "import locod.peer as peer, pkgutil, importlib\n"
        "for info in pkgutil.iter_modules(peer.__path__):\n"
        "    importlib.import_module('locod.peer.' + info.name)\n"
        "import locod.daemon.settings, locod.daemon.cli\n"
        "from locod.peer.model import build_model\n"
        "from locod.peer.data import load_corpus, BatchSampler\n"
        "from locod.peer.inner import InnerTrainer, InnerConfig\n"
        "from locod.peer.fragments import derive_fragments\n"
        f"corpus = load_corpus([{str(tmp_path / 'a.txt')!r}],\n"
        f"    cache_dir=pathlib.Path({str(tmp_path / 'cache')!r}))\n"
        "model = build_model('tiny', seed=0, vocab_size=corpus.vocab_size)\n"
        "derive_fragments(model, 3)\n"
        "x, y = BatchSampler(corpus.train, batch_size=1, seq_len=8, seed=0).next()\n"
        "InnerTrainer(model, InnerConfig(), device=torch.device('cpu')).train_step(x, y)\n"
        "extra = ('transformers', 'tokenizers', 'safetensors', 'pyarrow')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in extra)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_nothing_is_fetched_from_the_network(
    config_only: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building from a config and from a checkpoint, with every socket connection refused."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("locod tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in [n for n in os.environ if n.startswith("HF_")]:
        monkeypatch.delenv(name)
    model = build_model(f"hf:{config_only}", seed=0)
    assert isinstance(model, HFCausalLM)
    model.hf.save_pretrained(tmp_path / "ckpt")
    again = build_model(f"hf:{tmp_path / 'ckpt'}", seed=1)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )
    assert attempts == []


def test_model_shape_matches_the_built_model_without_building_it(
    config_only: Path, tmp_path: Path
) -> None:
    for spec, vocab in ((f"hf:{config_only}", None), ("tiny", None), ("tiny", 1000)):
        shape = model_shape(spec, vocab_size=vocab)
        built = build_model(spec, seed=0, vocab_size=vocab)
        assert shape.parameters == count_parameters(built)
        assert (shape.blocks, shape.max_seq_len, shape.vocab_size) == (
            4,
            built.max_seq_len,
            built.vocab_size,
        )
    # A Llama of 1.2B parameters is sized from its config alone, on the meta device.
    big = llama_folder(
        tmp_path / "big",
        32_000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    shape = model_shape(f"hf:{big}")
    # embed + head 2·32000·2048, per layer 4·2048² + 3·2048·8192 + 2·2048 norms, final norm.
    layer = 4 * 2048**2 + 3 * 2048 * 8192 + 2 * 2048
    assert shape.parameters == 2 * 32_000 * 2048 + 16 * layer + 2048
    assert shape.blocks == 16
