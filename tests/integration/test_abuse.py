"""Load and abuse, on loopback, for a bounded number of calls: the learner's hub with a live
rollout server behind it, and a live `climbrl serve`, flooded with malformed frames, oversized
frames, fake Hellos, unauthenticated HTTP calls, huge bodies, oversized requests and many
sessions. Every bad call is refused (nothing gets through the wire; HTTP answers 4xx with an
OpenAI-style error), the processes stay up with bounded memory, and every work order's
trajectory comes back from the real server, none lost and none forged.

The default suite floods the session-wide engines (conftest ``rollout_server`` and
``serve_server``) a little; ``slow`` floods a whole `climbrl run` (learner, rollout server
serving its OpenAI API) while it trains, and the serve engine a lot more.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import zmq

from climbrl.wire import (
    Codec,
    Error,
    Heartbeat,
    Hello,
    Sample,
    SamplingSpec,
    Trajectory,
    WorkOrder,
)
from climbrl.wirekeys import PLAIN_USER, RunKeys, secure_client
from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.integration

KEY = "sk-climbrl-test"  # tests/integration/test_serving.KEY
UNAUTH_PATHS = [
    "/invocations",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/generative_scoring",
    "/scale_elastic_ep",
    "/climbrl/pin",
    "/v1/climbrl/sessions/s/reward",
    "/metrics",
    "/tokenize",
    "/openapi.json",
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def group_rss_mb(pgid: int) -> float:
    from tests.conftest import group_pids

    return sum(rss_mb(p) for p in group_pids(pgid))


# ---------------------------------------------------------------- the wire


def _forged_traj(order_id: str, server_id: str) -> list:
    s = Sample(
        prompt_ids=[1],
        completion_ids=[2],
        completion_mask=[1],
        logprobs=[0.0],
        versions=[0],
        reward=1e9,
        finish_reason="stop",
    )
    return Codec.encode(
        Trajectory(
            order_id=order_id,
            server_id=server_id,
            policy_version=0,
            samples=[s],
            gen_seconds=0.0,
            num_generated_tokens=1,
        )
    )


def flood_wire(
    endpoint: str,
    keys: RunKeys,
    curve: bool,
    rounds: int,
    order_ids: list[str],
    oversized_bytes: int,
    stop: threading.Event,
) -> dict[str, int]:
    """From a thread: peers without the run's credentials, and peers with them (a process of
    the same user that can read the key file) sending what a rollout server never sends."""
    ctx = zmq.Context()
    sent = {"unauthenticated": 0, "authenticated": 0}
    try:

        def dealer(ident: bytes, how: str) -> zmq.Socket:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 10_000)
            s.setsockopt(zmq.IDENTITY, ident)
            if how == "run":
                secure_client(s, keys, curve)
            elif how == "guess":
                s.plain_username = PLAIN_USER.encode()
                s.plain_password = b"0" * 64
            s.connect(endpoint)
            return s

        def send(s: zmq.Socket, frames: list) -> None:
            try:
                s.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # its queue is full: ZeroMQ holds back this sender
                pass

        outsiders = [dealer(b"r0", "none"), dealer(b"r0", "guess"), dealer(b"evil", "none")]
        insider = dealer(b"mallory", "run")
        hello_r0 = Codec.encode(
            Hello(
                server_id="r0",
                pid=1,
                hostname="evil",
                policy_version=0,
                model="m",
                max_concurrency=1,
            )
        )
        garbage = [
            [b"\xde\xad"],
            [b"traj", b"\x00garbage"],
            [b"work", b"x"],
            [b"hello", b""],
            [b"hello", b"\x81\xa6schema\xcd\xff\xff"],
        ]
        for i in range(rounds):
            if stop.is_set():
                break
            oid = order_ids[i % len(order_ids)] if order_ids else "o"
            for s in outsiders:  # refused in the handshake: none of this reaches the hub
                send(s, hello_r0)
                send(s, _forged_traj(oid, "r0"))
                send(s, garbage[i % len(garbage)])
                sent["unauthenticated"] += 3
            for frames in (
                hello_r0,  # names r0 from another routing id
                _forged_traj(oid, "r0"),  # a forged trajectory for a real order
                _forged_traj(oid, "mallory"),  # from a server that never said Hello
                Codec.encode(
                    Heartbeat(
                        server_id="mallory", policy_version=0, inflight=0, run_id="another-run"
                    )
                ),
                garbage[i % len(garbage)],
            ):
                send(insider, frames)
                sent["authenticated"] += 1
        # one frame over the hub's size cap: the hub drops the connection as it reads it
        if oversized_bytes:
            big = ctx.socket(zmq.DEALER)
            big.setsockopt(zmq.LINGER, 0)
            secure_client(big, keys, curve)
            big.connect(endpoint)
            big.send_multipart([b"traj", bytes(oversized_bytes)], copy=False)
            sent["authenticated"] += 1
            time.sleep(1.0)  # let ZeroMQ start writing it before the context closes
    finally:
        ctx.destroy(linger=0)
    return sent


def test_wire_flood_loses_and_forges_no_trajectory(rollout_server):
    """A real rollout server runs work orders while the hub is flooded: every order's
    trajectory comes back, from the real server, and nothing else gets through."""
    rs = rollout_server
    hub = rs["hub"]
    while hub.recv(0.2) is not None:  # what earlier tests left
        pass
    rejected0, rss0 = hub.rejected, rss_mb(os.getpid())
    tag = uuid.uuid4().hex[:6]
    orders = [
        WorkOrder(
            order_id=f"abuse-{tag}-{i}",
            policy_version=0,
            env="copy_first",
            task_index=i,
            group_size=2,
            sampling=SamplingSpec(temperature=1.0, max_tokens=4, seed=1),
        )
        for i in range(6)
    ]
    stop = threading.Event()
    result: dict = {}
    flooder = threading.Thread(
        target=lambda: result.update(
            flood_wire(
                hub.endpoint,
                hub.keys,
                hub.curve,
                rounds=300,
                order_ids=[o.order_id for o in orders],
                oversized_bytes=257 << 20,
                stop=stop,
            )
        )
    )
    flooder.start()
    for o in orders:
        hub.send(rs["server_id"], o)
    got: dict[str, Trajectory] = {}
    others = []
    deadline = time.monotonic() + 300
    while len(got) < len(orders) and time.monotonic() < deadline:
        item = hub.recv(0.5)
        if item is None:
            continue
        sid, msg = item[0], item[1]
        if isinstance(msg, Trajectory) and msg.order_id.startswith(f"abuse-{tag}"):
            assert sid == "r0" and msg.server_id == "r0"
            assert msg.order_id not in got, "a trajectory arrived twice"
            got[msg.order_id] = msg
        elif not isinstance(msg, Error | Hello):
            others.append((sid, type(msg).__name__))
    flooder.join(timeout=120)
    stop.set()
    assert not flooder.is_alive()
    assert sorted(got) == sorted(o.order_id for o in orders), "a trajectory was lost"
    for tr in got.values():  # the real server's episodes, not the forged 1e9 rewards
        assert len(tr.samples) == 2 and all(s.reward < 1e9 for s in tr.samples)
    assert all(sid == "r0" for sid, _ in others), others  # nothing from the flooders
    assert hub.servers.keys() == {"r0"} and hub.servers["r0"].hostname != "evil"
    assert hub.rejected - rejected0 >= result["authenticated"] // 2  # refused, and counted
    assert hub.inbox.qsize() <= hub.inbox.maxsize
    assert rss_mb(os.getpid()) - rss0 < 512  # the oversized frame was never buffered
    assert rs["proc"].poll() is None and hub._thread.is_alive()


# ---------------------------------------------------------------- HTTP


def flood_http(url: str, rounds: int, sessions: int, workers: int = 4) -> dict[int, int]:
    """Bad calls of every kind, and ``sessions`` one-turn sessions; returns status -> count.
    Every bad call must be answered with a 4xx OpenAI-style error."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def note(r: httpx.Response) -> None:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        assert r.json()["error"]["message"], r.text[:300]
        with lock:
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(rounds):
            for path in UNAUTH_PATHS:
                note(c.post(path, json={"model": "tiny", "prompt": "a"}))
            note(c.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer x"}))
            note(
                c.post(
                    "/v1/completions",
                    content=b"{" + b" " * (2 << 20) + b"}",
                    headers={**h, "content-type": "application/json"},
                )
            )
            note(
                c.post(
                    "/v1/completions",
                    json={"model": "tiny", "prompt": "a", "n": 16384, "max_tokens": 1},
                    headers=h,
                )
            )
            note(
                c.post(
                    "/invocations",
                    json={"model": "tiny", "prompt": "a", "max_tokens": 10**9},
                    headers=h,
                )
            )
            note(c.post("/v1/completions", content=b"\x00not json", headers=h))

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)

    def one_session(i: int) -> str:
        sid = f"flood-{i}-{uuid.uuid4().hex[:6]}"
        client.completions.create(
            model="tiny", prompt="abc=", max_tokens=1, extra_headers={"X-Session-ID": sid}
        )
        return sid

    with ThreadPoolExecutor(workers) as pool:
        sids = list(pool.map(one_session, range(sessions)))
    statuses["sessions"] = len(sids)
    return statuses


