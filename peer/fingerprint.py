"""What every peer of a run must agree on about its model, as a dict, a hash and words.

Two peers can only average fragments if their models have the same parameters (names,
shapes, dtypes, which are trainable) and compute the same function of them (the
architecture: a preset's :class:`ModelConfig`, a transformers config's modelling fields).
:func:`model_description` gathers that as plain JSON values, :func:`fingerprint` hashes a
description (short enough for a run config), and :func:`describe_difference` turns two
descriptions into the sentences a refused peer reads.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

FINGERPRINT_CHARS = 16
_MAX_LINES = 8


def model_description(model: nn.Module) -> dict[str, Any]:
    """The model's architecture and parameter list, as JSON values (the hashed dict).

    ``architecture`` comes from the model's ``architecture()`` when it has one (every model
    :func:`peer.model.build_model` returns does), from its transformers ``config`` for a
    transformers model used directly, else it is the class name alone.
    ``parameters`` lists ``[name, shape, dtype, trainable]`` once per parameter (a tied
    parameter under its first name only).
    """
    describe = getattr(model, "architecture", None)
    config = getattr(model, "config", None)
    if callable(describe):
        architecture = describe()
    elif callable(getattr(config, "to_dict", None)):
        # A transformers model the user built: its config says what it is.
        from locod.peer.hf import architecture_fields

        architecture = {
            "class": type(model).__name__,
            **architecture_fields(config.to_dict()),  # type: ignore[union-attr]
        }
    else:
        architecture = {"class": type(model).__qualname__}
    parameters = [
        [name, list(param.shape), str(param.dtype).removeprefix("torch."), param.requires_grad]
        for name, param in model.named_parameters()
    ]
    # Round-trip through JSON so the dict is exactly what a peer would receive.
    description: dict[str, Any] = json.loads(
        json.dumps({"architecture": architecture, "parameters": parameters}, default=str)
    )
    return description


def fingerprint(description: dict[str, Any]) -> str:
    """A short hash of a description: equal fingerprints mean equal descriptions."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def model_fingerprint(model: nn.Module) -> str:
    """``fingerprint(model_description(model))``."""
    return fingerprint(model_description(model))


def describe_difference(
    ours: dict[str, Any],
    theirs: dict[str, Any],
    *,
    our_name: str = "this peer",
    their_name: str = "the run",
) -> list[str]:
    """Each way two descriptions differ, in words (at most a few lines, then a count).

    An empty list means the descriptions are equal.
    """
    lines: list[str] = []
    arch_a, arch_b = ours.get("architecture", {}), theirs.get("architecture", {})
    for key in sorted(set(arch_a) | set(arch_b)):
        a, b = arch_a.get(key, "(absent)"), arch_b.get(key, "(absent)")
        if a != b:
            lines.append(f"model {key}: {our_name} has {a!r}, {their_name} has {b!r}")
    params_a = {p[0]: p[1:] for p in ours.get("parameters", [])}
    params_b = {p[0]: p[1:] for p in theirs.get("parameters", [])}
    for name in sorted(params_a.keys() - params_b.keys()):
        lines.append(f"parameter {name} exists only on {our_name}")
    for name in sorted(params_b.keys() - params_a.keys()):
        lines.append(f"parameter {name} exists only on {their_name}")
    labels = ("shape", "dtype", "trainable")
    for name in sorted(params_a.keys() & params_b.keys()):
        for label, a, b in zip(labels, params_a[name], params_b[name], strict=False):
            if a != b:
                lines.append(f"parameter {name}: {label} {a} on {our_name}, {b} on {their_name}")
    if not lines and [p[0] for p in ours.get("parameters", [])] != [
        p[0] for p in theirs.get("parameters", [])
    ]:
        lines.append(f"the parameters are in a different order on {our_name} and {their_name}")
    if len(lines) > _MAX_LINES:
        extra = len(lines) - _MAX_LINES
        lines = [*lines[:_MAX_LINES], f"... and {extra} more difference(s)"]
    return lines
