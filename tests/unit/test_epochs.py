"""EpochCursor: the global stream of units depends on the seed only, not on the number of ranks, and a
state dict resumes it exactly."""

from __future__ import annotations

import pytest

from lmforge.data.epochs import EpochCursor


def global_stream(world_size: int, steps: int, n: int = 10, gb: int = 4) -> list[list[int]]:
    cursors = [EpochCursor(n, gb, rank=r, world_size=world_size, seed=3) for r in range(world_size)]
    return [[u for c in cursors for u in c.next_slice()] for _ in range(steps)]


def test_stream_is_independent_of_world_size_and_drops_the_tail():
    one, two, four = global_stream(1, 7), global_stream(2, 7), global_stream(4, 7)
    assert one == two == four
    c = EpochCursor(10, 4, seed=3)
    assert c.batches_per_epoch == 2  # 10 units, batches of 4: the last 2 units of an epoch are dropped
    epoch0 = c.permutation(0)
    assert one[0] + one[1] == epoch0[:8] and one[2] + one[3] == c.permutation(1)[:8]
    assert sorted(epoch0) == list(range(10)) and c.permutation(1) != epoch0


def test_state_dict_resumes_on_another_world_size():
    c = EpochCursor(10, 4, seed=3)
    for _ in range(5):
        c.next_slice()
    state = c.state_dict()
    assert state == {"epoch": 2, "batch_in_epoch": 1, "samples_seen": 20}
    rest = [c.next_slice() for _ in range(3)]
    resumed = [EpochCursor(10, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    assert [[u for r in resumed for u in r.next_slice()] for _ in range(3)] == rest


def test_bad_layout():
    with pytest.raises(ValueError, match="bad batch layout"):
        EpochCursor(10, 6, rank=0, world_size=4)
