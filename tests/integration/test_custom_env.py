"""A user's own environment, plugged in each way the README shows, then trained by `climbrl run`.

- ``entry_point``: examples/custom_env.py made a package with examples/env_package/pyproject.toml
  (the README's "From one file to a package"), copied to a temp folder and installed with
  ``pip install -e`` into this venv (offline: no deps, no build isolation), found by its short
  name ``last_letter``;
- ``file``: the same file copied outside the repository, found as ``/abs/path/my_env.py:Class``
  from a working folder outside the repository;
- ``example``: examples/custom_env.toml as it is, by dotted path from the repository root.

Each walks a new user's path: ``climbrl tiny-model OUT --env NAME`` (a tokenizer trained on the
env's text), ``climbrl env-check NAME``, then ``climbrl run``. The default suite runs
``entry_point`` (one engine start); the others are slow. An env that fails ends its run with a
clear message: tests/integration/test_env_failure_run.py (an env from a file outside the
repository, default suite) and ``test_failing_plugin_env_ends_the_run`` here (slow).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DIST = "last-letter-env"  # examples/env_package/pyproject.toml's project name
ENV_ARGS = '{"length": 4}'  # examples/custom_env.toml's


def _pip(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _install(src: Path) -> None:
    """``pip install -e`` into this venv with nothing fetched from an index."""
    _pip("install", "-e", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q")


@pytest.fixture(scope="module")
def last_letter_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The README recipe: examples/custom_env.py + examples/env_package/pyproject.toml in a
    folder of their own, installed editable; uninstalled afterwards."""
    pkg = tmp_path_factory.mktemp("plugin") / "last_letter"
    pkg.mkdir()
    shutil.copy(ROOT / "examples/env_package/pyproject.toml", pkg / "pyproject.toml")
    shutil.copy(ROOT / "examples/custom_env.py", pkg / "last_letter_env.py")
    _install(pkg)
    try:
        yield pkg
    finally:
        _pip("uninstall", "-y", DIST)


def _cli(args: list[str], log: Path, cwd: Path, timeout: float) -> str:
    rc = run_cli(args, log, timeout=timeout, cwd=cwd)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


def _train(env_name: str, tmp_path: Path, cwd: Path, config: Path) -> Path:
    """tiny-model --env, env-check, then a 3-step run of ``config`` with ``env_name``."""
    model = tmp_path / "model"
    made = _cli(
        ["tiny-model", str(model), "--env", env_name, "--env-args", ENV_ARGS],
        tmp_path / "tiny_model.log",
        cwd,
        timeout=300,
    )
    m = re.search(r"longest prompt in tokens train (\d+), test (\d+)", made)
    assert m, made[-2000:]
    # examples/custom_env.toml: max_model_len 64, max_tokens 6
    assert max(int(m[1]), int(m[2])) + 6 <= 64, made[-2000:]
    checked = _cli(
        ["env-check", env_name, "--args", ENV_ARGS], tmp_path / "env_check.log", cwd, timeout=120
    )
    assert re.search(r": \d+ passed, 0 failed, 0 skipped", checked), checked
    out = tmp_path / "run"
    log = tmp_path / "launcher.log"
    rc = run_cli(
        [
            "run",
            str(config),
            "--no-live",
            "--set",
            f'env.name="{env_name}"',
            "--set",
            f'model.path="{model}"',
            "--set",
            f'run.output_dir="{out}"',
            "--set",
            "learner.total_steps=3",
            "--set",
            "learner.batch_groups=4",
            "--set",
            "learner.group_size=4",
            "--set",
            "learner.eval_size=8",
        ],
        log,
        timeout=600,
        cwd=cwd,
    )
    learner_log = out / "logs" / "learner.log"
    assert rc == 0, log.read_text()[-3000:] + (
        learner_log.read_text()[-3000:] if learner_log.exists() else ""
    )
    return out


