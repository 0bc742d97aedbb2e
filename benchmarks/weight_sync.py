"""Weight sync: learner step end -> new weights generating in the engine, against the floor.

    python benchmarks/weight_sync.py [--sizes 5m,50m,500m --repeats 3]

For each model size (Qwen3, float32) it starts a real rollout server and publishes the
learner's state dict over ZeroMQ, timing from the publish call to the server's ack (weights
reloaded, prefix cache reset, version set, generation resumed) and to the first token generated
under the new version. The floor is the time to move the same bytes through a loopback ZeroMQ
socket to another process, measured in the same run. Prints one JSON line; ``ratio`` =
sync seconds / floor seconds (goal <= 2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {  # hidden, layers, intermediate, heads, kv heads -> ~params (384-token vocab)
    "5m": (256, 6, 768, 4, 2),
    "50m": (640, 10, 1920, 8, 4),
    "500m": (1536, 18, 4608, 12, 4),
}

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


def floor_seconds(tensors: list, repeats: int) -> float:
    """Send every tensor as a zero-copy frame to another process over loopback TCP."""
    import zmq

    from climbrl.wire import tensor_buffer

    ctx = zmq.Context()
    ack = ctx.socket(zmq.PULL)
    aport = ack.bind_to_random_port("tcp://127.0.0.1")
    sink = subprocess.Popen([sys.executable, "-c", _SINK, f"tcp://127.0.0.1:{aport}"],
                            stdout=subprocess.PIPE, text=True)
    port = int(sink.stdout.readline())
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    times = []
    for _ in range(repeats + 1):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="5m,50m,500m")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import torch
    from climbrl.envs.tasks import corpus_for_tokenizer

    from benchmarks.common import RolloutProc, write_cfg
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
        mdir = make_tiny_model(tmp / size, corpus_for_tokenizer(), hidden_size=h,
                               num_layers=layers, num_heads=heads, num_kv_heads=kv,
                               intermediate_size=inter)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
        sd = model.state_dict()
        names = list(sd)
        tensors = [sd[n] for n in names]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        params = sum(t.numel() for t in tensors)
        cfg = write_cfg(tmp / f"{size}.toml", mdir,
                        rollout={"max_model_len": 64, "kv_cache_gb": 0.25},
                        wire={"weight_sync_timeout_s": 600.0})
        server = RolloutProc(cfg, tmp / f"{size}.log")
        sync, first, phases = [], [], []
        try:
            for v in range(1, a.repeats + 2):
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(0.999)  # "the optimizer step"
                t0 = time.perf_counter()  # step end
                m = WeightManifest(version=v, tensors=[tensor_meta(n, sd[n]) for n in names])
                server.hub.send("r0", m, tensors)
                _, ack, _, t_ack = server.wait_for(WeightAck, lambda x, v=v: x.version == v)
                assert ack.ok, ack.error
                t1 = time.perf_counter()
                server.hub.send("r0", WorkOrder(order_id=f"w{v}", policy_version=v,
                                                env="copy_first", task_index=0, group_size=1,
                                                sampling=SamplingSpec(max_tokens=1)))
                _, tr, _, _ = server.wait_for(Trajectory)
                assert tr.policy_version == v
                t2 = time.perf_counter()
                if v > 1:  # first update warms caches
                    sync.append(t1 - t0)
                    first.append(t2 - t0)
                    phases.append(ack.phases)
        finally:
            server.close()
        fl = floor_seconds(tensors, a.repeats)
        best = min(range(len(sync)), key=lambda i: sync[i])
        results[size] = {
            "params": params, "bytes": nbytes, "sync_s": round(sync[best], 4),
            "first_token_s": round(min(first), 4), "floor_s": round(fl, 4),
            "ratio": round(sync[best] / fl, 2),
            "phases": {k: round(x, 4) for k, x in phases[best].items()},
        }
        del model, sd, tensors
    print(json.dumps({"benchmark": "weight_sync", **results}))


if __name__ == "__main__":
    main()
