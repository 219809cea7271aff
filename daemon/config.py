"""The daemon's typed config, and the run config that every peer of a run shares.

``DaemonConfig`` gathers everything ``locod start`` needs; it is built from the resolved
settings of :mod:`daemon.settings` (flags, environment, config file, defaults) and checked
in ``__post_init__``. ``RunConfig`` is the part that must be identical on every peer; its
hash travels in DHT records and RPCs, and a joiner whose explicit settings contradict the
run's is refused with every differing setting named.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from locod.daemon.settings import ALGORITHM, Setting, build_algorithm
from locod.peer.config import OuterConfig
from locod.peer.fragments import auto_fragment_count, validate_fragment_count, validate_schedule
from locod.peer.inner import InnerConfig
from locod.peer.model import model_shape

PROTOCOL_VERSION = 1
DEFAULT_RUN = "locod-demo"


def _path(**kwargs: Any) -> click.Path:
    return click.Path(path_type=Path, **kwargs)


DAEMON: tuple[Setting, ...] = (
    Setting("run", str, DEFAULT_RUN, "Name of the run to start or join."),
    Setting(
        "join",
        str,
        (),
        "DHT multiaddr of a peer of the run to join (repeatable). "
        "Without it, this daemon starts a new run.",
        multiple=True,
        metavar="MULTIADDR",
    ),
    Setting("listen", str, "0.0.0.0:0", "gRPC address to serve on (port 0 picks a free one)."),
    Setting(
        "announce",
        str,
        "",
        "gRPC address others should dial, if not the listen address (e.g. behind port forwarding).",
    ),
    Setting("dht_listen", str, "/ip4/0.0.0.0/tcp/0", "DHT multiaddr to listen on."),
    Setting("dht_announce", str, "", "DHT multiaddr others should dial, if not the listen one."),
    Setting(
        "state_dir",
        _path(file_okay=False),
        Path("locod-state"),
        "Checkpoints, identity and logs of this peer.",
    ),
    Setting(
        "client_only",
        bool,
        False,
        "Take part without accepting connections (behind "
        "NAT): send and receive over connections this peer opens, reduce nothing.",
        is_flag=True,
    ),
    Setting("max_steps", int, 0, "Stop training after this many inner steps (0: never)."),
    Setting(
        "linger",
        bool,
        False,
        "After --max-steps, keep serving (status, state download) "
        "until stopped instead of exiting.",
        is_flag=True,
    ),
    Setting(
        "min_peers",
        int,
        1,
        "The first peer waits until this many peers are in the run before training.",
    ),
    Setting(
        "key", str, "", "Shared secret of a private run: every RPC must prove it.", secret=True
    ),
    Setting(
        "tls_cert",
        _path(dir_okay=False, exists=True),
        None,
        "PEM certificate: serve gRPC over TLS.",
    ),
    Setting("tls_key", _path(dir_okay=False, exists=True), None, "PEM private key for --tls-cert."),
    Setting(
        "tls_ca",
        _path(dir_okay=False, exists=True),
        None,
        "PEM CA bundle to verify peers' certificates (enables TLS for outgoing connections).",
    ),
    Setting(
        "connect_timeout_s",
        float,
        5.0,
        "Seconds to open a connection or get a reply to a small RPC.",
    ),
    Setting(
        "matchmaking_window_s",
        float,
        5.0,
        "Longest a round's leader keeps its group open for members that have not joined yet.",
    ),
    Setting(
        "chunk_timeout_s",
        float,
        10.0,
        "Longest wait for the next chunk of a stream; "
        "a member that stalls longer is dropped from the round.",
    ),
    Setting(
        "round_timeout_s",
        float,
        60.0,
        "Longest a round may take after its group closed; then it fails and training goes on.",
    ),
    Setting(
        "eval_every", int, 200, "Evaluate the outer parameters every this many steps (0: never)."
    ),
    Setting("eval_batches", int, 8, "Held-out batches per evaluation."),
    Setting(
        "checkpoint_every_s", float, 300.0, "Seconds between checkpoints (0: only at shutdown)."
    ),
    Setting(
        "log_level",
        click.Choice(["debug", "info", "warning", "error"]),
        "info",
        "Log level of the log file and the terminal.",
    ),
    Setting(
        "live",
        bool,
        True,
        "Show a live view on the terminal (off: periodic log lines).",
        is_flag=True,
    ),
    Setting(
        "nproc_per_node",
        int,
        1,
        "Ranks of this site on this machine (e.g. one per GPU): relaunches under torchrun; "
        "the site stays one peer of the run (see docs/scaling.md).",
    ),
    Setting(
        "parallel",
        click.Choice(["auto", "ddp", "fsdp"]),
        "auto",
        "How the ranks of a site share the model: DDP (whole replicas) or FSDP2 (shards); "
        "auto picks FSDP2 when the model would not fit on one device.",
    ),
    Setting(
        "data_seed",
        int,
        0,
        "Seed of this site's data stream (0: derived from its peer id, so every site "
        "reads its own).",
    ),
    Setting(
        "rank_timeout_s",
        float,
        1800.0,
        "Longest one collective between the ranks of a site may take (a state download "
        "on rank 0 holds the others this long at most).",
    ),
    Setting(
        "fault",
        str,
        (),
        "Inject a fault, for tests (see daemon/faults.py).",
        multiple=True,
        hidden=True,
    ),
)

START_SETTINGS: tuple[Setting, ...] = ALGORITHM + DAEMON

RUN_KEYS = tuple(s.name for s in ALGORITHM if s.scope == "run")
"""Settings every peer of a run must share: the run config."""

TRAINER_KEYS = (
    "max_steps",
    "linger",
    "eval_every",
    "eval_batches",
    "live",
    "nproc_per_node",
    "parallel",
    "data_seed",
    "rank_timeout_s",
)
"""Settings of the built-in training loop (``locod start``), not of the site."""

SITE_SETTINGS: tuple[Setting, ...] = tuple(s for s in DAEMON if s.name not in TRAINER_KEYS)
"""Settings of one site's network side: what ``locod.found`` / ``locod.join`` take."""


