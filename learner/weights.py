"""Learner side of weight sync: full, delta and LoRA (``learner.weights.mode``), and LoRA via peft.

``WeightPublisher.messages(version, servers)`` turns the model's current weights into one
``WeightManifest`` (+ frames) per group of servers: a full sync for servers whose version the
publisher does not trust (new, rejoined, failed, pinned), a delta for the others. The encodings
are in ``climbrl.weights.codecs``; the engine ends up with bit-identical weights either way.

- **delta**: keeps a private copy of the last published weights (one model's worth of memory)
  and sends only tensors whose bits changed, each as raw, sparse or compressed-xor frames,
  whichever is smallest. With AdamW every element moves each step, so a full-finetune delta is
  bounded by how well the low mantissa bits compress, not by skipping (see benchmarks/weight_sync).
- **lora**: ``setup_lora`` injects peft LoRA layers in place (``peft.inject_adapter_in_model``:
  the model stays a plain transformers model for the rest of the learner) and freezes the base.
  After a server's first (full, base + adapters) sync only the adapter factors A and B travel.

LoRA route: the engine merges. The rollout server keeps the base weights it was sent and reloads
``W + (B @ A) * alpha / r`` for the targeted modules through the same ``reload_weights`` path as
any other update, rather than vLLM's LoRA support (``enable_lora`` + a ``LoRARequest`` per
version). Why: the merge needs nothing from the engine (no LoRA kernels, no adapter files on
disk per version, no ``max_lora_rank``/``max_loras`` engine limits, no slower punica path on
CPU); the engine keeps running plain dense weights, so ``processed_logprobs`` parity, prefix
caching by version, the replay logits processor and MoE routing capture are unchanged; and the
factors are what travels, so the bytes are the adapter's, not the targeted modules'. The cost is
one ``B @ A`` per targeted module per update on the server, and a reload of those modules.

Checkpoints in LoRA mode hold the merged model (a plain HF folder vLLM and transformers load)
plus ``adapter/`` (peft format: ``adapter_config.json`` + ``adapter_model.safetensors``), which
``--resume`` loads on top of ``model.path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from climbrl.config import LearnerCfg
from climbrl.weights.codecs import checkpoint_names, encode_change, merge, metas, nbytes, same_bits
from climbrl.weights.files import ShmRing, private_dir, remove_orphan_files, remove_private_dir
from climbrl.weights.transport import FrameSender, ShmSender, WeightSender
from climbrl.wire import WeightManifest

_ADAPTER = "default"


def setup_lora(model: Any, lc: LearnerCfg, resume_from: Path | None = None) -> Any:
    """Inject LoRA adapters into ``model`` in place and freeze everything else.

    The adapters go on the ``nn.Linear`` layers whose name ends in one of ``lora_targets``,
    listed by full name. MoE experts that transformers fuses into 3-D tensors
    (``experts.gate_up_proj``) are not Linear layers: they keep their base weights (peft would
    otherwise wrap them in parameter adapters, which the LoRA sync cannot merge)."""
    from peft import LoraConfig, inject_adapter_in_model

    wanted = set(lc.weights.lora.targets)
    targets = sorted(
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in wanted
    )
    if not targets:
        raise ValueError(
            f"learner.weights.lora.targets = {list(lc.weights.lora.targets)} matched no Linear "
            "layer of the model; use the last name component of its Linear "
            "layers, e.g. 'q_proj', 'v_proj'"
        )
    conf = LoraConfig(
        r=lc.weights.lora.r,
        # peft types lora_alpha as int; it only divides it by r, so a float works
        lora_alpha=lc.weights.lora.alpha,  # pyright: ignore[reportArgumentType]
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
    )
    try:
        model = inject_adapter_in_model(conf, model, adapter_name=_ADAPTER)
    except ValueError as e:
        raise ValueError(
            f"learner.weights.lora.targets = {list(lc.weights.lora.targets)}: {e}"
        ) from None
    n_lora = 0
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
        n_lora += ".lora_" in n
    if n_lora == 0:
        raise ValueError(
            f"learner.weights.lora.targets = {list(lc.weights.lora.targets)} matched no module of "
            "the model; use the last name component of its Linear layers, e.g. "
            "'q_proj', 'v_proj'"
        )
    model._climbrl_lora_config = conf
    if resume_from is not None:
        load_adapter(model, resume_from / "adapter")
    return model


class LoraView:
    """HF-named base weights and adapter factors of a model with injected LoRA layers."""

    def __init__(self, model: Any):
        from peft.tuners.lora import LoraLayer

        self.model = model
        self.layers: dict[str, Any] = {}  # HF weight name -> LoraLayer
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and _ADAPTER in mod.lora_A:
                assert not getattr(mod, "fan_in_fan_out", False), name
                self.layers[f"{name}.weight"] = mod
        scales = {m.scaling[_ADAPTER] for m in self.layers.values()}
        assert len(scales) == 1, scales
        self.scale = float(scales.pop())

    def base_state(self) -> dict[str, torch.Tensor]:
        return {
            n.replace(".base_layer.", "."): t.detach()
            for n, t in self.model.state_dict().items()
            if ".lora_" not in n
        }

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            w: (m.lora_A[_ADAPTER].weight.detach(), m.lora_B[_ADAPTER].weight.detach())
            for w, m in self.layers.items()
        }

    def merged_state(self) -> dict[str, torch.Tensor]:
        sd = self.base_state()
        for w, (a, b) in self.factors().items():
            sd[w] = merge(sd[w], a, b, self.scale)
        return sd


class LoraCheckpoint:
    """Stands in for the model in ``save_checkpoint``: merged weights + the peft adapter."""

    def __init__(self, model: Any, base_path: str):
        self.model, self.base_path = model, base_path

    def save_pretrained(self, folder: str, **kw: Any) -> None:
        view = LoraView(self.model)
        self.model.save_pretrained(folder, state_dict=view.merged_state(), **kw)
        save_adapter(self.model, Path(folder) / "adapter", self.base_path)


def save_adapter(model: Any, folder: Path, base_path: str) -> None:
    """peft's on-disk format: ``PeftModel.from_pretrained(base, folder)`` loads it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    conf = model._climbrl_lora_config
    conf.base_model_name_or_path = base_path
    conf.save_pretrained(str(folder))
    sd = {
        f"base_model.model.{n.replace(f'.{_ADAPTER}.', '.')}": t.detach().contiguous()
        for n, t in model.state_dict().items()
        if ".lora_" in n
    }
    save_file(sd, str(folder / "adapter_model.safetensors"))


