"""Weight sync encodings: full, delta (only what changed, bit-exact) and LoRA adapters.

The learner publishes a ``WeightManifest`` whose ``kind`` says how to read its frames:

- ``full``: every tensor, raw. Replaces the engine's weights (and drops any adapter).
- ``delta``: only tensors whose bits changed since ``base_version``, each in the smallest of
  three exact encodings (``encode_change``): raw; sparse (int32 flat indices + new values, when
  few elements changed); xor (old bits XOR new bits, byte planes split and zlib-compressed: a
  small optimizer step leaves sign, exponent and high mantissa bits alone, so those planes
  compress to almost nothing). The engine must be at ``base_version`` or it refuses the update,
  and the learner falls back to a full sync.
- ``adapters=True`` (with either kind): LoRA factors travel as ``<weight>#lora_A`` /
  ``<weight>#lora_B`` frames and replace the engine's adapter set; the engine runs
  ``W + (B @ A) * lora_scale`` (``merge``, peft's own formula and operation order).

Frame names carry the encoding: ``name`` (raw), ``name#sparse_idx`` + ``name#sparse_val``,
``name#xor``, ``name#lora_A`` + ``name#lora_B``. Names are HF checkpoint names; vLLM maps them.

Engine side, ``EngineWeights`` (in the rollout server process) holds the weights the engine runs
as HF-named tensors: it decodes an update against them, works out which vLLM modules change
(vLLM reloads module by module and a partly loaded module is garbage, so q/k/v, gate/up and a
layer's experts always go together, ``module_key``) and keeps the previous values of those
modules, which the server reloads if the engine fails midway. Nothing here imports vLLM.

The files a full update travels in are ``climbrl.weights.files``.
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from climbrl.wire import TensorMeta, WeightManifest, WireError, tensor_from_frame

log = logging.getLogger("climbrl.weights.codecs")
_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# vLLM fuses these HF projections into one module (packed_modules_mapping of Llama/Qwen/Mistral)
_PACKED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}
_EXPERTS = re.compile(r"^(.*\.experts)\.\d+\.")


def module_key(name: str) -> str:
    """The vLLM module an HF tensor is loaded into (tensors with one key reload together)."""
    m = _EXPERTS.match(name)
    if m:  # FusedMoE: every expert of a layer lives in one module
        return m.group(1)
    mod = name.rsplit(".", 1)[0]
    parent, _, leaf = mod.rpartition(".")
    return f"{parent}.{_PACKED[leaf]}" if leaf in _PACKED else mod


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_OF[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode_change(
    name: str, old: torch.Tensor, new: torch.Tensor, compress: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """Frames that turn ``old`` into ``new`` bit for bit (``[]`` when nothing changed)."""
    assert old.shape == new.shape and old.dtype == new.dtype, name
    ob, nb = _bits(old), _bits(new)
    diff = (ob != nb).flatten()
    nnz = int(diff.sum())
    if nnz == 0:
        return []
    best: list[tuple[str, torch.Tensor]] = [(name, new.detach().contiguous())]
    size = nbytes(new)
    esize = new.element_size()
    if nnz * (4 + esize) < size:
        assert new.numel() < 2**31, f"{name}: too many elements for int32 indices"
        idx = diff.nonzero().squeeze(1).to(torch.int32)
        best = [
            (f"{name}#sparse_idx", idx),
            (f"{name}#sparse_val", new.detach().reshape(-1)[idx.long()].contiguous()),
        ]
        size = nnz * (4 + esize)
    if compress and nnz * 8 > new.numel():  # dense change: try the compressed xor
        z = _deflate_planes((ob ^ nb).reshape(-1), esize)
        if len(z) < size:
            best = [(f"{name}#xor", torch.frombuffer(bytearray(z), dtype=torch.uint8))]
            size = len(z)
    if compress and nnz * 8 <= new.numel():  # sparse change: compressed gaps and xor values
        # Index gaps are small (their high bytes are zero) and the xor of a small step touches
        # only low mantissa bits: split each into byte planes and deflate.
        idx = diff.nonzero().squeeze(1)
        gaps = torch.diff(idx, prepend=idx.new_zeros(1)).to(torch.int32)
        vals = (ob.flatten()[idx] ^ nb.flatten()[idx]).contiguous()
        gz, vz = _deflate_planes(gaps, 4), _deflate_planes(vals, esize)
        if len(gz) + len(vz) < size:
            best = [
                (f"{name}#gaps_z", torch.frombuffer(bytearray(gz), dtype=torch.uint8)),
                (f"{name}#xorvals_z", torch.frombuffer(bytearray(vz), dtype=torch.uint8)),
            ]
    return best


def _deflate_planes(t: torch.Tensor, esize: int) -> bytes:
    return zlib.compress(t.view(torch.uint8).view(-1, esize).t().contiguous().numpy().tobytes(), 1)


def _inflate_planes(name: str, z: torch.Tensor, esize: int) -> torch.Tensor:
    try:
        raw = zlib.decompress(z.numpy().tobytes())
    except zlib.error as e:
        raise WireError(f"delta for {name!r} is corrupt: {e}") from None
    if len(raw) % esize:
        raise WireError(f"delta for {name!r}: {len(raw)} bytes is not a whole number of values")
    planes = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(esize, -1)
    return planes.t().contiguous().view(_INT_OF[esize]).reshape(-1)


def merge(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """LoRA-merged weight, peft's ``get_delta_weight`` + merge: W + (B @ A) * scale."""
    return base + (b @ a) * scale


