"""Where the learner trains and in what precision: ``learner.device`` and ``learner.autocast``.

    prec = learner_precision(cfg)              # FSDP: learner_precision(cfg, ds.device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=prec.param_dtype).to(prec.device)
    with prec.autocast():                      # the policy's (and the reference's) forward
        out = completion_logprobs(model, ...)  # its LM head runs under lm_head_scope
    loss.backward()                            # gradients land in the float32 master weights

``resolve_device``: ``auto`` takes the first visible CUDA device when there is one (the
launchers set ``CUDA_VISIBLE_DEVICES`` to the learner's GPUs, ``climbrl/placement.py``), else
the CPU; ``cuda`` without one is a ValueError that names the field.

``resolve_autocast``: with bf16 autocast the model is loaded in float32 (the master weights:
AdamW's state and the gradients stay float32), and the matmuls of the forward run in
bfloat16. ``auto`` turns it on on CUDA for bfloat16/float16 models only: on the CPU bf16 is
several times slower than float32, and a float32 model's engine samples in float32, so the
learner computes as the engine does. The LM head stays float32 (``learner.fp32_lm_head``,
like the engine's ``head_dtype`` override): autocast would run its matmul in bfloat16 whatever
the dtype of its inputs, so ``lm_head_scope`` switches autocast off around it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from climbrl.config import Config, LearnerCfg


def cuda_present() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def resolve_device(learner_cfg: LearnerCfg) -> torch.device:
    """The device of a single-process learner, per ``learner.device``."""
    want = learner_cfg.device
    if want == "cpu":
        return torch.device("cpu")
    if cuda_present():
        return torch.device("cuda", 0)
    if want == "cuda":
        raise ValueError(
            "learner.device = 'cuda' but torch sees no CUDA device (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): install a CUDA build of "
            "torch and check the GPUs (nvidia-smi), or set learner.device = 'auto' or 'cpu'"
        )
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def resolve_autocast(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the learner's forward on ``device`` (None: no autocast)."""
    mode = cfg.learner.autocast
    if mode == "off":
        return None
    if mode == "bf16":
        if not bf16_supported(device):
            raise ValueError(
                f"learner.autocast = 'bf16' but {device} has no bfloat16 support: set "
                "learner.autocast = 'off' (or 'auto')"
            )
        return torch.bfloat16
    if device.type != "cuda" or cfg.model.dtype == "float32" or not bf16_supported(device):
        return None
    return torch.bfloat16


@dataclass(frozen=True)
class Precision:
    """The learner's device and precision, resolved once from the config."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: the forward runs in param_dtype
    param_dtype: torch.dtype  # the dtype to load the model in (float32 under autocast)
    fp32_lm_head: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """Wraps the forward passes (not ``backward`` nor the optimizer step)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def lm_head(self) -> contextlib.AbstractContextManager:
        return lm_head_scope(self.device.type, self.fp32_lm_head)


def learner_precision(cfg: Config, device: torch.device | None = None) -> Precision:
    """``device``: the FSDP rank's device (``fsdp.DistState.device``); None resolves
    ``learner.device``."""
    dev = resolve_device(cfg.learner) if device is None else device
    ac = resolve_autocast(cfg, dev)
    param = torch.float32 if ac is not None else getattr(torch, cfg.model.dtype)
    return Precision(dev, ac, param, cfg.learner.fp32_lm_head)


def lm_head_scope(device_type: str, fp32_head: bool = True) -> contextlib.AbstractContextManager:
    """Autocast off for the LM head's matmul and log-softmax when ``fp32_head`` and autocast is
    on for ``device_type``: the head then runs in the dtype of its (float32) inputs. A no-op
    otherwise; ``fp32_head = False`` leaves the head's matmul to autocast's dtype."""
    if fp32_head and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
