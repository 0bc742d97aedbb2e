"""Black-box agent capture: requests that carry a session id become a trainable trajectory.

vLLM's OpenAI layer already reads a session id from the ``X-Session-ID`` header, the
``session_id`` body field or ``vllm_xargs.session_id`` and hands it to ``engine.generate``.
`instrument_engine` wraps that one method, so everything else (chat templates, tool parsing,
streaming) stays vLLM's own. For a request with a session id it records, token-exactly:

- the prompt token ids the engine actually saw and the sampled completion ids;
- the sampler's log-prob of every sampled token (the engine runs with ``processed_logprobs``);
- the weight version of every sampled token (vLLM's ``WeightVersionSpan``s).

Token-exact multi-turn: the agent sends the whole conversation again each turn, and the chat
template re-renders the earlier assistant turns from text, which may tokenise differently from
what was sampled. Before the request reaches the engine, the rendered prompt is rebased onto
the session's recorded tokens: if the text of the recorded tokens is a prefix of the rendered
prompt's text at a token boundary, the engine gets ``recorded + rendered[boundary:]``. When the
history was edited (the text no longer matches), the session starts a new segment and counts a
``drift``; the trajectory is the last segment, so no token the model did not see is trained on.

A reward is posted for the session (``POST /climbrl/sessions/{id}/reward``), which finishes it.

The store is bounded. A session a training episode opened is *held* (``open(sid, held=True)``)
until the episode pops it: nothing evicts it. Other sessions (any client's) count against
``max_sessions``, the oldest evicted first, and each is dropped ``max_age_s`` after it opened.
A session takes at most ``max_turns`` requests and records at most ``max_bytes``; a request
past either is refused (``SessionLimitError``, a 400 for the client).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Per HTTP request: what the engine did for it (set by the ASGI middleware in serving.app).
CURRENT_REQUEST: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "climbrl_request", default=None
)


@dataclass
class RequestInfo:
    """Weight versions of the tokens one HTTP request produced."""

    versions: set[int] = field(default_factory=set)
    last_version: int | None = None


@dataclass
class Segment:
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


# recorded bytes per token: id, log-prob, version and mask, as Python objects in lists
BYTES_PER_TOKEN = 32


class SessionLimitError(ValueError):
    """A request past a session's bounds (turns, bytes)."""


@dataclass
class Session:
    session_id: str
    created: float = field(default_factory=time.time)
    held: bool = False  # opened by a training episode: never evicted
    nbytes: int = 0  # what its segments record, about (BYTES_PER_TOKEN per token + text)
    segments: list[Segment] = field(default_factory=list)
    turns: int = 0
    drift: int = 0
    finish_reason: str = ""
    text: str = ""
    reward: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    busy: bool = False
    last_text: str = ""
    # Training sessions: the run's sampling overrides the agent's, so that the sampler's
    # log-probs are the ones the learner recomputes.
    sampling: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        seg = self.segments[-1] if self.segments else Segment([])
        return {
            "session_id": self.session_id,
            "turns": self.turns,
            "drift": self.drift,
            "segments": len(self.segments),
            "prompt_ids": seg.prompt_ids,
            "completion_ids": seg.completion_ids,
            "completion_mask": seg.mask,
            "logprobs": seg.logprobs,
            "versions": seg.versions,
            "finish_reason": self.finish_reason,
            "reward": self.reward,
            "metrics": self.metrics,
            "finished": self.finished.is_set(),
        }