def load_adapter(model: Any, folder: Path) -> None:
    from safetensors.torch import load_file

    f = folder / "adapter_model.safetensors"
    if not f.is_file():
        raise ValueError(
            f"resume with learner.weights.mode = 'lora': {f} is missing; was the "
            "checkpoint written by a LoRA run with the same lora_targets?"
        )
    want = {n for n in model.state_dict() if ".lora_" in n}
    sd = {}
    for k, v in load_file(str(f)).items():
        name = k.removeprefix("base_model.model.")
        for part in (".lora_A.", ".lora_B."):
            name = name.replace(part, f"{part}{_ADAPTER}.")
        sd[name] = v
    if set(sd) != want:
        raise ValueError(
            f"adapter in {folder} does not match learner.weights.lora.targets / lora_r: "
            f"{len(set(sd) ^ want)} tensors differ"
        )
    model.load_state_dict(sd, strict=False)


class WeightPublisher:
    """What to send each server so that its engine runs the learner's current weights."""

    def __init__(
        self,
        model: Any,
        mode: str,
        base_path: str = "",
        shm_dir: str | None = None,
        wire_dtype: torch.dtype | None = None,
    ):
        """``wire_dtype``: the engine's dtype (``model.dtype``), when the learner's weights
        are in another (float32 master weights under bf16 autocast): floating-point tensors
        are sent in it, from CPU memory."""
        self.model, self.mode, self.base_path = model, mode, base_path
        self.wire_dtype = wire_dtype
        self.lora = LoraView(model) if mode == "lora" else None
        self.ref: dict[str, torch.Tensor] | None = None  # delta: weights at ref_version
        self.ref_version = -1
        self.sent: dict[str, int] = {}  # server -> version of the last update it was sent
        self.last: dict[str, int] = {}  # bytes of the last full / delta message
        # Same-host transport (learner.weights.transport = "auto"): a full sync to servers on this
        # host is one file under shm_dir that every such server maps, instead of frames.
        # The files go in a folder of this process under shm_dir, 0700 with a random name
        # (climbrl.weights.files.private_dir), removed at exit and on SIGTERM.
        self.shm_dir: Path | None = None
        self.local: set[str] = set()
        # The transports (climbrl.weights.transport). Full mode sends the step's snapshot, in
        # slots rewritten in place (climbrl.weights.files.ShmRing): files under shm_dir that
        # servers on this host map (ShmSender), and plain memory that goes out as frames to
        # the others (FrameSender). Not one for both: a socket sends from /dev/shm pages at
        # about half the speed it sends from process memory (no huge pages).
        self.frames = FrameSender(snapshot=mode == "full")
        self.shm: ShmSender | None = None
        if shm_dir:
            remove_orphan_files(Path(shm_dir))
            self.shm_dir = private_dir(shm_dir, "climbrl-learner")
            self.shm = ShmSender(self.shm_dir, ring=mode == "full")

    @property
    def ring(self) -> ShmRing | None:
        """The same-host ring of full syncs (None without shm_dir, or outside full mode)."""
        return self.shm.ring if self.shm is not None else None

    def join(self, server: str, hostname: str) -> None:
        """A server (re)connected from ``hostname``: its next update is a full sync, through
        shared memory when it runs on this host."""
        import socket

        self.forget(server)
        if self.shm_dir is not None and hostname == socket.gethostname():
            self.local.add(server)
        else:
            self.local.discard(server)

    def forget(self, server: str, shm_unreadable: bool = False) -> None:
        """This server's weights are not known any more (new, failed, pinned): next is full.
        A server that could not read a shared-memory file (``WeightAck.shm_unreadable``) gets
        frames from now on."""
        self.sent.pop(server, None)
        if shm_unreadable:
            self.local.discard(server)

    def acked(self, server: str, version: int) -> None:
        """``server`` acked ``version`` (ok): the weights files of older versions are free,
        and for a server on another host, whose engine keeps nothing of the frames, the
        snapshot of ``version`` too."""
        for t in self._transports():
            t.acked(server, version)

    def _transports(self) -> list[WeightSender]:
        out: list[WeightSender] = [self.frames]
        if self.shm is not None:
            out.append(self.shm)
        return out

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the engine loads it: in CPU memory, in ``wire_dtype`` if floating point
        (no copy when it already is)."""
        dtype = self.wire_dtype if self.wire_dtype is not None and t.is_floating_point() else None
        return t.to(device="cpu", dtype=dtype or t.dtype)

    def dropped(self, server: str) -> None:
        """``server`` is gone for good: what it was sent pins no snapshot slot any more."""
        for t in self._transports():
            t.dropped(server)

    def close(self) -> None:
        for t in self._transports():
            t.close()
        remove_private_dir(self.shm_dir)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def checkpoint_model(self) -> Any:
        return LoraCheckpoint(self.model, self.base_path) if self.lora else self.model

    def messages(
        self,
        version: int,
        servers: list[str],
        state: dict[str, torch.Tensor] | None = None,
    ) -> list[tuple[list[str], WeightManifest, list[torch.Tensor]]]:
        """(servers, manifest, frames) for every kind of message this publish needs.
        ``state``: the model's full weights when the model itself holds shards (FSDP)."""
        if state is not None:
            state = dict(state)
        elif self.lora is not None:
            state = self.lora.base_state()  # frozen: never changes, so never in a delta
        else:
            state = {n: t.detach() for n, t in self.model.state_dict().items()}
        state = {n: self._wire(t) for n, t in state.items()}
        state = checkpoint_names(state)  # per-expert MoE names, as the engine loads them
        known = [
            s
            for s in servers
            if self.mode != "full" and self.ref is not None and self.sent.get(s) == self.ref_version
        ]
        fresh = [s for s in servers if s not in known]
        extra: dict[str, Any] = {}
        adapter: list[tuple[str, torch.Tensor]] = []
        if self.lora is not None:
            extra = dict(adapters=True, lora_scale=self.lora.scale)
            for w, (a, b) in self.lora.factors().items():  # copies: training goes on meanwhile
                adapter += [(f"{w}#lora_A", a.clone()), (f"{w}#lora_B", b.clone())]
        delta: list[tuple[str, torch.Tensor]] = []
        if self.mode == "delta":
            delta = self._commit_delta(state, encode=bool(known))
            state = dict(self.ref or {})  # full frames from the private copy, as above
        out = []
        local = [s for s in fresh if s in self.local]
        remote = [s for s in fresh if s not in self.local]
        if fresh:
            frames = list(state.items()) + adapter
            tensors = [t for _, t in frames]
        for group, transport in ((local, self.shm), (remote, self.frames)):
            if not group or transport is None:
                continue
            # full mode: frames go out zero-copy on the hub's thread while training goes on,
            # and the next optimizer step writes the parameters in place, so each transport
            # sends from a snapshot. delta: frames come from the private copy, whose tensors
            # are replaced, never written; lora: the base is frozen and the factors are copies
            full = WeightManifest(version=version, tensors=metas(frames), kind="full", **extra)
            out.append((group, *transport.send(version, group, full, tensors)))
        if known:
            frames = delta + adapter
            out.append(
                (
                    known,
                    WeightManifest(
                        version=version,
                        tensors=metas(frames),
                        kind="delta",
                        base_version=self.ref_version,
                        **extra,
                    ),
                    [t for _, t in frames],
                )
            )
        self.last = {
            m.kind: sum(nbytes(t) for t in (tensors if m.shm_path else fr)) for _, m, fr in out
        }
        if self.mode != "full":
            self.ref_version = version
            if self.ref is None:
                self.ref = {}
        for s in servers:
            self.sent[s] = version
        return out

    def _commit_delta(
        self, state: dict[str, torch.Tensor], encode: bool
    ) -> list[tuple[str, torch.Tensor]]:
        """Delta frames against the private copy (if ``encode``), then bring the copy up to
        ``state``. Changed tensors get a new copy rather than an in-place write, so a frame of
        the previous publish that is still queued keeps its bytes."""
        if not self.ref:
            self.ref = {n: t.clone() for n, t in state.items()}
            return []
        frames: list[tuple[str, torch.Tensor]] = []
        for n, t in state.items():
            old = self.ref[n]
            if encode:
                enc = encode_change(n, old, t)
                if enc:
                    self.ref[n] = t.clone()
                    frames += [(fn, self.ref[n] if fn == n else ft) for fn, ft in enc]
            elif not same_bits(old, t):
                self.ref[n] = t.clone()
        return frames
