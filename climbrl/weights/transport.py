"""How the tensors of a weight update travel: ``WeightSender`` and ``WeightReceiver``.

The control plane is always climbrl's ZeroMQ wire: a ``WeightManifest`` per update, from the
learner's hub to each rollout server, and a ``WeightAck`` back. A transport is what carries
the tensors the manifest names:

- ``FrameSender``: ZeroMQ frames that ride with the manifest, one per tensor, sent zero-copy
  from a snapshot (``ShmRing`` in process memory) so that training can go on meanwhile;
- ``ShmSender``: one file under /dev/shm that every server on the learner's host maps
  (``ShmRing``, rewritten in place once no server reads a slot any more); the manifest
  carries its path and offsets, no frames;
- ``InProcessSender`` / ``InProcessReceiver``: a queue in one process, for tests of the codecs
  and the publisher without sockets;
- ``cuda_ipc`` and ``nccl`` (``gpu_sender``): on CUDA, vLLM's weight transfer engines through
  ``climbrl.gpu_weights``; refused with an error on a host without CUDA.

A sender turns (version, servers, manifest, tensors) into the (manifest, frames) the servers
get; a receiver turns what arrived back into the tensors, in the manifest's order.
``acked``/``dropped`` tell a sender when the memory it sent from is free again.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from climbrl.weights.files import ShmRing, map_shm, write_shm
from climbrl.wire import WeightManifest, WireError, tensor_from_frame

TransportName = Literal["frames", "shm", "inprocess", "cuda_ipc", "nccl"]


class WeightSender(ABC):
    """The learner's end of a transport."""

    name: ClassVar[TransportName]

    @abstractmethod
    def send(
        self,
        version: int,
        servers: list[str],
        manifest: WeightManifest,
        tensors: list[torch.Tensor],
    ) -> tuple[WeightManifest, list[torch.Tensor]]:
        """What ``servers`` get for ``version``: the manifest (with where the tensors are, if
        not in the frames) and the frames that go with it."""

    def acked(self, server: str, version: int) -> None:
        """``server`` runs ``version``: what older versions were sent from may be reused."""
        return None

    def dropped(self, server: str) -> None:
        """``server`` is gone for good: nothing sent to it pins memory any more."""
        return None

    def close(self) -> None:
        """Free what the transport holds (files, snapshots)."""
        return None


class WeightReceiver(ABC):
    """A rollout server's end of a transport."""

    @abstractmethod
    def receive(self, manifest: WeightManifest, frames: list[Any]) -> list[torch.Tensor]:
        """The tensors ``manifest`` names, in its order."""


class FrameSender(WeightSender):
    """ZeroMQ frames, from a snapshot of the step (``ShmRing`` in process memory): the hub
    sends them zero-copy on its own thread while the next optimizer step writes the
    parameters in place. ``snapshot=False`` sends the tensors as given (they never change
    afterwards: delta frames, LoRA factors, the delta publisher's private copy)."""

    name = "frames"

    def __init__(self, snapshot: bool = True, slots: int = 2) -> None:
        self.ring = ShmRing(None, "frames", slots=slots) if snapshot else None

    def send(
        self,
        version: int,
        servers: list[str],
        manifest: WeightManifest,
        tensors: list[torch.Tensor],
    ) -> tuple[WeightManifest, list[torch.Tensor]]:
        if self.ring is None:
            return manifest, tensors
        snap = self.ring.put(version, servers, tensors)
        if snap is None:  # every slot still pinned by a server behind
            return manifest, [t.detach().clone() for t in tensors]
        return manifest, self.ring.views(snap[0], tensors, snap[1])

    def acked(self, server: str, version: int) -> None:
        # a server on another host keeps nothing of the frames once it has loaded them
        if self.ring is not None:
            self.ring.acked(server, version + 1)

    def dropped(self, server: str) -> None:
        if self.ring is not None:
            self.ring.dropped(server)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()


class FrameReceiver(WeightReceiver):
    """The frames of a message, as tensors of the manifest's dtypes and shapes."""

    def receive(self, manifest: WeightManifest, frames: list[Any]) -> list[torch.Tensor]:
        _check_count(manifest, frames)
        # zero-copy views of the frames' bytes (keep the frames alive)
        return [tensor_from_frame(meta, f) for meta, f in zip(manifest.tensors, frames)]


