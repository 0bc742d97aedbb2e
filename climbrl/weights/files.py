"""The files weights travel in on one host: the learner's ``ShmRing``, a server's
``FrameLanding`` and staging file, and the private folders they live in.

A full update travels one of two ways. To a server on the learner's host, as one file under
/dev/shm that the engine maps (``ShmRing``, ``map_shm``). To the others, as frames: the learner
copies the step into a ring slot and sends views of it (``ShmRing.views``), and the server
lands the frames in a file of its own (``FrameLanding``), from which it then reloads as from
the learner's file: the engine repacks in the background after the ack in both cases. Either
file is rewritten in place, never while a reader may still use it.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from climbrl.weights.codecs import nbytes
from climbrl.wire import TensorMeta, WeightManifest, WireError

log = logging.getLogger("climbrl.weights.files")


def stage(path: Path, tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int], int]]:
    """Write ``tensors`` into one file; return the (name, dtype, shape, offset) layout that
    ``worker_ext.WeightReceiver.climbrl_load_weights`` reads back."""
    from climbrl.wire import dtype_name, tensor_buffer

    layout, off = [], 0
    # Rewritten in place, not truncated: the pages of the last update's file are reused
    # instead of freed and allocated (and zeroed) again. The engine reads the file only
    # during the reload, which has finished before the next update is staged.
    # O_NOFOLLOW: a link planted at the path is refused instead of written through
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        for name, t in tensors.items():
            buf = tensor_buffer(t)
            _pwrite_all(fd, buf, off)
            layout.append((name, dtype_name(t), list(t.shape), off))
            off += buf.nbytes
        if os.fstat(fd).st_size != off:
            os.ftruncate(fd, off)
    finally:
        os.close(fd)
    return layout


def _pwrite_all(fd: int, buf: memoryview, off: int) -> None:
    mv = buf.cast("B") if buf.ndim != 1 or buf.format != "B" else buf
    while len(mv):
        n = os.pwrite(fd, mv, off)
        mv, off = mv[n:], off + n


# ------------------------------------------------------------------ same-host transport

SHM_ALIGN = 64  # byte alignment of each tensor in a shared-memory weights file


def shm_offsets(tensors: list[TensorMeta]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a weights file, and the file's size."""
    from climbrl.wire import _DTYPES

    sizes = []
    for m in tensors:
        if m.dtype not in _DTYPES:
            raise WireError(f"tensor {m.name!r}: unsupported dtype {m.dtype!r}")
        n = _DTYPES[m.dtype]
        for d in m.shape:
            n *= d
        sizes.append(n)
    return _aligned(sizes)


