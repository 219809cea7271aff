"""``locod simulate``: output streams, errors, and where settings come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from helpers import SIMULATION_RESULT_KEYS

from locod.daemon.cli import locod

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _no_locod_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in the developer's environment must not leak into these runs."""
    for name in list(os.environ):
        if name.startswith("LOCOD_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small folder of text and a cache folder, shared by the module's runs."""
    root = tmp_path_factory.mktemp("simulate")
    rng = np.random.default_rng(0)
    words = [
        "".join(chr(c) for c in rng.integers(97, 107, size=rng.integers(2, 8))) for _ in range(200)
    ]
    (root / "text").mkdir()
    for i in range(3):
        picks = rng.integers(0, len(words), size=3000)
        (root / "text" / f"part{i}.txt").write_text(" ".join(words[k] for k in picks) + "\n")
    return root


def _args(
    workdir: Path, *extra: str, data: str | None = None, inner_steps: bool = True
) -> list[str]:
    args = ["simulate", "--model", "tiny", "--steps", "6", "--batch-size", "2"]
    args += ["--seq-len", "32", "--eval-batches", "2"]
    args += ["--data", data or str(workdir / "text"), "--cache-dir", str(workdir / "cache")]
    if inner_steps:
        args += ["--inner-steps", "3"]
    return [*args, *extra]


def _invoke(args: Sequence[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(locod, list(args), env=env)


def _json_run(args: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    result = _invoke([*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    parsed = json.loads(lines[0])
    assert isinstance(parsed, dict)
    return parsed


def _assert_usage_error(result: Result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0]


# -- output ------------------------------------------------------------------------------------


def test_json_prints_one_object_on_stdout_and_progress_on_stderr(workdir: Path) -> None:
    result = _invoke([*_args(workdir), "--json"])
    assert result.exit_code == 0, result.output
    fields = json.loads(result.stdout)
    assert result.stdout == json.dumps(fields) + "\n"
    assert set(fields) == SIMULATION_RESULT_KEYS
    assert (fields["method"], fields["model"], fields["peers"], fields["steps"]) == (
        "streaming",
        "tiny",
        2,
        6,
    )
    assert fields["tokens"] == 6 * 2 * 2 * 32
    assert (fields["inner_steps"], fields["fragments"], fields["wire"]) == (3, 3, "fp4")
    assert fields["eval_loss"] == fields["eval_curve"][-1][1]
    assert fields["bytes_sent_per_peer"] > 0
    assert "corpus: " in result.stderr and "streaming step 6/6" in result.stderr


def test_without_json_it_prints_a_table(workdir: Path) -> None:
    result = _invoke(_args(workdir, "--steps", "3"))
    assert result.exit_code == 0, result.output
    rows = dict(
        line.split(maxsplit=1)
        for line in result.stdout.splitlines()
        if line.startswith(("method", "peers", "steps"))
    )
    assert rows == {"method": "streaming", "peers": "2", "steps": "3"}
    assert "eval loss (outer θ_g)" in result.stdout
    assert "step 3/3" in result.stderr and "step 3/3" not in result.stdout


def test_locod_simulate_as_a_real_process(workdir: Path) -> None:
    script = Path(sys.executable).with_name("locod")
    command = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from daemon.cli import main; main()"]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCOD_")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [*command, *_args(workdir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert set(json.loads(lines[0])) == SIMULATION_RESULT_KEYS
    assert "streaming step 6/6" in done.stderr
    assert "Traceback" not in done.stderr


def test_diloco_reports_its_fixed_settings(workdir: Path) -> None:
    fields = _json_run(_args(workdir, "--method", "diloco"))
    assert (fields["fragments"], fields["overlap"], fields["alpha"]) == (1, 0, 0.0)


def test_ddp_defaults_to_the_fp32_wire(workdir: Path) -> None:
    fields = _json_run(_args(workdir, "--method", "ddp", "--steps", "2"))
    assert fields["wire"] == "fp32"
    assert fields["bytes_sent_per_peer"] == 2 * 4 * fields["parameters"]  # 2 steps, M = 2


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alpha", "2"], "alpha must be in [0, 1], got 2.0"),
        (["--overlap", "5"], "overlap (τ=5) must be smaller than inner_steps (H=3)"),
        (
            ["--method", "diloco", "--overlap", "1"],
            "--method diloco means --overlap 0; drop --overlap or use --method streaming",
        ),
        (["--method", "diloco", "--alpha", "0.5"], "--method diloco means --alpha 0.0"),
        (["--method", "ddp", "--wire", "fp4"], "use --wire fp32 or --wire bf16 with --method ddp"),
        (["--peers", "0"], "peers must be at least 1, got 0"),
        (["--seq-len", "300"], "seq_len 300 exceeds model tiny's max of 256"),
        (["--fragments", "9"], "use at most 5 fragments"),
        (["--device", "toaster"], "device 'toaster' is not a torch device"),
        (["--lr", "0"], "lr must be positive, got 0.0"),
    ],
)
def test_a_bad_value_is_one_clear_line(workdir: Path, extra: list[str], message: str) -> None:
    _assert_usage_error(_invoke(_args(workdir, *extra)), message)


def test_a_missing_data_path_is_one_clear_line(workdir: Path) -> None:
    result = _invoke(_args(workdir, data="/nonexistent/corpus"))
    _assert_usage_error(result, "data path /nonexistent/corpus does not exist")


def test_a_value_click_rejects_is_one_clear_line(workdir: Path) -> None:
    result = _invoke(_args(workdir, "--wire", "fp3"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--wire'" in result.stderr


# -- where settings come from -------------------------------------------------------------------


def _config_file(workdir: Path, name: str, text: str) -> Path:
    path = workdir / name
    path.write_text(text)
    return path


def test_config_file_then_environment_then_flag(workdir: Path) -> None:
    config = _config_file(workdir, "layers.toml", "inner_steps = 4\nalpha = 0.25\nseed = 3\n")
    base = _args(workdir, "--steps", "2", "--config", str(config), inner_steps=False)

    from_file = _json_run(base)
    assert (from_file["inner_steps"], from_file["alpha"]) == (4, 0.25)

    from_env = _json_run(base, env={"LOCOD_INNER_STEPS": "5"})
    assert (from_env["inner_steps"], from_env["alpha"]) == (5, 0.25)

    from_flag = _json_run([*base, "--inner-steps", "6"], env={"LOCOD_INNER_STEPS": "5"})
    assert (from_flag["inner_steps"], from_flag["alpha"]) == (6, 0.25)


def test_config_file_lists_data_and_overrides_the_simulate_default(workdir: Path) -> None:
    config = _config_file(
        workdir,
        "data.toml",
        f'data = ["{workdir / "text"}"]\ncache_dir = "{workdir / "cache"}"\nmodel = "tiny"\n'
        "inner_steps = 3\nbatch_size = 2\nseq_len = 32\n",
    )
    fields = _json_run(["simulate", "--steps", "2", "--eval-batches", "1", "--config", str(config)])
    assert (fields["model"], fields["inner_steps"]) == ("tiny", 3)
    assert fields["tokens"] == 2 * 2 * 2 * 32


def test_an_unknown_key_in_the_config_file_is_named(workdir: Path) -> None:
    config = _config_file(workdir, "typo.toml", "inner_stepz = 4\n")
    result = _invoke(_args(workdir, "--config", str(config)))
    _assert_usage_error(result, f"unknown setting(s) in {config}: inner_stepz")


def test_a_bad_value_in_the_config_file_names_file_and_key(workdir: Path) -> None:
    config = _config_file(workdir, "bad.toml", 'alpha = "high"\n')
    result = _invoke(_args(workdir, "--config", str(config)))
    _assert_usage_error(result, f"{config}: alpha:")


def test_an_unreadable_config_file_is_one_clear_line(workdir: Path) -> None:
    config = _config_file(workdir, "broken.toml", "inner_steps = = 4\n")
    result = _invoke(_args(workdir, "--config", str(config)))
    _assert_usage_error(result, f"cannot read config file {config}")


def test_diloco_refuses_a_contradicting_config_file(workdir: Path) -> None:
    config = _config_file(workdir, "overlap.toml", "overlap = 1\n")
    result = _invoke(_args(workdir, "--method", "diloco", "--config", str(config)))
    _assert_usage_error(result, "--method diloco means --overlap 0")