class SessionStore:
    """Sessions by id, bounded (module docstring): held sessions are never evicted; the others
    number at most ``max_sessions`` and live at most ``max_age_s``."""

    def __init__(
        self,
        tokenizer: Any,
        max_sessions: int = 1024,
        max_turns: int = 256,
        max_bytes: int = 8 << 20,
        max_age_s: float = 3600.0,
    ):
        self.tokenizer = tokenizer
        self.max_sessions = max_sessions
        self.max_turns = max_turns
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.sessions: dict[str, Session] = {}
        self._unheld: dict[str, None] = {}  # ids of sessions not held, oldest first
        self.evicted = 0

    def get(self, sid: str) -> Session | None:
        return self.sessions.get(sid)

    def open(self, sid: str, held: bool = False) -> Session:
        """The session ``sid``, created if new; ``held`` (a training episode's) keeps it from
        eviction until ``pop``."""
        s = self.sessions.get(sid)
        if s is not None:
            if held and not s.held:
                s.held = True
                self._unheld.pop(sid, None)
            return s
        if not held:
            self._evict(time.time())
        s = self.sessions[sid] = Session(sid, held=held)
        if not held:
            self._unheld[sid] = None
        return s

    def _evict(self, now: float) -> None:
        """Drop expired unheld sessions, then the oldest until one more fits."""
        for sid in list(self._unheld):
            if now - self.sessions[sid].created <= self.max_age_s:
                break  # oldest first: the rest are younger
            self._drop(sid)
        while len(self._unheld) >= self.max_sessions:
            self._drop(next(iter(self._unheld)))

    def _drop(self, sid: str) -> None:
        self._unheld.pop(sid, None)
        self.sessions.pop(sid, None)
        self.evicted += 1

    def pop(self, sid: str) -> Session | None:
        self._unheld.pop(sid, None)
        return self.sessions.pop(sid, None)

    def check_room(self, sess: Session, prompt_tokens: int) -> None:
        """SessionLimitError if one more request of ``prompt_tokens`` would pass the bounds."""
        if sess.turns >= self.max_turns:
            raise SessionLimitError(
                f"session {sess.session_id!r} has had {sess.turns} "
                f"requests, the most one session takes "
                "(serve.session_max_turns): start a new one"
            )
        if sess.nbytes + prompt_tokens * BYTES_PER_TOKEN > self.max_bytes:
            raise SessionLimitError(
                f"session {sess.session_id!r} would record more than "
                f"{self.max_bytes} bytes (serve.session_max_mb): start a "
                "new one"
            )

    # ---------------------------------------------------------------- token-exact rebasing

    def rebase(self, sess: Session, rendered: list[int]) -> tuple[list[int], bool]:
        """Return (prompt ids for the engine, continues_last_segment)."""
        if not sess.segments:
            return rendered, False
        prev = sess.segments[-1].tokens
        if rendered[: len(prev)] == prev:
            return rendered, True
        j = self._boundary(prev, rendered)
        if j is None and prev and prev[-1] in self._special_ids():
            # The sampled stop token (e.g. EOS) that the template does not render: keep it,
            # since the model did sample it, and continue after the text before it.
            j = self._boundary(prev[:-1], rendered)
        if j is None:
            return rendered, False
        return prev + rendered[j:], True

    def _special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []) or [])

    def _boundary(self, prev: list[int], rendered: list[int]) -> int | None:
        """Smallest j with decode(rendered[:j]) == decode(prev), or None."""
        dec = self.tokenizer.decode
        target = dec(prev, skip_special_tokens=False)
        full = dec(rendered, skip_special_tokens=False)
        if not full.startswith(target):
            return None
        # decode(rendered[:j]) only grows with j: binary-search the first j whose text is as
        # long as the target, then check the few j around it (a multi-byte character can
        # straddle tokens). O(log n) decodes, not one per candidate boundary.
        lo, hi = 0, len(rendered)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(dec(rendered[:mid], skip_special_tokens=False)) < len(target):
                lo = mid + 1
            else:
                hi = mid
        for j in range(max(0, lo - 2), min(len(rendered), lo + 3) + 1):
            if dec(rendered[:j], skip_special_tokens=False) == target:
                return j
        return None

    def record(
        self,
        sess: Session,
        prompt_ids: list[int],
        continues: bool,
        token_ids: list[int],
        logprobs: list[float],
        versions: list[int],
        finish_reason: str,
        text: str,
    ) -> None:
        if continues:
            seg = sess.segments[-1]
            added = prompt_ids[len(seg.tokens) :]
            seg.completion_ids += added
            seg.mask += [0] * len(added)
            seg.logprobs += [0.0] * len(added)
            seg.versions += [-1] * len(added)
        else:
            if sess.segments:
                sess.drift += 1
            seg = Segment(list(prompt_ids))
            sess.segments.append(seg)
        seg.completion_ids += token_ids
        seg.mask += [1] * len(token_ids)
        seg.logprobs += logprobs
        seg.versions += versions
        sess.nbytes = (
            sum(len(g.tokens) for g in sess.segments) * BYTES_PER_TOKEN
            + len(sess.text.encode())
            + len(text.encode())
        )
        sess.turns += 1
        sess.finish_reason = finish_reason
        sess.text += text
        sess.last_text = text


