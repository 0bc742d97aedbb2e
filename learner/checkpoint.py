"""Checkpoints in HF format (safetensors + config + tokenizer) plus the learner's state.

``OUT/checkpoints/step_N/`` is written to a temporary folder and renamed into place, and
``OUT/checkpoints/latest`` is replaced atomically, so a kill during a save leaves the previous
checkpoint loadable. vLLM and transformers load a checkpoint folder unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(
    out: Path, step: int, model: Any, tokenizer: Any, opt: Any, state: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """``extra(folder)`` writes more files (e.g. the PPO critic) before the folder goes live."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    if extra is not None:
        extra(tmp)
    (tmp / "learner_state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    link_tmp = root / f".latest_{os.getpid()}"
    link_tmp.write_text(final.name)
    os.replace(link_tmp, root / "latest")
    return final


def latest_checkpoint(out: Path) -> Path | None:
    ptr = Path(out) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    p = ptr.parent / ptr.read_text().strip()
    return p if (p / "learner_state.json").is_file() else None


def load_state(ckpt: Path, opt: Any) -> dict[str, Any]:
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return json.loads((ckpt / "learner_state.json").read_text())
