"""Failure paths (issue 21): private weights files, durable checkpoints, untorn weight frames.

Each test fails on the code before its fix: weights files under /dev/shm were 0644 with
predictable names and opened through links; ``remove_orphan_files`` crashed on a planted
folder; checkpoints were renamed into place without an fsync; a full sync sent the live
parameters as zero-copy frames that the next optimizer step rewrote.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from climbrl.learner.weights import WeightPublisher
from climbrl.weights.files import (
    check_private,
    map_shm,
    private_dir,
    remove_orphan_files,
    remove_private_dir,
    stage,
    write_shm,
)
from climbrl.wire import WireError, tensor_meta


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- weights files


def test_publisher_files_are_private(tmp_path: Path) -> None:
    """The learner's weights files sit in a 0700 folder with a random name, each file 0600."""
    model = torch.nn.Linear(4, 3)
    pub = WeightPublisher(model, "full", shm_dir=str(tmp_path))
    other = WeightPublisher(model, "full", shm_dir=str(tmp_path))
    pub.join("a", socket.gethostname())
    ((_, m, _),) = pub.messages(1, ["a"])
    path = Path(m.shm_path)
    assert path.parent.parent == tmp_path and path.parent != other.shm_dir
    assert path.parent.name.startswith(f"climbrl-learner-{os.getpid()}-")
    assert _mode(path.parent) == 0o700 and _mode(path) == 0o600
    check_private(path)
    for v in (2, 3, 4):  # ring full (nobody acks): new files, each 0600
        pub.forget("a")
        ((_, m, _),) = pub.messages(v, ["a"])
        assert _mode(Path(m.shm_path)) == 0o600
    pub.close()
    other.close()
    assert not path.parent.exists() and list(tmp_path.iterdir()) == []


