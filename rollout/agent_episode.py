"""One black-box agent episode: ``run_agent_episode``.

A black-box env (``black_box = True``, e.g. ``climbrl.envs.agent`` or the verifiers adapter)
runs its own agent against this server's OpenAI endpoint (``climbrl.rollout.http_api``) with
any OpenAI client. The episode opens a capture session on the endpoint (held, so no flood of
other sessions evicts it), hands the agent its base URL, key, model and session id
(``X-Session-ID``), and takes the sample from what the session captured: the token ids, masks,
log-probs and versions of the last segment. The reward comes from ``env.score`` on the last
reply (``reward_mode = "env"``) or from the agent's own POST to the session's reward route.

An agent that fails, makes no request or posts no reward raises ``EnvFailure``: it costs this
episode only.

Tests: ``pytest tests/unit/test_agent_env.py tests/integration/test_custom_env.py``.
"""

from __future__ import annotations

import uuid
from typing import Any

from climbrl.rollout.episode import EnvFailure, close_env, env_call
from climbrl.rollout.http_api import HttpApi
from climbrl.wire import Sample, WorkOrder


async def run_agent_episode(
    api: HttpApi,
    env: Any,
    order: WorkOrder,
    task: Any,
    index: int,
    step_timeout_s: float,
) -> Sample:
    """Episode ``index`` of ``order``: a session on ``api`` for the env's agent. Closes
    ``env``; ``step_timeout_s`` bounds ``env.score`` and ``env.close`` (env.step_timeout_s), the
    agent's run is bounded by its own ``timeout_s``."""
    from climbrl.envs.agent import AgentContext

    s = order.sampling
    sid = f"{order.order_id}-{index}-{uuid.uuid4().hex[:8]}"
    sess = api.sessions.open(sid, held=True)
    sess.sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k}
    ctx = AgentContext(
        base_url=api.url + "/v1",
        api_key=api.agent_key,
        model=api.served_name,
        session_id=sid,
    )
    try:
        run = env.run_agent(task, ctx)
        try:
            await run
        except Exception as e:
            raise EnvFailure(f"agent failed: {type(e).__name__}: {e}") from e
        if sess.turns == 0:
            raise ValueError(
                f"agent {env.agent!r} made no request in session {sid}: send "
                "requests with the X-Session-ID header it was given"
            )
        if env.reward_mode == "env":
            res = await env_call("env.score", env.score(task, sess.last_text), step_timeout_s)
            sess.reward, sess.metrics = float(res.reward), dict(res.info)
        elif not sess.finished.is_set():
            raise ValueError(
                f"agent {env.agent!r} returned without posting a reward for "
                f"session {sid} (POST /v1/climbrl/sessions/{sid}/reward)"
            )
    except ValueError as e:
        raise EnvFailure(str(e)) from e
    finally:
        api.sessions.pop(sid)
        await close_env(env, step_timeout_s)
    seg = sess.segments[-1]
    return Sample(
        prompt_ids=seg.prompt_ids,
        completion_ids=seg.completion_ids,
        completion_mask=seg.mask,
        logprobs=seg.logprobs,
        versions=seg.versions,
        reward=float(sess.reward),
        finish_reason=sess.finish_reason or "stop",
        text=sess.text,
        metrics={
            **sess.metrics,
            "agent_turns": float(sess.turns),
            "agent_drift": float(sess.drift),
        },
        task_id=task.task_id,
    )
