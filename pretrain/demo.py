"""The demo base: pretrain, from scratch on CPU in ~3 minutes, a small Qwen3 that adds numbers.

The corpus is `climbrl.pretrain.synthetic`'s addition task (``"347+85=" -> "432"``, operands of
1-3 digits) in which half of the sums with a carry carry the common mistake instead (every
carry dropped: ``"48+88=" -> "26"``); the held-out split shares no instance with training and
its answers are true. The base reaches a measurable but imperfect greedy accuracy, often
giving the mistake on carry sums, which `climbrl demo` then raises with RL against the true
sums (``climbrl.pretrain.presets.demo_run_config``).

    python -m climbrl.pretrain.demo OUT_DIR [--seed 0]

    from climbrl.pretrain.demo import build_demo_base
    metrics = build_demo_base("runs/demo-base")   # metrics["model_dir"] is the HF dir
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEMO_TASK = "add"


def build_demo_base(out_dir: str, *, seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Train the demo base into ``out_dir`` and return its metrics.

    Returns held-out greedy accuracy (``heldout_accuracy``), held-out NLL (``eval_nll``),
    ``tokens_per_s`` and ``model_dir`` (``out_dir/model``: safetensors, config, tokenizer with
    chat template) among others.
    """
    from climbrl.pretrain.config import PretrainConfig, resolve_presets
    from climbrl.pretrain.presets import demo_run_config
    from climbrl.pretrain.train import train

    cfg = PretrainConfig.model_validate(resolve_presets(demo_run_config(out_dir, seed=seed)))
    summary = train(cfg, quiet=quiet)
    summary["task"] = DEMO_TASK
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Pretrain the demo base model (addition) on CPU.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    m = build_demo_base(a.out_dir, seed=a.seed)
    print(json.dumps({k: v for k, v in m.items() if k != "heldout_samples"}))
