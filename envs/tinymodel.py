"""``climbrl tiny-model``: a tiny random model whose tokenizer fits an environment.

The tokenizer is trained on the environment's own text (``--env NAME``: its
``Env.tokenizer_corpus()``, or its tasks' prompts and reference answers when that is empty),
else on the built-in ``copy_first`` task's prompts, so the env's prompts stay short. The model
is ``climbrl.tinymodel.make_tiny_model``'s; afterwards the longest first-turn prompt per split
is measured as a rollout server renders it.

    climbrl tiny-model OUT_DIR --env NAME [--env-args JSON]   # a tokenizer that fits NAME
    python -m climbrl.envs.tinymodel OUT_DIR [--moe]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from climbrl.tinymodel import make_tiny_model

# Tasks per split read from an env whose tokenizer_corpus() is empty, and measured afterwards.
CORPUS_TASKS = 2000
MEASURE_TASKS = 64


def _chatml(messages: list[dict[str, Any]]) -> str:
    """Messages as the tiny tokenizer's ChatML template renders them (without tools)."""
    return "".join(
        f"<|im_start|>{m.get('role', 'user')}\n{m.get('content') or ''}<|im_end|>\n"
        for m in messages
    )


def env_corpus(env: Any, max_tasks: int = CORPUS_TASKS) -> list[str]:
    """Text to train a tokenizer for ``env`` on: ``env.tokenizer_corpus()``, or when that is
    empty, up to ``max_tasks`` task prompts per split (chat prompts in ChatML, with the
    assistant turn opened), each followed by the task's reference turns where the env has them."""
    corpus = list(env.tokenizer_corpus())
    if corpus:
        return corpus
    for split in env.splits:
        for i in range(min(env.num_tasks(split), max_tasks)):
            task = env.get_task(split, i)
            ref = env.reference_turns(task) or []
            if isinstance(task.prompt, str):
                corpus.append(task.prompt + "".join(ref))
            else:
                corpus.append(
                    _chatml(task.prompt)
                    + "".join(_chatml([{"role": "assistant", "content": t}]) for t in ref)
                )
    return corpus


def prompt_lengths(
    tokenizer: Any, env_cls: type, env_args: dict[str, Any], max_tasks: int = MEASURE_TASKS
) -> dict[str, int]:
    """Longest first-turn prompt in tokens per split, as a rollout server renders it (a fresh
    env per episode, ``reset``'s prompt, chat prompts through the chat template)."""
    from climbrl.envs.chat import ChatRenderer

    async def one(split: str, i: int) -> int:
        env = env_cls(**env_args)
        try:
            prompt = await env.reset(env.get_task(split, i))
            if isinstance(prompt, str):
                return len(tokenizer.encode(prompt, add_special_tokens=False))
            return len(ChatRenderer(tokenizer, env.tools()).prompt_ids(prompt))
        finally:
            await env.close()

    async def run() -> dict[str, int]:
        probe = env_cls(**env_args)
        return {
            split: max(
                [await one(split, i) for i in range(min(probe.num_tasks(split), max_tasks))],
                default=0,
            )
            for split in probe.splits
        }

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="climbrl tiny-model",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("out_dir")
    p.add_argument(
        "--env",
        default=None,
        help="train the tokenizer on this environment's text (entry point name, "
        "dotted path pkg.mod:Class, path/to/file.py:Class or built-in name); "
        "default: the built-in copy_first task",
    )
    p.add_argument("--env-args", default="{}", help="the env's keyword arguments as JSON")
    p.add_argument("--moe", action="store_true")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=384,
        help="260 = bytes + specials only: one token per letter (learns fastest)",
    )
    a = p.parse_args(argv)
    try:
        env_args = json.loads(a.env_args)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--env-args is not JSON ({e}); give an object, e.g. '{{\"length\": 4}}'"
        ) from None
    if not isinstance(env_args, dict):
        raise ValueError(f"--env-args must be a JSON object, not {a.env_args!r}")
    if a.env is None:
        from climbrl.envs.tasks import corpus_for_tokenizer

        env_cls, corpus = None, corpus_for_tokenizer()
    else:
        from climbrl.envs.base import resolve_env

        env_cls = resolve_env(a.env)
        corpus = env_corpus(env_cls(**env_args))
        if not corpus:
            raise ValueError(
                f"env {a.env!r} has no tasks and an empty tokenizer_corpus(): "
                "give it tasks, or return sample text from tokenizer_corpus()"
            )
    make_tiny_model(
        a.out_dir,
        corpus,
        moe=a.moe,
        hidden_size=a.hidden_size,
        num_layers=a.layers,
        vocab_size=a.vocab_size,
    )
    if env_cls is not None:
        from transformers import AutoTokenizer

        try:
            longest = prompt_lengths(AutoTokenizer.from_pretrained(a.out_dir), env_cls, env_args)
        except Exception as e:  # the model is saved; `climbrl env-check` reports env faults
            print(f"{a.env}: prompt lengths not measured: {type(e).__name__}: {e}")
        else:
            print(
                f"{a.env}: longest prompt in tokens "
                + ", ".join(f"{s} {n}" for s, n in longest.items())
                + " (of the first tasks of each split); rollout.max_model_len must hold it "
                "plus rollout.max_tokens per turn"
            )
    print(a.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
