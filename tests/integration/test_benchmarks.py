"""The rollout benchmark runs in the default suite in a small variant with the long-prompt
setting (chat prompts of 127-161 tokens, 64 seeded requests at once): both paths produce
every token they were asked for and the benchmark reports a ratio. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_rollout_benchmark_with_long_seeded_chat_prompts():
    out = subprocess.run(
        [sys.executable, "benchmarks/rollout_overhead.py", "--env", "math", "--tasks", "8",
         "--group", "8", "--max-tokens", "8", "--rounds", "1", "--no-results-file"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["env"] == "math" and res["prompt_tokens"][0] > 100
    (rnd,) = res["rounds"]
    assert rnd["raw"][0] > 0 and rnd["climbrl"][0] > 0  # tokens generated on each path
    assert res["ratio"] > 0
