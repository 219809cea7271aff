"""Fragments of any model: blocks found where they are, parameter order, explicit names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_helpers import llama_folder
from torch import nn

from locod.peer.fragments import (
    auto_fragments,
    contiguous_runs,
    derive_fragments,
    find_blocks,
    partition_by_order,
    partition_named,
)
from locod.peer.hf import HFCausalLM
from locod.peer.model import build_model


def _assert_partition(model: nn.Module, fragments: list) -> None:
    """Every trainable parameter exactly once, no fragment empty."""
    ids = [id(p) for f in fragments for p in f.params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(f.params for f in fragments)
    assert [f.index for f in fragments] == list(range(len(fragments)))


class NoBlocks(nn.Module):
    """A user's model with no list of blocks: an embedding, three layers, a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)  # 40
        self.first = nn.Linear(4, 8)  # 32 + 8
        self.second = nn.Linear(8, 8)  # 64 + 8
        self.third = nn.Linear(8, 4)  # 32 + 4
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: counted once, in fragment 0


# -- finding blocks ---------------------------------------------------------------------------


def test_the_byte_transformer_has_its_blocks() -> None:
    model = build_model("tiny", seed=0)
    blocks = find_blocks(model)
    assert blocks is not None and len(blocks) == 4
    assert all(a is b for a, b in zip(blocks, model.blocks, strict=True))


def test_a_transformers_llama_gets_its_model_layers_as_blocks(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = llama_folder(tmp_path, 300)
    raw = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    blocks = find_blocks(raw)
    assert blocks is not None
    assert all(a is b for a, b in zip(blocks, raw.model.layers, strict=True))
    assert len(blocks) == 4

    # Through locod's adapter: the same layers, and fragment 0 holds what is outside them.
    model = build_model(f"hf:{folder}", seed=0)
    assert isinstance(model, HFCausalLM)
    fragments = derive_fragments(model, 3)
    _assert_partition(model, fragments)
    assert set(fragments[0].names) == {"hf.model.embed_tokens.weight", "hf.model.norm.weight"}
    assert all(".layers.0." in n or ".layers.2." in n for n in fragments[1].names)
    assert all(".layers.1." in n or ".layers.3." in n for n in fragments[2].names)
    assert auto_fragments(model) == 3  # 1 + ⌈4 / 3⌉


def test_a_gpt2_gets_its_transformer_h_as_blocks() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50, n_positions=16)
    )
    blocks = find_blocks(model)
    assert blocks is not None
    assert all(a is b for a, b in zip(blocks, model.transformer.h, strict=True))


def test_the_longest_list_of_same_class_modules_is_taken_when_no_name_is_known() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh()])
            self.trunk = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    model = Odd()
    blocks = find_blocks(model)
    assert blocks is not None and all(a is b for a, b in zip(blocks, model.trunk, strict=True))


def test_a_model_without_repeated_modules_has_no_blocks() -> None:
    assert find_blocks(NoBlocks()) is None
    assert auto_fragments(NoBlocks()) == 1


# -- by parameter order ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "runs", "expected"),
    [
        ([1] * 6, 3, [0, 0, 1, 1, 2, 2]),
        ([1] * 10, 3, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]),  # largest run 4 is the least possible
        ([5, 1, 1, 1, 1, 1], 2, [0, 1, 1, 1, 1, 1]),
        ([1, 1, 1, 1, 1, 5], 2, [0, 0, 0, 0, 0, 1]),
        ([9, 1, 1], 3, [0, 1, 2]),  # as many runs as items: one each
        ([3, 3, 3], 1, [0, 0, 0]),
    ],
)
def test_contiguous_runs_make_the_largest_run_smallest(
    sizes: list[int], runs: int, expected: list[int]
) -> None:
    assert contiguous_runs(sizes, runs) == expected


