"""data.sources mixtures: the weighted, seeded, resumable MixtureLoader and data.schedule's phases."""

import numpy as np
import pytest

from lmforge.config import ConfigError, UserError
from lmforge.data.mixture import (
    DataExhausted,
    MixPhaseSpec,
    MixSchedule,
    MixtureLoader,
    Source,
    assign_sources,
    expected_tokens,
)
from lmforge.train.config import load_config
from tests.unit.test_loader import write_shards

SEQ = 8


def make_source(root, k, n_windows, tok_hash="sha256:test", val=True):
    """Source k: token value k·10000 + 1 + position, so a row's first token names (source, window)."""
    stream = k * 10000 + 1 + np.arange(n_windows * SEQ + 1)
    splits = {"train": [stream[: len(stream) // 2], stream[len(stream) // 2:]]}
    if val:
        splits["val"] = [k * 10000 + 5000 + np.arange(4 * SEQ + 1)]
    return str(write_shards(root / f"src{k}", splits, vocab=40000, tok_hash=tok_hash))


@pytest.fixture
def dirs(tmp_path):
    return [make_source(tmp_path, k, n) for k, n in ((1, 40), (2, 24), (3, 16))]


def ids(batch):
    """(source k, window w) of every row."""
    first = batch[:, 0].numpy() - 1
    return [(int(v // 10000), int(v % 10000) // SEQ) for v in first]


def loader(dirs, weights=(0.5, 0.3, 0.2), stops=(), schedule=None, **kw):
    names = ["web", "code", "books"]
    sources = [Source(n, d, w, "stop" if n in stops else "repeat") for n, d, w in zip(names, dirs, weights)]
    sched = MixSchedule(names, list(weights), schedule) if schedule else None
    return MixtureLoader(sources, sched, seq_len=SEQ, global_batch=kw.pop("global_batch", 8), **kw)


def global_stream(make, n_batches, world_size):
    """The global rows of n batches read with world_size ranks (each rank's slice, in rank order)."""
    ranks = [make(rank=r, world_size=world_size) for r in range(world_size)]
    out = []
    for _ in range(n_batches):
        for ld in ranks:
            out += ids(ld.next_batch())
    return out, ranks


def test_deterministic_from_the_seed(dirs):
    a, _ = global_stream(lambda **kw: loader(dirs, seed=5, **kw), 10, 1)
    b, _ = global_stream(lambda **kw: loader(dirs, seed=5, **kw), 10, 1)
    c, _ = global_stream(lambda **kw: loader(dirs, seed=6, **kw), 10, 1)
    assert a == b and a != c


def test_rows_are_the_sources_windows(dirs):
    ld = loader(dirs)
    batch = ld.next_batch()
    assert batch.shape == (8, SEQ + 1)
    for row in batch.numpy():
        assert np.array_equal(row, row[0] + np.arange(SEQ + 1))  # a contiguous window of one source


def test_weights_are_honoured(dirs):
    rows, _ = global_stream(lambda **kw: loader(dirs, seed=1, **kw), 100, 1)  # 800 samples (sources repeat)
    counts = np.bincount([k for k, _ in rows], minlength=4)[1:]
    # a low-discrepancy draw: every count within a few samples of its share, not a binomial's ±sqrt(n)
    assert np.all(np.abs(counts - 800 * np.array([0.5, 0.3, 0.2])) <= 4), counts
    # also over any short stretch
    first = np.bincount([k for k, _ in rows[:80]], minlength=4)[1:]
    assert np.all(np.abs(first - 80 * np.array([0.5, 0.3, 0.2])) <= 3), first


def test_no_window_repeats_before_its_source_is_exhausted_then_a_new_epoch(dirs):
    rows, _ = global_stream(lambda **kw: loader(dirs, seed=2, **kw), 40, 1)
    sizes = {1: 40, 2: 24, 3: 16}
    for k, n in sizes.items():
        seq = [w for s, w in rows if s == k]
        assert len(seq) >= 2 * n  # at least two epochs of every source in 320 samples
        assert sorted(seq[:n]) == list(range(n))  # epoch 0: every window once
        assert sorted(seq[n:2 * n]) == list(range(n))  # epoch 1: every window once more ...
        assert seq[:n] != seq[n:2 * n]  # ... in a new order


def test_stop_leaves_the_mix_and_the_rest_is_renormalised(dirs):
    ld = loader(dirs, weights=(0.2, 0.3, 0.5), stops=("books",), seed=3)
    rows = []
    for _ in range(12):
        rows += ids(ld.next_batch())
    books = [i for i, (k, _) in enumerate(rows) if k == 3]
    assert len(books) == 16 and sorted(w for k, w in rows if k == 3) == list(range(16))
    after = rows[books[-1] + 1:]
    assert after and all(k in (1, 2) for k, _ in after)
    n1 = sum(k == 1 for k, _ in after)
    assert abs(n1 / len(after) - 0.4) < 0.1  # 0.2 / (0.2 + 0.3)
    assert ld.weights() == pytest.approx({"web": 0.4, "code": 0.6, "books": 0.0})


def test_all_stopped_ends_the_data_without_consuming(dirs):
    ld = loader(dirs, stops=("web", "code", "books"), seed=4)
    total = 40 + 24 + 16
    seen = []
    with pytest.raises(DataExhausted):
        while True:
            seen += ids(ld.next_batch())
    assert len(seen) == total // 8 * 8 and len(set(seen)) == len(seen)  # every window at most once
    state = ld.state_dict()
    with pytest.raises(DataExhausted):
        ld.next_batch()
    assert ld.state_dict() == state  # nothing consumed by the failed batch


def test_schedule_constant_and_linear_phases():
    sched = MixSchedule(["a", "b"], [1.0, 0.0], [MixPhaseSpec(4, {"a": 0.7, "b": 0.3}),
                                                MixPhaseSpec(8, {"b": 1.0}, "linear")])
    assert sched.weights(0) == pytest.approx([0.7, 0.3]) and sched.weights(3) == pytest.approx([0.7, 0.3])
    assert sched.weights(4) == pytest.approx([0.7 * 0.75, 0.3 * 0.75 + 0.25])
    assert sched.weights(7) == pytest.approx([0.0, 1.0]) and sched.weights(100) == pytest.approx([0.0, 1.0])
    steps = np.arange(12)
    assert np.allclose(sched.weights_for_steps(steps), [sched.weights(int(s)) for s in steps])


def test_schedule_phases_steer_the_batches(dirs):
    phases = [MixPhaseSpec(5, {"web": 1.0}), MixPhaseSpec(10, {"books": 1.0})]
    ld = loader(dirs, schedule=phases, seed=0)
    per_step = [{k for k, _ in ids(ld.next_batch())} for _ in range(12)]
    assert all(s == {1} for s in per_step[:5]) and all(s == {3} for s in per_step[5:])


@pytest.mark.parametrize("before,after", [(1, 1), (2, 1), (1, 2), (4, 2)])
def test_resume_is_exact_on_any_world_size(dirs, before, after):
    phases = [MixPhaseSpec(6, {"web": 0.6, "code": 0.3, "books": 0.1}),
              MixPhaseSpec(12, {"web": 0.1, "code": 0.2, "books": 0.7}, "linear")]

    def make(**kw):
        return loader(dirs, stops=("books",), schedule=phases, seed=9, **kw)

    whole, _ = global_stream(make, 16, 1)
    first, ranks = global_stream(make, 5, before)  # crosses nothing yet; the resume crosses both phases
    states = [ld.state_dict() for ld in ranks]
    assert all(s == states[0] for s in states)  # the state is global: the same on every rank
    resumed = [make(rank=r, world_size=after) for r in range(after)]
    for ld in resumed:
        ld.load_state_dict(states[0])
    rest = []
    for _ in range(11):
        for ld in resumed:
            rest += ids(ld.next_batch())
    assert first + rest == whole


def test_tokenizer_mismatch_is_one_line(tmp_path):
    a = make_source(tmp_path, 1, 10)
    b = make_source(tmp_path, 2, 10, tok_hash="sha256:other")
    with pytest.raises(UserError) as e:
        MixtureLoader([Source("web", a), Source("code", b)], seq_len=SEQ, global_batch=4)
    msg = str(e.value)
    assert "\n" not in msg and "'code'" in msg and "sha256:other" in msg and "same tokenizer" in msg


def test_state_from_other_data_is_refused(dirs):
    ld = loader(dirs, seed=1)
    ld.next_batch()
    state = ld.state_dict()
    with pytest.raises(UserError, match="seed"):
        loader(dirs, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="mixture"):
        loader(dirs, seed=1).loaders[0].load_state_dict(state)
    with pytest.raises(UserError, match="single data.dir"):
        loader(dirs, seed=1).load_state_dict(ld.loaders[0].state_dict())
    two = MixtureLoader([Source("web", dirs[0], 0.5), Source("code", dirs[1], 0.5)], seq_len=SEQ, global_batch=8,
                        seed=1)
    notes = two.load_state_dict({**state, "sources": {"web": state["sources"]["web"]}})
    assert notes and "'code' is new" in notes[0] and two.cursors == [state["sources"]["web"]["cursor"], 0]


def test_assign_sources_cuts_where_a_stop_source_runs_out():
    src = assign_sources(0, 0, 100, np.array([0.5, 0.5]), [0, 0], [10, np.inf])
    assert np.count_nonzero(src == 0) == 10 and np.all(src[np.flatnonzero(src == 0)[-1] + 1:] == 1)
    with pytest.raises(DataExhausted):
        assign_sources(0, 0, 30, np.array([0.5, 0.5]), [0, 0], [10, 10])


def test_expected_tokens_per_source():
    names = ["a", "b"]
    sched = MixSchedule(names, [0.75, 0.25], [MixPhaseSpec(50, {"a": 0.75, "b": 0.25}),
                                             MixPhaseSpec(100, {"b": 1.0})])
    rows, steps = expected_tokens(names, sched, 100, 8, 16, windows={"a": 1000, "b": 100})
    assert steps == 100
    assert rows["a"]["tokens"] == pytest.approx(50 * 8 * 0.75 * 16)
    assert rows["b"]["tokens"] == pytest.approx((50 * 8 * 0.25 + 50 * 8) * 16)
    assert rows["b"]["epochs"] == pytest.approx(5.0)
    # b stops after its 100 windows: a takes over; when a stops too the data ends
    rows, steps = expected_tokens(names, MixSchedule(names, [0.5, 0.5]), 1000, 8, 16,
                                  windows={"a": 300, "b": 100}, on_exhaust={"a": "stop", "b": "stop"})
    assert rows["b"]["exhausted_at_step"] == 25 and rows["a"]["tokens"] == pytest.approx(300 * 16)
    assert steps == 50


def _cfg(tmp_path, data):
    return {"run": {"dir": str(tmp_path / "run")}, "model": {"preset": "tiny"}, "data": data,
            "train": {"global_batch": 8, "max_steps": 10}}


@pytest.mark.parametrize("data,match", [
    ({"dir": "x", "sources": [{"name": "a", "dir": "y"}]}, "not both"),
    ({"sources": [{"name": "a", "dir": "y"}, {"name": "a", "dir": "z"}]}, "appears twice"),
    ({"sources": [{"name": "a b", "dir": "y"}]}, "must be a word"),
    ({"sources": [{"name": "a", "dir": "y", "weight": 0}]}, "every weight is 0"),
    ({"sources": [{"name": "a", "dir": "y", "weight": -1}]}, "finite number >= 0"),
    ({"sources": [{"name": "a", "dir": "y", "on_exhaust": "loop"}]}, "on_exhaust"),
    ({"sources": [{"name": "a", "dir": "y"}], "schedule": [{"until_step": 5, "weights": {"b": 1}}]}, "not in data"),
    ({"sources": [{"name": "a", "dir": "y"}], "schedule": [{"until_step": 5, "weights": {"a": 1}},
                                                          {"until_step": 5, "weights": {"a": 1}}]}, "greater than 5"),
    ({"dir": "x", "schedule": [{"until_step": 5, "weights": {"a": 1}}]}, "needs data.sources"),
    ({}, "data.dir is not set"),
])
def test_config_errors(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, base=_cfg(tmp_path, data))


def test_config_reads_sources_and_schedule(tmp_path):
    cfg = load_config(None, base=_cfg(tmp_path, {"sources": [{"name": "web", "dir": "a", "weight": 0.7},
                                                             {"name": "code", "dir": "b", "weight": 0.3,
                                                              "on_exhaust": "stop"}],
                                                 "schedule": [{"until_step": 8, "weights": {"web": 1}},
                                                              {"until_step": 10, "weights": {"code": 1},
                                                               "interpolate": "linear"}]}))
    assert cfg.data.shard_dirs() == ["a", "b"] and cfg.data.sources[1].on_exhaust == "stop"
    assert cfg.data.schedule[1].interpolate == "linear"


def test_doc_mask_batches_carry_document_ids(dirs):
    tokens, doc_ids = loader(dirs, doc_mask=True, seed=1).next_batch()
    assert tokens.shape == doc_ids.shape == (8, SEQ + 1) and int(doc_ids.min()) == 0


def test_per_source_metrics_reach_the_trackers_under_their_names():
    from lmforge.train.trackers import numeric_fields

    row = {"kind": "eval", "step": 4, "val_loss": 5.0, "val_loss/web": 4.5, "val_bpb/web": 2.0}
    assert numeric_fields(row) == {"eval/val_loss": 5.0, "eval/val_loss/web": 4.5, "eval/val_bpb/web": 2.0}
