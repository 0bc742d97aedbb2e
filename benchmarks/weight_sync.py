"""Weight sync: learner step end -> new weights generating in the engine, against the floor.

    python benchmarks/weight_sync.py [--sizes 5m,50m,500m --repeats 3]

For each model size (Qwen3, float32) it starts a real rollout server and publishes the
learner's state dict over ZeroMQ, timing from the publish call to the server's ack (weights
reloaded, prefix cache reset, version set, generation resumed with the new weights; on CPU,
with the same-host file, vLLM's oneDNN packing may still be under way then, each layer
computing ``F.linear`` on the file until it is packed: ``climbrl/weights/vllm_cpu.py``) and to the
first token of a new work order generated under the new version (``first_token_s``: an order
round trip, and the packing left to the first forward pass, on top). The floor is the time to
move the same bytes through a loopback ZeroMQ socket to another process, measured in the same
run, before the server starts and after it stops (the faster of the two), each send right
after the same ``settle()`` (a 2 s pause) and stand-in optimizer step as each timed sync.
Prints one JSON line and writes it under ``benchmarks/results/``; ``ratio`` = sync seconds /
floor seconds (goal <= 2) for the transport a run uses on one host (``learner.weights.transport =
"auto"``: the learner writes one file under /dev/shm that the engine reloads from, the time to
write it included), ``zmq_ratio`` for frames over the socket (what servers on other hosts get):
the ``WeightPublisher``'s snapshot of the step in a ring slot (``weights.files.ShmRing``) sent as
zero-copy frames, which the server lands in a file of its own (``weights.files.FrameLanding``) and
reloads from like the same-host file, packing in the background after the ack.
``zmq_staged_ratio`` is the frames path without those two (the baseline): the step cloned, the
frames decoded and copied into the server's staging file, and the engine's packing done before
the ack. The three are interleaved, update by update, into the same server, which runs under
``_LANDING_SHIM``: frames of odd versions land, those of even versions take the staged path.

``floor_back_to_back_s`` / ``ratio_back_to_back``: the floor timed with its sends back to back
instead (the minimum of a warm loop, no step in between). Work that follows an idle spell runs
slower on a small VM than work in a warm loop, so ``ratio`` times each sync and each floor send
alike: after a settle (the previous update's first token and background packing done) and then
a stand-in optimizer step. Both ratios are reported.

Then, on the same model and server, bytes and seconds per update for each
``learner.weights.mode`` mode (``modes``), each after its own first (full) sync, with a real
RL-sized step in between: AdamW (lr ``--lr``) on a real LM loss over the task corpus.

- ``full``: every tensor, every time.
- ``delta``: full finetuning, only what changed, bit-exact (climbrl.weights.codecs). AdamW moves
  every element every step, so skipping does nothing here: the gain is the compressed xor of the
  low mantissa bits. ``delta_bf16`` measures real steps on a bfloat16 copy of the model, at
  ``--lr`` and a tenth of it (encode and decode, bit-exact check, no engine), where most updates
  fall below one ulp: the delta is sparse, sent as deflated index gaps and xor values.
- ``lora``: peft adapters (r ``--lora-r``, every linear layer), base frozen: only A and B travel,
  merged on the server.

``repack_s`` / ``repack_ratio``: vLLM-CPU's own oneDNN packing of the same linear weights on one
thread, done in this process (``repack_seconds``), against the floor: work any weight update
into a vLLM CPU engine does, whatever the transport.

``delta_bytes_ratio`` / ``lora_bytes_ratio`` = bytes per update / full bytes (goal <= 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHM_DIR = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
SIZES = {  # hidden, layers, intermediate, heads, kv heads -> ~params (384-token vocab)
    "5m": (256, 6, 768, 4, 2),
    "50m": (640, 10, 1920, 8, 4),
    "500m": (1536, 18, 4608, 12, 4),
}

# Runs `climbrl rollout` with frames of odd versions landed (weights.files.FrameLanding) and those of
# even versions staged: the receiver's call to FrameLanding.land is added here unless it has one.
_LANDING_SHIM = r"""
import asyncio, sys
from climbrl.rollout import weight_receiver as wr
from climbrl.weights.files import FrameLanding

_land, _init, _receive = FrameLanding.land, wr.WeightUpdateReceiver.__init__, wr.WeightUpdateReceiver._receive

def land(self, m, frames, in_use):
    return _land(self, m, frames, in_use) if m.version % 2 else None

def __init__(self, *a, **kw):
    _init(self, *a, **kw)
    if getattr(self, "landing", None) is None:
        self._shim_landing = FrameLanding(self.shm_path.parent)