def _aligned(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of blocks of ``sizes`` bytes laid end to end, each at a multiple of SHM_ALIGN,
    and the total size."""
    offs, off = [], 0
    for n in sizes:
        offs.append(off)
        off += -(-n // SHM_ALIGN) * SHM_ALIGN
    return offs, off


def write_shm(path: Path, tensors: list[torch.Tensor]) -> list[int]:
    """Write ``tensors`` into a new file at ``path`` (under /dev/shm: memory, not disk), made
    visible by a rename once complete; return their offsets. A written file is never changed:
    readers map it copy-on-write and keep their mapping after it is deleted."""
    from climbrl.wire import tensor_buffer, tensor_meta

    offs, total = shm_offsets([tensor_meta("", t) for t in tensors])
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(_create(tmp), "wb") as f:
        for t, off in zip(tensors, offs):
            f.seek(off)
            f.write(tensor_buffer(t))
        f.truncate(total)
    os.replace(tmp, path)
    return offs


def _create(path: Path) -> int:
    """A new file, mode 0600, for writing: never an existing file or a link planted there."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def copy_at(dst: Any, srcs: list[memoryview], offs: list[int]) -> None:
    """Copy each buffer of ``srcs`` into the byte array ``dst`` (numpy uint8) at its offset.

    Plain single-threaded memcpys by numpy, which releases the GIL while it copies, so an event
    loop or a hub thread in the same process runs meanwhile (a second thread does not help:
    the copy is bound by memory bandwidth). Not torch's ``copy_``: it splits a copy over OpenMP
    threads that spin at a barrier, and with the engine busy on the same cores that made a
    20 MB copy take 0.25 s instead of 3 ms."""
    import numpy as np

    for src, off in zip(srcs, offs):
        if src.nbytes:
            b = src.cast("B") if src.ndim != 1 or src.format != "B" else src
            np.copyto(dst[off : off + src.nbytes], np.frombuffer(b, np.uint8))


class ShmRing:
    """Weights files under shm_dir that the learner rewrites in place, for full syncs.

    ``write_shm`` makes a new file per sync: under /dev/shm the kernel allocates and zeroes
    every page of it first, which costs more than the copy itself (about 0.4 s of a 0.6 s sync
    at 50M parameters on this machine). A ring file is mapped once (``MAP_SHARED``) and
    rewritten with a plain copy into pages that already exist.

    A file is rewritten only when no server can still read it: each server's engine keeps
    zero-copy views of the file it last loaded (``EngineWeights.base``, used for rollback), so a
    slot sent to a server stays taken until that server acks a newer version (``acked``). A
    server that never acks (dead, failing, pinned) pins its slots until ``dropped``; with every
    slot taken ``write`` returns None and the caller writes a new file as before. Only for the
    ``full`` mode: a delta or LoRA engine keeps views of its first full file for good.

    With ``shm_dir`` None the slots are plain memory, not files: the snapshot of a step that
    goes out as frames to servers on other hosts (``views``), pinned the same way until every
    server it went to has it.
    """

    def __init__(self, shm_dir: Path | None, prefix: str, slots: int = 3):
        self.shm_dir = Path(shm_dir) if shm_dir is not None else None
        self.prefix, self.n = prefix, slots
        self.slots: list[tuple[Path | None, int, torch.Tensor]] = []  # path, size, bytes
        self.refs: dict[str, dict[int, int]] = {}  # server -> {version sent: slot index}

    def _free(self, size: int) -> int | None:
        taken = {k for r in self.refs.values() for k in r.values()}
        for k, (_, sz, _) in enumerate(self.slots):
            if k not in taken and sz == size:
                return k
        if len(self.slots) < self.n:
            if self.shm_dir is None:
                self.slots.append((None, size, torch.empty(size, dtype=torch.uint8)))
                return len(self.slots) - 1
            path = self.shm_dir / f"{self.prefix}-slot{len(self.slots)}.weights"
            fd = _create(path)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            blob = (
                torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
                if size
                else torch.empty(0, dtype=torch.uint8)
            )
            self.slots.append((path, size, blob))  # the tensor holds the mapping
            return len(self.slots) - 1
        return None

    def put(
        self, version: int, servers: list[str], tensors: list[torch.Tensor]
    ) -> tuple[int, list[int]] | None:
        """Copy ``tensors`` into a free slot for ``servers``: (slot, byte offsets), or None when
        every slot is taken."""
        from climbrl.wire import _DTYPES, dtype_name, tensor_buffer

        for t in tensors:
            if dtype_name(t) not in _DTYPES:
                raise WireError(f"unsupported dtype {dtype_name(t)!r}")
        srcs = [tensor_buffer(t) for t in tensors]
        offs, total = _aligned([s.nbytes for s in srcs])
        k = self._free(total)
        if k is None:
            return None
        if total:
            copy_at(self.slots[k][2].numpy(), srcs, offs)
        for s in servers:
            self.refs.setdefault(s, {})[version] = k
        return k, offs

    def write(
        self, version: int, servers: list[str], tensors: list[torch.Tensor]
    ) -> tuple[str, list[int]] | None:
        """``put``, as (file path, offsets) for a manifest's ``shm_path``."""
        got = self.put(version, servers, tensors)
        if got is None:
            return None
        return str(self.slots[got[0]][0] or ""), got[1]

    def views(self, k: int, tensors: list[torch.Tensor], offs: list[int]) -> list[torch.Tensor]:
        """Tensors shaped like ``tensors`` over slot ``k`` at ``offs`` (as ``put`` wrote them)."""
        blob = self.slots[k][2]
        return [
            blob[off : off + nbytes(t)].view(t.dtype).view(t.shape)
            if t.numel()
            else torch.empty(t.shape, dtype=t.dtype)
            for t, off in zip(tensors, offs)
        ]

    def acked(self, server: str, version: int) -> None:
        """``server`` runs ``version`` now: the files of older versions are free of it."""
        r = self.refs.get(server)
        if r:
            for v in [v for v in r if v < version]:
                del r[v]

    def dropped(self, server: str) -> None:
        """``server`` is gone (dead, not restarted under its id): nothing of it pins a slot."""
        self.refs.pop(server, None)

    def close(self) -> None:
        self.slots.clear()  # the mappings go with the tensors
        if self.shm_dir is not None:
            for p in self.shm_dir.glob(f"{self.prefix}-slot*.weights"):
                p.unlink(missing_ok=True)


class FrameLanding:
    """Frames of a full update landed in a weights file of the rollout server's own, which the
    receiver then loads as it loads the learner's same-host file (``map_shm``): the engine
    reloads straight from the file and finishes its packing in the background after the ack
    (``climbrl.rollout.worker_ext``), instead of a copy of the decoded frames into a staging
    file and a reload that packs before it returns; and the engine's weights (``EngineWeights``,
    kept for rollback) view the file, not the frames, which go with the update.

    Two files in ``folder`` (the server's private folder, ``private_dir``), each mapped once
    (``MAP_SHARED``) and rewritten in place, so their pages are reused. ``land`` writes into
    one that neither the engine's current weights view (``EngineWeights.files_in_use``) nor
    the last landed update's background packing may still read; with none free it returns
    None and the receiver decodes and stages the frames as before. Only plain full updates
    land (``takes``): a delta or a LoRA update is small, and a LoRA base is merged, not mapped.
    """

    def __init__(self, folder: Path, slots: int = 2):
        self.folder, self.n = Path(folder), slots
        self.maps: dict[int, tuple[int, Any]] = {}  # slot -> (size, mmap)
        self.last: int | None = None  # slot of the last landed update

    def path(self, k: int) -> Path:
        return self.folder / f"landed{k}.weights"

    @staticmethod
    def takes(m: WeightManifest) -> bool:
        return not m.shm_path and m.kind == "full" and not m.adapters

    def land(self, m: WeightManifest, frames: list[Any], in_use: set[str]) -> WeightManifest | None:
        """Copy ``frames`` into a free file; return ``m`` naming that file and its offsets
        (``shm_path``, ``shm_offsets``; no frames follow), or None (not a plain full update,
        or no file free). Raises ``WireError`` for frames that do not fit the manifest."""
        import msgspec
        import numpy as np

        from climbrl.wire import nbytes_of

        if not self.takes(m):
            return None
        if len(frames) != len(m.tensors):
            raise WireError(f"manifest lists {len(m.tensors)} tensors, got {len(frames)}")
        offs, total = shm_offsets(m.tensors)
        bufs = []
        for meta, fr in zip(m.tensors, frames):
            buf = fr.buffer if hasattr(fr, "buffer") else memoryview(fr)
            if buf.nbytes != nbytes_of(meta):
                raise WireError(
                    f"tensor {meta.name!r}: frame has {buf.nbytes} bytes, shape {meta.shape} "
                    f"of {meta.dtype} needs {nbytes_of(meta)}"
                )
            bufs.append(buf)
        k = next(
            (k for k in range(self.n) if k != self.last and str(self.path(k)) not in in_use),
            None,
        )
        if k is None:
            return None
        dst = self._mapping(k, total)
        if total:
            copy_at(np.frombuffer(dst, dtype=np.uint8), bufs, offs)
        self.last = k
        return msgspec.structs.replace(m, shm_path=str(self.path(k)), shm_offsets=offs)

    def _mapping(self, k: int, size: int) -> Any:
        """Slot ``k``'s file, ``size`` bytes, mapped shared (made anew for another size)."""
        import mmap

        got = self.maps.get(k)
        if got is not None and got[0] == size:
            return got[1]
        if got is not None:
            got[1].close()
            del self.maps[k]
        path = self.path(k)
        path.unlink(missing_ok=True)
        # as _create, but readable too: a shared mapping needs both
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size) if size else None
        finally:
            os.close(fd)
        self.maps[k] = (size, mm)
        return mm

    def close(self) -> None:
        for _, mm in self.maps.values():
            if mm is not None:
                mm.close()
        self.maps.clear()
        for k in range(self.n):
            self.path(k).unlink(missing_ok=True)


