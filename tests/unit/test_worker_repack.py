"""The worker's CPU fast path (``climbrl.weights.vllm_cpu.CpuFastPath``): packing left to a
helper thread (``repack_later``, finished by ``settle``), and the model's loader calls recorded
for the next reload of the same layout (``load_recorded``). Fake layers stand in for vLLM's:
their "packing", like vLLM's CPU GEMM dispatch, computes from its own copy of the weight and
leaves the layer's weight empty."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from climbrl.weights import vllm_cpu
from climbrl.weights.vllm_cpu import CpuFastPath

F = torch.nn.functional


class _Method:
    def __init__(self, started=None, wait=None, done=None, fail=False):
        self.started, self.wait, self.done, self.fail = started, wait, done, fail
        self.by = None

    def process_weights_after_loading(self, m):
        if self.started is not None:
            self.started.set()
        if self.wait is not None:
            assert self.wait.wait(10)
        if self.fail:
            raise RuntimeError("no kernel for this layer")
        packed = m.weight.detach().clone()
        self.by = threading.current_thread().name
        m.cpu_linear = lambda x, weight, bias, p=packed: F.linear(x, p, bias)
        m.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        if self.done is not None:
            self.done.set()


class _Layer(torch.nn.Module):
    def __init__(self, method):
        super().__init__()
        self.quant_method = method
        self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.cpu_linear = None

    def forward(self, x):
        return self.cpu_linear(x, self.weight, None)


@pytest.fixture
def fast():
    return CpuFastPath()


@pytest.fixture
def helper(fast, monkeypatch):
    pool = ThreadPoolExecutor(1, thread_name_prefix="helper")
    monkeypatch.setattr(fast, "helper", lambda idle=False: pool)
    yield pool
    fast.settle()
    pool.shutdown()


def test_deferred_layers_compute_on_new_weights_and_are_packed_by_whoever_gets_there(fast, helper):
    started, gate = threading.Event(), threading.Event()
    # the helper takes the last layer first, and is held there until the worker thread has
    # packed the first one
    methods = [_Method(done=gate), _Method(), _Method(started=started, wait=gate)]
    layers = [_Layer(m) for m in methods]
    file = torch.randn(3, 4, 5)  # the weights file: three 4x5 weights
    want = file.clone()
    x = torch.randn(2, 5)
    assert fast.repack_later([(m, file[i]) for i, m in enumerate(layers)])
    assert fast.pending[1] is None  # the helper waits for the server's ack
    fast.start_repack()
    assert started.wait(10)
    # the layer the helper is packing computes on its file view meanwhile
    assert torch.equal(layers[2](x), F.linear(x, want[2]))
    assert methods[2].by is None
    # the others are packed by the worker the first time they compute
    assert torch.equal(layers[1](x), F.linear(x, want[1]))
    assert methods[1].by == "MainThread" and methods[0].by is None
    fast.settle()  # packs layer 0 here, which lets the helper finish layer 2
    assert fast.pending is None
    assert methods[0].by == "MainThread" and methods[2].by.startswith("helper")
    file.mul_(2)  # the learner rewrites its file: no layer reads it any more
    for i, m in enumerate(layers):
        assert torch.equal(m(x), F.linear(x, want[i]))
        assert m.weight.numel() == 0


def test_a_layer_that_fails_to_pack_in_the_background_keeps_its_weights(fast, helper, caplog):
    layers = [_Layer(_Method(fail=True)), _Layer(_Method())]
    file = torch.randn(2, 4, 5)
    want = file.clone()
    x = torch.randn(3, 5)
    with caplog.at_level(logging.ERROR, logger="climbrl.weights.vllm_cpu"):
        assert fast.repack_later([(m, file[i]) for i, m in enumerate(layers)])
        fast.start_repack()
        fast.settle()
    assert "packing a layer in the background failed" in caplog.text
    file.zero_()
    for i, m in enumerate(layers):
        assert torch.equal(m(x), F.linear(x, want[i]))


def test_the_helper_packs_nothing_until_started(fast, helper):
    """The server starts it after its ack; a next reload before that packs it all itself."""
    methods = [_Method(), _Method()]
    layers = [_Layer(m) for m in methods]
    file = torch.randn(2, 4, 5)
    assert fast.repack_later([(m, file[i]) for i, m in enumerate(layers)])
    helper.submit(lambda: None).result()  # the helper has had its turn
    assert [m.by for m in methods] == [None, None]
    fast.settle()
    assert [m.by for m in methods] == ["MainThread", "MainThread"]
    fast.start_repack()  # nothing left: a no-op
    assert fast.pending is None


def test_the_first_layer_used_starts_the_helper(fast, helper):
    started, gate = threading.Event(), threading.Event()
    methods = [_Method(done=gate), _Method(started=started, wait=gate)]
    layers = [_Layer(m) for m in methods]
    file = torch.randn(2, 4, 5)
    x = torch.randn(3, 5)
    assert fast.repack_later([(m, file[i]) for i, m in enumerate(layers)])
    assert torch.equal(layers[0](x), F.linear(x, file[0]))  # packs layer 0 here...
    assert started.wait(10)  # ...and the helper has taken layer 1 meanwhile
    fast.settle()
    assert methods[0].by == "MainThread" and methods[1].by.startswith("helper")


def test_a_layer_that_fails_to_pack_in_the_foreground_fails_the_reload(fast, monkeypatch):
    monkeypatch.setattr(fast, "helper", lambda idle=False: None)
    with pytest.raises(RuntimeError, match="no kernel"):
        fast.repack([(_Layer(_Method(fail=True)), torch.randn(4, 5))])


def test_no_helper_means_no_deferral(fast, monkeypatch):
    monkeypatch.setattr(fast, "helper", lambda idle=False: None)
    m = _Layer(_Method())
    assert not fast.repack_later([(m, torch.randn(4, 5))])
    assert m.cpu_linear is None and fast.pending is None


class _Model(torch.nn.Module):
    """``load_weights`` as vLLM models do it: each tensor goes to its parameter's
    ``weight_loader`` (vLLM's default one where it has none); ``skip`` is dropped like a tied
    lm_head; with ``copy`` it writes one parameter itself."""

    def __init__(self, copy=False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
        self.b = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
        self.b.weight_loader = self.half_loader
        self.copy = copy

    @staticmethod
    def half_loader(param, loaded):
        param.data.copy_(loaded / 2)

    def load_weights(self, weights):
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        loaded = set()
        for n, t in weights:
            if n == "skip":
                continue
            p = getattr(self, n)
            if self.copy and n == "a":
                p.data.copy_(t)
            else:
                getattr(p, "weight_loader", default_weight_loader)(p, t)
            loaded.add(n)
        return loaded


def test_recorded_loads_replay_what_load_weights_did():
    model = _Model()
    first = [
        ("a", torch.tensor([1.0, 2.0])),
        ("b", torch.tensor([2.0, 4.0, 6.0])),
        ("skip", torch.ones(1)),
    ]
    loaded, loads = vllm_cpu.load_recorded(model, first)
    assert loaded == {"a", "b"} and set(loads) == {"a", "b"}
    assert model.a.tolist() == [1.0, 2.0] and model.b.tolist() == [1.0, 2.0, 3.0]
    assert not hasattr(model.a, "weight_loader")  # the loaders are put back as they were
    assert model.b.weight_loader == _Model.half_loader
    for n, t in [("a", torch.tensor([5.0, 6.0])), ("b", torch.tensor([8.0, 8.0, 8.0]))]:
        for prm, loader in loads[n]:
            loader(prm, t)
    assert model.a.tolist() == [5.0, 6.0] and model.b.tolist() == [4.0, 4.0, 4.0]


def test_loads_that_bypass_the_loaders_are_not_recorded():
    model = _Model(copy=True)
    loaded, loads = vllm_cpu.load_recorded(
        model, [("a", torch.tensor([1.0, 2.0])), ("b", torch.zeros(3))]
    )
    assert loaded == {"a", "b"} and loads is None
    assert model.a.tolist() == [1.0, 2.0]
