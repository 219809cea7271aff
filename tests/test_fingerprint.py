"""peer.fingerprint: what peers must agree on about a model, hashed and told in words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_helpers import llama_folder
from torch import nn

from locod.peer.fingerprint import (
    describe_difference,
    fingerprint,
    model_description,
    model_fingerprint,
)
from locod.peer.model import build_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp")
    return {
        "base": llama_folder(root / "base", 300),
        "same": llama_folder(root / "same", 300, use_cache=False, bos_token_id=7),
        "wider": llama_folder(root / "wider", 300, intermediate_size=96),
        "untied": llama_folder(root / "untied", 300, tie_word_embeddings=False),
        "theta": llama_folder(root / "theta", 300, rope_theta=500.0),
    }


def _describe(folder: Path, seed: int = 0) -> dict[str, object]:
    return model_description(build_model(f"hf:{folder}", seed=seed))


def test_the_same_model_has_the_same_fingerprint_whatever_its_weights_or_folder(
    folders: dict[str, Path],
) -> None:
    a, b = (
        build_model(f"hf:{folders['base']}", seed=0),
        build_model(f"hf:{folders['base']}", seed=1),
    )
    assert model_fingerprint(a) == model_fingerprint(b)
    assert len(model_fingerprint(a)) == 16
    # Generation-only settings (use_cache, token ids) do not make another model.
    assert model_fingerprint(build_model(f"hf:{folders['same']}", seed=0)) == model_fingerprint(a)


def test_the_description_is_plain_json(folders: dict[str, Path]) -> None:
    description = _describe(folders["base"])
    assert json.loads(json.dumps(description)) == description
    assert fingerprint(description) == model_fingerprint(
        build_model(f"hf:{folders['base']}", seed=0)
    )
    params = description["parameters"]
    assert isinstance(params, list)
    assert params[0] == ["hf.model.embed_tokens.weight", [300, 32], "float32", True]


def test_a_wider_mlp_is_named_with_both_values(folders: dict[str, Path]) -> None:
    ours, theirs = _describe(folders["wider"]), _describe(folders["base"])
    assert fingerprint(ours) != fingerprint(theirs)
    lines = describe_difference(ours, theirs)
    assert lines[0] == "model intermediate_size: this peer has 96, the run has 64"
    assert (
        "parameter hf.model.layers.0.mlp.gate_proj.weight: shape [96, 32] on this peer, "
        "[64, 32] on the run"
    ) in lines
    # Four layers × three MLP matrices differ: the list is cut and counts the rest.
    assert len(lines) == 9 and lines[-1] == "... and 5 more difference(s)"


def test_an_untied_head_is_a_parameter_only_one_side_has(folders: dict[str, Path]) -> None:
    lines = describe_difference(_describe(folders["untied"]), _describe(folders["base"]))
    assert "model tie_word_embeddings: this peer has False, the run has True" in lines
    assert "parameter hf.lm_head.weight exists only on this peer" in lines


def test_an_architecture_field_without_a_shape_is_still_told(folders: dict[str, Path]) -> None:
    ours, theirs = _describe(folders["theta"]), _describe(folders["base"])
    assert ours["parameters"] == theirs["parameters"]
    assert fingerprint(ours) != fingerprint(theirs)
    assert any(
        line.startswith("model rope_parameters:") for line in describe_difference(ours, theirs)
    )


def test_byte_presets_and_plain_modules_are_described_too() -> None:
    tiny, small = build_model("tiny", seed=0), build_model("small", seed=0)
    lines = describe_difference(model_description(tiny), model_description(small))
    assert "model d_model: this peer has 64, the run has 256" in lines
    plain = model_description(nn.Linear(2, 3))
    assert plain["architecture"] == {"class": "Linear"}
    frozen = nn.Linear(2, 3)
    frozen.bias.requires_grad_(False)
    assert describe_difference(model_description(frozen), plain) == [
        "parameter bias: trainable False on this peer, True on the run"
    ]
    assert describe_difference(plain, plain) == []
