"""The subprocess agent of ``climbrl.envs.agent`` gets an allowlisted environment: none of the
rollout server's secrets (wire keys, provider API keys) reach it.

    pytest tests/unit/test_agent_env.py -q
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from climbrl.envs.agent import AgentContext, AgentEnv

DUMP = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"


async def test_subprocess_agent_gets_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIMBRL_WIRE_KEYS", "wire-secret")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "provider-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-secret")
    monkeypatch.setenv("MY_TOOL_HOME", "/opt/tool")
    out = tmp_path / "env.json"
    env = AgentEnv(agent=[sys.executable, "-c", DUMP, str(out)], pass_env=["MY_TOOL_HOME"])
    ctx = AgentContext("http://127.0.0.1:1/v1", "sk-run", "m", "s1")
    await env.run_agent(env.get_task("train", 0), ctx)
    seen = json.loads(out.read_text())
    assert not {"CLIMBRL_WIRE_KEYS", "ANTHROPIC_API_KEY", "AWS_SECRET_ACCESS_KEY"} & set(seen)
    assert "secret" not in json.dumps(seen)
    assert seen["OPENAI_API_KEY"] == "sk-run" and seen["CLIMBRL_SESSION_ID"] == "s1"
    assert seen["MY_TOOL_HOME"] == "/opt/tool" and seen["PATH"]
    assert json.loads(seen["CLIMBRL_TASK"])["split"] == "train"


def test_pass_env_must_be_names() -> None:
    with pytest.raises(ValueError, match="pass_env"):
        AgentEnv(agent=[sys.executable, "-c", "pass"], pass_env="HOME")  # type: ignore[arg-type]