class ShmSender(WeightSender):
    """One file under ``folder`` (the learner's private folder in /dev/shm) that every server
    on the learner's host maps. ``ring``: full syncs rewrite a few slots in place (a slot is
    reused once every server it went to has acked a newer version); else, or with every slot
    pinned, each publish is a new file and the last two are kept."""

    name = "shm"

    def __init__(self, folder: Path, ring: bool = True) -> None:
        self.folder = folder
        self.ring = ShmRing(folder, "ring") if ring else None
        self._files: list[Path] = []
        self._seq = 0

    def send(
        self,
        version: int,
        servers: list[str],
        manifest: WeightManifest,
        tensors: list[torch.Tensor],
    ) -> tuple[WeightManifest, list[torch.Tensor]]:
        got = self.ring.write(version, servers, tensors) if self.ring is not None else None
        path, offs = got if got is not None else self._new_file(tensors)
        manifest.shm_path, manifest.shm_offsets = path, offs
        return manifest, []

    def _new_file(self, tensors: list[torch.Tensor]) -> tuple[str, list[int]]:
        """A new weights file (never one a server may still map), keeping the last two."""
        self._seq += 1
        path = self.folder / f"{self._seq}.weights"
        offs = write_shm(path, tensors)
        self._files.append(path)
        while len(self._files) > 2:  # a server that has not read it yet fails over to frames
            self._files.pop(0).unlink(missing_ok=True)
        return str(path), offs

    def acked(self, server: str, version: int) -> None:
        if self.ring is not None:
            self.ring.acked(server, version)

    def dropped(self, server: str) -> None:
        if self.ring is not None:
            self.ring.dropped(server)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        for f in self._files:
            f.unlink(missing_ok=True)
        self._files.clear()


class ShmReceiver(WeightReceiver):
    """Views of the learner's file, mapped read-only (``climbrl.weights.files.map_shm``)."""

    def receive(self, manifest: WeightManifest, frames: list[Any]) -> list[torch.Tensor]:
        if not manifest.shm_path:
            raise WireError(f"weight update {manifest.version} names no shared-memory file")
        return map_shm(manifest.shm_path, manifest.tensors, manifest.shm_offsets)


class InProcessSender(WeightSender):
    """Puts each message on a queue of ``channel`` per server, copies of the tensors (what a
    socket would deliver), for ``InProcessReceiver`` to take."""

    name = "inprocess"

    def __init__(self, channel: InProcessChannel) -> None:
        self.channel = channel

    def send(
        self,
        version: int,
        servers: list[str],
        manifest: WeightManifest,
        tensors: list[torch.Tensor],
    ) -> tuple[WeightManifest, list[torch.Tensor]]:
        for s in servers:
            self.channel.put(s, manifest, [t.detach().clone() for t in tensors])
        return manifest, []


class InProcessChannel:
    """One queue of (manifest, tensors) per server."""

    def __init__(self) -> None:
        self._queues: dict[str, queue.Queue[tuple[WeightManifest, list[torch.Tensor]]]] = {}

    def _q(self, server: str) -> queue.Queue[tuple[WeightManifest, list[torch.Tensor]]]:
        return self._queues.setdefault(server, queue.Queue())

    def put(self, server: str, manifest: WeightManifest, tensors: list[torch.Tensor]) -> None:
        self._q(server).put((manifest, tensors))

    def get(
        self, server: str, timeout_s: float = 10.0
    ) -> tuple[WeightManifest, list[torch.Tensor]]:
        try:
            return self._q(server).get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no weight update for {server} within {timeout_s}s") from None


class InProcessReceiver(WeightReceiver):
    """The tensors that came with the message, as they are."""

    def receive(self, manifest: WeightManifest, frames: list[Any]) -> list[torch.Tensor]:
        _check_count(manifest, frames)
        return list(frames)


def require_cuda(transport: str, available: Callable[[], bool] = torch.cuda.is_available) -> None:
    """Raise a ValueError naming what to do when ``transport`` needs CUDA and there is none."""
    if not available():
        raise ValueError(
            f"weight transport {transport!r} needs CUDA, and this host has no CUDA device: "
            "set learner.weights.transport = 'auto' (or 'zmq') on a CPU host"
        )


def gpu_sender(
    transport: Literal["cuda_ipc", "nccl"],
    call: Callable[[bytes], None],
    available: Callable[[], bool] = torch.cuda.is_available,
) -> Any:
    """The learner's end of a GPU transport: ``climbrl.gpu_weights.ZmqWeightSyncClient``
    over ``call`` (one encoded call to every server, returning once each has applied it),
    which vLLM's trainer-side weight transfer engine (IPC on one node, an NCCL group across
    nodes) drives. Refused without CUDA (``require_cuda``)."""
    from climbrl.gpu_weights import ZmqWeightSyncClient

    if transport not in ("cuda_ipc", "nccl"):
        raise ValueError(f"unknown GPU weight transport {transport!r}: 'cuda_ipc' or 'nccl'")
    require_cuda(transport, available)
    return ZmqWeightSyncClient(call)


def _check_count(manifest: WeightManifest, frames: list[Any]) -> None:
    """WireError unless a message carries one frame per tensor its manifest names."""
    if len(frames) != len(manifest.tensors):
        raise WireError(
            f"weight update {manifest.version}: {len(frames)} frames for "
            f"{len(manifest.tensors)} tensors"
        )
