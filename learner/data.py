"""The data cursor: which training task comes next, counting only what was trained.

Tasks are visited in a seeded permutation per epoch. ``take`` hands out a sequence number and
task index; ``done`` marks a sequence trained; ``requeue`` gives a dropped one back (it is
handed out again before new ones). The state saved in checkpoints is the next fresh sequence
number plus every sequence handed out but not trained, so a resumed run replays exactly those:
no prompt is trained twice and none is skipped.
"""

from __future__ import annotations

import random
from typing import Any


class DataCursor:
    def __init__(self, num_tasks: int, seed: int = 0, next_seq: int = 0, pending: Any = ()):
        if num_tasks <= 0:
            raise ValueError("the environment's train split has no tasks")
        self.num_tasks, self.seed, self.next_seq = num_tasks, seed, next_seq
        self.outstanding: set[int] = set()
        self.requeued: list[int] = sorted(pending)
        self._perm_epoch, self._perm = -1, list(range(num_tasks))

    def task_of(self, seq: int) -> int:
        epoch, i = divmod(seq, self.num_tasks)
        if epoch != self._perm_epoch:
            self._perm = list(range(self.num_tasks))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._perm)
            self._perm_epoch = epoch
        return self._perm[i]

    def take(self) -> tuple[int, int]:
        if self.requeued:
            seq = self.requeued.pop(0)
        else:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.outstanding.add(seq)
        return seq, self.task_of(seq)

    def done(self, seq: int) -> None:
        self.outstanding.discard(seq)

    def requeue(self, seq: int) -> None:
        self.outstanding.discard(seq)
        self.requeued.append(seq)
        self.requeued.sort()

    def state(self) -> dict[str, Any]:
        pending = sorted(self.outstanding | set(self.requeued))
        return {
            "num_tasks": self.num_tasks,
            "seed": self.seed,
            "next_seq": self.next_seq,
            "pending": pending,
        }

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> DataCursor:
        return cls(st["num_tasks"], st["seed"], st["next_seq"], st["pending"])