async def _landing_receive(self, u, frames):
    lander = getattr(self, "_shim_landing", None)
    if lander is not None and FrameLanding.takes(u.m):
        landed = await u.timed(
            "land", asyncio.to_thread(lander.land, u.m, frames, self.wstate.files_in_use())
        )
        if landed is not None:
            u.m, frames = landed, []
    await _receive(self, u, frames)

FrameLanding.land = land
wr.WeightUpdateReceiver.__init__ = __init__
wr.WeightUpdateReceiver._receive = _landing_receive
from climbrl.cli import main
sys.exit(main())
"""

_SINK = r"""
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.PULL); s.setsockopt(zmq.LINGER, 0)
port = s.bind_to_random_port("tcp://127.0.0.1"); print(port, flush=True)
ack = ctx.socket(zmq.PUSH); ack.connect(sys.argv[1])
while True:
    frames = s.recv_multipart(copy=False)
    if len(frames) == 1 and frames[0].bytes == b"stop":
        break
    ack.send(b"ok")
"""


def optimizer_step(tensors: list) -> None:
    """Stands in for the learner's optimizer step: every weight written in place."""
    import torch

    with torch.no_grad():
        for t in tensors:
            t.mul_(0.999)


def floor_seconds(tensors: list, repeats: int, settled: bool) -> float:
    """Send every tensor as a zero-copy frame to another process over loopback TCP.
    ``settled``: each send right after ``settle()`` and ``optimizer_step``, as each timed
    sync is; else back to back."""
    import zmq

    from benchmarks.common import settle
    from climbrl.wire import tensor_buffer

    ctx = zmq.Context()
    ack = ctx.socket(zmq.PULL)
    aport = ack.bind_to_random_port("tcp://127.0.0.1")
    sink = subprocess.Popen(
        [sys.executable, "-c", _SINK, f"tcp://127.0.0.1:{aport}"], stdout=subprocess.PIPE, text=True
    )
    port = int(sink.stdout.readline())
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    times = []
    for _ in range(repeats + 1):
        if settled:
            settle()
            optimizer_step(tensors)
        t = time.perf_counter()
        push.send_multipart([tensor_buffer(x) for x in tensors], copy=False)
        ack.recv()
        times.append(time.perf_counter() - t)
    push.send(b"stop")
    sink.wait(timeout=30)
    push.close(linger=0)
    ack.close(linger=0)
    ctx.term()
    return min(times[1:])


def floors(tensors: list, repeats: int) -> dict[bool, float]:
    """{settled: the floor timed that way}."""
    from benchmarks.common import settle

    settle()
    return {settled: floor_seconds(tensors, repeats, settled) for settled in (True, False)}


