import itertools
import math

import pytest

from lmforge.train.config import ScheduleConfig
from lmforge.train.schedule import LRSchedule


def test_warmup_then_cosine_to_min_lr():
    s = LRSchedule("cosine", lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s(0) == pytest.approx(0.1)  # linear warmup: (step+1)/warmup
    assert s(4) == pytest.approx(0.5)
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert s(60) == pytest.approx(0.55)  # half way: min + (max-min)/2
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)  # past the end it stays at the floor
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    s = LRSchedule("wsd", lr=2.0, total_steps=100, warmup_steps=5, min_lr=0.0, decay_fraction=0.2)
    assert s(5) == s(50) == s(79) == 2.0
    assert s(80) == pytest.approx(2.0)
    assert s(90) == pytest.approx(1.0)  # linear decay half way through the last 20 steps
    assert s(100) == pytest.approx(0.0)
    sq = LRSchedule("wsd", lr=1.0, total_steps=100, min_lr=0.0, decay_fraction=0.2, decay_shape="sqrt")
    assert sq(90) == pytest.approx(1 - math.sqrt(0.5))


def test_constant_and_linear():
    c = LRSchedule("constant", lr=0.3, total_steps=50, warmup_steps=3)
    assert [c(i) for i in (0, 1, 2, 3, 49)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    lin = LRSchedule("linear", lr=1.0, total_steps=10, min_lr=0.0)
    assert [lin(i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_from_config_defaults_min_lr_to_a_tenth():
    s = LRSchedule.from_config(ScheduleConfig(name="cosine", warmup_steps=0), lr=3e-4, total_steps=100)
    assert s.min_lr == pytest.approx(3e-5)
    assert s(100) == pytest.approx(3e-5)
    assert s.state_dict()["total_steps"] == 100
