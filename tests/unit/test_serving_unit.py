"""Serving pieces without an engine: token-exact session rebasing, auth and version stamping
(ASGI middlewares over a fake app), and the engine wrapper over a fake engine."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from climbrl.serving.app import ApiKeyMiddleware, WeightVersionMiddleware
from climbrl.serving.capture import SessionStore, expand_versions


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from climbrl.envs.tasks import corpus_for_tokenizer
    from climbrl.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(
        corpus_for_tokenizer() + ["hello world again"] * 20,
        vocab_size=320,
        out_dir=tmp_path_factory.mktemp("tok"),
        min_frequency=1,
    )


def _chat(tok, msgs):
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def test_rebase_keeps_sampled_tokens_when_retokenisation_differs(tok):
    store = SessionStore(tok)
    s = store.open("a")
    p1 = _chat(tok, [{"role": "user", "content": "abcd="}])
    # The model sampled "aaaa" as single-byte tokens + <|im_end|>: a tokenisation BPE would
    # not produce from the text (it merges), which is exactly the drift to avoid.
    sampled = [tok.convert_tokens_to_ids(c) for c in "aaaa"] + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    assert tok.encode("aaaa", add_special_tokens=False) != sampled[:4]  # BPE would merge
    store.record(s, p1, False, sampled, [-0.1] * 5, [0] * 5, "stop", "aaaa")
    msgs = [
        {"role": "user", "content": "abcd="},
        {"role": "assistant", "content": "aaaa"},
        {"role": "user", "content": "again"},
    ]
    rendered = _chat(tok, msgs)
    ids, cont = store.rebase(s, rendered)
    assert cont
    assert ids[: len(p1) + 5] == p1 + sampled  # the sampled tokens, verbatim
    assert tok.decode(ids) == tok.decode(rendered)  # same text for the engine
    store.record(s, ids, cont, [5, 6], [-0.2, -0.3], [1, 1], "length", "xy")
    seg = s.segments[-1]
    assert seg.prompt_ids == p1 and s.drift == 0 and s.turns == 2
    assert seg.mask == [1] * 5 + [0] * (len(ids) - len(p1) - 5) + [1, 1]
    assert len(seg.completion_ids) == len(seg.mask) == len(seg.logprobs) == len(seg.versions)


def test_rebase_with_an_unrendered_stop_token(tok):
    store = SessionStore(tok)
    s = store.open("b")
    p1 = _chat(tok, [{"role": "user", "content": "abcd="}])
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    sampled = tok.encode("ab", add_special_tokens=False) + [eos]
    store.record(s, p1, False, sampled, [0.0] * len(sampled), [0] * len(sampled), "stop", "ab")
    rendered = _chat(
        tok,
        [
            {"role": "user", "content": "abcd="},
            {"role": "assistant", "content": "ab"},
            {"role": "user", "content": "more"},
        ],
    )
    ids, cont = store.rebase(s, rendered)
    assert cont and ids[: len(p1) + len(sampled)] == p1 + sampled


def test_edited_history_starts_a_new_segment(tok):
    store = SessionStore(tok)
    s = store.open("c")
    p1 = _chat(tok, [{"role": "user", "content": "abcd="}])
    store.record(s, p1, False, [7, 8], [0.0, 0.0], [0, 0], "length", "zz")
    rendered = _chat(tok, [{"role": "user", "content": "something else"}])
    ids, cont = store.rebase(s, rendered)
    assert ids == rendered and not cont
    store.record(s, ids, cont, [9], [0.0], [1], "stop", "q")
    assert s.drift == 1 and len(s.segments) == 2 and s.segments[-1].prompt_ids == rendered


def test_store_is_bounded(tok):
    store = SessionStore(tok, max_sessions=3)
    for i in range(5):
        store.open(str(i))
    assert list(store.sessions) == ["2", "3", "4"] and store.evicted == 2


def test_expand_versions():
    spans = [
        SimpleNamespace(version="3", start=0, end=2),
        SimpleNamespace(version="4", start=2, end=5),
    ]
    assert expand_versions(spans, 5, 0) == [3, 3, 4, 4, 4]
    assert expand_versions(None, 2, 7) == [7, 7]


# ---------------------------------------------------------------- ASGI middlewares


def _run_app(app, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _json_app(payload: dict, status: int = 200):
    async def app(scope, receive, send):
        raw = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    return app


def test_api_key_middleware():
    app = ApiKeyMiddleware(_json_app({"ok": 1}), ["k1", "k2"])
    st, _, body = _run_app(app, "/v1/models")
    assert st == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert _run_app(app, "/v1/models", {"Authorization": "Bearer nope"})[0] == 401
    assert _run_app(app, "/v1/models", {"Authorization": "Bearer k2"})[0] == 200
    assert _run_app(app, "/climbrl/pin")[0] == 401
    assert _run_app(app, "/health")[0] == 200  # liveness stays open


def test_version_middleware_stamps_json_and_sse():
    st, h, body = _run_app(
        WeightVersionMiddleware(_json_app({"id": "x"}), lambda: 5), "/v1/completions"
    )
    assert h["x-climbrl-weight-version"] == "5"
    assert json.loads(body) == {"id": "x", "climbrl_weight_version": 5}
    assert int(h["content-length"]) == len(body)
    # errors are passed through unchanged and unstamped
    st, h, body = _run_app(
        WeightVersionMiddleware(_json_app({"error": {}}, 400), lambda: 5), "/v1/completions"
    )
    assert st == 400 and "x-climbrl-weight-version" not in h and json.loads(body) == {"error": {}}

    async def sse(scope, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": b'data: {"a": 1}\n\ndata: {"a"',
                "more_body": True,
            }
        )
        await send(
            {"type": "http.response.body", "body": b": 2}\n\ndata: [DONE]\n\n", "more_body": False}
        )

    st, h, body = _run_app(WeightVersionMiddleware(sse, lambda: 2), "/v1/chat/completions")
    events = [e for e in body.split(b"\n\n") if e]
    assert h["x-climbrl-weight-version"] == "2"
    assert [json.loads(e[6:]) for e in events[:2]] == [
        {"a": 1, "climbrl_weight_version": 2},
        {"a": 2, "climbrl_weight_version": 2},
    ]
    assert events[2] == b"data: [DONE]"


# ---------------------------------------------------------------- engine wrapper, fake engine


class FakeEngine:
    """Yields one final output: tokens 10.., log-prob -0.5 each, version spans as given."""

    def __init__(self, spans):
        self.spans = spans
        self.seen: list[tuple[list[int], object]] = []

    async def generate(self, prompt, params, request_id, *args, session_id=None, **kw):
        self.seen.append((list(prompt["prompt_token_ids"]), params))
        n = params.max_tokens
        toks = list(range(10, 10 + n))
        out = SimpleNamespace(
            token_ids=toks,
            text="x" * n,
            finish_reason="length",
            logprobs=[{t: SimpleNamespace(logprob=-0.5)} for t in toks]
            if params.logprobs is not None
            else None,
            weight_versions=self.spans,
        )
        yield SimpleNamespace(
            outputs=[out], finished=True, prompt_token_ids=list(prompt["prompt_token_ids"])
        )


def test_engine_wrapper_records_sessions_and_versions(tok):
    from vllm.sampling_params import SamplingParams

    from climbrl.serving.capture import CURRENT_REQUEST, RequestInfo, instrument_engine

    eng = FakeEngine(
        [SimpleNamespace(version="1", start=0, end=1), SimpleNamespace(version="2", start=1, end=3)]
    )
    store = SessionStore(tok)
    instrument_engine(eng, store, lambda: 2)
    s = store.open("s")
    s.sampling = {"temperature": 0.7, "top_k": -1}

    async def go(session_id, ids):
        info = RequestInfo()
        CURRENT_REQUEST.set(info)
        sp = SamplingParams(max_tokens=3, temperature=1.3)
        outs = [
            o
            async for o in eng.generate(
                {"type": "token", "prompt_token_ids": ids}, sp, "r", session_id=session_id
            )
        ]
        return info, outs, sp

    info, outs, sp = asyncio.run(go("s", [1, 2]))
    assert sp.temperature == 0.7 and sp.top_k == 0 and sp.logprobs == 0  # run's sampling
    assert info.versions == {1, 2} and info.last_version == 2
    seg = s.segments[-1]
    assert seg.prompt_ids == [1, 2] and seg.completion_ids == [10, 11, 12]
    assert seg.logprobs == [-0.5] * 3 and seg.versions == [1, 2, 2] and s.turns == 1
    # a request without a session is not recorded and its sampling is untouched
    info, outs, sp = asyncio.run(go(None, [3]))
    assert sp.temperature == 1.3 and sp.logprobs is None and len(store.sessions) == 1
    # a finished session refuses more turns
    s.finished.set()
    with pytest.raises(ValueError, match="already has a reward"):
        asyncio.run(go("s", [1, 2]))
