"""Synthetic tasks: deterministic, non-overlapping train / held-out splits, and the scorer.

pytest tests/unit/test_pretrain_synthetic.py
"""

from __future__ import annotations

import pytest

from climbrl.pretrain.synthetic import TASKS, extract_answer, get_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_and_reproducible(name: str) -> None:
    task = get_task(name)
    train = task.sample("train", 3000, seed=0)
    held = task.sample("heldout", 300, seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(task.split_of(e) == "train" for e in train)
    assert all(task.split_of(e) == "heldout" for e in held)
    assert task.sample("train", 50, seed=0) == train[:50]
    assert task.sample("train", 50, seed=1) != train[:50]
    # Both splits draw from the same distribution of sizes.
    assert len({len(e.prompt) for e in held}) > 2


def test_addition_answers_are_correct() -> None:
    for ex in get_task("add").sample("train", 200):
        a, b = ex.prompt.rstrip("=").split("+")
        assert int(ex.answer) == int(a) + int(b)
        assert ex.text == ex.prompt + ex.answer


def test_addition_mistake_drops_every_carry() -> None:
    from climbrl.pretrain.synthetic import Example

    add = get_task("add")
    # worked by hand, digit by digit mod 10
    for prompt, want in [
        ("48+88=", "26"),
        ("983+97=", "970"),
        ("5+5=", "0"),
        ("999+1=", "990"),
        ("123+456=", "579"),
        ("7+0=", "7"),
    ]:
        assert add.mistake(Example(prompt, "")) == want


def test_corpus_mistake_rate() -> None:
    add = get_task("add")
    clean = add.corpus(4000, seed=0)
    assert clean == add.corpus(4000, seed=0, mistake_rate=0.0)
    noisy = add.corpus(4000, seed=0, mistake_rate=0.5)
    assert noisy == add.corpus(4000, seed=0, mistake_rate=0.5)  # reproducible
    carries = changed = 0
    for c, n in zip(clean, noisy):
        p, ans = c.split("=")
        a, b = p.split("+")
        wrong = (
            "".join(str((int(x) + int(y)) % 10) for x, y in zip(a.zfill(3), b.zfill(3))).lstrip("0")
            or "0"
        )
        if wrong == ans:  # no carry: never changed
            assert n == c
            continue
        carries += 1
        assert n in (c, f"{p}={wrong}")
        changed += n != c
    assert carries > 1000 and 0.45 < changed / carries < 0.55
    with pytest.raises(ValueError, match="mistake_rate"):
        add.corpus(10, mistake_rate=1.5)
    assert get_task("reverse").corpus(50, mistake_rate=0.5) == get_task("reverse").corpus(50)


def test_scorer() -> None:
    task = get_task("add")
    assert task.score("432<|endoftext|><|pad|>", "432") == 1.0
    assert task.score(" 432\n12+4=16", "432") == 1.0
    assert task.score("4321<|endoftext|>", "432") == 0.0
    assert task.score("", "432") == 0.0
    assert extract_answer("abc def") == "abc"


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown synthetic task"):
        get_task("nope")
    with pytest.raises(ValueError, match="split"):
        get_task("add").sample("test", 3)  # type: ignore[arg-type]


def test_rl_env_is_the_pretraining_task() -> None:
    """The demo's RL env (``synthetic``) asks the corpus's own prompts; its test split is the
    held-out split the base is scored on, and its reward is the exact answer."""
    import asyncio

    from climbrl.envs.base import make_env

    env = make_env("synthetic", {"task": "add", "num_train": 300, "num_test": 50})
    task = get_task("add")
    train = [env.get_task("train", i) for i in range(env.num_tasks("train"))]
    test = [env.get_task("test", i) for i in range(env.num_tasks("test"))]
    corpus = set(task.corpus(300, seed=0))
    assert {t.prompt + t.answer for t in train} <= corpus
    assert all(task.split_of(_ex(t)) == "heldout" for t in test)
    assert all(task.split_of(_ex(t)) == "train" for t in train)

    async def play(t, text):  # type: ignore[no-untyped-def]
        await env.reset(t)
        return await env.step(text)

    t = test[0]
    right = asyncio.run(play(t, t.answer))
    wrong = asyncio.run(play(t, t.answer + "1"))
    assert (right.reward, right.info["correct"]) == (1.0, 1.0)
    assert (wrong.reward, wrong.info["correct"]) == (0.0, 0.0)
    partial = make_env("synthetic", {"partial_credit": 0.5, "num_train": 10, "num_test": 10})
    assert partial.score("4x2", "432") == (0.5 * 2 / 3, False)
    assert partial.score("432", "432") == (1.0, True)


def _ex(t):  # type: ignore[no-untyped-def]
    from climbrl.pretrain.synthetic import Example

    return Example(t.prompt, t.answer)