def test_a_module_without_blocks_is_fragmented_by_parameter_order() -> None:
    model = NoBlocks()
    fragments = derive_fragments(model, 3)
    _assert_partition(model, fragments)
    # Fragment 0: the embedding (and the head tied to it, counted once).
    assert fragments[0].names == ("embed.weight",)
    # The rest in order: sizes 32, 8, 64, 8, 32, 4 (total 148) cut in two runs; the least
    # possible largest run is 104 = 32 + 8 + 64, leaving 8 + 32 + 4 = 44.
    assert fragments[1].names == ("first.weight", "first.bias", "second.weight")
    assert fragments[2].names == ("second.bias", "third.weight", "third.bias")
    assert (fragments[1].numel, fragments[2].numel) == (104, 44)
    assert partition_by_order(model, 1)[0].numel == 40 + 148


def test_a_model_without_embeddings_starts_fragment_zero_with_its_first_run() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    fragments = partition_by_order(model, 3)
    _assert_partition(model, fragments)
    assert fragments[0].names == ("0.weight", "0.bias")
    assert fragments[2].names == ("2.weight", "2.bias")


def test_too_many_fragments_by_order_says_how_many_fit() -> None:
    with pytest.raises(ValueError, match="use at most 7 fragments"):
        partition_by_order(NoBlocks(), 8)


def test_frozen_parameters_are_in_no_fragment() -> None:
    model = NoBlocks()
    model.first.weight.requires_grad_(False)
    fragments = partition_by_order(model, 2)
    _assert_partition(model, fragments)
    assert "first.weight" not in [n for f in fragments for n in f.names]


# -- explicit names -------------------------------------------------------------------------


def test_explicit_fragments_are_taken_as_given_in_model_order() -> None:
    model = NoBlocks()
    names = [
        ["embed.weight", "third.bias"],
        ["second.bias", "second.weight", "first.weight", "first.bias"],
        ["third.weight"],
    ]
    fragments = derive_fragments(model, 3, names=names)
    _assert_partition(model, fragments)
    assert fragments[0].names == ("embed.weight", "third.bias")
    assert fragments[1].names == ("first.weight", "first.bias", "second.weight", "second.bias")


def test_a_tied_parameter_may_be_named_by_either_name_once() -> None:
    model = NoBlocks()
    rest = ["first.weight", "first.bias", "second.weight", "second.bias"]
    rest += ["third.weight", "third.bias"]
    fragments = partition_named(model, [["head.weight"], rest])
    assert fragments[0].names == ("embed.weight",)
    with pytest.raises(ValueError, match=r"'head\.weight' in fragment 1 is already in fragment 0"):
        partition_named(model, [["embed.weight"], [*rest, "head.weight"]])


def test_explicit_fragments_name_every_problem() -> None:
    model = NoBlocks()
    model.third.bias.requires_grad_(False)
    names = [["embed.weight", "frist.weight", "first.weight"], ["first.weight", "third.bias"], []]
    with pytest.raises(ValueError) as caught:
        partition_named(model, names)
    message = str(caught.value)
    assert (
        "'frist.weight' in fragment 0 is not a parameter (did you mean 'first.weight'?)" in message
    )
    assert "'first.weight' in fragment 1 is already in fragment 0" in message
    assert "'third.bias' in fragment 1 is frozen" in message
    assert "fragment 2 is empty" in message
    assert (
        "not in any fragment: 'first.bias', 'second.weight', 'second.bias', 'third.weight'"
        in message
    )


def test_explicit_fragments_must_match_the_fragment_count() -> None:
    with pytest.raises(
        ValueError, match="2 explicit fragments were given but the number of fragments is 3"
    ):
        derive_fragments(NoBlocks(), 3, names=[["a"], ["b"]])


def test_a_transformers_head_goes_to_fragment_zero_when_no_blocks_are_found() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=20, n_positions=8)
    model = GPT2LMHeadModel(config)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie

    class Wrapper(nn.Module):  # hides transformer.h from the known names
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

    fragments = partition_by_order(Wrapper(), 3)
    _assert_partition(model, fragments)
    names0 = set(fragments[0].names)
    assert {"inner.transformer.wte.weight", "inner.transformer.wpe.weight"} <= names0
    assert "inner.lm_head.weight" in names0