def test_http_flood_is_refused_and_serving_goes_on(serve_server):
    srv = serve_server
    url = srv["url"]
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    first = "keep-" + uuid.uuid4().hex[:6]
    c.completions.create(
        model="tiny", prompt="abc=", max_tokens=2, extra_headers={"X-Session-ID": first}
    )
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/climbrl/sessions/{first}", headers=h).status_code == 200
    rss0 = group_rss_mb(srv["proc"].pid)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="serve.max_n"):
        c.completions.create(model="tiny", prompt="a", n=100, max_tokens=1)
    statuses = flood_http(url, rounds=3, sessions=80)  # 80 > --max-sessions 64
    assert set(statuses) == {400, 401, 413, "sessions"}, statuses
    assert statuses[401] == 3 * (len(UNAUTH_PATHS) + 1)
    # the oldest sessions were evicted: the store stays at its bound
    assert httpx.get(f"{url}/climbrl/sessions/{first}", headers=h).status_code == 404
    # still serving, and still answering correctly
    assert srv["proc"].poll() is None
    assert httpx.get(url + "/health").status_code == 200
    r = c.completions.create(model="tiny", prompt="abcd=", max_tokens=3, temperature=0.0)
    assert r.choices[0].text is not None and r.usage.completion_tokens >= 1
    assert group_rss_mb(srv["proc"].pid) - rss0 < 512


