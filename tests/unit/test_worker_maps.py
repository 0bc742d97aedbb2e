"""The worker keeps its mapping of a weights file from one reload to the next
(``rollout.worker_ext.FileViews``): it must see the learner's in-place rewrites, and drop the
mapping of a file that was replaced or deleted."""

from __future__ import annotations

import os

import pytest
import torch

from climbrl.rollout.worker_ext import FileViews


def _write(path, values, mode="r+b"):
    with open(path, mode) as f:
        f.write(torch.tensor(values, dtype=torch.float32).numpy().tobytes())


def test_kept_mapping_sees_in_place_rewrites(tmp_path):
    files = FileViews()
    p = tmp_path / "ring.weights"
    _write(p, [1.0, 2.0, 3.0, 4.0], "wb")
    a = files.mapped(str(p), 16)
    assert a.view(torch.float32).tolist() == [1.0, 2.0, 3.0, 4.0]
    _write(p, [5.0, 6.0, 7.0, 8.0])  # the learner rewrites its ring file in place
    b = files.mapped(str(p), 16)
    assert b is a  # the same mapping, not mapped again
    assert b.view(torch.float32).tolist() == [5.0, 6.0, 7.0, 8.0]
    assert files.mapped(str(p), 8) is not a  # another size: a new mapping


def test_replaced_or_deleted_files_are_not_kept(tmp_path):
    files = FileViews()
    p, q = tmp_path / "a.weights", tmp_path / "b.weights"
    _write(p, [1.0, 2.0], "wb")
    _write(q, [3.0, 4.0], "wb")
    a = files.mapped(str(p), 8)
    files.mapped(str(q), 8)
    tmp = tmp_path / "a.tmp"
    _write(tmp, [9.0, 9.5], "wb")
    keep = tmp_path / "keep"
    os.link(p, keep)  # hold the old inode so its number cannot be reused
    os.replace(tmp, p)  # a new file under the same name
    b = files.mapped(str(p), 8)
    assert b is not a and b.view(torch.float32).tolist() == [9.0, 9.5]
    q.unlink()
    files.mapped(str(p), 8)
    assert str(q) not in files.maps  # its memory is not held by a mapping


def test_a_file_shorter_than_the_layout_is_an_error_not_a_crash(tmp_path):
    files = FileViews()
    p = tmp_path / "short.weights"
    _write(p, [1.0, 2.0, 3.0, 4.0], "wb")
    files.mapped(str(p), 16)
    os.truncate(p, 8)  # the same file, cut short: its kept mapping must not be read past 8
    with pytest.raises(ValueError, match="has 8 bytes"):
        files.mapped(str(p), 16)
