"""Every setting of locod, declared once: click options, config file, environment, docs.

Each :class:`Setting` becomes a ``--flag``, a key of the ``--config`` TOML file and a
``LOCOD_<NAME>`` environment variable. Precedence, highest first: the command line, the
environment, the config file, the default. The environment never overrides a flag given on
the command line. docs/configuration.md is generated from this table (and a test checks it).

``scope`` says who must agree on a value: ``run`` settings are the run config that every
peer shares (the first peer publishes it, joiners adopt it), ``peer`` settings may differ
between peers.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from locod.peer.codec import WireFormat
from locod.peer.config import LATE_POLICIES, OuterConfig
from locod.peer.data import ReadSettings
from locod.peer.formats import TOKEN_DTYPES, CorpusError
from locod.peer.fragments import LAYOUTS
from locod.peer.inner import INNER_OPTIMIZERS, InnerConfig
from locod.peer.model import MODEL_PRESETS, ModelError, check_model_spec
from locod.peer.quantize import CODECS
from locod.peer.tokenizer import TokenizerError, load_tokenizer

F = TypeVar("F", bound=Callable[..., Any])
Scope = Literal["run", "peer"]


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its name (TOML key), type, default, help and scope."""

    name: str
    type: Any
    default: Any
    help: str
    scope: Scope = "peer"
    multiple: bool = False
    is_flag: bool = False
    secret: bool = False
    hidden: bool = False
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.removesuffix("_s").replace("_", "-")

    @property
    def envvar(self) -> str:
        return "LOCOD_" + self.name.upper()


def _choice(values: Iterable[str]) -> click.Choice:
    return click.Choice(list(values))


class ModelSpec(click.ParamType):
    """A preset name or ``hf:PATH``; the folder itself is read when the model is built."""

    name = "preset or hf:PATH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            check_model_spec(text)
        except ModelError as error:
            self.fail(str(error), param, ctx)
        return text


ALGORITHM: tuple[Setting, ...] = (
    Setting(
        "model",
        ModelSpec(),
        "small",
        f"Model: a preset ({', '.join(MODEL_PRESETS)}) or hf:PATH, a local transformers "
        "folder (config.json, with or without safetensors weights; nothing is downloaded).",
        "run",
    ),
    Setting(
        "seed",
        int,
        0,
        "Seed of the initial weights (each peer's data stream mixes in its own identity).",
        "run",
    ),
    Setting("inner_steps", int, 100, "H: inner steps between two syncs of a fragment.", "run"),
    Setting(
        "fragments",
        int,
        0,
        "P: number of fragments (0: one per ~3 blocks, plus the embeddings' fragment).",
        "run",
    ),
    Setting("layout", _choice(LAYOUTS), "strided", "How blocks are spread over fragments.", "run"),
    Setting(
        "overlap",
        int,
        1,
        "τ: inner steps between sending a fragment and applying the group's mean.",
        "run",
    ),
    Setting("alpha", float, 0.5, "α: merge θ ← α·θ + (1−α)·θ_g when a result lands.", "run"),
    Setting("outer_lr", float, 0.4, "Outer Nesterov learning rate.", "run"),
    Setting("outer_momentum", float, 0.9, "Outer momentum (0: plain outer SGD).", "run"),
    Setting("wire", _choice(CODECS), "fp4", "Wire format of outer gradients.", "run"),
    Setting("wire_block", int, 64, "Values per quantization scale.", "run"),
    Setting("zstd_level", int, 3, "zstd level after quantization (0: none)."),
    Setting("rounding", _choice(["nearest", "stochastic"]), "nearest", "Quantizer rounding."),
    Setting(
        "late_wait_s",
        float,
        60.0,
        "Seconds training waits for a result that is later than τ steps.",
    ),
    Setting(
        "late_policy",
        _choice(LATE_POLICIES),
        "apply",
        "After the late wait: apply the result whenever it comes, or skip it.",
    ),
    Setting(
        "clip_factor",
        float,
        8.0,
        "A reducer caps each contribution's norm at this "
        "multiple of the median contribution's (0: off).",
    ),
    Setting("inner_optimizer", _choice(INNER_OPTIMIZERS), "adamw", "Inner optimizer."),
    Setting("lr", float, 4e-4, "Peak inner learning rate."),
    Setting("warmup_steps", int, 100, "Inner learning-rate warmup steps."),
    Setting(
        "decay_steps",
        int,
        0,
        "Cosine decay horizon in steps (0: constant after warmup; simulate uses --steps).",
    ),
    Setting("weight_decay", float, 0.1, "Inner AdamW weight decay."),
    Setting("grad_clip", float, 1.0, "Inner gradient-norm clip (0: off)."),
    Setting("batch_size", int, 8, "Sequences per inner step."),
    Setting("seq_len", int, 128, "Tokens per sequence (bytes, without a tokenizer)."),
    Setting(
        "data",
        str,
        (),
        "Files, folders or globs (repeatable): text, .jsonl, .parquet, and with a "
        "tokenizer .bin token ids (default: the running Python's standard library).",
        multiple=True,
        metavar="PATH",
    ),
    Setting(
        "tokenizer",
        click.Path(path_type=Path),
        None,
        "A local tokenizer.json (or a folder holding one) to read --data through "
        "(default: bytes, vocabulary 256).",
        metavar="PATH",
    ),
    Setting(
        "text_field",
        str,
        "text",
        "The field of .jsonl records and the column of .parquet files that holds the text.",
    ),
    Setting(
        "token_dtype",
        _choice(TOKEN_DTYPES),
        "auto",
        "Ids of .bin token files (auto: an llm.c header's, else uint16 when the "
        "vocabulary fits 16 bits, else uint32).",
    ),
    Setting(
        "cache_dir",
        click.Path(file_okay=False, path_type=Path),
        None,
        "Where packed corpora are kept (default ~/.cache/locod/corpus).",
    ),
    Setting("device", str, "cpu", "torch device to train on (cpu, cuda, cuda:1, ...)."),
)

