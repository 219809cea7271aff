"""The ``locod`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from locod.daemon.config import START_SETTINGS
from locod.daemon.settings import (
    ALGORITHM,
    build_algorithm,
    build_read_settings,
    click_options,
    resolve,
)

# A simulation is a short run: sync often enough to see several rounds of every fragment.
_SIMULATE_DEFAULTS = {"inner_steps": 25, "warmup_steps": 20}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="locod")
def locod() -> None:
    """Train one language model across many sites with Streaming DiLoCo."""


@locod.command(context_settings={"default_map": _SIMULATE_DEFAULTS})
@click.option("--peers", type=int, default=2, show_default=True, help="M: simulated peers.")
@click.option(
    "--method",
    type=click.Choice(["ddp", "diloco", "streaming"]),
    default="streaming",
    show_default=True,
    help="ddp: gradients averaged every step; diloco: P=1, τ=0, α=0; streaming.",
)
@click.option("--steps", type=int, default=200, show_default=True, help="Inner steps per peer.")
@click.option(
    "--eval-every",
    "eval_every",
    type=int,
    default=0,
    help="Evaluate every N steps (0: five times a run).",
)
@click.option(
    "--eval-batches",
    "eval_batches",
    type=int,
    default=16,
    show_default=True,
    help="Held-out batches per evaluation.",
)
@click.option(
    "--final-sync/--no-final-sync",
    "final_sync",
    default=True,
    show_default=True,
    help="Sync every fragment once more at the end, so θ_g holds all training.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML file of settings (flags and LOCOD_* override it).",
)
@click_options(ALGORITHM)
@click.pass_context
def simulate(
    ctx: click.Context,
    peers: int,
    method: str,
    steps: int,
    eval_every: int,
    eval_batches: int,
    final_sync: bool,
    as_json: bool,
    config_file: Path | None,
    **options: Any,
) -> None:
    """Run M peers in this process and report loss and traffic."""
    from locod.peer.data import CorpusError, load_corpus
    from locod.peer.simulator import SimulationConfig
    from locod.peer.simulator import simulate as run_simulation

    resolved = resolve(ctx, options, ALGORITHM, config_file)
    values = dict(resolved.values)
    if method == "diloco":
        _apply_diloco(resolved.explicit, values)
    if method == "ddp" and "wire" not in resolved.explicit:
        values["wire"] = "fp32"
    if "decay_steps" not in resolved.explicit:
        values["decay_steps"] = steps
    inner, outer = build_algorithm(values)
    read = build_read_settings(values)
    try:
        cfg = SimulationConfig(
            method=method,
            peers=peers,
            steps=steps,
            model=values["model"],
            seed=values["seed"],
            eval_every=eval_every,
            eval_batches=eval_batches,
            final_sync=final_sync,
            device=values["device"],
            inner=inner,
            outer=outer,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    try:
        corpus = load_corpus(values["data"] or None, cache_dir=values["cache_dir"], read=read)
    except CorpusError as error:
        raise click.UsageError(str(error)) from error
    say = _stderr
    say(f"corpus: {corpus.description}")
    try:
        result = run_simulation(cfg, corpus, progress=say)
    except ValueError as error:  # includes ModelError: an hf: folder that cannot be built
        raise click.UsageError(str(error)) from error
    if as_json:
        click.echo(json.dumps(result.as_json()))
        return
    rows = [
        ("method", result.method),
        ("peers", result.peers),
        ("model", result.model),
        ("parameters", f"{result.parameters:,}"),
        ("fragments", result.fragments),
        ("inner steps H", result.inner_steps),
        ("overlap τ", result.overlap),
        ("alpha α", result.alpha),
        ("wire", result.wire),
        ("steps", result.steps),
        ("tokens", f"{result.tokens:,}"),
        ("train loss", result.train_loss),
        ("eval loss (outer θ_g)", result.eval_loss),
        ("eval loss (replicas, mean)", result.eval_loss_replicas),
        ("eval loss (replicas averaged)", result.eval_loss_replica_average),
        ("bytes sent per peer", f"{result.bytes_sent_per_peer:,.0f}"),
        ("peak bytes per sync", f"{result.peak_bytes_per_sync:,.0f}"),
        ("rounds", result.rounds),
        ("wall time (s)", result.wall_s),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        if value is not None:
            click.echo(f"{name:<{width}}  {value}")


def _apply_diloco(explicit: frozenset[str], values: dict[str, Any]) -> None:
    """DiLoCo is Streaming DiLoCo with P = 1, τ = 0, α = 0; refuse settings that contradict it."""
    required = {"fragments": 1, "overlap": 0, "alpha": 0.0}
    for key, value in required.items():
        if key in explicit and values[key] != value:
            flag = "--" + key.replace("_", "-")
            raise click.UsageError(
                f"--method diloco means {flag} {value}; drop {flag} or use --method streaming"
            )
        values[key] = value


@locod.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML file of settings (flags and LOCOD_* override it).",
)
@click.option("--check", is_flag=True, help="Validate the configuration and exit.")
@click_options(START_SETTINGS)
@click.pass_context
def start(ctx: click.Context, config_file: Path | None, check: bool, **options: Any) -> None:
    """Start a peer: a new run, or (with --join) the run of another site."""
    from locod.daemon.config import build_daemon_config

    resolved = resolve(ctx, options, START_SETTINGS, config_file)
    cfg = build_daemon_config(resolved.values, resolved.explicit)
    if check:
        from locod.daemon.faults import FaultPlan

        try:
            FaultPlan.parse(cfg.site.faults)
        except ValueError as error:
            raise click.UsageError(str(error)) from error
        click.echo(f"configuration is valid (run config hash {cfg.run.hash})")
        for name, value in sorted(cfg.loggable().items()):
            click.echo(f"  {name} = {value!r}  [{resolved.sources[name]}]")
        return
    if cfg.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_under_torchrun(cfg.nproc_per_node)
    from locod.daemon.node import Daemon, StartError

    try:
        code = Daemon(cfg).run()
    except StartError as error:
        raise click.ClickException(str(error)) from error
    sys.exit(code)


@locod.command()
@click.argument("address", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--state-dir",
    "state_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("locod-state"),
    show_default=True,
    help="Find the daemon through this state dir when no ADDRESS is given.",
)
@click.option("--key", default="", envvar="LOCOD_KEY", help="Key of a private run.")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for the daemon.",
)
def status(address: str | None, as_json: bool, state_dir: Path, key: str, timeout_s: float) -> None:
    """Show what the daemon at ADDRESS (HOST:PORT) is doing."""
    from locod.daemon.info import read_info
    from locod.daemon.status import StatusUnavailable, query_status, render_status

    if address is None:
        info = read_info(state_dir)
        if info is None:
            raise click.ClickException(
                f"no running daemon found in {state_dir}; give its address (HOST:PORT)"
            )
        address = str(info["listen"]).replace("0.0.0.0:", "127.0.0.1:")
    try:
        result = query_status(address, key=key, timeout_s=timeout_s)
    except StatusUnavailable as error:
        raise click.ClickException(str(error)) from error
    click.echo(json.dumps(result) if as_json else render_status(result))


@locod.command()
@click.argument("address", default="127.0.0.1:7850")
@click.option("--timeout", "timeout_s", type=float, default=3.0, show_default=True)
def health(address: str, timeout_s: float) -> None:
    """Exit 0 if the daemon at ADDRESS reports SERVING on the standard gRPC health service."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as error:
            raise click.ClickException(f"{address}: {error.code().name}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise click.ClickException(
            f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        )
    click.echo(f"{address}: SERVING")


