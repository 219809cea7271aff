"""Transformers causal LMs from a local folder (``--model hf:PATH``), offline, as a CausalLM.

The folder holds a transformers ``config.json`` and, optionally, weights:

* ``config.json`` alone — a freshly initialised model, seeded by the caller
  (:func:`peer.model.build_model` seeds torch's generator), so every peer that builds it
  with the same seed holds the same weights;
* ``config.json`` and ``*.safetensors`` (one file or shards with their index) — a
  checkpoint, e.g. a model downloaded earlier or one ``locod export`` wrote.

Nothing is downloaded: every transformers call passes ``local_files_only=True``, and
``trust_remote_code=False`` refuses models whose code lives in the folder rather than in
transformers. Pickled ``pytorch_model.bin`` weights are refused too (loading them runs
arbitrary code); convert them to safetensors first. Weights are held in fp32 whatever the
checkpoint's dtype, like the byte model: the inner optimizer keeps fp32 master weights and
autocasts to bf16 on CUDA.

transformers is imported here only inside functions, and this module only when an
``hf:`` spec is built, so byte-level runs never load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locod.peer.fragments import find_blocks
from locod.peer.model import CausalLM, ModelError

HF_EXTRA_HINT = "install the optional extra: pip install 'locod[hf]'"

# Config fields that do not change the function a model computes: bookkeeping, output
# switches, generation defaults, token ids used only by generation, how weights were first
# initialised, the dtype they were saved in, the attention kernel. Everything else in a
# config (widths, depths, heads, activations, norms, rope, dropout, tying) must agree.
_NOT_ARCHITECTURE = frozenset(
    {
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "problem_type",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "initializer_range",
        "initializer_factor",
        "attn_implementation",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "num_return_sequences",
    }
)


def architecture_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a transformers config that every peer must share (see above)."""
    return {
        key: value
        for key, value in sorted(config.items())
        if key not in _NOT_ARCHITECTURE
        and not key.startswith("_")
        and not key.startswith("summary_")
    }


class HFCausalLM(CausalLM):
    """A transformers causal LM behind locod's model interface.

    ``hf`` is the transformers model (``hf.save_pretrained`` writes it back out);
    ``blocks`` lists its repeated decoder layers (``model.layers`` of Llama-likes,
    ``transformer.h`` of GPT-2-likes, ...), as a plain list so that they are not registered
    twice: parameter names and state dicts are those of ``hf`` under the prefix ``hf.``.
    """

    def __init__(self, hf: nn.Module, *, source: Path) -> None:
        super().__init__()
        # Typed Any: a transformers PreTrainedModel (config, save_pretrained, ...), whose
        # types mypy is not asked to follow.
        self.hf: Any = hf
        self.source = source
        """The folder the model was built from."""
        blocks = find_blocks(hf)
        self.blocks: list[nn.Module] = list(blocks) if blocks is not None else []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab) for int64 ``tokens`` of shape (batch, seq)."""
        limit = self.max_seq_len
        if limit is not None and tokens.shape[1] > limit:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's {limit}")
        logits: torch.Tensor = self.hf(input_ids=tokens, use_cache=False).logits
        return logits

    @property
    def vocab_size(self) -> int:
        return int(self.hf.config.vocab_size)

    @property
    def max_seq_len(self) -> int | None:
        # GPT-2's n_positions and others are aliased to this name by their configs.
        value = getattr(self.hf.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def architecture(self) -> dict[str, Any]:
        return {"class": type(self.hf).__name__, **architecture_fields(self.hf.config.to_dict())}


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars off for the body (loading a small model draws several on
    stderr, between locod's own lines), then back as they were."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ModelError(f"hf: models need transformers ({error}); {HF_EXTRA_HINT}") from error
    return transformers


def _check_folder(folder: Path) -> bool:
    """Raise ModelError unless ``folder`` can hold a model; True if it holds weights."""
    if not folder.exists():
        raise ModelError(f"hf model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelError(
            f"hf model path {folder} is not a folder; give the folder that holds config.json"
        )
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(
            f"hf model folder {folder} has no config.json; a transformers model folder "
            "needs one (the weights are optional: without them the model starts from random)"
        )
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{config} is not a readable JSON file: {error}") from error
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelError(
            f"{config} has no model_type; it is not a transformers config "
            "(save one with config.save_pretrained(folder))"
        )
    if any(folder.glob("*.safetensors")):
        return True
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt")
    )
    if pickled:
        raise ModelError(
            f"hf model folder {folder} holds pickled weights ({', '.join(pickled)}), which "
            "locod does not load (unpickling runs code); save them as safetensors: "
            "model.save_pretrained(folder) with transformers >= 4.35"
        )
    return False


def build_hf_model(
    folder: Path, *, vocab_size: int | None = None, shapes_only: bool = False
) -> HFCausalLM:
    """The model in ``folder`` (random init from its config, or its safetensors weights).

    The caller seeds torch's generator (random init and any weights a checkpoint lacks).
    ModelError names what is wrong: a missing folder or config, pickled weights, a config
    transformers does not know as a causal LM, a model that is not causal, or fewer
    embedding rows than ``vocab_size``. ``shapes_only`` builds from the config alone on
    torch's meta device (no memory, no weights read, no causality check): for sizes.
    """
    has_weights = _check_folder(folder) and not shapes_only
    transformers = _import_transformers()
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        with quiet_progress(), torch.device("meta" if shapes_only else "cpu"):
            if has_weights:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.float32, use_safetensors=True, **common
                )
            else:
                config = transformers.AutoConfig.from_pretrained(folder, **common)
                model = transformers.AutoModelForCausalLM.from_config(
                    config, dtype=torch.float32, trust_remote_code=False
                )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ModelError(
            f"transformers cannot build a causal LM from {folder}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
        ) from error
    adapter = HFCausalLM(model, source=folder)
    if not shapes_only:
        _check_causal(adapter, folder)
    if vocab_size is not None and adapter.vocab_size < vocab_size:
        raise ModelError(
            f"the model in {folder} has {adapter.vocab_size} vocabulary rows but the data's "
            f"tokenizer has {vocab_size} ids; raise vocab_size in {folder / 'config.json'} "
            f"to at least {vocab_size}"
        )
    return adapter


@torch.no_grad()
def _check_causal(model: HFCausalLM, folder: Path) -> None:
    """Refuse a model whose predictions see later tokens (an encoder such as BERT, which
    transformers will also build as a 'causal LM'): it would learn to copy, not to predict.

    Changing the last token of a short random sequence must leave every earlier position's
    logits as they were: up to fp32 rounding of a kernel that blocks its sums differently
    (~1e-6 of the logits' scale), where a model that looks ahead moves them by a good
    fraction of that scale (a tenth, for a freshly initialised BERT).
    """
    length = min(8, model.max_seq_len or 8)
    if length < 2:
        return
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (1, length), generator=generator)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.vocab_size
    was_training = model.training
    model.eval()
    try:
        before, after = model(ids)[0, :-1], model(changed)[0, :-1]
    finally:
        model.train(was_training)
    scale = 1.0 + float(before.abs().max())
    if float((before - after).abs().max()) > 1e-4 * scale:
        raise ModelError(
            f"the model in {folder} ({type(model.hf).__name__}) is not causal: its predictions "
            "depend on later tokens; locod trains decoder-only language models"
        )