def test_weights_files_refuse_planted_links_and_existing_files(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    link = tmp_path / "staged.weights"
    link.symlink_to(target)
    with pytest.raises(OSError):  # O_NOFOLLOW
        stage(link, {"w": torch.ones(4)})
    (tmp_path / "new.weights.tmp").symlink_to(target)
    with pytest.raises(FileExistsError):  # O_EXCL
        write_shm(tmp_path / "new.weights", [torch.ones(4)])
    assert target.read_bytes() == b"precious"


def _written(d: Path) -> tuple[Path, list]:
    t = torch.arange(6, dtype=torch.float32)
    f = d / "w.weights"
    offs = write_shm(f, [t])
    return f, [tensor_meta("w", t)], offs


def test_map_shm_checks_owner_mode_and_links(tmp_path: Path) -> None:
    """A reader maps a weights file only from a private folder of its own user."""
    d = private_dir(tmp_path, "climbrl-test")
    f, metas, offs = _written(d)
    assert map_shm(str(f), metas, offs)[0].tolist() == list(range(6))
    os.chmod(f, 0o644)
    with pytest.raises(WireError, match="mode 644"):
        map_shm(str(f), metas, offs)
    os.chmod(f, 0o600)
    os.chmod(d, 0o755)  # a folder others may enter
    with pytest.raises(WireError, match="folder .* mode 755"):
        map_shm(str(f), metas, offs)
    os.chmod(d, 0o700)
    link = d / "link.weights"
    link.symlink_to(f)
    with pytest.raises(WireError, match="not a plain file"):
        map_shm(str(link), metas, offs)
    if os.geteuid() == 0:  # root can hand the file to another user
        os.chown(f, 65534, 65534)
        with pytest.raises(WireError, match="belongs to uid 65534"):
            map_shm(str(f), metas, offs)
    remove_private_dir(d)
    assert not d.exists()


def test_private_dirs_are_removed_on_sigterm(tmp_path: Path) -> None:
    """A process stopped by SIGTERM (the launcher's stop) leaves no weights folder behind, and
    still dies of the signal."""
    code = (
        "import sys, time\n"
        "from climbrl.weights.files import private_dir, write_shm\n"
        "import torch\n"
        f"d = private_dir({str(tmp_path)!r}, 'climbrl-learner')\n"
        "write_shm(d / '1.weights', [torch.ones(8)])\n"
        "print(d, flush=True)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        d = Path(p.stdout.readline().strip())
        assert (d / "1.weights").is_file()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == -signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not d.exists()


def test_remove_orphan_files_survives_what_is_planted(tmp_path: Path, monkeypatch) -> None:
    """Folders, links and entries it cannot remove are skipped or removed, never a crash; a
    dead process's private folder goes, a live one's stays, a link's target is untouched."""
    from climbrl.weights import files

    dead = _dead_pid()
    planted_dir = tmp_path / f"climbrl-{dead}-r0.weights"  # a folder under a file's name
    planted_dir.mkdir()
    (planted_dir / "x").write_bytes(b"x")
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    (tmp_path / f"climbrl-{dead}-r1.weights").symlink_to(target)
    orphan = tmp_path / f"climbrl-learner-{dead}-abcd1234"
    orphan.mkdir(mode=0o700)
    (orphan / "ring-slot0.weights").write_bytes(b"w")
    live = private_dir(tmp_path, "climbrl-rollout")
    stuck = tmp_path / f"climbrl-rollout-{dead}-stuck"
    stuck.mkdir()
    real_rmtree = files.shutil.rmtree

    def rmtree(p, *a, **kw):
        if Path(p) == stuck:
            raise PermissionError(13, "Permission denied", str(p))
        return real_rmtree(p, *a, **kw)

    monkeypatch.setattr(files.shutil, "rmtree", rmtree)
    removed = remove_orphan_files(tmp_path)
    assert sorted(removed) == sorted([planted_dir, orphan])
    assert (
        target.read_bytes() == b"precious"
        and (tmp_path / f"climbrl-{dead}-r1.weights").is_symlink()
    )
    assert live.is_dir() and stuck.is_dir()
    remove_private_dir(live)


def test_remove_orphan_files_leaves_other_users_entries(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another user")
    dead = _dead_pid()
    f = tmp_path / f"climbrl-{dead}-r0.weights"
    f.write_bytes(b"w")
    os.chown(f, 65534, 65534)
    assert remove_orphan_files(tmp_path) == [] and f.exists()


# --------------------------------------------------------------------------- torn weights


def test_full_sync_frames_are_a_snapshot_not_the_live_parameters() -> None:
    """The hub sends frames zero-copy on its own thread while the learner trains on: an
    optimizer step after ``messages`` must not change what is being sent."""
    model = torch.nn.Linear(4, 3)
    pub = WeightPublisher(model, "full")
    pub.join("far", "another-host")
    ((_, m, frames),) = pub.messages(1, ["far"])
    before = [t.clone() for t in frames]
    live = {p.data_ptr() for p in model.parameters()}
    assert not {t.data_ptr() for t in frames} & live
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # in place, as AdamW does
    assert all(torch.equal(a, b) for a, b in zip(frames, before))
    assert [t.name for t in m.tensors] == list(model.state_dict())


# --------------------------------------------------------------------------- checkpoints


class _Saver:
    def save_pretrained(self, path: str, **kw: object) -> None:
        os.makedirs(os.path.join(path, "sub"), exist_ok=True)
        for name in ("model.safetensors", "sub/extra.json"):
            with open(os.path.join(path, name), "w") as f:
                f.write("w")


def test_checkpoint_files_and_folders_are_fsynced_before_each_rename(
    tmp_path: Path, monkeypatch
) -> None:
    from climbrl.learner import checkpoint as ck

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "fsync", fsync)
    monkeypatch.setattr(ck.os, "replace", replace)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    final = ck.save_checkpoint(tmp_path, 2, _Saver(), _Saver(), opt, {"step": 2})
    root = str(tmp_path / "checkpoints")
    tmp = str(root) + f"/.tmp_step_2_{os.getpid()}"
    i_move = events.index(("replace", tmp))
    synced = {p for kind, p in events[:i_move] if kind == "fsync"}
    files = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()}
    assert {"model.safetensors", "sub/extra.json", "optimizer.pt", "learner_state.json"} <= files
    assert {f"{tmp}/{f}" for f in files} <= synced  # every file of the folder
    assert {tmp, f"{tmp}/sub"} <= synced  # and its folders
    link = f"{root}/.latest_{os.getpid()}"
    i_link = events.index(("replace", link))
    assert ("fsync", root) in events[i_move:i_link]  # the folder's rename, before `latest`
    assert ("fsync", link) in events[i_move:i_link]
    assert events[-1] == ("fsync", root)  # and the pointer's rename
    assert ck.latest_checkpoint(tmp_path) == final
