"""Benchmark: one learner training step on the same batch, climbrl's path against TRL's.

climbrl: ``Learner.train_step`` (completion-only chunked log-probs, the DAPO token-level
objective through ``learner/objectives_step.py``, AdamW step). TRL: ``GRPOTrainer._compute_loss``
with ``loss_type='dapo'`` on the same model patched with TRL's own fused LM head
(``add_fused_lm_head``), then backward and the same AdamW step. Same random Qwen3 weights, same
prompts and completions, float32. Each side runs in its own subprocess, so the peak memory (RSS
high-water mark on CPU, ``max_memory_allocated`` on CUDA) above the loaded model belongs to it.

Run:  python benchmarks/learner_step.py                   # CPU, about a minute on 2 cores
      python benchmarks/learner_step.py --vocab 151936 --hidden 512 --samples 32 --reps 3
The last line printed is one JSON object: tokens/s and peak memory of both, and the ratios
(climbrl / TRL: speed > 1 and memory < 1 favour climbrl).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections import defaultdict
from typing import Any


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(a: argparse.Namespace, device: str) -> tuple[Any, list[Any]]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from climbrl.wire import Sample

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=a.hidden // 8, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).to(device).train()
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(a.samples):
        n = int(torch.randint(a.completion // 2, a.completion + 1, (1,), generator=g))
        samples.append(Sample(
            prompt_ids=torch.randint(0, a.vocab, (a.prompt,), generator=g).tolist(),
            completion_ids=torch.randint(0, a.vocab, (n,), generator=g).tolist(),
            completion_mask=[1] * n, logprobs=(-torch.rand(n, generator=g) * 5).tolist(),
            versions=[0] * n, reward=float(i % 3 == 0), finish_reason="stop"))
    return model, samples


def _groups(samples: list[Any], group_size: int) -> list[Any]:
    from climbrl.wire import Trajectory

    return [Trajectory(order_id=f"o{k}", server_id="r0", policy_version=0,
                       samples=samples[k:k + group_size], gen_seconds=0.0, num_generated_tokens=0)
            for k in range(0, len(samples), group_size)]


def climbrl_step(a: argparse.Namespace, model: Any, samples: list[Any]) -> Any:
    import torch
    from climbrl.learner.data import DataCursor
    from climbrl.learner.learner import Learner
    from climbrl.learner.objectives_step import ObjectiveStep

    from climbrl.config import load_config

    cfg = load_config(None, ["model.path=unused", f"learner.group_size={a.group_size}",
                             f"learner.micro_batch_size={a.samples}", "learner.loss_agg=\"token\"",
                             f"rollout.max_tokens={a.completion}",
                             f"rollout.max_model_len={a.prompt + a.completion + 1}"])
    L = object.__new__(Learner)
    L.cfg, L.model, L.ref, L.version = cfg, model, None, 0
    L.opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    L.obj = ObjectiveStep(cfg, model, 1.0)
    L.cursor = DataCursor(10**6)

    def step() -> None:
        groups = _groups(samples, a.group_size)
        L.seq_of = {}
        for gr in groups:
            L.seq_of[gr.order_id] = L.cursor.take()[0]
        L.train_step(groups)

    return step


def trl_step(a: argparse.Namespace, model: Any, samples: list[Any]) -> Any:
    import torch
    from climbrl.learner.objectives import group_advantages

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOTrainer
        from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=True,
                      outputs=("log_probs", "entropy"))
    B, T = len(samples), max(len(s.completion_ids) for s in samples)
    comp = torch.zeros(B, T, dtype=torch.long)
    cmask = torch.zeros(B, T, dtype=torch.long)
    old = torch.zeros(B, T)
    for b, s in enumerate(samples):
        n = len(s.completion_ids)
        comp[b, :n], cmask[b, :n] = torch.tensor(s.completion_ids), 1
        old[b, :n] = torch.tensor(s.logprobs)
    rewards = torch.tensor([s.reward for s in samples]).view(-1, a.group_size)
    dev = next(model.parameters()).device
    inputs = dict(prompt_ids=torch.tensor([s.prompt_ids for s in samples]),
                  prompt_mask=torch.ones(B, a.prompt, dtype=torch.long), completion_ids=comp,
                  completion_mask=cmask, old_per_token_logps=old,
                  advantages=group_advantages(rewards).flatten(),
                  num_items_in_batch=cmask.sum())
    inputs = {k: v.to(dev) for k, v in inputs.items()}

    class Acc:
        num_processes, is_main_process, sync_gradients = 1, True, True

        def autocast(self) -> Any:
            return contextlib.nullcontext()

        def gather(self, x: Any) -> Any:
            return x

        gather_for_metrics = gather

        def reduce(self, x: Any, reduction: str = "sum") -> Any:
            return x

    t = object.__new__(GRPOTrainer)  # TRL's loss code; no dataloader, generation or Trainer loop
    t.model, t.accelerator, t.loss_type, t.importance_sampling_level = model, Acc(), "dapo", "token"
    t.epsilon_low, t.epsilon_high, t.beta = 0.2, 0.28, 0.0
    t.args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    t.top_entropy_quantile, t.aux_loss_enabled, t.off_policy_mask_threshold = 1.0, False, None
    t.use_vllm, t.vllm_importance_sampling_correction = False, False
    t.current_gradient_accumulation_steps, t.max_completion_length = 1, T
    t.entropy_coef, t._entropy_bonus_enabled, t.use_adaptive_entropy = 0.0, False, False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        t._compute_loss(model, inputs).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def worker(impl: str, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, samples = _build(a, device)
    step = (climbrl_step if impl == "climbrl" else trl_step)(a, model, samples)
    tokens = sum(len(s.completion_ids) for s in samples)
    step()  # warm-up (allocator, optimizer state)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"impl": impl, "device": device, "tokens": tokens, "step_s": statistics.median(times),
            "tokens_per_s": tokens / statistics.median(times), "peak_mb": (peak - base) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--worker", choices=["climbrl", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    res = {}
    for impl in ("trl", "climbrl"):
        out = subprocess.run([sys.executable, __file__, "--worker", impl, *sys.argv[1:]],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{impl} worker failed:\n{out.stderr[-3000:]}")
        res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{impl:8s} {res[impl]['tokens_per_s']:9.1f} tok/s  "
              f"peak +{res[impl]['peak_mb']:.0f} MiB", file=sys.stderr)
    c, t = res["climbrl"], res["trl"]
    print(json.dumps({
        "benchmark": "learner_step", "device": c["device"], "tokens": c["tokens"],
        "config": {k: v for k, v in vars(a).items() if k != "worker"},
        "climbrl": c, "trl": t,
        "speed_ratio_climbrl_over_trl": c["tokens_per_s"] / t["tokens_per_s"],
        "peak_mem_ratio_climbrl_over_trl": c["peak_mb"] / max(t["peak_mb"], 1e-9),
    }))


if __name__ == "__main__":
    main()
