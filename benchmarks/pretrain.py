"""Benchmark: the pretraining step's achieved FLOP/s against a plain torch matmul, same run.

climbrl: the real training step of `climbrl.pretrain.train` (`train_step`: forward over
document-masked packed rows, FP32 LM head + z-loss, backward, grad clipping, AdamW step) on a
dense Qwen3, with the loop's own settings (`--compile`, `--dtype`). Its FLOPs are the *useful*
ones (`climbrl.pretrain.model.train_flops_counter`): 6 x active matmul params per token plus
document-masked causal attention.

Baseline: plain ``torch.mm`` in the step's dtype, at two shapes - square ``--matmul-n`` and the
step's own largest GEMM (tokens x hidden @ hidden x intermediate) - taking the faster, so the
step is held to the best FLOP/s this device gives to its kind of work.

The two are measured in alternating rounds, so that load from other processes hits both: the
reported ratio is the median over rounds of (step FLOP/s / matmul FLOP/s) in the same round;
the best-of ratio (fastest step over fastest matmul) is reported beside it. Goal on CPU: >= 0.5.
On CUDA, MFU against the device's peak bf16 FLOP/s (bar: 40%).

    python benchmarks/pretrain.py [--threads 2] [--rounds 5] [--hidden 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(a: Any, b: Any, device: str, seconds: float) -> float:
    """Best FLOP/s of ``a @ b`` over bursts lasting about `seconds` in all."""
    import torch

    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    torch.mm(a, b)
    sync(device)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        reps = 20 if device == "cuda" else 2
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        best = max(best, flops * reps / (time.perf_counter() - t0))
    return best


def build(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from climbrl.pretrain import model as M
    from climbrl.pretrain.config import ModelConfig, TrainConfig
    from climbrl.pretrain.data import pack_docs
    from climbrl.pretrain.evaluate import batch_tensors
    from climbrl.pretrain.train import TrainStep, build_optimizers, peak_flops

    mc = ModelConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 64),
        num_kv_heads=max(1, args.hidden // 256),
        intermediate_size=args.hidden * 3,
        max_position_embeddings=args.seq_len,
    )
    tc = TrainConfig(
        steps=100,
        warmup_steps=1,
        batch_size=args.batch,
        dtype=args.dtype,
        z_loss=1e-4,
        compile=args.compile,
    )
    model = M.build_model(mc, vocab_size=args.vocab, eos_id=0, pad_id=1, seed=0).to(device).train()
    opts = build_optimizers(model, tc)
    rng = np.random.default_rng(0)
    # Packed rows of `doc-min`..`doc-max`-token documents, as the real loader produces.
    n_docs = args.batch * args.seq_len * 2 // (args.doc_min + args.doc_max) + 4
    docs = [
        rng.integers(2, args.vocab, size=int(rng.integers(args.doc_min, args.doc_max))).tolist()
        for _ in range(n_docs)
    ]
    packed = pack_docs(docs, args.seq_len, 0, 1)
    toks, poss = packed.tokens[: args.batch], packed.positions[: args.batch]
    ids, pos, labels = batch_tensors(toks, poss, 1, device)
    step = TrainStep(model, opts, tc, device)
    dtype = torch.bfloat16 if step.amp_dtype == torch.bfloat16 else torch.float32
    return {
        "model": model,
        "step": lambda: step(ids, pos, labels),
        "flops": M.train_flops_counter(model)(poss),
        "flops_if_unmasked": M.train_flops_per_token(model, args.seq_len) * toks.size,
        "tokens": int(toks.size),
        "dtype": dtype,
        "peak": peak_flops(tc, device),
        "params_matmul": M.matmul_params(model)[0],
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
    ap.add_argument("--doc-min", type=int, default=50)
    ap.add_argument("--doc-max", type=int, default=350)
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="the training loop's train.dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the training loop's train.compile (torch.compile of the model)",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--matmul-seconds", type=float, default=1.0, help="per round and shape")
    args = ap.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    b = build(args, device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes torch.compile's compilation
        b["step"]()
    sync(device)
    warmup_s = time.perf_counter() - t0

    n, h, dt = args.matmul_n, args.hidden, b["dtype"]
    shapes = {
        f"square_{n}": ((n, n), (n, n)),
        f"step_gemm_{b['tokens']}x{h}x{3 * h}": ((b["tokens"], h), (h, 3 * h)),
    }
    mats = {
        k: (torch.randn(*sa, dtype=dt, device=device), torch.randn(*sb, dtype=dt, device=device))
        for k, (sa, sb) in shapes.items()
    }
    rounds = []
    for _ in range(args.rounds):
        mm = {k: matmul_rate(x, y, device, args.matmul_seconds) for k, (x, y) in mats.items()}
        times = []
        for _ in range(args.steps_per_round):
            t = time.perf_counter()
            b["step"]()
            sync(device)
            times.append(time.perf_counter() - t)
        step_rate = b["flops"] / min(times)
        rounds.append(
            {
                "matmul": mm,
                "step_seconds": min(times),
                "step_flops_per_s": step_rate,
                "ratio": step_rate / max(mm.values()),
            }
        )
    best_mm = {k: max(r["matmul"][k] for r in rounds) for k in shapes}
    best_step = min(r["step_seconds"] for r in rounds)
    out: dict[str, Any] = {
        "benchmark": "pretrain",
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "ratio_train_step_flops_over_matmul_flops": statistics.median(r["ratio"] for r in rounds),
        "ratio_best_of": b["flops"] / best_step / max(best_mm.values()),
        "ratios_per_round": [round(r["ratio"], 4) for r in rounds],
        "dtype": str(dt).removeprefix("torch."),
        "compile": args.compile,
        "matmul_flops_per_s_best": best_mm,
        "train_step_flops_per_s_best": b["flops"] / best_step,
        "step_seconds_best": best_step,
        "tokens_per_step": b["tokens"],
        "tokens_per_s_best": b["tokens"] / best_step,
        "train_flops_per_step": b["flops"],
        "train_flops_per_step_if_attention_unmasked": b["flops_if_unmasked"],
        "params_matmul": b["params_matmul"],
        "warmup_seconds": warmup_s,
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "docs": [args.doc_min, args.doc_max],
        },
        "peak_flops": b["peak"],
    }
    if b["peak"]:
        out["mfu"] = out["train_step_flops_per_s_best"] / b["peak"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
