"""A vLLM engine that dies inside a live rollout server ends the run with a clear message.

`climbrl run` with one server and ``run.on_child_death = "continue"`` (nothing restarts it):
the engine-core process is killed with SIGKILL after step 2. The server notices (a failed
order or its heartbeat's engine check), tells the learner and exits with ``ENGINE_DEAD_EXIT``;
the learner has no server left to take orders and stops the run quoting the engine's death,
long before ``total_steps``. (With ``"restart"`` the run goes on instead:
tests/integration/test_crash.py.)
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.conftest import kill_tree
from tests.integration.test_crash import (
    _config,
    _engine_core_pid,
    _launch,
    _logs,
    _rollout_pids,
    _steps,
    _wait_for_step,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_engine_killed_in_a_live_server_stops_the_run_with_its_cause(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = _config(
        tmp_path,
        tiny_model,
        out,
        steps=200,
        run={"on_child_death": "continue"},
        learner={"checkpoint_every": 0},
    )
    proc = _launch(cfg, tmp_path / "launcher.log")
    try:
        _wait_for_step(proc, out / "metrics.jsonl", 2, tmp_path, out)
        server = _rollout_pids(proc.pid)["r0"]
        os.kill(_engine_core_pid(server), signal.SIGKILL)
        rc = proc.wait(timeout=300)  # a hang guard: the run stops within seconds
    finally:
        kill_tree(proc)
    logs = _logs(tmp_path, out)
    assert rc != 0, logs
    # the server's last line, logged as serve() returns ENGINE_DEAD_EXIT (the launcher reports
    # the exit code only if it polls the server before the learner ends)
    ours = [
        ln
        for ln in (out / "logs" / "rollout-0.log").read_text().splitlines()
        if f" climbrl.rollout[{server}]" in ln
    ]
    assert "rollout r0 exits: vLLM engine died: MPClient: engine core exited" in ours[-1], logs
    launcher = (tmp_path / "launcher.log").read_text()
    assert (
        "the learner stopped: no rollout server can take work orders; r0: vLLM engine died: "
    ) in launcher, logs
    assert max(r["step"] for r in _steps(out / "metrics.jsonl")) < 200