# ------------------------------------------------------------------ private weights folders
#
# Weights files live in a folder only this user can enter (0700, a random name from mkdtemp,
# so nobody can plant a file or a link there first), each file 0600 and created with O_EXCL and
# O_NOFOLLOW. A reader checks the folder and the file before it maps one (``check_private``).
# A folder is removed when its process exits, on SIGTERM too (``private_dir``), and a folder
# of a process killed with -9 by the next climbrl process that starts (``remove_orphan_files``).

_PRIVATE: dict[Path, int] = {}  # folder -> pid of the process that made it
_PRIVATE_LOCK = threading.Lock()
_HOOKED = False


def private_dir(root: Path | str, prefix: str) -> Path:
    """A new folder under ``root`` (mode 0700, named ``PREFIX-PID-<random>``) that is removed
    with its files at exit and on SIGTERM (``remove_private_dir`` removes it sooner)."""
    global _HOOKED
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))
    with _PRIVATE_LOCK:
        _PRIVATE[d] = os.getpid()
        if not _HOOKED:
            _HOOKED = True
            atexit.register(_remove_private_dirs)
            _hook_sigterm()
    return d


def remove_private_dir(d: Path | None) -> None:
    """Remove a folder made by ``private_dir`` and everything in it."""
    if d is None:
        return
    with _PRIVATE_LOCK:
        _PRIVATE.pop(Path(d), None)
    shutil.rmtree(d, ignore_errors=True)


