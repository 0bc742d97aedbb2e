"""The real learner under FSDP2 (``learner.fsdp``, ``learner.world_size = 2``) takes the same
steps as the single-process learner, and its checkpoints are interchangeable with one's.

What runs is the learner's own code: ``Learner.from_config(cfg, ds=...)`` (model load,
``shard_model``, the sharded optimizer, the reference model for the KL term),
``Learner.train_step`` on rank 0 and ``follower(...).follow()`` on rank 1 (the loop ``climbrl learn`` runs there), ``Learner.checkpoint``
and ``Learner.shutdown``, started by torchrun the way ``climbrl.commands.learner_argv`` starts it.
The edge we fake is the rollout side: fixed trajectories (3 groups x 4 samples per step, so
micro-batches of 5 split 2:1 over the ranks and rank 1 runs a padding pass) are handed to
``train_step`` instead of arriving over ZeroMQ.

Checked against one process on the same trajectories: step statistics (loss, grad norm,
entropy, KL to the reference, mismatch), the weights and the AdamW state after each of two
steps; an FSDP checkpoint resumed by one process, and a single-process checkpoint resumed
under FSDP, each take the same second step. gloo on CPU by default; NCCL on 2 GPUs (``gpu``).

This module is also the ranks' entry point: ``torchrun ... -m tests.integration.test_fsdp_learner
SPEC.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch

from climbrl.config import load_config
from climbrl.wire import Sample, Trajectory

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHIFT = 0.05  # the fake engine's log-probs: the initial model's minus this
STATS = (
    "loss",
    "grad_norm",
    "entropy",
    "kl_ref",
    "mismatch_mean",
    "mismatch_max",
    "mismatch_kl",
    "clip_frac",
    "reward",
)


def _overrides(model: str, out: str, world: int) -> list[str]:
    fsdp = [f"learner.fsdp={'true' if world > 1 else 'false'}", f"learner.world_size={world}"]
    return [
        f'model.path="{model}"',
        f'run.output_dir="{out}"',
        "learner.micro_batch_size=5",
        "learner.group_size=4",
        "learner.batch_groups=3",
        "learner.optim.lr=1e-3",
        "learner.optim.grad_clip=0.5",
        "learner.algo.kl_coef=0.05",
        'learner.algo.kl_estimator="k3"',
        "rollout.max_tokens=6",
        'wire.host="127.0.0.1"',
        *fsdp,
    ]


def _groups(model_dir: Path, step: int) -> list[Trajectory]:
    """3 groups x 4 samples of different lengths; log-probs from the initial model - SHIFT."""
    from transformers import AutoModelForCausalLM

    from climbrl.learner.logprobs import completion_logprobs

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for k in range(3):
        samples = []
        for j in range(4):
            n = int(torch.randint(2, 7, (1,), generator=g))
            s = Sample(
                prompt_ids=torch.randint(5, 300, (4,), generator=g).tolist(),
                completion_ids=torch.randint(5, 300, (n,), generator=g).tolist(),
                completion_mask=[1] * n,
                logprobs=[0.0] * n,
                versions=[step] * n,
                reward=float((k + j + step) % 2),
                finish_reason="stop",
            )
            with torch.no_grad():
                lp = completion_logprobs(model, [s], temperature=1.0)["logp"][0, :n]
            s.logprobs = (lp - SHIFT).tolist()
            samples.append(s)
        out.append(
            Trajectory(
                order_id=f"train-s{step}-{k}",
                server_id="r0",
                policy_version=step,
                samples=samples,
                gen_seconds=0.0,
                num_generated_tokens=0,
            )
        )
    return out


def _drive(
    cfg, ds, resume: bool, steps: list[list[Trajectory]], checkpoint_each: bool
) -> list[dict]:
    """Rank 0: the learner's loop body on given trajectories; other ranks: ``follow()``."""
    from climbrl.learner.learner import Learner, follower

    if not ds.is_coordinator:
        follower(cfg, resume, ds).follow()
        return []
    L = Learner.from_config(cfg, resume=resume, ds=ds)
    out = [
        {
            "param_type": type(next(L.trainer.model.parameters())).__name__,
            "blocks": getattr(L.trainer.model, "_climbrl_fsdp_blocks", 0),
            "ref_blocks": getattr(L.trainer.ref, "_climbrl_fsdp_blocks", 0),
            "world": ds.world_size,
        }
    ]
    try:
        for groups in steps:
            for tr in groups:  # as collect() would have: each group's cursor sequence
                L.batcher.seq_of[tr.order_id], _ = L.cursor.take()
            st = L.train_step(groups)
            L.version += 1
            L.step += 1
            out.append({k: st.get(k) for k in (*STATS, "trained_seqs")})
            if checkpoint_each:
                L.checkpoint()
    finally:
        L.shutdown()
    return out


