"""Benchmark: the pretraining step's achieved FLOP/s against a plain torch matmul, same run.

Baseline: a square fp32 (CPU) / bf16 (CUDA) ``torch.mm`` - the best FLOP/s this device gives
to the kind of work a training step is made of. climbrl: the real training step of
`climbrl.pretrain.train` (forward with document-masked packed rows, FP32 LM head + z-loss,
backward, grad clipping, AdamW step) on a dense Qwen3, counted at 6 * matmul params +
attention FLOPs per token. Prints one JSON line with the ratio (goal on CPU: >= 0.5) and, on
CUDA, MFU against the device's peak bf16 FLOP/s (bar: 40%).

    python benchmarks/pretrain.py [--threads 2] [--steps 5] [--hidden 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops(n: int, dtype: Any, device: str, seconds: float = 3.0) -> float:
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20 if device == "cuda" else 1):
            torch.mm(a, b)
            reps += 1
        sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def train_step_flops(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from climbrl.pretrain import model as M
    from climbrl.pretrain.config import ModelConfig, TrainConfig
    from climbrl.pretrain.data import pack_docs
    from climbrl.pretrain.evaluate import batch_tensors
    from climbrl.pretrain.train import autocast_ctx, build_optimizers, loss_terms, peak_flops

    mc = ModelConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        num_kv_heads=max(1, args.hidden // 256),
        intermediate_size=args.hidden * 3,
        max_position_embeddings=args.seq_len,
    )
    tc = TrainConfig(steps=100, warmup_steps=1, batch_size=args.batch, dtype="auto", z_loss=1e-4)
    model = M.build_model(mc, vocab_size=args.vocab, eos_id=0, pad_id=1, seed=0).to(device).train()
    opts = build_optimizers(model, tc)
    amp = autocast_ctx(tc, device)
    rng = np.random.default_rng(0)
    # Packed rows of 50-350-token documents, as the real loader produces.
    n_docs = args.batch * args.seq_len // 150 + 4
    docs = [
        rng.integers(2, args.vocab, size=int(rng.integers(50, 350))).tolist() for _ in range(n_docs)
    ]
    packed = pack_docs(docs, args.seq_len, 0, 1)
    ids, pos, labels = batch_tensors(
        packed.tokens[: args.batch], packed.positions[: args.batch], 1, device
    )
    flops_tok = M.train_flops_per_token(model, args.seq_len)

    def step() -> None:
        with amp:
            ce, zl = loss_terms(model, ids, pos, labels, tc.z_loss)
        (ce + tc.z_loss * zl).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    tokens = ids.numel()
    return {
        "step_seconds_median": dt,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / dt,
        "train_flops_per_token": flops_tok,
        "train_flops_per_s": tokens * flops_tok / dt,
        "params_matmul": M.matmul_params(model)[0],
        "peak_flops": peak_flops(tc, device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU only)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--matmul-n", type=int, default=1024)
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    mm_before = matmul_flops(args.matmul_n, dtype, device)
    step = train_step_flops(args, device)
    mm_after = matmul_flops(args.matmul_n, dtype, device)  # bracket the step: machine load drifts
    mm_ref = max(mm_before, mm_after)
    out: dict[str, Any] = {
        "benchmark": "pretrain",
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "ratio_train_step_flops_over_matmul_flops": step["train_flops_per_s"] / mm_ref,
        "matmul_flops_per_s": mm_ref,
        "matmul_flops_per_s_before_after": [mm_before, mm_after],
        "matmul_n": args.matmul_n,
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "seq_len": args.seq_len,
            "batch": args.batch,
        },
        **step,
    }
    if step["peak_flops"]:
        out["mfu"] = step["train_flops_per_s"] / step["peak_flops"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
