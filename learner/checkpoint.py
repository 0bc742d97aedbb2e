"""Checkpoints in HF format (safetensors + config + tokenizer) plus the learner's state.

``OUT/checkpoints/step_N/`` is written to a temporary folder and renamed into place, and
``OUT/checkpoints/latest`` is replaced atomically, so a kill during a save leaves the previous
checkpoint loadable. Saving a step that already has a folder moves the old one aside first
(a rename) and deletes it after; if ``latest`` names a folder that is not complete (a kill in
between), ``latest_checkpoint`` falls back to the highest complete ``step_N``. Temporary
folders left by a killed save are removed by the next save (a folder moved aside by a killed
re-save is still found). Every file and folder is fsynced before the rename that makes it
live, and the parent folder after it, so a power loss cannot leave ``latest`` naming a folder
whose files never reached the disk. vLLM and transformers load a checkpoint folder unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(
    out: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    opt: Any,
    state: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """``extra(folder)`` writes more files (e.g. the PPO critic) before the folder goes live."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}_{os.getpid()}"
    for stale in root.glob(".tmp_step_*"):  # left by a save that was killed (one learner/run)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in [*root.glob(".old_step_*"), *root.glob(".latest_*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    if extra is not None:
        extra(tmp)
    (tmp / "learner_state.json").write_text(json.dumps(state))  # last: marks it complete
    # on disk before the renames: else a power loss after them can leave `latest` naming a
    # folder of empty or partly written files
    fsync_tree(tmp)
    old = root / f".old_step_{step}_{os.getpid()}"
    if final.exists():
        os.replace(final, old)  # atomic; os.replace cannot overwrite a non-empty folder
    os.replace(tmp, final)
    fsync_dir(root)
    link_tmp = root / f".latest_{os.getpid()}"
    link_tmp.write_text(final.name)
    fsync_file(link_tmp)
    os.replace(link_tmp, root / "latest")
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    _fsync(path, os.O_NOFOLLOW)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (new names, renames) durable."""
    _fsync(path, os.O_DIRECTORY)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder, deepest first."""
    dirs = []
    for d, _, files in os.walk(folder):
        dirs.append(Path(d))
        for f in files:
            p = Path(d) / f
            if p.is_file() and not p.is_symlink():
                fsync_file(p)
    for d in reversed(dirs):
        fsync_dir(d)


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``latest`` names, or, if that is not a complete checkpoint, the highest
    complete ``step_N`` (None when there is none)."""
    root = Path(out) / "checkpoints"
    ptr = root / "latest"
    if ptr.is_file():
        p = root / ptr.read_text().strip()
        if (p / "learner_state.json").is_file():
            return p
    found = []  # (step, not moved aside, folder); a folder moved aside by a killed re-save counts
    for p in root.iterdir() if root.is_dir() else ():
        m = re.fullmatch(r"(\.old_)?step_(\d+)(_\d+)?", p.name)
        if m and (p / "learner_state.json").is_file():
            found.append((int(m.group(2)), m.group(1) is None, p))
    return max(found)[2] if found else None


def load_state(ckpt: Path, opt: Any) -> dict[str, Any]:
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return json.loads((ckpt / "learner_state.json").read_text())