def _worker(spec_path: Path) -> int:
    """One torchrun rank: every phase of the spec, in order, then the stats from rank 0."""
    from climbrl.learner import fsdp

    spec = json.loads(spec_path.read_text())
    steps = msgspec.msgpack.decode(Path(spec["groups"]).read_bytes(), type=list[list[Trajectory]])
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for name, ph in spec["phases"].items():
        cfg = load_config(None, _overrides(spec["model"], ph["out"], world))
        ds = fsdp.setup(cfg)
        if name != list(spec["phases"])[-1]:
            # Learner.shutdown ends the process group after its stop; keep it for the next phase
            cleanup, fsdp.cleanup = fsdp.cleanup, lambda ds: None
        try:
            results[name] = _drive(
                cfg, ds, ph["resume"], [steps[i] for i in ph["steps"]], checkpoint_each=True
            )
        finally:
            if name != list(spec["phases"])[-1]:
                fsdp.cleanup = cleanup
        results[name + "_device"] = str(ds.device)
    if int(os.environ["RANK"]) == 0:
        Path(spec["result"]).write_text(json.dumps(results))
    return 0


def _single(
    model: Path,
    out: Path,
    steps: list[list[Trajectory]],
    resume: bool = False,
    copy_after_first: Path | None = None,
) -> list[dict]:
    """The single-process learner in this process (what ``climbrl learn`` runs)."""
    from climbrl.learner import fsdp
    from climbrl.learner.learner import Learner

    cfg = load_config(None, _overrides(str(model), str(out), 1))
    ds = fsdp.setup(cfg)
    assert not ds.distributed
    L = Learner.from_config(cfg, resume=resume, ds=ds)
    assert type(next(L.trainer.model.parameters())).__name__ == "Parameter"  # not sharded
    res = []
    try:
        for n, groups in enumerate(steps):
            for tr in groups:
                L.batcher.seq_of[tr.order_id], _ = L.cursor.take()
            st = L.train_step(groups)
            L.version += 1
            L.step += 1
            res.append({k: st.get(k) for k in (*STATS, "trained_seqs")})
            L.checkpoint()
            if n == 0 and copy_after_first is not None:
                shutil.copytree(out, copy_after_first)
    finally:
        L.shutdown()
    return res


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _same_stats(got: dict, want: dict, rel: float) -> None:
    for k in STATS:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-7), (k, got[k], want[k])
    assert got["trained_seqs"] == want["trained_seqs"]


