"""``climbrl pretrain CONFIG.toml [--set key=value ...] [--resume]`` - run a pretraining job.

Also: ``--demo-base OUT_DIR`` builds the ~5-minute demo base model (no config needed), and
``--print-config`` shows the resolved config without training. Arguments are parsed before
torch is imported, so ``--help`` is instant.

    climbrl pretrain examples/pretrain_demo.toml --set train.steps=200
    climbrl pretrain examples/pretrain_demo.toml --resume
    python -m climbrl.pretrain.cli --demo-base runs/demo-base
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="climbrl pretrain",
        description="Pretrain (or continue pretraining, or SFT) a Qwen3 / Qwen3-MoE model.",
    )
    p.add_argument("config", nargs="?", help="TOML config (see examples/pretrain_*.toml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the run's latest checkpoint"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--demo-base", metavar="OUT_DIR", help="build the demo base model into OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    if not a.config and not a.demo_base:
        p.error("give a CONFIG.toml, or --demo-base OUT_DIR")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.demo_base:
        from climbrl.pretrain.demo import build_demo_base

        m = build_demo_base(a.demo_base, quiet=a.quiet)
        print(json.dumps({k: v for k, v in m.items() if k != "heldout_samples"}))
        return 0
    from pydantic import ValidationError

    from climbrl.pretrain.config import load_config

    try:
        cfg = load_config(a.config, a.overrides)
    except (ValidationError, ValueError) as e:
        print(f"climbrl pretrain: invalid config: {e}", file=sys.stderr)
        return 2
    if a.print_config:
        print(cfg.model_dump_json(indent=2))
        return 0
    if cfg.mode == "sft":
        from climbrl.pretrain.sft import run_sft

        summary = run_sft(cfg)
    else:
        from climbrl.pretrain.train import train

        summary = train(cfg, resume=a.resume, quiet=a.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k != "heldout_samples"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
