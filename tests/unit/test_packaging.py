"""Packaging: everything installs under `climbrl.*`; no top-level kernels/envs/rollout/learner."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"kernels", "envs", "rollout", "learner", "serving", "pretrain"}


def test_wheel_has_only_the_climbrl_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (whl,) = tmp_path.glob("climbrl-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"climbrl", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for sub in ("rollout", "learner", "serving", "envs", "kernels", "pretrain"):
        assert f"climbrl/{sub}/__init__.py" in names
    assert "climbrl/configs/demo.toml" in names


def test_site_packages_has_no_top_level_clash():
    site = Path(sysconfig.get_paths()["purelib"])
    clashes = [p.name for p in site.iterdir() if p.name in FORBIDDEN]
    assert clashes == []
    # and the subpackages import from the mapped folders, outside the repo's cwd too
    code = (
        "import importlib.util as u, climbrl.rollout, climbrl.kernels, climbrl.envs\n"
        "print(u.find_spec('rollout'), u.find_spec('learner'), u.find_spec('envs'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True
    )
    assert out.stdout.strip() == "None None None"
