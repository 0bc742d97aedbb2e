"""A black-box agent written only against the official `openai` client, trained by climbrl.

    climbrl run examples/openai_agent.toml

The agent knows nothing about climbrl except two conventions of the endpoint it is given:
send its requests with the ``X-Session-ID`` header, and post the episode's reward to
``{base_url}/climbrl/sessions/{session_id}/reward``. climbrl records every request of the
session token-exactly and trains on it like on any other trajectory.

The task is ``copy_first`` (answer with the first letter of the prompt, repeated). The agent
asks the model, and grades the answer itself: each of the first four characters scores 1 if it
is the first letter of the prompt and 0.25 if it is another letter.

Run alone (as a subprocess agent climbrl sets these variables):
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=k CLIMBRL_MODEL=m \\
    CLIMBRL_SESSION_ID=s1 CLIMBRL_TASK='{"prompt": "abcd="}' python examples/openai_agent.py
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from openai import AsyncOpenAI


def grade(prompt: str, answer: str, letters: str = "abcdefgh", n: int = 4) -> float:
    target = prompt[0]
    head = answer[:n]
    return sum(1.0 if c == target else 0.25 if c in letters else 0.0 for c in head) / n


_clients: dict[tuple[str, str], AsyncOpenAI] = {}


def client_for(base_url: str, api_key: str) -> AsyncOpenAI:
    """One client (one connection pool) per endpoint, shared by the agent's episodes."""
    key = (base_url, api_key)
    if key not in _clients:
        _clients[key] = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    return _clients[key]


async def run(
    task: dict[str, Any], base_url: str, api_key: str, model: str, session_id: str
) -> float:
    client = client_for(base_url, api_key)
    session = {"X-Session-ID": session_id}
    r = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": task["prompt"]}],
        max_tokens=4,
        extra_headers=session,
    )
    answer = r.choices[0].message.content or ""
    reward = grade(task["prompt"], answer)
    await client.post(
        f"/climbrl/sessions/{session_id}/reward",
        cast_to=object,
        body={"reward": reward, "metrics": {"correct": float(answer[:1] == task["prompt"][0])}},
    )
    return reward


if __name__ == "__main__":
    reward = asyncio.run(
        run(
            task=json.loads(os.environ["CLIMBRL_TASK"]),
            base_url=os.environ["OPENAI_BASE_URL"],
            api_key=os.environ["OPENAI_API_KEY"],
            model=os.environ["CLIMBRL_MODEL"],
            session_id=os.environ["CLIMBRL_SESSION_ID"],
        )
    )
    print(f"reward {reward:.3f}")
