"""``climbrl demo``: watch a model learn by RL on a CPU, in about ten minutes.

Builds a tiny Qwen3 with a locally trained tokenizer (nothing is downloaded), then runs the
real system: a learner and a vLLM rollout server as separate processes over ZeroMQ, training on
the ``copy_first`` task with async GRPO. Prints held-out accuracy before and after and saves
``reward_curve.png`` in the output folder.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def plot_rewards(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from climbrl.metrics import read_metrics

    recs = [r for r in read_metrics(metrics_path) if "reward" in r]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["reward"] for r in recs], label="mean reward")
    ax.plot([r["step"] for r in recs], [r.get("correct") or 0 for r in recs], label="correct")
    ax.set_xlabel("RL step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("climbrl demo: copy_first")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run_demo(output_dir: str, steps: int | None = None, overrides: list[str] | None = None) -> int:
    from climbrl.config import load_config
    from climbrl.launcher import launch

    out = Path(output_dir)
    model_dir = out / "model"
    cfg_file = resources.files("climbrl") / "configs" / "demo.toml"
    ov = [f"model.path={json.dumps(str(model_dir))}", f"run.output_dir={json.dumps(str(out))}"]
    if steps is not None:
        ov.append(f"learner.total_steps={steps}")
    cfg = load_config(str(cfg_file), ov + list(overrides or []))
    if not (model_dir / "config.json").exists():
        from climbrl.envs.base import make_env
        from climbrl.tinymodel import make_tiny_model

        print(f"building a tiny model in {model_dir} ...", flush=True)
        # 260 = 256 bytes + 4 specials: no merges, so each letter is one token and greedy
        # decoding picks the policy's most likely letter (with merges the mass of the right
        # letter splits over "a", "aa", "aaaa", ... and a wrong token wins the argmax).
        make_tiny_model(model_dir, make_env(cfg.env.name, cfg.env.args).tokenizer_corpus(),
                        vocab_size=260, seed=cfg.run.seed)
    rc = launch(cfg)
    if rc != 0:
        return rc
    summary = json.loads((out / "summary.json").read_text())
    plot_rewards(out / "metrics.jsonl", out / "reward_curve.png")
    print(f"held-out accuracy before: {summary['accuracy_before']:.3f}")
    print(f"held-out accuracy after:  {summary['accuracy_after']:.3f}")
    print(f"reward curve: {out / 'reward_curve.png'}")
    return 0