@pytest.mark.slow
def test_http_flood_large(serve_server):
    url = serve_server["url"]
    rss0 = group_rss_mb(serve_server["proc"].pid)
    statuses = flood_http(url, rounds=60, sessions=1000, workers=8)
    assert statuses["sessions"] == 1000 and statuses[401] == 60 * (len(UNAUTH_PATHS) + 1)
    assert serve_server["proc"].poll() is None
    assert httpx.get(url + "/health").status_code == 200
    assert group_rss_mb(serve_server["proc"].pid) - rss0 < 1024


# ---------------------------------------------------------------- a whole run, flooded


@pytest.mark.slow
def test_a_training_run_flooded_on_both_sides_trains_every_step(tiny_model, tmp_path):
    """`climbrl run` with its OpenAI API on: its learner's socket and its HTTP endpoint are
    flooded while it trains; every step trains a full batch from the real server."""
    out = tmp_path / "out"
    steps = 6
    cfg = write_config(
        tmp_path / "cfg.toml",
        tiny_model,
        out,
        learner={"total_steps": steps, "batch_groups": 2, "group_size": 2, "eval_size": 4},
        rollout={"max_model_len": 128, "kv_cache_gb": 0.25, "max_tokens": 4},
        serve={"enabled": True, "max_sessions": 32},
    )
    stop = threading.Event()
    report: dict = {}

    def attacker() -> None:
        ep = out / "endpoint"
        deadline = time.monotonic() + 600
        while not (ep.exists() and (out / "serving" / "r0.json").exists()):
            if stop.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.5)
        endpoint = ep.read_text().strip()
        keys = RunKeys.parse((out / "wire_keys.json").read_text(), "keys")
        report["wire"] = flood_wire(
            endpoint, keys, False, rounds=2000, order_ids=[], oversized_bytes=257 << 20, stop=stop
        )
        info = json.loads((out / "serving" / "r0.json").read_text())
        key = (out / "serving" / "api_key").read_text().strip()
        base = info["url"].removesuffix("/v1")
        with httpx.Client(base_url=base, timeout=60) as c:
            report["http"] = [c.post(p, json={}).status_code for p in UNAUTH_PATHS]
            report["pin"] = c.post("/climbrl/pin", json={"version": None}).status_code
            report["huge"] = c.post(
                "/v1/completions",
                content=b"x" * (20 << 20),
                headers={"Authorization": f"Bearer {key}"},
            ).status_code

    t = threading.Thread(target=attacker)
    t.start()
    try:
        rc = run_cli(["run", str(cfg)], tmp_path / "run.log", timeout=1200)
    finally:
        stop.set()
        t.join(timeout=120)
    log = (tmp_path / "run.log").read_text()
    assert rc == 0, log[-4000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r["trained_seqs"] for r in recs if "trained_seqs" in r]
    assert len(trained) == steps and all(len(t) == 2 for t in trained), trained
    # every prompt trained once: nothing lost, nothing trained twice
    flat = [q for t in trained for q in t]
    assert len(set(flat)) == len(flat) == 2 * steps
    assert "wire" in report and report["http"] == [401] * len(UNAUTH_PATHS), report
    assert report["pin"] == 401 and report["huge"] == 413