IDENTITY_KEYS = ("model_fingerprint", "model_architecture", "tokenizer_fingerprint")
"""What the run config says about the model and tokenizer beyond the settings: peers
whose model structure or tokenizer differ cannot meet in one run."""


@dataclass(frozen=True, slots=True)
class RunConfig:
    """What every peer of a run must agree on: the run-scoped settings ('auto' resolved),
    and what the model and tokenizer are.

    ``values`` holds one entry per run-scoped setting of :data:`daemon.settings.ALGORITHM`.
    ``model_fingerprint`` hashes the model's structure (architecture, parameter names,
    shapes, dtypes; :func:`peer.fingerprint.model_fingerprint`), ``model_architecture``
    is its small architecture part (to say how two models differ), and
    ``tokenizer_fingerprint`` hashes the tokenizer ('' for bytes). A model the user built
    is named ``custom``: its fingerprint tells it apart.
    """

    values: dict[str, Any]
    model_fingerprint: str = ""
    model_architecture: dict[str, Any] = field(default_factory=dict)
    tokenizer_fingerprint: str = ""

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def model(self) -> str:
        return str(self.values["model"])

    @property
    def seed(self) -> int:
        return int(self.values["seed"])

    @property
    def inner_steps(self) -> int:
        return int(self.values["inner_steps"])

    @property
    def fragments(self) -> int:
        return int(self.values["fragments"])

    @property
    def layout(self) -> str:
        return str(self.values["layout"])

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.values,
            "model_fingerprint": self.model_fingerprint,
            "model_architecture": self.model_architecture,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }

    @property
    def hash(self) -> str:
        return config_hash(self.as_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A run config as published by a peer; ValueError if it lacks a setting we need."""
        missing = sorted(set(RUN_KEYS) - set(data))
        if missing:
            raise ValueError(f"run config is missing {', '.join(missing)}")
        architecture = data.get("model_architecture") or {}
        if not isinstance(architecture, dict):
            raise ValueError("run config's model_architecture is not a mapping")
        return cls(
            values={key: data[key] for key in RUN_KEYS},
            model_fingerprint=str(data.get("model_fingerprint", "")),
            model_architecture=architecture,
            tokenizer_fingerprint=str(data.get("tokenizer_fingerprint", "")),
        )

    def with_identity(
        self, *, model_fingerprint: str, model_architecture: dict[str, Any], tokenizer: str
    ) -> RunConfig:
        return RunConfig(
            values=dict(self.values),
            model_fingerprint=model_fingerprint,
            model_architecture=model_architecture,
            tokenizer_fingerprint=tokenizer,
        )


def config_hash(run_config: dict[str, Any]) -> str:
    """Short hash of a run config, as it travels in records and RPCs."""
    text = json.dumps(run_config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_config_from(values: dict[str, Any], *, num_blocks: int | None = None) -> RunConfig:
    """The run config for resolved settings, with 'auto' fragments made concrete.

    ``num_blocks`` is the model's number of repeated blocks; by default the spec's (a
    preset or ``hf:PATH``, sized without building it). A model without blocks gets P = 1.
    """
    data = {key: values[key] for key in RUN_KEYS}
    if data["fragments"] == 0:
        blocks = model_shape(data["model"]).blocks if num_blocks is None else num_blocks
        data["fragments"] = auto_fragment_count(blocks) if blocks else 1
    return RunConfig(values=data)


def differing_settings(
    run: dict[str, Any], ours: dict[str, Any], explicit: frozenset[str]
) -> list[str]:
    """Settings this peer set on purpose that contradict the run's, as 'name: ours vs run';
    and any difference of model structure or tokenizer, whoever set them."""
    lines = []
    for key in RUN_KEYS:
        if key in explicit and key in run and ours.get(key) != run[key]:
            if key == "fragments" and ours.get(key) == 0:
                continue  # "auto" agrees with whatever the run resolved it to
            lines.append(f"{key}: this peer has {ours.get(key)!r}, the run has {run[key]!r}")
    mine, theirs = ours.get("model_fingerprint"), run.get("model_fingerprint")
    if mine and theirs and mine != theirs:
        from locod.peer.fingerprint import describe_difference

        words = describe_difference(
            {"architecture": ours.get("model_architecture") or {}},
            {"architecture": run.get("model_architecture") or {}},
        )
        lines.append(
            f"model: this peer's model has fingerprint {mine}, the run's {theirs}"
            + (f" ({'; '.join(words)})" if words else " (parameter names, shapes or dtypes)")
        )
    mine, theirs = ours.get("tokenizer_fingerprint"), run.get("tokenizer_fingerprint")
    if mine is not None and theirs is not None and mine != theirs:
        lines.append(
            "tokenizer: "
            + (f"this peer's is {mine}" if mine else "this peer reads bytes")
            + ", "
            + (f"the run's is {theirs}" if theirs else "the run reads bytes")
            + " (give the run's tokenizer.json with --tokenizer)"
        )
    return lines


@dataclass(kw_only=True, slots=True)
class SiteConfig:
    """One site's network side: identity, addresses, security, deadlines, state dir."""

    run_name: str = DEFAULT_RUN
    join: tuple[str, ...] = ()
    listen: str = "0.0.0.0:0"
    announce: str = ""
    dht_listen: str = "/ip4/0.0.0.0/tcp/0"
    dht_announce: str = ""
    state_dir: Path = Path("locod-state")
    client_only: bool = False
    min_peers: int = 1
    key: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    connect_timeout_s: float = 5.0
    matchmaking_window_s: float = 5.0
    chunk_timeout_s: float = 10.0
    round_timeout_s: float = 60.0
    checkpoint_every_s: float = 300.0
    log_level: str = "info"
    faults: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.run_name or any(c in self.run_name for c in "/ \t\n"):
            raise ValueError(f"run name {self.run_name!r} must be non-empty, without '/' or spaces")
        parse_host_port(self.listen, "listen")
        if self.announce:
            parse_host_port(self.announce, "announce")
        for name in (
            "connect_timeout_s",
            "matchmaking_window_s",
            "chunk_timeout_s",
            "round_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_peers < 1:
            raise ValueError(f"min_peers must be at least 1, got {self.min_peers}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.checkpoint_every_s < 0:
            raise ValueError(f"checkpoint_every must be 0 or more, got {self.checkpoint_every_s}")

    @property
    def private(self) -> bool:
        return bool(self.key)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> SiteConfig:
        """From resolved setting values (names as in :data:`SITE_SETTINGS`)."""
        return cls(
            run_name=values["run"],
            join=tuple(values["join"]),
            listen=values["listen"],
            announce=values["announce"],
            dht_listen=values["dht_listen"],
            dht_announce=values["dht_announce"],
            state_dir=Path(values["state_dir"]),
            client_only=values["client_only"],
            min_peers=values["min_peers"],
            key=values["key"],
            tls_cert=values["tls_cert"],
            tls_key=values["tls_key"],
            tls_ca=values["tls_ca"],
            connect_timeout_s=values["connect_timeout_s"],
            matchmaking_window_s=values["matchmaking_window_s"],
            chunk_timeout_s=values["chunk_timeout_s"],
            round_timeout_s=values["round_timeout_s"],
            checkpoint_every_s=values["checkpoint_every_s"],
            log_level=values["log_level"],
            faults=tuple(values["fault"]),
        )


def site_config(**settings: Any) -> SiteConfig:
    """A :class:`SiteConfig` from keyword settings named as in :data:`SITE_SETTINGS`
    (``run=``, ``join=``, ``state_dir=``, ...); the rest take their defaults.

    The library API's way in: the same names, defaults and checks as ``locod start``.
    """
    by_name = {s.name: s for s in SITE_SETTINGS}
    unknown = sorted(set(settings) - set(by_name))
    if unknown:
        raise TypeError(
            f"unknown site setting(s) {', '.join(unknown)}; known: {', '.join(sorted(by_name))}"
        )
    values = {name: s.default for name, s in by_name.items()} | settings
    if isinstance(values["join"], str):
        values["join"] = (values["join"],)
    return SiteConfig.from_values(values)


@dataclass(kw_only=True, slots=True)
class DaemonConfig:
    """Everything ``locod start`` runs with, validated: the site, the built-in trainer,
    and the algorithm."""

    site: SiteConfig
    max_steps: int
    linger: bool
    eval_every: int
    eval_batches: int
    live: bool
    nproc_per_node: int
    parallel: str
    data_seed: int
    rank_timeout_s: float
    data: tuple[str, ...]
    cache_dir: Path | None
    device: str
    run: RunConfig
    inner: InnerConfig
    outer: OuterConfig
    explicit: frozenset[str] = field(default_factory=frozenset)
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be 0 or more, got {self.max_steps}")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ValueError("eval_every must be 0 or more, eval_batches at least 1")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be at least 1, got {self.nproc_per_node}")
        if not self.rank_timeout_s > 0:
            raise ValueError(f"rank_timeout must be positive, got {self.rank_timeout_s}")
        shape = model_shape(self.run.model)
        if shape.blocks is not None:
            validate_fragment_count(self.run.fragments, shape.blocks)
        validate_schedule(self.run.inner_steps, self.run.fragments)
        if shape.max_seq_len is not None and self.inner.seq_len > shape.max_seq_len:
            raise ValueError(
                f"seq_len {self.inner.seq_len} exceeds model {self.run.model}'s maximum "
                f"{shape.max_seq_len}"
            )

    def loggable(self) -> dict[str, Any]:
        """The effective settings, secrets masked, for the start-up log."""
        shown = {}
        for s in START_SETTINGS:
            value = self.values.get(s.name)
            if s.secret and value:
                value = "***"
            shown[s.name] = str(value) if isinstance(value, Path) else value
        return shown


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """'host:port' → (host, port) or a ValueError naming the setting."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT (port 0-65535), got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_daemon_config(values: dict[str, Any], explicit: frozenset[str]) -> DaemonConfig:
    """Typed, validated config from resolved settings; errors become click.UsageError."""
    inner, outer = build_algorithm(values)
    try:
        run = run_config_from(values)
        outer.fragments = run.fragments
        return DaemonConfig(
            site=SiteConfig.from_values(values),
            max_steps=values["max_steps"],
            linger=values["linger"],
            eval_every=values["eval_every"],
            eval_batches=values["eval_batches"],
            live=values["live"],
            nproc_per_node=values["nproc_per_node"],
            parallel=values["parallel"],
            data_seed=values["data_seed"],
            rank_timeout_s=values["rank_timeout_s"],
            data=tuple(values["data"]),
            cache_dir=values["cache_dir"],
            device=values["device"],
            run=run,
            inner=inner,
            outer=outer,
            explicit=explicit,
            values=dict(values),
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error


def adopt_run_config(cfg: DaemonConfig, run: dict[str, Any]) -> DaemonConfig:
    """This peer's config with the run's shared settings; refuses contradictions."""
    differing = differing_settings(run, cfg.values, cfg.explicit)
    if differing:
        raise click.UsageError(
            "this peer's settings contradict the run's config:\n  "
            + "\n  ".join(differing)
            + "\ndrop these flags to adopt the run's values, or start a new run with --run"
        )
    values = dict(cfg.values)
    values.update({k: run[k] for k in RUN_KEYS if k in run})
    return build_daemon_config(values, cfg.explicit)