def expand_versions(spans: Any, n: int, default: int) -> list[int]:
    """vLLM ``WeightVersionSpan``s over output-token indexes -> one version per token."""
    out = [default] * n
    for sp in spans or []:
        v = int(sp.version) if str(sp.version).lstrip("-").isdigit() else default
        for i in range(max(0, sp.start), min(n, sp.end)):
            out[i] = v
    return out


def instrument_engine(engine: Any, store: SessionStore, current_version: Callable[[], int]) -> None:
    """Wrap ``engine.generate`` to record sessions and per-request weight versions.

    ``current_version()`` returns the engine's weight version now (an int)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    orig = engine.generate
    if getattr(orig, "_climbrl_wrapped", False):
        return

    async def generate(
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *args: Any,
        session_id: str | None = None,
        **kw: Any,
    ) -> Any:
        info = CURRENT_REQUEST.get()
        # sess: the session this request records into, None when it records nothing
        sess = store.open(session_id) if session_id else None
        if not isinstance(sampling_params, SamplingParams):
            sess = None
        continues = False
        if sess is not None:
            if sess.finished.is_set():
                raise ValueError(f"session {session_id!r} already has a reward; start a new one")
            if sess.busy:
                raise ValueError(
                    f"session {session_id!r} has a request in flight; a session "
                    "is one conversation, send its turns one at a time"
                )
            if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                store.check_room(sess, len(prompt["prompt_token_ids"]))
                ids, continues = store.rebase(sess, list(prompt["prompt_token_ids"]))
                prompt = {**prompt, "prompt_token_ids": ids}
            else:
                sess = None
        if sess is not None:
            sess.busy = True
            if sampling_params.logprobs is None:
                sampling_params.logprobs = 0  # the response shows them only if asked
            for k, v in (sess.sampling or {}).items():
                setattr(sampling_params, k, 0 if k == "top_k" and v < 0 else v)
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        toks: list[int] = []
        lps: list[float] = []
        text: list[str] = []
        final = None
        try:
            async for out in orig(
                prompt, sampling_params, request_id, *args, session_id=session_id, **kw
            ):
                if info is not None:
                    info.last_version = current_version()
                    info.versions.add(info.last_version)
                if sess is not None and out.outputs:
                    o = out.outputs[0]
                    if delta:
                        toks += list(o.token_ids)
                        text.append(o.text)
                        if o.logprobs:
                            lps += [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]
                    else:
                        toks = list(o.token_ids)
                        text = [o.text]
                        if o.logprobs:
                            lps = [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]
                final = out
                yield out
        finally:
            if sess is not None:
                sess.busy = False
        if final is None or not final.outputs:
            return
        o = final.outputs[0]
        vers = expand_versions(
            o.weight_versions, len(o.token_ids) if not delta else len(toks), current_version()
        )
        if info is not None and o.weight_versions:
            info.versions.update(vers)
            info.last_version = vers[-1] if vers else info.last_version
        if sess is not None and final.finished:
            store.record(
                sess,
                list(final.prompt_token_ids or prompt["prompt_token_ids"]),
                continues,
                toks,
                lps if len(lps) == len(toks) else [0.0] * len(toks),
                vers,
                o.finish_reason or "",
                "".join(text),
            )

    generate._climbrl_wrapped = True  # type: ignore[attr-defined]
    engine.generate = generate
