"""One multi-turn episode of an environment next to the engine: ``run_episode``.

The env works in text and chat messages; the episode owns the token ids. A chat prompt is
rendered with the template once, and later turns append only the tokens of new messages
(``climbrl.envs.chat``), never re-tokenising sampled ones. Per generated token the sample
records the id, the sampler's log-prob, the weight version that produced it and, when the
engine captures them, the kept count of the top-p/top-k filter and the MoE routing
(``climbrl.rollout.replay``). Observation tokens between turns carry mask 0, log-prob 0 and
version -1. An episode ends when the env says done, gives nothing to append, or the context
(``rollout.max_model_len``) is full (finish reason ``context``).

Every env call runs under ``env.step_timeout_s``; a failing, hanging or malformed env raises
``EnvFailure``, which costs this episode only (``failed_sample``).

``run_episode`` drives any object with ``tokenizer``, ``version`` and
``async generate(ids, sampling_params) -> (completion output, replay record | None)``: the
server's ``climbrl.rollout.generation.EngineGenerator`` over vLLM, or a fake in a unit test.

Tests: ``pytest tests/unit/test_episode.py``; with a real engine,
``tests/integration/test_env_multiturn.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

from climbrl.envs.base import Env, Turn
from climbrl.envs.chat import ChatRenderer, parse_tool_calls
from climbrl.wire import ENV_ERROR, Routing, Sample, WorkOrder

log = logging.getLogger("climbrl.rollout")


class EnvFailure(Exception):
    """The environment (or a black-box agent) failed: it costs one episode."""


class EpisodeEngine(Protocol):
    """What an episode needs from the engine."""

    tokenizer: Any

    @property
    def version(self) -> int:
        """The engine's weight version now."""
        ...

    async def generate(self, ids: list[int], sp: Any) -> tuple[Any, dict[str, Any] | None]: ...


@dataclass(frozen=True)
class EpisodeLimits:
    """The config an episode runs under."""

    max_model_len: int  # prompt + completion tokens (rollout.max_model_len)
    step_timeout_s: float  # each env call (env.step_timeout_s)
    replay_mask: bool = False  # record the top-p/top-k kept counts (rollout.replay_sampling_mask)
    replay_routing: bool = False  # record MoE routing (rollout.replay_routing, if the engine can)


def failed_sample(task: Any, error: str) -> Sample:
    """The sample of an episode the env failed: finish reason ``ENV_ERROR`` and the cause."""
    return Sample(
        prompt_ids=[],
        completion_ids=[],
        completion_mask=[],
        logprobs=[],
        versions=[],
        reward=0.0,
        finish_reason=ENV_ERROR,
        metrics={"env_error": 1.0},
        task_id=getattr(task, "task_id", ""),
        error=error[:2000],
    )


async def env_call(what: str, aw: Awaitable[Any], timeout_s: float) -> Any:
    """Await one environment call under ``env.step_timeout_s``; its failure is the env's."""
    try:
        return await asyncio.wait_for(aw, timeout=timeout_s)
    except TimeoutError:
        raise EnvFailure(f"{what} ran past env.step_timeout_s={timeout_s:g}s") from None
    except Exception as e:
        raise EnvFailure(f"{what} raised {type(e).__name__}: {e}") from e


async def close_env(env: Any, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(env.close(), timeout=timeout_s)
    except Exception:  # a failing close costs nothing but a log line
        log.exception("env.close failed")


def episode_seed(*parts: Any) -> int:
    """A per-turn sampling seed from the order's seed, order id, episode and turn."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def expand_versions(spans: Any, n: int, default: int) -> list[int]:
    """Per-token weight versions of a completion from vLLM's ``WeightVersionSpan``s."""
    if not spans:
        return [default] * n
    out = [default] * n
    for sp in spans:
        v = int(sp.version) if str(sp.version).lstrip("-").isdigit() else default
        for i in range(max(0, sp.start), min(n, sp.end)):
            out[i] = v
    return out


def encode_prompt(tokenizer: Any, prompt: Any, chat: ChatRenderer | None = None) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=False)
    return (chat or ChatRenderer(tokenizer)).prompt_ids(prompt)