def _relaunch_under_torchrun(nproc: int) -> None:
    """``--nproc-per-node N``: this site's N ranks on this machine, started by torchrun
    (standalone rendezvous); each runs ``locod start`` with the same arguments."""
    args = sys.argv[sys.argv.index("start") + 1 :] if "start" in sys.argv else []
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "locod",
        "start",
        *args,
    ]
    click.echo(f"locod: starting {nproc} ranks of this site under torchrun", err=True)
    os.execv(sys.executable, command)


_MODEL_OPTION = click.option(
    "--model",
    "model_spec",
    default=None,
    help="Model spec to rebuild θ_g with, if the run config's moved (e.g. hf:NEW/PATH).",
)
_TOKENIZER_OPTION = click.option(
    "--tokenizer",
    "tokenizer_path",
    type=click.Path(path_type=Path),
    default=None,
    help="The run's tokenizer.json, if the run config's moved or does not name it.",
)


def _global_model(state_dir: Path, model_spec: str | None, tokenizer_path: Path | None) -> Any:
    """(model holding θ_g, tokenizer or None, checkpoint) from a state dir's checkpoint."""
    from locod.daemon.checkpoint import CheckpointError, checkpoint_path, load_checkpoint
    from locod.peer.export import ExportError, global_model
    from locod.peer.tokenizer import TokenizerError

    try:
        checkpoint = load_checkpoint(state_dir)
    except CheckpointError as error:
        raise click.ClickException(str(error)) from error
    if checkpoint is None:
        raise click.ClickException(
            f"{state_dir} holds no checkpoint ({checkpoint_path(state_dir).name}); give the "
            "state dir of a daemon that has written one (--state-dir of locod start)"
        )
    try:
        model, tokenizer = global_model(
            checkpoint, model_spec=model_spec, tokenizer_path=tokenizer_path
        )
    except (ExportError, TokenizerError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    return model, tokenizer, checkpoint


@locod.command("export")
@click.argument("state_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@_MODEL_OPTION
@_TOKENIZER_OPTION
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a non-empty folder.")
def export_command(
    state_dir: Path,
    out: Path,
    model_spec: str | None,
    tokenizer_path: Path | None,
    overwrite: bool,
) -> None:
    """Write θ_g of STATE_DIR's checkpoint to the folder OUT, as safetensors.

    hf: models are written as transformers writes them (AutoModelForCausalLM.from_pretrained
    loads OUT), byte presets with a small JSON of their config. No network is started.
    """
    from locod.peer.export import ExportError, export_model, export_provenance

    model, tokenizer, checkpoint = _global_model(state_dir, model_spec, tokenizer_path)
    spec = model_spec or str(checkpoint["run_config"].get("model"))
    try:
        export_model(
            model,
            out,
            tokenizer=tokenizer,
            provenance=export_provenance(checkpoint, spec),
            overwrite=overwrite,
        )
    except (ExportError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"θ_g of step {checkpoint.get('step')} written to {out}")


@locod.command("sample")
@click.argument("source", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--prompt", default="", help="Text to continue (default: a new document).")
@click.option("--max-new-tokens", type=int, default=200, show_default=True, help="Tokens to add.")
@click.option(
    "--temperature",
    type=float,
    default=0.8,
    show_default=True,
    help="Softmax temperature (0: always the likeliest token).",
)
@click.option(
    "--top-k", type=int, default=40, show_default=True, help="Keep the k likeliest (0: all)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@_MODEL_OPTION
@_TOKENIZER_OPTION
def sample_command(
    source: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    model_spec: str | None,
    tokenizer_path: Path | None,
) -> None:
    """Print PROMPT and its continuation by θ_g of SOURCE.

    SOURCE is a daemon's state dir (its checkpoint) or a folder locod export wrote.
    No network is started.
    """
    from locod.daemon.checkpoint import checkpoint_path
    from locod.peer.export import ExportError, load_export
    from locod.peer.sampling import sample_text
    from locod.peer.tokenizer import (
        ByteTokenizer,
        TextTokenizer,
        TokenizerError,
        load_tokenizer,
    )

    tokenizer: TextTokenizer
    if checkpoint_path(source).exists():
        model, loaded, _ = _global_model(source, model_spec, tokenizer_path)
        tokenizer = loaded or ByteTokenizer()
    else:
        try:
            model, tokenizer = load_export(source)
            if tokenizer_path is not None:
                tokenizer = load_tokenizer(tokenizer_path)
        except (ExportError, TokenizerError, ValueError) as error:
            raise click.ClickException(
                f"{source} is neither a state dir with a checkpoint nor an export folder: {error}"
            ) from error
    try:
        text = sample_text(
            model,
            tokenizer,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    click.echo(prompt + text)


def _stderr(line: str) -> None:
    click.echo(line, err=True)


def main() -> None:
    """Console-script entry point."""
    sys.exit(locod.main(standalone_mode=True))
