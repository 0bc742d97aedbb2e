"""The trainable weights of the last published version, kept to measure the engine/learner
log-prob mismatch on samples that version generated.

In an asynchronous run most samples reach the learner one version late (lag 1): the engine
sampled them with the weights the learner held before its last step. The step's own forward
runs the newer weights, so the difference between its log-probs and the engine's mixes the
policy's movement with any real train/inference mismatch. ``WeightSnapshot`` keeps a copy of
the weights of each published version; ``swapped_in`` runs a forward under that copy, so the
comparison is at equal weights for those samples too, every step.

Only parameters that train are copied (a LoRA run copies its adapters); frozen ones are the
same in every version. The swap exchanges ``Parameter.data`` and swaps back, so the live
weights, their gradients and the optimizer state are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightSnapshot:
    def __init__(self) -> None:
        self.version: int | None = None
        self._saved: list[torch.Tensor] = []

    def take(self, params: list[nn.Parameter], version: int) -> None:
        """Copy ``params`` (the trainable ones, in a fixed order) as the weights of ``version``;
        the buffers of the last copy are reused."""
        with torch.no_grad():
            if len(self._saved) != len(params) or any(
                s.shape != p.shape or s.dtype != p.dtype for s, p in zip(self._saved, params)
            ):
                self._saved = [p.detach().clone() for p in params]
            else:
                for s, p in zip(self._saved, params):
                    s.copy_(p.detach())
        self.version = version

    @contextlib.contextmanager
    def swapped_in(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Run the block with ``params`` holding the snapshot's values."""
        if self.version is None:
            raise RuntimeError("no snapshot taken")
        live = [p.data for p in params]
        try:
            for p, s in zip(params, self._saved):
                p.data = s
            yield
        finally:
            for p, d in zip(params, live):
                p.data = d
