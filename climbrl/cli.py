"""The ``climbrl`` command. Arguments are parsed before torch or vLLM is imported.

    climbrl demo                         # tiny model learns a task by RL on CPU (~10 min)
    climbrl run CONFIG.toml [--set k=v]  # rollout servers + learner as separate processes
    climbrl learn --config C --endpoint-file F     # the learner alone
    climbrl rollout --config C --endpoint E --server-id ID   # one rollout server alone
    climbrl tiny-model OUT_DIR [--moe]   # a tokenizer + random Qwen3 for tests
    climbrl pretrain CONFIG.toml         # pretraining (see climbrl.pretrain)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        datefmt="%H:%M:%S",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="climbrl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="start rollout servers and the learner for a config")
    r.add_argument("config")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    r.add_argument("--no-live", action="store_true", help="plain log lines instead of rich")

    lr = sub.add_parser("learn", help="run the learner alone")
    lr.add_argument("--config", required=True)
    lr.add_argument("--set", dest="overrides", action="append", default=[])
    lr.add_argument("--resume", action="store_true")
    lr.add_argument("--endpoint-file", help="write the bound endpoint here once listening")

    ro = sub.add_parser("rollout", help="run one rollout server alone")
    ro.add_argument("--config", required=True)
    ro.add_argument("--set", dest="overrides", action="append", default=[])
    ro.add_argument("--endpoint", required=True, help="learner endpoint, tcp://host:port")
    ro.add_argument("--server-id", default="r0")
    ro.add_argument("--initial-version", type=int, default=0)

    d = sub.add_parser("demo", help="the CPU demo: a tiny model learns a task by RL")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="override the number of RL steps")
    d.add_argument("--set", dest="overrides", action="append", default=[])

    t = sub.add_parser("tiny-model", help="train a tokenizer and save a random Qwen3")
    t.add_argument("out_dir")
    t.add_argument("--moe", action="store_true")

    sub.add_parser("pretrain", help="pretraining; see `climbrl pretrain --help`", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pretrain":
        from climbrl.pretrain.cli import main as pretrain_main

        return pretrain_main(argv[1:])
    a = _parser().parse_args(argv)
    _logging(os.environ.get("CLIMBRL_LOG", "INFO"))
    from climbrl.config import load_config

    try:
        if a.cmd == "run":
            from climbrl.launcher import launch

            cfg = load_config(a.config, a.overrides)
            return launch(cfg, resume=a.resume, live=not a.no_live)
        if a.cmd == "learn":
            from climbrl.learner.learner import train

            cfg = load_config(a.config, a.overrides)
            train(cfg, resume=a.resume, endpoint_file=a.endpoint_file)
            return 0
        if a.cmd == "rollout":
            from climbrl.rollout.server import serve

            cfg = load_config(a.config, a.overrides)
            serve(cfg, a.endpoint, a.server_id, a.initial_version)
            return 0
        if a.cmd == "demo":
            from climbrl.demo import run_demo

            return run_demo(a.output_dir, steps=a.steps, overrides=a.overrides)
        if a.cmd == "tiny-model":
            from climbrl.tinymodel import main as tiny_main

            return tiny_main([a.out_dir] + (["--moe"] if a.moe else []))
    except ValueError as e:
        print(f"climbrl: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
