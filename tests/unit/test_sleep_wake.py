"""Colocated placement with vLLM's sleep mode (``placement.sleep_level``): the learner puts
every rollout engine to sleep for its step and wakes it before the weight update, waiting for
each server's heartbeat to say so; level 2 makes that update a full sync."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from climbrl.config import load_config
from climbrl.learner.learner import Learner, LearnerError
from climbrl.wire import Control


class Hub:
    """Servers that do what they are told (or, ``stuck``, never answer)."""

    def __init__(self, alive: list[str], stuck: tuple[str, ...] = ()):
        self.alive, self.stuck, self.sent = list(alive), stuck, []
        self.sleeping: set[str] = set()

    def send(self, sid: str, msg: object, frames: object = None) -> None:
        self.sent.append((sid, msg))
        if isinstance(msg, Control) and sid not in self.stuck:
            (self.sleeping.add if msg.command.startswith("sleep") else self.sleeping.discard)(sid)

    def alive_servers(self) -> list[str]:
        return list(self.alive)

    order_servers = alive_servers

    def asleep_servers(self) -> list[str]:
        return [s for s in self.alive if s in self.sleeping]

    def recv(self, timeout: float):
        return None

    def check_dead(self, dead_after_s: float) -> list[str]:
        return []


class Weights:
    def __init__(self):
        self.forgotten: list[str] = []

    def forget(self, sid: str, shm_unreadable: bool = False) -> None:
        self.forgotten.append(sid)


def _learner(hub: Hub, mode: str = "colocated", level: int = 1) -> Learner:
    cfg = load_config(
        None, ["model.path=m", "learner.max_staleness=0", "wire.weight_sync_timeout_s=0.5"]
    )
    cfg.placement.mode, cfg.placement.sleep_level = mode, level  # as the launcher resolves it
    env = SimpleNamespace(reward_range=(0.0, 1.0), num_tasks=lambda split: 10)
    L = Learner(cfg, hub=hub, env=env)
    L.publishing = SimpleNamespace(weights=Weights(), check=lambda now, t: None)
    return L


def test_the_engines_sleep_for_the_step_and_wake_before_the_update():
    hub = Hub(["r0", "r1"])
    L = _learner(hub)
    L.engines_asleep(True)
    assert [(s, m.command) for s, m in hub.sent] == [("r0", "sleep:1"), ("r1", "sleep:1")]
    assert sorted(hub.asleep_servers()) == ["r0", "r1"]
    L.engines_asleep(False)
    assert [m.command for _, m in hub.sent[2:]] == ["wake", "wake"] and not hub.asleep_servers()
    assert L.publishing.weights.forgotten == []  # level 1 keeps the weights


def test_level_two_makes_the_next_update_a_full_sync():
    hub = Hub(["r0"])
    L = _learner(hub, level=2)
    L.engines_asleep(True)
    L.engines_asleep(False)
    assert L.publishing.weights.forgotten == ["r0"]


def test_a_server_that_does_not_sleep_is_an_error_naming_it():
    L = _learner(Hub(["r0", "r1"], stuck=("r1",)))
    with pytest.raises(LearnerError, match=r"\['r1'\] did not sleep within 0.5s"):
        L.engines_asleep(True)


@pytest.mark.parametrize("mode, level", [("separate", 1), ("colocated", 0), ("auto", 1)])
def test_nothing_is_sent_in_other_placements(mode, level):
    hub = Hub(["r0"])
    _learner(hub, mode, level).engines_asleep(True)
    assert hub.sent == []


def test_sleeping_engines_need_a_synchronous_run():
    with pytest.raises(ValueError, match="set learner.max_staleness = 0"):
        load_config(
            None,
            [
                "model.path=m",
                'placement.mode="colocated"',
                "placement.sleep_level=1",
                'learner.device="cuda"',
            ],
        )


# ------------------------------------------------------------------ the rollout server's side


class SleepyEngine:
    """The calls the server makes of vLLM's AsyncLLM sleep mode (``fail``: sleep raises)."""

    errored = False

    def __init__(self, fail: bool = False):
        self.calls: list[str] = []
        self.fail = fail

    async def sleep(self, level: int = 1) -> None:
        if self.fail:
            raise RuntimeError("sleep mode is not enabled")
        self.calls.append(f"sleep {level}")

    async def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append("wake")


async def test_the_server_sleeps_and_wakes_its_engine_and_says_so(tmp_path):
    from climbrl.wire import Error, Heartbeat
    from tests.unit.test_failure_paths_waits import _server

    srv = _server(tmp_path)
    srv.engine = SleepyEngine()
    srv.client.welcomed.set()
    sent: list[object] = []

    async def send(msg: object, *frames: object) -> None:
        sent.append(msg)

    srv.client.send = send
    await srv._sleep_or_wake("sleep:2")
    await srv._sleep_or_wake("sleep:2")  # already asleep: nothing more
    assert srv.engine.calls == ["sleep 2"] and srv.asleep
    beats = [m for m in sent if isinstance(m, Heartbeat)]
    assert beats and beats[-1].asleep  # the learner learns it at once
    await srv._sleep_or_wake("wake")
    assert srv.engine.calls == ["sleep 2", "wake"] and not srv.asleep
    assert not [m for m in sent if isinstance(m, Heartbeat)][-1].asleep

    srv.engine, sent[:] = SleepyEngine(fail=True), []
    await srv._sleep_or_wake("sleep:1")
    assert not srv.asleep
    assert [(m.code, "not enabled" in m.message) for m in sent if isinstance(m, Error)] == [
        ("sleep_failed", True)
    ]