def _remove_private_dirs() -> None:
    with _PRIVATE_LOCK:
        mine = [d for d, pid in _PRIVATE.items() if pid == os.getpid()]  # not a fork's parent's
        for d in mine:
            del _PRIVATE[d]
    for d in mine:
        shutil.rmtree(d, ignore_errors=True)


def _hook_sigterm() -> None:
    """On SIGTERM, remove this process's folders, then do what SIGTERM did before: call the
    handler there was, or die of the signal (the default)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers are set from the main thread only; atexit still cleans up
    prev = signal.getsignal(signal.SIGTERM)
    if prev is signal.SIG_IGN or prev is None:
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        _remove_private_dirs()
        if callable(prev):
            prev(signum, frame)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def check_private(path: str | Path) -> None:
    """Raise ``WireError`` unless ``path`` is a regular file (not a link) of this user, mode 0600
    or stricter, in a folder (not a link) of this user that no one else may enter."""
    p = Path(path)
    uid = os.geteuid()
    for what, f, is_kind, mask in (
        ("folder", p.parent, stat.S_ISDIR, 0o077),
        ("file", p, stat.S_ISREG, 0o077),
    ):
        try:
            st = os.lstat(f)
        except OSError as e:
            raise WireError(f"shm weights file not readable on this host: {e}") from None
        if not is_kind(st.st_mode):
            raise WireError(f"shm weights {what} {f} is not a plain {what} (a link?): refused")
        if st.st_uid != uid:
            raise WireError(
                f"shm weights {what} {f} belongs to uid {st.st_uid}, not to this "
                f"process's uid {uid}: refused"
            )
        if st.st_mode & mask:
            raise WireError(
                f"shm weights {what} {f} has mode {stat.S_IMODE(st.st_mode):o}; "
                "only its owner may have access: refused"
            )


def _pid_of(name: str) -> int | None:
    return next((int(x) for x in name.split(".")[0].split("-")[1:] if x.isdigit()), None)


def remove_orphan_files(shm_dir: Path) -> list[Path]:
    """Delete the weights folders (``climbrl-[learner-]PID-*/``) and loose weights files
    (``climbrl-[learner-]PID-*.weights``, ``.tmp``, ``.rollback``) of processes that are gone:
    one killed with -9 cannot clean up, and under /dev/shm its files hold memory. Only this
    user's entries are touched, links are never followed, and an entry that cannot be removed
    is skipped: nothing planted here stops a process from starting."""
    removed = []
    uid = os.geteuid()
    for f in Path(shm_dir).glob("climbrl-*"):
        pid = _pid_of(f.name)
        if pid is None or pid == os.getpid():
            continue
        try:
            st = os.lstat(f)
            if st.st_uid != uid:
                continue  # another user's
            is_dir = stat.S_ISDIR(st.st_mode)
            if not is_dir and not (
                stat.S_ISREG(st.st_mode)
                and f.name.endswith((".weights", ".weights.tmp", ".rollback"))
            ):
                continue
            try:
                os.kill(pid, 0)
                continue  # alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # another user's live process
            if is_dir:
                shutil.rmtree(f)
            else:
                f.unlink()
            removed.append(f)
        except OSError as e:  # gone meanwhile, or not ours to remove
            log.warning("left %s in place: %s", f, e)
    return removed


def map_shm(path: str, tensors: list[TensorMeta], offsets: list[int]) -> list[torch.Tensor]:
    """Zero-copy, read-only-in-effect views of a file written by ``write_shm`` (private
    mapping: pages are shared with the file until written, and nothing here writes them).
    The file must pass ``check_private``."""
    if len(offsets) != len(tensors):
        raise WireError(f"shm manifest: {len(tensors)} tensors but {len(offsets)} offsets")
    want, total = shm_offsets(tensors)
    if list(offsets) != want:
        raise WireError("shm manifest: tensor offsets do not match the layout")
    check_private(path)
    try:
        size = os.stat(path).st_size
        if size < total:
            raise WireError(f"shm weights file {path} has {size} bytes, the manifest needs {total}")
        blob = (
            torch.from_file(path, shared=False, size=total, dtype=torch.uint8)
            if total
            else (torch.empty(0, dtype=torch.uint8))
        )
    except OSError as e:
        raise WireError(f"shm weights file not readable on this host: {e}") from None
    out = []
    for m, off in zip(tensors, offsets):
        dt = getattr(torch, m.dtype)
        n = 1
        for d in m.shape:
            n *= d
        out.append(blob[off : off + n * dt.itemsize].view(dt).view(m.shape))
    return out
