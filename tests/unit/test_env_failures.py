"""An environment that fails, as the learner meets it (no engines): a failed eval episode
scores 0 and evaluation ends, wire.order_timeout_s bounds it, and an env that fails every
training episode ends the run with its error (wire.max_env_failures)."""

from __future__ import annotations

import json
import math
import time

import pytest

from climbrl.learner.learner import EnvFailureStreak, Learner, LearnerError
from climbrl.metrics import MetricsWriter
from climbrl.wire import ENV_ERROR, Error, Sample, Trajectory, WorkOrder
from tests.unit.test_crash_consistency import _learner

BOOM = "EnvFailure: every episode failed; first: env.reset raised RuntimeError: no such table"


class FakeEnv:
    reward_range = (0.0, 1.0)

    def num_tasks(self, split: str) -> int:
        return 100


class FakeMetrics:
    def __init__(self):
        self.records: list[dict] = []

    def write(self, rec: dict) -> None:
        self.records.append(rec)


def _sample(correct: float, error: str = "") -> Sample:
    return Sample(
        prompt_ids=[1],
        completion_ids=[] if error else [2],
        completion_mask=[] if error else [1],
        logprobs=[] if error else [-1.0],
        versions=[] if error else [3],
        reward=correct,
        finish_reason=ENV_ERROR if error else "stop",
        metrics={"env_error": 1.0} if error else {"correct": correct},
        error=error,
    )


def _eval_learner(**wire: float) -> Learner:
    L = _learner(["r0"])
    for k, v in wire.items():
        setattr(L.cfg.wire, k, v)
    L.cfg.learner.eval_size = 4
    L.env, L.metrics, L.eval_outcomes, L.eval_metrics = FakeEnv(), FakeMetrics(), {}, {}
    L.counters.update(eval_env_errors=0, eval_timeouts=0)
    return L


def _answer(L: Learner, answers: dict[int, object]) -> None:
    """Make the fake server answer eval task i with ``answers[i]``: a Sample (a trajectory),
    a str (an order_failed Error with that message) or None (no answer at all)."""

    def pump(timeout: float, real=L._pump) -> None:
        for sid, m in [x for x in L.hub.sent if isinstance(x[1], WorkOrder)]:
            a = answers[m.task_index]
            if isinstance(a, Sample):
                L.hub.inbox.append(
                    (
                        sid,
                        Trajectory(
                            run_id=L.run_id,
                            order_id=m.order_id,
                            server_id=sid,
                            policy_version=3,
                            samples=[a],
                            gen_seconds=0.0,
                            num_generated_tokens=1,
                        ),
                        [],
                        time.monotonic(),
                    )
                )
            elif isinstance(a, str):
                L.hub.inbox.append(
                    (
                        sid,
                        Error(origin=sid, code="order_failed", message=a, ref_id=m.order_id),
                        [],
                        time.monotonic(),
                    )
                )
        L.hub.sent.clear()
        real(timeout)

    L._pump = pump


def test_a_failed_eval_episode_scores_zero_and_is_reported(caplog):
    L = _eval_learner()
    _answer(L, {0: _sample(1.0), 1: BOOM, 2: _sample(1.0), 3: _sample(0.0, "env.score raised X")})
    acc = L.evaluate("test")  # returns: the failures are answers too
    assert acc == 0.5 and L.eval_outcomes["test"] == [1.0, 0.0, 1.0, 0.0]
    assert L.counters["eval_env_errors"] == 2 and L.counters["eval_timeouts"] == 0
    assert L.metrics.records[-1]["eval/test_env_errors"] == 2
    assert "2 of 4 episodes failed and score 0" in caplog.text and "no such table" in caplog.text
    assert (
        not L.book.benched and L.book.failures_in_a_row.get("r0", 0) == 0
    )  # eval says nothing of r0
    assert L.env_failures.in_a_row == 0  # nor of the training episodes


def test_eval_records_the_envs_other_metrics():
    """The mean of each numeric Sample.metrics entry over the eval tasks (a failed episode
    counts 0), in metrics.jsonl and, first and last eval, in summary.json."""
    L = _eval_learner()

    def s(correct: float, strict: float) -> Sample:
        x = _sample(correct)
        x.metrics = {"correct": correct, "strict": strict}
        return x

    _answer(L, {0: s(1.0, 0.0), 1: s(1.0, 1.0), 2: s(0.0, 0.0), 3: BOOM})
    L.step = 0
    L.evaluate("test")
    _answer(L, {0: s(1.0, 1.0), 1: s(1.0, 1.0), 2: s(1.0, 1.0), 3: s(0.0, 1.0)})
    L.step = 5
    L.evaluate("test")
    assert [r["eval/test_strict"] for r in L.metrics.records] == [0.25, 1.0]
    assert L.eval_metrics == {0: {"strict": 0.25}, 5: {"strict": 1.0}}


def test_an_eval_that_fails_every_episode_ends(caplog):
    L = _eval_learner(max_order_failures=2, max_env_failures=2)
    _answer(L, dict.fromkeys(range(4), BOOM))
    assert L.evaluate("test") == 0.0
    assert L.counters["eval_env_errors"] == 4 and not L.book.benched


