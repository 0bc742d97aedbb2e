"""The thin vLLM worker extension (``climbrl.rollout.worker_ext.WeightReceiver``) with a fake
worker: ``rollout.cpu_fast_path = false`` keeps every reload on vLLM's own
``reload_weights``, and a full update of a model the fast path does not fit goes there too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from climbrl.rollout.worker_ext import WeightReceiver
from climbrl.weights.files import stage
from climbrl.weights.vllm_cpu import CpuFastPath


class _Runner:
    def __init__(self) -> None:
        self.model = torch.nn.Linear(3, 2)
        self.reloaded: list[tuple[str, torch.Tensor]] = []

    def get_model(self) -> torch.nn.Module:
        return self.model

    def reload_weights(self, weights_iterator: Any) -> None:
        self.reloaded = [(n, t.clone()) for n, t in weights_iterator]


class _Worker(WeightReceiver):
    def __init__(self) -> None:
        self.model_runner = _Runner()


def _file(tmp_path: Path) -> tuple[str, list[Any], dict[str, torch.Tensor]]:
    tensors = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    path = tmp_path / "staged.weights"
    layout = stage(path, tensors)
    return str(path), [list(x) for x in layout], tensors


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the CPU fast path is off")


def test_without_the_fast_path_every_reload_is_vllms(tmp_path, monkeypatch):
    for name in ("supports_full", "full_reload", "repack_moe_on_reload"):
        monkeypatch.setattr(CpuFastPath, name, _refuse)
    w = _Worker()
    path, layout, tensors = _file(tmp_path)
    took, how = w.climbrl_load_weights(path, layout, True, True, False)
    assert how == "vllm" and took >= 0
    assert [n for n, _ in w.model_runner.reloaded] == list(tensors)
    for n, t in w.model_runner.reloaded:
        assert torch.equal(t, tensors[n])


def test_a_model_the_fast_path_does_not_fit_goes_to_vllms_reload(tmp_path, monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(CpuFastPath, "supports_full", lambda self, model: False)
    monkeypatch.setattr(CpuFastPath, "repack_moe_on_reload", lambda self, m: seen.append("moe"))
    w = _Worker()
    path, layout, _ = _file(tmp_path)
    assert w.climbrl_load_weights(path, layout, True)[1] == "vllm"
    assert seen == ["moe"]  # on by default: MoE experts are prepacked again on reload


def test_a_layout_past_the_end_of_the_file_is_an_error(tmp_path):
    w = _Worker()
    path, layout, _ = _file(tmp_path)
    layout[-1][3] += 1 << 20
    with pytest.raises(ValueError, match="the layout needs"):
        w.climbrl_load_weights(path, layout, False, False, False)
