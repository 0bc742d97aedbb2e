"""The data cursor hands every task out once per epoch and survives a checkpoint exactly."""

from climbrl.learner.data import DataCursor


def test_epoch_is_a_permutation():
    c = DataCursor(10, seed=3)
    idx = [c.take()[1] for _ in range(10)]
    assert sorted(idx) == list(range(10)) and idx != list(range(10))


def test_requeue_comes_back_first_and_once():
    c = DataCursor(100, seed=0)
    taken = [c.take() for _ in range(5)]
    c.requeue(taken[2][0])
    seq, idx = c.take()
    assert (seq, idx) == taken[2]
    assert c.take()[0] == 5


def test_resume_replays_exactly_the_untrained():
    c = DataCursor(50, seed=1)
    taken = [c.take() for _ in range(8)]
    for s, _ in taken[:5]:
        c.done(s)
    c.requeue(taken[6][0])
    r = DataCursor.from_state(c.state())
    trained = {s for s, _ in taken[:5]}
    replay = [r.take() for _ in range(3)]
    assert [s for s, _ in replay] == [5, 6, 7]  # the three handed out but never trained
    assert all(s not in trained for s, _ in replay)
    assert [i for _, i in replay] == [i for _, i in taken[5:8]]
    assert r.take()[0] == 8
