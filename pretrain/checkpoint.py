"""Atomic checkpoints for exact resume: model, optimizers, schedulers, data cursor, RNG states.

A checkpoint is written to ``checkpoints/.tmp-step_N`` and renamed (``os.replace``) to
``checkpoints/step_N``; then the ``latest`` pointer is rewritten the same way. A kill -9 at any
moment leaves either the old or the new checkpoint whole, never a torn one.

    from climbrl.pretrain.checkpoint import save_checkpoint, load_latest
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    ckpt_root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], keep: int
) -> Path:
    """Write `tensors` (torch.save-able) and `meta` (JSON) as checkpoint `step`, atomically."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save({**tensors, "rng": rng_state()}, f)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / "meta.json", "w") as f:
        json.dump({**meta, "step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(ckpt_root: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(tensors, meta) of the latest complete checkpoint, or None if there is none."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    tensors = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    meta = json.loads((path / "meta.json").read_text())
    return tensors, meta