ALGORITHM_NAMES = tuple(s.name for s in ALGORITHM)


def click_options(settings: Iterable[Setting]) -> Callable[[F], F]:
    """A decorator adding one click option per setting."""
    settings = list(settings)

    def decorate(func: F) -> F:
        for s in reversed(settings):
            kwargs: dict[str, Any] = {
                "help": s.help + (f" [env {s.envvar}]" if not s.hidden else ""),
                "envvar": s.envvar,
                "hidden": s.hidden,
                "show_default": not s.secret and s.default not in (None, (), ""),
            }
            declaration = s.flag
            if s.is_flag:
                declaration = f"{s.flag}/--no-{s.flag[2:]}"
                kwargs.update(default=s.default)
            else:
                kwargs.update(type=s.type, default=s.default, multiple=s.multiple)
            if s.metavar:
                kwargs["metavar"] = s.metavar
            func = click.option(declaration, s.name, **kwargs)(func)
        return func

    return decorate


@dataclass(frozen=True, slots=True)
class Resolved:
    """Effective values and which of them somebody set on purpose."""

    values: dict[str, Any]
    explicit: frozenset[str]
    """Names set on the command line, in the environment or in the config file."""
    sources: dict[str, str]


def resolve(
    ctx: click.Context,
    values: dict[str, Any],
    settings: Iterable[Setting],
    config_file: Path | None,
) -> Resolved:
    """Overlay the config file under the command line and the environment."""
    by_name = {s.name: s for s in settings}
    from_file: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise click.UsageError(f"cannot read config file {config_file}: {error}") from error
        unknown = sorted(set(raw) - set(by_name))
        if unknown:
            raise click.UsageError(
                f"unknown setting(s) in {config_file}: {', '.join(unknown)}; "
                "see docs/configuration.md for the names"
            )
        for name, value in raw.items():
            setting = by_name[name]
            try:
                if setting.multiple:
                    items = value if isinstance(value, list) else [value]
                    from_file[name] = tuple(_convert(setting, item) for item in items)
                else:
                    from_file[name] = _convert(setting, value)
            except click.BadParameter as error:
                raise click.UsageError(f"{config_file}: {name}: {error.message}") from error
    effective: dict[str, Any] = {}
    explicit: set[str] = set()
    sources: dict[str, str] = {}
    for name in by_name:
        source = ctx.get_parameter_source(name)
        if source in (
            click.core.ParameterSource.COMMANDLINE,
            click.core.ParameterSource.ENVIRONMENT,
        ):
            effective[name] = values[name]
            explicit.add(name)
            sources[name] = (
                "command line"
                if source == click.core.ParameterSource.COMMANDLINE
                else "environment"
            )
        elif name in from_file:
            effective[name] = from_file[name]
            explicit.add(name)
            sources[name] = "config file"
        else:
            effective[name] = values[name]
            sources[name] = "default"
    return Resolved(values=effective, explicit=frozenset(explicit), sources=sources)


def _convert(setting: Setting, value: Any) -> Any:
    if setting.is_flag:
        if not isinstance(value, bool):
            raise click.BadParameter(f"expected true or false, got {value!r}")
        return value
    param_type = click.types.convert_type(setting.type)
    return param_type.convert(value, None, None)


def build_read_settings(values: dict[str, Any]) -> ReadSettings:
    """How --data becomes ids: loads the tokenizer, if any; errors become click.UsageError."""
    try:
        tokenizer = load_tokenizer(values["tokenizer"]) if values.get("tokenizer") else None
        return ReadSettings(
            tokenizer=tokenizer,
            text_field=values["text_field"],
            token_dtype=values["token_dtype"],
        )
    except (TokenizerError, CorpusError) as error:
        raise click.UsageError(str(error)) from error


def build_algorithm(values: dict[str, Any]) -> tuple[InnerConfig, OuterConfig]:
    """Typed configs from resolved values; a bad value raises click.UsageError saying why."""
    try:
        wire = WireFormat(
            codec=values["wire"],
            block_size=values["wire_block"],
            zstd_level=values["zstd_level"],
            rounding=values["rounding"],
        )
        inner = InnerConfig(
            optimizer=values["inner_optimizer"],
            lr=values["lr"],
            warmup_steps=values["warmup_steps"],
            decay_steps=values["decay_steps"],
            weight_decay=values["weight_decay"],
            grad_clip=values["grad_clip"],
            batch_size=values["batch_size"],
            seq_len=values["seq_len"],
        )
        outer = OuterConfig(
            inner_steps=values["inner_steps"],
            fragments=values["fragments"],
            layout=values["layout"],
            overlap=values["overlap"],
            alpha=values["alpha"],
            outer_lr=values["outer_lr"],
            outer_momentum=values["outer_momentum"],
            wire=wire,
            late_wait_s=values["late_wait_s"],
            late_policy=values["late_policy"],
            clip_factor=values["clip_factor"],
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    return inner, outer