@dataclass
class Update:
    """A decoded update, not yet applied: ``load`` is what the engine reloads (whole modules);
    ``restore`` the values those names had before (None when the previous weights are not
    known, e.g. the first full sync of an engine whose base could not be read)."""

    version: int
    base: dict[str, torch.Tensor]
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    load: dict[str, torch.Tensor]
    restore: dict[str, torch.Tensor] | None
    wire_bytes: int = 0
    files: dict[str, str] = field(default_factory=dict)  # name -> the file its tensors view


@dataclass
class EngineWeights:
    """The weights an engine runs, HF-named: ``base`` plus LoRA ``adapters`` merged on top."""

    version: int
    base: dict[str, torch.Tensor] | None = None  # None: unknown, only a full sync applies
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scale: float = 0.0
    # name -> the weights file (``map_shm``) its base or adapter tensors view: such a file must
    # not be rewritten while these weights are the engine's (``files_in_use``, ``FrameLanding``)
    files: dict[str, str] = field(default_factory=dict)

    def files_in_use(self) -> set[str]:
        """The weights files that tensors of these weights view (mapped, not copied)."""
        return set(self.files.values()) if self.base is not None else set()

    def effective(self, name: str) -> torch.Tensor:
        assert self.base is not None
        w = self.base[name]
        if name in self.adapters:
            a, b = self.adapters[name]
            return merge(w, a, b, self.scale)
        return w

    def prepare(
        self, m: WeightManifest, frames: list[Any], tensors: list[torch.Tensor] | None = None
    ) -> Update:
        """Decode ``m`` against the current weights, from its frames or from ``tensors``
        already mapped (``map_shm``). Raises ``WireError`` for an update that cannot apply
        here (wrong base version, unknown tensor, bad sizes); changes nothing."""
        if tensors is None and len(frames) != len(m.tensors):
            raise WireError(f"manifest lists {len(m.tensors)} tensors, got {len(frames)}")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        wire = 0
        for i, meta in enumerate(m.tensors):
            t = tensors[i] if tensors is not None else tensor_from_frame(meta, frames[i])
            wire += nbytes(t)
            name, _, enc = meta.name.partition("#")
            parts.setdefault(name, {})[enc] = t
        if m.kind == "full":
            new_base: dict[str, torch.Tensor] = {}
            for name, p in parts.items():
                if "" in p:
                    new_base[name] = p[""]
                elif not set(p) <= {"lora_A", "lora_B"}:
                    raise WireError(f"full sync: tensor {name!r} is not raw ({sorted(p)})")
            missing = sorted(set(self.base or {}) - set(new_base))
            if missing and self.base is not None:
                raise WireError(f"full sync lacks {len(missing)} tensors, e.g. {missing[:3]}")
        elif m.kind == "delta":
            if self.base is None or m.base_version != self.version:
                raise WireError(
                    f"delta on top of version {m.base_version}, but this engine is at "
                    f"{self.version}{'' if self.base is not None else ' (weights unknown)'}: "
                    "it needs a full sync"
                )
            new_base = dict(self.base)
            for name, p in parts.items():
                if set(p) <= {"lora_A", "lora_B"}:
                    continue
                if name not in self.base:
                    raise WireError(f"delta names tensor {name!r}, which this engine lacks")
                new_base[name] = _decode(name, p, self.base[name])
        else:
            raise WireError(f"unknown weight sync kind {m.kind!r}")
        adapters = dict(self.adapters) if m.kind == "delta" and not m.adapters else {}
        scale = self.scale
        if m.adapters:
            scale = float(m.lora_scale)
            for name, p in parts.items():
                if "lora_A" in p or "lora_B" in p:
                    if "lora_A" not in p or "lora_B" not in p:
                        raise WireError(f"adapter for {name!r} lacks lora_A or lora_B")
                    a, b = p["lora_A"], p["lora_B"]
                    w = new_base.get(name)
                    if (
                        w is None
                        or a.shape[0] != b.shape[1]
                        or (b.shape[0], a.shape[1]) != tuple(w.shape)
                    ):
                        raise WireError(
                            f"adapter for {name!r}: A {list(a.shape)}, B "
                            f"{list(b.shape)} do not fit the weight"
                        )
                    adapters[name] = (a, b)
        # which names the engine must reload: changed effective values, expanded to modules
        if m.kind == "full" or self.base is None:
            touched = set(new_base)
        else:
            touched = {n for n in new_base if new_base[n] is not self.base[n]}
            touched |= {
                n
                for n in set(adapters) | set(self.adapters)
                if adapters.get(n) is not self.adapters.get(n)
            }
        keys = {module_key(n) for n in touched}
        names = [n for n in new_base if module_key(n) in keys]
        # which file each tensor views: this update's file for what it brings, the previous
        # one's for what a delta leaves in place (a decoded delta is a copy: counted anyway)
        src = m.shm_path if tensors is not None else ""
        files = {n: f for n, f in self.files.items() if n in new_base} if m.kind == "delta" else {}
        for name in parts:
            if src:
                files[name] = src
            else:
                files.pop(name, None)
        upd = Update(m.version, new_base, adapters, scale, {}, None, wire, files)
        upd.load = {n: _effective(new_base, adapters, scale, n) for n in names}
        if self.base is not None:
            upd.restore = {n: self.effective(n) for n in names if n in self.base}
        return upd

    def commit(self, u: Update) -> None:
        self.version, self.base, self.adapters, self.scale = u.version, u.base, u.adapters, u.scale
        self.files = u.files

    def load_initial(self, model_dir: str, dtype: str) -> None:
        """The engine's start-up weights, read from the model folder (for rollback of the
        first sync). Leaves ``base`` unknown if the folder holds no safetensors."""
        from safetensors.torch import load_file

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            return
        want = getattr(torch, dtype)
        base: dict[str, torch.Tensor] = {}
        for f in files:
            for k, v in load_file(str(f)).items():
                base[k] = v.to(want) if v.is_floating_point() else v
        self.base = base