def _same_checkpoint(got: Path, want: Path, atol: float) -> None:
    a, b = _weights(got), _weights(want)
    assert set(a) == set(b)  # same tensors (a tied LM head written once, both ways)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)
    oa = torch.load(got / "optimizer.pt", weights_only=True)
    ob = torch.load(want / "optimizer.pt", weights_only=True)
    assert oa["param_groups"] == ob["param_groups"]
    assert set(oa["state"]) == set(ob["state"])  # keyed by parameter index, as one process
    for i, st in ob["state"].items():
        assert set(oa["state"][i]) == set(st)
        for k, v in st.items():
            torch.testing.assert_close(
                oa["state"][i][k], v, rtol=1e-3, atol=atol * 1e-2, msg=f"{i}.{k}"
            )
    assert json.loads((got / "learner_state.json").read_text()) == json.loads(
        (want / "learner_state.json").read_text()
    )
    assert json.loads((got / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def _check(tiny_model: Path, tmp_path: Path, nproc: int, rel: float, atol: float) -> None:
    steps = [_groups(tiny_model, 0), _groups(tiny_model, 1)]
    gfile = tmp_path / "groups.msgpack"
    gfile.write_bytes(msgspec.msgpack.encode(steps))
    # one process: two steps, a checkpoint after each; a copy of the run after the first
    ref = _single(tiny_model, tmp_path / "single", steps, copy_after_first=tmp_path / "from_single")
    after1 = _weights(tmp_path / "single" / "checkpoints" / "step_1")

    # FSDP: the same two steps; then a resume from the single-process step 1
    spec = {
        "model": str(tiny_model),
        "groups": str(gfile),
        "result": str(tmp_path / "res.json"),
        "phases": {
            "fresh": {"out": str(tmp_path / "fsdp"), "resume": False, "steps": [0, 1]},
            "resumed": {"out": str(tmp_path / "from_single"), "resume": True, "steps": [1]},
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    from climbrl.commands import learner_argv

    cfg = load_config(None, _overrides(str(tiny_model), str(tmp_path / "fsdp"), nproc))
    argv = learner_argv(
        cfg,
        [sys.executable, "-m", "tests.integration.test_fsdp_learner", str(tmp_path / "spec.json")],
    )
    assert "torch.distributed.run" in argv
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    res = json.loads((tmp_path / "res.json").read_text())

    (info, *fresh), (_, *resumed) = res["fresh"], res["resumed"]
    # sharded: both decoder layers of the policy and of the reference are FSDP units
    assert info == {"param_type": "DTensor", "blocks": 2, "ref_blocks": 2, "world": nproc}
    assert res["fresh_device"].startswith("cuda" if rel > 1e-4 else "cpu")
    assert len(fresh) == 2 and len(resumed) == 1
    for got, want in zip(fresh, ref):
        _same_stats(got, want, rel)
    _same_stats(resumed[0], ref[1], rel)
    assert ref[0]["kl_ref"] == pytest.approx(0.0, abs=1e-9) and ref[1]["kl_ref"] > 0
    s, f = tmp_path / "single" / "checkpoints", tmp_path / "fsdp" / "checkpoints"
    for step in (1, 2):
        _same_checkpoint(f / f"step_{step}", s / f"step_{step}", atol)
    _same_checkpoint(tmp_path / "from_single" / "checkpoints" / "step_2", s / "step_2", atol)
    moved = [k for k, v in _weights(s / "step_2").items() if not torch.equal(v, after1[k])]
    assert len(moved) == len(after1)  # the second step changed every tensor

    # one process resumes from the FSDP checkpoint of step 1 and takes the same step 2
    to_single = tmp_path / "to_single" / "checkpoints"
    to_single.mkdir(parents=True)
    shutil.copytree(f / "step_1", to_single / "step_1")
    (to_single / "latest").write_text("step_1")
    again = _single(tiny_model, tmp_path / "to_single", steps[1:], resume=True)
    _same_stats(again[0], ref[1], rel)
    _same_checkpoint(to_single / "step_2", s / "step_2", atol)


def test_fsdp_learner_gloo_two_ranks_matches_one_process(tiny_model, tmp_path):
    """gloo, 2 CPU ranks: the real learner's steps, checkpoints and resumes match one process."""
    _check(tiny_model, tmp_path, 2, rel=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_fsdp_learner_nccl_two_gpus_matches_one_process(tiny_model, tmp_path):
    """NCCL, 2 GPUs (the single-process reference runs on the CPU, as the learner does)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    _check(tiny_model, tmp_path, 2, rel=1e-3, atol=1e-5)


@pytest.mark.slow
def test_climbrl_run_with_a_two_rank_fsdp_learner(tiny_model, tmp_path):
    """``climbrl run`` end to end (real vLLM rollout server, ZeroMQ) with learner.fsdp and
    world_size = 2: torchrun starts the learner, rank 0 serves the rollout server, every rank
    trains, weights reach the engine; then ``--resume`` goes on in one process from its
    checkpoint."""
    from tests.conftest import kill_tree, write_config

    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.toml",
        tiny_model,
        out,
        learner={
            "total_steps": 2,
            "batch_groups": 3,
            "group_size": 4,
            "max_staleness": 0,
            "micro_batch_size": 5,
            "eval_size": 4,
            "checkpoint_every": 1,
            "fsdp": True,
            "world_size": 2,
        },
        rollout={"max_model_len": 64, "max_tokens": 4, "kv_cache_gb": 0.5},
    )
    log = tmp_path / "launcher.log"

    def run(*extra: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "climbrl.cli", "run", str(cfg), "--no-live", *extra],
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "CLIMBRL_LOG": "INFO"},
        )
        try:
            rc = proc.wait(timeout=900)
        finally:
            kill_tree(proc)
        llog = (out / "logs" / "learner.log").read_text()
        assert rc == 0, log.read_text()[-3000:] + llog[-6000:]
        return llog

    llog = run()
    assert "rank 1/2 (FSDP, cpu) follows rank 0" in llog
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["grad_norm"] > 0 and r["loss"] == r["loss"]
        assert r["mismatch_mean"] < 1e-4  # the engine runs the weights rank 0 published
        assert r["staleness_max"] <= 0
    assert any(r.get("weight_sync_s") for r in steps)
    assert any("eval/test_accuracy" in r for r in recs)
    ckpt = out / "checkpoints" / "step_2"
    assert json.loads((ckpt / "learner_state.json").read_text())["step"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(ckpt))

    # the same run goes on in one process from the FSDP checkpoint
    llog = run(
        "--resume",
        "--set",
        "learner.fsdp=false",
        "--set",
        "learner.world_size=1",
        "--set",
        "learner.total_steps=3",
    )
    assert "resumed from" in llog and "step_2 at step 2" in llog
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[2]["trained_seqs"] == [6, 7, 8]  # nothing trained twice, nothing skipped
    assert steps[2]["mismatch_mean"] < 1e-4  # the engine got the checkpoint's weights


if __name__ == "__main__":
    raise SystemExit(_worker(Path(sys.argv[1])))
