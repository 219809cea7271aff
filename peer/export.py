"""See what was trained: θ_g out of a checkpoint, into a folder others can load.

What is exported is θ_g, the outer parameters every peer shares (the papers evaluate
them: they beat any single replica), not the local θ of the peer that wrote the
checkpoint. :func:`global_model` rebuilds the run's model from the checkpoint's run config,
loads the local state dict (for buffers and frozen parameters) and then copies θ_g over
every fragment, derived as the run derived them.

Layout of an export folder:

* a transformers model (``hf:`` spec) — what ``save_pretrained`` writes (``config.json``,
  ``model.safetensors``, shards and index for large models), so that
  ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it and ``--model hf:OUT`` trains on
  from it;
* a byte-level preset — ``model.safetensors`` (the state dict, names as in
  :class:`peer.model.ByteTransformer`) and ``locod_model.json``:
  ``{"format": "locod-byte-transformer", "version": 1, "config": {ModelConfig fields}}``;
* either — ``tokenizer.json`` (and a ``tokenizer_config.json`` naming transformers'
  ``PreTrainedTokenizerFast``, so ``AutoTokenizer.from_pretrained(OUT)`` works too) when
  the run read its data through a tokenizer, and ``locod_export.json`` saying where the
  weights came from (run config, step).

:func:`load_export` reads either kind back. The folder is written next to its final place
and renamed into it, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from locod.peer.fingerprint import describe_difference, model_description, model_fingerprint
from locod.peer.fragments import assign_flat, derive_fragments
from locod.peer.hf import HF_EXTRA_HINT, HFCausalLM, quiet_progress
from locod.peer.model import (
    ByteTransformer,
    CausalLM,
    ModelConfig,
    ModelError,
    build_model,
    seeded,
)
from locod.peer.tokenizer import (
    TOKENIZER_FILE,
    ByteTokenizer,
    FileTokenizer,
    TextTokenizer,
    load_tokenizer,
)

BYTE_META = "locod_model.json"
BYTE_FORMAT = "locod-byte-transformer"
BYTE_FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
PROVENANCE = "locod_export.json"


class ExportError(ValueError):
    """θ_g cannot be rebuilt or written: the message names the file or setting to fix."""


def global_model(
    checkpoint: dict[str, Any],
    *,
    model_spec: str | None = None,
    tokenizer_path: str | Path | None = None,
) -> tuple[CausalLM, FileTokenizer | None]:
    """The run's model holding θ_g, and the run's tokenizer (None: bytes).

    ``checkpoint`` is what ``daemon.checkpoint.load_checkpoint`` returns. Its run config
    gives the model spec, seed, fragment count and layout, and where the run records
    them, its tokenizer (``tokenizer``: a path), explicit fragments (``fragment_names``)
    and the model's fingerprint (``model_fingerprint``). ``model_spec`` and
    ``tokenizer_path`` stand in for the run config's when the files moved.
    """
    run = checkpoint.get("run_config")
    if not isinstance(run, dict):
        raise ExportError("the checkpoint has no run config; it is not a locod checkpoint")
    spec = model_spec or run.get("model")
    if not isinstance(spec, str):
        raise ExportError("the checkpoint's run config names no model; pass the model spec")
    tokenizer_path = tokenizer_path or checkpoint.get("tokenizer") or run.get("tokenizer") or None
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    try:
        model = build_model(
            spec,
            seed=int(run.get("seed", 0)),
            vocab_size=tokenizer.vocab_size if tokenizer else None,
        )
    except ModelError as error:
        raise ExportError(
            f"the run's model {spec!r} cannot be rebuilt here ({error}); give its spec "
            "(--model: a preset or hf:PATH), or export from the code that built it "
            "with peer.export.export_model"
        ) from error
    expected = run.get("model_fingerprint")
    if isinstance(expected, str) and expected != model_fingerprint(model):
        theirs = run.get("model_description")
        why = (
            "; ".join(describe_difference(model_description(model), theirs, their_name="the run"))
            if isinstance(theirs, dict)
            else "the fingerprints differ"
        )
        raise ExportError(f"model {spec} is not the run's model: {why}")
    try:
        model.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as error:
        hint = "" if tokenizer else " (if the run read its data through a tokenizer, give it)"
        raise ExportError(
            f"the checkpoint's model does not fit model {spec}{hint}: "
            f"{str(error).strip().splitlines()[0]}"
        ) from error
    outer = checkpoint.get("outer")
    global_params = outer.get("global_params") if isinstance(outer, dict) else None
    if not isinstance(global_params, list) or not all(
        isinstance(g, torch.Tensor) for g in global_params
    ):
        raise ExportError("the checkpoint holds no outer parameters θ_g (outer.global_params)")
    fragments = derive_fragments(
        model,
        int(run.get("fragments", len(global_params))),
        str(run.get("layout", "strided")),
        names=run.get("fragment_names"),
    )
    if len(fragments) != len(global_params):
        raise ExportError(
            f"the checkpoint holds θ_g for {len(global_params)} fragments, "
            f"the run config's model splits into {len(fragments)}"
        )
    for fragment, values in zip(fragments, global_params, strict=True):
        if values.numel() != fragment.numel:
            raise ExportError(
                f"θ_g of fragment {fragment.index} holds {values.numel()} values, the model's "
                f"fragment {fragment.index} has {fragment.numel}: the checkpoint was written "
                "for another model or fragment layout"
            )
        assign_flat(fragment.params, values)
    return model, tokenizer


def export_model(
    model: CausalLM,
    out: Path,
    *,
    tokenizer: FileTokenizer | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and ``tokenizer``) to the folder ``out`` in the layout above."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"export target {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"export target {out} is not empty; choose a new folder or overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-export-"))
    try:
        if isinstance(model, HFCausalLM):
            with quiet_progress():
                model.hf.save_pretrained(staging)
        elif isinstance(model, ByteTransformer):
            _save_safetensors(model, staging / WEIGHTS)
            meta = {
                "format": BYTE_FORMAT,
                "version": BYTE_FORMAT_VERSION,
                "config": asdict(model.cfg),
            }
            (staging / BYTE_META).write_text(json.dumps(meta, indent=2) + "\n")
        else:
            raise ExportError(f"cannot export a {type(model).__name__}: not a model locod built")
        if tokenizer is not None:
            (staging / TOKENIZER_FILE).write_text(tokenizer.to_json())
            (staging / "tokenizer_config.json").write_text(
                json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n"
            )
        (staging / PROVENANCE).write_text(
            json.dumps(provenance or {}, indent=2, sort_keys=True, default=str) + "\n"
        )
        _replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _save_safetensors(model: torch.nn.Module, path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as error:
        raise ExportError(f"exporting needs safetensors ({error}); {HF_EXTRA_HINT}") from error
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def _replace_folder(staging: Path, out: Path) -> None:
    """Put ``staging`` where ``out`` is: a rename, so ``out`` is never half-written."""
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-old-"))
        os.replace(out, old / "previous")
        try:
            os.replace(staging, out)
        except OSError:
            os.replace(old / "previous", out)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def load_export(folder: Path) -> tuple[CausalLM, TextTokenizer]:
    """A model and tokenizer from an export folder (either layout; bytes if no tokenizer)."""
    folder = Path(folder)
    tokenizer: TextTokenizer = (
        load_tokenizer(folder) if (folder / TOKENIZER_FILE).is_file() else ByteTokenizer()
    )
    meta_path = folder / BYTE_META
    if not meta_path.is_file():
        return build_model(f"hf:{folder}", seed=0), tokenizer
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != BYTE_FORMAT or meta.get("version") != BYTE_FORMAT_VERSION:
            raise ExportError(
                f"{meta_path} is not a {BYTE_FORMAT} version {BYTE_FORMAT_VERSION} description"
            )
        cfg = ModelConfig(**meta["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ExportError(f"{meta_path} cannot be read: {error}") from error
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ExportError(
            f"loading an export needs safetensors ({error}); {HF_EXTRA_HINT}"
        ) from error
    with seeded(0):
        model = ByteTransformer(cfg)
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (OSError, RuntimeError) as error:
        raise ExportError(
            f"{folder / WEIGHTS} does not hold this model's weights: {error}"
        ) from error
    return model, tokenizer


def export_provenance(checkpoint: dict[str, Any], spec: str) -> dict[str, Any]:
    """What ``locod_export.json`` records about a checkpoint's θ_g."""
    return {
        "weights": "θ_g (outer parameters)",
        "model": spec,
        "step": checkpoint.get("step"),
        "tokens": checkpoint.get("tokens"),
        "run_config": checkpoint.get("run_config"),
    }