@pytest.mark.parametrize(
    "how",
    [
        "entry_point",
        pytest.param("file", marks=pytest.mark.slow),
        pytest.param("example", marks=pytest.mark.slow),
    ],
)
def test_a_custom_env_trains(how: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    config = ROOT / "examples/custom_env.toml"
    if how == "entry_point":
        request.getfixturevalue("last_letter_package")
        name, cwd = "last_letter", tmp_path
    elif how == "file":
        mine = tmp_path / "elsewhere" / "my_env.py"
        mine.parent.mkdir()
        shutil.copy(ROOT / "examples/custom_env.py", mine)
        name, cwd = f"{mine}:LastLetterEnv", tmp_path
    else:
        name, cwd = "examples.custom_env:LastLetterEnv", ROOT
    out = _train(name, tmp_path, cwd, config)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert 0.0 <= r["reward"] <= 1.0 and r["correct"] is not None
        assert r.get("env_errors", 0) == 0
    assert any("eval/test_accuracy" in r for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    resolved = (out / "config.resolved.toml").read_text()
    assert f'name = "{name}"' in resolved
    # weight updates land while episodes are in flight: the prefix cache is reset only once
    # the engine is idle, so vLLM never logs a failed reset
    rollout_logs = "".join(p.read_text() for p in (out / "logs").glob("rollout-*.log"))
    assert "Failed to reset prefix cache" not in rollout_logs


BROKEN_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "climbrl-test-broken-env"
version = "0.1.0"

[project.entry-points."climbrl.envs"]
broken_plugin = "broken_plugin_env:AlwaysRaises"

[tool.setuptools]
py-modules = ["broken_plugin_env"]
"""
CAUSE = "the scoring service is down"
BROKEN_MODULE = f"""
from climbrl.envs.base import Env, StepResult, Task


class AlwaysRaises(Env):
    def num_tasks(self, split):
        return 16

    def get_task(self, split, index):
        return Task(task_id=f"{{split}}/{{index}}", split=split, prompt="abc")

    async def reset(self, task):
        return task.prompt

    async def step(self, completion):
        raise ConnectionError({CAUSE!r})
"""


@pytest.mark.slow
def test_failing_plugin_env_ends_the_run(tiny_model: Path, tmp_path: Path) -> None:
    """An installed plugin whose env fails every episode (in step, after generation): the run
    ends by itself with exit code 1 and a message quoting the env's error."""
    pkg = tmp_path / "broken"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (pkg / "broken_plugin_env.py").write_text(BROKEN_MODULE)
    _install(pkg)
    try:
        out = tmp_path / "run"
        log = tmp_path / "launcher.log"
        rc = run_cli(
            [
                "run",
                str(ROOT / "examples/custom_env.toml"),
                "--no-live",
                "--set",
                'env.name="broken_plugin"',
                "--set",
                "env.args={}",
                "--set",
                f'model.path="{tiny_model}"',
                "--set",
                f'run.output_dir="{out}"',
                "--set",
                "learner.total_steps=3",
                "--set",
                "learner.batch_groups=2",
                "--set",
                "learner.group_size=2",
                "--set",
                "learner.eval_size=4",
                "--set",
                "wire.max_env_failures=8",
            ],
            log,
            timeout=300,
            cwd=tmp_path,
        )
    finally:
        _pip("uninstall", "-y", "climbrl-test-broken-env")
    text = log.read_text()
    assert rc == 1, text[-3000:]
    report = text[text.rindex("climbrl: run failed") :]
    assert "failed 8 training episodes in a row" in report and CAUSE in report, report
    assert not (out / "summary.json").exists()


BLOCKING_MODULE = """
import time

from climbrl.envs.tasks import CopyFirstEnv


def slow_score():
    time.sleep(0.3)  # synchronous work in an async method: the server's loop stops meanwhile


class BlockingEnv(CopyFirstEnv):
    async def respond(self, turn):
        slow_score()
        return await super().respond(turn)
"""


@pytest.mark.slow
def test_the_loop_lag_warning_names_the_blocking_env_code(tiny_model: Path, tmp_path: Path) -> None:
    """An env that blocks the rollout server's event loop: the learner's warning, past
    rollout.loop_lag_warn_s, names the env's function and file."""
    (tmp_path / "blocking_env.py").write_text(BLOCKING_MODULE)
    out = tmp_path / "run"
    log = tmp_path / "launcher.log"
    rc = run_cli(
        [
            "run",
            str(ROOT / "examples/custom_env.toml"),
            "--no-live",
            "--set",
            f'env.name="{tmp_path / "blocking_env.py"}:BlockingEnv"',
            "--set",
            "env.args={}",
            "--set",
            "rollout.loop_lag_warn_s=0.2",
            "--set",
            f'model.path="{tiny_model}"',
            "--set",
            f'run.output_dir="{out}"',
            "--set",
            "learner.total_steps=2",
            "--set",
            "learner.batch_groups=2",
            "--set",
            "learner.group_size=2",
            "--set",
            "learner.eval_size=0",
        ],
        log,
        timeout=600,
        cwd=tmp_path,
    )
    learner_log = (out / "logs" / "learner.log").read_text()
    assert rc == 0, log.read_text()[-3000:] + learner_log[-3000:]
    warnings = [x for x in learner_log.splitlines() if "its event loop was blocked" in x]
    assert warnings, learner_log[-3000:]
    assert any(
        "slow_score (blocking_env.py:" in w
        and "BlockingEnv.respond (blocking_env.py:" in w
        and "rollout.loop_lag_warn_s = 0.2" in w
        for w in warnings
    ), warnings