def repack_seconds(sd: dict, repeats: int) -> float | None:
    """vLLM-CPU's oneDNN packing of the model's linear weights (q/k/v and gate/up stacked, as
    the engine holds them), on one thread in this process: what any update of the weights of a
    vLLM CPU engine redoes, whatever the transport (vLLM's engine packs on its one worker
    thread on a 2-CPU machine; climbrl's reload splits it over two). None where vLLM has no
    oneDNN GEMM."""
    import torch
    from vllm import _custom_ops as ops

    if not ops._supports_onednn:
        return None
    stacks: dict[str, list] = {}
    for n, t in sd.items():
        if t.dim() == 2 and "embed_tokens" not in n:
            key = n
            for part, fused in (
                (".q_proj.", ".qkv."),
                (".k_proj.", ".qkv."),
                (".v_proj.", ".qkv."),
                (".gate_proj.", ".gate_up."),
                (".up_proj.", ".gate_up."),
            ):
                key = key.replace(part, fused)
            stacks.setdefault(key, []).append(t)
    ws = [torch.cat(ts) if len(ts) > 1 else ts[0] for ts in stacks.values()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    try:
        for _ in range(repeats + 1):
            t = time.perf_counter()
            handlers = [ops.create_onednn_mm(w.t(), 32) for w in ws]
            best = min(best, time.perf_counter() - t)
            del handlers
    finally:
        torch.set_num_threads(threads)
    return best


def _batches(mdir: Path, n: int) -> list:
    """Real data: the task corpus, tokenized, in batches of 8 sequences of 48 tokens."""
    import torch
    from transformers import AutoTokenizer

    from climbrl.envs.tasks import corpus_for_tokenizer

    tok = AutoTokenizer.from_pretrained(str(mdir))
    ids = [i for t in corpus_for_tokenizer() for i in tok.encode(t)]
    x = torch.tensor(ids[: (len(ids) // 48) * 48]).view(-1, 48)
    return [x[(8 * k) % len(x) :][:8] for k in range(n)]


def _step(model, opt, batch) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync_modes(server, mdir: Path, a) -> dict:
    """Bytes and seconds per update for full, delta and LoRA sync into the same engine."""
    import torch
    from transformers import AutoModelForCausalLM

    from climbrl.config import load_config
    from climbrl.learner.weights import WeightPublisher, setup_lora
    from climbrl.wire import WeightAck

    out = {}
    batches = _batches(mdir, a.repeats + 1)
    for k, mode in enumerate(("full", "delta", "lora")):
        model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
        if mode == "lora":
            cfg = load_config(
                None,
                [
                    f'model.path="{mdir}"',
                    'learner.weights.mode="lora"',
                    f"learner.weights.lora.r={a.lora_r}",
                ],
            )
            model = setup_lora(model, cfg.learner)
        pub = WeightPublisher(model, mode)
        opt = torch.optim.AdamW(pub.trainable(), lr=a.lr, betas=(0.9, 0.99))
        rows = []
        for i in range(a.repeats + 1):
            if i:
                _step(model, opt, batches[i])
            v = 1000 * (k + 1) + i
            t0 = time.perf_counter()
            ((_, m, frames),) = pub.messages(v, ["r0"])
            t_enc = time.perf_counter() - t0
            server.hub.send("r0", m, frames)
            _, ack, _, _ = server.wait_for(WeightAck, lambda x, v=v: x.version == v or not x.ok)
            assert ack.ok, ack.error
            pub.acked("r0", v)
            rows.append((pub.last[m.kind], time.perf_counter() - t0, t_enc, ack.phases))
        first, rest = rows[0], rows[1:]
        best = min(rest, key=lambda r: r[1])
        out[mode] = {
            "bytes": int(sum(r[0] for r in rest) / len(rest)),
            "sync_s": round(best[1], 4),
            "encode_s": round(best[2], 4),
            "first_sync_bytes": first[0],
            "phases": {p: round(x, 4) for p, x in best[3].items()},
        }
        del model, opt, pub
    return out


def bf16_delta(mdir: Path, a) -> dict:
    """Delta bytes of real steps on a bfloat16 model (encoder + decoder, no engine), at the
    benchmark's lr and at a tenth of it (RL fine-tuning runs at 1e-6 and below)."""
    import torch
    from transformers import AutoModelForCausalLM

    from climbrl.learner.weights import WeightPublisher
    from climbrl.weights.codecs import EngineWeights
    from climbrl.wire import tensor_buffer

    out = {}
    for lr in (a.lr, a.lr / 10):
        model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.bfloat16)
        pub = WeightPublisher(model, "delta")
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
        ((_, m, fr),) = pub.messages(1, ["r0"])
        eng = EngineWeights(0)
        eng.commit(eng.prepare(m, [tensor_buffer(t) for t in fr]))
        sizes = []
        for i, b in enumerate(_batches(mdir, a.repeats), start=2):
            _step(model, opt, b)
            ((_, m, fr),) = pub.messages(i, ["r0"])
            sizes.append(pub.last["delta"])
            eng.commit(eng.prepare(m, [tensor_buffer(t) for t in fr]))
        sd = model.state_dict()
        exact = all(
            torch.equal(eng.base[n].view(torch.int16), t.view(torch.int16))
            for n, t in sd.items()
            if t.dtype == torch.bfloat16
        )
        full = sum(t.numel() * t.element_size() for t in sd.values())
        out[f"lr_{lr:g}"] = {
            "bytes": int(sum(sizes) / len(sizes)),
            "full_bytes": full,
            "bytes_ratio": round(sum(sizes) / len(sizes) / full, 4),
            "bit_exact": exact,
        }
        del model, opt, pub, eng
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="5m,50m,500m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5, help="AdamW lr of the RL-sized step")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument(
        "--no-modes",
        action="store_true",
        help="only the full-sync transports against the floor (faster)",
    )
    a = ap.parse_args()

    import torch

    from benchmarks.common import RolloutProc, settle, write_cfg, write_result
    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.learner.weights import WeightPublisher
    from climbrl.tinymodel import make_tiny_model
    from climbrl.wire import (
        SamplingSpec,
        Trajectory,
        WeightAck,
        WeightManifest,
        WorkOrder,
        tensor_meta,
    )

    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="climbrl-wsync-"))
    for size in a.sizes.split(","):
        h, layers, inter, heads, kv = SIZES[size]
        mdir = make_tiny_model(
            tmp / size,
            corpus_for_tokenizer(),
            hidden_size=h,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            intermediate_size=inter,
        )
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
        sd = model.state_dict()
        names = list(sd)
        tensors = [sd[n] for n in names]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        params = sum(t.numel() for t in tensors)
        load_before = os.getloadavg()[0]
        floor_before = floors(tensors, max(a.repeats, 5))  # quiet: no engine yet
        cfg = write_cfg(
            tmp / f"{size}.toml",
            mdir,
            rollout={"max_model_len": 64, "kv_cache_gb": 0.25},
            wire={"weight_sync_timeout_s": 600.0},
        )
        server = RolloutProc(cfg, tmp / f"{size}.log", python_args=("-c", _LANDING_SHIM))
        shm_pub = WeightPublisher(model, "full", shm_dir=str(SHM_DIR))
        shm_pub.join("r0", socket.gethostname())
        zmq_pub = WeightPublisher(model, "full", shm_dir=str(SHM_DIR))  # as the learner's
        zmq_pub.join("r0", "another-host")  # frames, not the file
        pubs = {"shm": shm_pub, "zmq": zmq_pub}
        # sync, first token, phases; zmq: odd versions (landed), zmq_staged: even ones
        runs = {t: ([], [], []) for t in ("zmq_staged", "zmq", "shm")}
        v = 0
        try:
            for r in range(a.repeats + 1):
                for transport in runs:  # interleaved: same machine state for each
                    v += 1
                    if transport != "shm" and v % 2 != (transport == "zmq"):
                        v += 1  # zmq: odd, landed; zmq_staged: even, staged (_LANDING_SHIM)
                    settle()  # after the previous first token and background packing
                    optimizer_step(tensors)
                    t0 = time.perf_counter()  # step end
                    if transport == "zmq_staged":  # the step cloned, as a snapshot
                        m = WeightManifest(
                            version=v, tensors=[tensor_meta(n, sd[n]) for n in names]
                        )
                        frames = [t.detach().clone() for t in tensors]
                    else:
                        pubs[transport].forget("r0")
                        ((_, m, frames),) = pubs[transport].messages(v, ["r0"])
                    assert bool(m.shm_path) == (transport == "shm")
                    t_pub = time.perf_counter() - t0  # the snapshot (a clone, a ring slot)
                    server.hub.send("r0", m, frames)
                    del frames
                    _, ack, _, t_ack = server.wait_for(WeightAck, lambda x, v=v: x.version == v)
                    assert ack.ok, ack.error
                    t1 = time.perf_counter()
                    for pub in pubs.values():  # as the learner does: older ring slots are free
                        pub.acked("r0", v)
                    server.hub.send(
                        "r0",
                        WorkOrder(
                            order_id=f"w{v}",
                            policy_version=v,
                            env="copy_first",
                            task_index=0,
                            group_size=1,
                            sampling=SamplingSpec(max_tokens=1),
                        ),
                    )
                    _, tr, _, _ = server.wait_for(Trajectory)
                    assert tr.policy_version == v
                    t2 = time.perf_counter()
                    if r > 0:  # the first round warms caches
                        sync, first, phases = runs[transport]
                        sync.append(t1 - t0)
                        first.append(t2 - t0)
                        phases.append({"publish": t_pub, **ack.phases})
            modes = {} if a.no_modes else sync_modes(server, mdir, a)
        finally:
            server.close()
            for pub in pubs.values():
                pub.close()
        floor_after = floors(tensors, max(a.repeats, 5))
        # the faster of before and after: the stricter ratio
        fl = min(floor_before[True], floor_after[True])
        fl_b2b = min(floor_before[False], floor_after[False])
        row = {
            "params": params,
            "bytes": nbytes,
            "floor_s": round(fl, 4),
            "floor_before_after_s": [round(floor_before[True], 4), round(floor_after[True], 4)],
            "floor_back_to_back_s": round(fl_b2b, 4),
            # other work on the machine slows the socket and the copies unevenly: the 1-minute
            # load average before the floors and after the last one
            "load_avg_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        rp = repack_seconds(sd, a.repeats)
        if rp is not None:
            row.update({"repack_s": round(rp, 4), "repack_ratio": round(rp / fl, 2)})
        for transport, (sync, first, phases) in runs.items():
            best = min(range(len(sync)), key=lambda i: sync[i])
            pre = "" if transport == "shm" else f"{transport}_"
            row.update(
                {
                    f"{pre}sync_s": round(sync[best], 4),
                    f"{pre}first_token_s": round(min(first), 4),
                    f"{pre}ratio": round(sync[best] / fl, 2),
                    f"{pre}ratio_back_to_back": round(sync[best] / fl_b2b, 2),
                    f"{pre}phases": {k: round(x, 4) for k, x in phases[best].items()},
                }
            )
        results[size] = row
        if modes:
            results[size].update(
                {
                    "modes": modes,
                    "delta_bytes_ratio": round(modes["delta"]["bytes"] / modes["full"]["bytes"], 4),
                    "lora_bytes_ratio": round(modes["lora"]["bytes"] / modes["full"]["bytes"], 4),
                    "delta_bf16": bf16_delta(mdir, a),
                }
            )
        del model, sd, tensors
    out = {"benchmark": "weight_sync", **results}
    print(json.dumps(out))
    print(f"wrote {write_result('weight_sync', out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
