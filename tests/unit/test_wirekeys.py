"""Wire credentials per run: the learner's hub admits only peers holding the run's CURVE
client key (off loopback) or secret (PLAIN, on loopback)."""

from __future__ import annotations

import json
import stat
import types

import pytest
import zmq

from climbrl.learner.hub import LearnerHub
from climbrl.wire import Hello
from climbrl.wirekeys import (
    ENV_VAR,
    FILE_NAME,
    RunKeys,
    curve_enabled,
    learner_keys,
    rollout_keys,
    secure_client,
)
from tests.unit.test_hub import _hello


def _wire(host="127.0.0.1", curve="auto"):
    return types.SimpleNamespace(host=host, curve=curve)


def test_curve_is_on_off_loopback_and_forced_by_config():
    assert not curve_enabled(_wire("127.0.0.1")) and not curve_enabled(_wire("localhost"))
    assert not curve_enabled(_wire("::1"))
    assert curve_enabled(_wire("0.0.0.0")) and curve_enabled(_wire("10.1.2.3"))
    assert curve_enabled(_wire("127.0.0.1", "on")) and not curve_enabled(_wire("10.1.2.3", "off"))


def test_keys_are_generated_once_per_run_private_and_shared_with_rollouts(tmp_path, monkeypatch):
    k = learner_keys(_wire(), tmp_path)  # loopback too: PLAIN with the run's secret
    assert len(k.secret) == 64
    f = tmp_path / FILE_NAME
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert learner_keys(_wire("0.0.0.0"), tmp_path) == k  # a resumed run keeps them
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert rollout_keys(_wire("0.0.0.0"), tmp_path) == k
    other = RunKeys.generate()
    monkeypatch.setenv(ENV_VAR, other.client_json())  # placed elsewhere: from the env,
    got = rollout_keys(_wire("0.0.0.0"), tmp_path)  # without the learner's secret
    assert "server_secret" not in json.loads(other.client_json()) and got.server_secret == ""
    assert (got.server_public, got.client_public, got.client_secret, got.secret) == (
        other.server_public,
        other.client_public,
        other.client_secret,
        other.secret,
    )
    monkeypatch.setenv(ENV_VAR, json.dumps(other.__dict__))  # the whole file works too
    assert rollout_keys(_wire("0.0.0.0"), tmp_path) == other
    with pytest.raises(ValueError, match="wire key file .*server_secret"):  # only a server
        RunKeys.parse(other.client_json(), "keys")  # needs its secret
    monkeypatch.setenv(ENV_VAR, '{"server_public": "x"}')
    with pytest.raises(ValueError, match="not a climbrl wire key file"):
        rollout_keys(_wire("0.0.0.0"), tmp_path)
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(RuntimeError, match="start the learner first"):
        rollout_keys(_wire("0.0.0.0"), tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match="start the learner first"):  # loopback too
        rollout_keys(_wire(), tmp_path / "elsewhere")


def _peer(ctx, hub, sid, keys=None, server_public=None):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, sid.encode())
    if keys is not None:
        secure_client(s, keys, curve=True)
        if server_public:
            s.curve_serverkey = server_public.encode()
    s.connect(hub.endpoint)
    s.send_multipart(_hello(sid))
    return s


def test_hub_refuses_peers_without_the_run_key():
    keys = RunKeys.generate()
    hub = LearnerHub("127.0.0.1", 0, heartbeat_s=0.2, keys=keys, curve=True)
    ctx = zmq.Context()
    try:
        peers = [
            _peer(ctx, hub, "plain"),  # no key at all
            _peer(ctx, hub, "stranger", RunKeys.generate(), keys.server_public),
        ]  # other run
        assert hub.recv(3.0) is None  # neither got a message through
        client = RunKeys.parse(keys.client_json(), "env", client_only=True)
        peers.append(_peer(ctx, hub, "r0", client))  # the client view is enough
        item = hub.recv(10.0)
        assert item is not None and item[0] == "r0" and isinstance(item[1], Hello)
        assert hub.alive_servers() == ["r0"]
    finally:
        ctx.destroy(linger=0)
        hub.close()
