"""`climbrl demo` end to end: pretrain the base (the real recipe), then RL raises its held-out
accuracy through the real learner + vLLM rollout server. About 5 minutes on 2 cores, so it is
`slow`; the pieces are covered by the default suite (test_pretrain_vllm: a base loads
and generates in vLLM; test_run_e2e: the RL run; unit/test_pretrain_demo: base caching).

    pytest -m slow tests/integration/test_pretrain_demo.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_pretrains_a_base_and_rl_raises_it(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "demo"
    log = tmp_path / "demo.log"
    rc = run_cli(["demo", "--output-dir", str(out)], log, timeout=1800)
    assert rc == 0, log.read_text()[-4000:]
    s = json.loads((out / "demo_summary.json").read_text())
    # The base is measurable but imperfect, and RL raises it.
    assert 0.05 < s["base_heldout_accuracy"] < 0.8, s
    assert 0.05 < s["accuracy_before"] < 0.8, s
    # the demo's promise: at least 5 points on 2000 held-out tasks, exact McNemar p < 0.01
    assert s["accuracy_after"] - s["accuracy_before"] >= 0.05, s
    change = s["heldout_change"]  # the same held-out tasks, greedy, before and after
    assert change["fixed"] > change["broken"], change
    assert change["tasks"] == 2000 and change["mcnemar_p"] < 0.01, change
    assert (out / "reward_curve.png").stat().st_size > 0
    assert "held-out accuracy after RL" in log.read_text()