def _effective(
    base: dict[str, torch.Tensor], adapters: dict[str, Any], scale: float, name: str
) -> torch.Tensor:
    if name in adapters:
        a, b = adapters[name]
        return merge(base[name], a, b, scale)
    return base[name]


def _decode(name: str, p: dict[str, torch.Tensor], old: torch.Tensor) -> torch.Tensor:
    if "" in p:
        new = p[""]
        if new.shape != old.shape or new.dtype != old.dtype:
            raise WireError(
                f"delta for {name!r}: {new.dtype} {list(new.shape)} does not match "
                f"the engine's {old.dtype} {list(old.shape)}"
            )
        return new
    if "sparse_idx" in p:
        idx, val = p["sparse_idx"].long(), p["sparse_val"]
        if (
            val.dtype != old.dtype
            or idx.numel() != val.numel()
            or (idx.numel() and int(idx.max()) >= old.numel())
        ):
            raise WireError(f"sparse delta for {name!r} does not fit the engine's tensor")
        out = old.detach().clone().reshape(-1)
        out[idx] = val
        return out.view(old.shape)
    if "gaps_z" in p and "xorvals_z" in p:
        es = old.element_size()
        gaps = _inflate_planes(name, p["gaps_z"], 4).long()
        x = _inflate_planes(name, p["xorvals_z"], es)
        idx = torch.cumsum(gaps, 0)
        if idx.numel() != x.numel() or (
            idx.numel()
            and (
                int(gaps[0]) < 0
                or int(idx[-1]) >= old.numel()
                or (gaps.numel() > 1 and int(gaps[1:].min()) < 1)
            )
        ):
            raise WireError(f"sparse delta for {name!r} does not fit the engine's tensor")
        out = _bits(old).clone().reshape(-1)
        out[idx] = out[idx] ^ x
        return out.view(old.dtype).view(old.shape)
    if "xor" in p:
        x = _inflate_planes(name, p["xor"], old.element_size())
        if x.numel() != old.numel():
            raise WireError(f"xor delta for {name!r}: {x.numel()} values, expected {old.numel()}")
        return (_bits(old) ^ x.view(old.shape)).view(old.dtype)
    raise WireError(f"delta for {name!r} has no known encoding ({sorted(p)})")


def metas(frames: list[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    from climbrl.wire import tensor_meta

    return [tensor_meta(n, t) for n, t in frames]


def checkpoint_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict under the names its checkpoint uses on disk.

    transformers 5 fuses MoE experts in memory (``experts.gate_up_proj`` [E, 2I, H],
    ``experts.down_proj`` [E, H, I]) but saves, and vLLM loads, one tensor per expert
    (``experts.{e}.gate_proj.weight``, ...). Dense models pass through unchanged."""
    out: dict[str, torch.Tensor] = {}
    for n, t in sd.items():
        if n.endswith(".experts.gate_up_proj") and t.dim() == 3:
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{n[: -len('gate_up_proj')]}{e}.gate_proj.weight"] = t[e, :half].contiguous()
                out[f"{n[: -len('gate_up_proj')]}{e}.up_proj.weight"] = t[e, half:].contiguous()
        elif n.endswith(".experts.down_proj") and t.dim() == 3:
            for e in range(t.shape[0]):
                out[f"{n[: -len('down_proj')]}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[n] = t
    return out