async def run_episode(
    engine: EpisodeEngine,
    env: Env,
    order: WorkOrder,
    task: Any,
    index: int,
    limits: EpisodeLimits,
) -> Sample:
    """Episode ``index`` of ``order`` on ``task``: generate, let the env respond, append its
    observation, until done. Closes ``env``. Raises ``EnvFailure`` for the env's failures."""
    from climbrl.rollout import replay

    s = order.sampling
    tok = engine.tokenizer
    keep: list[int] = []
    routing: Routing | None = None
    try:
        prompt = await env_call("env.reset", env.reset(task), limits.step_timeout_s)
        try:
            tools = env.tools()
        except Exception as e:
            raise EnvFailure(f"env.tools raised {type(e).__name__}: {e}") from e
        chat = None if isinstance(prompt, str) else ChatRenderer(tok, tools)
        prompt_ids = encode_prompt(tok, prompt, chat)
        step_rewards: list[float] = []
        n_calls = n_call_errors = n_turns = 0
        ids: list[int] = []
        mask: list[int] = []
        lps: list[float] = []
        vers: list[int] = []
        reward, finish, text_all, info = 0.0, "length", "", {}
        max_len = limits.max_model_len
        for turn in range(max(1, env.max_turns)):
            room = max_len - len(prompt_ids) - len(ids)
            if room <= 0:
                finish = "context"
                break
            sp = replay.sampling_params(
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                max_tokens=min(s.max_tokens, room),
                logprobs=0,
                seed=None if s.seed is None else episode_seed(s.seed, order.order_id, index, turn),
                replay_mask=limits.replay_mask,
                replay_routing=limits.replay_routing,
            )
            out, rec = await engine.generate(prompt_ids + ids, sp)
            toks = list(out.token_ids)
            keep += replay.keep_list(rec, len(toks))
            if rec and rec.get("routing"):
                routing = Routing(**rec["routing"])  # the last turn's covers every position
            ids += toks
            mask += [1] * len(toks)
            lps += [lp[t].logprob for lp, t in zip(out.logprobs, toks)]
            vers += expand_versions(out.weight_versions, len(toks), engine.version)
            finish = out.finish_reason or "length"
            text = tok.decode(toks, skip_special_tokens=True)
            text_all += text
            content, calls, errors = parse_tool_calls(text)
            n_turns, n_calls, n_call_errors = (
                turn + 1,
                n_calls + len(calls),
                n_call_errors + len(errors),
            )
            turn_msg = Turn(
                text=text,
                content=content,
                tool_calls=tuple(calls),
                tool_call_errors=tuple(errors),
                finish_reason=finish,
                index=turn,
            )
            res = await env_call("env.respond", env.respond(turn_msg), limits.step_timeout_s)
            try:
                reward, info = float(res.reward), {k: float(v) for k, v in res.info.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise EnvFailure(f"env.respond returned a bad StepResult: {e}") from e
            if res.step_reward is not None:
                step_rewards.append(float(res.step_reward))
            if res.done:
                break
            if res.messages:
                if chat is None:
                    raise EnvFailure(
                        f"env {order.env!r} returned chat messages after a text prompt: "
                        "return chat messages from reset(), or use StepResult.observation"
                    )
                try:
                    obs = chat.continuation_ids(toks, res.messages)
                except Exception as e:
                    raise EnvFailure(
                        f"env messages could not be rendered: {type(e).__name__}: {e}"
                    ) from e
            elif res.observation:
                obs = tok.encode(res.observation, add_special_tokens=False)
            else:
                break
            if len(prompt_ids) + len(ids) + len(obs) >= max_len:
                finish = "context"
                break
            ids += obs
            keep += [0] * len(obs)
            mask += [0] * len(obs)
            lps += [0.0] * len(obs)
            vers += [-1] * len(obs)
    finally:
        await close_env(env, limits.step_timeout_s)
    return Sample(
        prompt_ids=prompt_ids,
        completion_ids=ids,
        completion_mask=mask,
        logprobs=lps,
        versions=vers,
        reward=reward,
        finish_reason=finish,
        text=text_all,
        metrics={
            **info,
            "turns": float(n_turns),
            "tool_calls": float(n_calls),
            "tool_call_errors": float(n_call_errors),
        },
        task_id=task.task_id,
        step_rewards=step_rewards,
        keep_counts=keep if any(keep) else [],
        routing=routing,
    )
