"""learner/fsdp.py: FSDP2 (fully_shard) across 2 learner processes gives the single-process step.

The 2-process runs go through torchrun, the way ``learner_argv`` starts a multi-process
learner: gloo on CPU (default suite), NCCL on 2+ GPUs (``gpu`` marker). This module is also
the workers' entry point (``python -m torch.distributed.run ... -m tests.unit.test_fsdp OUT``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from climbrl.commands import learner_argv, torchrun_argv
from climbrl.config import LearnerCfg, load_config
from climbrl.learner.fsdp import (
    DistState,
    broadcast_groups,
    broadcast_step,
    clip_grad_norm,
    full_grads,
    full_state_dict,
    rank_microbatches,
    reduce_stats,
    shard_model,
)

ROOT = Path(__file__).resolve().parents[2]
VOCAB, MICRO = 97, 2


def _cfg(world: int) -> SimpleNamespace:
    return SimpleNamespace(learner=LearnerCfg(fsdp=True, world_size=world))


def _model(device: str = "cpu") -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg).float().to(device)


def _batch(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (5, 12), generator=g)  # 5 samples: 3 micro-batches of 2
    mask = torch.zeros_like(ids, dtype=torch.float32)
    for i, n in enumerate(torch.randint(2, 8, (5,), generator=g).tolist()):
        mask[i, 4 : 4 + n] = 1.0  # prompt of 4 tokens, completions of 2..7
    return ids.to(device), mask.to(device)


def _trajectory():
    from climbrl.wire import Sample, Trajectory

    s = Sample(
        prompt_ids=[1, 2],
        completion_ids=[3, 4],
        completion_mask=[1, 1],
        logprobs=[-0.5, -1.25],
        versions=[3, 3],
        reward=0.75,
        finish_reason="stop",
        text="ab",
        metrics={"m": 1.0},
        task_id="train/abcd",
    )
    return Trajectory(
        order_id="train-1-abc",
        server_id="r1",
        policy_version=3,
        samples=[s],
        sent_at=1.0,
        gen_seconds=0.5,
        num_generated_tokens=2,
    )


def _step(model: torch.nn.Module, ds: DistState, device: str):
    """One learner-shaped step: batch-normalised micro-batch losses, summed grads, clip, AdamW."""
    ids, mask = _batch(device)
    total = mask[:, 1:].sum()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    acc = {"loss": 0.0, "rank_max": 0.0}
    chunks = [(i, min(MICRO, len(ids) - i)) for i in range(0, len(ids), MICRO)]
    for start, size, scale in rank_microbatches(chunks, ds):
        x, m = ids[start : start + size], mask[start : start + size]
        logits = model(input_ids=x).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        loss = -(logp * m[:, 1:]).sum() / total
        (loss * scale).backward()
        if scale:  # padding passes only keep the collectives in step
            acc["loss"] += float(loss.detach())
            acc["rank_max"] = max(acc["rank_max"], float(ds.rank))
    acc = reduce_stats(acc, ds)
    grads = full_grads(model, ds)
    gnorm = clip_grad_norm(model.parameters(), 0.5)  # below the norm: clipping acts
    opt.step()
    return acc, gnorm, grads, full_state_dict(model, ds)


def _worker(out: Path) -> int:
    """One torchrun rank: shard, step, write what rank 0 sees."""
    from safetensors.torch import save_file

    from climbrl.learner.fsdp import cleanup, setup

    world = int(os.environ["WORLD_SIZE"])
    ds = setup(_cfg(world))
    device = ds.device.type
    model = shard_model(_model(device), _cfg(world), ds)
    got = broadcast_groups([_trajectory()] if ds.rank == 0 else None, ds)
    cmd, none = broadcast_step("checkpoint" if ds.rank == 0 else None, None, ds)
    got = got if (cmd, none) == ("checkpoint", []) else None
    acc, gnorm, grads, state = _step(model, ds, device)
    res = {
        "rank": ds.rank,
        "world": ds.world_size,
        "broadcast_ok": got == [_trajectory()],
        "sharded": type(next(model.parameters())).__name__,
        "blocks": getattr(model, "_climbrl_fsdp_blocks", 0),
        "acc": acc,
        "gnorm": gnorm,
    }
    (out / f"rank{ds.rank}.json").write_text(json.dumps(res))
    if ds.rank == 0:
        save_file({k: v.contiguous() for k, v in grads.items()}, str(out / "grads.safetensors"))
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items() if k != "lm_head.weight"},
            str(out / "state.safetensors"),
        )
    cleanup(ds)
    return 0


def _run_sharded(tmp_path: Path, nproc: int) -> dict:
    from safetensors.torch import load_file

    argv = torchrun_argv(nproc, ["-m", "tests.unit.test_fsdp", str(tmp_path)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(nproc)]
    return {
        "ranks": ranks,
        "grads": load_file(str(tmp_path / "grads.safetensors")),
        "state": load_file(str(tmp_path / "state.safetensors")),
    }


def _check_against_single_process(sharded: dict, device: str, nproc: int) -> None:
    ref_acc, ref_gnorm, ref_grads, ref_state = _step(_model(device), DistState(), device)
    for r in sharded["ranks"]:
        assert r["world"] == nproc and r["broadcast_ok"]
        assert r["sharded"] == "DTensor" and r["blocks"] == 2  # both decoder layers wrapped
        # the reduced stats and the global grad norm are the same on every rank
        assert r["acc"]["loss"] == pytest.approx(ref_acc["loss"], rel=1e-5)
        assert r["acc"]["rank_max"] == nproc - 1
        assert r["gnorm"] == pytest.approx(ref_gnorm, rel=1e-5)
    assert ref_gnorm > 0.5  # so the clip changed the update
    assert set(sharded["grads"]) == set(ref_grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(sharded["grads"][k], g.cpu(), rtol=1e-4, atol=1e-6)
    ref_state = {k: v for k, v in ref_state.items() if k != "lm_head.weight"}
    assert set(sharded["state"]) == set(ref_state)
    init = _model("cpu").state_dict()
    moved = 0
    for k, v in ref_state.items():
        torch.testing.assert_close(sharded["state"][k], v.cpu(), rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(v.cpu(), init[k]))
    assert moved == len(ref_state)  # the step changed every tensor, on both sides


def test_rank_microbatches_cover_the_batch_once():
    for n, micro, world in [(5, 2, 2), (8, 2, 2), (7, 3, 3), (2, 4, 2), (0, 2, 2), (6, 1, 4)]:
        chunks = [(i, min(micro, n - i)) for i in range(0, n, micro)]
        per = [rank_microbatches(chunks, DistState(rank=r, world_size=world)) for r in range(world)]
        real = sorted((s, k) for p in per for s, k, scale in p if scale == world)
        assert real == chunks  # every chunk once, at the FSDP scale
        assert len({len(p) for p in per}) == 1  # same number of passes on every rank
        assert all((s, k) == chunks[0] for p in per for s, k, scale in p if scale == 0.0)


def test_learner_argv_uses_torchrun_only_for_several_processes(tmp_path):
    base = [sys.executable, "-m", "climbrl.cli", "learn", "--config", "c.toml"]
    one = SimpleNamespace(learner=LearnerCfg())
    assert learner_argv(one, base) == base
    argv = learner_argv(_cfg(4), base)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert argv[argv.index("--nproc-per-node") + 1] == "4"
    assert argv[-5:] == base[1:]  # -m climbrl.cli learn --config c.toml, per rank


def test_config_fields_validate(tmp_path):
    cfg = load_config(None, ["model.path=m", "learner.fsdp=true", "learner.world_size=2"])
    assert cfg.learner.fsdp and cfg.learner.world_size == 2
    with pytest.raises(ValueError, match="learner.fsdp"):
        load_config(None, ["model.path=m", "learner.world_size=2"])
    with pytest.raises(ValueError, match="lora"):
        load_config(None, ["model.path=m", "learner.fsdp=true", "learner.weights.mode=lora"])
    with pytest.raises(ValueError, match="ppo"):
        load_config(None, ["model.path=m", "learner.fsdp=true", "learner.algo.name=ppo"])
    with pytest.raises(ValueError, match="ray.learner_gpus"):
        load_config(
            None,
            ["model.path=m", "learner.fsdp=true", "learner.world_size=2", "ray.learner_gpus=1"],
        )


def test_single_process_is_untouched():
    m = _model()
    assert shard_model(m, _cfg(1), DistState()) is m
    assert type(next(m.parameters())).__name__ == "Parameter"
    assert broadcast_groups([_trajectory()], DistState()) == [_trajectory()]
    assert reduce_stats({"a": 1.0}, DistState()) == {"a": 1.0}


def test_fsdp2_gloo_two_processes_match_one_process(tmp_path):
    """fully_shard on CPU (gloo), 2 ranks: loss, grads, grad norm and the updated weights
    equal the unsharded model's; the batch broadcast arrives intact."""
    _check_against_single_process(_run_sharded(tmp_path, 2), "cpu", 2)


@pytest.mark.gpu
def test_fsdp2_nccl_two_gpus_match_one_process(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    _check_against_single_process(_run_sharded(tmp_path, 2), "cuda", 2)


if __name__ == "__main__":
    raise SystemExit(_worker(Path(sys.argv[1])))