def test_order_timeout_bounds_an_eval_order_that_never_answers(monkeypatch):
    L = _eval_learner()
    _answer(L, {0: _sample(1.0), 1: _sample(1.0), 2: None, 3: None})
    t0 = time.monotonic()
    clock = iter(range(10_000))  # each pump moves the clock 100 s: past the 600 s deadline
    monkeypatch.setattr(time, "monotonic", lambda: t0 + 100 * next(clock))
    assert L.evaluate("test") == 0.5
    assert L.counters["eval_timeouts"] == 2 and L.counters["eval_env_errors"] == 0
    assert not L.book.orders  # nothing sent again


def _run_training(L: Learner, answer: object, rounds: int = 200) -> None:
    """The learner's loop: refill, then handle one message; the fake server answers every
    training order with ``answer`` (an Error message or the samples of a Trajectory)."""
    for _ in range(rounds):
        L.dispatch()
        for sid, m in [x for x in L.hub.sent if isinstance(x[1], WorkOrder)]:
            if isinstance(answer, str):
                L.hub.inbox.append(
                    (
                        sid,
                        Error(origin=sid, code="order_failed", message=answer, ref_id=m.order_id),
                        [],
                        time.monotonic(),
                    )
                )
            else:
                L.hub.inbox.append(
                    (
                        sid,
                        Trajectory(
                            run_id=L.run_id,
                            order_id=m.order_id,
                            server_id=sid,
                            policy_version=3,
                            samples=answer,
                            gen_seconds=0.0,
                            num_generated_tokens=1,
                        ),
                        [],
                        time.monotonic(),
                    )
                )
        L.hub.sent.clear()
        L._pump(0)
        L.batcher.ready.clear()  # trained (a group with an episode that ran)


def test_an_env_that_fails_every_episode_ends_the_run_quoting_its_error():
    L = _learner(["r0", "r1"])  # two servers: neither is benched first (16 orders each)
    L.cfg.wire.max_env_failures = 64
    with pytest.raises(
        LearnerError,
        match=r"failed 64 training episodes in a row.*"
        r"wire.max_env_failures = 64.*no such table.*climbrl env-check",
    ):
        _run_training(L, BOOM)
    assert L.counters["order_failures"] == 64 // L.cfg.learner.group_size
    assert not L.book.benched


def test_failed_episodes_inside_trajectories_count_and_one_success_resets():
    L = _learner(["r0"])
    L.cfg.wire.max_env_failures = 3
    L.env_failures.limit = 3
    failed = [_sample(0.0, "env.reset raised KeyError: 'x'")] * 2
    L.dispatch()
    L.hub.inbox.append(
        (
            "r0",
            Trajectory(
                run_id="run-a",
                order_id="train-0",
                server_id="r0",
                policy_version=3,
                samples=failed,
                gen_seconds=0.0,
                num_generated_tokens=0,
            ),
            [],
            time.monotonic(),
        )
    )
    L._pump(0)
    assert L.env_failures.in_a_row == 2
    L.hub.inbox.append(
        (
            "r0",
            Trajectory(
                run_id="run-a",
                order_id="train-1",
                server_id="r0",
                policy_version=3,
                samples=[failed[0], _sample(1.0)],
                gen_seconds=0.0,
                num_generated_tokens=1,
            ),
            [],
            time.monotonic(),
        )
    )
    L._pump(0)
    assert L.env_failures.in_a_row == 0  # an episode ran
    L.hub.sent.clear()
    with pytest.raises(LearnerError, match="KeyError: 'x'"):
        _run_training(L, failed)


def test_streak_message_names_the_env_check_command():
    s = EnvFailureStreak(2, "my_env.py:MyEnv", {"level": 2})
    s.record(1, 0, "boom")
    with pytest.raises(LearnerError) as e:
        s.record(1, 0)
    assert "its last error: boom" in str(e.value)
    assert """climbrl env-check my_env.py:MyEnv --args '{"level": 2}'""" in str(e.value)


def test_summary_json_is_strict_with_null_where_no_eval_ran(tmp_path):
    L = _learner(["r0"])
    L.step, L.metrics = 2, MetricsWriter(tmp_path)
    try:
        summary = L.finish(float("nan"), float("nan"))
    finally:
        L.metrics.close()
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["accuracy_before"] is None and data["accuracy_after"] is None
    assert summary["accuracy_before"] is None
    MetricsWriter.summary(L.metrics, {"a": [1.0, math.inf], "b": {"c": math.nan}})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "a": [1.0, None],
        "b": {"c": None},
    }


def test_run_seed_does_not_reach_the_env():
    """The env is built from env.args alone (the learner's and every server's make_env)."""
    L = _learner(["r0"])
    L.cfg.run.seed = 7
    L.dispatch()
    orders = [m for _, m in L.hub.sent if isinstance(m, WorkOrder)]
    assert orders and all(m.env_args == {} and m.sampling.seed == 7 for m in orders)
